"""Raw text to token shards: read, filter, deduplicate, split, tokenize, write with a manifest.

Inputs (:func:`read_inputs`): ``.txt`` files (a whole file, each paragraph, or each line is a
document), ``.jsonl`` files (one JSON object per line, text in a configurable field), ``.parquet``
files (a text column), folders of those (recursively, in sorted order), and, when the optional
``datasets`` package is installed, a HuggingFace dataset name streamed from the Hub.

Pipeline (:func:`prepare`), one pass over the documents in input order:

1. quality rules of :mod:`nanoseek.data.filters` (first failing rule names the reason);
2. exact dedup, then MinHash near-dedup, each keeping the first occurrence;
3. split: kept documents 0, k, 2k, ... go to ``val`` where k = 1 / ``val_fraction`` (so even a
   tiny corpus has a validation document, and the share is exact); the rest to ``train``;
4. tokenize as ``[BOS] + encode_text(text)`` (a control-token string in a document stays text)
   and append to the split's shards (:mod:`.shards`).

With no tokenizer given, one is trained on the kept ``train`` documents first (they are staged
to a temporary file, so a streamed input is read once) and saved in ``OUT/tokenizer``.

Nothing is silently dropped. ``manifest.json`` counts every input document as kept or dropped by
reason, so ``input.documents == kept_documents + sum(dropped.values())``. A malformed JSONL line
(bad JSON, not an object, missing or non-string text field, invalid UTF-8) is an error naming
``file:line``; with ``skip_bad_lines`` it is skipped and counted under ``input.bad_lines`` with
examples. Blank JSONL lines and invalid UTF-8 in ``.txt`` files (decoded as U+FFFD, which the
``non_text`` rule then judges) are counted too. ``dump_rejected`` writes each dropped document
with its reason and origin to a JSONL file: built beside it and moved into place when the run
succeeds, never over an existing file without ``overwrite``, never one of the inputs or a path
inside the output folder.

The output folder is claimed and locked (:mod:`nanoseek.outdir`): a non-empty folder that holds
no prepared data is refused unless ``overwrite``, and prepared data is replaced only with
``overwrite``. Every input is checked before anything is written, the new data is built in a
hidden folder inside ``OUT`` and moved into place only when it is complete, so a failure (a
mistyped input, every document filtered out, Ctrl-C) leaves the old data intact; only files
this module writes (:func:`is_data_file`) are ever replaced or removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from nanoseek.data.filters import ExactDeduper, FilterConfig, NearDeduper, check_document
from nanoseek.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, SplitWriter, token_dtype, write_manifest
from nanoseek.data.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_MODES = ("file", "paragraph", "line")
MAX_EXAMPLES = 20


class DataError(ValueError):
    """Bad input data or arguments: the message names the file, line and field."""


@dataclass
class Document:
    text: str
    origin: str  # "path:line", "path: row N", "hf:name:N", "task:<problem id>", ...


@dataclass
class PrepareConfig:
    """Settings of :func:`prepare`; the CLI flags of ``nanoseek data prepare`` map onto these."""

    text_field: str = "text"
    txt_mode: str = "file"                  # a .txt document is the whole file, a paragraph or a line
    val_fraction: float = 0.01
    filters: FilterConfig | None = field(default_factory=FilterConfig)  # None: no quality rules
    exact_dedup: bool = True
    near_dedup_threshold: float | None = 0.8  # None or 0: no near-dedup
    shard_tokens: int = 1 << 24
    skip_bad_lines: bool = False
    dump_rejected: Path | None = None
    max_docs: int | None = None             # stop reading after this many input documents
    vocab_size: int = 2048                  # when a tokenizer is trained here
    hf_split: str = "train"
    hf_config: str | None = None
    overwrite: bool = False


class InputStats:
    """What reading the inputs saw, beyond the documents themselves."""

    def __init__(self, skip_bad_lines: bool = False):
        self.skip_bad_lines = skip_bad_lines
        self.sources: list[dict[str, Any]] = []
        self.bad_lines: Counter[str] = Counter()
        self.bad_line_examples: list[str] = []
        self.blank_lines = 0
        self.utf8_replaced: list[str] = []
        self.ignored_files: list[str] = []
        self.stopped_at_max_docs = False

    def bad(self, reason: str, message: str) -> None:
        """A malformed record: an error, or (skip_bad_lines) counted with an example."""
        if not self.skip_bad_lines:
            raise DataError(f"{message} (pass --skip-bad-lines to skip and count such records)")
        self.bad_lines[reason] += 1
        if len(self.bad_line_examples) < MAX_EXAMPLES:
            self.bad_line_examples.append(message)

    def to_dict(self, documents: int) -> dict[str, Any]:
        return {
            "documents": documents, "bad_lines": dict(sorted(self.bad_lines.items())),
            "bad_line_examples": self.bad_line_examples, "blank_lines": self.blank_lines,
            "utf8_replaced": len(self.utf8_replaced), "utf8_replaced_examples": self.utf8_replaced[:MAX_EXAMPLES],
            "ignored_files": self.ignored_files, "stopped_at_max_docs": self.stopped_at_max_docs,
        }


# ---------------------------------------------------------------------- readers
def _decode(raw: bytes, where: str, stats: InputStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.utf8_replaced.append(where)
        return raw.decode("utf-8", errors="replace")


def read_txt(path: Path, mode: str, stats: InputStats) -> Iterator[Document]:
    if mode not in TXT_MODES:
        raise DataError(f"txt mode must be one of {TXT_MODES}, got {mode!r}")
    text = _decode(path.read_bytes(), str(path), stats)
    if mode == "file":
        yield Document(text, str(path))
        return
    lines = text.split("\n")
    if mode == "line":
        for i, line in enumerate(lines, 1):
            if line.strip():
                yield Document(line, f"{path}:{i}")
        return
    para: list[str] = []
    first = 0
    for i, line in enumerate(lines + [""], 1):
        if line.strip():
            if not para:
                first = i
            para.append(line)
        elif para:
            yield Document("\n".join(para), f"{path}:{first}")
            para = []


def read_jsonl(path: Path, text_field: str, stats: InputStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            if not raw.strip():
                stats.blank_lines += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.bad("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad("malformed_json", f"{where}: malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(record, dict):
                stats.bad("not_an_object", f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            if text_field not in record:
                keys = ", ".join(list(record)[:10]) or "none"
                stats.bad("missing_field", f"{where}: no field {text_field!r} (fields: {keys}); "
                                           "choose the text field with --text-field")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                stats.bad("not_a_string", f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
                continue
            yield Document(text, where)


def read_parquet(path: Path, text_field: str, stats: InputStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                        "choose the text column with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                what = "null" if value is None else type(value).__name__
                stats.bad("not_a_string", f"{path}: row {row}: column {text_field!r} is {what}, not a string")
                continue
            yield Document(value, f"{path}: row {row}")


def read_hf_dataset(name: str, text_field: str, split: str, config: str | None,
                    stats: InputStats) -> Iterator[Document]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(f"{name}: not a file, and the optional 'datasets' package is not installed "
                        "(pip install datasets to stream HuggingFace datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, gated dataset...
        raise DataError(f"{name}: cannot stream HuggingFace dataset (split {split!r}): {e}") from e
    for i, record in enumerate(ds, 1):
        where = f"hf:{name}:{split}: row {i}"
        if text_field not in record:
            stats.bad("missing_field", f"{where}: no field {text_field!r} (fields: {', '.join(record)}); "
                                       "choose the text field with --text-field")
            continue
        if not isinstance(record[text_field], str):
            stats.bad("not_a_string", f"{where}: field {text_field!r} is not a string")
            continue
        yield Document(record[text_field], where)


def _expand(path: Path, stats: InputStats) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            if p.suffix in SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts):
                files.append(p)
            else:
                stats.ignored_files.append(str(p))
    if not files:
        raise DataError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
    return files


def read_inputs(inputs: Iterable[str | Path], cfg: PrepareConfig, stats: InputStats) -> Iterator[Document]:
    """Documents of every input in order; records each source in ``stats.sources``.

    Every input is checked here, before the first document is read (a missing file, an empty
    folder, an unsupported type raise DataError now), so a command can validate all of its
    inputs before it touches its output folder.
    """
    plan: list[tuple[str | Path, list[Path | None]]] = []
    for item in inputs:
        path = Path(item)
        if path.exists():
            plan.append((item, _expand(path, stats)))
        elif (path.suffix in SUFFIXES or str(item).startswith((".", "/", "~")) or str(item).endswith("/")
              or (path.parent != Path(".") and path.parent.is_dir())):     # a mistyped local path
            raise DataError(f"{path}: no such file or folder")
        else:  # not a path: a HuggingFace dataset name like "roneneldan/TinyStories"
            plan.append((item, [None]))
    return _read_planned(plan, cfg, stats)


def _read_planned(plan: list[tuple[str | Path, list[Path | None]]], cfg: PrepareConfig,
                  stats: InputStats) -> Iterator[Document]:
    total = 0
    for item, files in plan:
        for file in files:
            if file is None:
                kind, it = "huggingface", read_hf_dataset(str(item), cfg.text_field, cfg.hf_split,
                                                          cfg.hf_config, stats)
            elif file.suffix == ".txt":
                kind, it = "txt", read_txt(file, cfg.txt_mode, stats)
            elif file.suffix == ".jsonl":
                kind, it = "jsonl", read_jsonl(file, cfg.text_field, stats)
            else:
                kind, it = "parquet", read_parquet(file, cfg.text_field, stats)
            source = {"path": str(file if file is not None else item), "kind": kind, "documents": 0}
            stats.sources.append(source)
            for doc in it:
                if cfg.max_docs is not None and total >= cfg.max_docs:
                    stats.stopped_at_max_docs = True
                    return
                source["documents"] += 1
                total += 1
                yield doc


# ---------------------------------------------------------------------- the pipeline
def is_val(index: int, fraction: Fraction) -> bool:
    """Whether kept document ``index`` goes to val: indices 0, k, 2k, ... for fraction 1/k."""
    return fraction > 0 and math.floor(index * fraction) > math.floor((index - 1) * fraction)


_DATA_FILE_RE = re.compile(r"^(train|val)_(\d{5}\.(bin|idx)|origins\.txt)$")
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})


def is_data_file(name: str) -> bool:
    """Whether ``name`` (in an output folder) is a file :func:`prepare` writes: what it may replace."""
    return name in (MANIFEST, "tokenizer", ".staging.jsonl") or bool(_DATA_FILE_RE.match(name))


def is_data_manifest(path: Path) -> bool:
    """Whether ``path`` is a manifest :func:`prepare` wrote (JSON with this format and version), not
    just a file of that name (a web app's manifest.json)."""
    from nanoseek.atomic import read_record

    try:
        data = json.loads(read_record(path))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT and data.get("format_version") == FORMAT_VERSION


def _check_foreign_manifest(out_dir: Path) -> None:
    """A ``manifest.json`` that is not a data manifest (a web app's) is never replaced, --overwrite or not."""
    manifest = out_dir / MANIFEST
    if (manifest.exists() or manifest.is_symlink()) and not is_data_manifest(manifest):
        raise DataError(f"{manifest} is not a nanoseek data manifest, and prepare would write its own there; "
                        "nanoseek never replaces files it did not write: choose another --out")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Prepared data already there needs ``overwrite``; a ``manifest.json`` that is not a data manifest
    is never replaced; a file or folder clash in tokenizer/ is refused."""
    from nanoseek.atomic import ReplaceRefused, check_replaceable

    manifest = out_dir / MANIFEST
    _check_foreign_manifest(out_dir)
    if manifest.exists() and not overwrite:
        raise DataError(f"{out_dir} already holds prepared data ({MANIFEST}); pass --overwrite to replace it")
    try:
        check_replaceable(out_dir / "tokenizer", TOKENIZER_FILES.__contains__, "tokenizer files")
    except ReplaceRefused as e:
        raise DataError(str(e)) from None


def _install(build: Path, out_dir: Path) -> None:
    """Move the finished data from ``build`` into ``out_dir``, replacing only files :func:`prepare` writes.

    The old manifest goes first (a reader in between sees "no prepared data", never a mix), then
    the shards (an old shard the new data does not have is removed), the tokenizer folder in one
    swap, and the new manifest last.
    """
    from nanoseek.atomic import replace_dir

    (out_dir / MANIFEST).unlink(missing_ok=True)
    new = {p.name for p in build.iterdir()}
    for p in out_dir.iterdir():
        if _DATA_FILE_RE.match(p.name) and p.name not in new and p.is_file():
            p.unlink()
    for name in sorted(new - {MANIFEST, "tokenizer"}):
        os.replace(build / name, out_dir / name)
    if (build / "tokenizer").is_dir():
        replace_dir(build / "tokenizer", out_dir / "tokenizer", TOKENIZER_FILES.__contains__, "tokenizer files")
    os.replace(build / MANIFEST, out_dir / MANIFEST)


def prepare(documents: Iterable[Document], out_dir: str | Path, tokenizer: Tokenizer | None = None,
            cfg: PrepareConfig | None = None, stats: InputStats | None = None,
            sources: list[dict[str, Any]] | None = None, log: Any = None) -> dict[str, Any]:
    """Filter, dedup, split, tokenize and write ``documents`` to ``out_dir``; returns the manifest.

    ``tokenizer=None`` trains one (``cfg.vocab_size``) on the kept train documents. ``sources``
    describes the inputs for the manifest (default: what ``stats`` recorded while reading).
    ``log`` is an optional ``print``-like callable for progress lines.
    """
    from nanoseek.outdir import claim

    cfg = cfg or PrepareConfig()
    stats = stats or InputStats(cfg.skip_bad_lines)
    out_dir = Path(out_dir)
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {cfg.val_fraction}")
    _check_foreign_manifest(out_dir)
    dump = _check_dump_target(cfg, out_dir)
    with claim(out_dir, "data prepare", flag="--out", own=lambda p: is_data_manifest(p / MANIFEST),
               overwrite=cfg.overwrite, overwrite_flag="--overwrite",
               replaces=is_data_file):
        _check_out_dir(out_dir, cfg.overwrite)
        build = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
        # the dropped documents go to a file beside the target, which replaces it only at the end
        rejected = Path(tempfile.mkstemp(prefix=f".{dump.name}.", dir=dump.parent)[1]) if dump else None
        try:
            manifest = _prepare_into(documents, build, tokenizer, cfg, stats, sources, log, out_dir, rejected)
            _install(build, out_dir)
            if rejected is not None:
                os.replace(rejected, dump)
        finally:
            shutil.rmtree(build, ignore_errors=True)
            if rejected is not None:
                rejected.unlink(missing_ok=True)
    return manifest


def _check_dump_target(cfg: PrepareConfig, out_dir: Path) -> Path | None:
    """``dump_rejected`` as a path that may be written: not a folder, in an existing folder outside
    ``out_dir``, and an existing file only with ``overwrite`` (the CLI also refuses an input file)."""
    if not cfg.dump_rejected:
        return None
    dump = Path(cfg.dump_rejected)
    flag = f"--dump-rejected {dump}"
    if dump.is_dir():
        raise DataError(f"{flag}: is a folder; name a file")
    if not dump.parent.is_dir():
        raise DataError(f"{flag}: the folder {dump.parent} does not exist")
    if dump.resolve().is_relative_to(out_dir.resolve()):
        raise DataError(f"{flag}: is inside --out {out_dir}; write it elsewhere")
    if (dump.exists() or dump.is_symlink()) and not cfg.overwrite:
        raise DataError(f"{flag}: exists; pass --overwrite to replace it, or choose another path")
    return dump


def _prepare_into(documents: Iterable[Document], out_dir: Path, tokenizer: Tokenizer | None, cfg: PrepareConfig,
                  stats: InputStats, sources: list[dict[str, Any]] | None, log: Any, final_dir: Path,
                  rejected_path: Path | None = None) -> dict[str, Any]:
    """The pipeline of :func:`prepare`, writing into the build folder ``out_dir`` (and the dropped
    documents into ``rejected_path``)."""
    fraction = Fraction(str(cfg.val_fraction))
    dropped: Counter[str] = Counter()
    counts = {"input": 0, "kept": 0, "next_log": 100_000}
    exact = ExactDeduper() if cfg.exact_dedup else None
    near = NearDeduper(threshold=cfg.near_dedup_threshold) if cfg.near_dedup_threshold else None
    rejected = open(rejected_path, "w", encoding="utf-8") if rejected_path is not None else None

    def drop(doc: Document, reason: str) -> None:
        dropped[reason] += 1
        if rejected is not None:
            rejected.write(json.dumps({"reason": reason, "origin": doc.origin, "text": doc.text},
                                      ensure_ascii=False) + "\n")

    def settle(pending: list[Document]) -> Iterator[tuple[Document, str]]:
        # near-dedup runs on batches (MinHash.bulk); order and results equal one-by-one
        flags = near.duplicates([d.text for d in pending]) if near is not None else [False] * len(pending)
        for doc, duplicate in zip(pending, flags):
            if duplicate:
                drop(doc, "near_duplicate")
                continue
            split = "val" if is_val(counts["kept"], fraction) else "train"
            counts["kept"] += 1
            yield doc, split
        pending.clear()
        if log and counts["input"] >= counts["next_log"]:
            counts["next_log"] += 100_000
            log(f"  read {counts['input']:,} documents, kept {counts['kept']:,}")

    def kept() -> Iterator[tuple[Document, str]]:
        pending: list[Document] = []
        for doc in documents:
            counts["input"] += 1
            reason = check_document(doc.text, cfg.filters) if cfg.filters is not None else None
            if reason is None and exact is not None and exact.is_duplicate(doc.text):
                reason = "exact_duplicate"
            if reason is not None:
                drop(doc, reason)
                continue
            pending.append(doc)
            if len(pending) == 1024:
                yield from settle(pending)
        yield from settle(pending)

    try:
        stream: Iterable[tuple[Document, str]] = kept()
        if tokenizer is None:
            stream, tokenizer = _stage_and_train(stream, out_dir, cfg, log)
        else:
            tokenizer.save(out_dir / "tokenizer")
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {s: SplitWriter(out_dir, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        batch: list[tuple[Document, str]] = []

        def flush() -> None:
            for (doc, split), ids in zip(batch, tokenizer.encode_text_batch([d.text for d, _ in batch])):
                writers[split].add([tokenizer.document_start_id] + ids, doc.origin)
            batch.clear()

        for item in stream:
            batch.append(item)
            if len(batch) == 512:
                flush()
        flush()
        splits = {s: w.close() for s, w in writers.items()}
    finally:
        if rejected is not None:
            rejected.close()
        (out_dir / ".staging.jsonl").unlink(missing_ok=True)

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tokenizer": {"hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.document_start_id,
                      "eos_id": tokenizer.eos_id, "dir": "tokenizer"},
        "dtype": dtype.name,
        "sources": sources if sources is not None else stats.sources,
        "input": stats.to_dict(counts["input"]),
        "filters": cfg.filters.to_dict() if cfg.filters is not None else None,
        "dedup": {"exact": cfg.exact_dedup, "near_threshold": cfg.near_dedup_threshold or None,
                  "near_num_perm": near.num_perm if near else None, "near_shingle_words": near.shingle if near else None},
        "dropped": dict(sorted(dropped.items())),
        "kept_documents": counts["kept"],
        "val_fraction": cfg.val_fraction,
        "splits": splits,
    }
    assert counts["input"] == counts["kept"] + sum(dropped.values())
    if splits["train"]["documents"] == 0:
        raise DataError(f"no training documents left: {counts['input']} read, dropped "
                        f"{dict(dropped) or 'none'}, {splits['val']['documents']} in val "
                        f"(nothing was written to {final_dir}; loosen --filters-config or add data)")
    write_manifest(out_dir, manifest)
    return manifest


def _read_staged(path: Path) -> Iterator[tuple[Document, str]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield Document(r["text"], r["origin"]), r["split"]


def _stage_and_train(stream: Iterable[tuple[Document, str]], out_dir: Path, cfg: PrepareConfig,
                     log: Any) -> tuple[Iterator[tuple[Document, str]], Tokenizer]:
    """Stage the kept documents to disk, train a tokenizer on the train ones; (staged stream, tokenizer)."""
    path = out_dir / ".staging.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc, split in stream:
            f.write(json.dumps({"text": doc.text, "origin": doc.origin, "split": split}, ensure_ascii=False) + "\n")
    if log:
        log(f"  training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the kept train documents")
    tokenizer = Tokenizer.train((doc.text for doc, split in _read_staged(path) if split == "train"), cfg.vocab_size)
    tokenizer.save(out_dir / "tokenizer")
    return _read_staged(path), tokenizer


def prepare_inputs(inputs: list[str | Path], out_dir: str | Path, tokenizer: Tokenizer | None = None,
                   cfg: PrepareConfig | None = None, log: Any = None) -> dict[str, Any]:
    """:func:`read_inputs` + :func:`prepare`: files, folders or HF dataset names to shards."""
    cfg = cfg or PrepareConfig()
    if not inputs:
        raise DataError("no inputs given")
    stats = InputStats(cfg.skip_bad_lines)
    return prepare(read_inputs(inputs, cfg, stats), out_dir, tokenizer, cfg, stats, log=log)
