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

REPO = Path(__file__).resolve().parents[2]
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


def test_export_checks_its_flags_before_importing_torch(tmp_path):
    """A missing or bad flag of `export` is reported at once, not after the 5-45 s of importing torch."""
    code = ("import sys\n"
            "from decrop.cli import main\n"
            f"out = {str(tmp_path / 's.pt2')!r}\n"
            "codes = [main(['export', '--out', out]), main(['export', '--trial', 't1', '--out', out]),\n"
            "         main(['export', '--trial', '../..', '--storage', '.', '--out', out]),\n"
            "         main(['export', '--denoiser', 'd.pt', '--out', out])]\n"
            "print(codes, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[2, 2, 2, 2] False", out.stdout + out.stderr
    assert "--trial = '../..' is not a valid name" in out.stderr and not (tmp_path / "s.pt2").exists()


# A run whose certification never ends: the real run_experiment writes its .partial folder, then waits here.
_STUCK_RUN = """
import sys, time, types
import decrop.pipeline as pipeline
from decrop.cli import main

def certify_model(*args, **kwargs):
    print("certifying", flush=True)
    time.sleep(300)

pipeline.prepare = lambda cfg, log=print: types.SimpleNamespace(train_indices=[0, 1], classifier=None)
pipeline.smoothed_model = lambda *args: None
pipeline.certify_model = certify_model
sys.exit(main(["run", "--config", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_a_run_stopped_by_sigterm_removes_its_unfinished_folder(tmp_path):
    import signal
    import threading
    older = tmp_path / ".out.partial-older"  # another run's: not this run's to remove
    older.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_RUN, str(REPO / "configs/quick.yaml"),
                             str(tmp_path / "out")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() == "certifying":
                break
        partial = [p for p in tmp_path.glob(".out.partial-*") if p != older]
        assert len(partial) == 1 and (partial[0] / "config.yaml").exists(), proc.stderr.read() if proc.poll() else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == [older]  # the run's folder is gone, the other run's is kept
