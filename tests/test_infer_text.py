"""Streaming text: incremental detokenisation, stop strings and the <think> splitter never leak partials."""

from __future__ import annotations

import itertools

import pytest

from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.infer.request import Request, Sample
from nanoseek.infer.reasoning import ReasoningSplitter, prompt_ends_in_think
from nanoseek.tasks.reply import split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.streaming import IncrementalDetokenizer, StopStringFilter

TOK = ByteTokenizer()


def all_cuts(text: str, max_pieces: int = 3):
    """Every way of cutting text into up to max_pieces deltas (empty deltas included)."""
    n = len(text)
    for k in range(max_pieces):
        for cuts in itertools.combinations_with_replacement(range(n + 1), k):
            bounds = [0, *cuts, n]
            yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_detokenizer_holds_incomplete_utf8():
    text = "héllo 🙂 世界<think>x"
    ids = TOK.encode(text)
    d = IncrementalDetokenizer(TOK)
    deltas = [d.push(t) for t in ids]
    assert "".join(deltas) + d.flush() == text
    assert all("\ufffd" not in x for x in deltas)
    emoji_bytes = "🙂".encode()
    d2 = IncrementalDetokenizer(TOK)
    assert [d2.push(b) for b in emoji_bytes[:3]] == ["", "", ""]
    assert d2.push(emoji_bytes[3]) == "🙂"
    d3 = IncrementalDetokenizer(TOK)
    d3.push(emoji_bytes[0])
    assert d3.flush() == "\ufffd"                       # an unfinished character at the end


@pytest.mark.parametrize("text, stops, expected", [
    ("hello world", ["wor"], "hello "),
    ("hello world", ["xyz"], "hello world"),
    ("aab", ["ab"], "a"),
    ("say STOP now", ["STOP", "now"], "say "),
    ("abcabd", ["abd"], "abc"),
    ("tail ST", ["STOP"], "tail ST"),                    # a partial stop at the end is released
])
def test_stop_strings_never_leak(text, stops, expected):
    for pieces in all_cuts(text):
        f = StopStringFilter(stops)
        out, matched = [], False
        for piece in pieces:
            safe, matched = f.push(piece)
            out.append(safe)
            assert not any(s in "".join(out) for s in stops)
            if matched:
                break
        if not matched:
            out.append(f.flush())
        assert "".join(out) == expected, pieces
        assert matched == (expected != text)


@pytest.mark.parametrize("text, starts_in_think, reasoning, answer", [
    ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.", False, "step 1\nstep 2", "The answer is 4."),
    ("step 1\n</think>\n\n42", True, "step 1", "42"),
    ("no reasoning here", False, None, "no reasoning here"),
    ("<think>unfinished thought", False, "unfinished thought", ""),
    ("<think>a</think>b<think>c</think>d", False, "a\nc", "b\nd"),
    ("x < y and <thin air>", False, None, "x < y and <thin air>"),
    ("  <think> </think>  ", False, "", ""),
])
def test_reasoning_split_is_the_same_for_every_streaming_cut(text, starts_in_think, reasoning, answer):
    assert split_reasoning(text, starts_in_think) == (reasoning, answer)
    for pieces in all_cuts(text):
        s = ReasoningSplitter(starts_in_think)
        r_out, a_out = [], []
        for piece in pieces:
            r, a = s.push(piece)
            r_out.append(r)
            a_out.append(a)
            for partial in ("<", "<t", "</thi", "</think"):
                assert not "".join(a_out).endswith(partial) or partial in answer
        r, a = s.flush()
        assert "".join(r_out) + r == (reasoning or "")
        assert "".join(a_out) + a == answer
        assert s.reasoning_text == reasoning and s.answer_text == answer


def test_splitter_can_be_disabled():
    s = ReasoningSplitter(starts_in_think=True, enabled=False)
    assert s.push("<think>a</think> b ") == ("", "<think>a</think> b ")
    assert s.reasoning_text is None


def test_prompt_ends_in_think():
    chat = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "hi"}], True, thinking=True))
    assert prompt_ends_in_think(chat, TOK)
    closed = TOK.encode(TOK.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning": "r"},
         {"role": "user", "content": "again"}], True))
    assert not prompt_ends_in_think(closed, TOK)


def _sample(params: SamplingParams, prompt_ids=(256,), stop_ids=(257,)):
    starts = prompt_ends_in_think(list(prompt_ids), TOK) if params.starts_in_think is None else params.starts_in_think
    req = Request(0, list(prompt_ids), params.validate(), set(stop_ids), starts, params.max_new_tokens)
    return Sample(req, 0, 0, TOK)


