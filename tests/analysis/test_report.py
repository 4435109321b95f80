"""analysis/report.py against a real local MLflow store (SQLite in a temp folder) holding a synthetic search with
its confirmation and a synthetic preset study, written as tuning/tracking.py's StudyTracker writes them: every
number is checked against a direct computation from the rows that were logged, the intervals against
statsmodels, and each kind of bad input against its message and exit code 2. (tests/analysis/test_studies.py
checks the study sections themselves.)"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from statsmodels.stats.proportion import proportion_confint

import tuning.tracking
from analysis import report
from analysis.runs import certification_frame, check_logged, objective_column
from analysis.stats import regression
from analysis.tables import interval_cell
from decrop.rows import CertRow, average_certified_radius
from tuning.schema import (FACTOR_TAG, LEVEL_TAG, METHOD_TAG, PRESET_TAG, SEARCHED, SEED_TAG, VARIANT_TAG,
                           default_tracking_uri)
from tuning.tracking import StudyTracker

REPO = Path(__file__).resolve().parents[2]

RADII = [0.0, 0.25, 0.5]
PRESET_RADII = [*RADII, 0.75]  # the preset's certified radii: 0.75 is only in the metric names, not certify.radii
LEVELS = {"0.25": 0.25, "0.5": 0.5}  # the sigma preset's levels run here


def make_rows(rng: np.random.Generator, n: int, skill: float) -> list[CertRow]:
    """n certification rows of images 0..n-1 (every 7th index skipped, as with test_every): correct with
    probability `skill`, 10% abstentions, radii with 4 decimals (what the TSV keeps)."""
    rows = []
    for i in range(n):
        label = i % 10
        abstain, correct = rng.random() < 0.1, rng.random() < skill
        radius = 0.0 if abstain else round(float(rng.uniform(0.0, 0.8)), 4)
        predict = -1 if abstain else label if correct else (label + 1) % 10
        rows.append(CertRow(7 * i, label, predict, radius, int(predict == label), 0.1, 1000))
    return rows


def certified(rows, r):
    return {row.idx for row in rows if row.correct == 1 and row.radius >= r}


def empty_png(_rows, path, title):
    Path(path).write_bytes(b"")
    return Path(path)


def flat(**over):
    return {"sigma": 0.25, "data.percent": 1.0, "seed": 0, "certify.radii": str(RADII), "denoiser.arch": "dncnn",
            "methods": "['decrop']", "decrop.mixing": 0.8, "decrop.w_cs": 4.0, "decrop.w_mmd": 4.0,
            "decrop.n_interp": 1, "decrop.attack": "pgd", "decrop.stage2_epochs": 5, "decrop.beta_scale": 2.0,
            "decrop.beta_gamma": 10.0, **over}


def confirmation_trial(tracker: StudyTracker, parent: str, label: str, seed: int, params: dict) -> str:
    """A trial of the search's confirmation, tagged as tuning/trainable.py tags it."""
    method, variant = ("decrop", label.removeprefix("decrop_")) if label.startswith("decrop_") else (label, None)
    tags = {PRESET_TAG: "search", METHOD_TAG: method, SEED_TAG: seed, VARIANT_TAG: variant}
    return tracker.trial_run(parent, f"c_{label}_{seed}", f"{label} seed={seed}",
                             {**params, "seed": seed, "methods": str([] if method == "none" else [method])}, tags)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store: a search (14 certified trials, 2 stopped by ASHA) with its confirmation on seed 1, a preset
    study (sigma: 2 levels x 2 seeds of DE-CROP and the baseline, the reference once per level), an experiment
    whose trials were all stopped or failed, and an empty one."""
    root = tmp_path_factory.mktemp("store")
    uri = default_tracking_uri(root)
    rng = np.random.default_rng(0)
    rows = {}
    with pytest.MonkeyPatch.context() as mp:  # the per-label curve PNGs are not read by the report: skip them
        mp.setattr(tuning.tracking, "plot_certified_curve", empty_png)

        bad = StudyTracker(uri, "stopped-exp")
        parent = bad.start_sweep("stopped", {"profile": "quick"}, resume=False)
        for i, status in enumerate(["FINISHED", "FINISHED", "FAILED"]):
            run = bad.trial_run(parent, f"s{i}", f"trial_s{i}", flat())
            bad.log_metrics(run, {"val/agreement": 0.5}, step=0)
            bad.finish(run, status)
        StudyTracker(uri, "empty-exp").experiment_id  # noqa: B018 (creates the experiment)

        sweep = StudyTracker(uri, "sweep-exp")
        parent = sweep.start_sweep("sweep-exp", {f"base.{k}": v for k, v in flat().items()}, resume=False)
        trial_ids, objectives = [], {}
        for i in range(16):
            params = flat(**{"decrop.mixing": round(rng.uniform(0.2, 0.95), 3),
                             "decrop.w_cs": round(float(np.exp(rng.uniform(-1.4, 2.8))), 3),
                             "decrop.w_mmd": round(float(np.exp(rng.uniform(-1.4, 2.8))), 3),
                             "decrop.n_interp": [1, 2][i % 2], "decrop.attack": ["pgd", "none"][(i // 2) % 2],
                             "decrop.beta_scale": round(float(np.exp(rng.uniform(-1.4, 1.4))), 3),
                             "decrop.beta_gamma": round(float(np.exp(rng.uniform(0.7, 3.0))), 3)})
            run = sweep.trial_run(parent, f"t{i:02d}", f"trial_t{i:02d}", params,
                                  {PRESET_TAG: "search", METHOD_TAG: "decrop", SEED_TAG: 0})
            stopped = i in (3, 9)
            for epoch in range(1, 3 if stopped else 5):  # step = epoch number, as decrop.training logs
                sweep.log_metrics(run, {"val/agreement": 0.4 + 0.1 * epoch + 0.01 * i}, step=epoch)
            if not stopped:
                rows[(run, "validation")] = make_rows(rng, 30, skill=rng.uniform(0.4, 0.9))
                sweep.log_certification(run, rows[(run, "validation")], RADII, "validation")
                # the objective here is the validation ACR (what the search once optimised), so that the trials
                # table and the regression are those of tests/analysis/golden/sweep
                objectives[run] = average_certified_radius(rows[(run, "validation")])
                sweep.log_metrics(run, {"certify/objective": objectives[run]}, step=0)
                trial_ids.append((run, f"t{i:02d}", params))
            sweep.finish(run, "FINISHED")
        best_run, best_id, best = max(trial_ids, key=lambda t: objectives[t[0]])
        sweep.set_tag(parent, "decrop.best_trial_id", best_id)
        confirmation = {}
        for label, skill in [("none", 0.3), ("baseline", 0.6), ("decrop_default", 0.7), ("decrop_best", 0.8)]:
            run = confirmation_trial(sweep, parent, label, 1, best if label == "decrop_best" else flat())
            confirmation[label] = run
            rows[(run, f"test_{label}")] = make_rows(rng, 80, skill)
            sweep.log_certification(run, rows[(run, f"test_{label}")], RADII, f"test_{label}")
            sweep.finish(run, "FINISHED")
        sweep.finish(parent, "FINISHED")

        # a paper's study: a preset parent, one trial per level, method and seed (the reference on the first seed)
        study = StudyTracker(uri, "preset-exp")
        preset_parent = study.start_sweep("preset-exp", {"preset": "sigma", "factor": "sigma", "seeds": "[0, 1]",
                                                         "base.certify.radii": str(RADII)}, resume=False,
                                          role="preset")
        preset_runs = {}
        for level, sigma in LEVELS.items():
            for method, skill, seeds in [("none", 0.3, (0,)), ("baseline", 0.55, (0, 1)), ("decrop", 0.75, (0, 1))]:
                for seed in seeds:
                    tags = {PRESET_TAG: "sigma", FACTOR_TAG: "sigma", LEVEL_TAG: level, METHOD_TAG: method,
                            SEED_TAG: seed}
                    run = study.trial_run(preset_parent, f"p_{level}_{method}_{seed}",
                                          f"{method} sigma={level} seed={seed}",
                                          flat(sigma=sigma, seed=seed, methods=str([] if method == "none" else
                                                                                   [method])), tags)
                    preset_runs[(level, method, seed)] = run
                    rows[(run, f"test_{method}")] = make_rows(rng, 40, skill)
                    study.log_certification(run, rows[(run, f"test_{method}")], PRESET_RADII, f"test_{method}")
                    study.finish(run, "FINISHED")
        study.finish(preset_parent, "FINISHED")
    return SimpleNamespace(root=root, uri=uri, rows=rows, sweep_parent=parent, best_run=best_run,
                           objectives=objectives, confirmation=confirmation, preset_parent=preset_parent,
                           preset_runs=preset_runs, client=MlflowClient(uri))


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_report")
    assert report.main(["--mlflow-uri", store.uri, "--experiment", "sweep-exp", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def preset_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("preset_report")
    assert report.main(["--mlflow-uri", store.uri, "--experiment", "preset-exp", "--out", str(out)]) == 0
    return out


def test_tidy_frame_matches_the_logged_rows(store, sweep_report, preset_report):
    for out, radii in ((sweep_report, RADII), (preset_report, PRESET_RADII)):
        cert = pd.read_csv(out / "certified.csv")
        assert len(cert) == len(radii) * cert.groupby(["run_id", "label"]).ngroups
        assert sorted(cert["radius"].unique()) == radii
        for row in cert.itertuples():
            rows = store.rows[(row.run_id, row.label)]
            k = len(certified(rows, row.radius))
            lo, hi = proportion_confint(k, len(rows), alpha=0.05, method="beta")
            assert (row.n_images, row.n_certified) == (len(rows), k)
            assert row.accuracy == pytest.approx(k / len(rows))
            assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi))
            assert row.logged_accuracy == pytest.approx(row.accuracy)  # the cross-check agrees
            assert row.split == ("validation" if row.label == "validation" else "test")
            assert row.method == ("decrop" if row.label == "validation" else row.label.removeprefix("test_"))
    sweep = pd.read_csv(sweep_report / "certified.csv")
    assert sweep.groupby("kind")["run_id"].nunique().to_dict() == {"confirm_trial": 4, "search_trial": 14}
    assert set(sweep.loc[sweep["kind"] == "search_trial", "label"]) == {"validation"}
    preset = pd.read_csv(preset_report / "certified.csv")
    assert preset.groupby("kind")["run_id"].nunique().to_dict() == {"preset_trial": len(store.preset_runs)}
    assert set(preset["setting"]) == {"preset-exp sigma=0.25", "preset-exp sigma=0.5"}


def check_per_run(table: pd.DataFrame, run_of, store, radii):
    """Each row of a ``test_accuracy`` table (one run's test certification) against its logged rows; `run_of`
    names the run of a row."""
    for row in table.to_dict("records"):
        rows = store.rows[(run_of(row), f"test_{row['method']}")]
        for r in radii:
            k = len(certified(rows, r))
            lo, hi = proportion_confint(k, len(rows), alpha=0.05, method="beta")
            assert row[f"r={r:.2f}"] == interval_cell(k / len(rows), lo, hi)


def test_tables_equal_a_direct_computation(store, sweep_report, preset_report):
    """Every run's own test table (its interval over the images) and the search's trials."""
    table = pd.read_csv(sweep_report / "test_accuracy.csv")
    assert list(table["method"]) == ["none", "baseline", "decrop_default", "decrop_best"]
    assert set(table["setting"]) == {"sweep-exp confirmation"} and set(table["seed"]) == {1}
    check_per_run(table, lambda row: store.confirmation[row["method"]], store, RADII)
    table = pd.read_csv(preset_report / "test_accuracy.csv")
    assert len(table) == len(store.preset_runs)
    check_per_run(table, lambda row: store.preset_runs[(row["setting"].removeprefix("preset-exp sigma="),
                                                        row["method"], row["seed"])], store, PRESET_RADII)

    trials = pd.read_csv(sweep_report / "trials.csv")
    assert len(trials) == 16 and trials["objective"].notna().sum() == 14
    assert set(trials.loc[trials["objective"].isna(), "note"]) == {"stopped early by ASHA"}
    assert list(trials["epochs"]) == [4] * 14 + [2, 2]  # the last logged epoch
    assert trials["objective"].iloc[0] == pytest.approx(
        store.client.get_run(store.best_run).data.metrics["certify/objective"], abs=1e-4)


def test_the_objective_is_certify_objective():
    """A trial without ``certify/objective`` has no objective: its validation ACR (``certify/acr``) is not one."""
    trials = pd.DataFrame({"metrics.certify/objective": [0.5, np.nan], "metrics.certify/acr": [0.3, 0.4]})
    assert objective_column(trials).tolist()[0] == 0.5 and np.isnan(objective_column(trials).iloc[1])
    assert objective_column(trials.drop(columns="metrics.certify/objective")).isna().all()


def test_regression_has_one_coefficient_per_varying_parameter(sweep_report):
    table = pd.read_csv(sweep_report / "regression.csv")
    varying = set(SEARCHED) - {"stage2"}  # all trials ran stage 2
    assert sorted(table["parameter"]) == sorted(varying)
    assert (table["ci_low"] <= table["coef"]).all() and (table["coef"] <= table["ci_high"]).all()
    assert table["sentence"].str.contains("95% CI").all()


def test_regression_refuses_too_few_trials():
    trials = pd.DataFrame({"objective": [0.3, 0.4, 0.35, 0.5], "decrop.mixing": [0.3, 0.5, 0.7, 0.9],
                           "decrop.w_cs": [1.0, 2.0, 4.0, 8.0], "decrop.w_mmd": [1.0, 0.5, 2.0, 4.0],
                           "decrop.attack": ["pgd", "none", "pgd", "deepfool"]}).reindex(columns=["objective",
                                                                                                *SEARCHED])
    table, notes = regression(trials)
    assert table.empty
    assert any("5 coefficients plus an intercept and needs at least 7 trials: not fitted" in n for n in notes)


def test_check_logged_warns_on_a_mismatch(store):
    runs = pd.DataFrame([{"run_id": "r1", "run_name": "trial_x", "role": "trial", "status": "FINISHED",
                          "params.certify.radii": str(RADII), "metrics.certify/acc_r0.25": 0.99,
                          "metrics.certify/acr": 0.1}]).set_index("run_id", drop=False)
    cert = certification_frame(runs, {("r1", "validation"): make_rows(np.random.default_rng(1), 20, 0.5)})
    warnings = check_logged(cert)
    assert len(warnings) == 1 and "trial_x, validation, r=0.25" in warnings[0]


def test_html_embeds_every_figure_and_the_report_is_logged(store, sweep_report, preset_report, capsys):
    for out, parent in ((sweep_report, store.sweep_parent), (preset_report, store.preset_parent)):
        pngs = sorted(p.name for p in out.glob("*.png"))
        html = (out / "report.html").read_text()
        assert len(pngs) >= 1
        assert html.count('<img src="data:image/png;base64,') == len(pngs)
        markdown = (out / "report.md").read_text()
        assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)) == pngs
        logged = {Path(f.path).name for f in store.client.list_artifacts(parent, "report")}
        assert logged == {p.name for p in out.iterdir()}
    sweep_pngs = {p.name for p in sweep_report.glob("*.png")}
    assert {"sweep-exp_confirmation_certified_accuracy.png", "search_history.png", "hyperparameter_effects.png",
            "validation_agreement.png", "factor_validation_decrop_attack.png"} <= sweep_pngs
    # a preset's report: its study's figure; no search, so neither the search's figures nor their placeholders
    assert {p.name for p in preset_report.glob("*.png")} == {"preset-exp_certified_accuracy.png"}
    markdown = (preset_report / "report.md").read_text()
    assert "No search history" not in markdown and "## What drives the objective" not in markdown


def test_defaults_pick_the_newest_store_and_experiment(store, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    for name in ("old", "new"):
        (home / "decrop-runs" / name).mkdir(parents=True)
    old = home / "decrop-runs" / "old" / "mlflow.db"
    old.write_bytes(b"")  # not a store: the report would fail if it read this one
    os.utime(old, (old.stat().st_atime - 1000, old.stat().st_mtime - 1000))
    shutil.copy(store.root / "mlflow.db", home / "decrop-runs" / "new" / "mlflow.db")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0
    out = capsys.readouterr().out
    assert f"{home}/decrop-runs/new/mlflow.db" in out and "loading the runs of preset-exp" in out
    assert f"report: reading {home}/decrop-runs/new/mlflow.db, the newest store under {home}/decrop-runs" in out
    assert "preset-exp:\n| level" in out  # the headline table: the preset's
    assert (tmp_path / "reports" / "preset-exp" / "report.html").exists()


def test_runs_as_a_script(tmp_path):
    missing = tmp_path / "none" / "mlflow.db"
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), "--mlflow-uri", str(missing)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: no MLflow store at {missing} (--mlflow-uri {missing})\n"


def bad(argv, capsys) -> str:
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


def test_bad_experiments(store, tmp_path, capsys):
    err = bad(["--mlflow-uri", store.uri, "--experiment", "nope", "--out", str(tmp_path)], capsys)
    assert "unknown experiment 'nope'" in err and "'sweep-exp'" in err and "'preset-exp'" in err
    err = bad(["--mlflow-uri", store.uri, "--experiment", "empty-exp", "--out", str(tmp_path)], capsys)
    assert "experiment 'empty-exp' has no runs" in err
    err = bad(["--mlflow-uri", store.uri, "--experiment", "stopped-exp", "--out", str(tmp_path)], capsys)
    assert "no certification results in 'stopped-exp'" in err
    assert "all 3 trials (2 stopped early by ASHA, 1 failed)" in err
    assert "the sweep (still running or interrupted)" in err


def test_bad_stores(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "mlflow.db"
    err = bad(["--mlflow-uri", str(missing)], capsys)
    assert f"no MLflow store at {missing}" in err
    assert not missing.parent.exists()  # not created as an empty store
    bad(["--mlflow-uri", f"sqlite:///{missing}"], capsys)
    assert not missing.parent.exists()

    monkeypatch.setenv("HOME", str(tmp_path))
    err = bad([], capsys)
    assert f"no MLflow store found: nothing matches {tmp_path}/decrop-runs/*/mlflow.db" in err

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    err = bad(["--mlflow-uri", "http://127.0.0.1:9"], capsys)
    assert "cannot read the MLflow store http://127.0.0.1:9" in err


def test_an_out_that_is_a_file_is_refused_before_any_run_is_read(store, tmp_path, monkeypatch, capsys):
    """--out naming a file (or a folder under one) ended in a traceback after reading every run: now one line,
    before the runs are read, the file unchanged; the default out folder is checked the same way."""
    def no_reading(*args, **kwargs):
        raise AssertionError("the runs were read before --out was checked")

    monkeypatch.setattr(report, "load_runs", no_reading)
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for out in (afile, afile / "sub"):
        err = bad(["--mlflow-uri", store.uri, "--experiment", "sweep-exp", "--out", str(out)], capsys)
        assert err == (f"error: --out {out}: {afile} is a file, not a folder; choose a folder for the report with "
                       f"--out (a missing one is created); nothing was read or written\n")
    assert afile.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").write_text("not a folder\n")
    err = bad(["--mlflow-uri", store.uri, "--experiment", "sweep-exp"], capsys)
    assert "the default report folder reports/sweep-exp: reports is a file, not a folder" in err


GOLDEN = Path(__file__).resolve().parent / "golden"


def test_the_searchs_tables_are_the_same_as_before(sweep_report):
    """The search's trials table and the regression of its objective (tests/analysis/golden/sweep: written by the
    report of an earlier version from these trials) come out the same."""
    for golden in sorted((GOLDEN / "sweep").glob("*.csv")):
        expected, found = pd.read_csv(golden), pd.read_csv(sweep_report / golden.name)
        pd.testing.assert_frame_equal(found, expected, check_exact=False, rtol=1e-12)
    markdown = (sweep_report / "report.md").read_text()
    assert "## The search sweep-exp: confirmation on fresh seeds" in markdown
    assert "## What drives the objective" in markdown and "## Where the time went" in markdown


def test_provenance_names_the_seeds_the_numbers_rest_on_and_those_under_way_apart():
    """A study under way: seed 2's trials are running (no certification yet), seed 1's DE-CROP is certified and
    its baseline still running. The numbers rest on seeds 0 and 1; seed 2 is named as under way, not among them."""
    runs = pd.DataFrame(
        {"role": ["preset", "trial", "trial", "trial", "trial", "trial"],
         "status": ["RUNNING", "FINISHED", "FINISHED", "RUNNING", "RUNNING", "FAILED"],
         "seed": [np.nan, 0, 1, 1, 2, 3], "params.profile": "studies", "tags.decrop.git_commit": "abc"},
        index=["parent", "a0", "a1", "b1", "a2", "a3"])
    text = report.provenance(runs, {"a0", "a1"})
    assert text.endswith("seeds 0, 1 (trials under way: seed 2).")
    assert report.provenance(runs.drop(index=["b1", "a2"]), {"a0", "a1"}).endswith("seeds 0, 1.")
