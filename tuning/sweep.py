"""A hyperparameter study of DE-CROP on Ray: Tune + Optuna search, Ray Train DDP trials, MLflow records.

    python tuning/sweep.py                                   # local Ray, quick profile, 8 trials
    ray job submit --working-dir . -- python tuning/sweep.py --profile paper --gpus-per-worker 1 \\
        --mlflow-uri http://127.0.0.1:5000                   # on a cluster (see cluster/README.md)

What happens: the profile's classifier is trained (or taken from the cache) once; Optuna's seeded TPE
proposes alpha, the loss weights, n_interp, the attack and the stage-2 schedule (`tuning/space.py`); each
trial trains DE-CROP in a Ray Train `TorchTrainer` (W DDP workers), ASHA stops weak trials on the per-epoch
validation agreement, and the survivors' denoisers are certified on validation images as Ray tasks; the
objective is the validation ACR (`tuning/trainable.py`). After the search the best trial and the baseline
(same data and budget) are certified on the test subset in parallel tasks, and a table of both is printed.
MLflow gets one experiment per study, a parent run per sweep and a child run per trial. ``--resume`` continues
an interrupted sweep: finished trials are not rerun and no MLflow run is duplicated.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
import time
from pathlib import Path

# `python tuning/sweep.py` puts tuning/ on sys.path, not the repo root that holds the `tuning` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Environment of every process of a study. cluster/runtime_env.yaml (and rayjob.yaml) repeat it for jobs on a
# cluster; a local Ray started by this driver inherits it from os.environ.
RAY_ENV = {
    # The per-epoch results of a trial carry the scheduler's metric (val/agreement) but not the searcher's
    # final objective, which only the last result has; Tune's strict check would reject them.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # A trial's Train workers may wait minutes for CPUs/GPUs that other trials' certification tasks hold;
    # Train's default start-up timeout (60 s) would fail the trial instead.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800",
}
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
# A Ray that this driver starts itself (see connect(); not under `ray job submit`, which sets RAY_ADDRESS) listens
# on loopback only. Ray binds GCS, raylet, workers, agents and its Prometheus exporters to the node's address, and
# picks that address when ray is imported: with this flag "0" (Ray's switch for single-machine clusters) it is
# 127.0.0.1, otherwise the machine's network address (0.0.0.0/:: for most listeners). Token auth is stated
# explicitly (Ray 2.60's default for new local clusters, without its warning). Both are read when ray is
# imported: set after that, they would reach Ray's daemons but not this process, which then disagrees with them.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
    for _key, _value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(_key, _value)

import ray  # noqa: E402
import ray.tune  # noqa: E402
from optuna.samplers import TPESampler  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from decrop.config import ConfigError, load_config, to_flat  # noqa: E402
from decrop.pipeline import format_table, prepare, summarize  # noqa: E402
from tuning.certify_tasks import certify_parallel  # noqa: E402
from tuning.space import FinalObjectiveOptunaSearch, default_point, define_space  # noqa: E402
from tuning.tracking import MlflowStatusCallback, StudyTracker, redact_uri, resolve_tracking_uri  # noqa: E402
from tuning.trainable import StudySettings, load_denoiser_state, trial_config, tune_trainable  # noqa: E402
from tuning.train_loop import train_loop_per_worker, trained_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="configs/<profile>.yaml: quick (CPU, minutes) or paper")
    p.add_argument("--study", default=None, help="study name (default <profile>-study); also the MLflow experiment")
    p.add_argument("--num-trials", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: cluster CPUs, or GPUs, / demand of one trial)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers of each trial's training")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cert-shards", type=int, default=2, help="parallel certification tasks per trial")
    p.add_argument("--mlflow-uri", default=None, help="tracking server URI (default: <storage>/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the study name)")
    p.add_argument("--storage", type=Path, default=Path("~/decrop-runs"),
                   help="folder for trial checkpoints, denoisers and the default MLflow store")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this study")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the profile for every trial, e.g. --set train.epochs=10")
    return p.parse_args(argv)


def connect() -> None:
    """Join the cluster this runs on (under `ray job submit` RAY_ADDRESS is set), else start a local one.

    A local cluster gets token auth with the token file readable by this user only, and listens on 127.0.0.1
    when LOCAL_RAY_ENV took effect (set before ray was imported); a line says where it listens."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        private_token_file()  # before Ray writes one world-readable
        # With the dashboard (on 127.0.0.1): Train's PlacementGroupCleaner queries the controller's state
        # through it, and without it never removes the placement group of a trial that ASHA stopped; two such
        # leaks held both CPUs of the 2-core machine and the next trials waited forever.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
        address, auth = ray.util.get_node_ip_address(), os.environ.get("RAY_AUTH_MODE", "token")
        if ipaddress.ip_address(address).is_loopback:
            print(f"sweep: local Ray on {address} only (dashboard and metrics too), auth mode {auth}", flush=True)
        else:
            print(f"sweep: warning: the local Ray listens on {address}, not only on 127.0.0.1 (ray was imported "
                  f"before tuning/sweep.py could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); auth mode {auth}",
                  flush=True)


