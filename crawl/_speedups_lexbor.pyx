# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""crawl/_speedups.pyx with the page loop that reads Lexbor's tree in C (crawl/_lexbor_tree.pxi).

setup.py builds this as ``crawl._speedups`` where it has the Lexbor headers of the
installed selectolax, else crawl/_speedups.pyx alone; see their docstrings.
"""

include "_speedups.pyx"
include "_lexbor_tree.pxi"
