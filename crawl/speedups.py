"""The crawl's compiled hot loops (``crawl/_speedups.pyx``), or None: where they are not built, stale or off.

The crawl's own time per page (everything but reading the archive and the HTML
parse) is mostly per-image Python; ``_speedups`` runs the common cases of those
rules in C and hands every other case to the Python rules (see its docstring). It
is a speed-up only: every caller has the Python path, and the tests run both.

``pip install -e .`` builds it (setup.py; a C compiler is needed — without one the
install goes on without it), with the page loop that reads Lexbor's tree in C
(``crawl/_lexbor_tree.pxi``) where setup.py could fetch the Lexbor headers of the
installed selectolax, else without. ``WEBCLIP_PURE_PYTHON=1`` switches it off. Where found:

1. next to this file (``pip install -e .`` builds it in place);
2. else in the webclip that pip installed on this machine — a Ray job runs a copy of
   the checkout that Ray uploaded (``infra/ray/runtime_env.yaml``), without builds,
   while the cluster's nodes installed webclip themselves (``infra/ray/cluster.yaml``).

A build is used only if it was compiled from the very sources beside this file
(``SOURCES``: their sha256, recorded at build time by setup.py) and, with the tree
walk, against the very selectolax installed (Lexbor's structs may change between
versions): after an edit, on a node installed from another version, or after
selectolax was upgraded or downgraded, the Python loops run, with a warning, until
``pip install -e .`` rebuilds it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

# What a build is made of, in setup.py's order (its SOURCES): the rules, the tree walk, the two together.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("_speedups.pyx", "_lexbor_tree.pxi",
                                                            "_speedups_lexbor.pyx"))
SOURCE = SOURCES[0]


@functools.cache  # once per process: the warning too
def load() -> ModuleType | None:
    if os.environ.get("WEBCLIP_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from crawl import _speedups as module
    except ImportError:
        module = _installed_build()
    except Exception as error:  # noqa: BLE001 - e.g. selectolax's types changed size under the build
        warnings.warn(f"crawl/_speedups could not be loaded ({type(error).__name__}: {error}): the crawl runs its "
                      "Python loops until it is rebuilt (pip install -e .)", RuntimeWarning, stacklevel=2)
        return None
    if module is None:
        return None
    if not matches(module, SOURCES):
        warnings.warn(f"{module.__file__} was built from other sources than those in {SOURCE.parent} "
                      f"({', '.join(s.name for s in SOURCES)}): the crawl runs its Python loops until it is rebuilt "
                      "(pip install -e .)", RuntimeWarning, stacklevel=2)
        return None
    built, installed = compiled_against(module), selectolax_version()
    if built is None and hasattr(module, "page_images"):  # not built by setup.py: Lexbor's layout unknown
        warnings.warn(f"{module.__file__} reads Lexbor's tree but records no selectolax version (not built by "
                      "setup.py): the crawl runs its Python loops until it is rebuilt (pip install -e .)",
                      RuntimeWarning, stacklevel=2)
        return None
    if built is not None and built != installed:
        warnings.warn(f"{module.__file__} was compiled against selectolax {built}, and {installed} is installed: "
                      "the crawl runs its Python loops until it is rebuilt (pip install -e .)", RuntimeWarning,
                      stacklevel=2)
        return None
    return module


def matches(module: ModuleType, sources: Sequence[Path]) -> bool:
    """Whether ``module`` was compiled from ``sources`` (none of them there, as in a wheel: nothing to compare)."""
    if not any(source.exists() for source in sources):
        return True
    return getattr(module, "SOURCE_SHA256", None) == sources_digest(sources)


def sources_digest(sources: Sequence[Path]) -> str:
    """sha256 of the sources, each with its name and length: setup.py's ``sources_digest``."""
    digest = hashlib.sha256()
    for source in sources:
        data = source.read_bytes() if source.is_file() else None
        digest.update(f"{source.name}\0{-1 if data is None else len(data)}\0".encode())
        digest.update(data or b"")
    return digest.hexdigest()


def compiled_against(module: ModuleType) -> str | None:
    """The selectolax version a build with the tree walk was compiled against; None for a build without it."""
    return getattr(module, "SELECTOLAX_VERSION", None) or None


def selectolax_version() -> str | None:
    try:
        return importlib.metadata.version("selectolax")
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed_build() -> ModuleType | None:
    """``crawl._speedups`` as pip built it on this machine, when this ``crawl/`` is another copy of it."""
    try:
        dist = importlib.metadata.distribution("webclip")
    except importlib.metadata.PackageNotFoundError:
        return None
    names = {f"_speedups{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    candidates = [Path(dist.locate_file(f)) for f in dist.files or () if f.parent.name == "crawl" and f.name in names]
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") and direct_url.get("url", "").startswith("file://"):
        tree = Path(unquote(urlsplit(direct_url["url"]).path))  # an editable install: built in its tree
        candidates += [tree / "crawl" / name for name in sorted(names)]
    for path in candidates:
        if path.is_file() and path.resolve() != SOURCE.with_name(path.name).resolve():
            spec = importlib.util.spec_from_file_location("crawl._speedups", path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError:  # built for another Python
                continue
            return module
    return None
