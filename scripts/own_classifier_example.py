"""Bring your own classifier, end to end and offline: what a user with a pretrained model and a few images does.

    python scripts/own_classifier_example.py [--work DIR] [--epochs 15] [--stage2-epochs 5] [--test-every 200]
                                             [--n 1000] [--percent 1] [--threads 0]

1. Stand-in for *your* model: the quick profile's Fashion-MNIST classifier (trained once, ~1-2 min on 2 cores,
   cached in ~/.cache/decrop), exported with ``torch.export`` (dynamic batch) to ``<work>/classifier.pt2``.
2. Stand-in for *your* images: `--percent` % of Fashion-MNIST's training images (stratified) written as PNGs to
   ``<work>/images/train/<class>/``, every `--test-every`-th test image to ``test/<class>/`` and 500 other
   training images to ``unlabeled/`` (label-free validation: their labels are never written).
3. ``python -m decrop run`` on them with ``data.dataset=folder`` and ``classifier.source=export``: the Salman et
   al. baseline and DE-CROP, certified on test/.
4. ``python -m decrop export``: the DE-CROP run's smoothed model, ``classifier(denoiser(x))``, to
   ``<work>/smoothed.pt2``; then ``python -m decrop certify`` and ``predict`` on ten new images through it.

Every step prints the command it runs. The defaults (the quick profile, 50 certified test images) take a few
minutes on a 2-core CPU; raise --epochs, --n or lower --test-every for a larger run. --work must not hold an
earlier run (the run folder is never overwritten): pick a fresh one, or delete it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchvision.io import encode_png  # noqa: E402

from decrop.classifier import load_or_train_classifier  # noqa: E402
from decrop.config import load_config  # noqa: E402
from decrop.data import (as_tensors, dataset_info, load_dataset, stratified_subset, test_indices,  # noqa: E402
                         unlabeled_indices)
from decrop.metrics import PrintSink  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/own-classifier-example"), help="folder for everything")
    p.add_argument("--epochs", type=int, default=15, help="DE-CROP stage-1 epochs (the baseline trains the total)")
    p.add_argument("--stage2-epochs", type=int, default=5, help="DE-CROP stage-2 epochs")
    p.add_argument("--test-every", type=int, default=200, help="write every k-th test image (200: 50 images)")
    p.add_argument("--n", type=int, default=1000, help="noisy samples per certified image")
    p.add_argument("--percent", type=float, default=1.0, help="training images written, in %% of the split")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every step (0: torch's default)")
    return p.parse_args(argv)


def class_folder(index: int, name: str) -> str:
    """'0_T-shirt_top': the index first, so that the sorted folder names follow the classifier's outputs."""
    return f"{index}_{re.sub(r'[^A-Za-z0-9-]+', '_', name)}"


def write_pngs(folder: Path, images: torch.Tensor, labels: torch.Tensor | None, indices, classes) -> None:
    """PNG files named by their dataset index (so the folder keeps the dataset's order), in class folders when
    labels are given."""
    for image, idx in zip(images, indices):
        sub = folder / class_folder(int(labels[int(idx)]), classes[int(labels[int(idx)])]) if labels is not None \
            else folder
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{int(idx):05d}.png").write_bytes(encode_png(image.mul(255).round().to(torch.uint8)).numpy())


def export_classifier(args: argparse.Namespace, path: Path) -> None:
    """Step 1: the quick profile's classifier (trained and cached on first use) as a torch.export program."""
    cfg = load_config(REPO / "configs/quick.yaml")
    images, labels = as_tensors(load_dataset(cfg.data.dataset, Path(cfg.data.root).expanduser(), train=True))
    model = load_or_train_classifier(cfg, images, labels, torch.device("cpu"),
                                     sink_factory=lambda epochs: PrintSink("classifier: ", total=epochs))
    program = torch.export.export(model.eval(), (images[:2],),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    print(f"step 1: exported the classifier to {path}")


def write_folder(args: argparse.Namespace, root: Path) -> None:
    """Step 2: a folder dataset as a user would have it."""
    cfg = load_config(REPO / "configs/quick.yaml")
    data_root, classes = Path(cfg.data.root).expanduser(), dataset_info("fashion_mnist").classes
    train_x, train_y = as_tensors(load_dataset("fashion_mnist", data_root, train=True))
    test_x, test_y = as_tensors(load_dataset("fashion_mnist", data_root, train=False))
    chosen = stratified_subset(train_y, args.percent, seed=0)
    extra = unlabeled_indices(len(train_y), chosen, 500, seed=0)
    tests = test_indices(len(test_y), args.test_every)
    write_pngs(root / "train", train_x[chosen], train_y, chosen, classes)
    write_pngs(root / "test", test_x[tests], test_y, tests, classes)
    write_pngs(root / "unlabeled", train_x[extra], None, extra, classes)
    print(f"step 2: wrote {len(chosen)} training, {len(tests)} test and {len(extra)} unlabelled PNGs under {root}")


def run(command: list[str], env: dict[str, str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    subprocess.run(command, check=True, cwd=REPO, env=env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    if (work / "run").exists():
        print(f"error: {work / 'run'} exists (runs are never overwritten): pass a new --work", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    export_classifier(args, work / "classifier.pt2")
    if not (work / "images").exists():
        write_folder(args, work / "images")
    python = [sys.executable, "-m", "decrop"]
    overrides = ["data.dataset=folder", f"data.root={work / 'images'}", "data.percent=100", "data.test_every=1",
                 "classifier.source=export", f"classifier.path={work / 'classifier.pt2'}",
                 "classifier.feature_layer=body",  # the exported module's submodule that computes the features
                 f"train.epochs={args.epochs}", f"decrop.stage2_epochs={args.stage2_epochs}", f"certify.n={args.n}",
                 "methods=[baseline, decrop]"]
    run([*python, "run", "--config", "configs/quick.yaml", *[a for o in overrides for a in ("--set", o)],
         "--out", str(work / "run")], env)
    run([*python, "export", "--run", str(work / "run"), "--out", str(work / "smoothed.pt2")], env)
    new = work / "new-images"
    for path in sorted((work / "images" / "test").rglob("*.png"))[::5][:10]:  # ten images, several classes
        (new / path.parent.name).mkdir(parents=True, exist_ok=True)
        (new / path.parent.name / path.name).write_bytes(path.read_bytes())
    run([*python, "certify", "--model", str(work / "smoothed.pt2"), "--images", str(new), "--n", str(args.n)], env)
    run([*python, "predict", "--model", str(work / "smoothed.pt2"), "--images", str(new), "--n", str(args.n)], env)
    print(f"\nexample finished in {time.perf_counter() - tic:.0f}s; everything is in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
