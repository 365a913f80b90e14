"""Per-row filter rules: the first failing reason, in the documented order."""

import pytest

from core.reasons import Reason
from filter.config import FilterConfig
from filter.rules import row_reason

CFG = FilterConfig(pool="p", output_folder="o", languages=["en"])


def row(caption="a red circle on grey", w=300, h=200, status="success", reason=None, luma=30.0):
    return {"key": "0", "url": "http://a.com/1.jpg", "caption": caption, "status": status, "reason": reason,
            "original_width": w, "original_height": h, "width": 128, "height": 128, "luma_std": luma}


def test_clean_row_is_kept_and_its_language_recorded():
    reason, language, confidence = row_reason(row(), CFG, hashes_ok=True)
    assert reason is None and language == "en" and 0 < confidence <= 1


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"status": "failed_to_download", "reason": "http_404"}, Reason.HTTP_404),
        ({"status": "failed_to_resize", "reason": "not-a-code"}, Reason.DECODE_ERROR),
        ({"caption": None}, Reason.CAPTION_MISSING),
        ({"caption": "   "}, Reason.CAPTION_MISSING),
        ({"caption": "image"}, Reason.CAPTION_BOILERPLATE),
        ({"caption": "DSC_0042.jpg"}, Reason.CAPTION_BOILERPLATE),
        ({"caption": "a b"}, Reason.CAPTION_SHORT),
        ({"caption": "Ein großer schwarzer Hund schläft auf dem Sofa im Wohnzimmer"}, Reason.LANGUAGE),
        ({"w": 30, "h": 30}, Reason.TOO_SMALL),
        ({"w": 1200, "h": 120}, Reason.ASPECT_RATIO),
        ({"luma": 1.0}, Reason.NEAR_BLANK),
        # The order: a failed download wins over everything, the caption over the image.
        ({"status": "failed_to_download", "reason": "timeout", "caption": None}, Reason.TIMEOUT),
        ({"caption": "x", "w": 10, "h": 10}, Reason.CAPTION_SHORT),
    ],
)
def test_single_row_rules(overrides, reason):
    assert row_reason(row(**overrides), CFG, hashes_ok=True)[0] is reason


def test_missing_hashes_are_a_reason_not_a_silent_pass():
    assert row_reason(row(), CFG, hashes_ok=False)[0] is Reason.HASH_MISSING


def test_unsure_language_is_kept_and_no_language_list_keeps_all():
    short = row(caption="purple hexagon clipart")  # English, but the detector is unsure
    assert row_reason(short, CFG, hashes_ok=True)[0] is None
    german = row(caption="Ein großer schwarzer Hund schläft auf dem Sofa im Wohnzimmer")
    assert row_reason(german, FilterConfig(pool="p", output_folder="o"), hashes_ok=True)[0] is None


def test_thresholds_can_be_switched_off():
    cfg = FilterConfig(pool="p", output_folder="o", min_luma_std=0, reject_boilerplate_captions=False,
                       min_caption_words=1)
    assert row_reason(row(luma=0.0), cfg, hashes_ok=True)[0] is None
    assert row_reason(row(caption="image"), cfg, hashes_ok=True)[0] is None


def test_help_explains_every_option():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "filter", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("--near_dup_threshold", "--clip_top_fraction", "--decontaminate", "--languages", "--partition_rows"):
        assert name in done.stdout
