"""DeepSeek-V3.2 (sparse attention): parity with transformers' DeepseekV32ForCausalLM both ways,
cached decoding (naive and absorbed) equal to full forwards, the indexer's selection and its loss.

Sequences are longer than ``index_topk`` so the selection is active (a test checks it changes the
logits); configs vary the indexer's heads, head dim, top-k, YaRN, MoE layout and q_lora_rank.

Where the k-th largest indexer score of a query is exactly tied (the ReLU makes exact zeros
common with few indexer heads), which keys are kept is a choice: nanoseek takes the earliest
(dsa.Indexer.select), transformers takes whatever ``torch.topk`` returns, which depends on the
row's length, so its cached decoding disagrees with its own full forward there (a test shows it).
The parity tests therefore use configs and inputs with no tied boundary and check that they have none.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.model import DeepseekV3ForCausalLM, ModelConfig
from nanoseek.model.checkpoint import from_pretrained, save_pretrained

from conftest import make_tiny_config, reference_greedy

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# three configs, each exercising other parts: heads, head dims, top-k, YaRN, dense/MoE layout
V32_CASES = {
    "sixteen_heads_topk5": dict(index_n_heads=16, index_head_dim=16, index_topk=5),
    "twelve_heads_topk3_yarn": dict(index_n_heads=12, index_head_dim=4, index_topk=3, rope_scaling=YARN,
                                    max_position_embeddings=64, attention_bias=True, q_lora_rank=8),
    "eight_heads_topk9_dense_first2": dict(index_n_heads=8, index_head_dim=12, index_topk=9,
                                           first_k_dense_replace=2, num_hidden_layers=4, n_group=2,
                                           topk_group=1, num_experts_per_tok=3, hidden_size=48),
}


def v32_model(seed=0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(make_tiny_config(**{**V32_CASES["sixteen_heads_topk5"], **overrides}))
    with torch.no_grad():   # non-trivial routing biases and indexer norms, so every part matters
        for moe in model.moe_layers() + [x.mlp for x in model.model.mtp if hasattr(x.mlp, "gate")]:
            moe.gate.e_score_correction_bias.normal_(std=0.05)
        for name, p in model.named_parameters():
            if "k_norm" in name or name.endswith(".bias"):
                p.normal_(mean=1.0 if name.endswith("k_norm.weight") else 0.0, std=0.2)
    return model


def tied_boundaries(model, ids) -> int:
    """How many (layer, query) selections of a full forward over ids have their k-th score tied."""
    from nanoseek.model import attention
    count, real = [0], attention.MLA._select

    def spy(self, x, q_latent, cos, sin, *rest):
        sel = real(self, x, q_latent, cos, sin, *rest)
        k = self.indexer.topk
        if sel.index is not None:
            scores = self.indexer.scores(x, q_latent, self.indexer.keys(x, cos, sin), cos, sin)
            top = scores.masked_fill(~sel.visible, float("-inf")).topk(k + 1, dim=-1).values
            count[0] += int(((top[..., k - 1] == top[..., k]) & top[..., k].isfinite()).sum())
        return sel
    attention.MLA._select = spy
    try:
        with torch.no_grad():
            model(ids)
    finally:
        attention.MLA._select = real
    return count[0]


def ids_batch(seed=0, B=2, T=24, V=128):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def load_in_transformers(path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ------------------------------------------------------------------ transformers parity
@pytest.mark.parametrize("case", V32_CASES)
def test_nanoseek_v32_checkpoint_loads_in_transformers(tmp_path, case):
    model = v32_model(**V32_CASES[case]).eval()
    save_pretrained(model, tmp_path / "ck")
    hf = load_in_transformers(tmp_path / "ck")
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    ids = ids_batch(T=3 * model.config.index_topk)
    assert tied_boundaries(model, ids) == 0
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("heads,dim,topk", [(16, 8, 4), (10, 4, 7)])
def test_transformers_v32_checkpoint_loads_in_nanoseek(tmp_path, heads, dim, topk):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV32Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1,
        index_n_heads=heads, index_head_dim=dim, index_topk=topk, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
            layer.mlp.gate.weight.normal_(std=0.3)
        for layer in hf.model.layers:
            layer.self_attn.indexer.k_norm.weight.normal_(1.0, 0.2)
            layer.self_attn.indexer.k_norm.bias.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = from_pretrained(tmp_path / "hf")
    c = model.config
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (heads, dim, topk)
    ids = ids_batch(1, T=4 * topk)
    assert tied_boundaries(model.eval(), ids) == 0
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # and back: our save of it loads in transformers with the same logits
    save_pretrained(model, tmp_path / "ours")
    with torch.no_grad():
        again = load_in_transformers(tmp_path / "ours")(ids).logits
    torch.testing.assert_close(again, theirs, rtol=0, atol=1e-4)


def test_transformers_cached_decode_equals_ours(tmp_path):
    """Step by step on their cache and ours (absorbed, as the engine decodes), the logits agree."""
    model = v32_model(3, index_topk=4).eval()
    save_pretrained(model, tmp_path / "ck")
    hf = load_in_transformers(tmp_path / "ck")
    seq = ids_batch(5, B=1, T=18)
    assert tied_boundaries(model, seq) == 0
    model.set_absorb(True)
    with torch.no_grad():
        out = hf(seq[:, :6], use_cache=True)
        theirs_cache, ours_cache = out.past_key_values, model.new_cache(1, 32)
        model(seq[:, :6], positions=torch.arange(6)[None], cache=ours_cache)
        for t in range(6, 18):
            out = hf(seq[:, t:t + 1], cache=theirs_cache, use_cache=True)
            ours = model(seq[:, t:t + 1], positions=torch.tensor([[t]]), cache=ours_cache).logits
            torch.testing.assert_close(ours, out.logits, rtol=0, atol=1e-4)


def test_with_tied_scores_transformers_disagrees_with_itself_and_nanoseek_does_not(tmp_path):
    """One indexer head: many keys score exactly 0. transformers' cached decode then differs from
    its own full forward (torch.topk's tie order depends on the row length); nanoseek's does not."""
    model = v32_model(0, index_n_heads=1, index_head_dim=4, index_topk=3).eval()
    save_pretrained(model, tmp_path / "ck")
    hf = load_in_transformers(tmp_path / "ck")
    seq = ids_batch(0, B=1, T=24)
    assert tied_boundaries(model, seq) > 0

    def stepwise(forward_step):
        return torch.cat([forward_step(t) for t in range(3, 24)], 1)

    with torch.no_grad():
        hf_cache = hf(seq[:, :3], use_cache=True).past_key_values
        theirs = stepwise(lambda t: hf(seq[:, t:t + 1], cache=hf_cache, use_cache=True).logits)
        ours_cache = model.new_cache(1, 32)
        model(seq[:, :3], positions=torch.arange(3)[None], cache=ours_cache)
        ours = stepwise(lambda t: model(seq[:, t:t + 1], positions=torch.tensor([[t]]), cache=ours_cache).logits)
        assert (theirs - hf(seq).logits[:, 3:]).abs().max() > 1e-3
        torch.testing.assert_close(ours, model(seq).logits[:, 3:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])
def test_with_ties_by_position_transformers_equals_ours_full_and_cached(tmp_path, ties_by_position, heads):
    """With transformers' torch.topk keeping tied scores in position order (nanoseek's rule), the
    two agree on tie-heavy configs too, in full forwards and step by step on their caches."""
    model = v32_model(1, index_n_heads=heads, index_head_dim=4, index_topk=3, num_hidden_layers=4).eval()
    save_pretrained(model, tmp_path / "ck")
    hf = load_in_transformers(tmp_path / "ck")
    seq = ids_batch(2, B=2, T=20)
    assert tied_boundaries(model, seq) > 0
    model.set_absorb(True)
    with torch.no_grad():
        torch.testing.assert_close(model(seq).logits, hf(seq).logits, rtol=0, atol=1e-4)
        hf_cache, ours_cache = hf(seq[:, :4], use_cache=True).past_key_values, model.new_cache(2, 32)
        model(seq[:, :4], positions=torch.arange(4).expand(2, 4), cache=ours_cache)
        for t in range(4, 20):
            theirs = hf(seq[:, t:t + 1], cache=hf_cache, use_cache=True).logits
            ours = model(seq[:, t:t + 1], positions=torch.full((2, 1), t), cache=ours_cache).logits
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ the selection is active
def test_sparsity_changes_logits_only_beyond_topk():
    model = v32_model(index_topk=6).eval()
    dense = DeepseekV3ForCausalLM(model.config.replace(index_topk=10_000), init_weights=False).eval()
    dense.load_state_dict(model.state_dict())
    ids = ids_batch(T=20)
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-5)   # <= top-k visible keys: dense
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


# ------------------------------------------------------------------ cached decoding
@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("heads", [1, 16])
def test_cached_decode_equals_full_forward(absorb, heads):
    """Also with one indexer head, where tied scores are common (checked): ties resolve the same way."""
    model = v32_model(2, index_topk=5, index_n_heads=heads).eval()
    ids = ids_batch(7, B=2, T=18)
    assert heads > 1 or tied_boundaries(model, ids) > 0
    with torch.no_grad():
        full = model(ids).logits
        model.set_absorb(absorb)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :7], positions=torch.arange(7).expand(2, 7), cache=cache).logits]
        for t in range(7, 18):
            steps.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


def test_cached_decode_ragged_rows_and_reused_slots():
    """Rows at different positions in one step, a row reusing stale slots of a longer earlier request."""
    model = v32_model(4, index_topk=4).eval()
    model.set_absorb(True)
    a, b = ids_batch(8, B=1, T=15)[0], ids_batch(9, B=1, T=9)[0]
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(ids_batch(10, B=2, T=20), positions=torch.arange(20).expand(2, 20), cache=cache)   # stale slots
        model(a[None, :10], positions=torch.arange(10)[None], cache=cache, rows=torch.tensor([0]))
        model(b[None, :4], positions=torch.arange(4)[None], cache=cache, rows=torch.tensor([1]))
        got_a, got_b = [], []
        for i in range(5):
            step = torch.tensor([[a[10 + i]], [b[4 + i]]])
            pos = torch.tensor([[10 + i], [4 + i]])
            out = model(step, positions=pos, cache=cache, rows=torch.tensor([0, 1])).logits
            got_a.append(out[0, 0]), got_b.append(out[1, 0])
        full_a, full_b = model(a[None]).logits[0, 10:], model(b[None]).logits[0, 4:]
    torch.testing.assert_close(torch.stack(got_a), full_a, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.stack(got_b), full_b, rtol=0, atol=1e-4)


def test_cache_holds_the_indexer_keys():
    model = v32_model()
    cache = model.new_cache(1, 8)
    c = model.config
    per_layer = (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4
    assert cache.bytes_per_token == per_layer * c.num_hidden_layers


# ------------------------------------------------------------------ the indexer's training signal
def test_indexer_loss_trains_only_the_indexer():
    model = v32_model(index_topk=6).train()
    ids = ids_batch(T=16)
    for stage in ("dense", "sparse"):
        model.zero_grad(set_to_none=True)
        model.set_dsa_stage(stage)
        out = model(ids, labels=ids)
        assert out.indexer_loss is not None and out.indexer_loss.item() > 0
        out.indexer_loss.backward()
        indexer = {id(p) for p in model.indexer_parameters()}
        for name, p in model.named_parameters():
            if id(p) in indexer:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
    model.set_dsa_stage(None)
    assert model(ids, labels=ids).indexer_loss is None


def test_dense_stage_attends_to_every_key_and_its_kl_falls():
    """Dense warm-up: the logits are the dense model's; training the indexer alone lowers the KL."""
    model = v32_model(index_topk=4).train()
    dense = DeepseekV3ForCausalLM(model.config.replace(index_topk=10_000), init_weights=False).train()
    dense.load_state_dict(model.state_dict())
    ids = ids_batch(T=16)
    model.set_dsa_stage("dense")
    torch.testing.assert_close(model(ids, labels=ids).logits, dense(ids, labels=ids).logits, rtol=0, atol=1e-5)
    opt = torch.optim.Adam(model.indexer_parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids, labels=ids).indexer_loss
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_indexer_kl_is_zero_when_the_indexer_matches():
    from nanoseek.model.dsa import indexer_kl
    B, H, T = 1, 2, 5
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None]
    logits = torch.randn(B, T, T).masked_fill(~keep, float("-inf"))
    p = logits.softmax(-1)[:, None].expand(B, H, T, T) / H
    assert indexer_kl(logits.masked_fill(~keep, 0.0), p, keep).abs() < 1e-6
    assert indexer_kl(torch.zeros(B, T, T), p, keep) > 1e-3


