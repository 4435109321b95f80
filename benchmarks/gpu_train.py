"""One epoch of DDP denoiser training on the GPU: a plain torch.distributed step, then one real Ray Train run.

    python benchmarks/gpu_train.py --out OUT/train.jsonl [--device cuda] [--quick]

The GPU machine has no network and may lack Debian's Fashion-MNIST package, so the data is a **synthetic
CIFAR-10**: random pixels and labels written in CIFAR's own pickle format (``cifar-10-batches-py``) into a
temporary folder and read by decrop's real loader (`decrop.data.load_dataset`), which is all the pipeline
needs from a dataset. Random data: the numbers are timings, not accuracies.

1. ``nccl_step``: a world-size-1 ``torch.distributed`` group in this process (nccl on CUDA, gloo on CPU),
   DnCNN-17x64 wrapped in ``DistributedDataParallel``, a few steps of the DE-CROP objective
   (`decrop.objectives.DecropObjective`) through a frozen ResNet-110 on random batches of 64. It checks NCCL
   and a DDP all-reduce on their own, so a Ray failure can be told apart from an NCCL one.
2. ``ray_train``: one ``TorchTrainer`` run (1 worker, 1 GPU, backend nccl) of the platform's own worker
   function `tuning.train_loop.train_loop_per_worker` on the paper profile (ResNet-110 trained 1 epoch,
   DnCNN-17x64, 500 training images as the paper's 1% of CIFAR-10, 500 validation images) for 1 epoch of
   stage 1. As in a Tune trial (`tuning.trainable.run_trial`), the driver prepares the classifier and the
   boundary/interpolated samples first (their time is ``prep_s``), so the worker reads them from the cache.
   Reported: ``fit()``'s wall time and the epoch's own time (``train/epoch_time`` from the worker).

3. ``train_step``: the quick profile's training step on the device (`benchmarks/train_speed.py`'s `Case`: the
   library's objectives stepped by Adam, DnCNN-7x32 through the small CNN, batch 32, 1x28x28): ms per step and
   images per second for DE-CROP stage 1, stage 2 and the baseline, beside the CPU's numbers in
   ``benchmarks/results/train_speed_cpu.md``.
4. ``kseed_step``: K seeds as one grouped-conv denoiser against K separate ones (`train_speed.kseed_cases`),
   K = 1, 3, 10: where one small DnCNN leaves a GPU mostly idle, sharing the work may pay (on a CPU it does not).
5. ``decrop_run``: a whole ``python -m decrop run`` in a subprocess on the paper's model sizes (ResNet-110
   trained 1 epoch, DnCNN-17x64) and the synthetic CIFAR-10: a few steps of every phase (subset, boundary and
   interpolated samples, baseline, DE-CROP stage 1 and stage 2, certification of 10 test images at n = 1,000),
   then ``python -m decrop export`` of the smoothed model a user takes home.
6. ``resume``: training resumed from a checkpoint on the device continues the uninterrupted run: DE-CROP at the
   paper's sizes for 3 epochs (2 of stage 1, 1 of stage 2), stopped after epoch 1, its `ResumeState` written
   and read back as Ray Train's workers do (``weights_only``), resumed. Deterministic kernels where torch has
   them; the resumed weights must match the uninterrupted ones far more closely than a control run whose CUDA
   noise restarts from its seed (the bug that once lost a GPU run's noise stream) does.

Each step appends one JSON line to `--out`; a failing step is recorded with its error. Where ray or mlflow is
not installed (the GPU image's own python3 has torch but not the project's venv), ``ray_train`` is recorded as
skipped and ``nccl_step`` is the DDP check.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # Ray workers
os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh local instance, never someone's cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_report import missing_modules  # noqa: E402
from decrop.config import DecropConfig, load_config, to_flat  # noqa: E402
from decrop.data import DATASETS  # noqa: E402
from decrop.distributed import no_forward_buffer_sync  # noqa: E402
from decrop.models import create_model  # noqa: E402
from decrop.objectives import DecropObjective  # noqa: E402


def write_synthetic_cifar(root: Path, per_batch: int, test: int, seed: int = 0) -> None:
    """A CIFAR-10 of random images under ``root/cifar-10-batches-py``: 5 training batches of `per_batch`
    images, a test batch of `test`, labels balanced over the 10 classes, and the class-name metadata."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [(f"data_batch_{k}", per_batch) for k in range(1, 6)] + [("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.permutation(np.arange(n) % 10).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(DATASETS["cifar10"].classes)}, f)


