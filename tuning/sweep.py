"""DE-CROP studies on Ray: the Optuna search and the paper's studies, one entry point, one trainable.

    python tuning/sweep.py                                   # the search: local Ray, quick profile, 8 trials
    python tuning/sweep.py --preset sigma --seeds 0 1 2      # the paper's figure 1 (see --preset)
    ray job submit --working-dir . -- python tuning/sweep.py --profile paper --preset attack --gpus-per-worker 1 \
        --mlflow-uri http://127.0.0.1:5000                   # on a cluster (see cluster/README.md)

``--preset search`` (the default): Optuna's seeded TPE proposes the mixing coefficient, the loss weights,
n_interp, the attack and the stage-2 schedule (`tuning/space.py`); each trial trains DE-CROP in a Ray Train
`TorchTrainer` (W DDP workers), ASHA stops weak trials on the per-epoch validation agreement, and the
survivors' denoisers are certified on validation images as Ray tasks (objective: label-free validation ACR).
The search ends with its confirmation: the best configuration, the profile's defaults and the baseline are
retrained on fresh seeds and certified on the test subset, with a paired per-image test of best against
defaults (`tuning/studies.py`). ``--preset NAME`` runs one of the paper's studies (`tuning/presets.py`: sigma,
data, mixing (alias alpha), denoiser, n_interp, attack, boundary, augment, blackbox) as a grid of trials
through the same trainable, each certifying the test subset; ``all`` runs every preset and the search. Each
study gets an MLflow experiment with a parent run, a child run per trial, and ends with its analysis report.
``--resume`` continues an interrupted study: finished trials are not rerun and no MLflow run is duplicated.
Bad arguments stop the sweep with one line naming the problem and the fix (exit code 2), before Ray starts; the
flags and the config are checked before ray, mlflow or torch is even imported, so a typo is reported at once.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as `python tuning/sweep.py` (not imported): Python put tuning/ on sys.path,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root holds the packages (a checkout, a job)

# Light imports only (pure Python, YAML): ray, mlflow, optuna and torch are imported once the arguments are valid.
from decrop.config import MAX_SEED, check_name, load_config, to_flat  # noqa: E402
from decrop.errors import BAD_INPUT  # noqa: E402
from tuning.presets import ALL, PRESETS, SEARCH, preset_names, resolve  # noqa: E402
from tuning.schema import PRESET_ROLE, SWEEP_ROLE, check_mlflow_sqlite, redact_uri, resolve_tracking_uri  # noqa: E402

if TYPE_CHECKING:
    from tuning.tracking import StudyTracker

# Environment of every process of a study (`set_environment`). cluster/runtime_env.yaml (and rayjob.yaml) repeat it
# for jobs on a cluster; a local Ray started by this driver inherits it from os.environ.
RAY_ENV = {
    # The per-epoch results of a trial carry the scheduler's metric (val/agreement) but not the searcher's
    # final objective, which only the last result has; Tune's strict check would reject them.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # A trial's Train workers may wait minutes for CPUs/GPUs that other trials' certification tasks hold;
    # Train's default start-up timeout (60 s) would fail the trial instead.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800",
    # One line per event on the console (tuning.studies.Progress): no progress bar per downloaded certification
    # table, and Tune's legacy reporter, which verbose=0 silences (the new one prints its tables regardless).
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_AIR_NEW_OUTPUT": "0",
}
# A Ray that this driver starts itself (see connect(); not under `ray job submit`, which sets RAY_ADDRESS) listens
# on loopback only. Ray binds GCS, raylet, workers, agents and its Prometheus exporters to the node's address, and
# picks that address when ray is imported: with this flag "0" (Ray's switch for single-machine clusters) it is
# 127.0.0.1, otherwise the machine's network address (0.0.0.0/:: for most listeners). Token auth is stated
# explicitly (Ray 2.60's default for new local clusters, without its warning). Both are read when ray is
# imported: set after that, they would reach Ray's daemons but not this process, which then disagrees with them.
# On this one machine, no node is ever drained (preempted), so Ray Train's preemption watcher, one polling actor
# (and its memory) per training run, has nothing to watch; Ray's own switch turns it off. A cluster's spot nodes
# keep it (cluster/ does not set it).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def set_environment() -> None:
    """`RAY_ENV` into this process's environment (values already set win), and `LOCAL_RAY_ENV` too when this
    driver will start its own Ray and ray is not imported yet. The first thing `main` does; a test that drives
    `tuning.studies` itself calls it (tests/conftest.py)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS", "local") == "local" and "ray" not in sys.modules:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)


REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=SEARCH, help=f"the study to run: {', '.join(preset_names())}")
    p.add_argument("--profile", default="quick", help="configs/<profile>.yaml: quick (CPU, minutes) or paper")
    p.add_argument("--study", default=None, help="study name (default <profile>-study for the search, "
                                                 "<profile>-<preset> for a preset); also the MLflow experiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of a preset's trials")
    p.add_argument("--levels", nargs="+", default=None, help="only these levels of the preset's factor")
    p.add_argument("--confirm-seeds", type=int, nargs="+", default=[1],
                   help="fresh seeds on which the search's best configuration and the defaults are retrained")
    p.add_argument("--num-trials", type=int, default=8, help="trials of the search")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: cluster CPUs, or GPUs, / demand of one trial)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers of each trial's training")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cert-shards", type=int, default=2, help="parallel certification tasks per trial")
    p.add_argument("--mlflow-uri", default=None, help="tracking server URI (default: <storage>/<study>/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the study name)")
    p.add_argument("--storage", type=Path, default=Path("~/decrop-runs"),
                   help="folder for trial checkpoints, denoisers and the default MLflow store")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study of this name")
    p.add_argument("--shelf", type=Path, default=None,
                   help="folder of finished trials kept with the code (the paper's reruns: results): a trial "
                        "found there is not computed again, the study's finished trials are added to it, and the "
                        "trained classifier is the one kept there")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the profile for every trial, e.g. --set train.epochs=10")
    return p.parse_args(argv)


def connect() -> None:
    """Join the cluster named by RAY_ADDRESS (set under `ray job submit`; ``auto``: the Ray already running on this
    machine), else start a private local one. Never joins a running cluster unasked: a test suite's or a
    notebook's Ray ends with them, and would take this study's trials along.

    A local cluster gets token auth with the token file readable by this user only, and listens on 127.0.0.1
    when LOCAL_RAY_ENV took effect (set before ray was imported); a line says where it listens."""
    # The workers' own output (every epoch of every trial, Ray Train's internals) stays in Ray's session logs;
    # the driver prints one line per event (tuning.studies.Progress) and the tables.
    import ray

    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":  # a cluster named explicitly (auto: the one running on this machine)
        ray.init(**quiet)
        if address == "auto":
            print(f"sweep: joined the Ray cluster already running on this machine "
                  f"({ray.get_runtime_context().gcs_address}), as RAY_ADDRESS=auto asks", flush=True)
        return
    if ray.is_initialized():  # a caller (a test, a notebook) started Ray already
        return
    # A private local cluster.
    private_token_file()  # before Ray writes one world-readable
    # With the dashboard (on 127.0.0.1): Train's PlacementGroupCleaner queries the controller's state
    # through it, and without it never removes the placement group of a trial that ASHA stopped; such leaks
    # can hold every CPU of a small machine, and the next trials then wait forever.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
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
    if not os.path.lexists(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:  # created 0600 from the start; a concurrent creator wins and is chmod-ed below
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits as hex
        except FileExistsError:
            pass
    try:  # never through a symbolic link: its target may be any file of this user's
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        try:
            exposed = os.stat(path).st_mode & 0o077
        except OSError:
            exposed = True
        if exposed:
            print(f"sweep: warning: Ray's token file {path} is a symbolic link to a file that others can read (or "
                  f"to nothing); its permissions are left as they are: make the file it points to mode 0600",
                  flush=True)
        return path
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path




def check_args(args: argparse.Namespace, cfg, preset: str) -> tuple | None:
    """Every argument checked before Ray starts (ValueError naming the flag and the fix); returns the preset
    levels to run (None: all)."""
    if args.study is not None:
        check_name(args.study, "--study")
    for flag, path in (("--storage", args.storage), ("--shelf", args.shelf)):
        for folder in (path.expanduser(), *path.expanduser().parents) if path is not None else ():
            if folder.exists():
                if not folder.is_dir():
                    raise ValueError(f"{flag} {path}: {folder} is a file, not a folder; choose a folder")
                break
    positive = {"--num-trials": args.num_trials, "--workers-per-trial": args.workers_per_trial,
                "--cert-shards": args.cert_shards}
    if args.max_concurrent is not None:
        positive["--max-concurrent"] = args.max_concurrent
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    for flag, seeds in (("--seed", [args.seed]), ("--seeds", args.seeds), ("--confirm-seeds", args.confirm_seeds)):
        bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"{flag} {bad[0]}: seeds are integers from 0 to {MAX_SEED}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{flag} lists a seed twice: {seeds}")
    if set(args.confirm_seeds) & {cfg.seed}:
        raise ValueError(f"--confirm-seeds {args.confirm_seeds} includes the search's own seed {cfg.seed}: the "
                         f"confirmation needs seeds the search never used")
    if args.gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker {args.gpus_per_worker}: must be >= 0")
    if args.gpus_per_worker > 0 and not os.environ.get("RAY_ADDRESS"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--gpus-per-worker {args.gpus_per_worker} but this machine has no CUDA device and no "
                             f"cluster is given (RAY_ADDRESS): trials would wait forever; drop the flag or submit "
                             f"to a GPU cluster")
    if args.levels is None or preset not in PRESETS:
        if args.levels is not None:
            raise ValueError(f"--levels applies to a single preset, not to {preset!r}")
        return None
    known = {str(level): level for level in PRESETS[preset].levels}
    unknown = [level for level in args.levels if level not in known]
    if unknown:
        raise ValueError(f"--levels {unknown[0]} is not a level of preset {preset!r}; its levels: "
                         f"{', '.join(known)}")
    return tuple(known[level] for level in args.levels)


