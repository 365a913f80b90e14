# The page loop straight from Lexbor's tree: included by crawl/_speedups_lexbor.pyx (see setup.py), after
# crawl/_speedups.pyx, whose rules it applies. It needs the Lexbor headers of the very selectolax it
# is compiled against (setup.py fetches them from that version's sdist) and that selectolax at run time
# (crawl/speedups.py refuses a build made against another version: Lexbor's structs may differ).
#
# What it reads, and what selectolax's own code reads for the same answer (selectolax 1.0.2, Lexbor 3.1):
#
# * the images: ``tree.tags("img")`` is Lexbor's ``lxb_dom_node_simple_walk`` from the document node
#   (depth first, ``first_child`` then ``next``; a <template>'s content is a fragment outside that tree)
#   keeping the elements whose ``local_name`` is the img tag id and whose ``prefix`` is none, whatever
#   their namespace: ``_next_img`` walks the same way;
# * an image's attributes: ``node.attributes`` is a dict of the attribute list, keyed by each one's
#   qualified name (``lxb_dom_attr_qualified_name``: the name of the id in ``qualified_name``, else
#   in ``local_name``; an id below ``LXB_DOM_ATTR__LAST_ENTRY`` is one of Lexbor's predefined names,
#   any other is the address of its entry in the document's name hash), the value UTF-8-decoded with
#   U+FFFD for bad bytes, None where there is none; a later attribute of the same name replaces an
#   earlier one. ``_scan`` finds the few names the rules read (``_SLOT_*``) the same way, without the
#   dict: a predefined id by a table made once, any other by its name's bytes;
# * ``node.parent``, ``node.tag_id``, ``node.mem_id``: the ``parent`` pointer, ``local_name``, the address;
#   ``node.traverse()`` (in ``_first_figcaption``): the walk above from ``node`` itself, text nodes left out.
#
# Everything the compiled rules hand to Python (a <picture>'s sources, unusual srcsets, the figure
# caption's text, a large figure's query, ``_pick_url``) gets selectolax's own objects for just that
# image (``LexborNode.new``, its ``attributes``). The walk keeps pointers to the page's images until its
# pairs are made: nothing it calls (the rules bound by ``bind``, ``Resolver.join``) may change the tree.
# ``bind`` again makes the name tables stale: the walk then waits for its own ``bind_tree_walk``.

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uintptr_t
from libc.string cimport memcmp

from selectolax.lexbor cimport LexborHTMLParser, LexborNode, lxb_dom_attr_t, lxb_dom_node_t