def nccl_step(device: torch.device, quick: bool, steps: int = 5) -> dict:
    """World-size-1 DDP steps of the DE-CROP objective (see the module doc); seconds per step after the first."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    tic = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # NCCL binds the group to the current device
    with socket.socket() as sock:  # a free local port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        depth, width, arch = (3, 8, "resnet20") if quick else (17, 64, "resnet110")
        torch.manual_seed(0)
        denoiser = create_model("dncnn", in_channels=3, depth=depth, width=width).to(device)
        classifier = create_model(arch, in_channels=3, num_classes=10).to(device).eval().requires_grad_(False)
        model = DistributedDataParallel(denoiser, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                        **no_forward_buffer_sync())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        objective = DecropObjective(0.25, DecropConfig())
        batch = 8 if quick else 64
        images = tuple(torch.rand(batch, 3, 32, 32, device=device) for _ in range(3))  # x, x_b, x_int
        labels = torch.arange(batch, device=device) % 10
        setup, times = time.perf_counter() - tic, []
        for _ in range(steps):
            tic = time.perf_counter()
            loss, _ = objective(model, classifier, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
        return {"backend": backend, "setup_s": setup, "first_step_s": times[0],
                "step_s": float(np.median(times[1:])), "batch": batch, "loss": float(loss)}
    finally:
        dist.destroy_process_group()


def train_config(data_root: Path, cache: Path, device: torch.device, quick: bool) -> dict:
    """The flat config of the Ray Train run: the paper profile on the synthetic CIFAR-10, 1 epoch."""
    overrides = [f"data.root={data_root}", f"cache_dir={cache}", f"device={device.type}", "data.percent=5",
                 "classifier.epochs=1", "train.epochs=1", "decrop.stage2_epochs=0"]
    if quick:
        overrides += ["data.percent=10", "data.val_size=50", "certify.val_images=8", "classifier.arch=resnet20",
                      "denoiser.depth=3", "denoiser.width=8", "decrop.attack_steps=2", "decrop.interp_steps=2",
                      "train.batch_size=16"]
    return to_flat(load_config(REPO / "configs" / "paper.yaml", overrides))


class Skipped(Exception):
    """A step that cannot run here, for the reason given (recorded as skipped, not as an error)."""


def ray_train(flat: dict, storage: Path, gpu: bool) -> dict:
    """Driver-side preparation, then one TorchTrainer run of `train_loop_per_worker` (see the module doc)."""
    missing = missing_modules("ray", "mlflow")
    if missing:  # e.g. the GPU image's own python3, which has torch but not the project's venv
        raise Skipped(f"{', '.join(missing)} not installed in {sys.executable}: the Ray Train run needs the "
                      f"project's venv; the plain torch.distributed DDP step (nccl_step) stands in for it")
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from decrop.classifier import classifier_key
    from decrop.config import from_flat
    from decrop.prepare import prepare
    from decrop.stages import samples_for
    from tuning.train_loop import train_loop_per_worker

    cfg = from_flat(flat)
    tic = time.perf_counter()
    prep = prepare(cfg, log=print, evaluate=False)
    samples_for(prep, prep.classifier, classifier_key(cfg), log=print)
    prep_s = time.perf_counter() - tic
    del prep
    if gpu:
        torch.cuda.empty_cache()
    tic = time.perf_counter()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=1 if gpu else 0, include_dashboard=False)
    try:
        ray_init_s = time.perf_counter() - tic
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": flat, "method": "decrop", "label": "gpu-check", "checkpoint_every": 1,
                               "threads": 4 if gpu else 1},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=gpu,
                                                   resources_per_worker={"CPU": 1, **({"GPU": 1} if gpu else {})}),
            run_config=ray.train.RunConfig(name="gpu-check", storage_path=str(storage),
                                           failure_config=ray.train.FailureConfig(max_failures=0,
                                                                                  controller_failure_limit=1)))
        tic = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - tic
    finally:
        ray.shutdown()
    if result.error is not None:
        raise RuntimeError(f"the Train run failed: {result.error!r}")
    final = result.return_value or {}
    return {"backend": "nccl" if gpu else "gloo", "prep_s": prep_s, "ray_init_s": ray_init_s, "fit_s": fit_s,
            "epoch_s": final.get("train/epoch_time"), "val_agreement": final.get("val/agreement"),
            "loss": final.get("train/loss")}


def _median_step(fn, device: torch.device, warm: int = 3, steps: int = 10) -> float:
    """Seconds of one call of `fn`: the median of `steps` synchronised calls after `warm` ones."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warm):
        fn()
    times = []
    for _ in range(steps):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def _quick_profile(quick: bool):
    tiny = ["denoiser.depth=3", "denoiser.width=8", "train.batch_size=4"] if quick else []
    return load_config(REPO / "configs" / "quick.yaml", tiny)


