"""DeepSeek-V4: logits equal to transformers' DeepseekV4ForCausalLM both ways (every layer kind,
hash and learned MoE, mHC with 1-3 streams, sequences past the window and the indexer's top-k),
DeepSeek's release names, cached decoding equal to the full forward (chunked, batched rows of
different lengths with padding, rewritten speculative positions, MTP), the config's resolution and
errors, and that a tiny V4 learns."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.model.v4 import checkpoint as ck
from nanoseek.model.v4.config import DeepseekV4Config
from nanoseek.model.v4.transformer import DeepseekV4ForCausalLM
from v4_helpers import BASE, CASES, CSA, HCA, SWA, ids_batch, randomise

transformers = pytest.importorskip("transformers")


def hf_model(overrides: dict, seed: int = 0):
    cfg = transformers.DeepseekV4Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    randomise(model, seed)
    return model


def ours(overrides: dict, seed: int = 0, **extra) -> DeepseekV4ForCausalLM:
    cfg = DeepseekV4Config.from_dict({**BASE, **overrides, **extra})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    randomise(model, seed)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ------------------------------------------------------------------ transformers parity
@pytest.mark.parametrize("case", CASES)
def test_transformers_checkpoint_loads_in_nanoseek(tmp_path, case):
    overrides, T = CASES[case]
    hf = hf_model(overrides, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    model = ck.from_pretrained(tmp_path / "hf").eval()
    assert model.config.layer_types == hf.config.layer_types
    assert model.config.mlp_layer_types == hf.config.mlp_layer_types
    ids = ids_batch(0, 2, T, BASE["vocab_size"])
    with torch.no_grad():
        mine = model(ids).logits
    theirs = hf_logits(hf, ids)
    assert theirs.abs().max() > 0.5
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_nanoseek_checkpoint_loads_in_transformers(tmp_path, case):
    overrides, T = CASES[case]
    model = ours(overrides, seed=2)
    ck.save_pretrained(model, tmp_path / "ns")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ns", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV4ForCausalLM"
    ids = ids_batch(3, 2, T, BASE["vocab_size"])
    with torch.no_grad():
        mine = model(ids).logits
    torch.testing.assert_close(hf_logits(hf, ids), mine, rtol=0, atol=1e-4)


def test_deepseek_release_names_load_in_both(tmp_path):
    """A checkpoint with DeepSeek's own tensor names (embed, layers.N.attn.wq_a, ffn.experts.J.w1,
    hc_attn_fn, attn.indexer.compressor.ape, ...) loads in transformers and in nanoseek alike."""
    overrides, T = CASES["all_kinds_hc2"]
    model = ours(overrides, seed=4, num_nextn_predict_layers=1)
    ck.save_pretrained(model, tmp_path / "ds", deepseek_names=True)
    names = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert names["model_type"] == "deepseek_v4"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ds" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in ("embed.weight", "head.weight", "hc_head_fn", "layers.1.attn.indexer.compressor.ape",
              "layers.1.attn.indexer.wq_b.weight", "layers.0.ffn.experts.3.w1.weight", "layers.0.hc_attn_fn",
              "layers.2.attn.compressor.norm.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head_fn"):
        assert k in keys, k
    back = ck.from_pretrained(tmp_path / "ds").eval()
    assert back.config.num_nextn_predict_layers == 1
    ids = ids_batch(5, 1, T, BASE["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, ids), model(ids).logits, rtol=0, atol=1e-4)


def test_round_trip_keeps_mtp_and_refuses_bad_checkpoints(tmp_path):
    model = ours(CASES["all_kinds_hc2"][0], seed=6, num_nextn_predict_layers=2)
    ck.save_pretrained(model, tmp_path / "a", max_shard_bytes=20_000)
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    back = ck.from_pretrained(tmp_path / "a")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="has shape"):
        ck.from_pretrained(tmp_path / "a")


# ------------------------------------------------------------------ cached decoding
def _decode_case(seed=7, mtp=0):
    """16 indexer heads: an index score is exactly 0 (a tie, broken arbitrarily by torch.topk, in
    transformers too) only when all 16 ReLUs are 0, so the top-k sets are well defined."""
    overrides, _ = CASES["all_kinds_hc2"]
    return ours(overrides, seed=seed, num_nextn_predict_layers=mtp, index_n_heads=16)


@pytest.mark.parametrize("chunks", [[1] * 30, [13, 1, 1, 9, 1, 6], [30]])
def test_cached_decode_equals_full_forward(chunks):
    model = _decode_case()
    T = sum(chunks)
    ids = ids_batch(8, 2, T, BASE["vocab_size"])
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 64)
        got, start = [], 0
        for n in chunks:
            pos = torch.arange(start, start + n).expand(2, n)
            got.append(model(ids[:, start:start + n], positions=pos, cache=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=1e-4)


def test_cached_rows_of_different_lengths_with_padding_and_rewrites():
    """Padded prefill of rows with different lengths (``valid``), rows mapped to other cache rows,
    copy_rows, and a rejected speculative position written again: each row equals its own full forward."""
    model = _decode_case(seed=9)
    V = BASE["vocab_size"]
    seqs = [ids_batch(10 + i, 1, 36, V)[0] for i in range(2)]
    lens = [11, 23]
    with torch.no_grad():
        fulls = [model(s[None]).logits[0] for s in seqs]
        cache = model.new_cache(4, 64)
        rows = torch.tensor([3, 1])
        T = max(lens)
        ids = torch.stack([torch.cat([s[:n], torch.zeros(T - n, dtype=torch.long)]) for s, n in zip(seqs, lens)])
        valid = torch.arange(T)[None] < torch.tensor(lens)[:, None]
        out = model(ids, positions=torch.arange(T).expand(2, T), cache=cache, rows=rows, valid=valid).logits
        for i, n in enumerate(lens):
            torch.testing.assert_close(out[i, :n], fulls[i][:n], rtol=0, atol=1e-4)
        cache.copy_rows([1], [0], T)                      # row 0 continues sequence 1 too
        rows = torch.tensor([3, 1, 0])
        pos = torch.tensor(lens + [lens[1]])
        seq_of_row = [0, 1, 1]
        for step in range(12):
            # a wrong draft one position ahead, then the real token at the same positions
            draft = torch.full((3, 1), 5)
            step_ids = torch.stack([seqs[s][p] for s, p in zip(seq_of_row, pos.tolist())])[:, None]
            two = model(torch.cat([step_ids, draft], 1), positions=torch.stack([pos, pos + 1], 1), cache=cache,
                        rows=rows).logits
            for i, s in enumerate(seq_of_row):
                torch.testing.assert_close(two[i, 0], fulls[s][pos[i]], rtol=0, atol=1e-4)
            pos = pos + 1


def test_mtp_loss_and_cached_mtp_decode():
    model = _decode_case(seed=11, mtp=1)
    ids = ids_batch(12, 2, 24, BASE["vocab_size"])
    out = model(ids, labels=ids)
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    out.mtp_loss.backward()
    assert model.model.mtp[0].e_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        full = model(ids, return_hidden=True)
        pos = torch.arange(23).expand(2, 23)
        _, want = model.mtp_forward(0, full.streams[:, :-1], ids[:, 1:], pos)
        cache = model.new_cache(2, 32, with_mtp=True)
        got = []
        for t in range(23):
            p = torch.full((2, 1), t)
            step = model(ids[:, t:t + 1], positions=p, cache=cache, return_hidden=True)
            got.append(model.mtp_forward(0, step.streams, ids[:, t + 1:t + 2], p, cache)[1])
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ config
def test_config_resolves_like_transformers():
    for overrides, _ in CASES.values():
        hf = transformers.DeepseekV4Config(**{**BASE, **overrides})
        mine = DeepseekV4Config.from_dict(hf.to_dict())
        for name in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
            assert getattr(mine, name) == getattr(hf, name), name
        again = transformers.DeepseekV4Config(**{k: v for k, v in mine.to_dict().items() if k != "architectures"})
        assert again.layer_types == hf.layer_types and again.rope_parameters == hf.rope_parameters
    legacy = dict(num_hidden_layers=5, compress_ratios=[0, 4, 128, 4, 0, 0], num_hash_layers=1, qk_rope_head_dim=8,
                  compress_rate_hca=16, rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64})
    hf = transformers.DeepseekV4Config(**{**BASE, **legacy})
    mine = DeepseekV4Config.from_dict({**BASE, **legacy})
    for name in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor"):
        assert getattr(mine, name) == getattr(hf, name), name
    for label in ("main", "compress"):   # transformers also keeps the legacy alias "type" next to "rope_type"
        theirs = {k: v for k, v in hf.rope_parameters[label].items() if k != "type"}
        assert mine.rope_parameters[label] == theirs, label


@pytest.mark.parametrize("change, field", [
    ({"layer_types": [SWA, CSA]}, "layer_types"),
    ({"layer_types": [SWA, "dense", HCA, CSA]}, "layer_types"),
    ({"mlp_layer_types": ["hash_moe"] * 3 + ["dense"]}, "mlp_layer_types"),
    ({"compress_rates": {CSA: 4}}, "compress_rates"),
    ({"compress_rates": {CSA: 0, HCA: 8}}, "compress_rates"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"o_groups": 3}, "o_groups"),
    ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),
    ({"index_head_dim": 2, "partial_rotary_factor": 0.25}, "index_head_dim"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hc_mult": 0}, "hc_mult"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_parameters"),
    ({"compress_ratios": [0, 3, 4, 4]}, "compress_ratios"),
    ({"wat": 1}, "wat"),
])
def test_bad_config_names_the_field(change, field):
    d = {**BASE, "num_hidden_layers": 4, **change}
    with pytest.raises(ConfigError, match=f"'{field}'") as e:
        DeepseekV4Config.from_dict(d, source="cfg.json")
    assert str(e.value).startswith("cfg.json: ") and "\n" not in str(e.value)


# ------------------------------------------------------------------ training
def _train_tiny(steps: int, seq_len: int) -> tuple[list[float], DeepseekV4ForCausalLM]:
    """The shipped v4-tiny preset (every layer kind, hash + learned MoE, 2 streams, MTP) on a
    next-token rule (each token's successor is fixed), with the MTP loss and aux-loss-free updates."""
    from nanoseek.model.v4.config import load_v4_config

    cfg = load_v4_config("v4-tiny").replace(vocab_size=64)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 64, (8, 1), generator=g)
        seq = perm[(start + torch.arange(seq_len + 1)) % 64]
        out = model(seq[:, :-1], labels=seq[:, 1:])
        loss = out.loss + 0.3 * out.mtp_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias(1e-3)
        losses.append(out.loss.item())
    return losses, model


def test_tiny_v4_learns():
    losses, model = _train_tiny(60, 32)
    assert losses[0] > 3.5 and sum(losses[-5:]) / 5 < 0.6 * losses[0], losses[::10]
    assert model.expert_bias().abs().sum() > 0


@pytest.mark.slow
def test_tiny_v4_learns_the_rule_in_a_few_hundred_steps():
    losses, _ = _train_tiny(300, 48)
    assert losses[0] > 3.5 and sum(losses[-10:]) / 10 < 0.05, losses[::30]


def test_engine_generates_v4_like_the_full_forward():
    """The inference engine (prefill + decode over the V4 cache) on the shipped v4-tiny preset:
    greedy tokens past the window, the HCA rate and the indexer's top-k equal argmax of full forwards."""
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.model.v4.config import load_v4_config

    cfg = load_v4_config("v4-tiny").replace(vocab_size=64, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    randomise(model, 3)
    engine = Engine(model, max_batch_size=2, max_seq_len=96)
    prompt = [int(t) for t in ids_batch(13, 1, 19, 64)[0]]
    got = engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0))[0][0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