cdef extern from *:
    """
    #define LEXBOR_STATIC  /* as selectolax builds Lexbor (its setup.py): Lexbor's functions, not exported */
    #include "lexbor/core/base.h"
    #include "lexbor/core/hash.h"
    #include "lexbor/dom/interfaces/element.h"
    #include "lexbor/dom/interfaces/attr.h"
    #include "lexbor/dom/interfaces/attr_res.h"  /* the predefined attribute names (static data) */
    #include "lexbor/tag/const.h"
    #include "lexbor/ns/const.h"

    #ifndef WEBCLIP_SELECTOLAX_VERSION
    #define WEBCLIP_SELECTOLAX_VERSION ""
    #endif

    /* The next node of lxb_dom_node_simple_walk's order under root: the first child, else the next
       sibling of the node or of its nearest ancestor that has one; NULL at the end. */
    static inline lxb_dom_node_t *webclip_walk_next(lxb_dom_node_t *root, lxb_dom_node_t *node) {
        if (node->first_child != NULL) {
            return node->first_child;
        }
        while (node != root && node->next == NULL) {
            node = node->parent;
        }
        return node == root ? NULL : node->next;
    }

    /* The first <img> after `after` (NULL: from the start), as lxb_dom_elements_by_tag_name(root, "img")
       finds them: elements with the img tag id and no prefix. */
    static inline lxb_dom_node_t *webclip_next_img(lxb_dom_node_t *root, lxb_dom_node_t *after) {
        lxb_dom_node_t *node = after == NULL ? root->first_child : webclip_walk_next(root, after);
        while (node != NULL) {
            if (node->type == LXB_DOM_NODE_TYPE_ELEMENT && node->local_name == LXB_TAG_IMG
                && node->prefix == LXB_NS__UNDEF) {
                return node;
            }
            node = webclip_walk_next(root, node);
        }
        return NULL;
    }

    /* extract._first_figcaption(figure) as far as it walks figure.traverse(): its first node with the
       figcaption tag id among the first 65 that are not text (the figure first, then its descendants in
       document order). 1 with *found set (NULL: none in the whole figure); 0 where it would ask
       css_first for the rest. */
    static inline int webclip_first_figcaption(lxb_dom_node_t *figure, lxb_dom_node_t **found) {
        lxb_dom_node_t *node = figure;
        int seen = 0;
        *found = NULL;
        for (;;) {
            if (node->type != LXB_DOM_NODE_TYPE_TEXT) {
                if (node->local_name == LXB_TAG_FIGCAPTION) {
                    *found = node;
                    return 1;
                }
                if (seen == 64) {
                    return 0;
                }
                seen++;
            }
            if (node->first_child != NULL) {
                node = node->first_child;
                continue;
            }
            while (node != figure && node->next == NULL) {
                node = node->parent;
            }
            if (node == figure) {
                return 1;
            }
            node = node->next;
        }
    }

    static inline lxb_dom_attr_t *webclip_first_attr(lxb_dom_node_t *node) {
        return lxb_dom_interface_element(node)->first_attr;
    }

    /* The id lxb_dom_attr_qualified_name reads an attribute's name from. */
    static inline uintptr_t webclip_attr_name_id(const lxb_dom_attr_t *attr) {
        return attr->qualified_name != 0 ? attr->qualified_name : attr->node.local_name;
    }

    /* The name of an attribute id, as lxb_dom_attr_data_by_id and lexbor_hash_entry_str find it; NULL
       for the one id that names nothing. */
    static inline const lxb_char_t *webclip_attr_id_name(uintptr_t id, size_t *length) {
        const lxb_dom_attr_data_t *data;
        if (id >= LXB_DOM_ATTR__LAST_ENTRY) {
            if (id == LXB_DOM_ATTR__LAST_ENTRY) {
                *length = 0;
                return NULL;
            }
            data = (const lxb_dom_attr_data_t *) id;
        } else {
            data = &lxb_dom_attr_res_data_default[id];
        }
        *length = data->entry.length;
        return lexbor_hash_entry_str(&data->entry);
    }
    """
    const char* _SELECTOLAX_VERSION "WEBCLIP_SELECTOLAX_VERSION"
    const char* _LEXBOR_VERSION "LEXBOR_VERSION_STRING"
    enum:
        _TAG_IMG "LXB_TAG_IMG"
        _TAG_PICTURE "LXB_TAG_PICTURE"
        _TAG_FIGURE "LXB_TAG_FIGURE"
        _TAG_FIGCAPTION "LXB_TAG_FIGCAPTION"
        _ATTR_LAST_ENTRY "LXB_DOM_ATTR__LAST_ENTRY"
    lxb_dom_node_t* _next_img "webclip_next_img"(lxb_dom_node_t* root, lxb_dom_node_t* after) nogil
    lxb_dom_attr_t* _first_attr "webclip_first_attr"(lxb_dom_node_t* node) nogil
    int _first_figcaption_in "webclip_first_figcaption"(lxb_dom_node_t* figure, lxb_dom_node_t** found) nogil
    uintptr_t _attr_name_id "webclip_attr_name_id"(const lxb_dom_attr_t* attr) nogil
    const unsigned char* _attr_id_name "webclip_attr_id_name"(uintptr_t id, size_t* length) nogil

SELECTOLAX_VERSION = (<bytes>_SELECTOLAX_VERSION).decode()  # whose headers and .pxd this was compiled with
LEXBOR_VERSION = (<bytes>_LEXBOR_VERSION).decode()  # the Lexbor in that selectolax

# The attribute names the rules read ("slots"): these five first, then the lazy ones (bind_tree_walk).
cdef enum:
    _SLOT_SRC = 0
    _SLOT_ALT = 1
    _SLOT_SRCSET = 2
    _SLOT_DATA_SRCSET = 3
    _SLOT_DATA_LAZY_SRCSET = 4
    _MAX_SLOTS = 32
_FIXED_SLOTS = ("src", "alt", "srcset", "data-srcset", "data-lazy-srcset")

