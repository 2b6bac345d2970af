"""``nanoseek data prepare``: readers, counts that add up, errors naming file:line, shard checks."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from nanoseek.data.corpus import default_corpus, default_corpus_records, plain_text_documents, write_default_corpus
from nanoseek.data.prepare import DataError, PrepareConfig, is_val, prepare_inputs
from nanoseek.data.shards import ShardError, ShardSet, SplitWriter, token_dtype, write_manifest, FORMAT, FORMAT_VERSION
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.cli import UserError

PROSE = [d.text for d in plain_text_documents()]
NEAR = PROSE[3].replace(" the ", " a ", 1)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(PROSE, vocab_size=400)


@pytest.fixture()
def inputs(tmp_path):
    """A folder with .txt, .jsonl (field "body") and .parquet files, bad documents included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(PROSE[0], encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(PROSE[1], encoding="utf-8")
    (folder / "notes.md").write_text("ignored, and listed as ignored")
    rows = [{"body": PROSE[2], "id": 1},
            {"body": "M" * 400, "id": 2},                        # the subreddit of M
            {"body": PROSE[2].upper(), "id": 3},                 # exact duplicate after normalising
            {"body": "ok"},                                      # too short
            {"body": NEAR},
            {"body": PROSE[3]}]                                  # a near duplicate of NEAR
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    table = pa.table({"body": PROSE[4:8], "n": [1, 2, 3, 4]})
    pq.write_table(table, folder / "d.parquet")
    return folder


def test_prepare_folder_counts_add_up_and_shards_decode_back(tok, inputs, tmp_path):
    out = tmp_path / "out"
    cfg = PrepareConfig(text_field="body", val_fraction=0.25, dump_rejected=tmp_path / "rejected.jsonl")
    m = prepare_inputs([inputs], out, tok, cfg)
    assert m["input"]["documents"] == 2 + 6 + 4
    assert m["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "repeated_char": 1, "too_short": 1}
    assert m["input"]["documents"] == m["kept_documents"] + sum(m["dropped"].values())
    assert m["input"]["blank_lines"] == 1 and m["input"]["ignored_files"] == [str(inputs / "notes.md")]
    assert [(s["kind"], s["documents"]) for s in m["sources"]] == [("txt", 1), ("jsonl", 6), ("parquet", 4), ("txt", 1)]
    assert m["tokenizer"]["hash"] == tok.hash and m["dtype"] == "uint16"
    assert Tokenizer.load(out / "tokenizer").hash == tok.hash
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == sorted(m["dropped"])
    assert {r["origin"] for r in rejected if r["reason"] == "repeated_char"} == {f"{inputs / 'c.jsonl'}:2"}

    # every kept document is in exactly one split, as [BOS] + its tokens, and decodes back
    kept_texts = [PROSE[0], PROSE[2], NEAR, *PROSE[4:8], PROSE[1]]
    got = {}
    for split in ("train", "val"):
        shards = ShardSet(out, split, tokenizer=tok)
        assert shards.n_docs == m["splits"][split]["documents"]
        for d in range(shards.n_docs):
            ids = shards.document(d)
            assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
            got[tok.decode(ids[1:])] = (split, shards.origin(d))
    assert sorted(got) == sorted(kept_texts)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == sum(len(tok.encode(t)) + 1 for t in kept_texts)
    # val gets kept documents 0 and 4 (val fraction 1/4); origins name file and line / row
    assert [o for s, o in got.values() if s == "val"] == [str(inputs / "a.txt"), f"{inputs / 'd.parquet'}: row 2"]
    assert got[PROSE[2]] == ("train", f"{inputs / 'c.jsonl'}:1")


def test_val_split_rule():
    from fractions import Fraction

    picks = [i for i in range(300) if is_val(i, Fraction("0.01"))]
    assert picks == [0, 100, 200]
    assert [i for i in range(10) if is_val(i, Fraction("0.5"))] == [0, 2, 4, 6, 8]
    assert not any(is_val(i, Fraction(0)) for i in range(10))


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": PROSE[0]}), '{"text": "unterminated', json.dumps({"txt": "x"}), "[1, 2]",
             json.dumps({"text": 5}), json.dumps({"text": PROSE[1]})]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON.*--skip-bad-lines"):
        prepare_inputs([bad], tmp_path / "o1", tok)
    bad.write_text("\n".join(lines[:1] + lines[2:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: no field 'text' \(fields: txt\)"):
        prepare_inputs([bad], tmp_path / "o2", tok)
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = prepare_inputs([bad], tmp_path / "o3", tok, PrepareConfig(skip_bad_lines=True, val_fraction=0.5))
    assert m["input"]["bad_lines"] == {"malformed_json": 1, "missing_field": 1, "not_a_string": 1, "not_an_object": 1}
    assert m["input"]["bad_line_examples"][0].startswith(f"{bad}:2: malformed JSON")
    assert m["input"]["documents"] == 2 and m["kept_documents"] == 2
    bad.write_bytes(json.dumps({"text": PROSE[0]}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: invalid UTF-8"):
        prepare_inputs([bad], tmp_path / "o4", tok)


def test_txt_modes_parquet_errors_and_missing_inputs(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "t.txt"
    txt.write_bytes(b"First paragraph line one\nline two of it.\n\n\nSecond paragraph \xff here.\n")
    m = prepare_inputs([txt], tmp_path / "o1", tok, PrepareConfig(txt_mode="paragraph", filters=None, val_fraction=0))
    shards = ShardSet(tmp_path / "o1", "train", tok)
    assert [shards.origin(i) for i in range(2)] == [f"{txt}:1", f"{txt}:5"]
    assert tok.decode(shards.document(1)[1:]) == "Second paragraph \ufffd here."
    assert m["input"]["utf8_replaced"] == 1
    m = prepare_inputs([txt], tmp_path / "o2", tok, PrepareConfig(txt_mode="line", filters=None, val_fraction=0))
    assert m["input"]["documents"] == 3
    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: content\)"):
        prepare_inputs([tmp_path / "p.parquet"], tmp_path / "o3", tok)
    with pytest.raises(DataError, match=r"p.parquet: row 2: column 'content' is null"):
        prepare_inputs([tmp_path / "p.parquet"], tmp_path / "o4", tok, PrepareConfig(text_field="content"))
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        prepare_inputs([tmp_path / "missing.jsonl"], tmp_path / "o5", tok)
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b")
        prepare_inputs([tmp_path / "x.csv"], tmp_path / "o6", tok)


def test_huggingface_dataset_names(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when not installed
    with pytest.raises(DataError, match="some/dataset: not a file, and the optional 'datasets' package is not installed"):
        prepare_inputs(["some/dataset"], tmp_path / "o1", tok)
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": PROSE[0]}, {"text": PROSE[1]}, {"text": PROSE[2]}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    m = prepare_inputs(["some/dataset"], tmp_path / "o2", tok, PrepareConfig(max_docs=2, val_fraction=0))
    assert calls == [("some/dataset", None, "train", True)]
    assert m["input"]["documents"] == 2 and m["input"]["stopped_at_max_docs"]
    assert m["sources"] == [{"path": "some/dataset", "kind": "huggingface", "documents": 2}]


def test_prepare_trains_a_tokenizer_when_none_is_given(tmp_path):
    (tmp_path / "out").mkdir()
    data = tmp_path / "out" / "train_corpus.jsonl"  # an input inside the output folder survives
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE), encoding="utf-8")
    with pytest.raises(UserError, match="not empty .*pass --overwrite"):   # a folder prepare did not make
        prepare_inputs([data], tmp_path / "out", None, PrepareConfig(vocab_size=300, val_fraction=0.1))
    m = prepare_inputs([data], tmp_path / "out", None, PrepareConfig(vocab_size=300, val_fraction=0.1, overwrite=True))
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer")
    assert tok.vocab_size == 300 and m["tokenizer"]["hash"] == tok.hash
    assert ShardSet(tmp_path / "out", "val", tok).n_docs == 3
    assert not (tmp_path / "out" / ".staging.jsonl").exists()
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_inputs([data], tmp_path / "out", tok)
    prepare_inputs([data], tmp_path / "out", tok, PrepareConfig(overwrite=True))
    assert data.exists() and json.loads((tmp_path / "out" / "manifest.json").read_text())["input"]["documents"] == len(PROSE)


def test_shard_set_refuses_wrong_tokenizer_and_corrupt_shards(tok, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE), encoding="utf-8")
    out = tmp_path / "out"
    prepare_inputs([data], out, tok)
    ShardSet(out, "train", tokenizer=tok)
    other = Tokenizer.train(PROSE, vocab_size=350)
    with pytest.raises(ShardError, match=rf"{out / 'manifest.json'}: shards were tokenized with tokenizer {tok.hash[:16]}"):
        ShardSet(out, "train", tokenizer=other)
    shard = out / "train_00000.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(ShardError, match=rf"{shard}: {len(raw) - 2} bytes but .* truncated"):
        ShardSet(out, "train", tokenizer=tok)
    shard.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    with pytest.raises(ShardError, match=rf"{shard}: sha256 differs"):
        ShardSet(out, "train", tokenizer=tok)
    ShardSet(out, "train", tokenizer=tok, verify="size")  # size-only checks let a same-size change through
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard}: missing"):
        ShardSet(out, "train")
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        ShardSet(out, "train")


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    w = SplitWriter(tmp_path, "train", token_dtype(129_280), shard_tokens=6)
    w.add([0, 129_279, 70_000], "a")
    w.add([0, 1, 2, 3], "b\nwith newline \\n")
    w.add([0, 100_000], "c")
    entry = w.close()
    assert [s["documents"] for s in entry["shards"]] == [1, 2]  # a document never spans two shards
    write_manifest(tmp_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "uint32",
                              "tokenizer": {"hash": "h", "vocab_size": 129_280, "bos_id": 0},
                              "splits": {"train": entry}})
    s = ShardSet(tmp_path, "train", tokenizer="h")
    assert s.document(0).tolist() == [0, 129_279, 70_000] and s.document(2).tolist() == [0, 100_000]
    assert s.origin(1) == "b\nwith newline \\n" and s.doc_lengths.tolist() == [3, 4, 2]


def test_default_corpus_is_deterministic_train_only_and_mixed(tmp_path):
    from nanoseek.data.corpus import DEFAULT_TASKS
    from nanoseek.tasks.generators import TASKS, corpus_document

    recs = list(default_corpus_records(100, seed=5))
    assert [r.text for r in recs] == list(default_corpus(100, seed=5))
    assert [r.text for r in recs] != list(default_corpus(100, seed=6))
    tasks = [r for r in recs if r.origin.startswith("task:")]
    assert len(tasks) == 100 and len(recs) == 100 + len(PROSE)
    assert {r.origin.split(":")[1].split("-")[0] for r in tasks} == set(DEFAULT_TASKS)
    assert all("-train-" in r.origin for r in tasks)
    # no held-out problem appears in the corpus
    test_docs = {corpus_document(p) for name in DEFAULT_TASKS for p in TASKS[name].generate("test", 300, seed=5, unique=False)}
    assert not test_docs & {r.text for r in recs}
    # prose is spread through the stream, not bunched at one end
    prose_at = [i for i, r in enumerate(recs) if r.origin.startswith("corpus/")]
    assert prose_at[0] < 10 and prose_at[-1] > len(recs) - 10
    levels = list(default_corpus_records(10, seed=0, task_levels={"arithmetic": 1}, tasks=["arithmetic"]))
    assert all("-L1-" in r.origin for r in levels if r.origin.startswith("task:"))
    assert write_default_corpus(tmp_path / "c.jsonl", 20) == 20 + len(PROSE)
    assert json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0]).keys() == {"text", "origin"}


