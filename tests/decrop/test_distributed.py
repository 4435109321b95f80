"""W data-parallel workers optimise exactly the objective of one process (decrop.distributed).

Two gloo workers (torch.multiprocessing, CPU) and this process compute, on the same global batch: the loss and
the denoiser's (DDP-averaged) gradients of one step of the baseline, of DE-CROP's stage 1 and of its stage 2
(with the discriminator's averaged gradients and its step), and a whole two-stage training run through
`run_stages` (shuffling, augmentation and noise included). A negative control shows the comparison has teeth:
with the BatchNorm statistics left per worker (the naive recipe) the gradients differ. Stage 2's discriminator
(no DDP of its own) is kept in sync by construction: started from different weights on each rank and with
gradients perturbed in opposite directions on the two ranks (as nondeterministic GPU kernels would), its
replicas stay bit-identical and follow the one-process run, which needs rank 0's weights broadcast and the
gradients averaged before its step.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

from decrop.config import load_config
from decrop.data import DatasetInfo
from decrop.distributed import GlobalBatchNorm, Shard, convert_global_batchnorm, no_forward_buffer_sync
from decrop.models import DomainDiscriminator, create_model
from decrop.objectives import DecropObjective, StabilityObjective
from decrop.models import build_denoiser
from decrop.prepare import Prepared
from decrop.stages import TrainHooks, method_stages, run_stages
from helpers import quadrant_images

SIZE, CLASSES, N, BATCH = 8, 4, 22, 9  # 22 images in batches 9, 9, 4: unequal shares (5/4, 5/4, 2/2)
RTOL, ATOL = 1e-4, 1e-5


def _prep() -> Prepared:
    cfg = load_config(None, ["data.augment=3", "train.epochs=1", "decrop.stage2_epochs=1", "train.adam_epochs=1",
                             f"train.batch_size={BATCH}", "denoiser.depth=3", "denoiser.width=4", "sigma=0.25"])
    torch.manual_seed(0)
    classifier = create_model("small_cnn", in_channels=1, num_classes=CLASSES, image_size=SIZE).eval()
    images, labels = quadrant_images(N, 0, SIZE, CLASSES)
    info = DatasetInfo("toy", 1, SIZE, CLASSES, (0.5,), (0.5,), tuple(map(str, range(CLASSES))))
    return Prepared(cfg=cfg, device=torch.device("cpu"), info=info, classifier=classifier, train_images=images,
                    train_labels=labels, train_indices=np.arange(N), val_images=images[:6],
                    val_targets=labels[:6], val_indices=np.arange(N, N + 6),
                    test_set=TensorDataset(images, labels), test_indices=np.arange(2), clean_accuracy=0.0)


def _decrop_images(prep: Prepared) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = prep.train_images
    return x, (x + 0.1 * torch.rand(x.shape, generator=g)).clamp(0, 1), (x + 0.05 * torch.rand(x.shape, generator=g))


def _one_step(prep: Prepared, case: str, shard: Shard, wrap) -> dict[str, object]:
    """Loss and gradients of one step of `case` on the first global batch."""
    torch.manual_seed(0)
    denoiser = build_denoiser(prep.cfg.denoiser, 1)
    with torch.no_grad():  # leave the identity start so every layer has a gradient
        denoiser.net[-1].weight.normal_(0, 0.1)
    model = wrap(denoiser)
    classifier = prep.classifier.requires_grad_(False)
    images = (prep.train_images[:BATCH],) if case == "baseline" else tuple(t[:BATCH] for t in _decrop_images(prep))
    discriminator = DomainDiscriminator(classifier.feature_dim) if case == "stage2" else None
    objective = (StabilityObjective(prep.cfg.sigma, shard) if case == "baseline"
                 else DecropObjective(prep.cfg.sigma, prep.cfg.decrop, discriminator, shard=shard))
    objective.set_progress(0.5)
    torch.manual_seed(1)  # the noise draw
    loss, parts = objective(model.train(), classifier, images, torch.zeros(BATCH).long())
    loss.backward()
    objective.after_backward()  # stage 2: the discriminator's gradients averaged over the workers, its step
    grads = {name: p.grad.clone() for name, p in denoiser.named_parameters()}
    if discriminator is not None:
        grads.update({f"disc.{name}": p.grad.clone() for name, p in discriminator.named_parameters()})
        grads.update({f"disc_stepped.{name}": p.detach().clone() for name, p in discriminator.named_parameters()})
    return {"parts": parts, "grads": grads}


PERTURB = 1e-3  # added to rank 0's discriminator gradients and taken from rank 1's: their mean is unchanged


def _discriminator_steps(prep: Prepared, shard: Shard, wrap, steps: int = 3) -> dict[str, torch.Tensor]:
    """Stage 2's discriminator after `steps` training steps (discriminator step, then denoiser step) on
    successive global batches. Each rank builds it from a different seed (rank 0's is the one-process seed) and
    its gradients are perturbed by +PERTURB on rank 0 and -PERTURB on rank 1, standing in for nondeterministic
    GPU kernels: without the broadcast and the gradient averaging the replicas would drift apart."""
    torch.manual_seed(0)
    denoiser = build_denoiser(prep.cfg.denoiser, 1)
    model = wrap(denoiser)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    classifier = prep.classifier.requires_grad_(False)
    torch.manual_seed(100 + shard.rank)
    discriminator = DomainDiscriminator(classifier.feature_dim)
    sign = (1.0, -1.0)[shard.rank] if shard.world == 2 else 0.0
    for p in discriminator.parameters():
        p.register_hook(lambda grad, sign=sign: grad + sign * PERTURB)
    cfg = dataclasses.replace(prep.cfg.decrop, disc_lr=1e-2)  # steps large enough to show any drift
    objective = DecropObjective(prep.cfg.sigma, cfg, discriminator, shard=shard)
    images = _decrop_images(prep)
    torch.manual_seed(1)
    for step in range(steps):
        objective.set_progress(step / steps)
        batch = tuple(t[step * BATCH // 2:step * BATCH // 2 + BATCH] for t in images)
        loss, _ = objective(model.train(), classifier, batch, torch.zeros(BATCH).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        objective.after_backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in discriminator.named_parameters()}


def _run(prep: Prepared, shard: Shard, wrap) -> dict[str, object]:
    hooks = TrainHooks(wrap=wrap, shard=shard)
    denoiser, result = run_stages(prep, prep.classifier, _decrop_images(prep),
                                  method_stages("decrop", prep, prep.classifier, hooks), hooks=hooks)
    return {"state": denoiser.state_dict(), "history": result.history}


def _everything(shard: Shard, wrap) -> dict[str, object]:
    prep = _prep()
    out = {case: _one_step(prep, case, shard, wrap) for case in ("baseline", "stage1", "stage2")}
    out["discriminator"] = _discriminator_steps(prep, shard, wrap)
    out["run"] = _run(prep, shard, wrap)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, global_bn: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = Shard(rank, world)
    if global_bn:  # the train loop's recipe (tuning/train_loop.py)
        wrap = lambda m: DDP(convert_global_batchnorm(m, shard), **no_forward_buffer_sync())  # noqa: E731
    else:  # the naive recipe: per-worker BatchNorm statistics, DDP's defaults
        wrap = DDP
    result = _everything(shard, wrap)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(global_bn: bool) -> list[dict[str, object]]:
    """What each of the two ranks computed."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, global_bn), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return _everything(Shard(), lambda m: m)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")


