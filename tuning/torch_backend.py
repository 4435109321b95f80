"""Ray Train's PyTorch backend, for a trainer built in a process that does not load torch.

`ray.train.torch.TorchTrainer` imports torch as soon as it is built (its `TorchConfig` lives in a module that
imports torch), and ``fit()`` instantiates the backend class in the calling process. A Tune trial actor only
builds the trainer and waits for it, yet loading torch there costs every trial actor the memory of torch's
import, once per trial training at the same time (`benchmarks/results/sweep_cpu.md` has the measurement).

`TorchBackend` is Ray's `TorchConfig` (same fields, same defaults) and `torch_trainer` builds the
`DataParallelTrainer` the way ``TorchTrainer.__init__`` does (backend nccl when the workers have GPUs, else
gloo); what touches torch is Ray's own code, imported where it runs: the process-group set-up and tear-down
(Ray's ``_TorchBackend``) in the Train controller, the per-worker CUDA device selection
(``TorchConfigContextManager``) in each Train worker. Both processes load torch anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def _ray_torch_backend() -> Backend:
    from ray.train.torch.config import _TorchBackend

    return _TorchBackend()


class _Backend(Backend):
    """Ray's ``_TorchBackend``, created (and torch imported) at its first call."""

    share_cuda_visible_devices: bool = True  # as Ray's: a worker sees its node's GPUs, for nccl

    def on_start(self, worker_group, backend_config: BackendConfig) -> None:
        _ray_torch_backend().on_start(worker_group, backend_config)

    def on_training_start(self, worker_group, backend_config: BackendConfig) -> None:
        _ray_torch_backend().on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group, backend_config: BackendConfig) -> None:
        _ray_torch_backend().on_shutdown(worker_group, backend_config)


class _WorkerContext:
    """Ray's ``TorchConfigContextManager`` (each Train worker on its own CUDA device), imported in the worker."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        return self._inner.__exit__(*exc)


@dataclass
class TorchBackend(BackendConfig):
    """Ray's `TorchConfig`: `backend` (None: nccl with GPUs, else gloo), `init_method` ("env" or "tcp") and
    `timeout_s` of the process group."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _Backend

    @property
    def train_func_context(self) -> type[_WorkerContext]:
        return _WorkerContext

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


def torch_trainer(train_loop_per_worker: Callable[[dict], Any], **kwargs: Any) -> DataParallelTrainer:
    """A PyTorch DDP trainer (`ray.train.torch.TorchTrainer`'s arguments but `torch_config`), built without
    loading torch here."""
    scaling = kwargs.get("scaling_config")
    backend = "nccl" if scaling is not None and scaling.use_gpu else "gloo"
    return DataParallelTrainer(train_loop_per_worker, backend_config=TorchBackend(backend=backend), **kwargs)
