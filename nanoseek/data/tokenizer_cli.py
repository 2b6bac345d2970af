"""``nanoseek tokenizer``: train a byte-level BPE tokenizer, or see how a text tokenizes.

  nanoseek tokenizer train --input corpus.jsonl books/ --vocab-size 2048 --out runs/tok
  nanoseek tokenizer train --default-corpus --vocab-size 2048 --out runs/tok
  nanoseek tokenizer encode --tokenizer runs/tok "What is 12 + 35?"

``train`` reads the same inputs as ``nanoseek data prepare`` (.txt, .jsonl, .parquet, folders, a
HuggingFace dataset name), skips documents the quality filters reject (so a flood of "MMMM"
posts does not buy merges), and writes ``tokenizer.json`` + ``tokenizer_config.json`` that
``transformers.AutoTokenizer`` loads, chat template included. ``nanoseek data prepare`` without
``--tokenizer`` trains one the same way on its kept training documents. ``--out`` is claimed
like every output folder (``nanoseek.outdir``): another command's folder needs ``--overwrite``,
only tokenizer files are ever replaced, and they are replaced only after training succeeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek import limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train byte-level BPE on a corpus",
                       description="Train byte-level BPE (digits split one by one) and save it for nanoseek and HF.")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH",
                     help=".txt/.jsonl/.parquet files, folders of them, or a HuggingFace dataset name")
    src.add_argument("--default-corpus", action="store_true",
                     help="train on the embedded default corpus (generated problems + shipped prose)")
    t.add_argument("--vocab-size", type=limits.positive_int, default=2048,
                   help="vocabulary size including the 256 bytes and 7 special tokens (default 2048)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder another command wrote: replaces its tokenizer.json, "
                        "tokenizer_config.json and special_tokens_map.json; every other file is kept")
    t.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text (default text)")
    t.add_argument("--txt-mode", choices=("file", "paragraph", "line"), default="file",
                   help="what one document of a .txt file is (default: the whole file)")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines instead of stopping")
    t.add_argument("--max-docs", type=limits.positive_int, metavar="N", help="read at most N documents")
    t.add_argument("--no-filters", action="store_true", help="train on every document, skipping the quality filters")
    t.add_argument("--min-frequency", type=limits.positive_int, default=2,
                   help="least count of a pair to merge (default 2)")
    t.add_argument("--task-docs", type=limits.nonneg_int, default=20_000,
                   help="--default-corpus: generated problems (default 20000)")
    t.add_argument("--seed", type=limits.seed, default=0, help="--default-corpus: generator seed (default 0)")
    e = sub.add_parser("encode", help="show the tokens of a text", description="Print the tokens and ids of a text.")
    e.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    e.add_argument("text", help="the text to encode")


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError
    from nanoseek.data.prepare import DataError
    from nanoseek.data.tokenizer import Tokenizer, TokenizerError

    try:
        if args.action == "encode":
            tok = Tokenizer.load(args.tokenizer)
            ids = tok.encode(args.text)
            print(" ".join(f"{tok.id_to_token(i)}:{i}" for i in ids))
            print(f"{len(ids)} tokens, {len(args.text)} characters; round trip ok: {tok.decode(ids) == args.text}")
            return 0
        with _claim_out(args):
            texts, counter = _training_texts(args)
            tok = Tokenizer.train(texts, args.vocab_size, min_frequency=args.min_frequency)
            _save_beside(tok, Path(args.out))
    except (DataError, TokenizerError, ValueError) as e:
        raise UserError(str(e)) from e
    print(f"trained on {counter['kept']:,} documents ({counter['filtered']:,} rejected by the quality filters)")
    print(f"vocab size {tok.vocab_size} (asked {args.vocab_size}), hash {tok.hash[:16]}; saved to {args.out}")
    return 0


def _claim_out(args: argparse.Namespace):
    """Claim ``--out`` (nanoseek.outdir): only this command's earlier output (its marker) is
    rewritten without ``--overwrite``: a folder that merely holds tokenizer files (a downloaded
    HF tokenizer) is not. With ``--overwrite`` the tokenizer files are replaced and every other
    file stays; a prepared data folder's ``tokenizer/`` is never replaced (its shards were made
    with it)."""
    import os

    from nanoseek.atomic import ReplaceRefused, check_replaceable
    from nanoseek.errors import UserError
    from nanoseek.data.prepare import TOKENIZER_FILES, is_data_manifest
    from nanoseek.outdir import check_claimable, claim

    out = Path(args.out)
    parent = Path(os.path.abspath(out)).parent
    if is_data_manifest(parent / "manifest.json"):
        raise UserError(f"--out {out}: the tokenizer of the prepared data in {parent}, whose shards "
                        "were made with it; choose another --out")
    kw = dict(flag="--out", overwrite=args.overwrite, overwrite_flag="--overwrite",
              replaces=TOKENIZER_FILES.__contains__)
    check_claimable(out, "tokenizer train", **kw)
    try:
        check_replaceable(out, TOKENIZER_FILES.__contains__, "tokenizer files")
    except ReplaceRefused as e:
        raise UserError(f"--out {e}") from None
    return claim(out, "tokenizer train", **kw)


def _save_beside(tok, out: Path) -> None:
    """Save into a hidden folder next to ``out`` and swap it in (tokenizer files are replaced, the rest stays)."""
    import shutil
    import tempfile

    from nanoseek.atomic import replace_dir
    from nanoseek.data.prepare import TOKENIZER_FILES

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok.save(tmp)
        replace_dir(tmp, out, TOKENIZER_FILES.__contains__, "tokenizer files")   # an old special_tokens_map goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _training_texts(args: argparse.Namespace):
    """(iterator of training texts, counter dict filled while it is consumed)."""
    from nanoseek.data.filters import FilterConfig, check_document
    from nanoseek.data.prepare import InputStats, PrepareConfig, read_inputs

    counter = {"kept": 0, "filtered": 0}
    if args.default_corpus:
        from nanoseek.data.corpus import default_corpus_records
        docs = default_corpus_records(args.task_docs, seed=args.seed)
    else:
        cfg = PrepareConfig(text_field=args.text_field, txt_mode=args.txt_mode,
                            skip_bad_lines=args.skip_bad_lines, max_docs=args.max_docs)
        docs = read_inputs(args.input, cfg, InputStats(args.skip_bad_lines))
    filters = None if args.no_filters else FilterConfig()

    def texts():
        for doc in docs:
            if filters is not None and check_document(doc.text, filters) is not None:
                counter["filtered"] += 1
                continue
            counter["kept"] += 1
            yield doc.text

    return texts(), counter
