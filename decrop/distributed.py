"""Data-parallel training that computes exactly the objective of one process on the same global batch.

With W DDP workers the naive recipe (each worker draws its own shard, noise and augmentation, computes
BatchNorm statistics, the MMD and the discriminator loss on its own shard) silently changes the method: the
MMD between two 16-image sets is not the MMD between two 32-image sets, BatchNorm normalises with shard
statistics, and `--workers-per-trial` becomes a hyperparameter. Here instead:

- every worker iterates the **same global batch** (same shuffle, same augmentation, same noise: all drawn from
  identically seeded generators), and computes only its contiguous share of the images (`Shard.local`);
- per-image loss terms are *sums* over the worker's share divided by the global batch size and multiplied by W
  (`Shard.mean`): DDP averages gradients over the W workers, so the gradient is exactly that of the global mean;
- terms over the whole batch (the MMD, the domain discriminator) see the features of all workers, gathered with
  gradients (`Shard.gather`); every worker computes the same value, and the gather's backward sums the W
  identical contributions, which DDP's averaging divides by W again;
- the domain discriminator (DE-CROP's stage 2, not wrapped in DDP) is a replica on every worker: rank 0's
  weights are broadcast when the objective is built (`Shard.broadcast`) and its gradients averaged before its
  own optimiser steps (`Shard.average_gradients`), so the replicas stay identical by construction, also where
  GPU kernels are nondeterministic. Each worker's discriminator gradient is that of the one-process domain loss
  (same gathered features, same weights), so their average is the one-process gradient;
- BatchNorm layers of the trained network normalise with statistics over the global batch
  (`GlobalBatchNorm`, through an autograd all-reduce).

Why gradients come out right: with autograd collectives whose backward is a sum over workers, worker r's
gradient is that of sum_k l_k (its own and the others' losses, through the collectives); DDP then averages, so
the parameters see the gradient of (1/W) sum_k l_k. Choosing l_k = W * (share of the global mean) + (global
terms) makes that equal to the one-process loss. `tests/decrop/test_distributed.py` checks it with 2 gloo workers.

`torch.nn.SyncBatchNorm` does the BatchNorm part on GPUs but refuses CPU tensors; `GlobalBatchNorm` is one
implementation for both, so the CPU tests exercise the code that GPU runs use. One process (``Shard()``) makes
every operation here the identity: the single-process path is the plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers whose backward is the sum of the workers' gradients (what `Shard` relies on).

    Written here because ``torch.distributed.nn.functional.all_reduce`` is deprecated in torch 2.14 and its
    suggested replacement (functional collectives) has no autograd for all-reduce."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(tensor: Tensor) -> Tensor:
    """Differentiable sum of `tensor` over all workers of the default process group."""
    return _AllReduceSum.apply(tensor)


@dataclass(frozen=True)
class Shard:
    """This worker's place among `world` workers that share one global batch (rank 0 of 1: no distribution)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The shard of this process in the initialised default process group, else the single-process one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def bounds(self, size: int) -> tuple[int, int]:
        """[start, stop) of this worker's contiguous share of `size` items (shares differ by at most one)."""
        base, extra = divmod(size, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def local(self, batch: Tensor) -> Tensor:
        """This worker's rows of a global batch (B, ...) that every worker holds."""
        if self.world == 1:
            return batch
        start, stop = self.bounds(len(batch))
        return batch[start:stop]

    def gather(self, local: Tensor, size: int) -> Tensor:
        """The global (size, ...) tensor from every worker's local rows, differentiable: each worker's rows are
        placed at their offset in a zero tensor and the tensors are summed over workers (an autograd
        all-reduce, whose backward sums the gradients of all workers)."""
        if self.world == 1:
            return local
        start, stop = self.bounds(size)
        full = F.pad(local, (0, 0) * (local.dim() - 1) + (start, size - stop))
        return all_reduce(full)

    def total(self, value: Tensor) -> Tensor:
        """The sum of `value` over workers (differentiable)."""
        return value if self.world == 1 else all_reduce(value)

    def broadcast(self, module: nn.Module) -> nn.Module:
        """`module` with rank 0's parameters and buffers on every worker (in place); a no-op for one worker."""
        if self.world > 1:
            with torch.no_grad():
                for tensor in (*module.parameters(), *module.buffers()):
                    dist.broadcast(tensor, src=0)
        return module

    def average_gradients(self, params) -> None:
        """Replace the gradients of `params` by their mean over the workers, in one flat all-reduce (divided by
        W before summing, as DDP does: identical gradients come out bit for bit). Parameters without a gradient
        are skipped; every worker must have gradients for the same ones (they run the same computation). A no-op
        for one worker."""
        if self.world == 1:
            return
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]).div_(self.world)
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(chunk.view_as(p.grad))

    def mean(self, local_sum: Tensor, size: int) -> tuple[Tensor, float]:
        """A per-image term summed over this worker's rows -> (the loss to backpropagate, the global mean).

        The first is ``W * local_sum / size``: DDP averages gradients over the W workers, which makes this the
        gradient of the global mean over `size` images. The second is the global mean itself, for logging.
        """
        logged = self.total(local_sum.detach()) / size
        return local_sum * (self.world / size), float(logged)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch across all workers.

    The per-channel sum, sum of squares and count of every worker are summed with an autograd all-reduce, so
    normalisation and its gradient are those of one process seeing the whole batch. Running statistics are
    updated as `nn.BatchNorm2d` does (unbiased variance). In eval mode, or with one worker, it is a plain
    BatchNorm. Works for (N, C) and (N, C, ...) inputs on any device and backend.
    """

    def __init__(self, *args, shard: Shard | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shard = shard or Shard()

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.shard.world == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()  # statistics in fp32 also under bf16 autocast
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        stats = self.shard.total(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count.view(1)]))
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def no_forward_buffer_sync() -> dict:
    """DistributedDataParallel keyword arguments that stop it re-broadcasting buffers at every forward call.

    The DE-CROP objective runs the denoiser three times before one backward pass (x, boundary and interpolated
    samples). With the default, DDP copies rank 0's buffers (BatchNorm's running statistics) into the module
    in place at each forward call, and on CUDA the cuDNN BatchNorm's backward then finds a running-statistics
    tensor it saved modified ("modified by an inplace operation", seen on an H100 with nccl). The sync is also
    pointless here: `GlobalBatchNorm` updates every worker's running statistics with the same global-batch
    values. Buffers are still synced once, when DDP wraps the module. PyTorch >= 2.14 names this
    ``forward_sync_buffers``; earlier versions ``broadcast_buffers`` (deprecated in 2.14).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def convert_global_batchnorm(module: nn.Module, shard: Shard) -> nn.Module:
    """`module` with every BatchNorm layer replaced by a `GlobalBatchNorm` with the same parameters and running
    statistics (in place where possible; returns the converted module). A no-op for one worker."""
    if shard.world == 1:
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, shard=shard)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted.to(next(iter(module.buffers()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child, shard))
    return module
