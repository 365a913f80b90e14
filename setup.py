"""The one compiled module: crawl/_speedups.pyx (the crawl's per-image rules, see its docstring).

Everything else is in pyproject.toml. The extension is optional: where it cannot be
built (no C compiler), the install goes on and crawl/extract.py runs its Python loop,
which gives the same pairs (tests/test_crawl_extract.py runs both).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("crawl._speedups", ["crawl/_speedups.pyx"], optional=True)],
        compiler_directives={"language_level": 3},
        quiet=True,
    ),
)
