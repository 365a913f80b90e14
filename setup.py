"""The one compiled module: ``crawl._speedups`` (the crawl's per-image rules and page checks).

Everything else is in pyproject.toml. The extension is optional: where it cannot be
built (no C compiler), the install goes on and crawl/extract.py runs its Python loop,
which gives the same pairs (tests/test_crawl_extract.py runs both).

It is built one of two ways, from the same sources:

* **with the Lexbor tree walk** (crawl/_speedups_lexbor.pyx: crawl/_speedups.pyx and
  crawl/_lexbor_tree.pxi): the page loop reads the parsed tree in C, through
  selectolax's ``.pxd`` and the C headers of the Lexbor inside the installed selectolax.
  Its wheel ships no headers, so they are taken from that very version's sdist: the
  file ``WEBCLIP_SELECTOLAX_SDIST`` names, else the one the package index lists for it
  (``PIP_INDEX_URL``, else PyPI; its simple API, the one pip reads; its sha256 checked
  against the index's and, for a version in ``KNOWN_SDISTS``, the published one), ~3.6 MB,
  once: only the headers are kept, under build/, for the next build. Nothing is linked: the walk reads Lexbor's structs and uses
  its header-inline helpers and constants only. Only ``build_ext`` asks for them (not
  the metadata steps).
* **without it** (crawl/_speedups.pyx alone) where the headers cannot be had (offline,
  no such sdist, ``PIP_NO_INDEX`` set, ``WEBCLIP_SELECTOLAX_SDIST=none``) or that build
  fails (no C compiler: then crawl/ runs its Python loop): the compiled
  rules over selectolax's Python nodes. pip shows why with ``-v``.

The module records the sha256 of its sources and the selectolax version it was
compiled against: crawl/speedups.py uses a build only with those very sources beside
it and that very selectolax installed (pyproject.toml pins it, build and run alike).
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent
RULES = "crawl/_speedups.pyx"  # the build without the tree walk
WITH_TREE = "crawl/_speedups_lexbor.pyx"  # RULES and TREE: the build with it
TREE = "crawl/_lexbor_tree.pxi"
SOURCES = (RULES, TREE, WITH_TREE)  # what either build is made of, for its digest
SDIST_VARIABLE = "WEBCLIP_SELECTOLAX_SDIST"  # a selectolax sdist to take the headers from; "none": build without
# What the walk includes (and selectolax's .pxd): their presence says the headers are all there.
NEEDED_HEADERS = ("lexbor/html/html.h", "lexbor/dom/interfaces/element.h", "lexbor/dom/interfaces/attr_res.h",
                  "lexbor/tag/const.h", "lexbor/ns/const.h", "lexbor/core/hash.h", "lexbor/selectors/selectors.h")
# The sdists whose headers a build may download, by version: their sha256 as published, checked besides the
# index's own (which comes from the same server as the file). Raise with the selectolax pin (pyproject.toml).
KNOWN_SDISTS = {"1.0.2": "f0508ad927aa426425d4aa7a2bb2f8b21c01412534465bd227e241d4d0a6a418"}
INDEX = "https://pypi.org/simple"  # PIP_INDEX_URL overrides it, as for pip


def _run_time_checks():
    """crawl/speedups.py, loaded by path (it needs the standard library only): what a build records is what it
    checks at run time, computed by the same code."""
    spec = importlib.util.spec_from_file_location("webclip_setup_speedups", ROOT / "crawl" / "speedups.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHECKS = _run_time_checks()
selectolax_version = _CHECKS.selectolax_version  # the selectolax this build compiles against (a build requirement)


def sources_digest() -> str:
    """sha256 of the sources, as crawl/speedups.py compares it with the built module's."""
    return _CHECKS.sources_digest([ROOT / name for name in SOURCES])


