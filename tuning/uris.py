"""Tracking URIs as text: the default local store, local paths made absolute, passwords redacted.

Pure string and path work, no mlflow import: `tuning/sweep.py` checks its arguments and prints its errors with
these before importing anything heavy. `tuning.tracking` builds on them.
"""

from __future__ import annotations

import re
from pathlib import Path


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
