"""The sweep command: errors before any compute, the search space, and (slow) a real sweep with resume."""

import os
import signal
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import ray
import ray.tune
from ray import cloudpickle

from helpers import TINY_SWEEP as TINY
from tuning import studies, sweep
from tuning.space import default_point, define_space, trial_overrides
from tuning.schema import default_tracking_uri
from tuning.tracking import StudyTracker

REPO = Path(__file__).resolve().parents[2]


def test_config_error_stops_the_sweep_before_ray_starts(tmp_path, capsys):
    code = sweep.main(["--storage", str(tmp_path), "--set", "train.epoch=3"])
    assert code == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir())  # nothing written, no MLflow store created


def test_an_existing_study_needs_resume(tmp_path, capsys):
    storage = tmp_path / "quick-study"
    storage.mkdir()
    StudyTracker(default_tracking_uri(storage), "quick-study").start_sweep("quick-study", {}, resume=False)
    assert sweep.main(["--storage", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_study_resumes_only_with_the_trials_and_config_it_started_with(tmp_path, capsys):
    """Tune restores the trials a study started with: a --resume asking for more seeds would never run them, and
    another config would train the rest differently. Both stop before Ray starts, naming the way to more seeds."""
    from decrop.config import load_config, to_flat
    started = ["--preset", "mixing", "--seeds", "0", "1", "2", "--storage", str(tmp_path)]
    base = to_flat(load_config(sweep.profile_path("quick"), []))
    storage = tmp_path / "quick-mixing"
    storage.mkdir()
    tracker = StudyTracker(default_tracking_uri(storage), "quick-mixing")
    parent = tracker.start_sweep("quick-mixing", sweep.study_params("mixing", sweep.parse_args(started), base),
                                 resume=False, role="preset")
    # --set is compared by its effect on the config: restating a profile value changes nothing
    restated = sweep.parse_args([*started, "--set", "train.epochs=15"])
    sweep._check_resumed("quick-mixing", tracker, parent, sweep.study_params("mixing", restated, base))
    assert sweep.main([*started[:-2], "3", *started[-2:], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "seeds was [0, 1, 2] (this command: [0, 1, 2, 3])" in err
    assert "as a new study (--study NAME) with the whole list" in err and "Traceback" not in err
    assert sweep.main([*started, "--set", "train.epochs=5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "base.train.epochs was 15 (this command: 5)" in err and "--study NAME" not in err
    assert not ray.is_initialized()


def test_search_space_samples_every_knob_and_maps_stage2():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        define_space(trial)
        seen |= set(trial.params)
        overrides = trial_overrides(trial.params, {"train.epochs": 20, "decrop.stage2_epochs": 0})
        assert "stage2" not in overrides
        assert overrides["decrop.stage2_epochs"] == (5 if trial.params["stage2"] else 0)
        assert overrides["train.epochs"] + overrides["decrop.stage2_epochs"] == 20  # the same budget either way
        assert ("decrop.beta_scale" in trial.params) == trial.params["stage2"]  # conditional on stage 2
        study.tell(trial, 0.0)
    assert {"decrop.mixing", "decrop.w_cs", "decrop.w_mmd", "decrop.n_interp", "decrop.attack", "stage2",
            "decrop.beta_scale", "decrop.beta_gamma"} <= seen


@pytest.mark.parametrize("epochs", [2, 3, 20, 600])
def test_asha_never_stops_a_trial_at_or_after_its_last_epoch(epochs):
    scheduler = studies.asha(epochs)
    rungs = [milestone for bracket in scheduler._brackets for milestone, _ in bracket._rungs]
    assert rungs and all(rung < epochs for rung in rungs)
    assert not scheduler._stop_last_trials  # reaching max_t is no reason to stop


def test_default_point_is_in_the_space_and_reproduces_the_profile():
    from decrop.config import from_flat, load_config, to_flat
    for profile in ("quick", "paper"):
        base = to_flat(load_config(REPO / "configs" / f"{profile}.yaml"))
        point = default_point(base)
        study = optuna.create_study()
        study.enqueue_trial(point)
        trial = study.ask()
        define_space(trial)
        assert trial.params == point  # every default lies inside the searched ranges
        assert to_flat(from_flat({**base, **trial_overrides(point, base)})) == base
    off = {**base, "decrop.stage2_epochs": 0}
    assert default_point(off)["stage2"] is False
    on = trial_overrides({"stage2": True}, off)
    assert on["decrop.stage2_epochs"] == round(0.25 * base["train.epochs"])
    assert on["train.epochs"] + on["decrop.stage2_epochs"] == base["train.epochs"]


def test_the_best_trial_is_the_same_whatever_the_order_of_the_results():
    from types import SimpleNamespace
    from decrop.config import load_config, to_flat
    base = to_flat(load_config(REPO / "configs" / "quick.yaml"))
    default = default_point(base)
    other = {**default, "decrop.w_cs": default["decrop.w_cs"] + 1.0}

    def result(config, objective, trial_id):
        return SimpleNamespace(config=config, metrics={"objective": objective, "trial_id": trial_id})

    tie = [result(other, 0.375, "a"), result(default, 0.375, "b"), result(other, 0.25, "c"),
           result(other, float("nan"), "d")]
    for results in (tie, tie[::-1]):  # a restored result grid need not keep the first run's order
        assert studies.best_result(results, base).metrics["trial_id"] == "b"  # a tie goes to the defaults
    no_default = [result(other, 0.5, "f"), result(other, 0.5, "e")]
    for results in (no_default, no_default[::-1]):
        assert studies.best_result(results, base).metrics["trial_id"] == "e"
    assert studies.best_result([result(other, 0.5, "g"), *tie], base).metrics["trial_id"] == "g"  # better wins


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's sweeps (connect() joins a running one); a 1-epoch classifier, cached."""
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def _children(uri: str, experiment: str) -> tuple[object, list]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


@pytest.mark.ray
def test_tiny_search_confirms_on_fresh_seeds_and_resume_duplicates_nothing(local_ray, tmp_path, capsys):
    args = ["--num-trials", "2", "--study", "tiny", "--storage", str(tmp_path), "--cert-shards", "2",
            "--confirm-seeds", "1"]
    for item in TINY:
        args += ["--set", item]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "Confirmation on fresh seeds [1]" in out and "baseline" in out
    assert "Reporting training result" not in out  # workers' chatter stays in Ray's logs

    uri = default_tracking_uri(tmp_path / "tiny")
    client = mlflow.MlflowClient(uri)
    parent, children = _children(uri, "tiny")
    search = [c for c in children if "decrop.variant" not in c.data.tags and c.data.tags["decrop.method"] == "decrop"
              and c.data.tags["decrop.seed"] == "0"]
    confirmation = [c for c in children if c not in search]
    assert len(search) == 2
    for child in search:
        assert child.info.status == "FINISHED" and child.data.tags["decrop.preset"] == "search"
        assert child.data.params["decrop.attack"] in {"pgd", "autoattack", "deepfool", "none"}
        assert child.info.run_name.startswith("decrop search ")  # named for a human
        assert "train/loss" in child.data.metrics and "time/prepare" in child.data.metrics
        if "certify/acr" in child.data.metrics:  # trials ASHA stopped early have no certification
            paths = {a.path for a in client.list_artifacts(child.info.run_id, "certify")}
            assert {"certify/validation.tsv", "certify/validation_curve.png"} <= paths
            assert client.get_metric_history(child.info.run_id, "certify/curve")  # overlaid in the chart view
    # the confirmation: defaults (and the best, unless it is the defaults), baseline, reference on seed 1
    labels = {c.data.tags.get("decrop.variant") or c.data.tags["decrop.method"] for c in confirmation}
    assert {"default", "baseline", "none"} <= labels <= {"default", "best", "baseline", "none"}
    for child in confirmation:
        assert child.data.tags["decrop.seed"] == "1"  # a seed the search never used
        assert any(k.startswith("certify_test_") and k.endswith("/acr") for k in child.data.metrics)
        assert not any(k.startswith("certify/") for k in child.data.metrics)  # no validation: nothing selected
    assert parent.data.tags["decrop.best_trial_id"] in {c.data.tags["decrop.trial_id"] for c in search}
    assert any(all(c.data.params[k] == parent.data.params[f"base.{k}"] for k in ("decrop.mixing", "decrop.w_cs",
                                                                               "decrop.attack"))
               for c in search)  # the profile's own values are always measured
    # --resume of a finished study reruns no trial and creates no MLflow run
    before = len(client.search_runs([parent.info.experiment_id]))
    assert sweep.main(args + ["--resume"]) == 0
    assert len(client.search_runs([parent.info.experiment_id])) == before
    # ... and without --resume an existing study is refused before anything runs
    assert sweep.main(args) == 2
    assert "--resume" in capsys.readouterr().err


def _toy_trial(config):
    if config["x"] == 0:  # the first trial stops the study as Ctrl-C would (Tune treats SIGUSR1 as SIGINT)
        os.kill(config["driver"], signal.SIGUSR1)
        time.sleep(2)
    ray.tune.report({"x": config["x"]})


@pytest.mark.ray
@pytest.mark.parametrize("interrupt", [False, True])
def test_an_interrupted_grid_is_not_taken_for_a_finished_one(local_ray, tmp_path, interrupt):
    """Tune answers Ctrl-C by saving its state and returning the trials it has, without an error: `check_finished`
    (which run_grid and run_search call) must raise Interrupted, so that the sweep marks the parent run KILLED and
    writes no report instead of going on as if every trial had ended."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    grid = [0, 1, 2] if interrupt else [1, 2, 3]
    tuner = ray.tune.Tuner(_toy_trial, param_space={"x": ray.tune.grid_search(grid), "driver": os.getpid()},
                           tune_config=ray.tune.TuneConfig(max_concurrent_trials=1),
                           run_config=ray.tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    results = tuner.fit()
    if interrupt:
        with pytest.raises(studies.Interrupted, match=r"of 3 trials of toy ended"):
            studies.check_finished("toy", results, len(grid))
    else:
        assert results.num_errors == 0 and results.num_terminated == len(grid)
        studies.check_finished("toy", results, len(grid))
        with pytest.raises(studies.Interrupted):  # a trial the searcher never created counts too
            studies.check_finished("toy", results, len(grid) + 1)


def _smoke_levels(name: str) -> list[str]:
    """Two levels where the levels share the baseline (or are the methods), so the shared arms and the
    comparison between levels run; where each level has its own baseline, one level (the same plumbing per level,
    half the trials: CI stays under 20 minutes), the first that differs from the profile (MemNet, policy 2, ...).
    `tests/tuning/test_presets.py` checks every preset's whole grid."""
    from decrop.config import load_config, to_flat
    from tuning.presets import PRESETS
    preset = PRESETS[name]
    if not preset.affects_baseline or preset.key == "method":
        return [str(level) for level in preset.levels[:2]]
    default = to_flat(load_config(REPO / "configs" / "quick.yaml"))[preset.key]
    return [str(next(level for level in preset.levels if level != default))]


@pytest.mark.ray
# Two presets cover the two ways a study's arms are laid out: mixing shares the baseline and the reference between
# its levels (and compares two levels), sigma gives each level its own. The rest run the same plumbing (their grids
# are checked offline by test_presets.py): slow, `make test-all` or `-m slow`.
@pytest.mark.parametrize("preset", ["mixing", "sigma", *(pytest.param(name, marks=pytest.mark.slow) for name in (
    "data", "denoiser", "n_interp", "attack", "boundary", "augment", "blackbox"))])
def test_every_preset_runs_in_a_smoke_setting(local_ray, tmp_path, preset, capsys):
    """Each paper study through the platform: its first level or two (`_smoke_levels`), one seed, tiny settings."""
    from tuning.presets import PRESETS, points
    smoke = _smoke_levels(preset)
    args = ["--preset", preset, "--seeds", "0", "--levels", *smoke, "--storage", str(tmp_path)]
    for item in [*TINY, "data.test_every=2000", "data.percent=0.2", "blackbox.epochs=1", "denoiser.num_memblocks=1",
                 "denoiser.num_resblocks=1"]:
        args += ["--set", item]
    assert sweep.main(args) == 0, capsys.readouterr().err
    parent, children = _children(default_tracking_uri(tmp_path / f"quick-{preset}"), f"quick-{preset}")
    levels = tuple(level for level in PRESETS[preset].levels if str(level) in smoke)
    assert len(children) == len(points(PRESETS[preset], [0], levels))
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["decrop.role"] == "preset" and parent.data.params["factor"] == PRESETS[preset].key
    for child in children:
        method = child.data.tags["decrop.method"]
        assert f"certify_test_{method}/acr" in child.data.metrics  # every point certified the test subset
        assert child.info.run_name.startswith(method) and "seed=0" in child.info.run_name
    assert (tmp_path / f"quick-{preset}" / "report" / "report.html").exists()


@pytest.mark.ray
def test_a_shelved_study_is_taken_whole_by_a_fresh_machine(local_ray, tmp_path, capsys):
    """--shelf: a study's finished trials, kept in a folder (rows, learning curves and the classifier; no weights),
    are what a fresh machine (an empty cache, a new store) takes instead of computing them again."""
    from tuning.schema import NOT_KEPT, REUSED_TAG, WEIGHTS_TAG
    shelf = tmp_path / "shelf"

    def study(machine: str) -> dict:
        args = ["--preset", "sigma", "--seeds", "0", "--levels", "0.25", "--storage", str(tmp_path / machine),
                "--shelf", str(shelf)]
        for item in [*TINY, "data.test_every=2000", "data.percent=0.2", f"cache_dir={tmp_path / machine}/cache"]:
            args += ["--set", item]
        assert sweep.main(args) == 0, capsys.readouterr().err
        uri = default_tracking_uri(tmp_path / machine / "quick-sigma")
        return {child.data.tags["decrop.method"]: (child, mlflow.MlflowClient(uri))
                for child in _children(uri, "quick-sigma")[1]}

    first = study("a")
    assert "3 finished trial(s) added to the shelf" in capsys.readouterr().out
    assert not list(shelf.rglob("denoiser.pt")) and str(tmp_path) not in "".join(
        path.read_text() for path in shelf.rglob("*.json"))  # no weights, no path of the machine
    second = study("b")
    out = capsys.readouterr().out
    assert "0 finished trial(s) added" in out, out[-2000:]
    classifiers = [next((tmp_path / machine / "cache" / "classifiers").glob("*.pt")) for machine in "ab"]
    assert classifiers[0].read_bytes() == classifiers[1].read_bytes()  # b took a's classifier, trained none
    assert set(first) == set(second) == {"decrop", "baseline", "none"}
    for method, (run, client) in second.items():
        computed, computed_client = first[method]
        assert run.data.tags[REUSED_TAG] == f"quick-sigma/{computed.data.tags['decrop.trial_id']}"
        assert run.data.tags.get(WEIGHTS_TAG) == (None if method == "none" else NOT_KEPT)
        acr = f"certify_test_{method}/acr"
        assert run.data.metrics[acr] == computed.data.metrics[acr]
        curves = [[(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "val/agreement")]
                  for r, c in ((run, client), (computed, computed_client))]
        assert curves[0] == curves[1] and (method == "none") == (not curves[0])  # the learning curve, whole


def test_the_ray_token_file_is_made_private_but_never_through_a_symlink(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    token = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert sweep.private_token_file() == token  # created, 0600 from the start
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    token.chmod(0o644)
    sweep.private_token_file()
    assert token.stat().st_mode & 0o777 == 0o600  # a world-readable token file is made private
    target, link = tmp_path / "notes.txt", tmp_path / "link"
    target.write_text("a file of the user's")
    target.chmod(0o644)
    link.symlink_to(target)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(link))
    capsys.readouterr()
    assert sweep.private_token_file() == link
    assert target.stat().st_mode & 0o777 == 0o644 and target.read_text() == "a file of the user's"  # untouched
    assert "is a symbolic link" in capsys.readouterr().out
    target.unlink()  # a dangling link: nothing is created through it
    assert sweep.private_token_file() == link and not target.exists()


def test_connect_never_joins_a_running_cluster_unless_asked(monkeypatch, capsys):
    """A test suite's or a notebook's Ray ends with them: the sweep starts its own unless RAY_ADDRESS names one."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(sweep, "private_token_file", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep.connect()
    assert len(calls) == 1 and "address" not in calls[0] and calls[0]["num_cpus"] >= 1  # a private one
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "127.0.0.1:6379"})())
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    sweep.connect()
    assert "num_cpus" not in calls[1] and "joined the Ray cluster" in capsys.readouterr().out


def test_gpus_asked_of_a_cluster_without_them_stop_before_any_trial(monkeypatch):
    """--gpus-per-worker under RAY_ADDRESS is checked after connecting: the cluster's GPUs, not the flag's hope."""
    import types

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    args = types.SimpleNamespace(gpus_per_worker=1.0, workers_per_trial=2)
    with pytest.raises(ValueError, match="needs 2 GPUs per trial, but the Ray cluster has 0"):
        sweep.check_cluster(args)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 4.0})
    sweep.check_cluster(args)  # enough: no error
    sweep.check_cluster(types.SimpleNamespace(gpus_per_worker=0.0, workers_per_trial=1))


class _FailingServer:
    """A tracking server whose /health answers 200 and every other request 500 (a broken backend store), on a
    free port of 127.0.0.1, in a thread; counts the API requests it failed."""

    def __init__(self):
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                if self.path.split("?")[0] == "/health":
                    code, body = 200, b"OK"
                else:
                    server.failed += 1
                    code, body = 500, b'{"error_code": "INTERNAL_ERROR", "message": "backend store broken"}'
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):  # no line per request on stderr
                pass

        self.failed = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_whose_api_fails_is_one_error_line_in_seconds(tmp_path, monkeypatch, capsys):
    """/health answers but every API call is a 500: the preflight's one real API call gives up after MLflow's
    retries, bounded for the check only (not minutes of silence), before Ray starts or any data is read; the
    environment the study would run with is left as it was."""
    import os
    import time

    for key in sweep.PREFLIGHT_MLFLOW_ENV:
        monkeypatch.delenv(key, raising=False)

    def no_ray():
        raise AssertionError("Ray started: the failing server was not caught by the preflight")

    monkeypatch.setattr(sweep, "connect", no_ray)
    with _FailingServer() as server:
        tic = time.perf_counter()
        code = sweep.main(["--storage", str(tmp_path), "--mlflow-uri", f"http://127.0.0.1:{server.port}"])
        elapsed = time.perf_counter() - tic
    err = capsys.readouterr().err
    print(f"failing server refused in {elapsed:.1f}s after {server.failed} API requests")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f"--mlflow-uri http://127.0.0.1:{server.port}" in lines[0]
    assert "answers /health but its API fails" in lines[0] and "500" in lines[0]
    assert "restart it" in lines[0]
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert 1 <= server.failed <= 3  # one API call and its 2 bounded retries (Ray never started: connect raises)
    assert not any(tmp_path.iterdir())  # nothing written
    assert not [k for k in sweep.PREFLIGHT_MLFLOW_ENV if k in os.environ]  # the study keeps MLflow's retries


def test_the_preflight_bound_leaves_the_callers_mlflow_settings(monkeypatch):
    """Inside the check: the bound, unless the caller set a value; after it: the environment as it was."""
    import os

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    with sweep.mlflow_check_env():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
