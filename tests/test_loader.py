"""PackedLoader: BOS-aligned packing, determinism, exact resume, disjoint rank slices, doc ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanoseek.data.loader import PackedLoader
from nanoseek.data.shards import FORMAT, FORMAT_VERSION, ShardError, SplitWriter, token_dtype, write_manifest

BOS = 0
N_DOCS = 23


def doc_tokens(d: int, length: int) -> list[int]:
    """Document d: BOS, then tokens that spell (d, position) so the tests can locate every token."""
    return [BOS] + [1 + d * 1000 + j for j in range(1, length)]


def where(token: int) -> tuple[int, int] | None:
    return None if token == BOS else divmod(token - 1, 1000)


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=N_DOCS)
    dtype = token_dtype(200_000)  # ids up to ~23,000 * 1000: uint32
    w = SplitWriter(tmp_path, "train", dtype, shard_tokens=150)
    for d, n in enumerate(lengths):
        w.add(doc_tokens(d, int(n)), f"doc{d}.txt:1")
    entry = w.close()
    v = SplitWriter(tmp_path, "val", dtype)
    v.add(doc_tokens(0, 30), "val.txt:1")
    write_manifest(tmp_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                              "tokenizer": {"hash": "tok-hash", "vocab_size": 200_000, "bos_id": BOS},
                              "splits": {"train": entry, "val": v.close()}})
    assert len(entry["shards"]) > 1
    return tmp_path, [int(n) for n in lengths]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


def test_packing_is_a_bos_separated_stream_of_whole_documents(data):
    path, lengths = data
    B, T = 2, 16
    loader = PackedLoader(path, "train", batch_size=B, seq_len=T, seed=1, tokenizer="tok-hash")
    n_batches = sum(lengths) // (B * T)
    stream = []
    for x, y, doc_ids in take(loader, n_batches):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])            # labels are the next tokens
        for r in range(B):
            row = x[r].tolist() + [y[r, -1].item()]
            # each token follows the previous one in its document, or a BOS starts the next document
            for a, b in zip(row, row[1:]):
                wa, wb = where(a), where(b)
                if b == BOS:
                    assert wa is not None and wa[1] == lengths[wa[0]] - 1   # only after a document's last token
                elif a == BOS:
                    assert wb[1] == 1
                else:
                    assert wb == (wa[0], wa[1] + 1)
            docs_in_row = list(dict.fromkeys(wh[0] for wh in map(where, row) if wh is not None))
            assert set(docs_in_row) <= set(doc_ids[r])
            stream += x[r].tolist()
    # epoch 0 is every document exactly once (in a shuffled order), each starting with BOS
    order = list(dict.fromkeys(where(t)[0] for t in stream if t != BOS))
    assert sorted(order[:-1]) == sorted(set(order[:-1])) and order != sorted(order)
    expected = sum((doc_tokens(d, lengths[d]) for d in np.random.default_rng([1, 0]).permutation(N_DOCS)), [])
    assert stream == expected[:len(stream)]
    assert loader.epoch == 0


def test_doc_ids_report_the_documents_of_each_row(data):
    path, lengths = data
    loader = PackedLoader(path, "train", batch_size=3, seq_len=8, seed=0)
    for x, y, doc_ids in take(loader, 30):
        for r in range(3):
            tokens = x[r].tolist() + [y[r, -1].item()]
            seen, current = [], None
            # a leading non-BOS token belongs to the document started before this row
            for t in tokens:
                if t != BOS:
                    current = where(t)[0]
                    if current not in seen:
                        seen.append(current)
            assert [d for d in doc_ids[r] if d in seen] == seen
            assert len(doc_ids[r]) - len(seen) <= 1 + tokens.count(BOS)  # documents seen only through a BOS
    assert loader.shards.origin(5) == "doc5.txt:1"


def test_deterministic_per_seed_and_infinite_over_epochs(data):
    path, lengths = data
    a = take(PackedLoader(path, "train", 2, 16, seed=3), 25)
    b = take(PackedLoader(path, "train", 2, 16, seed=3), 25)
    c = take(PackedLoader(path, "train", 2, 16, seed=4), 25)
    assert same(a, b) and not same(a, c)
    loader = PackedLoader(path, "train", 2, 16, seed=3)
    take(loader, 3 * sum(lengths) // 32 + 1)
    assert loader.epoch == 3                      # past three epochs, still yielding
    orders = [loader._order(e)[0].tolist() for e in range(3)]
    assert orders[0] != orders[1] != orders[2]    # a fresh shuffle every epoch
    unshuffled = PackedLoader(path, "train", 1, 16, shuffle=False)
    x, _, _ = next(unshuffled)
    assert x[0].tolist() == sum((doc_tokens(d, lengths[d]) for d in range(N_DOCS)), [])[:16]


def test_resume_gives_the_batches_of_an_uninterrupted_run(data):
    path, lengths = data
    full = take(PackedLoader(path, "train", 2, 16, seed=7), 40)  # several epochs
    for stop in (1, 9, 17, 33):
        first = PackedLoader(path, "train", 2, 16, seed=7)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint)
        resumed = PackedLoader(path, "train", 2, 16, seed=7)
        resumed.load_state_dict(state)
        assert same(take(resumed, 40 - stop), full[stop:])
    assert state["epoch"] >= 1


def test_resume_refuses_other_seed_or_data(data, tmp_path):
    path, _ = data
    loader = PackedLoader(path, "train", 2, 8, seed=0)
    next(loader)
    with pytest.raises(ShardError, match="seed"):
        PackedLoader(path, "train", 2, 8, seed=1).load_state_dict(loader.state_dict())
    state = dict(loader.state_dict(), data_fingerprint="other")
    with pytest.raises(ShardError, match="data_fingerprint"):
        PackedLoader(path, "train", 2, 8, seed=0).load_state_dict(state)
    with pytest.raises(ShardError, match="tokenizer"):
        PackedLoader(path, "train", 2, 8, tokenizer="another-hash")


def test_ranks_take_disjoint_slices_of_each_global_batch(data):
    path, _ = data
    B, T, W = 2, 8, 3
    whole = take(PackedLoader(path, "train", B * W, T, seed=5), 12)
    ranks = [take(PackedLoader(path, "train", B, T, seed=5, rank=k, world_size=W), 12) for k in range(W)]
    for step in range(12):
        x = torch.cat([ranks[k][step][0] for k in range(W)])
        y = torch.cat([ranks[k][step][1] for k in range(W)])
        docs = sum((ranks[k][step][2] for k in range(W)), [])
        assert torch.equal(x, whole[step][0]) and torch.equal(y, whole[step][1]) and docs == whole[step][2]
    # different ranks never read the same token positions: their rows are distinct windows
    rows = [tuple(r) for k in range(W) for r in ranks[k][0][0].tolist()]
    assert len(set(rows)) == len(rows)
    with pytest.raises(ValueError, match="rank 3"):
        PackedLoader(path, "train", B, T, rank=3, world_size=3)


def test_finite_validation_pass(data):
    path, _ = data
    val = PackedLoader(path, "val", batch_size=2, seq_len=7, shuffle=False, infinite=False)
    batches = list(val)
    assert len(batches) == 2 == len(val)           # 30 tokens: two batches of 2 x 7 (+1 label)
    assert batches[0][0][0].tolist() == doc_tokens(0, 30)[:7]


def test_loader_on_prepared_text(tmp_path):
    from nanoseek.data.corpus import default_corpus_records
    from nanoseek.data.prepare import PrepareConfig, prepare
    from nanoseek.data.tokenizer import Tokenizer

    docs = list(default_corpus_records(60, seed=0))
    tok = Tokenizer.train([d.text for d in docs], vocab_size=300)
    prepare(docs, tmp_path, tok, PrepareConfig(val_fraction=0.1, near_dedup_threshold=None))
    loader = PackedLoader(tmp_path, "train", batch_size=4, seq_len=32, seed=0, tokenizer=tok)
    x, y, doc_ids = next(loader)
    for r in range(4):
        starts = [loader.shards.document(d)[0] for d in doc_ids[r]]
        assert all(s == tok.bos_id for s in starts)
        row = x[r].tolist()
        text = tok.decode(row)
        assert text.count("<｜begin▁of▁sentence｜>") == row.count(tok.bos_id)
