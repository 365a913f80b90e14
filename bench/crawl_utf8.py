"""Crawl: the UTF-8 check of a page declared UTF-8, per script, against decoding it.

``crawl/page.py`` validates a page declared UTF-8 before it reaches the parser as bytes.
This times that check (``crawl._speedups.is_utf8``: AVX2 where the CPU has it, else
sequence by sequence) and the sequence-by-sequence path alone, against ``bytes.decode``
(what the check replaced: it builds a str of the whole page and throws it away), on
~50 KiB of text in four scripts. Best of ``--repeat`` timings of ``--number`` calls each.

    .venv/bin/python -m bench.crawl_utf8
"""

from __future__ import annotations

import argparse
import timeit

from bench.measure import save_result

TEXTS = {
    "ascii": "river stone light garden market ",
    "english_v2": "river stone café it’s — light garden ",  # the bench pages' mix, denser
    "russian": "река камень свет сад рынок ",
    "chinese": "河流石头光花园市场 ",
}


def sample(words: str, size: int) -> bytes:
    data = (words * (size // len(words.encode()) + 1)).encode()[:size]
    return data.decode("utf-8", "ignore").encode()  # cut at a character boundary


def best_us(check, data: bytes, number: int, repeat: int) -> float:
    """µs per call of ``check(data)``: the best of ``repeat`` timings of ``number`` calls."""
    return round(min(timeit.repeat(lambda: check(data), number=number, repeat=repeat)) / number * 1e6, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crawl_utf8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kib", type=int, default=50, help="text per sample, in KiB")
    parser.add_argument("--number", type=int, default=2000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is kept")
    args = parser.parse_args(argv)
    from crawl import _speedups  # built by pip install -e . (setup.py)

    checks = {"is_utf8": _speedups.is_utf8, "by_sequence": _speedups.is_utf8_by_sequence, "decode": bytes.decode}
    results = {}
    for script, words in TEXTS.items():
        data = sample(words, args.kib * 1024)
        results[script] = {name: best_us(check, data, args.number, args.repeat) for name, check in checks.items()}
        print(f"{script:11s} {len(data)} bytes, µs per call: {results[script]}", flush=True)
    save_result("crawl_utf8", {"avx2": _speedups.has_avx2(), "bytes": args.kib * 1024, "us_per_call": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
