"""The paper's studies as presets: their grids, their configs, and the cluster commands (validated offline)."""

import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from decrop.config import load_config, to_flat  # noqa: E402
from tuning import sweep  # noqa: E402
from tuning.presets import ALL, PRESETS, SEARCH, cluster_command, points, preset_names, resolve  # noqa: E402
from tuning.trainable import StudySettings, trial_config  # noqa: E402


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