# ------------------------------------------------------------------ config
def test_v32_config_round_trip_and_refusals(tmp_path):
    cfg = make_tiny_config(**V32_CASES["sixteen_heads_topk5"])
    d = cfg.to_dict()
    assert d["model_type"] == "deepseek_v32" and "rope_interleave" not in d
    assert ModelConfig.from_dict(d) == cfg
    v3 = make_tiny_config().to_dict()
    assert v3["model_type"] == "deepseek_v3" and "index_n_heads" not in v3
    # a deepseek_v32 config.json without the indexer fields gets HF's defaults
    bare = {k: v for k, v in d.items() if not k.startswith("index_")}
    assert ModelConfig.from_dict(bare).index_n_heads == 64
    base = {k: v for k, v in V32_CASES["sixteen_heads_topk5"].items()}
    for bad, field in [(dict(q_lora_rank=None), "q_lora_rank"), (dict(rope_interleave=False), "rope_interleave"),
                       (dict(index_head_dim=2), "index_head_dim"), (dict(index_topk=0), "index_topk"),
                       (dict(scoring_func="softmax"), "scoring_func"), (dict(attention_type="mha"), "attention_type")]:
        with pytest.raises(ConfigError, match=field):
            make_tiny_config(**{**base, **bad})
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelConfig.from_dict({**d, "mlp_layer_types": ["sparse"] * cfg.num_hidden_layers})