def profile_path(profile: str) -> Path:
    """configs/<profile>.yaml, or ValueError naming the profiles there."""
    known = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    if profile not in known:
        raise ValueError(f"--profile {profile!r} is not a profile; choose one of: {', '.join(known)} "
                         f"(configs/<profile>.yaml)")
    return REPO / "configs" / f"{profile}.yaml"


def study_names(preset: str) -> list[str]:
    """The studies a `--preset` value runs, in order."""
    return [*PRESETS, SEARCH] if preset == ALL else [preset]


def study_place(name: str, args: argparse.Namespace) -> tuple[str, Path, str, str]:
    """(study name, storage folder, tracking URI, MLflow experiment) of study `name`; creates nothing."""
    study = args.study or (f"{args.profile}-study" if name == SEARCH else f"{args.profile}-{name}")
    if args.study and len(study_names(args.preset)) > 1:
        study = f"{args.study}-{name}"
    storage = args.storage.expanduser().resolve() / study
    return study, storage, resolve_tracking_uri(args.mlflow_uri, storage), args.experiment or study


# While the preflight talks to a tracking server: MLflow's defaults (7 retries with exponential backoff, 120 s per
# request) kept a server that answers /health but fails every API call (HTTP 500) silent for minutes; bounded,
# such a server is one error line in seconds, as in analysis/report.py (its MLFLOW_ENV), and one that never
# answers fails in about 1.5 minutes (3 tries of 30 s: a server's first request on a busy machine may take tens
# of seconds). Only around the check (`mlflow_check_env`): os.environ is restored before Ray starts, so the study
# itself, and the Ray workers that inherit the environment, keep MLflow's retries. Values the caller set win.
PREFLIGHT_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def mlflow_check_env():
    """A context in which MLflow's HTTP calls use `PREFLIGHT_MLFLOW_ENV` (where the caller set no value); the
    environment is restored on exit."""
    from unittest import mock
    return mock.patch.dict(os.environ, {k: v for k, v in PREFLIGHT_MLFLOW_ENV.items() if k not in os.environ})


def preflight(name: str, args: argparse.Namespace, base: dict[str, Any]) -> None:
    """Before Ray starts: the tracking server answers, and a study that exists is only continued with --resume,
    by the command that started it (the same trials and profile; ValueError naming the fix). Reads, never
    writes: a local store that does not exist yet is not created. Every MLflow call here is bounded
    (`mlflow_check_env`): a server whose API errors is one line in seconds."""
    with mlflow_check_env():
        _preflight(name, args, base)


# What a resumed study must share with the command that started it: Tune restores the trials it started with, so
# other seeds, levels or trial counts would never run, and another profile or --set would train the trials still
# to run differently from those already done. The training layout (workers, GPUs) and the shelf may change
# between sittings.
# The --set strings are logged for the command that continues the study (`analysis.arms.resume_command`); their
# effect is compared through the flat config (base.*), so another spelling of the same override is accepted.
UNCHECKED_PARAMS = ("workers_per_trial", "gpus_per_worker", "set", "shelf")


