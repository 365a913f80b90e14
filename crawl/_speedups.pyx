# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The crawl's hot loops, compiled: the per-image rules for the common shapes, and two page checks.

This is a speed-up, not a second set of rules. ``image_rules`` runs for every ``<img>``
of every page, where Python's per-operation cost was most of the crawl's own time
(BENCHMARKS.md, "Crawl"). It decides in C only what it can decide exactly as
``crawl/extract.py``'s rules do, and hands everything else to those rules, bound in by
``bind`` at import:

* rule 1 (URL): a ``src`` alone; a ``srcset`` of the usual ``"a 320w, b 640w"`` shape
  (its first widest candidate); a lazy attribute with no srcset. Anything else —
  ``<picture>`` sources, ``data-srcset``, densities, data: URIs, odd commas —
  goes to ``_pick_url``.
* rule 2 (resolution): a plain rooted path (ASCII, printable, no ``//``, ``/.``,
  ``#``, ``;``, no ``?`` at the end) is the page's origin + the path, as
  ``Resolver.join`` makes it; anything else goes to ``Resolver.join``.
* rule 3 (caption): an alt text is cleaned (``clean_text``) only if it needs it; the
  captions ``is_meaningless`` surely passes or surely refuses (``_judge``: a long
  caption that says something, a short generic word) are judged here; anything else
  goes to ``is_meaningless``; a refused alt text to the figure caption (``_figcaption_text``).
* rule 4 (dedupe) as written.

``image_rules`` takes selectolax's node objects (``tree.tags("img")``: a dict of
attributes, a parent node, per image). Where setup.py had the Lexbor headers of the
installed selectolax, this file is compiled together with ``crawl/_lexbor_tree.pxi``
(as crawl/_speedups_lexbor.pyx), whose ``page_images(tree, ...)`` gives the same pairs
reading Lexbor's tree itself: the images, their attributes and parents, the figure
caption, straight from its structs; selectolax's objects only for the images a Python
rule takes.

The page checks of ``crawl/page.py``: ``is_utf8`` (strict UTF-8, without decoding the
page; 32 bytes a step with AVX2) and ``has_any_byte`` (the binary sniff).

