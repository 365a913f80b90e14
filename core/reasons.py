"""The one vocabulary of why a sample did not make it.

Every stage records a failure or a rejection as one of these codes, and the report
groups by them, so an auditor can follow a sample from input row to decision. A code
is machine-readable and stable: add new ones, never rename or reuse old ones.

Each code also says which img2dataset status a pool row gets for it
(``failed_to_download`` or ``failed_to_resize``), so our parquet and ``_stats.json``
read the same as img2dataset's to tools that know only that.
"""

from __future__ import annotations

import re
from enum import Enum


class Stage(str, Enum):
    FETCH = "fetch"  # ingest: network, HTTP, safety
    DECODE = "decode"  # ingest: image decode / resize
    FILTER = "filter"  # filter: quality, captions, dedupe
    TRAIN = "train"  # train: reading shards and turning samples into tensors
    CRAWL = "crawl"  # crawl: pages and WARC records becoming (image URL, caption) pairs


class Reason(str, Enum):
    # -- fetch: the URL, the network and the HTTP exchange -------------------------
    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    SSRF_BLOCKED = "ssrf_blocked"  # resolved address outside the allowed networks
    DNS_ERROR = "dns_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"  # the overall per-request deadline passed
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_410 = "http_410"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"  # any other non-2xx status
    OPT_OUT = "opt_out"  # X-Robots-Tag noai / noimageai (or configured directives)
    TOO_LARGE = "too_large"  # more bytes than --max_bytes
    TRUNCATED = "truncated"  # body shorter than announced / connection cut
    NOT_IMAGE = "not_image"  # content type says it is not an image
    # -- input: the row itself, decided before any request ---------------------------
    CAPTION_NOT_UTF8 = "caption_not_utf8"  # caption bytes are not valid UTF-8: not fetched
    # -- decode: turning bytes into a resized image ---------------------------------
    DECODE_ERROR = "decode_error"
    TOO_MANY_PIXELS = "too_many_pixels"  # from the header, before the full decode
    TOO_SMALL = "too_small"
    ASPECT_RATIO = "aspect_ratio"
    # -- filter: decisions made from pool metadata ----------------------------------
    CAPTION_MISSING = "caption_missing"
    CAPTION_SHORT = "caption_short"
    CAPTION_BOILERPLATE = "caption_boilerplate"  # a file name or a generic word, not a description
    DUP_URL = "dup_url"
    DUP_EXACT = "dup_exact"
    DUP_NEAR = "dup_near"
    DUP_SEMANTIC = "dup_semantic"  # image embeddings (apply.embed) at or above a cosine threshold
    LOW_CLIP_SCORE = "low_clip_score"
    LANGUAGE = "language"  # caption detected in a language outside the configured list
    NEAR_BLANK = "near_blank"  # the image is (nearly) one flat tone
    HASH_MISSING = "hash_missing"  # a downloaded row without a usable sha256 or pHash
    EVAL_CONTAMINATED = "eval_contaminated"  # a near duplicate of an evaluation image
    CLIP_SCORE_MISSING = "clip_score_missing"  # the CLIP-score rule is on but the sample has no score
    # -- train: reading train shards (decode_error, too_many_pixels, caption_missing reused) --
    IMAGE_MISSING = "image_missing"  # a key with no image member (caption_not_utf8 is above)
    SHARD_ERROR = "shard_error"  # a shard that cannot be opened, or ends mid-member
    TRANSFORM_ERROR = "transform_error"  # the image decoded but the transform to a tensor failed
    LABEL_MISSING = "label_missing"  # an eval sample without a usable class label
    # -- crawl: a page (fetched or from a WARC), one of its images, or one of its links --
    # (fetch reasons above are reused for page requests: http_404, timeout, ssrf_blocked, opt_out, ...)
    ROBOTS_DISALLOWED = "robots_disallowed"  # page: robots.txt disallows it for us; never requested
    ROBOTS_UNREACHABLE = "robots_unreachable"  # page: robots.txt failed (5xx, network): host treated as disallowed
    CRAWL_DELAY_TOO_LONG = "crawl_delay_too_long"  # page: robots.txt asks for a longer delay than we wait
    PAGE_TOO_LARGE = "page_too_large"  # page: more bytes than --max_page_bytes
    NOT_HTML = "not_html"  # page: content type or bytes say it is not HTML
    BAD_ENCODING = "bad_encoding"  # page: neither declared nor detected charset (or content coding) decodes it
    HTML_PARSE_ERROR = "html_parse_error"  # page: the HTML parser gave up on it
    WARC_TRUNCATED = "warc_truncated"  # WARC record cut short (file or gzip member ends early)
    WARC_MALFORMED = "warc_malformed"  # WARC/WAT record whose header or JSON cannot be read
    DATA_URI = "data_uri"  # image: only a data: URI, no fetchable URL
    ALT_MEANINGLESS = "alt_meaningless"  # image: no caption: alt empty, a file name or a generic word
    DUP_IN_PAGE = "dup_in_page"  # image: the same URL earlier on the same page
    OUT_OF_SCOPE = "out_of_scope"  # link: host outside the allowed domains; not followed
    DEPTH_LIMIT = "depth_limit"  # link: deeper than --max_depth; not followed
    PAGE_LIMIT = "page_limit"  # link: --max_pages already scheduled; not followed

    @property
    def stage(self) -> Stage:
        return _STAGE[self]

    @property
    def pool_status(self) -> str:
        """The img2dataset ``status`` a pool row failing for this reason gets."""
        return "failed_to_resize" if self.stage is Stage.DECODE else "failed_to_download"

    @property
    def description(self) -> str:
        return _DESCRIPTION[self]


