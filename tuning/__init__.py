"""Hyperparameter studies of DE-CROP with Ray Tune + Optuna, tracked in MLflow (see DESIGN.md section 3)."""