def study_params(name: str, args: argparse.Namespace, base: dict[str, Any], classifier_sha256: str = ""
                 ) -> dict[str, Any]:
    """The parent run's params of study `name`: what its trials are (the preset's seeds and levels, or the
    search's trials and seeds), the profile, the training layout, the classifier's sha256 and the flat config."""
    preset = PRESETS.get(name)
    return {"preset": name, "profile": args.profile, "workers_per_trial": args.workers_per_trial,
            "gpus_per_worker": args.gpus_per_worker, "set": list(args.overrides),
            **({"num_trials": args.num_trials, "seed": args.seed, "confirm_seeds": args.confirm_seeds}
               if preset is None else {"factor": preset.key, "seeds": args.seeds, "levels": args.levels or "all"}),
            **({"classifier_sha256": classifier_sha256} if classifier_sha256 else {}),
            **({"shelf": str(shelf_path(args.shelf))} if args.shelf is not None else {}),
            **{f"base.{k}": v for k, v in base.items()}}


def _check_resumed(study: str, tracker: StudyTracker, parent: str, params: dict[str, Any]) -> None:
    """ValueError when the study's parent run was started with other trials or another config than `params`."""
    changed = [d for d in tracker.param_differences(parent, params) if d[0] not in UNCHECKED_PARAMS]
    if not changed:
        return
    shown = "; ".join(f"{key} was {was} (this command: {now})" for key, was, now in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    trials = {key for key, _, _ in changed} & {"seeds", "levels", "num_trials", "seed", "confirm_seeds"}
    fix = ("; for more seeds or levels, run them as a new study (--study NAME) with the whole list: the "
           "test-certified trials this one finished come from the trial cache, not rerun" if trials else "")
    raise ValueError(f"--resume continues study {study!r} as it was started, but {shown}{more}. Resume it with "
                     f"the command (profile, --set) that started it{fix}")


def _preflight(name: str, args: argparse.Namespace, base: dict[str, Any]) -> None:
    study, storage, uri, experiment = study_place(name, args)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            uri = None
        else:  # MLflow would turn any file into a store (a text file gains its tables): refuse, unchanged
            check_mlflow_sqlite(path, fix="--mlflow-uri must name an MLflow store (or a file not yet there, which "
                                          "the study creates); the file was not changed")
    role = SWEEP_ROLE if name == SEARCH else PRESET_ROLE
    from mlflow.exceptions import MlflowException

    from tuning.tracking import StudyTracker
    try:
        tracker = StudyTracker(uri, experiment) if uri is not None else None
        exists = tracker is not None and tracker.existing_parent(study, role)
        if exists and args.resume:
            _check_resumed(study, tracker, exists, study_params(name, args, base))
    except MlflowException as err:
        raise ValueError(f"--mlflow-uri {redact_uri(uri)} cannot be read as an MLflow store "
                         f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}); "
                         f"point it at an MLflow store or server, or leave it out for the study's own store") from None
    if exists and not args.resume:
        raise ValueError(f"study {study!r} already exists in MLflow experiment {experiment!r} ({redact_uri(uri)}); "
                         f"pass --resume to continue it, or choose another --study name")
    if (storage / "tune").exists() and not args.resume:
        raise ValueError(f"study {study!r} already has trials in {storage}; pass --resume to continue it, or "
                         f"choose another --study name (nothing there is overwritten)")


def check_server(uri: str, timeout: float = 10.0) -> None:
    """ValueError unless the MLflow server at `uri` answers within `timeout` seconds (instead of MLflow's
    minutes of silent retries): its ``/health``, then one real API call (listing one experiment) with MLflow's
    retries bounded (`mlflow_check_env`): a server whose health check passes while its API fails (HTTP 500:
    a broken backend store) is caught here, not after minutes of retries."""
    import re
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit
    parts = urlsplit(uri)
    health = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/health"
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ValueError(f"--mlflow-uri {redact_uri(uri)}: the tracking server does not answer ({err}); start it "
                         f"(cluster/local.sh up --with-mlflow) or fix the address") from None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    try:
        with mlflow_check_env():
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        text = str(err).strip()
        # "... Max retries exceeded with url: ... (Caused by ResponseError('too many 500 error responses'))"
        cause = re.search(r"Caused by \w+\('([^']+)'\)", text)
        why = cause.group(1) if cause else (text.splitlines()[0][:200] if text else type(err).__name__)
        raise ValueError(f"--mlflow-uri {redact_uri(uri)}: the tracking server answers /health but its API fails "
                         f"({why}); look at the server's log and restart it (cluster/local.sh up --with-mlflow), "
                         f"or fix the address") from None