def test_sample_text_pipeline_with_scripted_tokens():
    """Engine per-sample logic: tokens -> detok -> stop strings -> reasoning split -> events."""
    prompt = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "2+2?"}], True, thinking=True))
    s = _sample(SamplingParams(max_new_tokens=100, stop=["END"]), prompt)
    script = TOK.encode("add 2 and 2 🙂\n</think>\n\nIt is 4. END and more")
    events = []
    for t in script:
        ev = s.append(t, 0.0)
        events.append(ev)
        if s.finished:
            break
    c = s.completion()
    assert c.reasoning == "add 2 and 2 🙂" and c.answer == "It is 4."
    assert c.text == "add 2 and 2 🙂\n</think>\n\nIt is 4. "
    assert c.finish_reason == "stop" and c.stop_reason == "stop_string"
    assert "".join(e.reasoning_delta for e in events) == c.reasoning
    assert "".join(e.text_delta for e in events) == c.answer
    assert all("E" not in e.text_delta for e in events)
    assert events[-1].finished and not any(e.finished for e in events[:-1])


def test_sample_stops_on_eos_repetition_and_length():
    s = _sample(SamplingParams(max_new_tokens=10))
    for t in TOK.encode("ab"):
        s.append(t, -1.0)
    ev = s.append(257, -0.5)
    c = s.completion()
    assert ev.finished and c.stop_reason == "eos" and c.token_ids[-1] == 257 and c.text == "ab"
    assert c.mean_logprob == pytest.approx(-2.5 / 3)
    r = _sample(SamplingParams(max_new_tokens=50, repetition_guard=8))
    for t in [ord("x")] * 8:
        r.append(t, 0.0)
    assert r.finished and r.completion().stop_reason == "repetition" and r.completion().text == "x" * 8
    n = _sample(SamplingParams(max_new_tokens=3))
    for t in TOK.encode("abc"):
        n.append(t, 0.0)
    assert n.finished and n.completion().finish_reason == "length" and n.completion().answer == "abc"


def test_detokenizer_releases_invalid_bytes_instead_of_buffering_forever():
    d = IncrementalDetokenizer(TOK)
    ids = [0x80] * 20 + list("ok".encode())                  # continuation bytes with no lead byte
    deltas = [d.push(t) for t in ids]
    assert "".join(deltas) + d.flush() == TOK.decode(ids)
    assert any(deltas[:12])                                   # released well before the end


def _byte_fallback_tokenizer(tmp_path):
    """A Llama/Mistral-style vocabulary: <0xNN> byte tokens, a few pieces, HF's ByteFallback decoder."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    from nanoseek.data.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁hello", "▁world", "\ufffd", "▁\ufffd", "日", "本", "▁日本"]:
        vocab.setdefault(piece, len(vocab))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tmp_path))
    return Tokenizer.load(tmp_path)


def test_byte_fallback_runs_stream_per_character_and_as_the_whole_decoding_where_valid(tmp_path):
    """A Llama/Mistral-style vocabulary spells characters outside it in byte tokens. Valid runs
    stream character by character (a stop string in them fires on time) and concatenate to the
    decoding of the whole; where a later byte of a run is invalid, HF's ByteFallback turns the whole
    run into U+FFFD, characters already streamed included: the stream keeps them (by design,
    streaming.py), and a deferred sample's text is the whole decoding."""
    import random

    tok = _byte_fallback_tokenizer(tmp_path)
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    words = [tok.token_to_id(w) for w in ("▁hello", "\ufffd", "▁\ufffd", "日", "a")]
    rng = random.Random(0)
    chars = ["é", "中", "文", "🙂", "日"]
    for _ in range(300):                                      # valid: pieces and characters in bytes
        ids = []
        for _ in range(rng.randint(1, 12)):
            ids += [rng.choice(words)] if rng.random() < 0.3 else [byte[b] for b in rng.choice(chars).encode()]
        d = IncrementalDetokenizer(tok)
        deltas = [d.push(t) for t in ids]
        assert "".join(deltas) + d.flush() == tok.decode(ids), [tok.id_to_token(i) for i in ids]
    d = IncrementalDetokenizer(tok)                            # each character as soon as its last byte
    ids = [byte[b] for b in "é中".encode()]
    assert [d.push(t) for t in ids] == ["", "é", "", "", "中"]
    params = SamplingParams(max_new_tokens=100, stop=["é"]).validate()
    s = Sample(Request(0, [1], params, {tok.eos_id}, False, 100), 0, 0, tok)
    for t in [byte[b] for b in ("a" + "é" + "中文" * 10).encode()]:
        s.append(t, 0.0)
        if s.finished:
            break
    assert s.finished and s.completion().stop_reason == "stop_string" and len(s.token_ids) == 3
    # the difference by design: "a" streamed, then an invalid byte in the same run
    ids = [byte[0x61], byte[0xBD]]
    d = IncrementalDetokenizer(tok)
    assert "".join(d.push(t) for t in ids) + d.flush() == "a\ufffd" != tok.decode(ids) == "\ufffd\ufffd"
    quiet = Sample(Request(0, [1], SamplingParams(max_new_tokens=10).validate(), {tok.eos_id}, False, 10,
                           streamed=False), 0, 0, tok)
    for t in ids + [tok.eos_id]:
        quiet.append(t, 0.0)
    assert quiet.deferred and quiet.completion().text == tok.decode(ids)
