"""``Engine(compile=True)``: the compiled decode step gives the eager engine's tokens, and any
compiler failure falls back to eager decoding with a warning instead of failing requests."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_tiny_model
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 33, 70], [2, 7], [3, 11, 12, 100, 4, 8, 60, 2]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def _tokens(engine, prompts=PROMPTS, params=GREEDY):
    return [c[0].token_ids for c in engine.generate(prompts, params)]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = make_tiny_model(seed=0).eval()
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=32))

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = Engine(model, max_batch_size=4, max_seq_len=32, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = _tokens(engine)
    assert got == expected
    assert engine.compile is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no second warning: it stays eager
        assert _tokens(engine) == expected


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    model = make_tiny_model(seed=0).eval()
    eager = Engine(model, max_batch_size=4, max_seq_len=48)
    compiled = Engine(model, max_batch_size=4, max_seq_len=48, compile=True)
    expected = _tokens(eager)
    assert _tokens(compiled) == expected                # ragged prompts, batch 3
    assert compiled.compile, "the compiled step fell back to eager"
    assert compiled.compile_seconds > 0
    # a different batch size and a sampled request reuse or extend the compiled graphs
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3, n=2)
    assert _tokens(compiled, PROMPTS[:1], sampled) == _tokens(eager, PROMPTS[:1], sampled)
    assert _tokens(compiled, PROMPTS[1:2]) == _tokens(eager, PROMPTS[1:2])
    assert compiled.compile