# ------------------------------------------------------------------ the engine, the exporters
@pytest.mark.parametrize("use_mtp", [False, True])
def test_engine_greedy_equals_full_forward(use_mtp, monkeypatch):
    """The inference engine (prefill naive, decode absorbed over the latent + indexer-key cache,
    continuous batching, MTP speculation) writes what token-by-token full forwards write, and
    its one-token steps attend over the gathered top-k slots only."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.model import attention

    model = v32_model(6, vocab_size=128, index_topk=4).eval()
    gathered = []
    real = attention.Selection.gather
    def gather(self, kv):
        out = real(self, kv)
        gathered.append(out[0].shape[1])
        return out
    monkeypatch.setattr(attention.Selection, "gather", gather)
    engine = Engine(model, None, max_batch_size=3, max_seq_len=48, use_mtp=use_mtp)
    prompts = [ids_batch(s, B=1, T=n)[0].tolist() for s, n in ((11, 3), (12, 9), (13, 14))]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    for prompt, (c,) in zip(prompts, results):
        assert c.token_ids == reference_greedy(model, prompt, 10)
    assert gathered and max(gathered) == 4


def test_gguf_export_refuses_v32():
    from nanoseek.export.gguf_model import check_config
    with pytest.raises(ConfigError, match="index_n_heads"):
        check_config(make_tiny_config(**V32_CASES["sixteen_heads_topk5"]))


def test_bf16_model_keeps_the_indexer_weights_proj_fp32():
    model = v32_model().to(torch.bfloat16).eval()
    for attn in model._indexed_attention(with_mtp=True):
        assert attn.indexer.weights_proj.weight.dtype == torch.float32
        assert attn.indexer.wq_b.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(ids_batch(T=12)).logits.isfinite().all()


# ------------------------------------------------------------------ serving a model in an indexer training stage
def test_the_engine_samples_the_served_model_and_gives_the_training_stage_back():
    """Each engine step serves V3.2 as inference sees it (no indexer training stage: sparse top-k
    attention) and leaves every module's stage and MLA path as it found them, also for a stage set
    after the engine was built (the engine finds the modules once, the stages at every step)."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    model = v32_model(index_topk=4).train()
    prompt = [5 + (7 * i) % 50 for i in range(14)]       # longer than index_topk: sparse != dense
    params = SamplingParams(max_new_tokens=8, temperature=0)
    ref = Engine(model, None, max_batch_size=2, max_seq_len=48).generate([prompt], params)[0][0].token_ids
    engine = Engine(model, None, max_batch_size=2, max_seq_len=48)
    model.set_dsa_stage("dense")
    with torch.no_grad():   # what a sampler that kept the training stage would emit: dense attention
        dense_logits = model(torch.tensor([prompt])).logits[0, -1]
    model.set_dsa_stage(None)
    with torch.no_grad():
        sparse_logits = model(torch.tensor([prompt])).logits[0, -1]
    assert not torch.allclose(dense_logits, sparse_logits, atol=1e-4)   # the stages do differ here
    for stage in ("dense", "sparse"):
        model.set_dsa_stage(stage)                      # set after the engine was built
        assert engine.generate([prompt], params)[0][0].token_ids == ref
        assert all(a.dsa_stage == stage for a in model._indexed_attention(with_mtp=True))
        assert all(not a.absorb for a in model.absorb_modules()) and model.training