_STAGE: dict[Reason, Stage] = {
    **{r: Stage.FETCH for r in list(Reason)[: list(Reason).index(Reason.NOT_IMAGE) + 1]},
    **{
        r: Stage.DECODE
        for r in (Reason.DECODE_ERROR, Reason.TOO_MANY_PIXELS, Reason.TOO_SMALL, Reason.ASPECT_RATIO)
    },
}
_STAGE[Reason.CAPTION_NOT_UTF8] = Stage.FETCH  # a pool row that never reached the network
_STAGE.update(
    {
        r: Stage.TRAIN
        for r in (Reason.IMAGE_MISSING, Reason.SHARD_ERROR, Reason.TRANSFORM_ERROR, Reason.LABEL_MISSING)
    }
)
_CRAWL_FIRST, _CRAWL_LAST = list(Reason).index(Reason.ROBOTS_DISALLOWED), list(Reason).index(Reason.PAGE_LIMIT)
_STAGE.update({r: Stage.CRAWL for r in list(Reason)[_CRAWL_FIRST : _CRAWL_LAST + 1]})
_STAGE.update({r: Stage.FILTER for r in Reason if r not in _STAGE})

_DESCRIPTION: dict[Reason, str] = {
    Reason.INVALID_URL: "the URL could not be parsed",
    Reason.UNSUPPORTED_SCHEME: "only http and https are fetched",
    Reason.SSRF_BLOCKED: "the host resolved to an address outside the allowed networks",
    Reason.DNS_ERROR: "the host name did not resolve",
    Reason.CONNECTION_ERROR: "the connection failed or was reset",
    Reason.TIMEOUT: "the request did not finish within its deadline",
    Reason.TOO_MANY_REDIRECTS: "more redirects than allowed",
    Reason.HTTP_403: "the server answered 403 Forbidden",
    Reason.HTTP_404: "the server answered 404 Not Found",
    Reason.HTTP_410: "the server answered 410 Gone",
    Reason.HTTP_429: "the server answered 429 Too Many Requests",
    Reason.HTTP_5XX: "the server answered with a 5xx error",
    Reason.HTTP_OTHER: "the server answered with another non-success status",
    Reason.OPT_OUT: "the response carried an opt-out directive (X-Robots-Tag)",
    Reason.TOO_LARGE: "the body was larger than the byte cap",
    Reason.TRUNCATED: "the body ended before its announced length",
    Reason.NOT_IMAGE: "the content type is not an image",
    Reason.CAPTION_NOT_UTF8: "the caption's bytes are not valid UTF-8 (kept with U+FFFD replacements; not fetched)",
    Reason.DECODE_ERROR: "the bytes are not a decodable image",
    Reason.TOO_MANY_PIXELS: "the image header announces more pixels than the cap",
    Reason.TOO_SMALL: "the image is smaller than the minimum side",
    Reason.ASPECT_RATIO: "the image is more elongated than the maximum aspect ratio",
    Reason.CAPTION_MISSING: "the caption is empty or missing",
    Reason.CAPTION_SHORT: "the caption has too few characters or words",
    Reason.CAPTION_BOILERPLATE: "the caption is boilerplate, not a description: a file name (IMG_1234.JPG), "
    "a generic word or phrase ('image', 'untitled', 'click here'), a bare URL, or no letters at all",
    Reason.DUP_URL: "the same URL (normalised) appeared earlier in the input; in ingest, with the same caption, "
    "and the row was not downloaded",
    Reason.DUP_EXACT: "the same image bytes (sha256) appeared earlier in the pool",
    Reason.DUP_NEAR: "a perceptually near-identical image appeared earlier in the pool",
    Reason.DUP_SEMANTIC: "an image whose CLIP embedding is nearly the same (cosine at or above the threshold) "
    "appeared earlier in the pool",
    Reason.LOW_CLIP_SCORE: "image and caption are too dissimilar under a CLIP model",
    Reason.LANGUAGE: "the caption's detected language is not among the languages kept",
    Reason.NEAR_BLANK: "the image is nearly one flat tone (grey-level spread below the minimum)",
    Reason.HASH_MISSING: "the downloaded row has no usable sha256 or pHash, so it cannot be deduplicated",
    Reason.EVAL_CONTAMINATED: "the image is a near duplicate of an evaluation image",
    Reason.CLIP_SCORE_MISSING: "the CLIP-score rule is on but no score was computed for this sample",
    Reason.IMAGE_MISSING: "the sample has a caption but no image member",
    Reason.SHARD_ERROR: "the shard could not be opened or ends mid-member; the rest of it is lost",
    Reason.TRANSFORM_ERROR: "turning the decoded image into a training tensor failed",
    Reason.LABEL_MISSING: "the eval sample has no usable class label",
    Reason.ROBOTS_DISALLOWED: "robots.txt disallows this page for our user agent; it was not requested",
    Reason.ROBOTS_UNREACHABLE: "robots.txt could not be fetched (server error or network failure): the host is treated as fully disallowed",
    Reason.CRAWL_DELAY_TOO_LONG: "robots.txt asks for a longer Crawl-delay than --max_crawl_delay; the host was not crawled",
    Reason.PAGE_TOO_LARGE: "the page is larger than the page byte cap",
    Reason.NOT_HTML: "the page's content type or its bytes say it is not HTML",
    Reason.BAD_ENCODING: "the page's bytes decode under neither the declared nor a detected charset (or content coding)",
    Reason.HTML_PARSE_ERROR: "the HTML parser could not read the page",
    Reason.WARC_TRUNCATED: "the WARC record (or its gzip member) ends before its announced length; the rest of the file is lost",
    Reason.WARC_MALFORMED: "the WARC/WAT record's header or JSON could not be read",
    Reason.DATA_URI: "the image is only an inline data: URI, with no URL to download",
    Reason.ALT_MEANINGLESS: "the image has no usable caption: alt text empty, a file name or a generic word, and no figcaption",
    Reason.DUP_IN_PAGE: "the same image URL appeared earlier on the same page",
    Reason.OUT_OF_SCOPE: "the link leaves the allowed domains; not followed",
    Reason.DEPTH_LIMIT: "the link is deeper than the maximum crawl depth; not followed",
    Reason.PAGE_LIMIT: "the maximum number of pages was already scheduled; not followed",
}