def test_two_gloo_workers_compute_the_one_process_loss_and_gradients(single):
    two, other = _spawn(global_bn=True)
    for case in ("baseline", "stage1", "stage2"):
        assert two[case]["parts"] == pytest.approx(single[case]["parts"], rel=RTOL), case
        _assert_close(two[case]["grads"], single[case]["grads"])
    # The whole two-stage run (shuffle, augmentation policy 3, noise, BatchNorm running statistics, stage 2's
    # discriminator and beta ramp) ends in the same denoiser with the same per-epoch losses.
    _assert_close(two["run"]["state"], single["run"]["state"])
    for row_two, row_one in zip(two["run"]["history"], single["run"]["history"], strict=True):
        for key in ("train/loss", "train/loss_lc", "train/loss_mmd_b", "val/agreement"):
            assert row_two[key] == pytest.approx(row_one[key], rel=RTOL, abs=ATOL), key

    # Stage 2's discriminator: the replicas are identical, bit for bit, after steps on different shards, from
    # different initial weights and with different gradients, and they are the one-process discriminator.
    for name in two["discriminator"]:
        assert torch.equal(two["discriminator"][name], other["discriminator"][name]), name
    _assert_close(two["discriminator"], single["discriminator"])
    for name in (key for key in two["stage2"]["grads"] if key.startswith("disc")):
        assert torch.equal(two["stage2"]["grads"][name], other["stage2"]["grads"][name]), name

    # Negative control: BatchNorm statistics per worker (the naive recipe) change the gradients.
    naive, _ = _spawn(global_bn=False)
    with pytest.raises(AssertionError):
        _assert_close(naive["stage1"]["grads"], single["stage1"]["grads"])


def test_shard_bounds_cover_the_batch_once():
    for size in range(0, 12):
        for world in (1, 2, 3, 5):
            spans = [Shard(r, world).bounds(size) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_global_batchnorm_is_plain_batchnorm_for_one_worker_and_converts_back():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    assert convert_global_batchnorm(net, Shard()) is net and type(net[1]) is torch.nn.BatchNorm2d
    x = torch.randn(5, 1, 6, 6)
    bn = GlobalBatchNorm(3)
    bn.load_state_dict(net[1].state_dict())
    torch.testing.assert_close(bn(net[0](x)), net[1](net[0](x)))
    converted = convert_global_batchnorm(net, Shard(0, 2))
    assert type(converted[1]) is GlobalBatchNorm
    assert set(converted.state_dict()) == set(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3),
                                                                  torch.nn.BatchNorm2d(3)).state_dict())


def test_ddp_of_the_train_loop_does_not_rewrite_buffers_at_each_forward(tmp_path):
    """DE-CROP runs the denoiser three times before one backward; DDP's default in-place re-broadcast of the
    BatchNorm buffers at each forward broke that backward under cuDNN (seen on an H100 and an H200 with nccl;
    CPU BatchNorm does not save the buffers, so only this setting can be checked here)."""
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the spelling this torch wants: no deprecation warning
            model = DDP(create_model("dncnn", in_channels=1, depth=3, width=8), **no_forward_buffer_sync())
        assert not model.will_sync_module_buffers()
        assert DDP(create_model("dncnn", in_channels=1, depth=3, width=8)).will_sync_module_buffers()  # the default
    finally:
        dist.destroy_process_group()
