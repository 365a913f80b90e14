"""Caption language, offline: py3langid, whose model ships inside its PyPI wheel.

One identifier per process, loaded on first use (about 0.3 s); about 30 µs per
caption. Probabilities are normalised, so ``confidence`` reads as "how sure":
short captions often score low, which is why the filter only rejects for language
above a confidence floor (``FilterConfig.min_language_confidence``).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, confidence 0-1) of ``text``."""
    code, confidence = _identifier().classify(text)
    return str(code), float(confidence)
