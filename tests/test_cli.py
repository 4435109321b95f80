"""The run command end to end on tiny settings, and its error paths (which must fail before any compute)."""

import os
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from decrop.rows import read_rows
from decrop.cli import main
from decrop.config import load_config

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("DECROP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
TINY = ["classifier.epochs=1", "train.epochs=2", "train.adam_epochs=1", "data.test_every=1000",
        "data.val_size=50", "certify.val_images=10", "certify.n0=20", "certify.n=100", "certify.batch_size=100",
        "denoiser.depth=3", "denoiser.width=8", "decrop.stage2_epochs=1", "decrop.attack_steps=2", "decrop.interp_steps=2",
        "blackbox.epochs=1", "methods=[baseline, decrop]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST} (scripts/setup.sh installs it)")
    tmp = tmp_path_factory.mktemp("run")
    overrides = TINY + [f"cache_dir={tmp / 'cache'}", f"data.root={tmp / 'data'}"]
    args = ["run", "--config", str(REPO / "configs/quick.yaml"), "--out", str(tmp / "out"), "--blackbox"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return tmp, args


def test_run_writes_rows_config_and_table(tiny_run, capsys):
    tmp, _ = tiny_run
    out = tmp / "out"
    for method in ("none", "baseline", "decrop", "decrop_blackbox"):
        rows = read_rows(out / f"certify_{method}.tsv")
        assert [r.idx for r in rows] == list(range(0, 10_000, 1000))
        assert all(r.radius >= 0 and r.correct in (0, 1) for r in rows)
    cfg = load_config(out / "config.yaml")
    assert cfg.train.epochs == 2 and cfg.data.test_every == 1000
    assert cfg.methods == ("baseline", "decrop", "decrop_blackbox")  # --blackbox appended the variant
    assert all((out / f"denoiser_{m}.pt").exists() for m in cfg.methods)
    assert (out / "train_indices.json").exists()
    summary = pd.read_csv(out / "summary.csv", index_col="method", keep_default_na=False)
    assert set(summary.index) == {"classifier (clean, no noise)", "none", "baseline", "decrop", "decrop_blackbox"}
    # every table says how long each method trained: the baseline the same total as DE-CROP's two stages
    assert summary.loc["baseline", "epochs"] == "3" and summary.loc["decrop", "epochs"] == "2+1"
    budget = json.loads((out / "run.json").read_text())["budget"]
    assert budget["train_images"] == 600 and budget["val_images"] == 50 and budget["labels_outside"] == 0
    assert budget["val_source"] == "unlabeled"
    assert not list(tmp.glob(".out.partial-*"))  # the run was written aside and moved into place


def test_a_finished_output_folder_is_never_touched(tiny_run, capsys):
    tmp, args = tiny_run
    out = tmp / "out"
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    assert main(args) == 2  # the same --out again
    err = capsys.readouterr().err
    assert "already exists" in err and "--out" in err
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == before


def test_second_run_reuses_the_cached_classifier(tiny_run, capsys):
    tmp, args = tiny_run
    args = [a if a != str(tmp / "out") else str(tmp / "out2") for a in args]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "classifier: reusing" in printed and "classifier: training" not in printed
    assert "samples: reusing" in printed and "samples: generating" not in printed
    assert "r=0.25" in printed and "baseline" in printed
    # same seed, same subset, same classifier: the no-denoiser rows are identical (certification is seeded)
    first = [(r.idx, r.predict, r.radius) for r in read_rows(tmp / "out" / "certify_none.tsv")]
    second = [(r.idx, r.predict, r.radius) for r in read_rows(tmp / "out2" / "certify_none.tsv")]
    assert first == second


def test_config_error_is_one_line_before_any_compute(tmp_path, capsys):
    code = main(["run", "--config", str(REPO / "configs/quick.yaml"), "--set", "train.epoch=3",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epoch'" in err and "train.epochs" in err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_reported_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DECROP_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    code = main(["run", "--config", str(REPO / "configs/quick.yaml"), "--set", f"data.root={tmp_path / 'd'}",
                 "--set", f"cache_dir={tmp_path / 'c'}", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_module_entry_point_and_config_listing():
    out = subprocess.run([sys.executable, "-m", "decrop", "config", "--keys"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert "train.adam_epochs" in out.stdout and "certify.alpha" in out.stdout
