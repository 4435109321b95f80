"""The report as one self-contained HTML page (figures inlined as base64 PNG, so it can be mailed) and as
Markdown that references the PNG files next to it. Both say the same things in the same order."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import pandas as pd

from .figures import FigureOut
from .stats import Statistics, format_p

TABLE_CAPTIONS = {
    "test_accuracy_seeds": "Certified accuracy (%) on the test images at each l2 radius r, mean ± standard deviation "
                           "over seeds (r = 0: standard accuracy of the smoothed classifier, abstentions wrong); ACR: "
                           "average certified radius.",
    "test_accuracy": "Certified accuracy (%) on the test images at each l2 radius r, per run, with the 95% "
                     "Clopper-Pearson interval over the test images in brackets (r = 0: standard accuracy of the "
                     "smoothed classifier, abstentions counted wrong); ACR: average certified radius.",
    "trials": "The sweep's trials, best objective first: objective = validation ACR (certified on validation "
              "images, never the test images), validation certified accuracy (%) at each radius, the sampled "
              "hyperparameters, and why a trial has no objective.",
}
READING = ("Certified accuracy at r is the fraction of images that the smoothed classifier gets right with a "
           "certified l2 radius of at least r. Intervals are exact 95% Clopper-Pearson intervals over the images of "
           "one run: they cover the uncertainty of a finite test set, not the variation between training seeds "
           "(the ± columns show that). The paired tests use the same test images for both methods, which makes "
           "them far more sensitive than comparing two intervals.")


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


def mcnemar_display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    shown = frame[["scope", "setting", "seed", "run", "method", "radius", "n_pairs", "only_method",
                   "only_baseline"]].copy()
    shown["radius"] = shown["radius"].map("{:.2f}".format)
    shown["p"] = frame["p_value"].map(format_p)
    shown["in words"] = frame["sentence"]
    return shown


def regression_display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    return pd.DataFrame({"parameter": frame["parameter"], "term": frame["term"],
                         "coef": frame["coef"].map("{:+.4f}".format),
                         "95% CI": [f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(frame["ci_low"], frame["ci_high"])],
                         "p": frame["p_value"].map(format_p), "in words": frame["sentence"]})


def _sections(report: Report) -> list[tuple[str, list[tuple[str, object]]]]:
    """(heading, [(kind, content)]) in report order; kinds: text, list, table, figure."""
    names = list(report.tables)
    head = [("text", TABLE_CAPTIONS.get(names[0], "")), ("table", report.tables[names[0]])] if names else [
        ("text", "No table: no certification results.")]
    stats = report.statistics
    paired = ([("text", "Exact McNemar test of each DE-CROP variant against the baseline on certified-at-r "
                        "outcomes of the same test images (only_method: images the method certifies at r and the "
                        "baseline does not; pooled: discordant pairs summed over the runs of a setting)."),
               ("table", mcnemar_display(stats.mcnemar))] if not stats.mcnemar.empty else
              [("text", "No paired test: no run has both a baseline and a DE-CROP test certification.")])
    paired += [("list", stats.mcnemar_notes)] if stats.mcnemar_notes else []
    regression = ([("table", regression_display(stats.regression))] if not stats.regression.empty else [])
    return [
        ("Summary", [("list", report.summary)]),
        ("Headline", head),
        ("Figures", [("figure", f) for f in report.figures]),
        ("Tables", [item for name in names[1:] for item in
                    (("text", TABLE_CAPTIONS.get(name, name)), ("table", report.tables[name]))]),
        ("Paired tests against the baseline", paired),
        ("What drives the objective", regression + [("list", stats.regression_notes)]),
        ("Notes", [("list", report.notes or ["none"])]),
        ("How to read this report", [("text", READING)]),
    ]


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
    for heading, items in _sections(report):
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
    for heading, items in _sections(report):
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
