"""Helpers shared by test modules: `from helpers import ...` (tests/ is on pytest's `pythonpath`, pyproject.toml).

Fixtures stay in conftest.py; what tests import by name lives here, so no test imports conftest.
"""

import torch

# Overrides that shrink the quick profile's sweep to seconds per trial (tests/tuning, tests/cluster).
TINY_SWEEP = ["train.epochs=2", "decrop.stage2_epochs=1", "decrop.attack_steps=2", "decrop.interp_steps=2",
              "certify.val_images=8", "certify.n=100", "certify.n0=20", "data.test_every=1000", "denoiser.depth=3",
              "denoiser.width=8", "classifier.epochs=1"]


def quadrant_images(n: int, seed: int, size: int, num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable toy data: images (n, 1, size, size) of noise in [0, 0.5] with the quadrant of the class
    (labels (n,) cycling through 0..3) raised by 0.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    half = size // 2
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * half:(r + 1) * half, s * half:(s + 1) * half] += 0.5
    return x, y


# ------------------------------------------------------------------------------------------------ fault injection

FAIL_ONCE_ENV, FAIL_ALWAYS_ENV = "DECROP_TEST_FAIL_ONCE", "DECROP_TEST_FAIL_ALWAYS"


def inject_fault(name: str) -> None:
    """Raise in a trial named `name` when the environment says so (the fault tests set it for their whole Ray):

    ``DECROP_TEST_FAIL_ALWAYS=<file>``: a trial whose name contains a line of that file (read at every attempt;
    no file, no failure) raises on every attempt. ``DECROP_TEST_FAIL_ONCE=<marker file>``: the first attempt (of
    any trial) that finds the marker absent creates it and raises; later attempts run normally."""
    import os

    always, once = os.environ.get(FAIL_ALWAYS_ENV), os.environ.get(FAIL_ONCE_ENV)
    if always and os.path.exists(always):
        with open(always) as f:
            if any(line.strip() and line.strip() in name for line in f):
                raise RuntimeError(f"injected failure ({FAIL_ALWAYS_ENV}) of trial {name!r}")
    if once:
        try:
            open(once, "x").close()  # exclusive: of trials racing for the marker, one fails
        except FileExistsError:
            return
        raise RuntimeError(f"injected failure ({FAIL_ONCE_ENV}) of trial {name!r}")


def faulty_trial(params, settings) -> None:
    """`tuning.trainable.run_trial` with `inject_fault` between the attempt's `Trial.open` (so the failure shows
    in the trial's MLflow run) and `Trial.run`. Pickled by value (`faulty_trainable`): Ray's workers need not
    import this module."""
    import ray.tune

    from tuning.trainable import Trial

    trial = Trial(params, settings)
    done = trial.open()
    if done is None:
        inject_fault(trial.point["name"])
    ray.tune.report(done if done is not None else trial.run())


def faulty_trainable(settings):
    """`tuning.trainable.tune_trainable` with `faulty_trial` as the trial function: the test-only trainable."""
    import sys

    from ray import cloudpickle

    from tuning.trainable import tune_trainable

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return tune_trainable(settings, trial=faulty_trial)
