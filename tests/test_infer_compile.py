"""``Engine(compile=True)``: the compiled decode step gives the eager engine's tokens, the decode
forward it compiles is one graph (no host read of the positions breaks it), and any compiler
failure falls back to eager decoding with a warning instead of failing requests."""

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


@pytest.mark.parametrize("overrides", [{}, {"index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
                                       {"attention_type": "mha"}], ids=["mla", "v32-dsa", "mha"])
def test_decode_forward_is_one_graph(overrides):
    """With the engine's ``cache_length`` nothing in the decode forward reads a tensor back to the
    host (RoPE's table size and the cache mask's length come from it), so dynamo traces one graph:
    a graph break there costs a second compiled region and its Python glue on every decode step."""
    import torch._dynamo

    model = make_tiny_model(seed=0, **overrides).eval()
    model.set_absorb(True)
    cache = model.new_cache(2, 32)
    ids, pos = torch.tensor([[3], [4]]), torch.tensor([[5], [9]])
    with torch.no_grad():
        expected = model(ids, positions=pos, cache=cache).logits
        explained = torch._dynamo.explain(model.forward)(ids, positions=pos, cache=cache, cache_length=10)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        torch.testing.assert_close(model(ids, positions=pos, cache=cache, cache_length=10).logits, expected)


def test_v4_decode_forward_is_one_graph():
    """DeepSeek-V4 too: its compressors and rotary tables take the cache length instead of reading
    positions back (each read was a graph break, and the pieces' recompiles ran into dynamo's limit)."""
    import torch._dynamo

    model = _v4_three_kinds()
    cache = model.new_cache(2, 64)
    prompts = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(prompts, positions=torch.arange(37).expand(2, 37), cache=cache)
        ids, pos = torch.tensor([[3], [4]]), torch.tensor([[37], [37]])
        explained = torch._dynamo.explain(model.forward)(ids, positions=pos, cache=cache,
                                                          rows=torch.arange(2), cache_length=38)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_compiled_engine_builds_the_rotary_tables_for_its_cache(monkeypatch):
    """A rotary table grown inside a compiled step is a new graph per growth (256, 512, ...
    positions): the engine builds the tables for its whole cache before compiling."""
    from nanoseek.model.rope import RotaryEmbedding

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(
        fn, **{**{k: v for k, v in kw.items() if k != "options"}, "backend": "eager"}))
    model = make_tiny_model(seed=0).eval()
    engine = Engine(model, max_batch_size=2, max_seq_len=600, compile=True)
    _tokens(engine, PROMPTS[:1])
    tables = [m._cos.shape[0] for m in model.modules() if isinstance(m, RotaryEmbedding)]
    assert tables and min(tables) >= engine.cache.max_len > 600


def test_cache_length_outside_the_cache_is_refused():
    model = make_tiny_model(seed=0).eval()
    cache = model.new_cache(1, 8)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="cache_length"):
            model(torch.tensor([[3]]), positions=torch.tensor([[2]]), cache=cache, cache_length=bad)


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


def test_recompile_limit_falls_back_to_eager_visibly(monkeypatch):
    """Past dynamo's recompile limit the compiled decode step fails (it would otherwise run that
    frame eagerly without a word while the engine says compiled): a warning names the limit, the
    engine decodes eagerly from then on, and the tokens are the eager engine's."""
    import torch._dynamo

    model = make_tiny_model(seed=0).eval()
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=32))
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=False))
    torch._dynamo.reset()
    engine = Engine(model, max_batch_size=4, max_seq_len=32, compile=True)
    with torch._dynamo.config.patch(recompile_limit=2), \
            pytest.warns(RuntimeWarning, match=r"recompile_limit 2 graphs.*decoding eagerly"):
        got = _tokens(engine)           # static shapes: every new cache length is a new graph
    torch._dynamo.reset()
    assert got == expected and engine.compile is False


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


@pytest.mark.slow
def test_compiled_dense_experts_equal_eager(monkeypatch):
    """Past E pairs and the gather budget (a large batch of large experts) the compiled step runs
    every expert on every token: forced here at every batch size, the tokens are still the eager
    engine's."""
    import torch._dynamo

    from nanoseek.model import moe

    torch._dynamo.reset()            # dynamo's recompile limit counts earlier tests' graphs of this forward
    model = make_tiny_model(seed=0).eval()
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=48))
    monkeypatch.setattr(moe.Experts, "forward_gathered", moe.Experts.forward_dense)
    compiled = Engine(model, max_batch_size=4, max_seq_len=48, compile=True)
    assert _tokens(compiled) == expected
    assert compiled.compile, "the compiled step fell back to eager"