def private_token_file() -> Path | None:
    """Ray's token file (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), created if missing, mode 0600.

    Ray 2.60 writes a new token file 0644, readable by every user of the machine, and anyone holding the token
    may run code on the cluster. A token in ``RAY_AUTH_TOKEN`` needs no file: returns None then."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:  # created 0600 from the start; a concurrent creator wins and is chmod-ed below
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits as hex
        except FileExistsError:
            pass
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


class Progress(ray.tune.Callback):
    """One line per finished trial with its objective and the best so far."""

    def __init__(self, total: int):
        self.total, self.done, self.best = total, 0, float("-inf")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        value = (trial.last_result or {}).get("objective")
        if value is not None:
            self.best = max(self.best, value)
        shown = f"objective (val ACR) {value:.4f}" if value is not None else "stopped early by ASHA"
        print(f"sweep: trial {trial.trial_id} done ({self.done}/{self.total}): {shown}; best so far "
              f"{self.best:.4f}", flush=True)


def asha(epochs: int) -> ASHAScheduler:
    """ASHA on the per-epoch validation agreement: rungs at a quarter of the budget and 3x that, keeping the top
    third at each. Every rung lies before the last epoch (max_t = epochs - 1, no stop at max_t): a trial that
    trained to the end is always certified, never discarded after paying for all its epochs."""
    grace = max(1, epochs // 4)
    return ASHAScheduler(metric="val/agreement", mode="max", max_t=max(grace, epochs - 1), grace_period=grace,
                         reduction_factor=3, stop_last_trials=False)


def train_reference(flat: dict, method: str, settings: StudySettings) -> dict:
    """A denoiser for the final comparison (the Salman et al. baseline, or DE-CROP with the profile's defaults)
    on the same subset and budget, as a Ray Train run like the trials'. Returns its weights."""
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": {**flat, "methods": [method]}, "method": method, "label": method,
                           "checkpoint_every": settings.checkpoint_every},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpus_per_worker > 0),
        run_config=ray.train.RunConfig(name=f"reference-{method}", storage_path=settings.storage,
                                       failure_config=ray.train.FailureConfig(max_failures=1,
                                                                              controller_failure_limit=1)))
    return trained_state(trainer.fit())


@ray.remote(num_cpus=0)
def _train_reference_task(flat: dict, method: str, settings: StudySettings) -> dict:
    return train_reference(flat, method, settings)


