"""The crawl's compiled hot loops (``crawl/_speedups.pyx``), or None: where they are not built, stale or off.

The crawl's own time per page (everything but reading the archive and the HTML
parse) is mostly per-image Python; ``_speedups`` runs the common cases of those
rules in C and hands every other case to the Python rules (see its docstring). It
is a speed-up only: every caller has the Python path, and the tests run both.

``pip install -e .`` builds it (setup.py; a C compiler is needed — without one the
install goes on without it). ``WEBCLIP_PURE_PYTHON=1`` switches it off. A build older
than its source is not used, with a warning: rebuild with ``pip install -e .``
(``make venv`` does when the .pyx changes).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType


@functools.cache  # once per process: the warning too
def load() -> ModuleType | None:
    if os.environ.get("WEBCLIP_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from crawl import _speedups
    except ImportError:
        return None
    built, source = Path(_speedups.__file__), Path(__file__).with_name("_speedups.pyx")
    if older(built, source):
        warnings.warn(f"{built} is older than {source.name}: using the Python loops until it is rebuilt "
                      "(pip install -e .)", RuntimeWarning, stacklevel=2)
        return None
    return _speedups


def older(built: Path, source: Path) -> bool:
    """Whether ``built`` predates an edit of ``source`` (a source that is not there is not newer)."""
    return source.exists() and source.stat().st_mtime > built.stat().st_mtime

