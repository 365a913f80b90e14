"""``python -m apply.search --serve``: the JSON API over real HTTP on 127.0.0.1, and the page in Chromium.

The server is the real command, started as a subprocess on a free port, over the index of
a small pool with the filter's decisions (``_search_fixtures``); one sample's caption is
hostile HTML. Requests are real ones (urllib, and headless Chromium through
``tests/_browser.py``; these skip, as the report's browser tests do, with
WEBCLIP_SKIP_BROWSER=1).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _search_fixtures as fx
from apply.index import open_index
from apply.search import Searcher
from core.layout import sample_key

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_KEY = sample_key(1, 0, fx.ROWS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    paths = fx.build_all(str(tmp_path_factory.mktemp("served")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "apply.search", "--index", paths["index"], "--serve", "--port", "0",
         "--pool", paths["pool"], "--decisions", paths["decisions"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))  # fmt: skip
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
    base = line.split("http://", 1)[1].split("/", 1)[0]
    yield f"http://{base}", paths
    proc.terminate()
    proc.wait(10)


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(url: str) -> tuple[int, dict]:
    status, headers, body = get(url)
    assert headers["Content-Type"].startswith("application/json") and headers["X-Content-Type-Options"] == "nosniff"
    return status, json.loads(body)


def tar_member(tar: str, name: str) -> bytes:
    with tarfile.open(tar) as archive:
        return archive.extractfile(name).read()


def test_the_api_answers_as_the_searcher_does(served):
    base, paths = served
    searcher = Searcher(open_index(paths["index"]), paths["checkpoint"])
    status, answer = get_json(f"{base}/api/search?q=a%20small%20green%20triangle&k=5")
    assert status == 200 and answer["query"] == {"text": "a small green triangle"}
    expected = searcher.text("a small green triangle", 5)["results"]
    assert [r["key"] for r in answer["results"]] == [r["key"] for r in expected]
    assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert set(answer["took_ms"]) == {"encode_ms", "search_ms"}
    status, answer = get_json(f"{base}/api/similar?key={HOSTILE_KEY}&k=3")
    assert status == 200 and answer["results"][0]["key"] == HOSTILE_KEY
    assert answer["results"][0]["caption"] == fx.HOSTILE_CAPTION  # the text, unchanged, as a JSON string
    status, info = get_json(f"{base}/api/info")
    assert (info["rows"], info["type"], info["browse"]) == (3 * (fx.ROWS - 1), "flat", "decisions")


def test_images_come_from_the_index_shards_and_nothing_else(served):
    base, paths = served
    key = sample_key(2, 4, fx.ROWS)
    status, headers, body = get(f"{base}/image?key={key}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Content-Type-Options"] == "nosniff"
    assert body == tar_member(os.path.join(paths["pool"], "00002.tar"), f"{key}.jpg")
    secret = Path(paths["pool"]).parent / "secret.txt"
    secret.write_text("not for the web")
    hostile = ["/image?key=../../../../etc/passwd", "/image?key=/etc/passwd", f"/image?key={secret}",
               "/image?key=..%2F..%2Fsecret", "/image?key=00000.tar", "/image", "/../../etc/passwd",
               "/%2e%2e/%2e%2e/etc/passwd", "/image/../../etc/passwd", f"/{secret}", "//etc/passwd",
               "/api/similar?key=../../etc/passwd",
               f"/image?key={sample_key(0, fx.ROWS - 1, fx.ROWS)}"]  # a failed download: no image anywhere
    for path in hostile:
        status, headers, body = get(base + path)
        assert status == 404, path
        assert b"root:" not in body and b"not for the web" not in body
    status, _, _ = get(f"{base}/api/search?q=x", headers={"Host": "attacker.example:80"})  # DNS rebinding
    assert status == 403
    for path, status_wanted in (("/api/search?q=x&k=abc", 400), ("/api/search?q=x&k=100000", 400),
                                ("/api/search", 400), ("/api/browse?n=-1", 400)):
        assert get_json(base + path)[0] == status_wanted, path


def test_browse_shows_kept_samples_and_each_rejection_reason(served):
    base, paths = served
    decided = fx.decisions()
    status, page = get_json(f"{base}/api/browse?seed=3&n=4")
    assert status == 200 and page["source"] == "decisions" and len(page["kept"]) == 4
    assert all(decided[s["key"]][0] for s in page["kept"])
    reasons = {group["reason"]: group for group in page["reasons"]}
    assert {name: group["count"] for name, group in reasons.items()} == {
        "http_404": 3, "caption_short": 6, "dup_near": 3, "dup_exact": 1}
    for group in reasons.values():
        for example in group["examples"]:
            kept, reason, dup_of = decided[example["key"]]
            assert not kept and reason == group["reason"]
            assert (example["dup_of"] or {}).get("key") == dup_of
    pair = reasons["dup_exact"]["examples"][0]
    assert (pair["key"], pair["dup_of"]["key"]) == (sample_key(2, 9, fx.ROWS), sample_key(0, 2, fx.ROWS))
    assert pair["dup_of"]["caption"] and pair["caption"]
    for key in (pair["key"], pair["dup_of"]["key"]):  # both sides of the pair can be shown
        assert get(f"{base}/image?key={key}")[0] == 200
    other = get_json(f"{base}/api/browse?seed=4&n=4")[1]
    assert [s["key"] for s in other["kept"]] != [s["key"] for s in page["kept"]]  # another seed, other samples
    assert get_json(f"{base}/api/browse?seed=3&n=4")[1] == page  # the same seed, the same samples


def test_the_page_is_self_contained_and_locked_down(served):
    base, _ = served
    status, headers, body = get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe" not in policy
    html = body.decode()
    assert "http://" not in html and "https://" not in html and "innerHTML" not in html


# -- the page in Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(served):
    if os.environ.get("WEBCLIP_SKIP_BROWSER") == "1":
        pytest.skip("WEBCLIP_SKIP_BROWSER=1")
    from tests._browser import Browser

    chromium = Browser()
    chromium.open(served[0] + "/")
    yield chromium
    chromium.close()


def wait_until(browser, expression: str, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"never true: {expression}")


LOADED = "(sel) => Array.from(document.querySelectorAll(sel)).every(i => i.complete && i.naturalWidth > 0)"


def test_a_typed_query_shows_thumbnails_with_captions(browser):
    browser.evaluate("""(() => { const q = document.getElementById('q'); q.value = 'a red circle';
        document.querySelector('#search-form button').click(); })()""")
    wait_until(browser, f"document.querySelectorAll('#results .card').length === 12 && ({LOADED})('#results img')")
    captions = browser.evaluate("Array.from(document.querySelectorAll('#results .caption')).map(c => c.textContent)")
    assert len(captions) == 12 and all(captions)
    assert browser.evaluate("document.getElementById('search-status').textContent").startswith("12 results")
    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
    grid = shot[80:700]
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 200, "the results area is blank"
    assert browser.errors == []


def test_a_hostile_caption_is_shown_as_text(browser):
    browser.evaluate(f"similar({json.dumps(HOSTILE_KEY)})")
    wait_until(browser, f"document.querySelector('#results .card[data-key=\"{HOSTILE_KEY}\"]') !== null")
    shown = browser.evaluate(f"document.querySelector('#results .card[data-key=\"{HOSTILE_KEY}\"] .caption')"
                             ".textContent")
    assert shown == fx.HOSTILE_CAPTION
    assert browser.evaluate("document.querySelectorAll('script').length") == 1  # the page's own
    assert browser.evaluate("Array.from(document.querySelectorAll('#results img'))"
                            ".every(i => i.getAttribute('src').startsWith('/image?key='))")
    assert browser.errors == []


def test_browse_shows_duplicate_pairs_side_by_side(browser):
    browser.evaluate("document.getElementById('tab-browse').click()")
    wait_until(browser, f"document.querySelectorAll('.pair').length >= 2 && ({LOADED})('#browse img')")
    headings = browser.evaluate("Array.from(document.querySelectorAll('#browse h2')).map(h => h.textContent)")
    assert headings[0].startswith("Kept samples") and any("dup_near" in h for h in headings)
    boxes = browser.evaluate("""Array.from(document.querySelectorAll('.pair')).map(p =>
        Array.from(p.querySelectorAll('img')).map(i => i.getBoundingClientRect().left))""")
    assert all(len(lefts) == 2 and lefts[1] > lefts[0] for lefts in boxes)  # rejected left, kept right
    assert browser.errors == []
