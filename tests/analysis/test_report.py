"""analysis/report.py against a real local MLflow store (SQLite in a temp folder) holding a synthetic sweep and a
synthetic method study: every number is checked against a direct computation from the rows that were logged,
the intervals against statsmodels, the paired tests against a binomial test, and each kind of bad input against
its message and exit code 2."""

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
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

import tuning.tracking
from analysis import report
from analysis.runs import SEARCHED, certification_frame, check_logged
from analysis.stats import holm, image_level_test, regression
from analysis.tables import interval_cell, spread_cell
from decrop.rows import CertRow
from tuning.tracking import StudyTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[2]

RADII = [0.0, 0.25, 0.5]
STUDY_RADII = [*RADII, 0.75]  # method_study.py's --radii: 0.75 is only in the metric names, not certify.radii
SETTINGS = {"sigma0.25_percent1": 0.25, "sigma0.5_percent1": 0.5}


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


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store: a sweep (14 certified trials, 2 stopped by ASHA, test labels on the parent), a method study
    (2 settings x 2 seeds), an experiment whose trials were all stopped or failed, and an empty one."""
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
        trial_ids = []
        for i in range(16):
            params = flat(**{"decrop.mixing": round(rng.uniform(0.2, 0.95), 3),
                             "decrop.w_cs": round(float(np.exp(rng.uniform(-1.4, 2.8))), 3),
                             "decrop.w_mmd": round(float(np.exp(rng.uniform(-1.4, 2.8))), 3),
                             "decrop.n_interp": [1, 2][i % 2], "decrop.attack": ["pgd", "none"][(i // 2) % 2],
                             "decrop.beta_scale": round(float(np.exp(rng.uniform(-1.4, 1.4))), 3),
                             "decrop.beta_gamma": round(float(np.exp(rng.uniform(0.7, 3.0))), 3)})
            run = sweep.trial_run(parent, f"t{i:02d}", f"trial_t{i:02d}", params)
            stopped = i in (3, 9)
            for epoch in range(1, 3 if stopped else 5):  # step = epoch number, as decrop.training logs
                sweep.log_metrics(run, {"val/agreement": 0.4 + 0.1 * epoch + 0.01 * i}, step=epoch)
            if not stopped:
                rows[(run, "validation")] = make_rows(rng, 30, skill=rng.uniform(0.4, 0.9))
                sweep.log_certification(run, rows[(run, "validation")], RADII, "validation")
                trial_ids.append((run, f"t{i:02d}"))
            sweep.finish(run, "FINISHED")
        best_run, best_id = max(trial_ids, key=lambda t: sweep.client.get_run(t[0]).data.metrics["certify/acr"])
        sweep.set_tag(parent, "decrop.best_trial_id", best_id)
        for label, skill in [("none", 0.3), ("baseline", 0.6), ("decrop_default", 0.7), ("decrop_best", 0.8)]:
            rows[(parent, f"test_{label}")] = make_rows(rng, 80, skill)
            sweep.log_certification(parent, rows[(parent, f"test_{label}")], RADII, f"test_{label}")
        sweep.finish(parent, "FINISHED")

        # the shape scripts/method_study.py records: a "study" parent, a "method_run" child per setting and seed
        study = StudyTracker(uri, "method-exp")
        study_parent = study.start_sweep("method-exp", {"grid": "sigma=0.25,0.5", "seeds": "0 1"}, resume=False,
                                         role="study")
        method_runs = {}
        for setting, sigma in SETTINGS.items():
            for seed in (0, 1):
                run = study.child_run(study_parent, {"decrop.setting": setting, "decrop.seed": str(seed)},
                                      f"{setting}/seed{seed}", flat(sigma=sigma, seed=seed,
                                                                    methods="['baseline', 'decrop']"),
                                      role="method_run")
                method_runs[(setting, seed)] = run
                for label, skill in [("none", 0.3), ("baseline", 0.55), ("decrop", 0.75)]:
                    rows[(run, f"test_{label}")] = make_rows(rng, 40, skill)
                    study.log_certification(run, rows[(run, f"test_{label}")], STUDY_RADII, f"test_{label}")
                study.finish(run, "FINISHED")
        study.finish(study_parent, "FINISHED")
    return SimpleNamespace(root=root, uri=uri, rows=rows, sweep_parent=parent, best_run=best_run,
                           study_parent=study_parent, method_runs=method_runs, client=MlflowClient(uri))


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_report")
    assert report.main(["--mlflow-uri", store.uri, "--experiment", "sweep-exp", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def study_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("study_report")
    assert report.main(["--mlflow-uri", store.uri, "--experiment", "method-exp", "--out", str(out)]) == 0
    return out


def test_tidy_frame_matches_the_logged_rows(store, sweep_report, study_report):
    for out, radii in ((sweep_report, RADII), (study_report, STUDY_RADII)):
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
    assert sweep.groupby("role")["run_id"].nunique().to_dict() == {"sweep": 1, "trial": 14}
    best = sweep[sweep["label"] == "test_decrop_best"].iloc[0]  # the best trial's hyperparameters
    assert best["decrop.mixing"] == float(store.client.get_run(store.best_run).data.params["decrop.mixing"])


def test_tables_equal_a_direct_computation(store, sweep_report, study_report):
    table = pd.read_csv(sweep_report / "test_accuracy.csv")
    assert list(table["method"]) == ["none", "baseline", "decrop_default", "decrop_best"]
    for row in table.to_dict("records"):
        rows = store.rows[(store.sweep_parent, f"test_{row['method']}")]
        for r in RADII:
            k = len(certified(rows, r))
            lo, hi = proportion_confint(k, len(rows), alpha=0.05, method="beta")
            assert row[f"r={r:.2f}"] == interval_cell(k / len(rows), lo, hi)

    seeds = pd.read_csv(study_report / "test_accuracy_seeds.csv")
    assert len(seeds) == 2 * 3 and set(seeds["n_seeds"]) == {2}
    for row in seeds.to_dict("records"):
        for r in STUDY_RADII:
            accs = [len(certified(store.rows[(store.method_runs[(row["setting"], s)], f"test_{row['method']}")],
                                  r)) / 40 for s in (0, 1)]
            assert row[f"r={r:.2f}"] == spread_cell(np.mean(accs), np.std(accs, ddof=1))

    trials = pd.read_csv(sweep_report / "trials.csv")
    assert len(trials) == 16 and trials["objective"].notna().sum() == 14
    assert set(trials.loc[trials["objective"].isna(), "note"]) == {"stopped early by ASHA"}
    assert list(trials["epochs"]) == [4] * 14 + [2, 2]  # the last logged epoch
    assert trials["objective"].iloc[0] == pytest.approx(
        store.client.get_run(store.best_run).data.metrics["certify/acr"], abs=1e-4)


def direct_mcnemar(a_rows, b_rows, r):
    a, b = certified(a_rows, r), certified(b_rows, r)
    only_a, only_b = len(a - b), len(b - a)
    return only_a, only_b, binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0


def test_paired_tests_per_seed_and_image_level(store, sweep_report, study_report):
    assert not (sweep_report / "mcnemar.csv").exists() and not (study_report / "mcnemar.csv").exists()
    tests = pd.read_csv(sweep_report / "paired_tests.csv")
    assert set(tests["method"]) == {"decrop_default", "decrop_best"} and set(tests["scope"]) == {"per seed"}
    assert np.allclose(tests["p_holm"], holm(tests["p_value"])) and set(tests["n_tests"]) == {len(tests)}
    for row in tests.itertuples():
        only_m, only_b, p = direct_mcnemar(store.rows[(store.sweep_parent, f"test_{row.method}")],
                                           store.rows[(store.sweep_parent, "test_baseline")], row.radius)
        assert (row.only_method, row.only_baseline) == (only_m, only_b)
        assert row.p_value == pytest.approx(p)
        assert f"certifies {only_m} images at r={row.radius:.2f} that the baseline misses" in row.sentence
        assert f"Holm-adjusted over {len(tests)} tests p={row.p_holm:.2g}" in row.sentence

    tests = pd.read_csv(study_report / "paired_tests.csv")
    assert len(tests) == (2 + 4) * 4  # 2 image-level settings and 4 runs, 4 radii, one DE-CROP label
    assert list(tests["scope"]) == ["image-level"] * 8 + ["per seed"] * 16  # the headline family first
    for scope, family in tests.groupby("scope"):  # each family is Holm-adjusted on its own
        assert np.allclose(family["p_holm"], holm(family["p_value"])) and set(family["n_tests"]) == {len(family)}
    for row in tests[tests["scope"] == "per seed"].itertuples():
        run = store.method_runs[(row.setting, int(row.seed))]
        only_m, only_b, p = direct_mcnemar(store.rows[(run, "test_decrop")], store.rows[(run, "test_baseline")],
                                           row.radius)
        assert (row.only_method, row.only_baseline, row.p_value) == (only_m, only_b, pytest.approx(p))
    for row in tests[tests["scope"] == "image-level"].itertuples():
        # the image, not the (image, seed) pair, is the unit: d_i = mean over seeds of method - baseline
        tables = {s: (store.rows[(store.method_runs[(row.setting, s)], "test_decrop")],
                      store.rows[(store.method_runs[(row.setting, s)], "test_baseline")]) for s in (0, 1)}
        images = sorted({r.idx for pair in tables.values() for rows in pair for r in rows})
        method = np.array([[i in certified(tables[s][0], row.radius) for s in (0, 1)] for i in images])
        baseline = np.array([[i in certified(tables[s][1], row.radius) for s in (0, 1)] for i in images])
        d = method.mean(axis=1) - baseline.mean(axis=1)
        assert (row.n_seeds, row.n_pairs) == (2, 40)
        assert (row.only_method, row.only_baseline) == ((d > 0).sum(), (d < 0).sum())
        assert row.difference_pp == pytest.approx(100 * d.mean())
        assert row.ci_low_pp <= row.difference_pp <= row.ci_high_pp
        assert row.p_value == pytest.approx(image_level_test(method, baseline).p_value)
        assert "Over 2 seeds of the same 40 images, DE-CROP certifies" in row.sentence
    markdown = (study_report / "report.md").read_text()
    section = markdown.split("## Paired tests against the baseline")[1].split("## What drives")[0]
    assert not [line for line in section.splitlines() if line.startswith("|") and "pooled" in line]
    assert "The unit of every paired test is the test image" in markdown
    assert "Image-level tests over the seeds of each setting (8 tests, one Holm family)" in markdown
    assert "Exact McNemar test per seed (16 tests, one Holm family)" in markdown


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


def test_html_embeds_every_figure_and_the_report_is_logged(store, sweep_report, study_report, capsys):
    for out, parent in ((sweep_report, store.sweep_parent), (study_report, store.study_parent)):
        pngs = sorted(p.name for p in out.glob("*.png"))
        html = (out / "report.html").read_text()
        assert len(pngs) >= 2
        assert html.count('<img src="data:image/png;base64,') == len(pngs)
        markdown = (out / "report.md").read_text()
        assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)) == pngs
        logged = {Path(f.path).name for f in store.client.list_artifacts(parent, "report")}
        assert logged == {p.name for p in out.iterdir()}
    sweep_pngs = {p.name for p in sweep_report.glob("*.png")}
    assert {"certified_accuracy.png", "search_history.png", "hyperparameter_effects.png",
            "validation_agreement.png", "factor_validation_decrop_attack.png"} <= sweep_pngs
    assert "factor_test_sigma.png" in {p.name for p in study_report.glob("*.png")}
    assert "No search history: these runs contain no sweep trials." in (study_report / "report.md").read_text()


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
    assert f"{home}/decrop-runs/new/mlflow.db" in out and "loading the runs of method-exp" in out
    assert f"report: reading {home}/decrop-runs/new/mlflow.db, the newest store under {home}/decrop-runs" in out
    assert "| setting" in out  # the headline table
    assert (tmp_path / "reports" / "method-exp" / "report.html").exists()


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
    assert "unknown experiment 'nope'" in err and "'sweep-exp'" in err and "'method-exp'" in err
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


@pytest.mark.parametrize("kind", ["sweep", "study"])
def test_old_stores_give_the_same_tables_as_before(kind, sweep_report, study_report):
    """An older sweep (test labels on its parent) and a method study: every table the report wrote before the
    study sections existed (tests/analysis/golden, from that version on this store) comes out the same; the tidy
    frame only gains the ``kind`` column (run ids differ from store to store)."""
    out = {"sweep": sweep_report, "study": study_report}[kind]
    for golden in sorted((GOLDEN / kind).glob("*.csv")):
        expected, found = pd.read_csv(golden), pd.read_csv(out / golden.name)
        if golden.name == "certified.csv":
            assert set(found["kind"]) <= {"sweep", "search_trial", "method_run"}
            found = found.drop(columns=["run_id", "parent_run_id", "kind"])
        pd.testing.assert_frame_equal(found, expected, check_exact=False, rtol=1e-12)
    markdown = (out / "report.md").read_text()
    assert "## Headline" in markdown and "## Where the time went" in markdown and "## Study" not in markdown