cdef Py_ssize_t _slot_count = 0
cdef tuple _slot_names = ()  # bytes: the names _slot_chars point into
cdef const char* _slot_chars[_MAX_SLOTS]
cdef size_t _slot_lengths[_MAX_SLOTS]
cdef bint _slot_is_url[_MAX_SLOTS]  # in _URL_ATTRIBUTES: an image with one takes the general rule 1
cdef int _lazy_then_src[_MAX_SLOTS]  # the slots of _LAZY_THEN_SRC, in its order
cdef Py_ssize_t _lazy_then_src_count = 0
cdef signed char _slot_of_predefined[_ATTR_LAST_ENTRY]  # a predefined attribute id -> its slot, or -1
cdef bint _tree_ready = False  # bind_tree_walk checked this build against the running selectolax
cdef Py_ssize_t _tree_generation = -1  # the bind whose constants _set_slots read: another bind makes them stale


def bind_tree_walk(*, img_tag, figcaption_tag):
    """Called by crawl/extract.py after ``bind``: whether ``page_images`` may read Lexbor's tree itself.

    Checks that the tag ids crawl/extract.py found with the running selectolax are this
    build's, sets up the names ``_scan`` looks for, and compares ``_scan`` with
    selectolax's ``attributes`` on a sample page. False (with a warning): ``page_images``
    takes selectolax's nodes (``image_rules``), as where this module is built without it.
    """
    global _tree_ready, _tree_generation
    _tree_ready = False
    _tree_generation = _bind_generation
    problem = None
    running, built = (img_tag, _PICTURE, _FIGURE, figcaption_tag), (_TAG_IMG, _TAG_PICTURE, _TAG_FIGURE, _TAG_FIGCAPTION)
    if running != built:
        problem = f"tag ids (img, picture, figure, figcaption) {running} at run time, {built} built"
    else:
        _set_slots()
        _tree_ready = True
        problem = _self_test()
        _tree_ready = problem is None
    if problem is not None:
        import warnings
        warnings.warn(f"crawl/_speedups: the Lexbor tree walk is off ({problem}); pages take selectolax's "
                      "nodes", RuntimeWarning, stacklevel=2)
    return _tree_ready


cdef void _set_slots() except *:
    global _slot_count, _slot_names, _lazy_then_src_count
    cdef Py_ssize_t i
    cdef size_t length
    cdef const unsigned char* chars
    cdef uintptr_t id_
    names = list(_FIXED_SLOTS)
    for name in (*_LAZY_THEN_SRC, *sorted(_URL_ATTRIBUTES)):
        if name not in names:
            names.append(name)
    if len(names) > _MAX_SLOTS or len(_LAZY_THEN_SRC) > _MAX_SLOTS:
        raise ValueError(f"more than {_MAX_SLOTS} attribute names")
    _slot_names = tuple(name.encode() for name in names)
    _slot_count = len(names)
    for i in range(_slot_count):
        _slot_chars[i] = _slot_names[i]
        _slot_lengths[i] = len(_slot_names[i])
        _slot_is_url[i] = names[i] in _URL_ATTRIBUTES
    for i, name in enumerate(_LAZY_THEN_SRC):
        _lazy_then_src[i] = names.index(name)
    _lazy_then_src_count = len(_LAZY_THEN_SRC)
    for id_ in range(<uintptr_t>_ATTR_LAST_ENTRY):
        chars = _attr_id_name(id_, &length)
        _slot_of_predefined[id_] = _slot_of_name(chars, length)


cdef inline signed char _slot_of_name(const unsigned char* chars, size_t length) noexcept nogil:
    cdef Py_ssize_t i
    if chars == NULL:
        return -1
    for i in range(_slot_count):
        if _slot_lengths[i] == length and memcmp(_slot_chars[i], chars, length) == 0:
            return <signed char>i
    return -1


cdef inline void _scan(lxb_dom_node_t* node, const lxb_dom_attr_t** slots) noexcept nogil:
    """Each slot's attribute of ``node`` (NULL where it has none): the last of that name, as in the dict."""
    cdef const lxb_dom_attr_t* attr = _first_attr(node)
    cdef uintptr_t id_
    cdef size_t length
    cdef const unsigned char* chars
    cdef signed char slot
    cdef Py_ssize_t i
    for i in range(_slot_count):
        slots[i] = NULL
    while attr != NULL:
        id_ = _attr_name_id(attr)
        if id_ < <uintptr_t>_ATTR_LAST_ENTRY:
            slot = _slot_of_predefined[id_]
        else:
            chars = _attr_id_name(id_, &length)
            slot = _slot_of_name(chars, length)
        if slot >= 0:
            slots[slot] = attr
        attr = attr.next


