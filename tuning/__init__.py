"""Hyperparameter studies of DE-CROP with Ray Tune + Optuna, tracked in MLflow (docs/architecture.md)."""
