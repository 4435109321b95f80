"""The report's tables, from the tidy certified-accuracy frame (`analysis.runs.certification_frame`).

Cells are percentages: ``acc [lo, hi]`` with the 95% Clopper-Pearson interval over the test images of one run.
(A study's table, mean and spread over its seeds, is `analysis.studies.accuracy_display`.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tuning.schema import SEARCHED

METHOD_NAMES = {"none": "no denoiser", "baseline": "baseline (Salman et al.)",
                "decrop_default": "DE-CROP (defaults)", "decrop": "DE-CROP", "decrop_best": "DE-CROP (best trial)",
                "decrop_blackbox": "DE-CROP black-box"}
_ORDER = list(METHOD_NAMES)


def method_name(method: str) -> str:
    """How a method key reads in figures and sentences."""
    return METHOD_NAMES.get(method, method)


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: no denoiser, baseline, the DE-CROP variants, then anything else alphabetically."""
    return (_ORDER.index(method), "") if method in _ORDER else (len(_ORDER), method)


def radius_column(radius: float) -> str:
    return f"r={radius:.2f}"


def interval_cell(acc: float, lo: float, hi: float) -> str:
    """``83.0 [74.2, 89.8]``: certified accuracy and its 95% interval, in %."""
    return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rank = frame["method"].map(method_rank)
    return frame.assign(_rank=rank).sort_values([*keys, "_rank"]).drop(columns="_rank").reset_index(drop=True)


def test_table(cert: pd.DataFrame) -> pd.DataFrame:
    """One row per test certification (setting, seed, method): n_images, ``acc [lo, hi]`` at each radius, ACR."""
    test = cert[cert["split"] == "test"]
    records = []
    for (_, _), group in test.groupby(["run_id", "label"], sort=False):
        first = group.iloc[0]
        record = {"setting": first["setting"], "seed": first["seed"], "method": first["method"],
                  "n_images": int(first["n_images"])}
        for row in group.sort_values("radius").itertuples():
            record[radius_column(row.radius)] = interval_cell(row.accuracy, row.ci_low, row.ci_high)
        record["ACR"] = f"{first['acr']:.3f}"
        records.append(record)
    if not records:
        return pd.DataFrame()
    frame = _sorted(pd.DataFrame(records), ["setting", "seed"])
    frame["seed"] = frame["seed"].astype("Int64")
    return _radius_columns_in_order(frame.fillna({c: "" for c in frame.columns if c.startswith("r=")}))


def _radius_columns_in_order(frame: pd.DataFrame) -> pd.DataFrame:
    radii = sorted((c for c in frame.columns if c.startswith("r=")), key=lambda c: float(c[2:]))
    rest = [c for c in frame.columns if not c.startswith("r=") and c != "ACR"]
    return frame[rest + radii + (["ACR"] if "ACR" in frame else [])]


def trials_table(cert: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per search trial, best objective first: trial, status, epochs, objective (validation),
    validation certified accuracy (%) at each radius, the searched hyperparameters, and why trials without
    an objective have none."""
    if trials.empty:
        return pd.DataFrame()
    val = cert[(cert["split"] == "validation") & (cert["role"] == "trial")] if len(cert) else cert
    accuracy = (val.pivot_table(index="run_id", columns="radius", values="accuracy", aggfunc="first")
                if len(val) else pd.DataFrame())
    frame = trials.set_index("run_id")
    out = pd.DataFrame({"trial": frame["trial_id"].fillna(frame["run_name"]), "status": frame["status"],
                        "epochs": frame["epochs"].astype("Int64"), "objective": frame["objective"].round(4)})
    for radius in accuracy.columns:
        out[f"val {radius_column(radius)}"] = (100 * accuracy[radius]).round(1)
    for key in SEARCHED:
        if frame[key].notna().any():
            out[key.removeprefix("decrop.")] = [_short(v) for v in frame[key]]
    out["note"] = frame["why"].fillna("")
    return out.sort_values("objective", ascending=False, na_position="last").reset_index(drop=True)


def _short(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:.3g}" if isinstance(value, float) else value


def tables(cert: pd.DataFrame, trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The report's tables besides the study sections' by file stem, non-empty ones only: ``trials`` (the search's
    trials), ``test_accuracy`` (every run's test certifications, with intervals)."""
    found = {"trials": trials_table(cert, trials), "test_accuracy": test_table(cert)}
    return {name: frame for name, frame in found.items() if not frame.empty}