cdef inline object _value(const lxb_dom_attr_t* attr):
    """``attributes.get(name)``: None for no attribute or no value, else the value (U+FFFD for bad bytes)."""
    if attr == NULL or attr.value == NULL or attr.value.data == NULL:
        return None
    return PyUnicode_DecodeUTF8(<const char*>attr.value.data, <Py_ssize_t>attr.value.length, "replace")


cdef inline bint _truthy(const lxb_dom_attr_t* attr) noexcept nogil:
    """``bool(attributes.get(name))`` without decoding: bytes decode to a non-empty str."""
    return attr != NULL and attr.value != NULL and attr.value.data != NULL and attr.value.length > 0


cdef inline bint _has_url_slot(const lxb_dom_attr_t** slots) noexcept nogil:
    """``_has_url_attribute``: any attribute but ``src`` that may hold the URL, with a value or not."""
    cdef Py_ssize_t i
    for i in range(_slot_count):
        if slots[i] != NULL and _slot_is_url[i]:
            return True
    return False


cdef object _first_lazy_or_src_in(const lxb_dom_attr_t** slots):
    """``_first_lazy_or_src`` over the slots."""
    cdef Py_ssize_t i
    cdef object value
    for i in range(_lazy_then_src_count):
        if not _truthy(slots[_lazy_then_src[i]]):
            continue
        value = _value(slots[_lazy_then_src[i]]).strip()
        if not value or value[:5].lower() == "data:":
            continue
        return value
    return None


cdef tuple _pick_in_tree(const lxb_dom_attr_t** slots, object sources, lxb_dom_node_t* node,
                         LexborHTMLParser tree):
    """``_pick(node.attributes, sources)``: its two usual shapes from the slots, else the rule with the dict."""
    cdef object srcset, found
    if not sources and not _truthy(slots[_SLOT_DATA_SRCSET]) and not _truthy(slots[_SLOT_DATA_LAZY_SRCSET]):
        srcset = _value(slots[_SLOT_SRCSET])
        found = _widest_usual(srcset) if srcset else _first_lazy_or_src_in(slots)
        if found is not None:
            return found, None
    return _pick_url(LexborNode.new(node, tree).attributes, sources)


cdef struct _Kept:  # the images rule 1 kept, for rule 3's figure captions
    lxb_dom_node_t** nodes
    PyObject* tree


cdef str _figcaption_in_tree(void* images, Py_ssize_t i, dict by_parent):
    """``_figcaption_text`` for the ``i``-th kept image, up its ``parent`` pointers."""
    cdef _Kept* kept = <_Kept*>images
    cdef lxb_dom_node_t* node = kept.nodes[i].parent
    cdef lxb_dom_node_t* figcaption
    cdef int depth
    cdef str text = ""
    cdef object key, found, caption
    if node == NULL:
        return ""
    key = <size_t>node  # selectolax's mem_id
    found = by_parent.get(key)
    if found is not None:
        return found
    for depth in range(_FIGURE_SEARCH_DEPTH):
        if depth:
            node = node.parent
            if node == NULL:
                break
        if node.local_name == _TAG_FIGURE:
            if _first_figcaption_in(node, &figcaption):
                caption = LexborNode.new(figcaption, <LexborHTMLParser>kept.tree) if figcaption != NULL else None
            else:  # a large figure: the rule's own query
                caption = _first_figcaption(LexborNode.new(node, <LexborHTMLParser>kept.tree))
            text = caption.text(deep=True, separator=" ") if caption is not None else ""
            break
    by_parent[key] = text
    return text


