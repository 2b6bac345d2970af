"""Quality filters: each rule catches a crafted bad document and passes normal ones; dedup."""

from __future__ import annotations

import dataclasses
import random

import pytest

from nanoseek.data import filters as F
from nanoseek.data.corpus import plain_text_documents
from nanoseek.data.filters import ExactDeduper, FilterConfig, NearDeduper, check_document

WORDS = ("river stone garden window lantern copper orchard meadow harbor candle pepper silver thunder "
         "basket ladder marble violet canyon saddle pillow falcon ribbon timber walnut").split()


def prose(n_words: int, seed: int = 0) -> str:
    """Varied, line-broken filler prose of ``n_words`` words that passes every rule."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 8]) + "." for i in range(0, n_words, 8)]
    return "\n".join(lines) + "\n"


def random_words(n: int, length: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n))


def test_normal_documents_pass():
    from nanoseek.tasks.generators import TASKS, corpus_document

    cfg = FilterConfig()
    assert check_document(prose(200), cfg) is None
    for doc in plain_text_documents():
        assert check_document(doc.text, cfg) is None, doc.origin
    for name, task in TASKS.items():
        for p in task.generate("train", 60, seed=3):
            assert check_document(corpus_document(p), cfg) is None, corpus_document(p)


@pytest.mark.parametrize("doc", [
    "M", "MM", "M M M M M M M M M", "MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM",
    "M\n" * 300, "M " * 5000, "MMMM\nMM\nM\nMMMMMMM\nM M\n" * 50, "mmmmmMMMMMmmmmm" * 100,
])
def test_the_subreddit_of_M_is_caught(doc):
    assert check_document(doc) in ("too_short", "repeated_char")


CRAFTED = {
    "too_short": "Hi there.",
    "too_long": prose(30) * 2000,
    "non_text": prose(100).replace(".", ".\x00\x01"),
    "repeated_char": "ha" + "a" * 300 + " oh",
    "repeated_word": " ".join(w for pair in zip(prose(60).split(), ["hello"] * 60) for w in pair),
    "low_compression": "The cat sat on the mat and looked around the room. " * 30,
    "mean_word_length": random_words(80, 1, seed=1) + "\n" + random_words(60, 2, seed=2),
    "symbol_ratio": " ".join(f"{w} #tag{i}" for i, w in enumerate(prose(60).split())),
    "bullet_lines": "\n".join(f"• {line}" for line in prose(80).splitlines()),
    "ellipsis_lines": "\n".join(line[:-1] + "..." if i % 2 else line for i, line in enumerate(prose(80).splitlines())),
    "duplicate_lines": prose(80) + "\n".join(prose(80).splitlines()[:5]),
    "top_2gram": prose(60).replace(".", "") + " " + "new york " * 15,
    "duplicate_5gram": prose(60) + random_words(10, 5, seed=3) + " " + random_words(10, 5, seed=3)
                       + " " + random_words(10, 5, seed=3),
}


@pytest.mark.parametrize("reason", CRAFTED)
def test_each_rule_catches_its_crafted_document(reason):
    cfg = FilterConfig(max_chars=100_000)
    doc = CRAFTED[reason]
    assert check_document(doc, cfg) == reason


@pytest.mark.parametrize("field,reason,doc", [
    ("min_chars", "too_short", "Hi there."),
    ("max_non_text_fraction", "non_text", CRAFTED["non_text"]),
    ("max_char_fraction", "repeated_char", CRAFTED["repeated_char"]),
    ("max_word_fraction", "repeated_word", CRAFTED["repeated_word"]),
    ("min_compression_ratio", "low_compression", CRAFTED["low_compression"]),
    ("max_bullet_line_fraction", "bullet_lines", CRAFTED["bullet_lines"]),
    ("max_duplicate_line_fraction", "duplicate_lines", CRAFTED["duplicate_lines"]),
])
def test_none_disables_a_rule(field, reason, doc):
    assert check_document(doc, FilterConfig()) == reason
    assert check_document(doc, dataclasses.replace(FilterConfig(), **{field: None})) != reason


def test_rules_are_pure_functions_with_thresholds():
    cfg = FilterConfig()
    assert F.length("x" * 20, cfg) is None
    assert F.length("x" * 20, dataclasses.replace(cfg, max_chars=10)) == "too_long"
    doc = "a line that repeats\n" * 2 + "another distinct line here\n"
    assert F.duplicate_lines(doc, cfg) == "duplicate_lines"
    assert F.duplicate_lines(doc, dataclasses.replace(cfg, max_duplicate_line_fraction=None)) == "duplicate_line_chars"
    assert F.duplicate_lines(doc, dataclasses.replace(cfg, max_duplicate_line_fraction=None,
                                                      max_duplicate_line_char_fraction=None)) is None
    # replacement characters and private-use code points count as non-text, tabs and newlines do not
    assert F.non_text("ab\ufffd" * 10, cfg) == "non_text"
    assert F.non_text("ab\ue000" * 10, cfg) == "non_text"
    assert F.non_text("ab\t\n\r" * 10, cfg) is None
    # word statistics wait for enough words with letters: a long equation list is not judged by them
    equations = " ".join(f"{i} + {i} = {2 * i}" for i in range(100))
    assert F.mean_word_length(equations, cfg) is None
    assert F.mean_word_length(random_words(60, 1), cfg) == "mean_word_length"


def test_filter_config_from_dict():
    cfg = FilterConfig.from_dict({"min_chars": 5, "max_top_ngram_char_fraction": {"2": 0.5}, "max_chars": None})
    assert cfg.min_chars == 5 and cfg.max_chars is None and cfg.max_top_ngram_char_fraction == {2: 0.5}
    assert FilterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown filter setting 'min_char'"):
        FilterConfig.from_dict({"min_char": 5}, where="f.toml")
    with pytest.raises(ValueError, match="max_chars must be a number"):
        FilterConfig.from_dict({"max_chars": "lots"})


def test_exact_dedup_normalises_case_and_whitespace():
    d = ExactDeduper()
    assert not d.is_duplicate("The Fox and  the Grapes.\n")
    assert d.is_duplicate("the fox and the grapes.")
    assert d.is_duplicate("  THE FOX\tAND THE GRAPES.")
    assert not d.is_duplicate("The fox and the grapes!")


def test_near_dedup_catches_small_edits_only():
    base = prose(150, seed=7)
    words = base.split()
    edited = " ".join(words[:70] + ["changed"] + words[71:140] + ["also"] + words[141:])
    other = prose(150, seed=8)
    d = NearDeduper(threshold=0.8)
    assert d.duplicates([base, edited, other]) == [False, True, False]
    assert d.is_duplicate(base.upper())      # remembered across calls; normalised
    assert not d.is_duplicate(prose(150, seed=9))
    # one call with a batch gives what one-by-one calls give
    a, b = NearDeduper(), NearDeduper()
    texts = [base, other, edited, prose(40, seed=1), prose(40, seed=1) + " extra"]
    assert a.duplicates(texts) == [b.is_duplicate(t) for t in texts]


def test_near_dedup_keeps_distinct_generated_problems():
    from nanoseek.tasks.generators import TASKS, corpus_document

    d = NearDeduper()
    docs = [corpus_document(p) for name in ("arithmetic", "countdown") for p in TASKS[name].generate("train", 150)]
    assert sum(d.duplicates(docs)) == 0
