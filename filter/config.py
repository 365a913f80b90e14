"""FilterConfig: every threshold of the decision stage, with its documented default.

The defaults are the ones the demo's ground truth was checked against
(BENCHMARKS.md, curation): change one and the decisions change, so a run's config
is stored with its decisions in ``_filter_stats.json``. Where the passes' tasks run
is ``core.executor.Execution``, the options every stage shares (``--distributor``,
``--workers``, ``--max_retries``, ``--max_in_flight``, ``--ray_address``,
``--progress``); the decisions do not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import at_least, option, problem, require
from core.executor import Execution


@dataclass
class FilterConfig(Execution):
    pool: str = option("", "pool folder written by ingest (local or s3://)")
    output_folder: str = option("", "where decisions go: {shard}.parquet + _filter_stats.json (local or s3://)")
    partition_rows: int = option(4_000_000, "entries per dedupe partition: bounds one worker's memory "
                                            "(about 40 bytes per entry)")
    overwrite: bool = option(False, "replace decisions in output_folder made from another pool or with other "
                                    "settings (without it, such a rerun stops and says what differs)")
    # -- captions -----------------------------------------------------------------
    min_caption_chars: int = option(5, "reject captions with fewer characters")
    min_caption_words: int = option(2, "reject captions with fewer words")
    reject_boilerplate_captions: bool = option(True, "reject captions that are a file name or a generic "
                                                     "word ('image', 'IMG_1234.jpg', 'untitled')")
    languages: list[str] = option([], "keep only captions detected in these languages (ISO 639-1, e.g. '[\"en\"]'); "
                  "empty: keep every language (the language is still recorded)")
    min_language_confidence: float = option(0.7, "reject for language only when the detector is at least "
                                                 "this sure (0-1): short captions are often ambiguous")
    # -- images -------------------------------------------------------------------
    min_image_size: int = option(64, "reject images whose original short side is smaller")
    max_aspect_ratio: float = option(3.0, "reject images more elongated than this (long / short side)")
    min_luma_std: float = option(4.0, "reject near-blank images: grey-level standard deviation of the "
                                      "content below this (0 turns the check off)")
    # -- dedupe -------------------------------------------------------------------
    dedupe_url: bool = option(True, "reject a URL (normalised) seen in an earlier successful row")
    dedupe_exact: bool = option(True, "reject image bytes (sha256) seen in an earlier acceptable row")
    dedupe_near: bool = option(True, "reject images whose pHash is within near_dup_threshold of an "
                                     "earlier acceptable image")
    near_dup_threshold: int = option(10, "Hamming distance (of 64 pHash bits) at or below which two images "
                                         "are near duplicates")
    near_dup_max_aspect_change: float = option(0.1, "near duplicates also differ by at most this in "
                                                    "log(width / height) (0.1: about 10 percent, a crop of 5 percent per side; "
                                                    "inf: no check)")
    near_dup_max_luma_change: float = option(1.5, "near duplicates also differ by at most this in grey-level "
                                                  "spread (luma_std; inf: no check)")
    near_dup_bands: int = option(0, "LSH bands (0: chosen from the row count for near_dup_recall)")
    near_dup_band_bits: int = option(0, "pHash bits per LSH band (0: chosen from the row count)")
    near_dup_recall: float = option(0.99, "with automatic bands: the chance that a pair exactly at the "
                                          "threshold becomes a candidate")
    # -- embeddings: CLIP score and semantic dedupe ---------------------------------
    embeddings: str = option("", "embeddings folder of this pool from `python -m apply.embed` (local or s3://): "
                                 "the CLIP score is the cosine of each sample's image and caption embeddings "
                                 "there, and semantic dedupe compares its image embeddings")
    clip_scores: str = option("", "folder of CLIP scores ({shard}.parquet: key, clip_score) from "
                                  "`python -m filter.clipscore`, read instead of the embeddings' cosines")
    clip_threshold: float | None = option(None, "reject samples whose CLIP score (cosine, -1..1) is below "
                                                "this (unset: no threshold)")
    clip_top_fraction: float = option(0.0, "keep only this fraction of the otherwise acceptable samples, "
                                           "best CLIP scores first (0: off)")
    semantic_dedupe_threshold: float | None = option(
        None, "reject an image whose embedding's cosine with an earlier acceptable image's is at least this "
        "(dup_semantic; e.g. 0.95; needs embeddings; unset: off)")
    # -- decontamination ----------------------------------------------------------
    decontaminate: str = option("", "evaluation images (a .tar of images, a folder of images, or a parquet "
                                    "with a phash column) whose near duplicates are dropped from the pool")
    decontaminate_threshold: int = option(-1, "Hamming distance for decontamination (-1: near_dup_threshold)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.pool:
            problem("pool: required (the folder ingest wrote)")
        require(self, "output_folder")
        at_least(self, 0, "min_image_size", "min_caption_chars", "min_caption_words", "near_dup_bands",
                 "near_dup_band_bits")
        if not self.max_aspect_ratio >= 1:
            problem(f"max_aspect_ratio={self.max_aspect_ratio}: must be at least 1")
        if not 0 <= self.near_dup_threshold < 64:
            problem(f"near_dup_threshold={self.near_dup_threshold}: must be in 0..63 (of 64 bits)")
        if self.near_dup_band_bits > 32:
            problem(f"near_dup_band_bits={self.near_dup_band_bits}: at most 32")
        if not 0 < self.near_dup_recall < 1:
            problem(f"near_dup_recall={self.near_dup_recall}: must be between 0 and 1")
        if self.partition_rows < 1000:
            problem(f"partition_rows={self.partition_rows}: at least 1000")
        if not 0 <= self.clip_top_fraction <= 1:
            problem(f"clip_top_fraction={self.clip_top_fraction}: must be in 0..1")
        if (self.clip_top_fraction or self.clip_threshold is not None) and not (self.clip_scores or self.embeddings):
            problem("clip_threshold / clip_top_fraction need embeddings (run `python -m apply.embed` over the "
                    "pool first) or clip_scores")
        if self.semantic_dedupe_threshold is not None:
            if not -1 <= self.semantic_dedupe_threshold <= 1:
                problem(f"semantic_dedupe_threshold={self.semantic_dedupe_threshold}: a cosine, in -1..1 (e.g. 0.95)")
            if not self.embeddings:
                problem("semantic_dedupe_threshold needs embeddings (run `python -m apply.embed` over the pool first)")
        if not 0 <= self.min_language_confidence <= 1:
            problem(f"min_language_confidence={self.min_language_confidence}: must be in 0..1")
        self.languages = [code.strip().lower() for code in self.languages if code.strip()]
        if self.languages:
            from filter.language import unknown_codes  # loads the detector (0.3 s): only when languages are given

            for line in unknown_codes(self.languages):
                problem(line)
        if self.decontaminate_threshold < 0:
            self.decontaminate_threshold = self.near_dup_threshold

    @property
    def uses_clip(self) -> bool:
        return bool(self.clip_scores or self.embeddings) and (self.clip_top_fraction > 0 or
                                                              self.clip_threshold is not None)