def reference_denoisers(results: ray.tune.ResultGrid, settings: StudySettings, default: dict) -> dict[str, dict]:
    """The baseline's weights and those of DE-CROP with the profile's defaults: the search's first trial
    (`default_point`) when it ran to the end, else trained here. The trainings run at the same time."""
    to_train = {"baseline": "baseline"}  # label -> method
    state = {}
    finished = [r for r in results if r.config == default and "objective" in (r.metrics or {})]
    weights = Path(settings.storage) / "denoisers" / f"{finished[0].metrics['trial_id']}.pt" if finished else None
    if weights is not None and weights.exists():
        state["decrop_default"] = load_denoiser_state(weights)
    else:
        to_train["decrop_default"] = "decrop"
    print(f"sweep: training {' and '.join(to_train)} on the same subset and budget", flush=True)
    futures = {label: _train_reference_task.remote(settings.base, method, settings)
               for label, method in to_train.items()}
    state.update({label: ray.get(future) for label, future in futures.items()})
    return {"baseline": state["baseline"], "decrop_default": state["decrop_default"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = args.study or f"{args.profile}-study"
    try:
        cfg = load_config(REPO / "configs" / f"{args.profile}.yaml", args.overrides)
    except ConfigError as err:  # before Ray starts or any trial runs
        print(f"error: {err}", file=sys.stderr)
        return 2
    storage = args.storage.expanduser().resolve() / study
    storage.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(args.mlflow_uri, storage)
    tracker = StudyTracker(uri, args.experiment or study)
    try:
        parent = tracker.start_sweep(study, {"profile": args.profile, "num_trials": args.num_trials,
                                             "workers_per_trial": args.workers_per_trial,
                                             "gpus_per_worker": args.gpus_per_worker, "seed": args.seed,
                                             **{f"base.{k}": v for k, v in to_flat(cfg).items()}}, args.resume)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"sweep {study}: storage {storage}, MLflow {redact_uri(uri)} (experiment {tracker.experiment_id})",
          flush=True)

    connect()
    tic = time.perf_counter()
    prep = prepare(cfg)  # trains and caches the classifier once, before trials could race to do it
    resources = ray.cluster_resources()
    demand = ("GPU", args.gpus_per_worker * args.workers_per_trial) if args.gpus_per_worker else (
        "CPU", args.workers_per_trial)
    concurrent = args.max_concurrent or max(1, int(resources.get(demand[0], 1) // demand[1]))
    settings = StudySettings(base=to_flat(cfg), storage=str(storage), tracking_uri=uri,
                             experiment=args.experiment or study, parent_run_id=parent,
                             workers=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                             cert_shards=args.cert_shards)
    trainable = tune_trainable(settings)
    default = default_point(settings.base)  # the first trial: the method with the profile's own values
    path = storage / "tune"
    if args.resume and ray.tune.Tuner.can_restore(str(path)):
        print(f"sweep: resuming {path}", flush=True)
        tuner = ray.tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=FinalObjectiveOptunaSearch(space=define_space, metric="objective", mode="max",
                                                      sampler=TPESampler(seed=args.seed),
                                                      points_to_evaluate=[default]),
                scheduler=asha(cfg.train.epochs),
                num_samples=args.num_trials, max_concurrent_trials=concurrent),
            run_config=ray.tune.RunConfig(name="tune", storage_path=str(storage),
                                          callbacks=[MlflowStatusCallback(tracker, parent),
                                                     Progress(args.num_trials)],
                                          failure_config=ray.tune.FailureConfig(max_failures=1), verbose=1))
    results = tuner.fit()
    best = results.get_best_result(metric="objective", mode="max", filter_nan_and_inf=True)
    best_params = dict(best.config)
    print(f"sweep: best trial {best.path.split('/')[-1]}: objective {best.metrics['objective']:.4f}, "
          f"{best_params}", flush=True)

    # The best trial's denoiser, the baseline's and the defaults', certified on the test subset: reporting only.
    best_id = best.metrics["trial_id"]
    tracker.set_tag(parent, "decrop.best_trial_id", best_id)
    best_flat = trial_config(settings, best_params)
    references = reference_denoisers(results, settings, default)
    rows = certify_parallel(best_flat, {"none": None, **references,
                                        "decrop_best": load_denoiser_state(storage / "denoisers" / f"{best_id}.pt")},
                            "test", [int(i) for i in prep.test_indices], args.cert_shards,
                            gpus_per_task=args.gpus_per_worker)
    for label, label_rows in rows.items():
        tracker.log_certification(parent, label_rows, cfg.certify.radii, f"test_{label}")
    table = summarize(rows, cfg.certify.radii, prep.clean_accuracy)
    tracker.log_text(parent, table.to_csv(), "test_summary.csv")
    tracker.finish(parent, "FINISHED")
    print(f"\nTest-subset certified accuracy (%), best trial vs DE-CROP defaults and baseline, sigma={cfg.sigma}, "
          f"{cfg.data.percent}% of {cfg.data.dataset}, n={cfg.certify.n}:")
    print(format_table(table))
    print(f"\nsweep wall time {time.perf_counter() - tic:.0f}s; MLflow UI: mlflow ui --backend-store-uri "
          f"{redact_uri(uri)}, "
          f"then open http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