def page_images(LexborHTMLParser tree not None, resolver, result):
    """``crawl.extract._image_rules(tree.tags("img"), resolver, result)``, reading Lexbor's tree itself.

    The same images in the same order, the same pairs and reasons; no selectolax object
    per image but where a rule needs one (see the top of this file). A fragment's tree,
    or a build ``bind_tree_walk`` refused: selectolax's nodes.
    """
    cdef lxb_dom_node_t* root
    cdef lxb_dom_node_t* node
    cdef lxb_dom_node_t* parent
    cdef lxb_dom_node_t** grown
    cdef const lxb_dom_attr_t* slots[_MAX_SLOTS]
    cdef _Kept kept
    cdef Py_ssize_t count = 0, capacity = 0
    cdef object reasons = result.reasons, sources, raw, problem
    cdef list raws = [], alts = []
    if (not _tree_ready or _tree_generation != _bind_generation or tree._fragment_wrapper != NULL
            or tree.document == NULL):
        images = tree.tags("img")
        if images:
            image_rules(images, resolver, result)
        return
    root = <lxb_dom_node_t*>tree.document  # where tags() walks from in a document (not a fragment)
    kept.nodes, kept.tree = NULL, <PyObject*>tree
    try:
        # 1. URL
        node = _next_img(root, NULL)
        while node != NULL:
            _scan(node, slots)
            sources = ()
            parent = node.parent
            if parent != NULL and parent.local_name == _TAG_PICTURE:
                sources = _picture_srcsets(LexborNode.new(parent, tree), LexborNode.new(node, tree))
            raw = None
            if not sources and _truthy(slots[_SLOT_SRC]) and not _has_url_slot(slots):
                raw = _value(slots[_SLOT_SRC])
                if _careful_first((<str>raw)[0]):
                    raw = None
            if raw is None:
                raw, problem = _pick_in_tree(slots, sources, node, tree)
            if raw is None:
                _count(reasons, problem)
            else:
                if count == capacity:
                    capacity = 2 * capacity if capacity else 32
                    grown = <lxb_dom_node_t**>PyMem_Realloc(kept.nodes, capacity * sizeof(lxb_dom_node_t*))
                    if grown == NULL:
                        raise MemoryError()
                    kept.nodes = grown
                kept.nodes[count] = node
                count += 1
                raws.append(raw)
                alts.append(_value(slots[_SLOT_ALT]) or "")
            node = _next_img(root, node)
        _resolve_caption_dedupe(resolver, result, raws, alts, _figcaption_in_tree, &kept)
    finally:
        PyMem_Free(kept.nodes)


cdef str _self_test():
    """Where ``page_images``'s reads disagree with selectolax's on a sample page: what; None if nowhere."""
    cdef str sample = ('<html><head><template><img src="/t.jpg"></template></head><body>'
                       '<p><img src="/a.jpg" alt="a cat" SRCSET="b.jpg 1w" data-src="c.jpg" DATA-LAZY-SRC="d.jpg" '
                       'data-original data-hi-res-src="é.jpg" width="5" class="x"></p>'
                       '<picture><source srcset="s.jpg 2w"><img data-srcset="e.jpg 5w" data-lazy-srcset="" '
                       'data-lazy="f.jpg" data-url="g.jpg" data-echo="h.jpg" src="i.jpg" src="ignored.jpg"></picture>'
                       '<figure><div><img alt="  " Data-Src="j.jpg" data-srcSET></div></figure>'
                       '<figure>a <!-- b --><p>c</p><figcaption>d</figcaption><figcaption>e</figcaption></figure>'
                       '<svg><image href="k.jpg"/><img src="l.jpg"></svg><noscript><img src="m.jpg" alt="n"></noscript>'
                       '<img></body></html>')
    cdef LexborHTMLParser tree = LexborHTMLParser(sample)
    cdef lxb_dom_node_t* root = <lxb_dom_node_t*>tree.document
    cdef lxb_dom_node_t* node = NULL
    cdef const lxb_dom_attr_t* slots[_MAX_SLOTS]
    cdef lxb_dom_node_t* found
    cdef Py_ssize_t i
    images = tree.tags("img")
    if len(images) < 6:
        return f"{len(images)} images in the sample"
    for image in images:
        node = _next_img(root, node)
        if node == NULL or <size_t>node != image.mem_id:
            return "another image order than tags('img')"
        if <size_t>node.parent != image.parent.mem_id or node.local_name != image.tag_id:
            return "another parent or tag id than selectolax's"
        attributes = image.attributes
        _scan(node, slots)
        for i in range(_slot_count):
            name = _slot_names[i].decode()
            if (slots[i] != NULL) != (name in attributes) or _value(slots[i]) != attributes.get(name):
                return f"attribute {name!r} read otherwise than selectolax's {attributes!r}"
    if _next_img(root, node) != NULL:
        return "more images than tags('img')"
    for figure in tree.css("figure"):
        expected = _first_figcaption(figure)
        if not _first_figcaption_in(<lxb_dom_node_t*><size_t>figure.mem_id, &found) or (
                (<size_t>found if found != NULL else None) != (expected.mem_id if expected is not None else None)):
            return "another figure caption than _first_figcaption's"
    return None
