"""The MLflow schema of a study, in one place: what `tuning/` writes and `analysis/` reads.

Run roles and tags, metric and parameter names, the search space with its scales and casts, and what makes a
file an MLflow store. The writer (`tuning.tracking`, `tuning.trainable`, `tuning.sweep`) and the reader
(`analysis/`) both import it; the reader imports nothing else of `tuning/` but the study declarations
(`tuning.presets`). Pure Python: the sweep checks its arguments with it before importing mlflow, ray or torch.

Layout (docs/architecture.md): one experiment per study; one *parent* run per study (`ROLE_TAG` = `SWEEP_ROLE`
for the search, `PRESET_ROLE` for one of the paper's studies); one nested child run per Tune trial
(`TRIAL_ROLE`, `PARENT_TAG`, `TRIAL_TAG`) holding the trial's flat config as params (a parent's as
``base.<key>``), its data budget as ``budget.<key>``, ``train/*``, ``val/*`` and certification metrics
(`metric_key`), and the certification rows, curve, config and weights as artifacts.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------- runs

STUDY_TAG, ROLE_TAG, TRIAL_TAG, COMMIT_TAG = "decrop.study", "decrop.role", "decrop.trial_id", "decrop.git_commit"
SWEEP_ROLE, PRESET_ROLE, TRIAL_ROLE = "sweep", "preset", "trial"
PARENT_ROLES = (SWEEP_ROLE, PRESET_ROLE)
# What a trial is, for grouping the runs table: the preset (the paper's study, or "search"), its factor (the varied
# config key), the factor's level, the method, the seed, and for the search's confirmation which configuration.
PRESET_TAG, FACTOR_TAG, LEVEL_TAG, METHOD_TAG, SEED_TAG, VARIANT_TAG = (
    "decrop.preset", "decrop.factor", "decrop.level", "decrop.method", "decrop.seed", "decrop.variant")
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI folds child runs under their parent
BEST_TRIAL_TAG = "decrop.best_trial_id"  # on a search's parent: the trial the search chose
RESULT_TAG = "decrop.trial_result"  # the final result a trial reported to Tune, as JSON: proof it finished
REUSED_TAG = "decrop.reused_from"  # a trial that took another study's result (tuning.trial_cache): its source
WEIGHTS_TAG = "decrop.weights"  # on a trial that took a shelved result: `NOT_KEPT`
NOT_KEPT = "not kept: a result from the shelf (tuning.trial_cache), rows and curves only"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# A trial's attempts: `trial/attempts` = n at step n when attempt n starts (Tune retries a failed trial, a resumed
# study reruns an unfinished one), `trial/failed_attempts` = n at step n when failure n ends one (its last error line
# in the tag `decrop.failure_<n>`). The run of a trial is one run across all of them.
ATTEMPTS_METRIC, FAILURES_METRIC, FAILURE_TAG = "trial/attempts", "trial/failed_attempts", "decrop.failure_"

# -------------------------------------------------------------------------------------------------- params

BASE_PREFIX = "base."  # a parent's params: the profile's flat config
BUDGET_PREFIX = "budget."  # a trial's data budget (decrop.prepare.Prepared.budget)

# ------------------------------------------------------------------------------------------------- metrics

VALIDATION_LABEL = "validation"  # the search's certification of validation images: metrics certify/...
OBJECTIVE_METRIC = "certify/objective"  # the search's objective (tuning.trainable.validation_objective)
EPOCH_PREFIXES = ("train/", "val/")  # a trial's per-epoch metrics (its learning curves), logged at step = epoch
AGREEMENT_METRIC = "val/agreement"  # the per-epoch validation agreement (ASHA's metric; the learning curves)
CURVE_STEPS_PER_UNIT = 100  # certify*/curve: one step per hundredth of radius
TEST_CURVE_METRIC = "certify_test/curve"  # every method's test curve under one name (the chart view overlays it)
CERT_METRIC = re.compile(r"^certify(?:_(?P<label>[\w\-]+))?/(?:acc_r(?P<radius>\d+(?:\.\d+)?)|acr)$")


def certification_prefix(label: str) -> str:
    """The metric prefix of a certification label: ``certify`` for "validation" (a trial's objective),
    ``certify_<label>`` otherwise (``certify_test_baseline``); metrics are ``<prefix>/acc_r{r:.2f}`` and
    ``<prefix>/acr``."""
    return "certify" if label == VALIDATION_LABEL else f"certify_{label}"


def metric_key(label: str, radius: float) -> str:
    """The metric of certified accuracy of `label` at `radius`."""
    return f"{certification_prefix(label)}/acc_r{radius:.2f}"


def acr_key(label: str) -> str:
    """The metric of the average certified radius of `label`."""
    return f"{certification_prefix(label)}/acr"


# -------------------------------------------------------------------------------------------- search space

@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a float range (``log``: sampled and analysed on a log scale) or categorical
    `choices`; ``only_if`` names a boolean parameter that must be True for this one to exist. `name` is the
    config's dotted key (``stage2`` is the one that is not: it splits the epoch budget, `tuning.space`)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    only_if: str | None = None

    @property
    def scale(self) -> str:
        """``category``, ``log`` or ``linear``: how analysis reads it (log ones as log10)."""
        return "category" if self.choices is not None else "log" if self.log else "linear"

    def cast(self, text: str | None) -> Any:
        """The typed value of `text` as MLflow stores it (a string): a float, or the type of the choices (a value
        outside them too: a study may set one with --set); ``2.0`` reads 2 for an int (pandas makes an int
        column float next to a NaN). None for None or text that is not of that type."""
        kind = float if self.choices is None else type(self.choices[0])
        if text is None:
            return None
        if kind is bool:
            return {"True": True, "False": False}.get(str(text))
        try:
            return kind(float(text)) if kind is int else kind(text)
        except ValueError:
            return None


SPACE: tuple[Param, ...] = (
    Param("decrop.mixing", 0.2, 0.95),  # the paper's alpha, the mixing coefficient of the interpolated samples
    Param("decrop.w_cs", 0.25, 16.0, log=True),
    Param("decrop.w_mmd", 0.25, 16.0, log=True),
    Param("decrop.n_interp", choices=(1, 2, 5)),
    Param("decrop.attack", choices=("pgd", "autoattack", "deepfool", "none")),  # the paper's attacks, or none
    Param("stage2", choices=(True, False)),  # whether stage 2 (the domain discriminator) runs
    Param("decrop.beta_scale", 0.25, 4.0, log=True, only_if="stage2"),  # its gradient-reversal schedule
    Param("decrop.beta_gamma", 2.0, 20.0, log=True, only_if="stage2"),
)
PARAMS: dict[str, Param] = {p.name: p for p in SPACE}  # in the order they are suggested
SEARCHED: dict[str, str] = {p.name: p.scale for p in SPACE}  # name -> scale


# --------------------------------------------------------------------------------------------------- store
# Where a store lives, as text: the default local store, local paths made absolute, passwords redacted (pure
# string and path work: the sweep checks its arguments and prints its errors with these before importing mlflow).

def default_tracking_uri(root: Path) -> str:
    """``sqlite:///<root>/mlflow.db``, absolute. MLflow 3.17's own default is relative to the current directory,
    and Ray moves workers into trial folders, which would scatter the runs over several stores."""
    return f"sqlite:///{(Path(root).expanduser().resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(uri: str | None, root: Path) -> str:
    """The given tracking URI with any local path made absolute, or `default_tracking_uri(root)` when None/empty.

    ``http(s)://`` and other remote URIs pass unchanged; ``sqlite:///rel.db`` and plain paths are resolved against
    the current directory *now* (in the driver), before Ray changes it. A plain path ending in ``.db`` means a SQLite
    store; any other path is a ``file:`` store (which MLflow 3.17 refuses unless explicitly allowed).
    """
    if not uri:
        return default_tracking_uri(root)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") else f"sqlite:///{Path(path).resolve().as_posix()}"
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].removeprefix("//")).expanduser().resolve().as_uri()
    if "://" in uri:
        return uri
    path = Path(uri).expanduser().resolve()
    return f"sqlite:///{path.as_posix()}" if path.suffix == ".db" else path.as_uri()


# The password of `scheme://user:password@host` anywhere in a text (a URI, or an error message quoting one), and
# the values of query parameters that carry secrets (`?token=...`). Like urllib, the user part ends at the last
# '@' before the path, so an unencoded '@' in a password is hidden too.
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):[^\s/]*@")
_SECRET_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|access_token|secret|api_key)=)[^&#\s]*",
                           re.IGNORECASE)


def redact_uri(text: str) -> str:
    """`text` (a tracking URI, or any message that may quote one) with every URI password and secret query value
    replaced by ``***``: ``http://user:pw@host:5000`` -> ``http://user:***@host:5000``. Use it wherever a URI is
    printed, written into a report or put into an error message; connect with the original."""
    return _SECRET_QUERY.sub(r"\g<head>***", _URI_PASSWORD.sub(r"\g<head>:***@", str(text)))



SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
MLFLOW_TABLES = ("alembic_version", "experiments", "runs")  # what makes a SQLite file an MLflow store


class StoreError(ValueError):
    """A file that is not an MLflow store (or not one of this platform's); the message names the fix."""


def check_mlflow_sqlite(path: Path, fix: str) -> bool:
    """Whether the SQLite file at `path` holds runs of this platform (a `ROLE_TAG` tag), after checking,
    read-only, that it is an MLflow store at all: the SQLite header, then MLflow's ``alembic_version``,
    ``experiments`` and ``runs`` tables. StoreError (ending with `fix`) for anything else: MLflow would turn it
    into a store (a 0-byte file becomes one; another application's database gains MLflow's tables)."""
    if not path.is_file():
        raise StoreError(f"{path} is not a file, so not an MLflow store; {fix}")
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        what = "an empty file (0 bytes)" if not header else "not a SQLite database"
        raise StoreError(f"{path} is {what}, not an MLflow store; {fix}")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)  # mode=ro: SQLite never writes
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in MLFLOW_TABLES if t not in tables]
            if missing:
                raise StoreError(f"{path} is a SQLite database but not an MLflow store (no "
                                 f"{', '.join(missing)} table); {fix}")
            ours = "tags" in tables and con.execute("SELECT 1 FROM tags WHERE key = ? LIMIT 1",
                                                    (ROLE_TAG,)).fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error as err:
        raise StoreError(f"cannot read {path} as a SQLite database ({err}); {fix}") from None
    return ours
