"""The inference engine on a tiny random model with the byte tokenizer (no checkpoint needed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import make_tiny_model, reference_greedy
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.engine import Engine, EngineError
from nanoseek.infer.sampling import SamplingParams

TOK = ByteTokenizer()
VOCAB = 264


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=0, vocab_size=VOCAB).eval()


PROMPTS = [TOK.encode("hello world", add_bos=True), TOK.encode("a"), TOK.encode("the quick brown fox jumps")]


@pytest.mark.parametrize("attention_type", ["mla", "mha"])
def test_greedy_equals_full_forward_argmax(attention_type):
    model = make_tiny_model(seed=1, vocab_size=VOCAB, attention_type=attention_type).eval()
    engine = Engine(model, TOK, max_batch_size=8, max_seq_len=64)
    params = SamplingParams(max_new_tokens=10, temperature=0, n=2, ignore_eos=True)
    results = engine.generate(PROMPTS, params)
    assert [len(r) for r in results] == [2, 2, 2]
    for prompt, comps in zip(PROMPTS, results):
        ref = reference_greedy(model, prompt, 10)
        for c in comps:
            assert c.token_ids == ref
            assert c.finish_reason == "length" and c.completion_tokens == 10 and c.prompt_tokens == len(prompt)
    assert engine.cache.bytes_per_token > 0


@pytest.mark.parametrize("t", [1e-40, 1e-7])
def test_temperatures_below_greedy_below_decode_greedily(model, t):
    """A temperature of 1e-40 (> 0, an fp32 denormal) used to decode the last token id every step
    (a NaN distribution); below GREEDY_BELOW a request decodes greedily, alone or batched beside a
    sampled request."""
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    ref = reference_greedy(model, PROMPTS[0], 8)
    tiny = SamplingParams(max_new_tokens=8, temperature=t, ignore_eos=True, seed=1)
    assert engine.generate([PROMPTS[0]], tiny)[0][0].token_ids == ref
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True, seed=2)
    both = engine.generate_each([(PROMPTS[0], tiny, None), (PROMPTS[1], sampled, None)])
    assert both[0][0].token_ids == ref


def test_cache_bytes_per_token_is_the_mla_latent(model):
    cfg = model.config
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=16)
    assert engine.cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4


def test_rows_are_reused_and_queue_beyond_max_batch(model):
    # 5 prompts x n=2 = 10 rows on a 4-row cache: requests wait for free rows, rows are reused.
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    prompts = PROMPTS + [TOK.encode("xyz"), TOK.encode("hello world", add_bos=True)]
    params = SamplingParams(max_new_tokens=6, temperature=0, n=2, ignore_eos=True)
    results = engine.generate(prompts, params)
    for prompt, comps in zip(prompts, results):
        ref = reference_greedy(model, prompt, 6)
        assert [c.token_ids for c in comps] == [ref, ref]


def test_seed_reproducible_and_different(model):
    engine = Engine(model, TOK, max_batch_size=8, max_seq_len=64)

    def ids(seed):
        res = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=seed))
        return [[c.token_ids for c in r] for r in res]

    a, b, c = ids(7), ids(7), ids(8)
    assert a == b
    assert a != c
    assert a[0][0] != a[0][1]          # the n samples of one prompt differ


def test_sample_does_not_depend_on_batch_neighbours(model):
    engine = Engine(model, TOK, max_batch_size=8, max_seq_len=64)
    p = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=50, seed=3)
    alone = engine.generate([PROMPTS[0]], p)[0][0].token_ids
    together = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], p)[1][0].token_ids
    assert alone == together


def test_top_k_one_is_greedy(model):
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    topk1 = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=1,
                                                         ignore_eos=True))
    assert greedy[0][0].token_ids == topk1[0][0].token_ids


def test_stop_token_stop_string_and_length(model):
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    ref = reference_greedy(model, PROMPTS[0], 12)
    # a stop token: the first generated token that is not the first one
    stop_tok = ref[3]
    cut = ref.index(stop_tok)
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop_tok]))[0][0]
    assert c.token_ids == ref[:cut + 1] and c.finish_reason == "stop" and c.stop_reason == "stop_token"
    assert c.text == TOK.decode(ref[:cut])
    # a stop string made of generated text: cut before it, never included
    full = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0][0]
    text = full.text
    stop = text[4:6] if len(text) >= 6 else text[-2:]
    c2 = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0, stop=[stop],
                                                       ignore_eos=True))[0][0]
    assert c2.finish_reason == "stop" and c2.stop_reason == "stop_string"
    assert c2.text == text[:text.find(stop)] and stop not in c2.text
    # the cache length bounds a sample too
    small = Engine(model, TOK, max_batch_size=2, max_seq_len=len(PROMPTS[0]) + 3)
    c3 = small.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))[0][0]
    assert c3.finish_reason == "length" and c3.completion_tokens == 3


def test_stream_events_add_up_to_the_completion(model):
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=11, ignore_eos=True)
    events = list(engine.stream(PROMPTS[2], params))
    comps = engine.generate([PROMPTS[2]], params)[0]
    for c in comps:
        evs = [e for e in events if e.index == c.index]
        assert [e.token_id for e in evs] == c.token_ids
        assert "".join(e.text_delta for e in evs) == c.answer
        assert "".join(e.reasoning_delta for e in evs) == (c.reasoning or "")
        assert [e.finished for e in evs] == [False] * (len(evs) - 1) + [True]
        assert evs[-1].finish_reason == "length"


def test_generate_queues_no_token_events_and_streamed_requests_do(model):
    """generate() reads only the completions: its requests queue no per-token events (a queue put
    per token is work nobody reads); submit() and stream() requests queue every one. The quiet
    samples decode their text once at the end (test_infer_deferred_text.py): the same completions."""
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True, n=2)
    quiet = engine._enqueue(PROMPTS[0], params, streamed=False)
    loud = engine._enqueue(PROMPTS[0], params)
    while not (quiet.done and loud.done):
        engine._step_guarded()
    assert list(quiet.ready_events()) == [] and quiet.drained
    events = list(loud.ready_events())
    assert len(events) == 12 and loud.drained

    def fields(c):
        return c.token_ids, c.text, c.reasoning, c.answer, c.final_text, c.finish_reason

    assert [fields(c) for c in quiet.result()] == [fields(c) for c in loud.result()]
    assert "".join(e.text_delta for e in events if e.index == 0) == loud.result()[0].answer


def test_stream_stopped_early_frees_rows(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=64)
    for i, _ in enumerate(engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=50, temperature=0, n=2))):
        if i == 3:
            break
    assert sorted(engine._free_rows) == [0, 1] and not engine._active


def test_continuous_batching_threads_cancel_and_asyncio(model):
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    refs = [reference_greedy(model, p, 8) for p in PROMPTS]
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def client(i):
            h = engine.submit(PROMPTS[i], params)
            results[i] = [ev.token_id for ev in h.events(timeout=30)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(3)] == refs

        long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=60, temperature=0, n=2, ignore_eos=True))
        first = next(iter(long.events(timeout=30)))
        assert first.token_id == refs[0][0]
        long.cancel()
        comps = long.result(timeout=30)
        assert {c.finish_reason for c in comps} == {"cancelled"}
        assert all(len(c.token_ids) < 60 for c in comps)

        async def consume():
            h = engine.submit(PROMPTS[1], params)
            return [ev.token_id async for ev in h.aiter()]

        assert asyncio.run(consume()) == refs[1]
        # generate() while the thread runs goes through the scheduler
        assert engine.generate([PROMPTS[2]], params)[0][0].token_ids == refs[2]
    finally:
        engine.shutdown()
    assert not engine.running and sorted(engine._free_rows) == [0, 1, 2, 3]


def test_model_mode_and_absorb_flag_restored(model):
    m = make_tiny_model(seed=2, vocab_size=VOCAB)     # train mode, naive attention
    engine = Engine(m, TOK, max_batch_size=2, max_seq_len=32)
    engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, temperature=0))
    assert m.training
    assert all(not a.absorb for a in m.modules() if hasattr(a, "absorb"))
    assert all(float(moe.load.sum()) == 0 for moe in m.moe_layers())    # rollouts do not count as training load


def test_bad_requests_raise_clear_errors(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([list(range(20))], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[VOCAB + 5]], SamplingParams())
    with pytest.raises(ValueError, match="max_batch_size"):
        engine.generate([[1, 2]], SamplingParams(n=3))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1, 2]], SamplingParams(top_p=0))
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate([1, 2, 3], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, None, max_batch_size=1, max_seq_len=8).generate([[1]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="MTP"):
        Engine(make_tiny_model(vocab_size=VOCAB, num_nextn_predict_layers=0), use_mtp=True)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=32)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    engine.start()
    try:
        real_decode = engine._decode
        calls = {"n": 0}

        def flaky(samples):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated kernel failure")
            return real_decode(samples)

        monkeypatch.setattr(engine, "_decode", flaky)
        h = engine.submit(PROMPTS[0], params)
        with pytest.raises(EngineError, match="simulated kernel failure"):
            h.result(timeout=30)
        with pytest.raises(EngineError):
            list(h.events(timeout=30))
        monkeypatch.setattr(engine, "_prefill", lambda reqs: 1 / 0)       # a failing prefill fails its requests
        with pytest.raises(EngineError, match="division by zero"):
            engine.submit(PROMPTS[1], params).result(timeout=30)
        monkeypatch.undo()
        again = engine.submit(PROMPTS[0], params).result(timeout=30)
        assert again[0].token_ids == reference_greedy(model, PROMPTS[0], 4)
        assert sorted(engine._free_rows) == [0, 1]
    finally:
        engine.shutdown()


def test_request_cancelled_before_admission(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=32)
    h = engine._enqueue(PROMPTS[0], SamplingParams(max_new_tokens=4, n=2))   # queued, no thread running
    h.cancel()
    engine._step_guarded()
    comps = h.result(timeout=5)
    assert [(c.index, c.finish_reason, c.token_ids) for c in comps] == [(0, "cancelled", []), (1, "cancelled", [])]
    assert [(e.index, e.finished, e.finish_reason) for e in h.events(timeout=5)] == [(0, True, "cancelled"),
                                                                                    (1, True, "cancelled")]


def test_sampling_settings_follow_the_request_not_the_row(model):
    """A sampled request served after a greedy one in the same rows samples (no stale per-row settings)."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4, ignore_eos=True)
    fresh = Engine(model, TOK, max_batch_size=1, max_seq_len=32).generate([PROMPTS[0]], params)[0][0].token_ids
    engine = Engine(model, TOK, max_batch_size=1, max_seq_len=32)
    for _ in range(3):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
        assert engine.generate([PROMPTS[0]], params)[0][0].token_ids == fresh


def test_every_stop_id_of_the_tokenizer_stops(model):
    """A checkpoint's generation_config.json can name several EOS ids (Llama-3's <|eot_id|> and
    <|end_of_text|>): the tokenizer's ``stop_ids`` all stop a sample, not only ``eos_id``."""
    prompt = PROMPTS[0]
    first = reference_greedy(model, prompt, 3)
    second_stop = first[2]                                   # the greedy third token
    tok = ByteTokenizer()
    tok.stop_ids = (tok.eos_id, second_stop) if second_stop != tok.eos_id else (tok.eos_id,)
    engine = Engine(model, tok, max_batch_size=2, max_seq_len=64)
    [[c]] = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))
    stop_at = next(i for i, t in enumerate(first) if t in tok.stop_ids)
    assert c.token_ids == first[:stop_at + 1] and c.finish_reason == "stop"
    [[c]] = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert c.completion_tokens == 10 and c.finish_reason == "length"