Built by ``pip install -e .`` (setup.py; optional: without a C compiler the package
installs and crawl/ runs its Python code). ``crawl/speedups.py`` loads it; the tests
run every page rule over each loop (Python, these rules over selectolax's nodes, and
over Lexbor's tree) and compare each check with its Python twin (tests/test_crawl_extract.py).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport Py_UNICODE_ISALPHA, Py_UNICODE_ISDECIMAL, Py_UNICODE_ISSPACE

cdef extern from *:
    """
    #ifndef WEBCLIP_SPEEDUPS_SOURCE
    #define WEBCLIP_SPEEDUPS_SOURCE ""
    #endif
    """
    const char* WEBCLIP_SPEEDUPS_SOURCE

SOURCE_SHA256 = (<bytes>WEBCLIP_SPEEDUPS_SOURCE).decode()  # of this file, as setup.py built it (crawl/speedups.py)

# Bound by crawl/extract.py (bind): the rules this module hands the unusual cases to, and constants.
cdef Py_ssize_t _bind_generation = 0  # bind's calls: the tree walk's tables are of one (crawl/_lexbor_tree.pxi)
cdef object _pick_url = None
cdef object _picture_srcsets = None
cdef object _is_meaningless = None
cdef object _first_figcaption = None
cdef long _FIGURE = -1
cdef int _FIGURE_SEARCH_DEPTH = 0
cdef object _Pair = None
cdef long _PICTURE = -1
cdef Py_ssize_t _LONGEST_GENERIC = 0
cdef str _ALT_MEANINGLESS = ""
cdef str _DUP_IN_PAGE = ""
cdef frozenset _URL_ATTRIBUTES = frozenset()
cdef tuple _LAZY_THEN_SRC = ()
cdef tuple _CAMERA_OR_URL = ()
cdef tuple _URL_PREFIXES = ()
cdef frozenset _GENERIC_ALTS = frozenset()
cdef bint _END_PUNCTUATION[128]  # per ASCII character: is it in extract._END_PUNCTUATION (all ASCII)
cdef bint _SUSPECT_INITIALS[128]  # per ASCII character: is it in extract._SUSPECT_INITIALS (all ASCII)


def bind(*, pick_url, picture_srcsets, is_meaningless, first_figcaption, figure_tag, figure_search_depth, pair,
         picture_tag, longest_generic, alt_meaningless, dup_in_page, url_attributes, lazy_then_src, camera_or_url,
         url_prefixes, generic_alts, end_punctuation, suspect_initials):
    """Called once by crawl/extract.py with its own rules and constants (again: ``bind_tree_walk`` again too)."""
    global _bind_generation
    global _pick_url, _picture_srcsets, _is_meaningless, _first_figcaption, _FIGURE, _FIGURE_SEARCH_DEPTH
    global _Pair, _PICTURE
    global _LONGEST_GENERIC, _ALT_MEANINGLESS, _DUP_IN_PAGE, _URL_ATTRIBUTES, _LAZY_THEN_SRC, _CAMERA_OR_URL
    global _URL_PREFIXES, _GENERIC_ALTS
    _pick_url, _picture_srcsets, _is_meaningless = pick_url, picture_srcsets, is_meaningless
    _first_figcaption, _FIGURE, _FIGURE_SEARCH_DEPTH = first_figcaption, figure_tag, figure_search_depth
    if not (isinstance(pair, type) and issubclass(pair, tuple)):
        raise TypeError(f"not a tuple type: {pair!r}")
    _Pair, _PICTURE = pair, picture_tag
    _LONGEST_GENERIC, _ALT_MEANINGLESS, _DUP_IN_PAGE = longest_generic, alt_meaningless, dup_in_page
    _URL_ATTRIBUTES, _LAZY_THEN_SRC = frozenset(url_attributes), tuple(lazy_then_src)
    _CAMERA_OR_URL, _URL_PREFIXES = _ascii_prefixes(camera_or_url), _ascii_prefixes(url_prefixes)
    _GENERIC_ALTS = frozenset(generic_alts)
    _ascii_table(_END_PUNCTUATION, end_punctuation)
    _ascii_table(_SUSPECT_INITIALS, suspect_initials)
    _bind_generation += 1


cdef void _ascii_table(bint* table, characters) except *:
    cdef int i
    for i in range(128):
        table[i] = False
    for c in characters:
        if ord(c) >= 128:
            raise ValueError(f"not ASCII: {c!r}")
        table[ord(c)] = True


cdef extern from *:
    """
    /* tuple.__new__(type, (a, b, c)) for a tuple subclass (a Pair), as CPython's tuple_subtype_new makes
       it: tp_alloc with three items, then each item set; without the call and the argument tuple. From
       3.14 a tuple caches its hash (a field that tp_alloc zeroes and tuple_subtype_new sets to -1, "not
       computed"): there the tuple type's own constructor makes it, so as not to depend on that layout. */
    static PyObject *webclip_new_triple(PyObject *type, PyObject *a, PyObject *b, PyObject *c) {
    #if PY_VERSION_HEX >= 0x030E0000
        PyObject *items = PyTuple_Pack(3, a, b, c), *args, *made;
        if (items == NULL) {
            return NULL;
        }
        args = PyTuple_Pack(1, items);
        Py_DECREF(items);
        if (args == NULL) {
            return NULL;
        }
        made = PyTuple_Type.tp_new((PyTypeObject *)type, args, NULL);
        Py_DECREF(args);
        return made;
    #else
        PyObject *triple = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 3);
        if (triple == NULL) {
            return NULL;
        }
        Py_INCREF(a);
        PyTuple_SET_ITEM(triple, 0, a);
        Py_INCREF(b);
        PyTuple_SET_ITEM(triple, 1, b);
        Py_INCREF(c);
        PyTuple_SET_ITEM(triple, 2, c);
        return triple;
    #endif
    }
    """
    object _new_triple "webclip_new_triple"(object type, object a, object b, object c)


cdef inline void _count(object reasons, str reason) except *:
    """``reasons[reason] += 1`` on the page's Counter, without Counter's Python-level __missing__."""
    cdef PyObject* old = PyDict_GetItem(<dict>reasons, reason)
    reasons[reason] = (<object>old + 1) if old is not NULL else 1


cdef inline object _get(dict attributes, str name):
    cdef PyObject* found = PyDict_GetItem(attributes, name)
    return <object>found if found is not NULL else None


cdef bint _has_url_attribute(dict attributes):
    """Whether any attribute but ``src`` may hold the image's URL (``_URL_ATTRIBUTES``)."""
    for key in attributes:
        if key in _URL_ATTRIBUTES:
            return True
    return False


cdef inline bint _careful_first(Py_UCS4 c):
    """A src beginning so may be a data: URI or carry whitespace strip() removes (see _CAREFUL_FIRST)."""
    return c == u'd' or c == u'D' or Py_UNICODE_ISSPACE(c)


cdef object _widest_usual(str srcset):
    """``extract._widest_usual_candidate``: the first widest of ``"a 320w, b 640w"``; else None."""
    cdef list tokens = srcset.split()
    cdef Py_ssize_t count = len(tokens), i, j, n
    cdef str url, descriptor
    cdef long width, best_width = -1
    cdef object best = None
    cdef Py_UCS4 c
    if count == 0 or count % 2:
        return None
    for i in range(0, count, 2):
        url, descriptor = tokens[i], tokens[i + 1]
        n = len(descriptor)
        if i + 2 == count:  # the last: "640w"
            if descriptor[n - 1] != u'w':
                return None
            n -= 1
        elif n >= 2 and descriptor[n - 2] == u'w' and descriptor[n - 1] == u',':  # "640w,"
            n -= 2
        else:
            return None
        if n == 0 or n > 9:  # no digits, or more than a C long is sure to hold: the general path
            return None
        width = 0
        for j in range(n):
            c = descriptor[j]
            if not (u'0' <= c <= u'9'):  # ASCII digits only; str.isdecimal's others take the general path
                return None
            width = width * 10 + (<long>c - 48)  # c is '0'..'9'
        c = url[0]
        if c == u',' or url[len(url) - 1] == u',' or ((c == u'd' or c == u'D') and url[:5].lower() == "data:"):
            return None
        if width > best_width:
            best, best_width = url, width
    return best


cdef object _first_lazy_or_src(dict attributes):
    """``extract._lazy_then_src`` when it finds a URL; None when it finds none (its reason: the Python rule)."""
    cdef object value
    for name in _LAZY_THEN_SRC:
        value = _get(attributes, name)
        if not value:
            continue
        value = value.strip()
        if not value or value[:5].lower() == "data:":
            continue
        return value
    return None


cdef tuple _pick(dict attributes, object sources):
    """``extract._pick_url`` for an image that is not a plain src: its two usual shapes here, else the rule."""
    cdef object srcset, found
    if not sources and not _get(attributes, "data-srcset") and not _get(attributes, "data-lazy-srcset"):
        srcset = _get(attributes, "srcset")
        found = _widest_usual(srcset) if srcset else _first_lazy_or_src(attributes)
        if found is not None:
            return found, None
    return _pick_url(attributes, sources)


cdef bint _plain_rooted(str raw):
    """``extract._CLEAN_ROOTED.fullmatch(raw)`` for ASCII: False sends the URL to ``Resolver.join``."""
    cdef Py_UCS4 c, previous = 0
    if not raw or raw[0] != u'/':
        return False
    for c in raw:
        if c <= 0x20 or c >= 0x7f or c == u'#' or c == u';':
            return False
        if previous == u'/' and (c == u'/' or c == u'.'):  # an empty or dot segment
            return False
        previous = c
    return previous != u'?'


cdef bint _is_clean(str text):
    """``clean_text(text) == text``: no whitespace but single spaces between words."""
    cdef Py_UCS4 c
    cdef bint after_space = True  # a space at the start is not clean
    for c in text:
        if c == u' ':
            if after_space:
                return False
            after_space = True
        elif Py_UNICODE_ISSPACE(c):
            return False
        else:
            after_space = False
    return not after_space or not text


cdef enum:
    MEANINGLESS = 0  # is_meaningless(caption) is surely True
    SAYS = 1  # is_meaningless(caption) is surely False
    ASK = -1  # ask is_meaningless


cdef int _judge(str caption) except -2:
    """``not is_meaningless(caption)`` where it is sure (``SAYS``, ``MEANINGLESS``); else ``ASK``.

    Its early answers: a text longer than any generic phrase, with a letter, not
    beginning like a camera name or URL (``_SUSPECT_INITIALS``) and with no ``.`` in its
    last six characters (no file extension) says something; and the inline case of
    ``_image_rules``: one beginning with such an initial, but with no ``.`` at all, no end
    punctuation, ASCII for 11 characters and no camera or URL prefix. Short ones: ``_judge_short``.
    """
    cdef Py_ssize_t n = len(caption), i
    cdef Py_UCS4 first, last, c
    if n <= _LONGEST_GENERIC:
        return _judge_short(caption)
    first = caption[0]
    if not Py_UNICODE_ISALPHA(first):  # is_meaningless asks _LETTER (a regex) for a letter: isalpha ones are
        for c in caption:
            if Py_UNICODE_ISALPHA(c):
                break
        else:
            return ASK
    if first >= 128 or not _SUSPECT_INITIALS[first]:
        for i in range(n - 6, n):
            if caption[i] == u'.':
                return ASK
        return SAYS
    if u"." in caption:
        return ASK
    last = caption[n - 1]
    if last < 128 and _END_PUNCTUATION[last]:
        return ASK
    for i in range(11):  # the longest camera prefix; the regex's IGNORECASE folds no ASCII into these
        if caption[i] >= 128:
            break
    else:
        return ASK if _begins_with_any(caption, _CAMERA_OR_URL) else SAYS
    # Not ASCII that far: the camera-name regex (IGNORECASE folds 'ſ' into 's', ...) needs a digit to match;
    # a URL prefix is matched as written (no character outside ASCII lower-cases into one: a test checks).
    for c in caption:
        if Py_UNICODE_ISDECIMAL(c):
            return ASK
    return ASK if _begins_with_any(caption, _URL_PREFIXES) else SAYS


cdef int _judge_short(str caption) except -2:
    """``_judge`` for a caption no longer than a generic phrase: ASCII and plain, or ``ASK``.

    Empty: meaningless. Otherwise ``is_meaningless`` reads it as written when it begins with
    a letter, ends in no punctuation (nothing to strip) and has no ``.`` (no file name);
    then a generic phrase is meaningless, and anything else says something unless,
    beginning like a camera name or URL, it has a digit (the camera-name regex needs one)
    or a URL prefix.
    """
    cdef Py_ssize_t n = len(caption)
    cdef Py_UCS4 first, c
    if n == 0:
        return MEANINGLESS
    if not caption.isascii():
        return ASK
    first = caption[0]
    if not ((u'a' <= first <= u'z') or (u'A' <= first <= u'Z')) or _END_PUNCTUATION[caption[n - 1]]:
        return ASK
    if u"." in caption:
        return ASK
    if caption.lower() in _GENERIC_ALTS:
        return MEANINGLESS
    if _SUSPECT_INITIALS[first]:
        for c in caption:
            if u'0' <= c <= u'9':
                return ASK
        if _begins_with_any(caption, _URL_PREFIXES):
            return ASK
    return SAYS


cdef inline bint _says_something(str caption) except -1:
    """``not is_meaningless(caption)``: judged here where sure, else by it."""
    cdef int judged = _judge(caption)
    return judged == SAYS if judged != ASK else not _is_meaningless(caption)


cdef bint _begins_with_any(str text, tuple prefixes):
    """``text.lower().startswith(prefixes)`` for ``prefixes`` of lower-case ASCII bytes (``_ascii_prefixes``)
    and a ``text`` ASCII that far."""
    cdef Py_ssize_t n = len(text), i, m
    cdef Py_UCS4 c
    cdef bytes prefix
    cdef const char* chars
    for prefix in prefixes:
        m = PyBytes_GET_SIZE(prefix)
        if m > n:
            continue
        chars = PyBytes_AS_STRING(prefix)
        for i in range(m):
            c = text[i]
            if u'A' <= c <= u'Z':
                c = <Py_UCS4>(<long>c + 32)  # (Cython reads "+" on a Py_UCS4 as str concatenation)
            if c != <Py_UCS4><unsigned char>chars[i]:
                break
        else:
            return True
    return False


cdef tuple _ascii_prefixes(prefixes):
    """Prefixes as lower-case ASCII bytes, for ``_begins_with_any``."""
    for prefix in prefixes:
        if not prefix.isascii() or prefix != prefix.lower():
            raise ValueError(f"not lower-case ASCII: {prefix!r}")
    return tuple(prefix.encode() for prefix in prefixes)


cdef str _figcaption_text(object img, dict by_parent):
    """``extract._enclosing_figcaption(img)``; images with one parent share ancestors, so the answer too."""
    cdef object node = img.parent, caption
    cdef object key
    cdef str text = ""
    cdef int depth
    if node is None:
        return ""
    key = node.mem_id
    found = by_parent.get(key)
    if found is not None:
        return found
    for depth in range(_FIGURE_SEARCH_DEPTH):
        if depth:
            node = node.parent
            if node is None:
                break
        if node.tag_id == _FIGURE:
            caption = _first_figcaption(node)
            text = caption.text(deep=True, separator=" ") if caption is not None else ""
            break
    by_parent[key] = text
    return text


# Where rule 3 finds image ``i``'s figure caption: through selectolax's nodes (``image_rules``: ``images`` is
# the list of them) or straight from Lexbor's tree (``page_images``, crawl/_lexbor_tree.pxi).
ctypedef str (*_FigcaptionOf)(void* images, Py_ssize_t i, dict by_parent)


cdef str _figcaption_of_node(void* images, Py_ssize_t i, dict by_parent):
    return _figcaption_text((<list>images)[i], by_parent)


def image_rules(images, resolver, result):
    """``crawl.extract._image_rules(images, resolver, result)``, the same pairs and reasons."""
    cdef object reasons = result.reasons
    cdef list raws = [], alts = [], kept = []
    cdef dict attributes
    cdef object node, parent, sources, raw, problem
    # 1. URL
    for node in images:
        attributes = node.attributes
        sources = ()
        parent = node.parent
        if parent is not None and parent.tag_id == _PICTURE:
            sources = _picture_srcsets(parent, node)
        raw = _get(attributes, "src")
        if sources or not raw or _careful_first((<str>raw)[0]) or _has_url_attribute(attributes):
            raw, problem = _pick(attributes, sources)
            if raw is None:
                _count(reasons, problem)
                continue
        raws.append(raw)
        alts.append(_get(attributes, "alt") or "")
        kept.append(node)
    _resolve_caption_dedupe(resolver, result, raws, alts, _figcaption_of_node, <void*>kept)


cdef int _resolve_caption_dedupe(object resolver, object result, list raws, list alts,
                                 _FigcaptionOf figcaption_of, void* images) except -1:
    """Rules 2-4 for the images rule 1 kept: ``raws`` their URLs as written, ``alts`` their alt texts."""
    cdef object reasons = result.reasons
    cdef list pairs = result.pairs, urls = []
    cdef object raw, problem, url, text
    cdef str caption, source, origin = resolver._origin
    cdef Py_ssize_t i, count = len(raws)
    cdef set seen = set()
    cdef dict figcaptions = {}  # the image's parent -> its figcaption text (_figcaption_text)
    cdef bint fast = resolver._fast
    # 2. resolution
    join = resolver.join
    for i in range(count):
        raw = raws[i]
        if fast and _plain_rooted(raw):
            urls.append(origin + raw)
            continue
        url, problem = join(raw)
        if url is None:
            _count(reasons, problem.value)
        urls.append(url)
    # 3. caption, 4. dedupe
    for i in range(count):
        url = urls[i]
        if url is None:
            continue
        caption = alts[i]
        if not _is_clean(caption):
            caption = " ".join(caption.split())
        if _says_something(caption):
            source = "alt"
        else:
            text = figcaption_of(images, i, figcaptions)
            caption, source = (" ".join(text.split()) if text else ""), "figcaption"
            if not _says_something(caption):
                _count(reasons, _ALT_MEANINGLESS)
                continue
        if url in seen:
            _count(reasons, _DUP_IN_PAGE)
            continue
        seen.add(url)
        pairs.append(_new_triple(_Pair, url, caption, source))
    return 0


cdef unsigned char _UTF8_LENGTH[256]  # a lead byte's sequence length; 0: no valid sequence begins with it
for _byte in range(256):
    _UTF8_LENGTH[_byte] = (1 if _byte < 0x80 else 0 if _byte < 0xC2 else 2 if _byte < 0xE0 else 3 if _byte < 0xF0
                           else 4 if _byte < 0xF5 else 0)


cdef extern from *:
    """
    #include <stdint.h>
    /* Which byte of a word loaded with memcpy holds its first (lowest-addressed) set bit. */
    static inline int webclip_first_marked_byte(uint64_t word) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_clzll(word) >> 3;
    #else
        return __builtin_ctzll(word) >> 3;
    #endif
    }
    """
    int _first_marked_byte "webclip_first_marked_byte"(uint64_t word) nogil

cdef extern from *:
    """
    #include <stddef.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* The offset of the first byte >= 0x80 in p[0..n), or n: 16 bytes a step where SSE2 is (every x86-64),
       else 8 (a word's high bits). */
    static inline size_t webclip_ascii_prefix(const unsigned char* p, size_t n) {
        size_t i = 0;
    #if defined(__SSE2__)
        for (; i + 16 <= n; i += 16) {
            int mask = _mm_movemask_epi8(_mm_loadu_si128((const __m128i*)(p + i)));
            if (mask) return i + (size_t)__builtin_ctz((unsigned)mask);
        }
    #endif
        for (; i + 8 <= n; i += 8) {
            uint64_t word;
            memcpy(&word, p + i, 8);
            word &= 0x8080808080808080ULL;
            if (word) return i + (size_t)webclip_first_marked_byte(word);
        }
        for (; i < n; i++) if (p[i] >= 0x80) return i;
        return n;
    }
    """
    size_t _ascii_prefix "webclip_ascii_prefix"(const unsigned char* p, size_t n) nogil


cdef extern from *:
    """
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    /* UTF-8 validation 32 bytes a step with AVX2 (the lookup method of Keiser and Lemire, "Validating
       UTF-8 in less than one instruction per byte", 2021): three 16-entry tables, indexed by the high
       and low nibbles of each byte's predecessor and by the byte's own high nibble, give the errors a
       pair of bytes may show; their AND is the errors this pair does show. Third and fourth bytes of
       a sequence (two continuation bytes in a row, TWO_CONTS) must be exactly where a 3- or 4-byte lead
       two or three bytes back says. A sequence cut short at the end meets the zero padding (TOO_SHORT)
       or an incomplete lead in the last block. ASCII blocks are skipped. */
    enum {
        W_TOO_SHORT = 1 << 0,       /* a lead, then no continuation byte */
        W_TOO_LONG = 1 << 1,        /* ASCII, then a continuation byte */
        W_OVERLONG_3 = 1 << 2,      /* E0 80..9F */
        W_TOO_LARGE = 1 << 3,       /* F4 90..BF, F5..FF 90..BF: past U+10FFFF */
        W_SURROGATE = 1 << 4,       /* ED A0..BF */
        W_OVERLONG_2 = 1 << 5,      /* C0 or C1, then a continuation byte */
        W_TOO_LARGE_1000 = 1 << 6,  /* F5..FF 80..8F */
        W_OVERLONG_4 = 1 << 6,      /* F0 80..8F */
        W_TWO_CONTS = 1 << 7,       /* two continuation bytes: right only inside a 3- or 4-byte sequence */
        W_CARRY = W_TOO_SHORT | W_TOO_LONG | W_TWO_CONTS
    };

    __attribute__((target("avx2")))
    static inline __m256i webclip_prev(__m256i input, __m256i previous, int n) {
        /* the block shifted n bytes later, the previous block's last n bytes in front */
        __m256i joined = _mm256_permute2x128_si256(previous, input, 0x21);
        switch (n) {
            case 1: return _mm256_alignr_epi8(input, joined, 15);
            case 2: return _mm256_alignr_epi8(input, joined, 14);
            default: return _mm256_alignr_epi8(input, joined, 13);
        }
    }

    __attribute__((target("avx2")))
    static inline __m256i webclip_block_errors(__m256i input, __m256i previous) {
        const __m256i low_nibble = _mm256_set1_epi8(0x0F);
        /* each table's 16 entries, the same in both 128-bit lanes (the shuffle looks up within a lane) */
        const char cont = (char)W_TWO_CONTS, f_lead = W_TOO_SHORT | W_TOO_LARGE | W_TOO_LARGE_1000 | W_OVERLONG_4;
        const __m256i by_prev_high = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            W_TOO_LONG, W_TOO_LONG, W_TOO_LONG, W_TOO_LONG, W_TOO_LONG, W_TOO_LONG, W_TOO_LONG, W_TOO_LONG,
            cont, cont, cont, cont,
            W_TOO_SHORT | W_OVERLONG_2, W_TOO_SHORT, W_TOO_SHORT | W_OVERLONG_3 | W_SURROGATE, f_lead));
        const char carry = (char)W_CARRY, large = (char)(W_CARRY | W_TOO_LARGE | W_TOO_LARGE_1000);
        const __m256i by_prev_low = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            (char)(W_CARRY | W_OVERLONG_3 | W_OVERLONG_2 | W_OVERLONG_4), (char)(W_CARRY | W_OVERLONG_2),
            carry, carry, (char)(W_CARRY | W_TOO_LARGE),
            large, large, large, large, large, large, large, large,
            (char)(large | W_SURROGATE), large, large));
        const char cont_8 = (char)(W_TOO_LONG | W_OVERLONG_2 | W_TWO_CONTS | W_OVERLONG_3 | W_TOO_LARGE_1000 | W_OVERLONG_4);
        const char cont_9 = (char)(W_TOO_LONG | W_OVERLONG_2 | W_TWO_CONTS | W_OVERLONG_3 | W_TOO_LARGE);
        const char cont_ab = (char)(W_TOO_LONG | W_OVERLONG_2 | W_TWO_CONTS | W_SURROGATE | W_TOO_LARGE);
        const __m256i by_high = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT,
            cont_8, cont_9, cont_ab, cont_ab, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT, W_TOO_SHORT));
        __m256i prev1 = webclip_prev(input, previous, 1);
        __m256i shown = _mm256_and_si256(
            _mm256_and_si256(
                _mm256_shuffle_epi8(by_prev_high, _mm256_and_si256(_mm256_srli_epi16(prev1, 4), low_nibble)),
                _mm256_shuffle_epi8(by_prev_low, _mm256_and_si256(prev1, low_nibble))),
            _mm256_shuffle_epi8(by_high, _mm256_and_si256(_mm256_srli_epi16(input, 4), low_nibble)));
        /* bit 7 where a 3-byte lead is two bytes back or a 4-byte lead three: a continuation must follow one */
        __m256i third = _mm256_subs_epu8(webclip_prev(input, previous, 2), _mm256_set1_epi8((char)(0xE0 - 0x80)));
        __m256i fourth = _mm256_subs_epu8(webclip_prev(input, previous, 3), _mm256_set1_epi8((char)(0xF0 - 0x80)));
        __m256i must_continue = _mm256_and_si256(_mm256_or_si256(third, fourth), _mm256_set1_epi8((char)0x80));
        return _mm256_xor_si256(must_continue, shown);
    }

    __attribute__((target("avx2")))
    static int webclip_is_utf8_avx2(const unsigned char* p, size_t n) {
        /* a lead in the last three bytes of a block that needs more bytes than the block holds */
        const __m256i incomplete_above = _mm256_setr_epi8(
            -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
            -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
            (char)(0xF0 - 1), (char)(0xE0 - 1), (char)(0xC0 - 1));
        __m256i previous = _mm256_setzero_si256(), incomplete = _mm256_setzero_si256();
        __m256i errors = _mm256_setzero_si256();
        /* a leading ASCII run (the whole of many pages) at SSE2's pace; ASCII before a block reads as zeros */
        size_t i = webclip_ascii_prefix(p, n) & ~(size_t)31;
        for (;;) {
            __m256i input;
            int last = i + 32 > n;
            if (!last) {
                input = _mm256_loadu_si256((const __m256i*)(p + i));
            } else {  /* the tail, zero-padded: a sequence cut short meets a 0 byte */
                unsigned char tail[32] = {0};
                if (n > i) memcpy(tail, p + i, n - i);
                input = _mm256_loadu_si256((const __m256i*)tail);
            }
            if (_mm256_movemask_epi8(input) == 0) {
                errors = _mm256_or_si256(errors, incomplete);  /* ASCII after a cut-short sequence */
                incomplete = _mm256_setzero_si256();
            } else {
                errors = _mm256_or_si256(errors, webclip_block_errors(input, previous));
                incomplete = _mm256_subs_epu8(input, incomplete_above);
            }
            previous = input;
            if (last) break;
            i += 32;
            if ((i & 1023) == 0 && !_mm256_testz_si256(errors, errors)) return 0;  /* stop early, now and then */
        }
        errors = _mm256_or_si256(errors, incomplete);
        return _mm256_testz_si256(errors, errors);
    }

    static int webclip_has_avx2(void) {
        static int known = -1;
        if (known < 0) {
            __builtin_cpu_init();
            known = __builtin_cpu_supports("avx2") ? 1 : 0;
        }
        return known;
    }
    #else  /* no AVX2 path: is_utf8 goes sequence by sequence */
    static int webclip_is_utf8_avx2(const unsigned char* p, size_t n) { (void)p; (void)n; return 0; }
    static int webclip_has_avx2(void) { return 0; }
    #endif
    """
    int _is_utf8_avx2 "webclip_is_utf8_avx2"(const unsigned char* p, size_t n) nogil
    int _has_avx2 "webclip_has_avx2"() nogil


def is_utf8(bytes data):
    """Whether ``data.decode("utf-8")`` would succeed, without decoding (no str of the page is made).

    Strict as Python's codec: no overlong forms, no surrogates (U+D800-DFFF), nothing past
    U+10FFFF, no stray continuation bytes, no sequence cut short at the end. With AVX2
    (x86-64 since 2013) 32 bytes a step whatever the script (``webclip_is_utf8_avx2``); else
    sequence by sequence (``is_utf8_by_sequence``).
    """
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    if _has_avx2():
        return _is_utf8_avx2(p, <size_t>PyBytes_GET_SIZE(data)) == 1
    return _by_sequence(p, PyBytes_GET_SIZE(data))


def is_utf8_by_sequence(bytes data):
    """``is_utf8`` without AVX2 (for tests, which compare both with the codec)."""
    return _by_sequence(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def has_avx2():
    """Whether ``is_utf8`` takes its AVX2 path on this machine."""
    return bool(_has_avx2())


cdef bint _by_sequence(const unsigned char* p, Py_ssize_t n):
    """ASCII runs skipped 16 bytes at a time (SSE2; 8 without it) straight to their first
    non-ASCII byte; a table gives each lead byte's sequence length."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1, length
    while i < n:
        if p[i] < 0x80:
            i += _ascii_prefix(p + i, n - i)  # to the next non-ASCII byte
        if i < n:  # one multi-byte sequence
            c = p[i]
            length = _UTF8_LENGTH[c]
            if length == 2:
                if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                    return False
            elif length == 3:
                if i + 2 >= n:
                    return False
                c1 = p[i + 1]
                if ((c1 | (<unsigned int>p[i + 2] << 8)) & 0xC0C0) != 0x8080:  # two continuation bytes
                    return False
                if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):  # overlong; a surrogate
                    return False
            elif length == 4:
                if i + 3 >= n:
                    return False
                c1 = p[i + 1]
                if ((c1 | (<unsigned int>p[i + 2] << 8) | (<unsigned int>p[i + 3] << 16)) & 0xC0C0C0) != 0x808080:
                    return False
                if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):  # overlong; past U+10FFFF
                    return False
            else:  # a continuation byte with no lead, an overlong 2-byte lead (C0, C1), or F5-FF
                return False
            i += length
    return True


def has_any_byte(bytes data, Py_ssize_t limit, bytes members):
    """Whether any of ``data``'s first ``limit`` bytes is one of ``members``."""
    cdef bint member[256]
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* m = <const unsigned char*>PyBytes_AS_STRING(members)
    cdef Py_ssize_t n = min(limit, PyBytes_GET_SIZE(data)), i
    cdef bint found = False
    memset(member, 0, sizeof(member))
    for i in range(PyBytes_GET_SIZE(members)):
        member[m[i]] = True
    for i in range(n):
        found |= member[p[i]]
    return found


def pick(dict attributes, sources=()):
    """Rule 1 as ``image_rules`` applies it: ``(raw URL, None)`` or ``(None, reason code)`` (for tests)."""
    return _pick(attributes, tuple(sources))


def judge(str caption):
    """``_judge`` (for tests): True (surely says something), False (surely meaningless) or None (ask)."""
    cdef int judged = _judge(caption)
    return None if judged == ASK else judged == SAYS
