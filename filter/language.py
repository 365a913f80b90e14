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


# Language names a user may write instead of the code (the common ones; any other name gets the list).
_NAMES = {"english": "en", "french": "fr", "german": "de", "spanish": "es", "italian": "it", "portuguese": "pt",
          "dutch": "nl", "russian": "ru", "chinese": "zh", "japanese": "ja", "korean": "ko", "arabic": "ar",
          "hindi": "hi", "polish": "pl", "turkish": "tr", "swedish": "sv", "ukrainian": "uk", "czech": "cs",
          "greek": "el", "hebrew": "he", "vietnamese": "vi", "indonesian": "id", "danish": "da", "finnish": "fi",
          "norwegian": "no", "hungarian": "hu", "romanian": "ro", "thai": "th", "persian": "fa"}


def unknown_codes(codes: list[str]) -> list[str]:
    """One problem line per code the detector does not know (e.g. 'english' for 'en')."""
    known = set(_identifier().nb_classes)
    problems = []
    for code in codes:
        if code not in known:
            guess = _NAMES.get(code)
            problems.append(f"languages: {code!r} is not a language code the detector knows; "
                            + (f"did you mean {guess!r}?" if guess else "use ISO 639-1 codes, e.g. en, de, fr"))
    return problems


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, confidence 0-1) of ``text``."""
    code, confidence = _identifier().classify(text)
    return str(code), float(confidence)
