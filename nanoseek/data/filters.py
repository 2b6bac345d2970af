"""Document quality filters and deduplication for the pre-training data pipeline.

Every rule is a pure function ``rule(text, cfg) -> reason | None``: it returns a short reason
(the key under which the drop is counted in the shard manifest) or ``None`` to keep the
document. :func:`check_document` runs them in :data:`RULES` order and returns the first reason.
The rules follow Gopher (Rae et al. 2021, "MassiveText" quality filters) plus two checks for the
failure that blows up small runs: a document dominated by one repeated character or word (the
classic case is a subreddit whose posts are only the letter "M": thousands of tokens the model
learns to predict perfectly, which drive its logits to extremes and end in a loss spike).

Defaults (``None`` disables a rule; "words" are whitespace-separated). The word-statistics rules
(word share, mean word length, symbols, n-grams) were calibrated by Gopher on prose, so they apply
only to documents with at least ``min_words_for_stats`` words containing a letter: a worked
Countdown solution legitimately repeats its expression, and short math snippets are judged by
the character rules alone (Gopher drops documents under 50 words; we keep them).

==================================  ===========  ==================================================
field                               default      drop the document when
==================================  ===========  ==================================================
min_chars                           16           it has fewer characters (after strip)
max_chars                           200,000      it has more characters
max_non_text_fraction               0.01         control chars (not tab/newline/CR), U+FFFD,
                                                 private-use or unassigned code points exceed it
max_char_fraction                   0.4          one non-space character is more than this share
                                                 of all non-space characters (the "MMMM" case)
max_word_fraction                   0.3          one word is more than this share of all words
min_compression_ratio               0.15         zlib-compressed / raw bytes is below it (long
                                                 verbatim repetition), for documents of at least
compression_min_bytes               400          this many UTF-8 bytes (short texts never compress)
min_mean_word_length                2.0          mean word length is outside [min, max]; Gopher
max_mean_word_length                10.0         uses [3, 10], lowered for equations like 7 + 5
max_symbol_word_ratio               0.1          ("#" + "..." + "…") per word exceeds it (Gopher)
max_bullet_line_fraction            0.9          more lines start with a bullet (Gopher)
max_ellipsis_line_fraction          0.3          more lines end with "..." or "…" (Gopher)
max_duplicate_line_fraction         0.3          more lines (of >= 3) are repeats of an earlier one
max_duplicate_line_char_fraction    0.2          more characters sit in repeated lines (Gopher)
max_top_ngram_char_fraction         2: 0.20,     the most frequent n-gram (seen twice or more)
                                    3: 0.18,     covers more of the word characters (Gopher)
                                    4: 0.16
max_duplicate_ngram_char_fraction   5: 0.15 ...  more word characters lie inside n-grams that
                                    10: 0.10     occur more than once (Gopher, 5..10-grams)
min_words_for_stats                 50           (see above: words with a letter)
==================================  ===========  ==================================================

Deduplication: :class:`ExactDeduper` drops a document whose normalised text (NFKC, case-folded,
whitespace collapsed) hashes like an earlier one; :class:`NearDeduper` drops one whose MinHash
(``datasketch``, word 5-gram shingles) has estimated Jaccard similarity above a threshold (0.8)
with an earlier kept document, found through ``MinHashLSH``. Both keep the first occurrence.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BULLETS = ("•", "●", "○", "◦", "▪", "‣", "·", "* ", "- ", "– ")
ELLIPSES = ("...", "…")
_WS = re.compile(r"\s+")
_ALPHA_WORD = re.compile(r"[^\W\d_]\S*")  # from a word's first letter to its end: one match per word


@dataclass
class FilterConfig:
    """Thresholds of the quality rules (table in the module docstring). ``None`` disables a rule."""

    min_chars: int | None = 16
    max_chars: int | None = 200_000
    max_non_text_fraction: float | None = 0.01
    max_char_fraction: float | None = 0.4
    max_word_fraction: float | None = 0.3
    min_compression_ratio: float | None = 0.15
    compression_min_bytes: int = 400
    min_mean_word_length: float | None = 2.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    max_top_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    min_words_for_stats: int = 50

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "filters config") -> FilterConfig:
        """Build from a JSON/TOML table; unknown keys and wrong types raise ``ValueError`` naming the key."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                raise ValueError(f"{where}: unknown filter setting {key!r} (known: {', '.join(sorted(names))})")
            if key.startswith("max_") and key.endswith("gram_char_fraction"):
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: {key} must be a table of n -> fraction")
                try:
                    value = {int(n): float(f) for n, f in value.items()}
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: {key}: {e}") from e
            elif isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
                raise ValueError(f"{where}: {key} must be a number or null, got {value!r}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            d[key] = {str(n): f for n, f in d[key].items()}
        return d


# ---------------------------------------------------------------------- rules
def length(text: str, cfg: FilterConfig) -> str | None:
    n = len(text.strip())
    if cfg.min_chars is not None and n < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and n > cfg.max_chars:
        return "too_long"
    return None


_ASCII_NON_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _is_non_text(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    if ch == "\ufffd":
        return True
    return unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")


def non_text(text: str, cfg: FilterConfig) -> str | None:
    if cfg.max_non_text_fraction is None or not text:
        return None
    if text.isascii():  # fast path: only ASCII control characters can be non-text
        bad = len(_ASCII_NON_TEXT.findall(text))
    else:
        bad = sum(1 for ch in text if _is_non_text(ch))
    return "non_text" if bad / len(text) > cfg.max_non_text_fraction else None


def repeated_char(text: str, cfg: FilterConfig) -> str | None:
    if cfg.max_char_fraction is None:
        return None
    chars = Counter(text)
    for ch in [ch for ch in chars if ch.isspace()]:
        del chars[ch]
    total = sum(chars.values())
    if total == 0:
        return None
    return "repeated_char" if chars.most_common(1)[0][1] / total > cfg.max_char_fraction else None


@functools.lru_cache(maxsize=4)
def _words(text: str) -> tuple[list[str], int]:
    """(whitespace-separated words, how many contain a letter); cached: several rules ask in a row."""
    return text.split(), len(_ALPHA_WORD.findall(text))


def _stat_words(text: str, cfg: FilterConfig) -> list[str] | None:
    """The words of ``text`` if it is long enough for word statistics (counting words with a letter)."""
    words, n_alpha = _words(text)
    return words if n_alpha >= cfg.min_words_for_stats else None


def repeated_word(text: str, cfg: FilterConfig) -> str | None:
    words = _stat_words(text, cfg)
    if cfg.max_word_fraction is None or words is None:
        return None
    top = Counter(words).most_common(1)[0][1]
    return "repeated_word" if top / len(words) > cfg.max_word_fraction else None


def compression(text: str, cfg: FilterConfig) -> str | None:
    if cfg.min_compression_ratio is None:
        return None
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < cfg.compression_min_bytes:
        return None
    return "low_compression" if len(zlib.compress(raw, 6)) / len(raw) < cfg.min_compression_ratio else None


def mean_word_length(text: str, cfg: FilterConfig) -> str | None:
    words = _stat_words(text, cfg)
    if words is None:
        return None
    mean = sum(map(len, words)) / len(words)
    if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
        return "mean_word_length"
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return "mean_word_length"
    return None


def symbol_ratio(text: str, cfg: FilterConfig) -> str | None:
    words = _stat_words(text, cfg)
    if cfg.max_symbol_word_ratio is None or words is None:
        return None
    symbols = text.count("#") + text.count("...") + text.count("…")
    return "symbol_ratio" if symbols / len(words) > cfg.max_symbol_word_ratio else None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def bullet_lines(text: str, cfg: FilterConfig) -> str | None:
    lines = _lines(text)
    if cfg.max_bullet_line_fraction is None or len(lines) < 3:
        return None
    bullets = sum(1 for line in lines if line.startswith(BULLETS))
    return "bullet_lines" if bullets / len(lines) > cfg.max_bullet_line_fraction else None


def ellipsis_lines(text: str, cfg: FilterConfig) -> str | None:
    lines = _lines(text)
    if cfg.max_ellipsis_line_fraction is None or len(lines) < 3:
        return None
    ends = sum(1 for line in lines if line.endswith(ELLIPSES))
    return "ellipsis_lines" if ends / len(lines) > cfg.max_ellipsis_line_fraction else None


def duplicate_lines(text: str, cfg: FilterConfig) -> str | None:
    lines = _lines(text)
    if len(lines) < 3:
        return None
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    if cfg.max_duplicate_line_fraction is not None and dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    total_chars = sum(map(len, lines))
    limit = cfg.max_duplicate_line_char_fraction
    if limit is not None and dup_chars / total_chars > limit:
        return "duplicate_line_chars"
    return None


def top_ngrams(text: str, cfg: FilterConfig) -> str | None:
    words = _stat_words(text, cfg)
    if words is None:
        return None
    total = sum(map(len, words))
    for n, limit in sorted(cfg.max_top_ngram_char_fraction.items()):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if not grams:
            continue
        gram, count = grams.most_common(1)[0]
        if count > 1 and count * sum(map(len, gram)) / total > limit:
            return f"top_{n}gram"
    return None


def duplicate_ngrams(text: str, cfg: FilterConfig) -> str | None:
    words = _stat_words(text, cfg)
    if words is None:
        return None
    total = sum(map(len, words))
    for n, limit in sorted(cfg.max_duplicate_ngram_char_fraction.items()):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        counts = Counter(grams)
        covered = bytearray(len(words))  # word positions inside a repeated n-gram, counted once
        for i, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[i:i + n] = b"\x01" * n
        dup = sum(len(w) for w, c in zip(words, covered) if c)
        if dup / total > limit:
            return f"duplicate_{n}gram"
    return None


RULES: list[tuple[str, Callable[[str, FilterConfig], str | None]]] = [
    ("length", length), ("non_text", non_text), ("repeated_char", repeated_char),
    ("repeated_word", repeated_word), ("compression", compression),
    ("mean_word_length", mean_word_length), ("symbol_ratio", symbol_ratio),
    ("bullet_lines", bullet_lines), ("ellipsis_lines", ellipsis_lines),
    ("duplicate_lines", duplicate_lines), ("top_ngrams", top_ngrams),
    ("duplicate_ngrams", duplicate_ngrams),
]


def check_document(text: str, cfg: FilterConfig | None = None) -> str | None:
    """The reason of the first rule that rejects ``text``, or ``None`` if every rule passes."""
    cfg = cfg or FilterConfig()
    for _, rule in RULES:
        reason = rule(text, cfg)
        if reason is not None:
            return reason
    return None


# ---------------------------------------------------------------------- deduplication
def normalise(text: str) -> str:
    """The text dedup compares: NFKC, case-folded, runs of whitespace as one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


class ExactDeduper:
    """Remembers a 128-bit hash of every normalised document seen."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True if an equal (normalised) document was seen before; otherwise remember this one."""
        key = hashlib.blake2b(normalise(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class NearDeduper:
    """MinHash-LSH near-duplicate detection over word ``shingle``-grams of the normalised text."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import MinHash, MinHashLSH  # heavy-ish import, only when deduplicating

        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self._MinHash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._kept: dict[str, Any] = {}

    def shingles(self, text: str) -> set[bytes]:
        words = normalise(text).split(" ")
        n = min(self.shingle, len(words))
        return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}

    def _minhashes(self, texts: list[str]) -> list[Any]:
        # MinHash.bulk shares one set of seeded permutations: ~2x faster than one MinHash per text;
        # zlib.crc32 as the base hash (C speed, 4x faster than the default sha1): MinHash only needs
        # distinct shingles to get distinct values; the seeded universal permutations do the rest
        return self._MinHash.bulk([sorted(self.shingles(t)) for t in texts], num_perm=self.num_perm,
                                  seed=self.seed, hashfunc=zlib.crc32)

    def duplicates(self, texts: list[str]) -> list[bool]:
        """For each text in order: True if it nearly duplicates an earlier remembered text (of this
        or a previous call); the others are remembered.

        LSH candidates are confirmed with the MinHash Jaccard estimate, so a banding collision
        below the threshold does not drop a document.
        """
        out = []
        for m in self._minhashes(texts):
            dup = any(m.jaccard(self._kept[key]) >= self.threshold for key in self._lsh.query(m))
            if not dup:
                key = str(len(self._kept))
                self._lsh.insert(key, m)
                self._kept[key] = m
            out.append(dup)
        return out

    def is_duplicate(self, text: str) -> bool:
        """:meth:`duplicates` of one text."""
        return self.duplicates([text])[0]
