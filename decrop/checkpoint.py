"""Model checkpoints: a state dict plus metadata, written atomically and read safely.

A checkpoint file holds ``{"meta": {...}, "state_dict": {...}}``. Loading uses ``torch.load(weights_only=True)``
(no pickled code runs), checks the metadata against what the caller expects (architecture, dataset, the config
hash) and the state dict against the model, and turns every failure into a `CheckpointError` that names the
file, the problem and the fix. Saving goes through a temporary file and ``os.replace``, so an interrupted save
never leaves a truncated checkpoint where a good one was.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write named tensors (a state dict, or cached samples) with their metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"meta": dict(meta), "state_dict": {k: v.detach().cpu() for k, v in tensors.items()}}, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return save_tensors(path, module.state_dict(), meta)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw ``{"meta", "state_dict"}`` of a checkpoint, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, a pickle with code in it, ...
        # torch's own first line for a file that is no archive is advice about weights_only: say what it is
        detail = (f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if zipfile.is_zipfile(path)
                  else "not a torch.save archive")
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a decrop checkpoint ({detail}); delete "
                              f"it and rerun to recreate it") from None
    if not isinstance(payload, dict) or set(payload) != {"meta", "state_dict"}:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a decrop checkpoint (expected keys 'meta' and "
                              f"'state_dict'); delete it and rerun to recreate it")
    return payload


def load_tensors(path: str | Path, expect: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named tensors and metadata of `path`, after checking ``meta[k] == expect[k]`` for every key of `expect`."""
    payload = read_checkpoint(path)
    meta = payload["meta"]
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise CheckpointError(f"checkpoint {str(path)!r} was written for {key}={meta.get(key)!r}, but this "
                                  f"run needs {key}={want!r}; point the run at the right file or delete this "
                                  f"one to recreate it")
    return payload["state_dict"], meta


def load_checkpoint(path: str | Path, model: nn.Module, expect: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Load weights from `path` into `model` after checking ``meta[k] == expect[k]`` for every key of `expect`.

    Returns the checkpoint's metadata. The model is left untouched when any check fails.
    """
    theirs, meta = load_tensors(path, expect)
    module = getattr(model, "module", model)
    ours = module.state_dict()
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape differs", sorted(shapes))) if keys)
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model {type(module).__name__} "
                              f"({detail}); it was written for another architecture")
    module.load_state_dict(theirs)
    return meta
