"""``nanoseek data``: turn text into token shards for pre-training.

  nanoseek data prepare --input corpus.jsonl books/ --tokenizer runs/tok --out runs/data
  nanoseek data prepare --input roneneldan/TinyStories --max-docs 100000 --out runs/data
  nanoseek data prepare --default-corpus --task-docs 20000 --out runs/data
  nanoseek data corpus --task-docs 20000 --out corpus.jsonl
  nanoseek data inspect runs/data

``prepare`` reads .txt, .jsonl and .parquet files or folders (or streams a HuggingFace dataset
when the optional ``datasets`` package is installed), applies the quality filters and exact +
MinHash near-dedup, holds out a validation split, tokenizes (training a tokenizer first when
``--tokenizer`` is not given) and writes uint16/uint32 shards with ``manifest.json``: document
and token counts, every dropped document counted by reason, the tokenizer hash. Filter
thresholds (see ``nanoseek.data.filters``) can be changed with ``--filters-config`` (JSON or
TOML, keys of FilterConfig, optionally under a [filters] table).

``--out`` is claimed and locked like every output folder (``nanoseek.outdir``): prepared data
there, or a non-empty folder holding none, needs ``--overwrite``; every input is checked first
and the new data replaces the old only once it is complete, so a mistyped ``--input`` or a run
that filters everything out leaves the old data as it was.
"""

from __future__ import annotations

import argparse

from nanoseek import limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="filter, dedup, tokenize and shard a corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH",
                     help=".txt/.jsonl/.parquet files, folders of them, or a HuggingFace dataset name")
    src.add_argument("--default-corpus", action="store_true",
                     help="the embedded corpus: generated reasoning problems (train split) + shipped prose")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and manifest.json")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: train one into OUT/tokenizer)")
    p.add_argument("--vocab-size", type=limits.positive_int, default=2048,
                   help="vocab size when training a tokenizer (default 2048)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text (default text)")
    p.add_argument("--txt-mode", choices=("file", "paragraph", "line"), default="file",
                   help="what one document of a .txt file is (default: the whole file)")
    p.add_argument("--val-fraction", type=limits.prob, default=0.01,
                   help="share of kept documents held out for validation (default 0.01; document 0 always)")
    p.add_argument("--filters-config", metavar="FILE", help="JSON/TOML file overriding filter thresholds")
    p.add_argument("--no-filters", action="store_true", help="disable the quality filters (dedup still runs)")
    p.add_argument("--no-dedup", action="store_true", help="disable exact and near deduplication")
    p.add_argument("--near-dedup-threshold", type=limits.prob, default=0.8,
                   help="MinHash Jaccard similarity above which a document is a near duplicate; 0 disables")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSONL lines / parquet rows (counted in the manifest) instead of stopping")
    p.add_argument("--dump-rejected", metavar="PATH", help="write every dropped document with its reason (JSONL)")
    p.add_argument("--max-docs", type=limits.positive_int, metavar="N", help="read at most N input documents")
    p.add_argument("--shard-tokens", type=limits.positive_int, default=1 << 24,
                   help="tokens per shard file (default 16,777,216)")
    p.add_argument("--hf-split", default="train", help="split of a HuggingFace dataset (default train)")
    p.add_argument("--hf-config", help="config name of a HuggingFace dataset")
    p.add_argument("--overwrite", action="store_true",
                   help="replace prepared data already in --out, or write into a non-empty --out that holds none "
                        "(only files prepare writes are replaced; a failed run leaves the old data intact)")
    _corpus_arguments(p)
    c = sub.add_parser("corpus", help="write the embedded default corpus as JSONL",
                       description="Write the embedded default corpus ({'text', 'origin'} per line).")
    c.add_argument("--out", required=True, metavar="FILE.jsonl")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _corpus_arguments(c)
    i = sub.add_parser("inspect", help="summarise prepared data and show documents",
                       description="Print a manifest summary, verify the shards and decode a few documents.")
    i.add_argument("data", metavar="DIR", help="prepared data directory")
    i.add_argument("--split", default="train", choices=("train", "val"))
    i.add_argument("--show", type=limits.nonneg_int, default=2, metavar="N",
                   help="decode the first N documents (default 2)")


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-docs", type=limits.nonneg_int, default=20_000,
                   help="default corpus: generated problems, split evenly over the tasks (default 20000)")
    p.add_argument("--seed", type=limits.seed, default=0, help="default corpus: generator seed (default 0)")
    p.add_argument("--task-level", type=limits.positive_int,
                   help="default corpus: only this difficulty level (default: all mixed)")
    p.add_argument("--text-repeats", type=limits.positive_int, default=1,
                   help="default corpus: copies of each shipped prose document (default 1; >1 needs --no-dedup)")


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError
    from nanoseek.data.prepare import DataError
    from nanoseek.data.shards import ShardError
    from nanoseek.data.tokenizer import TokenizerError

    try:
        return {"prepare": _prepare, "corpus": _corpus, "inspect": _inspect}[args.action](args)
    except (DataError, ShardError, TokenizerError, ValueError, KeyError, OSError) as e:
        raise UserError(str(e).strip("'\"")) from e


