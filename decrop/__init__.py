"""DE-CROP: data-efficient certified robustness for pretrained classifiers (Nayak et al., WACV 2023).

A pure PyTorch library: configuration, data, models, sample generation, losses, denoiser training and
randomized-smoothing certification. Distributed execution and experiment tracking live in ``tuning/``;
this package never imports ray, mlflow or optuna.
"""

__version__ = "0.1.0"