def test_cli_prepare_default_corpus_and_errors(tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "data"
    assert main(["data", "prepare", "--default-corpus", "--task-docs", "300", "--vocab-size", "300",
                 "--val-fraction", "0.05", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["documents"] == 300 + len(PROSE) == m["kept_documents"] + sum(m["dropped"].values())
    assert m["sources"][0]["kind"] == "default-corpus" and m["splits"]["val"]["documents"] > 0
    assert main(["data", "inspect", str(out), "--show", "1"]) == 0
    assert "all shard files match" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": PROSE[0]}) + "\nnot json\n")
    assert main(["data", "prepare", "--input", str(bad), "--tokenizer", str(out / "tokenizer"),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    cfg = tmp_path / "filters.toml"
    cfg.write_text("[filters]\nmin_chars = 100000\n")
    assert main(["data", "prepare", "--input", str(bad), "--tokenizer", str(out / "tokenizer"), "--skip-bad-lines",
                 "--filters-config", str(cfg), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no training documents left" in err and "'too_short': 1" in err
    assert not (tmp_path / "o2" / "manifest.json").exists()      # a failed prepare installs nothing
    cfg.write_text("[filters]\nmin_charz = 1\n")
    assert main(["data", "prepare", "--input", str(bad), "--filters-config", str(cfg), "--out", str(tmp_path / "o3")]) == 2
    assert "unknown filter setting 'min_charz'" in capsys.readouterr().err


def test_dump_rejected_never_destroys_a_file(tok, inputs, tmp_path, capsys):
    """--dump-rejected opened its path for writing before anything was checked: an existing file
    (the user's, or the input itself) was emptied, and a failed run left it empty. It is built beside
    the target and moved into place at the end; an existing file needs --overwrite, an input or a path
    inside --out never."""
    from nanoseek.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*PROSE[:4], "ok", PROSE[0]]), encoding="utf-8")
    precious = tmp_path / "precious.txt"
    precious.write_text("precious user data\n")
    base = ["data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok")]
    tok.save(tmp_path / "tok")
    for target, words in ((precious, "exists; pass --overwrite"), (src, "is an input"),
                          (tmp_path, "is a folder"), (tmp_path / "none" / "r.jsonl", "does not exist"),
                          (tmp_path / "o1" / "r.jsonl", "inside --out")):
        (tmp_path / "o1").mkdir(exist_ok=True)
        assert main([*base, "--out", str(tmp_path / "o1"), "--dump-rejected", str(target)]) == 2
        assert words in capsys.readouterr().err
    assert precious.read_text() == "precious user data\n" and len(src.read_text().splitlines()) == 6
    assert main([*base, "--out", str(tmp_path / "o2"), "--dump-rejected", str(src), "--overwrite"]) == 2
    assert "is an input" in capsys.readouterr().err and len(src.read_text().splitlines()) == 6
    # a run that fails writes no dump; one that succeeds writes it whole, replacing with --overwrite
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "ok"}) + "\n")
    assert main(["data", "prepare", "--input", str(empty), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "o3"), "--dump-rejected", str(tmp_path / "r3.jsonl")]) == 2
    assert not (tmp_path / "r3.jsonl").exists()
    assert main([*base, "--out", str(tmp_path / "o4"), "--dump-rejected", str(precious), "--overwrite"]) == 0
    assert {json.loads(line)["reason"] for line in precious.read_text().splitlines()} == {"too_short", "exact_duplicate"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious")]
