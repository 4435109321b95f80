"""The paper's studies as presets: their grids, their configs, and the cluster commands (validated offline)."""

import shlex
from pathlib import Path

import pytest

from decrop.config import from_flat, load_config, to_flat
from tuning import sweep
from tuning.presets import ALL, PRESETS, SEARCH, cluster_command, points, preset_names, resolve
from tuning.trainable import StudySettings, trial_config

REPO = Path(__file__).resolve().parents[2]


def _settings(profile: str) -> StudySettings:
    base = to_flat(load_config(REPO / "configs" / f"{profile}.yaml"))
    return StudySettings(base=base, storage="/nonexistent", tracking_uri="sqlite:////nonexistent/m.db",
                         experiment="x", parent_run_id="p")


@pytest.mark.parametrize("name", list(PRESETS))
def test_grid_has_every_method_level_and_seed_once(name):
    preset = PRESETS[name]
    grid = points(preset, [0, 1, 2])
    names = [p["name"] for p in grid]
    assert len(names) == len(set(names))  # one trial per point, each named for a human
    levels = list(preset.levels)
    compared = [p for p in grid if p["method"] not in ("baseline", "none")]
    assert {(p["level"], p["seed"]) for p in compared} == {(lv, s) for lv in levels for s in (0, 1, 2)}
    baselines = [p for p in grid if p["method"] == "baseline"]
    references = [p for p in grid if p["method"] == "none"]
    if preset.affects_baseline:  # the factor changes the baseline: one per level and seed, a reference per level
        assert len(baselines) == 3 * len(levels) and len(references) == len(levels)
    else:  # shared by every level: the factor only changes DE-CROP
        assert len(baselines) == 3 and len(references) == 1 and references[0]["level"] is None
    assert all(p["seed"] == 0 for p in references)


@pytest.mark.parametrize("profile", ["quick", "paper"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_point_is_a_valid_config_of_both_profiles(name, profile):
    settings = _settings(profile)
    for point in points(PRESETS[name], [0, 1]):
        flat = trial_config(settings, {"point": point})
        assert flat["seed"] == point["seed"]
        for key, value in point["overrides"].items():
            assert flat[key] == value
        assert flat["methods"] == ([] if point["method"] == "none" else [point["method"]])


def test_preset_names_and_aliases():
    assert resolve("alpha") == "mixing" and resolve("search") == SEARCH and resolve("all") == ALL
    assert set(PRESETS) <= set(preset_names())
    with pytest.raises(ValueError, match="choose one of"):
        resolve("sigmaa")


@pytest.mark.parametrize("name", [*PRESETS, SEARCH])
def test_cluster_command_of_the_paper_profile_validates_offline(name, monkeypatch):
    """The command docs/results.md gives for CIFAR-10 on a GPU cluster: its arguments parse and check, and the
    paper profile with its overrides is a valid config (no cluster, no dataset needed)."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # submitted to a cluster: no local GPU check
    command = shlex.split(cluster_command(name))
    args = sweep.parse_args(command[command.index("tuning/sweep.py") + 1:])
    assert args.profile == "paper" and args.gpus_per_worker == 1
    preset = resolve(args.preset)
    cfg = load_config(REPO / "configs" / f"{args.profile}.yaml", args.overrides)
    assert cfg.data.dataset == "cifar10"
    assert sweep.check_args(args, cfg, preset) is None


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.claim is not None])
def test_every_claim_is_declared_on_what_its_grid_runs(name):
    """A claim's comparisons name levels of its preset, methods its grid trains and radii the quick profile
    certifies; "similar" claims carry a margin, and the quote is the paper's (the supplementary where it says so)."""
    from tuning.presets import SAME_LEVEL, SIMILAR, TREND

    preset = PRESETS[name]
    grid = points(preset, [0, 1])
    trained = {(p["method"], p["level"]) for p in grid}
    radii = set(load_config(REPO / "configs" / "quick.yaml").certify.radii)
    for comparison in preset.claim.comparisons:
        assert set(comparison.levels) <= set(preset.levels)
        assert set(comparison.radii) <= radii
        for level in comparison.levels:
            assert (comparison.arm, level) in trained
            ref_level = level if comparison.reference_level == SAME_LEVEL else comparison.reference_level
            assert (comparison.reference, ref_level) in trained or (comparison.reference, None) in trained
        if comparison.kind == SIMILAR:
            assert 0 < comparison.margin <= 0.05
        if comparison.kind == TREND:
            assert len(comparison.levels) >= 3 and len(comparison.radii) == 1
    supplementary = REPO.parent / "shared" / "paper" / "decrop-supplementary.md"
    if preset.claim.source.startswith("supplementary") and supplementary.exists():
        # verbatim: its first words stand in the supplementary as they are (formulas aside)
        opening = " ".join(preset.claim.quote.split()[:6])
        assert opening in " ".join(supplementary.read_text().replace("*", "").split())


def test_the_data_study_runs_every_k_and_validates_k_100_on_a_holdout():
    preset = PRESETS["data"]
    assert preset.levels == (1, 5, 10, 20, 100)
    assert preset.overrides(100)["data.val_source"] == "holdout" and "data.val_source" not in preset.overrides(1)
    assert all(preset.overrides(k)["sigma"] == 0.5 for k in preset.levels)


def test_the_budget_study_gives_both_methods_the_same_steps():
    preset = PRESETS["budget"]
    settings = _settings("quick")
    for point in points(preset, [0]):
        if point["method"] == "none":
            continue
        cfg = from_flat(trial_config(settings, {"point": point}))
        assert sum(cfg.stage_epochs(point["method"])) == point["level"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_grid_runs_level_by_level_and_seed_by_seed(name):
    """A study stopped part way holds complete seed pairs: every arm of a (level, seed) comes before the next
    seed's, and every level's arms before the next level's."""
    preset = PRESETS[name]
    grid = points(preset, [0, 1, 2])
    order = [(list(preset.levels).index(p["level"]) if p["level"] is not None else 0, p["seed"])
             for p in grid if p["method"] != "none"]
    assert order == sorted(order)
