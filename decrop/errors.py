"""The errors of bad input: a config key, a data folder, a model file, an output path.

Each is raised with a message that names the key or file, the problem and the fix; the command line
(``python -m decrop``, ``tuning/sweep.py``) prints it as one line and exits with code 2, before any compute.
They live here, apart from the modules that raise them, so that the command line can catch them without
importing torch (a config typo is reported in a fraction of a second, not after seconds of imports).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the allowed values."""


class DatasetNotFoundError(FileNotFoundError):
    """A built-in dataset's files are missing or unusable and cannot be obtained (offline, or a bad copy)."""


class FolderDataError(ValueError):
    """An image folder's layout or content is unusable; the message names the folder or file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or was written for another model or setting."""


class ClassifierError(ValueError):
    """The user's classifier file cannot be loaded, or does not fit the data it is meant to classify."""


class SmoothedModelError(ValueError):
    """A smoothed-model file, or the run it is exported from, is unusable; the message names it and the fix."""


BAD_INPUT: tuple[type[Exception], ...] = (ConfigError, DatasetNotFoundError, FolderDataError, CheckpointError,
                                          ClassifierError, SmoothedModelError)
