"""setup.py's part in crawl/_speedups: the Lexbor headers its tree walk is compiled with, and the build without.

The build itself is exercised by every test of tests/test_crawl_extract.py that runs the
compiled loops; here, the helpers that decide which build it is, without compiling.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath

import pytest

from crawl import speedups

REPO = Path(__file__).resolve().parents[1]
VERSION = "1.0.2"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its helpers, without running setup() (that needs Cython)."""
    spec = importlib.util.spec_from_file_location("webclip_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdist(setup_py, version: str = VERSION, *, skip: tuple[str, ...] = (), extra: dict[str, bytes] | None = None,
          top: str | None = None) -> bytes:
    """A selectolax sdist as far as setup.py reads one: PKG-INFO and headers under lexbor/source/."""
    top = top or f"selectolax-{version}"
    files = {f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: selectolax\nVersion: {version}\n".encode(),
             f"{top}/lexbor/source/lexbor/core/lexbor.c": b"int not_a_header;\n",
             f"{top}/selectolax/lexbor.pxd": b"# not a header\n"}
    for name in setup_py.NEEDED_HEADERS:
        if name not in skip:
            files[f"{top}/lexbor/source/{name}"] = f"/* {name} */\n".encode()
    files.update(extra or {})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_build_digest_is_the_one_crawl_speedups_checks(setup_py):
    assert setup_py.sources_digest() == speedups.sources_digest(speedups.SOURCES)
    assert [REPO / name for name in setup_py.SOURCES] == list(speedups.SOURCES)
    module = speedups.load()
    if module is not None:  # built here: from these very sources
        assert module.SOURCE_SHA256 == setup_py.sources_digest()


def test_headers_from_a_local_sdist_are_kept_for_the_next_build(setup_py, tmp_path, monkeypatch):
    path = tmp_path / f"selectolax-{VERSION}.tar.gz"
    path.write_bytes(sdist(setup_py))
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, str(path))
    include, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include == tmp_path / "build" / f"selectolax-{VERSION}-lexbor-headers" and origin == str(path)
    assert sorted(str(p.relative_to(include)) for p in include.rglob("*.h")) == sorted(setup_py.NEEDED_HEADERS)
    assert not (include / "lexbor" / "core" / "lexbor.c").exists()  # headers only
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, str(tmp_path / "gone.tar.gz"))
    again, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")  # no download, no sdist
    assert again == include and origin.startswith(str(path))


@pytest.mark.parametrize("case, expected", [
    ("no such file", "FileNotFoundError"),
    ("another version", "is selectolax 1.0.3, not 1.0.2"),
    ("headers missing", "holds no lexbor/dom/interfaces/attr_res.h"),
    ("a path out of the folder", "an odd path"),
    ("not a tarball", "ReadError"),
    ("none", "WEBCLIP_SELECTOLAX_SDIST=none"),
])
def test_without_headers_the_build_goes_on_without_the_walk(setup_py, tmp_path, monkeypatch, case, expected):
    """setup.py then builds crawl/_speedups.pyx alone (the compiled rules over selectolax's nodes)."""
    path = tmp_path / "selectolax.tar.gz"
    contents = {
        "another version": lambda: sdist(setup_py, "1.0.3", top="selectolax-1.0.2"),
        "headers missing": lambda: sdist(setup_py, skip=("lexbor/dom/interfaces/attr_res.h",)),
        "a path out of the folder": lambda: sdist(
            setup_py, extra={f"selectolax-{VERSION}/lexbor/source/lexbor/../../../evil.h": b"/* no */"}),
        "not a tarball": lambda: b"<html>a proxy's error page</html>",
    }
    if case in contents:
        path.write_bytes(contents[case]())
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, "none" if case == "none" else str(path))
    include, why = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is None and expected in why, why
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").iterdir())  # nothing half-kept
    assert not (tmp_path / "evil.h").exists()


