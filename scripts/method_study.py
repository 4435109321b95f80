"""Compare the methods over a grid of settings and seeds, with paired statistics on the same test images.

    .venv/bin/python scripts/method_study.py --out results/method_study \
        --grid sigma=0.25,0.5 --grid data.percent=1,0.2 --seeds 0 1 2 [--set key=value ...] [--blackbox]

Runs `python -m decrop run` once per (setting, seed) into ``OUT/<setting>/seed<k>/`` (a run whose
``summary.csv`` exists is skipped, so an interrupted study resumes; ``--report-only`` starts no run and
reports the finished ones), records every finished run in MLflow and then writes the analysis report of the
study into ``OUT/report/`` (`analysis/report.py`): certified accuracy at every radius with Clopper-Pearson
intervals, mean and spread over seeds, per method and setting, curves, and exact McNemar tests of DE-CROP
against the baseline on certified-at-r outcomes of the same images, per seed and pooled over seeds.
Everything uses validation data for training decisions; the test images are only certified.

MLflow (default store ``OUT/mlflow.db``, experiment ``method-study``): a parent run (``decrop.role=study``) and a
child run per setting and seed with the flat config as params, ``certify_test_<method>/acc_r*`` and ``.../acr``
metrics and the rows as ``certify/test_<method>.tsv``, which ``python analysis/report.py --mlflow-uri
OUT/mlflow.db`` reads. Logging is idempotent: a run already recorded is not recorded twice.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for analysis/

from analysis import report  # noqa: E402
from decrop.rows import read_rows  # noqa: E402
from decrop.config import load_config, to_flat, to_yaml  # noqa: E402
from decrop.pipeline import run_experiment  # noqa: E402
from tuning.tracking import StudyTracker, resolve_tracking_uri  # noqa: E402


def _grid(items: list[str]) -> list[list[str]]:
    axes = []
    for item in items:
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] or [[]]


def _name(overrides: list[str]) -> str:
    return "_".join(o.replace("data.", "").replace("=", "") for o in overrides) or "default"


def record(tracker: StudyTracker, parent: str, setting: str, seed: int, out: Path, rows: dict,
           radii: list[float]) -> None:
    """The finished run in `out` as a child run of the study in MLflow (certified accuracy at `radii`), unless
    it is already recorded."""
    tags = {"decrop.setting": setting, "decrop.seed": str(seed)}
    done = tracker.find_child(parent, tags)
    if done is not None and tracker.run_status(done) == "FINISHED":
        return
    cfg = load_config(out / "config.yaml")
    run_id = tracker.child_run(parent, tags, f"{setting}/seed{seed}", to_flat(cfg), role="method_run")
    for method, method_rows in rows.items():
        tracker.log_certification(run_id, method_rows, radii, f"test_{method}")
    tracker.log_text(run_id, to_yaml(cfg), "config.yaml")
    tracker.finish(run_id, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quick.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blackbox", action="store_true")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--report-only", action="store_true",
                        help="aggregate the finished runs under --out; start none")
    parser.add_argument("--mlflow-uri", default=None, help="tracking store (default OUT/mlflow.db)")
    parser.add_argument("--experiment", default="method-study", help="MLflow experiment (and study name)")
    args = parser.parse_args(argv)
    tracker = StudyTracker(resolve_tracking_uri(args.mlflow_uri, args.out), args.experiment)
    parent = tracker.start_sweep(args.experiment, {"config": str(args.config), "grid": " ".join(args.grid),
                                                   "seeds": " ".join(map(str, args.seeds)),
                                                   "overrides": " ".join(args.overrides)},
                                 resume=True, role="study")

    methods = ["baseline", "decrop"] + (["decrop_blackbox"] if args.blackbox else [])
    for setting in _grid(args.grid):
        for seed in args.seeds:
            out = args.out / _name(setting) / f"seed{seed}"
            overrides = [*args.overrides, *setting, f"seed={seed}", f"methods={methods}"]
            if not (out / "summary.csv").exists():
                if args.report_only:
                    continue
                print(f"=== {_name(setting)} seed {seed}", flush=True)
                run_experiment(load_config(args.config, overrides), out)
            rows = {m: read_rows(out / f"certify_{m}.tsv") for m in ["none", *methods]}
            record(tracker, parent, _name(setting), seed, out, rows, args.radii)
    tracker.finish(parent, "FINISHED")
    # The tables, intervals and paired tests are the analysis report's, computed from the runs just recorded.
    return report.main(["--mlflow-uri", tracker.tracking_uri, "--experiment", args.experiment,
                        "--out", str(args.out / "report")])


if __name__ == "__main__":
    sys.exit(main())
