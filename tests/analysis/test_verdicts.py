"""The one rule from a claim's tests to its verdict word (`analysis.verdicts`), on hand-made outcomes."""

import pandas as pd
import pytest

from analysis.verdicts import (CONTRADICTED, CONTRADICTED_CLAIM, INCONCLUSIVE, NOT_INTERPRETABLE, NOT_REPRODUCED,
                               NOT_TESTED, OPEN, PARTLY, REPRODUCED, SUPPORTED, _rule)
from tuning.presets import BETTER, SIMILAR, TREND


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
