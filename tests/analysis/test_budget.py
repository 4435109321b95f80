"""The training-budget study's reading of learning curves (analysis.budget)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.budget import convergence_table, converged_epoch, end_below_best, off_plateau


def test_a_saturating_curve_converges_where_it_reaches_its_plateau():
    epochs = np.arange(1, 201)
    values = 0.8 - 0.4 * np.exp(-epochs / 20)  # within 0.01 of 0.8 from 20 * ln(40) = 73.8 on
    epoch, plateau = converged_epoch(epochs, values)
    assert plateau == pytest.approx(0.8, abs=1e-3)
    assert 72 <= epoch <= 80  # the trailing mean lags the curve by about two epochs


def test_a_curve_still_rising_converges_only_at_its_end():
    epochs = np.arange(1, 101)
    epoch, _ = converged_epoch(epochs, 0.002 * epochs)  # +0.2 points per epoch, no plateau
    assert epoch == 100


def test_noise_around_a_plateau_does_not_delay_convergence():
    rng = np.random.default_rng(0)
    epochs = np.arange(1, 121)
    values = np.minimum(0.5 + 0.01 * epochs, 0.7) + rng.normal(0, 0.003, len(epochs))
    epoch, _ = converged_epoch(epochs, values)
    assert 18 <= epoch <= 25


def test_convergence_table_reads_each_methods_longest_budget():
    rows = []
    for method, rate in (("baseline", 60.0), ("decrop", 10.0)):
        for level, total in (("20", 20), ("100", 100)):
            for seed in (0, 1):
                for epoch in range(1, total + 1):
                    rows.append({"method": method, "level": level, "seed": seed, "epoch": epoch,
                                 "value": 0.7 - 0.3 * np.exp(-epoch / rate)})
    table = convergence_table(pd.DataFrame(rows)).set_index("method")
    assert table.loc["decrop", "converged_at"] < 60 and table.loc["baseline", "converged_at"] == 100
    assert table.loc["baseline", "epochs"] == 100 and table.loc["baseline", "seeds"] == 2
    assert table.loc["decrop", "at_epoch_20"] == pytest.approx(0.7 - 0.3 * np.exp(-2))


def _curves(method, level, seeds, values):
    return pd.DataFrame([{"method": method, "level": level, "seed": s, "epoch": e + 1, "value": v + 0.002 * s}
                         for s in seeds for e, v in enumerate(values)])


def test_an_arm_certified_after_a_late_switch_is_flagged_off_its_plateau():
    """DE-CROP's stage 2 restarted Adam-then-SGD 15 epochs before the end of 260 (the sigma rerun): its curve
    fell from its plateau and had not come back. A curve that ends on its plateau, or still rising, is not
    flagged; the flag names the arm by its level."""
    rng = np.random.default_rng(0)
    flat = 0.85 - 0.3 * np.exp(-np.arange(260) / 20) + rng.normal(0, 0.004, 260)
    dipped = flat.copy()
    dipped[245:] -= 0.03
    rising = 0.5 + 0.3 * np.arange(260) / 260
    drop, epoch, window = end_below_best(np.arange(1, 261), dipped)
    assert window == 13 and 0.02 < drop < 0.04 and 130 <= epoch <= 245  # its best lies before the dip
    assert end_below_best(np.arange(1, 261), flat)[0] < 0.01
    assert end_below_best(np.arange(1, 261), rising)[0] == 0.0
    curves = pd.concat([_curves("decrop", "0.25", [0, 1, 2], dipped), _curves("baseline", "0.25", [0, 1, 2], flat),
                        _curves("decrop", "0.5", [0, 1], rising)])
    study = SimpleNamespace(level_name=lambda level: f"sigma={level}")
    found = off_plateau(study, curves)
    assert list(found) == [("0.25", "decrop")]
    assert found[("0.25", "decrop")].startswith("DE-CROP at sigma=0.25: its validation agreement (mean over 3 seeds)")