def lexbor_headers(version: str, cache_root: Path = ROOT / "build") -> tuple[Path | None, str]:
    """``(include folder, where from)`` of the Lexbor headers of selectolax ``version``, or ``(None, why not)``."""
    cache = cache_root / f"selectolax-{version}-lexbor-headers"
    choice = os.environ.get(SDIST_VARIABLE, "").strip()
    if choice.lower() in ("none", "0", "off", "no"):
        return None, f"{SDIST_VARIABLE}={choice}"
    if _complete(cache):
        return cache, f"{(cache / 'FROM').read_text().strip()}, kept in {cache}"
    try:
        if choice:
            origin, data = choice, Path(choice).read_bytes()
        elif os.environ.get("PIP_NO_INDEX", "").strip().lower() not in ("", "0", "false", "no", "off"):
            return None, "PIP_NO_INDEX is set: no index to fetch selectolax's sdist from"
        else:
            origin, data = download_sdist(version)
        extract_headers(data, version, cache, origin)
    except Exception as error:  # noqa: BLE001 - any failure means: build without the walk, and say why
        return None, f"no Lexbor headers for selectolax {version} ({type(error).__name__}: {error})"
    return cache, origin


def _complete(cache: Path) -> bool:
    """Whether ``cache`` holds a finished extraction (its ``FROM`` is written last) with every needed header."""
    return (cache / "FROM").is_file() and all((cache / name).is_file() for name in NEEDED_HEADERS)