class FakeIndex:
    """urllib.request.urlopen for a package index's simple API (PEP 691 JSON or PEP 503 HTML) and its files."""

    def __init__(self, data: bytes, sha256: str | None, *, url: str = "https://files.example/p/selectolax-1.0.2.tar.gz",
                 flavour: str = "json", filename: str = "selectolax-1.0.2.tar.gz"):
        self.data, self.flavour, self.requests = data, flavour, []
        self.files = [("selectolax-1.0.2-cp311-cp311-manylinux_x86_64.whl", "https://files.example/p/x.whl", "0" * 64),
                      (filename, url, sha256)]

    def __call__(self, request, timeout=None):
        url = request if isinstance(request, str) else request.full_url
        self.requests.append(url)
        if url.endswith("/simple/selectolax/"):
            if self.flavour == "json":
                body = json.dumps({"files": [{"filename": name, "url": href, "hashes": {"sha256": sha} if sha else {}}
                                             for name, href, sha in self.files]}).encode()
                return Response(body, "application/vnd.pypi.simple.v1+json")
            anchors = "".join(f'<a href="{href}{"#sha256=" + sha if sha else ""}">{name}</a>'
                              for name, href, sha in self.files)
            return Response(f"<html><body>{anchors}</body></html>".encode(), "text/html")
        return Response(self.data, "application/octet-stream")


class Response(io.BytesIO):
    def __init__(self, body: bytes, content_type: str):
        super().__init__(body)
        self.headers = {"Content-Type": content_type}


@pytest.mark.parametrize("flavour", ["json", "html"])
def test_a_download_is_checked_against_the_sha256_the_index_lists(setup_py, tmp_path, monkeypatch, flavour):
    monkeypatch.delenv(setup_py.SDIST_VARIABLE, raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    good = sdist(setup_py)
    digest = hashlib.sha256(good).hexdigest()
    # the index's sha256 must also be the one published for that version (setup.py's KNOWN_SDISTS)
    monkeypatch.setattr(setup_py, "KNOWN_SDISTS", {VERSION: hashlib.sha256(b"the published file").hexdigest()})
    monkeypatch.setattr(urllib.request, "urlopen", FakeIndex(good, digest, flavour=flavour))
    include, why = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is None and "published as" in why, why
    monkeypatch.setattr(setup_py, "KNOWN_SDISTS", {VERSION: digest})
    for fake, expected in [
        (FakeIndex(good, hashlib.sha256(b"another file").hexdigest(), flavour=flavour), "sha256"),
        (FakeIndex(good, None, flavour=flavour), "gives no sha256"),
        (FakeIndex(good, digest, url="http://files.example/p/selectolax-1.0.2.tar.gz", flavour=flavour),
         "not an https URL"),
        (FakeIndex(good, digest, url="https://files.example/p/selectolax-1.0.2.zip", filename="selectolax-1.0.2.zip",
                   flavour=flavour), "lists no selectolax-1.0.2.tar.gz"),
    ]:
        monkeypatch.setattr(urllib.request, "urlopen", fake)
        include, why = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
        assert include is None and expected in why, why
    fake = FakeIndex(good, digest, url="../../p/selectolax-1.0.2.tar.gz", flavour=flavour)  # relative to the page
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple/")
    include, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is not None and origin == "https://mirror.example/p/selectolax-1.0.2.tar.gz"
    assert fake.requests == ["https://mirror.example/simple/selectolax/", origin]


def test_index_credentials_are_sent_as_a_header_and_kept_out_of_messages(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv(setup_py.SDIST_VARIABLE, raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    good = sdist(setup_py)
    monkeypatch.setattr(setup_py, "KNOWN_SDISTS", {VERSION: hashlib.sha256(good).hexdigest()})
    seen = []

    def fake(request, timeout=None):
        seen.append((request.full_url, request.get_header("Authorization")))
        return FakeIndex(good, hashlib.sha256(good).hexdigest(), url="/p/selectolax-1.0.2.tar.gz")(request, timeout)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    monkeypatch.setenv("PIP_INDEX_URL", "https://me:s%40cret@mirror.example/simple")
    include, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    basic = "Basic " + base64.b64encode(b"me:s@cret").decode()
    assert include is not None and origin == "https://mirror.example/p/selectolax-1.0.2.tar.gz"
    assert seen == [("https://mirror.example/simple/selectolax/", basic), (origin, basic)]
    assert setup_py.public("https://me:pw@host.example:8443/x?y") == "https://host.example:8443/x?y"


def test_the_cache_none_and_no_index(setup_py, tmp_path, monkeypatch):
    """WEBCLIP_SELECTOLAX_SDIST=none wins over kept headers; a cache missing a header is made again; with
    PIP_NO_INDEX nothing is fetched."""
    path = tmp_path / f"selectolax-{VERSION}.tar.gz"
    path.write_bytes(sdist(setup_py))
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, str(path))
    include, _ = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is not None
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, "none")
    assert setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build") == (None, f"{setup_py.SDIST_VARIABLE}=none")
    (include / setup_py.NEEDED_HEADERS[0]).unlink()  # a damaged cache: taken again from the sdist
    monkeypatch.setenv(setup_py.SDIST_VARIABLE, str(path))
    again, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert again == include and origin == str(path) and (include / setup_py.NEEDED_HEADERS[0]).is_file()

    def offline(url, timeout=None):
        raise AssertionError("fetched with PIP_NO_INDEX set")

    monkeypatch.delenv(setup_py.SDIST_VARIABLE)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    include, why = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "other")
    assert include is None and "PIP_NO_INDEX" in why