def _need_torchattacks(step: str) -> None:
    if missing_modules("torchattacks"):  # the boundary samples' attacks; pure Python, so it can be carried
        raise Skipped(f"torchattacks is not installed in {sys.executable}: {step} makes boundary samples with it; "
                      f"put the venv's site-packages/torchattacks on PYTHONPATH (pure Python, any version of "
                      f"Python 3) or use the project's venv")


def train_step(device: torch.device, quick: bool) -> dict:
    """The quick profile's DE-CROP stage 1, stage 2 and baseline steps on `device` (see the module doc)."""
    from benchmarks.train_speed import Case

    cfg = _quick_profile(quick)
    torch.manual_seed(0)
    classifier = create_model(cfg.classifier.arch, in_channels=1).to(device).eval().requires_grad_(False)
    base = create_model(cfg.denoiser.arch, in_channels=1, depth=cfg.denoiser.depth, width=cfg.denoiser.width)
    batch = cfg.train.batch_size
    images = tuple(torch.rand(batch, 1, 28, 28) for _ in range(2 + cfg.decrop.n_interp))
    labels = torch.randint(0, 10, (batch,))
    out = {"batch": batch, "denoiser": f"dncnn-{cfg.denoiser.depth}x{cfg.denoiser.width}",
           "classifier": cfg.classifier.arch}
    for kind in ("decrop stage 1", "decrop stage 2", "baseline"):
        case = Case(kind, "today", cfg, classifier, base, images, labels, device)
        seconds = _median_step(case.step, device, steps=3 if quick else 20)
        key = kind.replace("decrop ", "").replace(" ", "")
        out.update({f"{key}_ms": seconds * 1e3, f"{key}_images_per_s": batch / seconds})
    return out


def kseed_step(device: torch.device, quick: bool) -> dict:
    """K seeds as one grouped-conv network against K separate denoisers, K = 1, 3, 10 (see the module doc)."""
    from benchmarks.train_speed import kseed_cases

    cfg = _quick_profile(quick)
    torch.manual_seed(0)
    out = {"batch": cfg.train.batch_size, "denoiser": f"dncnn-{cfg.denoiser.depth}x{cfg.denoiser.width}"}
    for k, grouped, separate in kseed_cases(cfg, 1, 28, 2 + cfg.decrop.n_interp, device):
        g = _median_step(grouped, device, steps=3 if quick else 10)
        sep = _median_step(separate, device, steps=3 if quick else 10)
        out.update({f"k{k}_grouped_ms": g * 1e3, f"k{k}_separate_ms": sep * 1e3,
                    f"k{k}_separate_over_grouped": sep / g})
    return out


