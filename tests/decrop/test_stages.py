"""The training stages of one experiment: plain, interrupted and resumed (what Ray Train's retries rely on)."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from decrop.config import load_config
from decrop.data import dataset_info
from decrop.models import create_model
from decrop.prepare import Prepared
from decrop.stages import ResumeState, TrainHooks, method_stages, run_stages
from decrop.samples import generate_samples


SMALL = ["data.augment=2", "train.epochs=2", "train.adam_epochs=1", "train.batch_size=8", "denoiser.depth=3",
         "denoiser.width=4", "decrop.stage2_epochs=2", "decrop.attack_steps=2", "decrop.interp_steps=2"]


@pytest.fixture(scope="module", params=["restart", "continue"])
def prep(request):
    """Stage 2 with a schedule of its own, or stage 1's continued (`decrop.stage2_schedule`)."""
    torch.manual_seed(0)
    cfg = load_config(None, [*SMALL, f"decrop.stage2_schedule={request.param}"])
    classifier = create_model("small_cnn", in_channels=1, num_classes=10).eval()
    images, labels = torch.rand(24, 1, 28, 28), torch.arange(24) % 10
    return Prepared(cfg=cfg, device=torch.device("cpu"), info=dataset_info("fashion_mnist"),
                    classifier=classifier, train_images=images, train_labels=labels, train_indices=np.arange(24),
                    val_images=torch.rand(8, 1, 28, 28), val_targets=labels[:8], val_indices=np.arange(24, 32),
                    test_set=TensorDataset(images, labels), test_indices=np.arange(4), clean_accuracy=0.0)


def _decrop_images(prep):
    samples = generate_samples(prep.classifier, prep.train_images, prep.train_labels, prep.cfg.decrop, seed=0)
    return (prep.train_images, *samples.as_images())


@pytest.mark.parametrize("stop_after", [1, 2, 3])  # inside stage 1, exactly at the stage boundary, in stage 2
def test_resumed_run_equals_the_uninterrupted_one(prep, stop_after):
    images = _decrop_images(prep)
    straight, _ = run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier))

    saved = []

    def keep(epoch, metrics, state):
        if epoch + 1 == stop_after:
            saved.append(state())
    run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier),
               hooks=TrainHooks(on_epoch_end=keep))
    # Through a checkpoint file, as Ray Train's workers keep it: plain tensors and numbers, weights_only.
    file = io.BytesIO()
    torch.save(saved[0].as_dict(), file)
    file.seek(0)
    state = ResumeState.from_dict(torch.load(file, weights_only=True))
    assert state.epoch == stop_after
    resumed, result = run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier),
                                 hooks=TrainHooks(resume=state))
    assert [row["epoch"] for row in result.history] == list(range(stop_after + 1, 5))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_continued_schedule_gives_decrop_the_baselines_optimiser_and_learning_rate_at_every_epoch(prep):
    """With ``decrop.stage2_schedule=continue`` DE-CROP's epoch e (over both stages) steps the optimiser the
    baseline's epoch e steps, at the same learning rate, and stage 2 keeps stage 1's SGD momentum; 'restart'
    begins stage 2 with Adam again."""
    cfg = replace(prep.cfg, train=replace(prep.cfg.train, lr_step=1, lr_gamma=0.5))
    prep = replace(prep, cfg=cfg)
    kinds = {}

    def optimiser_of(name):
        def keep(epoch, metrics, state):
            schedule = state().schedule
            kinds.setdefault(name, []).append(schedule["kind"])
        return keep
    _, base = run_stages(prep, prep.classifier, (prep.train_images,), method_stages("baseline", prep, prep.classifier),
                         hooks=TrainHooks(on_epoch_end=optimiser_of("baseline")))
    _, ours = run_stages(prep, prep.classifier, _decrop_images(prep), method_stages("decrop", prep, prep.classifier),
                         hooks=TrainHooks(on_epoch_end=optimiser_of("decrop")))
    lrs = [row["train/lr"] for row in base.history]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4]) and kinds["baseline"] == ["adam", "sgd", "sgd", "sgd"]
    if cfg.decrop.stage2_schedule == "continue":
        assert [row["train/lr"] for row in ours.history] == pytest.approx(lrs)
        assert kinds["decrop"] == kinds["baseline"]
    else:
        assert [row["train/lr"] for row in ours.history] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3])
        assert kinds["decrop"] == ["adam", "sgd", "adam", "sgd"]


def test_resume_inside_stage_two_restores_the_discriminator_and_its_ramp(prep):
    images = _decrop_images(prep)
    straight, full = run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier))
    saved = []
    run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier),
               hooks=TrainHooks(on_epoch_end=lambda e, m, state: saved.append(state()) if e == 2 else None))
    assert saved[0].objective["discriminator"]  # stage 2's discriminator is in the checkpoint
    resumed, result = run_stages(prep, prep.classifier, images, method_stages("decrop", prep, prep.classifier),
                                 hooks=TrainHooks(resume=saved[0]))
    assert result.history[-1]["train/beta"] == full.history[-1]["train/beta"]  # p continues, not restarts
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_release_memory_hands_a_freed_peak_back_to_the_os():
    """With `tune_allocator`'s thresholds a freed 256 MiB tensor stays in the process (the reuse that makes
    certification fast); `release_memory` (called at the end of `prepare`, after the full split is dropped)
    returns it. In a subprocess: the allocator setting is process-wide."""
    import subprocess
    import sys

    code = """
import re, torch
from decrop.runtime import release_memory, tune_allocator
anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
assert tune_allocator()
x = torch.ones(64 * 2**20)  # 256 MiB, touched
peak = anon()
del x
kept = anon()
assert release_memory()
print(peak, kept, anon())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    peak, kept, released = map(int, out.stdout.split())
    assert kept > peak - 32, (peak, kept)  # the tuned allocator keeps the freed pages...
    assert released < peak - 200, (peak, released)  # ...until they are released
