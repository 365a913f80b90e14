"""Filter rules: the first failing reason, in the documented order; first copy kept."""

import pytest

from core.reasons import Reason
from filter.config import FilterConfig
from filter.rules import Deduper, decide, normalize_url

CFG = FilterConfig(pool="p", output_folder="o")


def row(key="0", url="http://a.com/1.jpg", caption="a red circle", w=300, h=200, sha="h1", status="success",
        reason=None):
    return {"key": key, "url": url, "caption": caption, "status": status, "reason": reason,
            "original_width": w, "original_height": h, "width": 128, "height": 128, "sha256": sha}


def test_clean_row_is_kept():
    assert decide(row(), CFG, Deduper()) is None


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"status": "failed_to_download", "reason": "http_404"}, Reason.HTTP_404),
        ({"caption": None}, Reason.CAPTION_MISSING),
        ({"caption": "   "}, Reason.CAPTION_MISSING),
        ({"caption": "image"}, Reason.CAPTION_SHORT),
        ({"caption": "a b"}, Reason.CAPTION_SHORT),  # 3 characters
        ({"w": 30, "h": 30}, Reason.TOO_SMALL),
        ({"w": 1200, "h": 120}, Reason.ASPECT_RATIO),
    ],
)
def test_single_row_rules(overrides, reason):
    assert decide(row(**overrides), CFG, Deduper()) is reason


def test_first_copy_is_kept_and_later_copies_rejected():
    seen = Deduper()
    assert decide(row(key="1", url="http://A.com:80/1.jpg#frag"), CFG, seen) is None
    assert decide(row(key="2", url="http://a.com/1.jpg", sha="other"), CFG, seen) is Reason.DUP_URL
    assert decide(row(key="3", url="http://a.com/2.jpg", sha="h1"), CFG, seen) is Reason.DUP_EXACT


def test_a_rejected_copy_does_not_claim_the_hash():
    """The kept copy of duplicate bytes is the first *acceptable* one."""
    seen = Deduper()
    assert decide(row(key="1", url="http://a.com/1.jpg", caption="x"), CFG, seen) is Reason.CAPTION_SHORT
    assert decide(row(key="2", url="http://a.com/2.jpg"), CFG, seen) is None


def test_dedupe_can_be_switched_off():
    cfg = FilterConfig(pool="p", output_folder="o", dedupe_url=False, dedupe_exact=False)
    seen = Deduper()
    assert decide(row(), cfg, seen) is None
    assert decide(row(), cfg, seen) is None


def test_url_normalisation():
    assert normalize_url("HTTP://Example.COM:80/a?b=1#x") == "http://example.com/a?b=1"
    assert normalize_url("https://example.com:8443/") == "https://example.com:8443/"