def public(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


FETCH_TRIES, FETCH_PAUSE_S = 3, 2.0  # as pip retries: a dropped connection must not cost the walk


def _fetch(request: urllib.request.Request, timeout: float) -> tuple[bytes, str]:
    """``(body, content type)`` of one request, tried ``FETCH_TRIES`` times over network errors."""
    for attempt in range(1, FETCH_TRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                kind = response.headers.get("Content-Type", "") if hasattr(response, "headers") else ""
                return response.read(), kind
        except OSError:  # URLError, a reset or a timeout: again, unless this was the last try
            if attempt == FETCH_TRIES:
                raise
            time.sleep(FETCH_PAUSE_S * attempt)
    raise AssertionError("unreachable")


def download_sdist(version: str, timeout: float = 60) -> tuple[str, bytes]:
    """``(url, bytes)`` of selectolax ``version``'s sdist from the package index, its sha256 checked.

    The index's simple API (PEP 691 JSON, else PEP 503 HTML with ``#sha256=`` fragments),
    where pip finds it too.
    """
    index = (os.environ.get("PIP_INDEX_URL") or INDEX).rstrip("/")
    credentials = urllib.parse.urlsplit(index)
    auth = {}  # an index URL's user:password (a private mirror): sent as pip sends it, kept out of URLs and messages
    if credentials.username is not None:
        token = f"{urllib.parse.unquote(credentials.username)}:{urllib.parse.unquote(credentials.password or '')}"
        auth = {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}
        index = public(index)

    def headers_for(url: str) -> dict[str, str]:
        return auth if urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(index).netloc else {}

    listing_url = f"{index}/selectolax/"
    request = urllib.request.Request(
        listing_url, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", **auth})
    body, kind = _fetch(request, timeout)
    name = f"selectolax-{version}.tar.gz"
    found = None
    if "json" in kind or body[:1] == b"{":
        for entry in json.loads(body).get("files", ()):
            if entry.get("filename") == name:
                found = urllib.parse.urljoin(listing_url, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        for href in re.findall(r'href="([^"]+)"', body.decode("utf-8", "replace")):
            url, _, fragment = html.unescape(href).partition("#")
            if url.rsplit("/", 1)[-1] == name:
                found = urllib.parse.urljoin(listing_url, url), fragment.partition("sha256=")[2] or None
    if found is None:
        raise LookupError(f"{public(listing_url)} lists no {name}")
    url, expected = found
    if not expected:
        raise ValueError(f"{public(listing_url)} gives no sha256 for {name}")
    known = KNOWN_SDISTS.get(version)
    if known is not None and expected != known:
        raise ValueError(f"{public(listing_url)} gives sha256 {expected} for {name}, published as {known}")
    if not url.startswith("https://"):
        raise ValueError(f"not an https URL: {public(url)}")
    data, _ = _fetch(urllib.request.Request(url, headers=headers_for(url)), timeout)
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{public(url)}: sha256 {hashlib.sha256(data).hexdigest()}, the index says {expected}")
    return public(url), data


def extract_headers(sdist: bytes, version: str, cache: Path, origin: str) -> None:
    """The ``lexbor/source/**/*.h`` of a selectolax ``version`` sdist into ``cache`` (as ``lexbor/...``)."""
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:*") as archive:
        headers: dict[PurePosixPath, bytes] = {}
        found_version = None
        for member in archive:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 2:
                continue
            if parts[1:] == ("PKG-INFO",):
                for line in archive.extractfile(member).read().decode("utf-8", "replace").splitlines():
                    if line.startswith("Version:"):
                        found_version = line.partition(":")[2].strip()
                        break
            elif len(parts) > 4 and parts[1:3] == ("lexbor", "source") and parts[-1].endswith(".h"):
                if any(part in ("", ".", "..") or "\\" in part for part in parts[3:]):
                    raise ValueError(f"an odd path in the sdist: {member.name}")
                headers[PurePosixPath(*parts[3:])] = archive.extractfile(member).read()
    if found_version != version:
        raise ValueError(f"{origin} is selectolax {found_version}, not {version}")
    missing = [name for name in NEEDED_HEADERS if PurePosixPath(name) not in headers]
    if missing:
        raise ValueError(f"{origin} holds no {', '.join(missing)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        for name, data in headers.items():
            target = staging.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (staging / "FROM").write_text(f"{origin}\n")
        shutil.rmtree(cache, ignore_errors=True)
        try:
            staging.rename(cache)
        except OSError:
            if not _complete(cache):  # else a build beside this one has just put the same headers there
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def say(message: str) -> None:
    print(f"webclip setup.py: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # setuptools runs this file so; tests import the helpers above
    from Cython.Build import cythonize
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    DIRECTIVES = {"language_level": 3}
    # The module carries the sha256 of the sources it was built from: crawl/speedups.py uses a build only
    # with the very sources beside it (after an edit, or on a cluster node installed from another version).
    MACROS = [("WEBCLIP_SPEEDUPS_SOURCE", f'"{sources_digest()}"')]

    def rules_only() -> Extension:
        [extension] = cythonize([Extension("crawl._speedups", [RULES], optional=True, define_macros=MACROS)],
                                compiler_directives=DIRECTIVES, quiet=True)
        return extension

    def with_tree() -> Extension | None:
        version = selectolax_version()
        if version is None:
            say("built without the Lexbor tree walk: selectolax is not installed where this builds")
            return None
        include, origin = lexbor_headers(version)
        if include is None:
            say(f"built without the Lexbor tree walk: {origin}. crawl/ takes selectolax's nodes instead (slower); "
                f"{SDIST_VARIABLE}=/path/to/selectolax-{version}.tar.gz builds it offline")
            return None
        try:
            [extension] = cythonize(
                [Extension("crawl._speedups", [WITH_TREE], optional=True, include_dirs=[str(include)],
                           define_macros=[*MACROS, ("WEBCLIP_SELECTOLAX_VERSION", f'"{version}"')])],
                compiler_directives=DIRECTIVES, quiet=True)
        except Exception as error:  # noqa: BLE001 - e.g. selectolax's .pxd not found or changed
            say(f"built without the Lexbor tree walk: Cython failed on {WITH_TREE} ({error})")
            return None
        say(f"building with the Lexbor tree walk: selectolax {version}, headers from {origin}")
        return extension

    class BuildExt(build_ext):
        """crawl._speedups with the tree walk where the headers can be had, else without; a build with it
        that fails to compile is built again without it."""

        def run(self):
            for ext in self.extensions:
                if ext.name == "crawl._speedups":
                    take(ext, with_tree() or rules_only())
            super().run()

        def build_extension(self, ext):
            if WITH_TREE not in {Path(source).with_suffix(".pyx").as_posix() for source in ext.sources}:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - a compiler or linker error
                say(f"the Lexbor tree walk did not compile ({error}): building without it")
                take(ext, rules_only())
                return super().build_extension(ext)

    def take(ext: Extension, built: Extension) -> None:
        """``built``'s sources and flags on ``ext``, the extension setuptools set up (its own fields kept)."""
        ext.sources, ext.include_dirs, ext.define_macros = built.sources, built.include_dirs, built.define_macros

    # Decided in build_ext (BuildExt.run): the metadata steps neither fetch headers nor run Cython.
    # depends: the walk's sources go into an sdist too (setuptools ships an extension's depends).
    setup(ext_modules=[Extension("crawl._speedups", [RULES], optional=True, depends=[TREE, WITH_TREE])],
          cmdclass={"build_ext": BuildExt})
