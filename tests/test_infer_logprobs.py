"""The engine's logprobs equal the model's own: float32 ``log_softmax`` of a direct ``model(ids)``.

Generated tokens (their own logprob and the top-N), prompt tokens (``prompt_logprobs``: scored
inside the prefill) and score-only requests (``max_new_tokens=0``), for greedy and sampled
requests, rows of different lengths in one batch, with and without MTP self-speculative decoding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import MAX_LOGPROBS, SamplingParams

TOK = ByteTokenizer()
VOCAB = 264
TOL = 1e-5
PROMPTS = [TOK.encode("hello world", add_bos=True), TOK.encode("a"), TOK.encode("the quick brown fox jumps"),
           TOK.encode("12 + 30 =", add_bos=True)]


@pytest.fixture(scope="module")
def model():
    # a larger init scale than the default spreads the logits, so top-N orders are not ties
    m = make_tiny_model(seed=3, vocab_size=VOCAB, num_nextn_predict_layers=1).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(4)
    return m


def reference(model, ids: list[int]) -> torch.Tensor:
    """[T, V]: row t = log p(. | ids[:t+1]) from one full forward without a cache."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def check_top(top, ref_row: torch.Tensor, k: int) -> None:
    assert len(top) == k
    want = ref_row.topk(k).values.tolist()
    assert [lp for _, lp in top] == pytest.approx(want, abs=TOL)
    for tid, lp in top:              # each alternative is the model's logprob of that token
        assert lp == pytest.approx(ref_row[tid].item(), abs=TOL)


def run_mixed_batch(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]):
    """All jobs admitted into one prefill and decoded together (steps run in this thread)."""
    handles = [engine._enqueue(p, params) for p, params in jobs]
    while not all(h.done for h in handles):
        engine._step_guarded()
    return [h.result() for h in handles]


@pytest.mark.parametrize("use_mtp", [False, True])
def test_generated_and_prompt_logprobs_equal_a_direct_forward(model, use_mtp):
    engine = Engine(model, TOK, max_batch_size=8, max_seq_len=64, use_mtp=use_mtp)
    jobs = [
        (PROMPTS[0], SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True, top_logprobs=5,
                                    prompt_logprobs=3)),
        (PROMPTS[1], SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.9, seed=1, n=2, ignore_eos=True,
                                    top_logprobs=MAX_LOGPROBS)),
        (PROMPTS[2], SamplingParams(max_new_tokens=5, temperature=0.7, top_k=5, seed=2, ignore_eos=True,
                                    prompt_logprobs=0)),
        (PROMPTS[3], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)),
    ]
    results = run_mixed_batch(engine, jobs)
    for (prompt, params), comps in zip(jobs, results):
        for c in comps:
            full = prompt + c.token_ids
            ref = reference(model, full)
            assert len(c.logprobs) == len(c.token_ids) == params.max_new_tokens
            for j, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                row = ref[len(prompt) + j - 1]
                assert lp == pytest.approx(row[tok].item(), abs=TOL)       # before temperature/top-p/top-k
                if params.temperature == 0:
                    assert tok == int(row.argmax())
            if params.top_logprobs:
                assert len(c.top_logprobs) == len(c.token_ids)
                for j, top in enumerate(c.top_logprobs):
                    check_top(top, ref[len(prompt) + j - 1], params.top_logprobs)
            else:
                assert c.top_logprobs == []
            pl = c.prompt_logprobs
            if params.prompt_logprobs is None:
                assert pl is None
                continue
            assert pl.token_ids == prompt and pl.logprobs[0] is None and pl.top[0] is None
            assert len(pl.logprobs) == len(pl.top) == len(prompt)
            for t in range(1, len(prompt)):
                assert pl.logprobs[t] == pytest.approx(ref[t - 1, prompt[t]].item(), abs=TOL)
                if params.prompt_logprobs:
                    check_top(pl.top[t], ref[t - 1], params.prompt_logprobs)
                else:
                    assert pl.top[t] is None


def test_score_only_requests_generate_nothing_and_free_their_rows(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=64)
    long_prompt = TOK.encode("a longer prompt, scored in more than one chunk " * 1, add_bos=True)
    jobs = [(p, SamplingParams(max_new_tokens=0, prompt_logprobs=2)) for p in (long_prompt, PROMPTS[1])]
    jobs.append((PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)))  # waits for a row
    results = run_mixed_batch(engine, jobs)
    for (prompt, params), comps in zip(jobs, results):
        c = comps[0]
        if params.max_new_tokens == 0:
            assert c.token_ids == [] and c.finish_reason == "length" and c.completion_tokens == 0
            ref = reference(model, prompt)
            assert c.prompt_logprobs.logprobs[1:] == pytest.approx(
                [ref[t - 1, prompt[t]].item() for t in range(1, len(prompt))], abs=TOL)
            assert c.prompt_logprobs.logprobs[0] is None   # a one-token prompt has nothing else to score
        else:
            assert len(c.token_ids) == 3
    assert sorted(engine._free_rows) == [0, 1]


def test_prompt_scoring_in_chunks_equals_one_pass(model, monkeypatch):
    import nanoseek.infer.engine as engine_mod

    prompt = TOK.encode("chunked scoring must not change a single value", add_bos=True)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=4)
    whole = Engine(model, TOK, max_batch_size=1, max_seq_len=64).generate([prompt], params)[0][0].prompt_logprobs
    monkeypatch.setattr(engine_mod, "PROMPT_SCORE_CHUNK", 7)
    chunked = Engine(model, TOK, max_batch_size=1, max_seq_len=64).generate([prompt], params)[0][0].prompt_logprobs
    assert chunked.logprobs[1:] == pytest.approx(whole.logprobs[1:], abs=1e-6)
    assert [[t for t, _ in top] for top in chunked.top[1:]] == [[t for t, _ in top] for top in whole.top[1:]]


def test_stream_events_carry_the_logprobs_of_the_completion(model):
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, ignore_eos=True, top_logprobs=3)
    events = list(engine.stream(PROMPTS[0], params))
    comp = engine.generate([PROMPTS[0]], params)[0][0]
    assert [e.logprob for e in events] == pytest.approx(comp.logprobs, abs=1e-6)
    assert [[t for t, _ in e.top_logprobs] for e in events] == [[t for t, _ in top] for top in comp.top_logprobs]


def test_logprob_settings_are_validated(model):
    engine = Engine(model, TOK, max_batch_size=1, max_seq_len=16)
    for bad in (dict(top_logprobs=MAX_LOGPROBS + 1), dict(top_logprobs=-1), dict(prompt_logprobs=21),
                dict(max_new_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            engine.generate([[1, 2]], SamplingParams(**bad))
