"""The report as one self-contained HTML page (figures inlined as base64 PNG, so it can be mailed) and as
Markdown that references the PNG files next to it. Both say the same things in the same order."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import pandas as pd

from .figures import FigureOut
from .stats import Statistics, format_p
from .studies import StudySection
from .timing import time_display

TABLE_CAPTIONS = {
    "test_accuracy": "Certified accuracy (%) on the test images at each l2 radius r, per run, with the 95% "
                     "Clopper-Pearson interval over the test images in brackets (r = 0: standard accuracy of the "
                     "smoothed classifier, abstentions counted wrong); ACR: average certified radius.",
    "trials": "The sweep's trials, best objective first: objective = validation certified agreement averaged "
              "over the radii (certified on validation images, never the test images), validation certified "
              "accuracy (%) at each radius, the sampled hyperparameters, and why a trial has no objective.",
}
READING = ("Certified accuracy at r is the fraction of images that the smoothed classifier gets right with a "
           "certified l2 radius of at least r. Intervals of one run are exact 95% Clopper-Pearson intervals over its "
           "images: they cover the uncertainty of a finite test set, not the variation between training seeds "
           "(the ± columns show that). A study's table averages the seeds image by image and resamples images, so "
           "its interval covers the finite test set for the seed-averaged method (still not other seeds; the ± "
           "shows their spread). The paired tests use the same test images for both arms, which makes them far "
           "more sensitive than comparing two intervals.")

IMPORTANCE_CAPTION = ("Hyperparameter importance by Optuna's own evaluators on the search trials (relative: each "
                      "column sums to 100% over the parameters it assesses).")
REGRESSION_CAPTION = ("OLS regression of the validation objective on the searched hyperparameters (HC3 standard "
                      "errors): the effect of each, with its 95% interval.")
TIME_CAPTION = ("Seconds of each phase summed over the study's trials, per part (durations as text); 'all trials' "
                "adds the study's wall time, from its parent run's start to its end.")


@dataclass
class Report:
    """Everything the renderers show."""

    title: str
    source: str  # the tracking URI
    summary: list[str]  # sentences about what was read
    tables: dict[str, pd.DataFrame]  # headline first
    figures: list[FigureOut]
    statistics: Statistics
    notes: list[str] = field(default_factory=list)  # warnings: runs left out, metric mismatches
    studies: list[StudySection] = field(default_factory=list)  # presets and confirmations: before the rest
    times: pd.DataFrame = field(default_factory=pd.DataFrame)  # analysis.timing.time_table
    time_notes: list[str] = field(default_factory=list)
    search: bool = True  # the runs hold search trials (the objective's sections apply)


def regression_display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    return pd.DataFrame({"parameter": frame["parameter"], "term": frame["term"],
                         "coef": frame["coef"].map("{:+.4f}".format),
                         "95% CI": [f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(frame["ci_low"], frame["ci_high"])],
                         "p": frame["p_value"].map(format_p), "in words": frame["sentence"]})


def importance_display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    return pd.DataFrame({"parameter": frame["parameter"],
                         "PED-ANOVA": frame["ped_anova"].map(lambda v: f"{100 * v:.1f}%"),
                         "fANOVA": frame["fanova"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f}%"),
                         "in words": frame["sentence"]})


def _objective(stats: Statistics) -> list[tuple[str, object]]:
    """Optuna's importance next to the OLS regression, each with its notes."""
    items: list[tuple[str, object]] = []
    if not stats.importance.empty:
        items += [("text", IMPORTANCE_CAPTION), ("table", importance_display(stats.importance))]
    items += [("list", stats.importance_notes)] if stats.importance_notes else []
    if not stats.regression.empty:
        items += [("text", REGRESSION_CAPTION), ("table", regression_display(stats.regression))]
    return items + [("list", stats.regression_notes)]


def sections(report: Report) -> list[tuple[str, list[tuple[str, object]]]]:
    """(heading, [(kind, content)]) in report order; kinds: text, list, table, figure. With study sections
    (presets, confirmations) they come first and carry the headline; the search's sections follow."""
    names = list(report.tables)
    head = [("text", TABLE_CAPTIONS.get(names[0], "")), ("table", report.tables[names[0]])] if names else [
        ("text", "No table: no certification results.")]
    studies = [(s.heading, s.items) for s in report.studies]
    rest = names if studies else names[1:]
    out = [("Summary", [("list", report.summary)]), *(studies or [("Headline", head)])]
    if report.figures or not studies:
        out.append(("Figures", [("figure", f) for f in report.figures]))
    if rest or not studies:
        out.append(("Tables", [item for name in rest for item in
                               (("text", TABLE_CAPTIONS.get(name, name)), ("table", report.tables[name]))]))
    if report.search or not studies:
        out.append(("What drives the objective", _objective(report.statistics)))
    if not report.times.empty:
        out.append(("Where the time went", [("list", report.time_notes), ("text", TIME_CAPTION),
                                             ("table", time_display(report.times))]))
    return out + [("Notes", [("list", report.notes or ["none"])]), ("How to read this report", [("text", READING)])]


def render_html(report: Report) -> str:
    """The report as a self-contained HTML page: every figure inlined as ``data:image/png;base64``."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(report.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}"
             "td:last-child{text-align:left}img{max-width:100%}p.caption{color:#555;font-size:0.9em}</style>",
             "</head><body>", f"<h1>{esc(report.title)}</h1>",
             f"<p>MLflow store: <code>{esc(report.source)}</code></p>"]
    for heading, items in sections(report):
        parts.append(f"<h2>{esc(heading)}</h2>")
        for kind, content in items:
            if kind == "text" and content:
                parts.append(f"<p>{esc(content)}</p>")
            elif kind == "list":
                parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in content) + "</ul>")
            elif kind == "table":
                parts.append(_blank_missing(content).to_html(index=False, border=0, na_rep="",
                                                             float_format="{:.4g}".format))
            elif kind == "figure":
                parts.append(f"<h3>{esc(content.title)}</h3>")
                if content.path is not None:
                    data = base64.b64encode(content.path.read_bytes()).decode("ascii")
                    parts.append(f'<img src="data:image/png;base64,{data}" alt="{esc(content.title)}">')
                parts.append(f"<p class='caption'>{esc(content.caption)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _blank_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing values of non-float columns (<NA>, None) as empty strings; float columns keep NaN (na_rep)."""
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].astype(object).where(out[column].notna(), "")
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; missing values (NaN, <NA>) as empty cells."""
    return frame.astype(object).where(frame.notna(), "").to_markdown(index=False, floatfmt=".4g")


def render_markdown(report: Report) -> str:
    """The report as Markdown; figures are ``![title](<name>.png)`` files in the same folder."""
    lines = [f"# {report.title}", "", f"MLflow store: `{report.source}`", ""]
    for heading, items in sections(report):
        lines += [f"## {heading}", ""]
        for kind, content in items:
            if kind == "text" and content:
                lines += [content, ""]
            elif kind == "list":
                lines += [f"- {x}" for x in content] + [""]
            elif kind == "table":
                lines += [markdown_table(content), ""]
            elif kind == "figure":
                lines += [f"### {content.title}", ""]
                if content.path is not None:
                    lines += [f"![{content.title}]({content.path.name})", ""]
                lines += [content.caption, ""]
    return "\n".join(lines)
