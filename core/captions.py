"""Captions that describe nothing: the cheap checks, shared by ingest and the filter.

Ingest runs them before download (a sample whose caption is ``IMG_1234.JPG`` is not
worth its bytes) and the filter runs them again on pools made without them, so the
rule lives here once and both stages give a row the same reason.

Boilerplate is what web pages put where a description should be: a file name, a
camera's numbering, or a generic word or phrase ("image", "untitled", "click here").
It is matched on the whole caption only — "a photo of a dog" is a caption, "photo"
is not — so the check cannot reject a real description.
"""

from __future__ import annotations

import re

from core.reasons import Reason

# Whole captions (lower case, runs of spaces and underscores as one space, punctuation
# stripped from both ends) that name no content. Kept to what web pages really emit.
GENERIC_CAPTIONS = frozenset({
    # the medium itself
    "image", "images", "img", "photo", "photos", "photograph", "picture", "pictures", "pic", "pics", "graphic",
    "figure", "fig", "illustration", "screenshot", "screen shot", "thumbnail", "thumb", "logo", "icon",
    "banner", "avatar", "gif", "jpg", "jpeg", "png", "webp", "svg", "file", "attachment", "media",
    "stock photo", "stock image", "featured image", "header image", "hero image", "cover image",
    "product image", "main image", "image description", "alt text", "alt", "photo by", "image by",
    "photo credit", "image credit", "image of", "photo of", "picture of",
    # nothing there
    "untitled", "untitled image", "no title", "placeholder", "spacer", "blank", "transparent", "pixel",
    "null", "none", "undefined", "nan", "n/a", "na", "default", "empty", "loading", "spinner",
    "no image", "no photo", "no image available", "image not found", "image unavailable", "photo unavailable",
    # user-interface text
    "click here", "click to enlarge", "click to zoom", "click for larger image", "enlarge", "zoom",
    "view", "view image", "view larger", "see more", "read more", "more", "download", "download image",
    "download now", "button", "arrow", "next", "previous", "prev", "close", "menu", "search", "home",
    "advertisement", "ad", "sponsored", "header", "footer",
})
# Extensions of image *file names* used as captions ("IMG_1234.JPG"); not core.layout's
# IMAGE_EXTENSIONS, which are the image members a shard reader takes.
FILE_NAME_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jpe", "jfif", "png", "gif", "webp", "bmp", "tif", "tiff", "svg", "avif", "heic", "heif", "ico"}
)
# "holiday_2019 (2).JPG", "foo.png": a file name, spaces allowed, nothing after the extension.
_FILE_NAME = re.compile(rf"[\w\-.()\[\]~+%,' ]+\.(?:{'|'.join(sorted(FILE_NAME_EXTENSIONS))})", re.IGNORECASE)
# "IMG_1234", "DSC 0001", "image001", "PXL_20230101_123456", "P1000123": a camera's or a CMS's numbering.
_NUMBERED_NAME = re.compile(
    r"(?:img|image|dsc[nf]?|dcim|pict?|picture|photo|pxl|mvimg|screenshot|scan|capture|untitled|file|gopr)"
    r"[\s_\-]*\d[\w\-]*|p\d{5,}",
    re.IGNORECASE,
)
_LETTER = re.compile(r"[^\W\d_]")  # a letter, near enough: a word character, not a digit or "_"
_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")
_SPACES = re.compile(r"[\s_]+")
# Scripts written without spaces between words (Han, kana, Thai, Lao, Myanmar, Khmer):
# each of their characters counts as a word, or no Japanese caption would have two.
_UNSPACED_SCRIPT = re.compile(
    r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)
BOILERPLATE_MAX_CHARS = 128  # longer captions are never boilerplate: skip the regexes
_MAX_GENERIC_WORDS = max(len(name.split()) for name in GENERIC_CAPTIONS)  # more: not a generic phrase


def is_boilerplate(caption: str) -> bool:
    """True for a caption (already stripped, non-empty) that is not a description.

    A file name, a camera or CMS numbering (``IMG_1234``, ``image001``), a generic
    word or phrase from ``GENERIC_CAPTIONS`` (case, surrounding punctuation and
    underscores ignored), a bare URL, or text without a single letter ("12345", "...").
    """
    if len(caption) > BOILERPLATE_MAX_CHARS:
        return False
    if not caption[:1].isalpha() and _LETTER.search(caption) is None:  # a letter first is one (no \d is alpha)
        return True
    if caption.rpartition(".")[2].lower() in FILE_NAME_EXTENSIONS and _FILE_NAME.fullmatch(caption):
        return True
    if " " not in caption and caption.lower().startswith(("http://", "https://", "www.")):
        return True
    if len(caption.split()) > _MAX_GENERIC_WORDS:  # the common case, a sentence: no regex needed
        return False
    # The regexes' substitutions only where they would change something (each costs more than the rest
    # together; the crawl judges every alt text): [^\W_] is str.isalnum(), and every whitespace
    # character but the space is unprintable (tests/test_ingest_plan.py checks both).
    lower = caption.lower()
    bare = lower if lower[:1].isalnum() and lower[-1:].isalnum() else _EDGE_PUNCTUATION.sub("", lower)
    name = bare if "_" not in bare and "  " not in bare and bare.isprintable() else _SPACES.sub(" ", bare)
    return name in GENERIC_CAPTIONS or _NUMBERED_NAME.fullmatch(bare) is not None


def word_count(text: str) -> int:
    """Whitespace-separated words; in scripts written without spaces, one per character."""
    words = text.split()
    if not _UNSPACED_SCRIPT.search(text):
        return len(words)
    return sum(len(_UNSPACED_SCRIPT.findall(word)) or 1 for word in words)


def caption_reason(
    caption: str | None, min_chars: int, min_words: int, reject_boilerplate: bool = True
) -> Reason | None:
    """Why ``caption`` is not worth a sample, or None if it may be.

    The order is part of the contract, so that a row gets its most telling reason:
    missing (None, empty or only whitespace), then boilerplate ("image" is
    boilerplate, not merely short), then short (fewer than ``min_chars`` characters
    or ``min_words`` words by ``word_count``, after stripping the ends).
    """
    text = caption.strip() if caption else ""
    if not text:
        return Reason.CAPTION_MISSING
    if reject_boilerplate and is_boilerplate(text):
        return Reason.CAPTION_BOILERPLATE
    if len(text) < min_chars or (min_words > 0 and len(text.split()) < min_words and word_count(text) < min_words):
        return Reason.CAPTION_SHORT
    return None