def _load_filters(path: str | None, disabled: bool):
    import json
    import tomllib
    from pathlib import Path

    from nanoseek.data.filters import FilterConfig
    from nanoseek.data.prepare import DataError

    if disabled:
        return None
    if path is None:
        return FilterConfig()
    text = limits.read_text(path, "--filters-config")
    try:
        data = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot parse filters config: {e}") from e
    if isinstance(data.get("filters"), dict):
        data = data["filters"]
    return FilterConfig.from_dict(data, where=path)


def _check_not_an_input(dump: str | None, inputs: list[str]) -> None:
    """``--dump-rejected`` never names one of the inputs, ``--overwrite`` or not (it would be emptied)."""
    import os

    from nanoseek.data.prepare import DataError

    if dump is None or not os.path.exists(dump):
        return
    for path in inputs:
        if os.path.exists(path) and (os.path.samefile(dump, path) or (os.path.isdir(path) and
                                     os.path.realpath(dump).startswith(os.path.realpath(path) + os.sep))):
            raise DataError(f"--dump-rejected {dump}: is an input ({path}); write it elsewhere")


def _prepare(args: argparse.Namespace) -> int:
    import time

    from nanoseek.data.prepare import InputStats, PrepareConfig, prepare, read_inputs
    from nanoseek.data.tokenizer import Tokenizer

    cfg = PrepareConfig(
        text_field=args.text_field, txt_mode=args.txt_mode, val_fraction=args.val_fraction,
        filters=_load_filters(args.filters_config, args.no_filters), exact_dedup=not args.no_dedup,
        near_dedup_threshold=None if args.no_dedup else args.near_dedup_threshold,
        shard_tokens=args.shard_tokens, skip_bad_lines=args.skip_bad_lines, dump_rejected=args.dump_rejected,
        max_docs=args.max_docs, vocab_size=args.vocab_size, hf_split=args.hf_split, hf_config=args.hf_config,
        overwrite=args.overwrite)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    stats = InputStats(cfg.skip_bad_lines)
    sources = None
    if args.default_corpus:
        from nanoseek.data.corpus import DEFAULT_TASKS, default_corpus_records
        docs = default_corpus_records(args.task_docs, seed=args.seed, task_levels=args.task_level,
                                      text_repeats=args.text_repeats)
        sources = [{"path": "nanoseek default corpus", "kind": "default-corpus", "task_docs": args.task_docs,
                    "seed": args.seed, "tasks": list(DEFAULT_TASKS), "task_level": args.task_level,
                    "text_repeats": args.text_repeats}]
    else:
        _check_not_an_input(args.dump_rejected, args.input)
        docs = read_inputs(args.input, cfg, stats)
    t0 = time.time()
    m = prepare(docs, args.out, tokenizer, cfg, stats, sources=sources, log=print)
    seconds = time.time() - t0
    tokens = sum(s["tokens"] for s in m["splits"].values())
    print(f"{m['input']['documents']:,} documents read, {m['kept_documents']:,} kept, "
          f"{sum(m['dropped'].values()):,} dropped: {m['dropped'] or 'none'}")
    if m["input"]["bad_lines"]:
        print(f"skipped malformed records: {m['input']['bad_lines']}")
    for split, s in m["splits"].items():
        print(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    print(f"{tokens:,} tokens ({m['dtype']}) in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s); "
          f"wrote {args.out}/manifest.json")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from nanoseek.errors import UserError
    from nanoseek.data.corpus import write_default_corpus

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'corpus.jsonl'}")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it, or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")      # the old file stays until the new one is complete
    try:
        n = write_default_corpus(tmp, args.task_docs, seed=args.seed, task_levels=args.task_level,
                                 text_repeats=args.text_repeats)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {n:,} documents to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.data.shards import ShardSet
    from nanoseek.data.tokenizer import Tokenizer

    shards = ShardSet(args.data, args.split)  # verifies sizes and sha256 of every file
    m = shards.manifest
    print(f"{args.data}: tokenizer {m['tokenizer']['hash'][:16]} (vocab {m['tokenizer']['vocab_size']}), {m['dtype']}")
    print(f"input: {m['input']['documents']:,} documents; kept {m['kept_documents']:,}; dropped {m['dropped'] or 'none'}")
    for split, s in m["splits"].items():
        print(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {len(s['shards'])} shard(s)")
    print(f"{args.split}: all shard files match the manifest")
    tok_dir = Path(shards.dir) / m["tokenizer"]["dir"]
    tok = Tokenizer.load(tok_dir) if tok_dir.is_dir() else None
    for doc_id in range(min(args.show, shards.n_docs)):
        ids = shards.document(doc_id)
        print(f"--- document {doc_id} ({len(ids)} tokens) from {shards.origin(doc_id)}")
        print(tok.decode(ids) if tok is not None else ids[:64].tolist())
    return 0
