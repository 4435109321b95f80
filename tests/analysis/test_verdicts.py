"""The one rule from a claim's tests to its verdict word (`analysis.verdicts`), on hand-made outcomes."""

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.arms import PRESET, Arm, StudyArms
from analysis.verdicts import (CONTRADICTED, CONTRADICTED_CLAIM, INCONCLUSIVE, NOT_INTERPRETABLE, NOT_REPRODUCED,
                               NOT_TESTED, OPEN, PARTLY, REPRODUCED, SUPPORTED, _rule, verdict)
from decrop.rows import CertRow
from tuning.presets import BETTER, PRESETS, SIMILAR, TREND


def outcomes(*rows: tuple[str, str, float, float]) -> pd.DataFrame:
    """(comparison, outcome, ci_low, ci_high) per test, as fractions."""
    return pd.DataFrame([{"comparison": c, "outcome": o, "ci_low": lo, "ci_high": hi} for c, o, lo, hi in rows])


@pytest.mark.parametrize("rows, word", [
    ([(BETTER, SUPPORTED, 0.02, 0.08), (BETTER, SUPPORTED, 0.03, 0.09)], REPRODUCED),
    ([(BETTER, SUPPORTED, 0.02, 0.08), (BETTER, OPEN, -0.01, 0.09)], PARTLY),
    ([(BETTER, CONTRADICTED, -0.08, -0.02), (BETTER, OPEN, -0.01, 0.09)], CONTRADICTED_CLAIM),
    # no test decides, every interval excludes a 5-point effect in the claimed direction
    ([(BETTER, OPEN, -0.03, 0.04), (TREND, OPEN, -0.04, 0.02)], NOT_REPRODUCED),
    ([(BETTER, OPEN, -0.03, 0.06)], INCONCLUSIVE),  # the interval still holds 5 points
    ([(SIMILAR, OPEN, -0.01, 0.01)], INCONCLUSIVE),  # "no difference" is never shown by non-significance
    ([(BETTER, NOT_INTERPRETABLE, float("nan"), float("nan"))], NOT_TESTED),
])
def test_each_word_follows_from_the_outcomes(rows, word):
    assert _rule(outcomes(*rows))[0] == word


def test_nothing_tested_is_not_tested():
    assert _rule(pd.DataFrame())[0] == NOT_TESTED


@pytest.mark.parametrize("rows, complete, partial", [
    ([(BETTER, SUPPORTED, 0.02, 0.08)], REPRODUCED, INCONCLUSIVE),
    ([(BETTER, OPEN, -0.03, 0.04)], NOT_REPRODUCED, INCONCLUSIVE),
    ([(BETTER, SUPPORTED, 0.02, 0.08), (BETTER, OPEN, -0.01, 0.09)], PARTLY, PARTLY),
    ([(BETTER, CONTRADICTED, -0.08, -0.02)], CONTRADICTED_CLAIM, CONTRADICTED_CLAIM),
])
def test_a_claim_with_comparisons_not_run_is_never_reproduced_nor_not_reproduced(rows, complete, partial):
    """A study under way (or run on fewer levels) speaks only for what ran: "reproduced" and "not reproduced"
    speak for every declared comparison, so they wait; what did run can still support or contradict."""
    assert _rule(outcomes(*rows))[0] == complete
    word, why = _rule(outcomes(*rows), not_run=3)
    assert word == partial and "3 declared comparison(s) not run yet" in why


def test_a_study_under_way_counts_the_declared_comparisons_it_has_not_run():
    """The sigma claim rests on DE-CROP against the baseline at four levels; a study with one level done (a
    strong effect there) is inconclusive, naming the three comparisons not run, not reproduced on one level."""
    judged = verdict(sigma_study(seeds=4), PRESETS["sigma"].claim)
    assert (judged.tests["outcome"] == SUPPORTED).all()  # where it ran, the effect is clear
    assert judged.word == INCONCLUSIVE and "3 declared comparison(s) not run yet" in judged.reason
    assert sum(note.endswith("not run") for note in judged.notes) == 3


def test_two_seeds_are_too_few_for_a_verdict_however_clear_the_effect():
    judged = verdict(sigma_study(seeds=2), PRESETS["sigma"].claim)
    assert (judged.tests["outcome"] == NOT_INTERPRETABLE).all() and judged.tests["p"].isna().all()
    assert set(judged.tests["why"]) == {"2 paired seed(s): a verdict rests on 3 or more"}
    assert judged.word == NOT_TESTED