def run_config_overrides(data_root: Path, cache: Path, device: torch.device, quick: bool) -> list[str]:
    """``--set`` items of the whole-run step: the paper profile on the synthetic CIFAR-10, a few steps of every
    phase (100 training images, 2 + 1 epochs, 10 test images at n = 1,000)."""
    overrides = [f"data.root={data_root}", f"cache_dir={cache}", f"device={device.type}", "data.percent=1",
                 "data.val_size=64", "data.test_every=100", "classifier.epochs=1", "train.epochs=2",
                 "train.adam_epochs=1", "decrop.stage2_epochs=1", "decrop.attack_steps=5", "decrop.interp_steps=5",
                 "certify.n=1000", "certify.val_images=8", "methods=[baseline, decrop]"]
    if quick:
        overrides += ["data.percent=10", "data.test_every=50", "certify.n=100", "classifier.arch=resnet20",
                      "denoiser.depth=3", "denoiser.width=8", "decrop.attack_steps=2", "decrop.interp_steps=2",
                      "train.batch_size=16"]
    return overrides


def decrop_run(data_root: Path, work: Path, device: torch.device, quick: bool) -> dict:
    """``python -m decrop run`` then ``python -m decrop export`` in subprocesses (see the module doc)."""
    _need_torchattacks("decrop_run")
    sets = [arg for item in run_config_overrides(data_root, work / "cache", device, quick) for arg in ("--set", item)]
    timings = {}  # the subprocesses inherit PYTHONPATH (the repository, set at import)
    for name, command in (
            ("run", ["run", "--config", str(REPO / "configs" / "paper.yaml"), *sets, "--out", str(work / "run")]),
            ("export", ["export", "--run", str(work / "run"), "--method", "decrop", "--out",
                        str(work / "smoothed.pt2")])):
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "decrop", *command], capture_output=True, text=True)
        timings[f"{name}_s"] = time.perf_counter() - tic
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"python -m decrop {name} exited {done.returncode}: {tail[0][:300]}")
    run = json.loads((work / "run" / "run.json").read_text())
    return {**timings, "phases_s": {k: round(v, 1) for k, v in run["timings"].items()},
            "trained": list(run["methods"]), "export_bytes": (work / "smoothed.pt2").stat().st_size}


def resume_check(device: torch.device, quick: bool) -> dict:
    """Straight, resumed and noise-restarted DE-CROP runs on `device` (see the module doc)."""
    _need_torchattacks("resume")
    import dataclasses

    from decrop.data import dataset_info
    from decrop.prepare import Prepared
    from decrop.samples import generate_samples
    from decrop.stages import ResumeState, TrainHooks, method_stages, run_stages
    from torch.utils.data import TensorDataset

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)  # a few backward kernels have no deterministic form
    sizes = (["classifier.arch=resnet20", "denoiser.depth=3", "denoiser.width=8", "train.batch_size=8"] if quick
             else [])
    cfg = load_config(REPO / "configs" / "paper.yaml", ["train.epochs=2", "train.adam_epochs=1",
                                                         "decrop.stage2_epochs=1", "decrop.attack_steps=5",
                                                         "decrop.interp_steps=5", *sizes])
    torch.manual_seed(0)
    classifier = create_model(cfg.classifier.arch, in_channels=3, num_classes=10).to(device).eval()
    classifier.requires_grad_(False)
    n = 4 * cfg.train.batch_size  # 4 steps per epoch
    images, labels = torch.rand(n, 3, 32, 32), torch.arange(n) % 10
    prep = Prepared(cfg=cfg, device=device, info=dataset_info("cifar10"), classifier=classifier,
                    train_images=images, train_labels=labels, train_indices=np.arange(n),
                    val_images=torch.rand(8, 3, 32, 32, device=device), val_targets=labels[:8].to(device),
                    val_indices=np.arange(n, n + 8), test_set=TensorDataset(images, labels),
                    test_indices=np.arange(4), clean_accuracy=0.0)
    samples = generate_samples(classifier, images.to(device), labels.to(device), cfg.decrop, seed=0)
    branches = (images, *(t.cpu() for t in samples.as_images()))

    def train(hooks: TrainHooks | None = None) -> dict[str, torch.Tensor]:
        model, _ = run_stages(prep, classifier, branches, method_stages("decrop", prep, classifier), hooks=hooks)
        return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    tic = time.perf_counter()
    straight = train()
    straight_s = time.perf_counter() - tic
    saved = []
    train(TrainHooks(on_epoch_end=lambda epoch, metrics, state: saved.append(state()) if epoch == 0 else None))
    file = io.BytesIO()  # through a checkpoint file, as Ray Train's workers keep it
    torch.save(saved[0].as_dict(), file)
    file.seek(0)
    state = ResumeState.from_dict(torch.load(file, weights_only=True))
    resumed = train(TrainHooks(resume=state))
    restarted = train(TrainHooks(resume=dataclasses.replace(state, rng={**state.rng, "cuda": None})))

    def diff(other: dict[str, torch.Tensor]) -> float:
        return max((straight[k] - other[k]).abs().max().item() for k in straight)
    resumed_diff, control_diff = diff(resumed), diff(restarted)
    out = {"denoiser": f"dncnn-{cfg.denoiser.depth}x{cfg.denoiser.width}", "classifier": cfg.classifier.arch,
           "epochs": 3, "steps_per_epoch": 4, "straight_s": straight_s, "resumed_max_diff": resumed_diff,
           "noise_restarted_max_diff": control_diff}
    # On a CPU the CUDA state plays no part (the control equals the resumed run): the resumed run must be exact.
    bound = 1e-2 * control_diff if device.type == "cuda" else 0.0
    if resumed_diff > bound:
        raise RuntimeError(f"the resumed run does not continue the uninterrupted one: max weight difference "
                           f"{resumed_diff:.2e}, against {control_diff:.2e} when the CUDA noise restarts")
    return out