def http_reason(status: int) -> Reason:
    """The reason for a non-success HTTP status."""
    specific = {403: Reason.HTTP_403, 404: Reason.HTTP_404, 410: Reason.HTTP_410, 429: Reason.HTTP_429}
    if status in specific:
        return specific[status]
    if 500 <= status <= 599:
        return Reason.HTTP_5XX
    return Reason.HTTP_OTHER


class SampleError(Exception):
    """A per-sample failure with its reason; caught once, where the pool row is written."""

    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# Rows of a pool that never reached the network: decided from the input row alone
# (the report's funnel counts them as not attempted). dup_url rows are the
# not-unique ones; every other failure was attempted.
NOT_UNIQUE = frozenset({Reason.DUP_URL})
NOT_ATTEMPTED = frozenset({
    Reason.CAPTION_MISSING, Reason.CAPTION_SHORT, Reason.CAPTION_BOILERPLATE, Reason.CAPTION_NOT_UTF8,
    Reason.INVALID_URL, Reason.UNSUPPORTED_SCHEME,
})

# img2dataset writes free-text error messages instead of codes; these patterns map the
# ones it produces (its own, urllib's and Pillow's) onto our vocabulary, so a report on
# an img2dataset folder groups failures like ours. Order matters: the first match wins.
_MESSAGE_PATTERNS: tuple[tuple[str, Reason], ...] = (
    (r"http error 403", Reason.HTTP_403),
    (r"http error 404", Reason.HTTP_404),
    (r"http error 410", Reason.HTTP_410),
    (r"http error 429", Reason.HTTP_429),
    (r"http error 5\d\d", Reason.HTTP_5XX),
    (r"http error \d+", Reason.HTTP_OTHER),
    (r"x-robots-tag|noai|opt.?out", Reason.OPT_OUT),
    (r"timed out|timeout", Reason.TIMEOUT),
    (r"name or service not known|nodename nor servname|getaddrinfo|temporary failure in name resolution|no address",
     Reason.DNS_ERROR),
    (r"redirect", Reason.TOO_MANY_REDIRECTS),
    (r"unknown url type|unsupported url|unsupported scheme", Reason.UNSUPPORTED_SCHEME),
    (r"invalid url|no host given|url can't contain control characters", Reason.INVALID_URL),
    (r"connection (refused|reset|aborted)|remote end closed|errno 10[34]|errno 111|broken pipe|urlopen error",
     Reason.CONNECTION_ERROR),
    (r"incompleteread|incomplete read|truncated", Reason.TRUNCATED),
    (r"image too small", Reason.TOO_SMALL),
    (r"image area too large|decompression ?bomb", Reason.TOO_MANY_PIXELS),
    (r"aspect ratio too large", Reason.ASPECT_RATIO),
    (r"cannot identify image|image decoding error|image file is truncated|broken data stream|not a valid image",
     Reason.DECODE_ERROR),
)


def reason_from_message(message: str | None) -> Reason | None:
    """Our reason for a foreign (img2dataset) error message; None when none fits."""
    if not message:
        return None
    lowered = message.lower()
    for pattern, reason in _MESSAGE_PATTERNS:
        if re.search(pattern, lowered):
            return reason
    return None
