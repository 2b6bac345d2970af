"""A sample nobody streams decodes its text once at its end: the same completion as streamed.

``Engine.generate`` reads only completions, so a sample without stop strings or tool calls skips
the per-token text pipeline (incremental detokenising, the reasoning split) and decodes its tokens
at the end (``Sample._final_text``). These tests drive the same tokens through a streamed and a
deferred sample, over our tokenizers and eight families of other people's (metaspace, unigram,
WordPiece, byte-level BPE with added tokens), and compare every field of the completions.
"""

from __future__ import annotations

import random

import pytest

from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.reasoning import prompt_ends_in_think
from nanoseek.infer.request import Request, Sample
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.streaming import MAX_PENDING_TOKENS
from serve_helpers import make_test_tokenizer
from test_tokenizer_families import FAMILIES, save

TEXTS = [
    "add 2 and 2 🙂\n</think>\n\nIt is 4.",
    "  <think>  plan  </think>  answer with   spaces  ",
    "héllo 世界 Ω ж ∑ def f():\n    return x\n\n</think>x<think>y</think>z",
    "no tags at all, just 12 + 30 = 42",
    "<thi <think>a</think></think> <",
]


def _pair(tok, params: SamplingParams, starts_in_think: bool) -> tuple[Sample, Sample]:
    stop_ids = {tok.eos_id} | set(params.stop_token_ids)
    out = []
    for streamed in (True, False):
        req = Request(0, [1, 2, 3], params, stop_ids, starts_in_think, params.max_new_tokens, streamed=streamed)
        out.append(Sample(req, 0, 0, tok))
    assert not out[0].deferred and out[1].deferred
    return out[0], out[1]


def _fields(s: Sample) -> dict:
    c = s.completion()
    return {k: getattr(c, k) for k in ("token_ids", "text", "reasoning", "answer", "finish_reason", "stop_reason",
                                      "final_text", "logprobs", "model_mask")}


def _drive(tok, ids: list[int], params: SamplingParams, starts_in_think: bool, cancel_at: int | None = None):
    loud, quiet = _pair(tok, params, starts_in_think)
    for s in (loud, quiet):
        for i, t in enumerate(ids):
            if cancel_at is not None and i == cancel_at:
                s.cancel()
                break
            s.append(t, -0.5)
            if s.finished:
                break
    assert loud.finished == quiet.finished
    return _fields(loud), _fields(quiet)


def _sequences(tok, rng: random.Random) -> list[list[int]]:
    """Encoded texts (think tags as the tokenizer writes them), with control tokens mixed in, and
    random ids (whatever a random-weight model writes)."""
    seqs = [tok.encode_text(t) if hasattr(tok, "encode_text") else tok.encode(t) for t in TEXTS]
    controls = sorted(set((getattr(tok, "control_tokens", None) or {}).values()) | set(tok.special_ids or ()))
    for ids in list(seqs):
        mixed = list(ids)
        for _ in range(3):
            mixed.insert(rng.randrange(len(mixed) + 1), rng.choice(controls))
        seqs.append(mixed)
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(6)]
    return seqs


def _tokenizers(tmp_path_factory):
    yield "bytes", ByteTokenizer()
    yield "bpe", make_test_tokenizer()
    for name in FAMILIES:
        yield name, save(name, tmp_path_factory.mktemp(name))[0]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return list(_tokenizers(tmp_path_factory))


def test_deferred_text_equals_streamed_text_across_tokenizers(tokenizers):
    rng = random.Random(0)
    cases = 0
    for name, tok in tokenizers:
        eos = tok.eos_id
        for ids in _sequences(tok, rng):
            for starts in (False, True):
                variants = [
                    (SamplingParams(max_new_tokens=200), ids + [eos]),                   # ends on EOS
                    (SamplingParams(max_new_tokens=max(1, len(ids) - 2)), ids),          # ends on length
                    (SamplingParams(max_new_tokens=200, skip_special_tokens=False, split_reasoning=False),
                     ids + [eos]),
                    (SamplingParams(max_new_tokens=200, stop_token_ids=[ids[len(ids) // 2]]), ids),
                    (SamplingParams(max_new_tokens=200, repetition_guard=8), ids + ids[-2:] * 6),
                ]
                for params, script in variants:
                    loud, quiet = _drive(tok, script, params.validate(), starts)
                    assert quiet == loud, (name, script, params)
                    cases += 1
                loud, quiet = _drive(tok, ids, SamplingParams(max_new_tokens=200).validate(), starts,
                                     cancel_at=len(ids) // 2)
                assert quiet == loud, (name, ids, "cancelled")
    assert cases > 500


def test_deferred_text_starts_in_think_as_the_prompt_says():
    tok = make_test_tokenizer()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}], True, thinking=True))
    starts = prompt_ends_in_think(prompt, tok)
    loud, quiet = _drive(tok, tok.encode_text("it is 4 </think> 4") + [tok.eos_id],
                         SamplingParams(max_new_tokens=50).validate(), starts)
    assert quiet == loud and (quiet["reasoning"], quiet["answer"]) == ("it is 4", "4")


def test_streamed_and_stop_string_and_tool_samples_keep_the_per_token_text():
    tok = ByteTokenizer()
    params = SamplingParams(max_new_tokens=20, stop=["END"]).validate()
    req = Request(0, [1], params, {tok.eos_id}, False, 20, streamed=False)
    s = Sample(req, 0, 0, tok)
    assert not s.deferred                     # a stop string can end it: its text is needed per token
    for t in tok.encode("abcEND and more"):
        s.append(t, 0.0)
        if s.finished:
            break
    assert s.completion().text == "abc" and s.completion().stop_reason == "stop_string"
    streamed = Sample(Request(0, [1], SamplingParams().validate(), {tok.eos_id}, False, 20), 0, 0, tok)
    assert not streamed.deferred and not Sample(Request(0, [1], SamplingParams().validate(), set(), False, 20,
                                                        streamed=False), 0, 0, None).deferred


def test_deferred_text_is_the_decoding_where_the_stream_lets_invalid_bytes_out_early():
    """Text ending in U+FFFD for MAX_PENDING_TOKENS tokens (invalid UTF-8, or literal U+FFFD
    characters) is let out of the stream early (it would otherwise hold text forever), here just
    before the token that completes a character; the deferred text is the tokenizer's decoding of
    the whole, which the streamed text equals everywhere else."""
    tok = ByteTokenizer()
    for ids in ([0x80] * (MAX_PENDING_TOKENS - 1) + list("🙂".encode()) + list(b"ok"),   # invalid bytes
                list("\ufffd\ufffd🙂 ok".encode())):            # valid UTF-8 ending in literal U+FFFD
        loud, quiet = _drive(tok, ids + [tok.eos_id], SamplingParams(max_new_tokens=50).validate(), False)
        assert quiet["text"] == quiet["answer"] == tok.decode(ids) and "🙂" in quiet["text"]
        assert "🙂" not in loud["text"]          # the stream split the character at its forced release
        same = ("token_ids", "reasoning", "finish_reason", "stop_reason", "logprobs", "model_mask")
        assert {k: quiet[k] for k in same} == {k: loud[k] for k in same}