def open_study(name: str, args: argparse.Namespace, base: dict, concurrent: int, classifier_sha256: str) -> Study:
    """The storage, MLflow parent run and settings of study `name` (a preset or the search)."""
    from tuning.studies import Study
    from tuning.tracking import StudyTracker
    from tuning.trainable import StudySettings

    study, storage, uri, experiment = study_place(name, args)
    storage.mkdir(parents=True, exist_ok=True)
    tracker = StudyTracker(uri, experiment)
    preset = PRESETS.get(name)
    params = study_params(name, args, base, classifier_sha256)
    if args.resume and (parent := tracker.existing_parent(study, PRESET_ROLE if preset else SWEEP_ROLE)):
        _check_resumed(study, tracker, parent, params)  # now with the classifier's sha256, known since prepare
    parent = tracker.start_sweep(study, params, args.resume, role=SWEEP_ROLE if preset is None else PRESET_ROLE)
    settings = StudySettings(base=base, storage=str(storage), tracking_uri=uri, experiment=experiment,
                             parent_run_id=parent, workers=args.workers_per_trial,
                             gpus_per_worker=args.gpus_per_worker, cert_shards=args.cert_shards, preset=name,
                             factor=None if preset is None else preset.key, validate=preset is None,
                             test=preset is not None, classifier_sha256=classifier_sha256,
                             shelf=str(shelf_path(args.shelf)) if args.shelf is not None else "")
    print(f"{study}: storage {storage}, MLflow {redact_uri(uri)} (experiment {tracker.experiment_id})", flush=True)
    return Study(study, storage, tracker, parent, settings, args.resume, concurrent)


def check_cluster(args: argparse.Namespace) -> None:
    """After connecting, before any trial: the cluster has the GPUs one trial's training asks for (ValueError
    otherwise). A cluster without them would leave every trial waiting for resources forever."""
    import ray

    wanted = args.gpus_per_worker * args.workers_per_trial
    have = ray.cluster_resources().get("GPU", 0)
    if wanted > have:
        raise ValueError(f"--gpus-per-worker {args.gpus_per_worker} x --workers-per-trial {args.workers_per_trial} "
                         f"needs {wanted:g} GPUs per trial, but the Ray cluster has {have:g}: drop the flag or "
                         f"connect to a cluster with GPU nodes (RAY_ADDRESS)")