def test_an_sdist_of_webclip_carries_the_walk_sources(tmp_path):
    """setup.py's extension lists the walk's sources as depends, so `python -m build` ships them."""
    pytest.importorskip("setuptools")
    pytest.importorskip("Cython")
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, check=True,
                   capture_output=True)
    [archive] = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist_file:
        names = {PurePosixPath(n).relative_to(PurePosixPath(n).parts[0]).as_posix() for n in sdist_file.getnames()
                 if len(PurePosixPath(n).parts) > 1}
    assert {"crawl/_speedups.pyx", "crawl/_lexbor_tree.pxi", "crawl/_speedups_lexbor.pyx", "setup.py"} <= names


def test_offline_the_build_goes_on_without_the_walk(setup_py, tmp_path, monkeypatch):
    tries = []

    def offline(url, timeout=None):
        tries.append(url)
        raise OSError("Network is unreachable")

    monkeypatch.delenv(setup_py.SDIST_VARIABLE, raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(setup_py, "FETCH_PAUSE_S", 0.0)
    include, why = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is None and "Network is unreachable" in why
    assert len(tries) == setup_py.FETCH_TRIES  # tried again before giving up


def test_a_dropped_connection_is_tried_again(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv(setup_py.SDIST_VARIABLE, raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    good = sdist(setup_py)
    monkeypatch.setattr(setup_py, "KNOWN_SDISTS", {VERSION: hashlib.sha256(good).hexdigest()})
    monkeypatch.setattr(setup_py, "FETCH_PAUSE_S", 0.0)
    index, dropped = FakeIndex(good, hashlib.sha256(good).hexdigest()), []

    def flaky(request, timeout=None):
        if len(dropped) < setup_py.FETCH_TRIES - 1:
            dropped.append(request.full_url)
            raise OSError("Connection reset by peer")
        return index(request, timeout)

    monkeypatch.setattr(urllib.request, "urlopen", flaky)
    include, origin = setup_py.lexbor_headers(VERSION, cache_root=tmp_path / "build")
    assert include is not None and origin == "https://files.example/p/selectolax-1.0.2.tar.gz", origin


def test_the_build_and_run_pins_of_selectolax_are_one_version():
    """The walk is compiled against the build requirement and refused at run time under another version."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = [r for r in project["build-system"]["requires"] if r.startswith("selectolax")]
    run = [r for r in project["project"]["dependencies"] if r.startswith("selectolax")]
    assert build == run and len(run) == 1 and run[0].startswith("selectolax==")
