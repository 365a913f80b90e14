"""The one compiled module: crawl/_speedups.pyx (the crawl's per-image rules, see its docstring).

Everything else is in pyproject.toml. The extension is optional: where it cannot be
built (no C compiler), the install goes on and crawl/extract.py runs its Python loop,
which gives the same pairs (tests/test_crawl_extract.py runs both).
"""

import hashlib
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

SOURCE = "crawl/_speedups.pyx"
# The module carries the sha256 of the source it was built from: crawl/speedups.py uses a build only
# with the very source beside it (after an edit, or on a cluster node installed from another version).
DIGEST = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=cythonize(
        [Extension("crawl._speedups", [SOURCE], optional=True,
                   define_macros=[("WEBCLIP_SPEEDUPS_SOURCE", f'"{DIGEST}"')])],
        compiler_directives={"language_level": 3},
        quiet=True,
    ),
)