def sigma_study(seeds: int) -> StudyArms:
    """The sigma study with its first level run: DE-CROP far better than the baseline on every seed."""
    rng = np.random.default_rng(0)
    images = list(range(0, 800, 20))
    hard = rng.uniform(0, 1, len(images))
    arms = {}
    for method, skill in (("decrop", 0.8), ("baseline", 0.4), ("none", 0.2)):
        arm = Arm("0.25", method)
        for seed in range(seeds):
            margins = skill - hard + 0.05 * rng.standard_normal(len(images))
            arm.seeds[seed] = [CertRow(i, i % 10, i % 10, round(min(0.9, m), 4), 1, 0.1, 100)
                               for i, m in zip(images, margins) if m > 0]
            arm.runs[seed] = pd.Series({"params.certify.n": "1000", "params.certify.alpha": "0.001",
                                        "params.sigma": "0.25"})
        arms[("0.25", method)] = arm
    return StudyArms(PRESET, "s", "p", "sigma", "sigma", ["0.25"], arms, [0.0, 0.25, 0.5], [0.0, 0.25, 0.5])


def test_a_study_under_way_names_the_command_that_continues_it():
    """The command is the one the study was started with (its profile, seeds, levels, name), so that the sweep's
    check of a --resume against the parent run's params accepts it."""
    from analysis.arms import resume_command
    from analysis.results import results_markdown
    from analysis.studies import StudySection
    from tuning import sweep
    parent = pd.Series({"status": "RUNNING", "params.profile": "studies", "params.seeds": "[0, 1, 2]",
                        "params.levels": "['0.25', '0.5', '0.12']"})  # as the sweep logs them
    command = resume_command(parent, "studies-sigma", "sigma")
    assert command == ("python tuning/sweep.py --profile studies --preset sigma --seeds 0 1 2 --levels 0.25 0.5 "
                       "0.12 --mlflow-uri STORE --resume")
    args = sweep.parse_args(command.split()[2:])
    assert (str(args.seeds), str(args.levels), args.profile) == (parent["params.seeds"], parent["params.levels"],
                                                                 "studies")
    named = resume_command(pd.Series({**parent, "params.levels": "all"}), "mine", "sigma")
    assert named.endswith("--seeds 0 1 2 --study mine --mlflow-uri STORE --resume")
    overridden = pd.Series({**parent, "params.set": "['train.epochs=40', 'data.name=my images']"})
    with_set = resume_command(overridden, "studies-sigma", "sigma")
    assert "--set train.epochs=40 --set 'data.name=my images'" in with_set
    shelved = resume_command(pd.Series({**parent, "params.shelf": "results"}), "studies-sigma", "sigma")
    assert shelved.endswith("--mlflow-uri STORE --shelf results --resume")
    assert sweep.parse_args(shelved.split()[2:]).shelf == Path("results")
    elsewhere = resume_command(pd.Series({**parent, "params.shelf": "/home/me/shelf"}), "studies-sigma", "sigma")
    assert "--shelf SHELF" in elsewhere and "/home/me" not in elsewhere  # no path of the machine
    assert sweep.parse_args(shlex.split(with_set)[2:]).overrides == ["train.epochs=40", "data.name=my images"]
    claim = PRESETS["sigma"].claim
    section = StudySection("h", [], {}, preset="sigma", claim=claim, verdict=verdict(sigma_study(seeds=3), claim),
                           resume=command)
    page = results_markdown([section], "Provenance: -", "-")
    assert f"The study is not finished; it continues with `{command}`." in page
    assert "the study is under way (its command is below)" in page.split("## The tests of each claim")[0]


def test_every_claim_shows_its_earlier_verdict_as_the_archived_page_gives_it():
    """The results page quotes each claim's verdict under the rules before issue 19: the word must be the one the
    archived page gives that claim's row, and it shows for a waiting claim and beside a judged one."""
    from analysis.results import EARLIER_PAGE, EARLIER_VERDICTS, results_markdown
    from analysis.studies import StudySection
    claims = [name for name, preset in PRESETS.items() if preset.claim is not None]
    assert sorted(EARLIER_VERDICTS) == sorted(claims)
    archive = (Path(__file__).resolve().parents[2] / EARLIER_PAGE).read_text(encoding="utf-8")
    rows = [line.split("|") for line in archive.split("## Verdicts")[1].splitlines() if line.startswith("| ")]
    archived = {cells[1]: re.search(r"\*\*(.+?)\*\*", cells[4]).group(1) for cells in rows if "**" in cells[4]}
    row_of = {"sigma": "(fig 1)", "attack": "(table 1)", "boundary": "(table 2)", "data": "(fig 2,",
              "mixing": "(fig 3)", "denoiser": "(fig 5)", "n_interp": "(fig 6)", "augment": "Augmentation policies",
              "blackbox": "black-box setting"}  # how the archived page names each claim
    for name in claims:
        [word] = [w for cell, w in archived.items() if row_of[name] in cell]
        assert EARLIER_VERDICTS[name].startswith(f"**{word}**"), (name, word)
    claim = PRESETS["sigma"].claim
    section = StudySection("h", [], {}, preset="sigma", claim=claim, verdict=verdict(sigma_study(seeds=3), claim))
    page = results_markdown([section], "Provenance: -", "-")
    summary, details = page.split("## The tests of each claim")
    for name in claims:
        assert EARLIER_VERDICTS[name] in summary
    assert f"Earlier verdict, under the rules before issue 19 (`{EARLIER_PAGE}`): {EARLIER_VERDICTS['sigma']}." in details
