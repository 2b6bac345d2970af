"""The embedded default corpus: generated reasoning problems mixed with shipped CC0 prose.

``nanoseek data prepare --default-corpus`` and the speedrun need no download. The corpus is

* **task documents**: problems of :mod:`nanoseek.tasks.generators` (multi-step arithmetic with worked
  steps, Countdown, templated word problems, comparisons, remainders), each in one of many wordings
  (:mod:`nanoseek.tasks.phrasing`; ``NAME@fixed``: the one original wording), and of any reasoning-gym
  dataset named ``rg:NAME(config)``, drawn from the ``train`` split only, so the held-out ``test`` problems that evaluation and GRPO use never appear in
  pre-training (the split is decided by a hash of each problem's content, see ``tasks.py``).
  Each is rendered by ``tasks.corpus_document``: question, worked steps, ``Answer: X``. The
  sanity task ``digit7`` is left out by default so a GRPO run still has to learn it.
* **plain text**: the files in ``nanoseek/data/corpus/`` (Aesop's fables retold, short
  explanations of arithmetic, everyday stories), written for this project and dedicated to the
  public domain (CC0, see the README there). Documents are separated by a line ``---``.

The two are interleaved deterministically: tasks round-robin, the plain-text documents spread
evenly through the stream (``text_repeats`` times each). Generation with ``unique=False`` may
repeat an easy problem (there are only ~160 single-digit training sums); ``nanoseek data
prepare`` removes such repeats as exact or near duplicates and counts them in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from nanoseek.data.prepare import Document

CORPUS_DIR = Path(__file__).parent / "corpus"
DEFAULT_TASKS = ("arithmetic", "countdown", "word_problems", "compare", "modular")
SEPARATOR = "\n---\n"


def plain_text_documents() -> list[Document]:
    """The shipped prose, one :class:`Document` per ``---``-separated piece, in file order."""
    docs = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        for k, piece in enumerate(path.read_text(encoding="utf-8").split(SEPARATOR)):
            piece = piece.strip()
            if piece:
                title = piece.split("\n", 1)[0].strip()
                docs.append(Document(piece + "\n", f"corpus/{path.name}#{k}: {title}"))
    return docs


def task_documents(n: int, seed: int = 0, tasks: Sequence[str] = DEFAULT_TASKS,
                   task_levels: Mapping[str, int | None] | int | None = None,
                   tool_tasks: Sequence[str] = ()) -> Iterator[Document]:
    """``n`` train-split problems as documents, round-robin over ``tasks``.

    ``tasks``: reasoning-gym datasets (``rg:NAME(config)``: their train split, :func:`corpus_specs`),
    built-in names or specs with levels (``"arithmetic:1-2"``, see ``tasks.parse_task_specs``) and
    optionally a phrasing (``"arithmetic:1-2@fixed"``: the one original wording; default: varied wordings,
    :mod:`nanoseek.tasks.phrasing`).
    ``task_levels``: one level for every task, or a mapping task -> level (``None``: all levels
    in equal shares, the default); levels in a spec take precedence.
    ``tool_tasks``: built-in task names whose problems are written as their tool-using reply
    (``corpus_document(with_tool=True)``: the calculator call in plain text, nothing after it).
    """
    from nanoseek.tasks.generators import corpus_document, get_task

    specs = corpus_specs(tasks)
    if isinstance(task_levels, Mapping):
        unknown = set(task_levels) - {spec[0] for spec in specs if isinstance(spec, tuple)}
        if unknown:
            raise KeyError(f"task_levels names task(s) {sorted(unknown)} not in tasks {list(tasks)}")
    per_task = []
    for i, spec in enumerate(specs):
        count = n // len(specs) + (i < n % len(specs))
        if not isinstance(spec, tuple):     # another source's train split (reasoning-gym: its own seeds and hash split)
            per_task.append(iter(spec.problems("train", count, seed)))
            continue
        name, spec_levels, phrasing = spec
        task = get_task(name)
        level = task_levels.get(name) if isinstance(task_levels, Mapping) else task_levels
        level = spec_levels if spec_levels is not None else level
        per_task.append(iter(task.generate("train", count, seed=seed, level=level, unique=False, phrasing=phrasing)))
    while per_task:
        for it in list(per_task):
            problem = next(it, None)
            if problem is None:
                per_task.remove(it)
            else:
                yield Document(corpus_document(problem, problem.task in tool_tasks), f"task:{problem.id}")


def corpus_specs(tasks: str | Sequence[str]) -> list:
    """The corpus's task items: a built-in task as (name, levels, phrasing)
    (:func:`nanoseek.tasks.generators.parse_task_items`), an item of another registered source
    (``rg:NAME(config)``) as its task source, whose train split it draws; ValueError naming a bad item,
    or one for evaluation only."""
    from nanoseek.tasks.generators import parse_task_items, split_specs
    from nanoseek.tasks.sources import SOURCES, resolve

    out: list = []
    for item in split_specs(tasks):
        if item.partition(":")[0].strip().lower() in SOURCES:
            src = resolve(item)
            if not src.trainable or not src.has_gold:
                raise ValueError(f"task spec {item!r}: {src.name} has no training problems with gold answers "
                                 "to write as documents")
            out.append(src)
        else:
            out += parse_task_items([item])
    if not out:
        raise ValueError(f"task spec {tasks!r} names no task")
    return out


def default_corpus_records(n_task_docs: int, seed: int = 0,
                           task_levels: Mapping[str, int | None] | int | None = None,
                           tasks: Sequence[str] = DEFAULT_TASKS, text_repeats: int = 1,
                           tool_tasks: Sequence[str] = ()) -> Iterator[Document]:
    """The default corpus as :class:`Document` records (text and origin), deterministic per seed."""
    plain = plain_text_documents() * text_repeats
    total = n_task_docs + len(plain)
    # plain document j goes to stream position about (j + 1) * total / (len(plain) + 1)
    slots = {((j + 1) * total) // (len(plain) + 1): doc for j, doc in enumerate(plain)}
    task_iter = task_documents(n_task_docs, seed, tasks, task_levels, tool_tasks)
    for pos in range(total):
        yield slots[pos] if pos in slots else next(task_iter)


def default_corpus(n_task_docs: int, seed: int = 0,
                   task_levels: Mapping[str, int | None] | int | None = None,
                   tasks: Sequence[str] = DEFAULT_TASKS, text_repeats: int = 1) -> Iterator[str]:
    """The texts of :func:`default_corpus_records`."""
    for doc in default_corpus_records(n_task_docs, seed, task_levels, tasks, text_repeats):
        yield doc.text


def write_default_corpus(path: str | Path, n_task_docs: int, seed: int = 0,
                         task_levels: Mapping[str, int | None] | int | None = None,
                         tasks: Sequence[str] = DEFAULT_TASKS, text_repeats: int = 1) -> int:
    """Write the corpus as JSONL (``{"text", "origin"}`` per line) for ``nanoseek data prepare``."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in default_corpus_records(n_task_docs, seed, task_levels, tasks, text_repeats):
            f.write(json.dumps({"text": doc.text, "origin": doc.origin}, ensure_ascii=False) + "\n")
            n += 1
    return n