def concurrency(args: argparse.Namespace) -> int:
    """Trials at once: --max-concurrent, else the cluster's CPUs (or GPUs) / what one trial's training holds."""
    import ray

    resources = ray.cluster_resources()
    demand = ("GPU", args.gpus_per_worker * args.workers_per_trial) if args.gpus_per_worker else (
        "CPU", args.workers_per_trial)
    return args.max_concurrent or max(1, int(resources.get(demand[0], 1) // demand[1]))


def pin_classifier(cfg, shelf: Path | None) -> None:
    """With --shelf and a classifier this platform trains: the shelf's classifier file into the cache where the
    cache has none, or the cache's onto the shelf (tuning.trial_cache.pin_classifier); ValueError when the two
    differ. (A user's classifier file is theirs: its sha256 in the trials' keys is enough.)"""
    if shelf is not None and cfg.classifier.source == "train":
        from decrop.classifier import classifier_path
        from tuning.trial_cache import pin_classifier as pin
        pin(classifier_path(cfg), str(shelf_path(shelf)))


def shelf_path(shelf: Path) -> Path:
    """The shelf's folder: absolute, or relative to the repository where it lies inside it (a Ray job's working
    directory is a copy of the repository, so the trials find it there under the same relative path)."""
    path = Path(os.path.abspath(shelf.expanduser()))  # not resolved: a link inside the repository stays inside
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def shelve(study: Study, shelf: Path | None) -> None:
    """With --shelf: the study's finished trials (the entries of the trial cache that its runs computed, with their
    learning curves from the store) added to the shelf, so that a fresh machine finds them."""
    if shelf is None:
        return
    from functools import cache

    from tuning import trial_cache
    from tuning.tracking import StudyTracker

    tracker = cache(lambda experiment: StudyTracker(study.settings.tracking_uri, experiment))  # one per experiment

    def finished(source: str) -> tuple[str, list[tuple[int, str, float]]] | None:
        experiment, _, trial_id = source.rpartition("/")
        return tracker(experiment).finished_trial(trial_id)
    added = trial_cache.shelve(study.settings.base["cache_dir"], str(shelf_path(shelf)), finished)
    print(f"{study.name}: {added} finished trial(s) added to the shelf {shelf}", flush=True)


def report(study: Study) -> None:
    """The study's analysis report (tables, figures, seed-level statistics and verdicts) into <storage>/report:
    the one place where the entry point calls analysis/ (the rest of tuning/ never imports it)."""
    from analysis.report import run as write_report
    write_report(study.settings.tracking_uri, [study.settings.experiment], study.storage / "report")


def main(argv: list[str] | None = None) -> int:
    set_environment()
    args = parse_args(argv)
    try:
        preset = resolve(args.preset)
        cfg = load_config(profile_path(args.profile), args.overrides)
        levels = check_args(args, cfg, preset)
        base = to_flat(cfg)
        for name in study_names(preset):
            preflight(name, args, base)
        tic = time.perf_counter()
        # The data and the classifier (trained and cached once here, before trials could race to do it; a
        # user's file checked against the data) before Ray starts: a bad file is one line, not a traceback.
        from decrop.prepare import prepare
        from decrop.runtime import release_memory
        from tuning.trial_cache import other_code
        pin_classifier(cfg, args.shelf)  # the shelf's trials were trained against its classifier: take it
        if args.shelf is not None and (warning := other_code(str(shelf_path(args.shelf)))):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        prepared = prepare(cfg)
        pin_classifier(cfg, args.shelf)  # ...or keep the one trained now there
        # The driver keeps nothing else of it: the clean accuracy, and the classifier's sha256 (trial cache keys).
        clean_accuracy, classifier_sha256 = prepared.clean_accuracy, prepared.budget["classifier_sha256"]
        del prepared
        release_memory()  # the prepared images and classifier (prepare itself released its training peak)
        print(f"sweep: data and classifier ready in {time.perf_counter() - tic:.0f}s", flush=True)
    except (*BAD_INPUT, ValueError) as err:
        print(f"error: {redact_uri(str(err))}", file=sys.stderr)
        return 2
    import optuna

    from tuning.studies import Interrupted, confirm, run_preset, run_search
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per Optuna study created in memory
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # nor per store opened
    connect()
    try:
        check_cluster(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    concurrent = concurrency(args)
    for name in study_names(preset):
        try:
            study = open_study(name, args, base, concurrent, classifier_sha256)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            phase = time.perf_counter()
            if name == SEARCH:
                best = run_search(study, args.num_trials, args.seed)
                print(f"{study.name}: search done in {time.perf_counter() - phase:.0f}s", flush=True)
                phase = time.perf_counter()
                confirm(study, best, args.confirm_seeds, cfg, clean_accuracy)
                print(f"{study.name}: confirmation done in {time.perf_counter() - phase:.0f}s", flush=True)
            else:
                run_preset(study, name, args.seeds, levels)
                print(f"{study.name}: trials done in {time.perf_counter() - phase:.0f}s", flush=True)
        except (RuntimeError, KeyboardInterrupt) as err:
            killed = isinstance(err, (KeyboardInterrupt, Interrupted))
            study.tracker.finish(study.parent, "KILLED" if killed else "FAILED")
            shelve(study, args.shelf)
            print(f"error: {study.name} stopped: {err or 'interrupted'}; what finished is kept: rerun the same "
                  f"command with --resume to continue", file=sys.stderr)
            return 1
        study.tracker.finish(study.parent, "FINISHED")
        shelve(study, args.shelf)
        phase = time.perf_counter()
        report(study)
        print(f"{study.name}: report written in {time.perf_counter() - phase:.0f}s", flush=True)
        uri, experiment_id = study.settings.tracking_uri, study.tracker.experiment_id
        print(f"\n{study.name} done in {time.perf_counter() - tic:.0f}s; report in {study.storage / 'report'}; "
              f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(uri)}, then open "
              f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
