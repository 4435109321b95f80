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


def _cuda_index(device: torch.device | str | None) -> int | None:
    """Index of the CUDA device whose default generator draws the training noise; None when not on CUDA."""
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device | str | None = None, generator: torch.Generator | None = None
              ) -> dict[str, Any]:
    """The random state a resumed run needs, as plain tensors, ints and None (loadable with weights_only=True).

    ``torch``: the CPU generator (weight init, augmentation, noise on CPU). ``cuda``: every CUDA device's
    generator (`torch.cuda.get_rng_state_all`), when CUDA is available and initialised, else None; on a GPU the
    noise (``randn_like`` of a CUDA tensor) comes from the generator of the training `device`, whose index is
    ``cuda_device`` (None: training not on CUDA; `device` None means the current CUDA device). ``loader``: the
    DataLoader's shuffle generator, if any. `restore_rng_state` puts it back.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if cuda else None,
            "cuda_device": _cuda_index(device) if cuda else None,
            "loader": generator.get_state() if generator is not None else None}


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> None:
    """Set the generators from `rng_state`'s dict (also an older one without CUDA states).

    The CUDA states are restored when CUDA is available and the checkpoint has them (a checkpoint written on a
    CPU has none, and a GPU checkpoint resumed on a CPU has no CUDA to restore). The state of the generator that
    drew the training noise goes to the generator of this run's training `device`, even where that is another
    index: Ray Train workers that share a node's GPUs train on ``cuda:<local rank>``, all drawing the same
    stream (`decrop.distributed`), while rank 0 alone saved its states. The other devices get the saved states
    that exist for them (there are more or fewer devices after a move) and keep their own otherwise.
    """
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    on_cuda = device is None or torch.device(device).type == "cuda"
    if saved and torch.cuda.is_available() and (on_cuda or torch.cuda.is_initialized()):  # no CUDA init for CPU
        count = torch.cuda.device_count()
        current = list(torch.cuda.get_rng_state_all())
        states = [saved[i] if i < len(saved) else current[i] for i in range(count)]
        here, there = _cuda_index(device), state.get("cuda_device")
        if here is not None and there is not None and here < count and there < len(saved):
            states[here] = saved[there]
        torch.cuda.set_rng_state_all(states)
    if generator is not None and state.get("loader") is not None:
        generator.set_state(state["loader"])


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