@pytest.mark.slow
def test_compiled_decode_follows_weight_changes():
    """The compiled CPU decode multiplies by k-major copies of the weights (``kmajor.py``): after the
    weights change between calls (as between GRPO's rollouts: in place, by a fused optimizer step
    that moves no version counter, or ``.data`` replaced) it decodes the new model, token for token
    what an eager engine on the changed model decodes."""
    model = make_tiny_model(seed=0).eval()
    compiled = Engine(model, max_batch_size=4, max_seq_len=48, compile=True)
    assert _tokens(compiled) == _tokens(Engine(model, max_batch_size=4, max_seq_len=48))
    assert compiled._kmajor is not None and compiled._kmajor.layers
    before = _tokens(compiled)
    model.load_state_dict(make_tiny_model(seed=1).state_dict())        # in place: version counters move
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=48))
    assert expected != before
    assert _tokens(compiled) == expected
    with torch.no_grad():                                               # new storage, same values x 3
        for p in model.parameters():
            p.data = p.data * 3
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=48))
    assert _tokens(compiled) == expected
    assert compiled.compile, "the compiled step fell back to eager"
    # a fused optimizer step leaves the version counters alone: caught because a run re-copies
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = _tokens(Engine(model, max_batch_size=4, max_seq_len=48))
    assert _tokens(compiled) == expected
    one_row = _tokens(Engine(model, max_batch_size=4, max_seq_len=48), PROMPTS[:1])
    assert _tokens(compiled, PROMPTS[:1]) == one_row
    # the copies are what it multiplies by, at one row too: spoiled (and not re-copied), the tokens change
    compiled._kmajor.forget = lambda: None
    with torch.inference_mode():
        for copy in compiled._kmajor.copies:
            copy.zero_()
    assert _tokens(compiled) != expected
    assert _tokens(compiled, PROMPTS[:1]) != one_row


def _v4_three_kinds():
    """A 3-layer V4 with one layer of each attention kind (the first hash-routed) and 3 Sinkhorn
    iterations (compiles faster), random weights."""
    from nanoseek.model import registry
    from v4_helpers import randomise

    cfg = registry.load_config("v4-tiny").replace(
        vocab_size=64, eos_token_id=None, bos_token_id=None, num_hidden_layers=3, hc_sinkhorn_iters=3,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"])
    torch.manual_seed(0)
    model = registry.build_model(cfg).eval()
    randomise(model, 3)
    return model


@pytest.mark.slow
def test_compiled_v4_decode_keeps_few_graphs(monkeypatch):
    """Dynamo's graphs for V4's decode (traced with the eager backend: the guards are dynamo's, no
    inductor compile): twelve requests of 3-63 tokens, greedy and sampled, n = 2, top logprobs,
    on a 4-row cache in two rounds of different order stay within 5 graphs (one row or more, each
    side of the indexer's top-k, one from dynamo's duck sizing) with the eager engine's tokens.
    Before, the compressed-entry counts 0 and 1, rows in order or not and the rotary table's
    growth were graphs of their own: 7 graphs in the first round, the recompile limit (8) in the
    second, then eager decoding."""
    import torch._dynamo

    real_compile = torch.compile

    def tracing_only(fn, **kw):
        kw.pop("options", None)
        return real_compile(fn, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", tracing_only)
    model = _v4_three_kinds()
    g = torch.Generator().manual_seed(5)
    lengths = (3, 4, 15, 16, 17, 31, 32, 33, 47, 48, 63, 60)
    requests = [(torch.randint(0, 64, (n,), generator=g).tolist(),
                 SamplingParams(max_new_tokens=2 + 3 * i, temperature=0.0 if i % 3 == 0 else 0.9,
                                top_p=0.95 if i % 2 else 1.0, n=2 if i % 3 == 2 else 1, seed=i, ignore_eos=True,
                                top_logprobs=3), None)
                for i, n in enumerate(lengths)]

    def tokens(engine, reqs):
        return [[c.token_ids for c in cs] for cs in engine.generate_each(reqs)]

    expected = tokens(Engine(model, max_batch_size=4, max_seq_len=64), requests)
    compiled = Engine(model, max_batch_size=4, max_seq_len=64, compile=True)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # a fallback to eager warns: fail here
        assert tokens(compiled, requests) == expected
        assert tokens(compiled, requests[::-1])[::-1] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 5
    assert compiled.compile


@pytest.mark.slow
def test_compiled_v4_decode_equals_eager(monkeypatch):
    """V4 (hash-routed layers whose ``tid2eid`` can repeat an expert for a token, compressed caches)
    decoded as one graph: requests of different lengths (0, 1 and more compressed entries, below and
    above the indexer's top-k) joining and leaving a 4-row batch in two rounds of different order
    (rows reused out of order, every batch size 4..1), the experts gathered and (forced) dense,
    equal to the eager engine's tokens and without falling back. Before, the compressors read
    positions back to the host (graph breaks whose resumed pieces, one code object shared by
    layers of different kinds, hit dynamo's recompile limit); then the entry counts 0 and 1, rows
    in order or not and each growth of the rotary table were graphs of their own (a second round
    passed the limit)."""
    import torch._dynamo

    from nanoseek.model import moe

    model = _v4_three_kinds()
    g = torch.Generator().manual_seed(1)
    lengths = (3, 4, 15, 16, 17, 31, 33, 47)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]
    requests = [(p, SamplingParams(max_new_tokens=2 + 2 * i, temperature=0.0, ignore_eos=True), None)
                for i, p in enumerate(prompts)]
    eager = Engine(model, max_batch_size=4, max_seq_len=64)
    compiled = Engine(model, max_batch_size=4, max_seq_len=64, compile=True)
    torch._dynamo.reset()                                    # no graphs of other tests' V4 models count
    expected = [[c.token_ids for c in cs] for cs in eager.generate_each(requests)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # a fallback to eager warns: fail here
        assert [[c.token_ids for c in cs] for cs in compiled.generate_each(requests)] == expected
        assert [[c.token_ids for c in cs] for cs in compiled.generate_each(requests[::-1])][::-1] == expected
        monkeypatch.setattr(moe.Experts, "forward_gathered", moe.Experts.forward_dense)
        assert [[c.token_ids for c in cs] for cs in compiled.generate_each(requests[:4])] == expected[:4]
    assert compiled.compile, "the compiled step fell back to eager"