def record(out: Path, step: str, common: dict, fn) -> None:
    """Run `fn` and append its result (or its error) as one JSON line to `out`, and print it."""
    entry = {"part": "train", "step": step, **common}
    tic = time.perf_counter()
    try:
        entry.update(status="ok", **fn())
    except Skipped as why:
        entry.update(status="skipped", message=str(why))
    except Exception as err:  # recorded; the next step still runs
        traceback.print_exc()
        entry.update(status="error", message=f"{type(err).__name__}: {err}"[:500])
    entry["wall_s"] = time.perf_counter() - tic
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry), flush=True)


STEPS = ("nccl_step", "ray_train", "train_step", "kseed_step", "decrop_run", "resume")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file the records are appended to")
    p.add_argument("--quick", action="store_true", help="tiny models and data: checks the script on a CPU")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    args = p.parse_args(argv)
    if "resume" in args.steps:  # deterministic cuBLAS (read when CUDA starts): the resume check compares weights
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch {torch.__version__} sees no CUDA device; "
                "use --device cpu (with --quick) to check the script on a CPU")
    if device.type == "cpu":
        torch.set_num_threads(1)
    common = {"device": str(device), "quick": args.quick, "torch": torch.__version__}
    if "nccl_step" in args.steps:
        record(args.out, "nccl_step", common, lambda: nccl_step(device, args.quick))
    if "ray_train" in args.steps:
        with tempfile.TemporaryDirectory(prefix="decrop-gpu-check-") as tmp:
            tmp = Path(tmp)
            per_batch, test = (100, 100) if args.quick else (2000, 1000)
            write_synthetic_cifar(tmp / "data", per_batch, test)
            flat = train_config(tmp / "data", tmp / "cache", device, args.quick)
            images = round(5 * per_batch * flat["data.percent"] / 100)
            record(args.out, "ray_train", {**common, "train_images": images, "epochs": flat["train.epochs"],
                                           "denoiser": f"dncnn-{flat['denoiser.depth']}x{flat['denoiser.width']}",
                                           "classifier": flat["classifier.arch"]},
                   lambda: ray_train(flat, tmp / "ray", device.type == "cuda"))
    if "train_step" in args.steps:
        record(args.out, "train_step", common, lambda: train_step(device, args.quick))
    if "kseed_step" in args.steps:
        record(args.out, "kseed_step", common, lambda: kseed_step(device, args.quick))
    if "decrop_run" in args.steps:
        with tempfile.TemporaryDirectory(prefix="decrop-gpu-run-") as tmp:
            tmp = Path(tmp)
            write_synthetic_cifar(tmp / "data", *((100, 100) if args.quick else (2000, 1000)))
            record(args.out, "decrop_run", common, lambda: decrop_run(tmp / "data", tmp, device, args.quick))
    if "resume" in args.steps:
        record(args.out, "resume", common, lambda: resume_check(device, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
