"""Activation recomputation: exact losses and gradients in every mode, the activation bytes each
mode keeps (measured, and counted analytically), and where it refuses or stays out of the way.

Exactness: recomputation re-runs the same ops on the same inputs, so losses, gradients, the MoE
load counts (the bias update's input) and trained weights must equal the no-recompute run (fp32,
deterministic CPU kernels: bit for bit; asserted to 1e-6). The measured bytes are what
:func:`held_activation_bytes` finds alive after the forward; ``nanoseek.estimate.activations``
(``kernels="eager"``, the same model the estimate reads with fused kernels) must count them per
layer to the byte on several shapes of config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.estimate.activations import MODES, activation_breakdown, activation_bytes_per_token
from nanoseek.estimate.flops import EstimateError
from nanoseek.model.registry import build_model, load_config
from nanoseek.train.config import config_from_dict
from nanoseek.train.metrics import read_metrics, step_records
from nanoseek.train.recompute import (POLICIES, apply_recompute, held_activation_bytes, recompute_mode,
                                      saved_tensor_bytes)

from conftest import make_tiny_model

CONFIGS = {   # MLA with / without a query LoRA, shared experts or none, different k and head sizes
    "v3-like": dict(hidden_size=48, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=12, num_attention_heads=3, moe_intermediate_size=20, intermediate_size=56),
    "no-q-lora": dict(hidden_size=64, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=4,
                      v_head_dim=16, num_attention_heads=4, moe_intermediate_size=24, intermediate_size=96,
                      num_experts_per_tok=3, n_shared_experts=2, n_group=1, topk_group=1),
    "no-shared": dict(n_shared_experts=0, qk_nope_head_dim=4, v_head_dim=8),
}


def objective(out):
    return out.loss + 0.3 * out.mtp_loss + (out.aux_loss if out.aux_loss is not None else 0)


def layer_bytes(held: dict[str, int], i: int) -> int:
    return sum(v for k, v in held.items() if k.startswith((f"model.layers.{i}.", f"model.layers.{i}:")))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONFIGS)
def test_analytic_count_equals_measured_bytes_per_layer(case, mode):
    B, T = 2, 24
    model = apply_recompute(make_tiny_model(**CONFIGS[case]), mode)
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    loss, held = held_activation_bytes(model, lambda: model(ids, labels=ids).loss)
    for i in range(model.config.num_hidden_layers):     # layer 0 dense, 1 and 2 MoE
        measured = layer_bytes(held, i) / (B * T)
        counted = activation_bytes_per_token(model.config, i, 4, mode, kernels="eager")
        # (what the analytic count leaves out: the MoE's per-step offsets, E int32, not per token)
        assert counted == pytest.approx(measured, rel=0.01, abs=1.0), (i, measured, counted)
    loss.backward()


def test_selective_keeps_latents_not_per_head_keys_values():
    model = apply_recompute(make_tiny_model(**CONFIGS["v3-like"]), "selective")
    ids = torch.randint(0, 128, (2, 16))
    _, held = held_activation_bytes(model, lambda: model(ids, labels=ids).loss)
    layer = {k for k in held if k.startswith("model.layers.1.") or k.startswith("model.layers.1:")}
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa:mm" in layer          # [c_KV | k_rope]
    assert "model.layers.1.self_attn.q_a_proj:mm" in layer                    # c_Q
    assert not any("kv_b_proj" in k or "q_b_proj" in k or "layernorm" in k or k.endswith(":cat") for k in layer)
    none = make_tiny_model(**CONFIGS["v3-like"])
    _, held_none = held_activation_bytes(none, lambda: none(ids, labels=ids).loss)
    assert any("kv_b_proj" in k for k in held_none) and any(k.endswith(":cat") for k in held_none)


def test_saved_tensor_hooks_see_the_same_bytes_and_none_inside_recomputed_layers():
    base = make_tiny_model(**CONFIGS["v3-like"])
    ids = torch.randint(0, 128, (2, 32))
    _, held = held_activation_bytes(base, lambda: objective(base(ids, labels=ids)))
    _, saved = saved_tensor_bytes(base, lambda: objective(base(ids, labels=ids)))
    assert saved == pytest.approx(sum(held.values()), rel=0.02)
    outside = {}
    for mode in ("full", "selective"):
        m = apply_recompute(copy.deepcopy(base), mode)
        _, outside[mode] = saved_tensor_bytes(m, lambda: objective(m(ids, labels=ids)))
        assert outside[mode] < saved / 2          # autograd saves nothing inside a checkpointed layer
    assert outside["full"] == outside["selective"]


def _grads_after(model, ids, dsa_stage=None):
    if dsa_stage:
        model.set_dsa_stage(dsa_stage)
    model.set_seq_aux_alpha(1e-2)
    out = model(ids, labels=ids)
    loss = objective(out) + (out.indexer_loss if out.indexer_loss is not None else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.load.clone() for m in model.moe_layers() + [x.mlp for x in model.model.mtp if hasattr(x.mlp, "load")]]
    return loss.detach(), grads, loads


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("variant", ["v3", "v3.2-dense", "v3.2-sparse"])
def test_losses_gradients_and_loads_equal_no_recompute(mode, variant):
    if variant == "v3":
        base = make_tiny_model(seed=1)
    else:
        torch.manual_seed(1)
        base = build_model(load_config("v32-tiny"))
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    stage = variant.split("-")[1] if "-" in variant else None
    ref_loss, ref_grads, ref_loads = _grads_after(copy.deepcopy(base), ids, stage)
    loss, grads, loads = _grads_after(apply_recompute(copy.deepcopy(base), mode), ids, stage)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=1e-6, msg=n)
    for a, b in zip(loads, ref_loads):
        assert torch.equal(a, b) and a.sum() > 0       # counted once, not again in the recompute


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_bf16_autocast_is_exact_too(mode):
    base = make_tiny_model(seed=4)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (copy.deepcopy(base), apply_recompute(copy.deepcopy(base), mode)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(model(ids, labels=ids))
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_inference_never_recomputes(monkeypatch):
    model = apply_recompute(make_tiny_model(), "full").eval()
    monkeypatch.setattr("nanoseek.train.recompute.checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed at inference")))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        model(ids)
    cache = model.new_cache(1, 16)
    with torch.enable_grad():        # a cached (decode) forward stays plain even with grad on
        model(ids, positions=torch.arange(8)[None], cache=cache)


def test_model_stays_the_same_model():
    base = make_tiny_model()
    model = apply_recompute(copy.deepcopy(base), "selective")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert recompute_mode(model) == "selective" and recompute_mode(base) == "none"
    from nanoseek.model.transformer import DecoderLayer, MTPLayer
    assert all(isinstance(m, DecoderLayer) for m in model.model.layers) and isinstance(model.model.mtp[0], MTPLayer)
    assert apply_recompute(model, "selective") is model                 # idempotent
    with pytest.raises(ConfigError, match="already recomputes with 'selective', not 'full'"):
        apply_recompute(model, "full")


def test_modes_are_one_list():
    assert tuple(POLICIES) == MODES
    for mode in MODES:
        assert activation_breakdown(make_tiny_model().config, 1, mode=mode, kernels="eager")


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\] recompute = 'partial': unknown recomputation"):
        apply_recompute(make_tiny_model(), "partial")
    v4 = build_model(load_config("v4-tiny"))
    with pytest.raises(ConfigError, match=r"not supported for model_type 'deepseek_v4'.*recomputation"):
        apply_recompute(v4, "full")
    raw = {"model": {"preset": "tiny"}, "data": {"source": "synthetic"}, "train": {"max_steps": 1, "device": "cpu"}}
    with pytest.raises(ConfigError, match=r"t.toml: \[train\] recompute = 'some': must be 'none', 'selective', 'full'"):
        config_from_dict({**raw, "train": {**raw["train"], "recompute": "some"}}, "t.toml")
    v4_raw = {**raw, "model": {"preset": "v4-tiny"}, "train": {**raw["train"], "recompute": "full"}}
    with pytest.raises(ConfigError, match=r"t.toml: \[train\] recompute = 'full': not supported for model_type 'deepseek_v4'"):
        config_from_dict(v4_raw, "t.toml")


# ---------------------------------------------------------------------------- through the real trainer
def _pretrain(out: Path, recompute: str, steps: int = 3) -> dict:
    from nanoseek.train.pretrain import pretrain
    raw = {"model": {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "q_lora_rank": 16,
                     "kv_lora_rank": 16, "moe_intermediate_size": 16, "vocab_size": 128},
           "data": {"source": "synthetic", "val_batches": 1},
           "optim": {"micro_batch_size": 2, "grad_accum": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 1},
           "train": {"max_steps": steps, "save_every": 0, "eval_every": 0, "seed": 7, "device": "cpu",
                     "out_dir": str(out), "recompute": recompute, "seq_aux_alpha": 0.01}}
    result = pretrain(config_from_dict(raw, "test"), progress=False, quiet=True)
    return {"steps": step_records(read_metrics(out / "metrics.jsonl")), "model": result}


def test_trainer_runs_every_mode_to_the_same_losses_and_weights(tmp_path):
    from safetensors.torch import load_file
    runs = {mode: _pretrain(tmp_path / mode, mode) for mode in MODES}
    ref = runs["none"]["steps"]
    assert sorted(ref) == [1, 2, 3]
    ref_w = load_file(str(tmp_path / "none" / "final" / "model.safetensors"))
    assert any("e_score_correction_bias" in k and ref_w[k].abs().sum() > 0 for k in ref_w)   # biases moved
    for mode in ("full", "selective"):
        steps = runs[mode]["steps"]
        for s in ref:
            assert steps[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-6), (mode, s)
            assert steps[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-6), (mode, s)
        w = load_file(str(tmp_path / mode / "final" / "model.safetensors"))
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=1e-6, msg=k)
    start = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r.get("event") == "start"]
    assert json.dumps(start)   # the run logged normally


# ---------------------------------------------------------------------------- with FSDP2 / expert parallelism
def _layout_worker(rank: int, out: Path, raw: dict) -> None:
    from nanoseek.model.moe import Gate
    from nanoseek.train.pretrain import pretrain
    spans = []

    def spy(module, args, output):
        if isinstance(module, Gate) and torch.is_grad_enabled():
            nodes, m = module.node_limit
            per = module.n_experts // nodes
            idx = output[1]
            spans.append(max(len(set((row // per).tolist())) for row in idx))

    handle = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        pretrain(config_from_dict(raw, "test"), progress=False, quiet=True)
    finally:
        handle.remove()
    (out / f"spans{rank}.json").write_text(json.dumps(spans))


@pytest.mark.parametrize("recompute,parallel", [("selective", {"ep": 2}),
                                               pytest.param("full", {"ep": 2, "fsdp": True}, marks=pytest.mark.slow)],
                         ids=["selective-ep2", "full-fsdp-ep2"])
def test_two_ranks_with_recompute_and_node_limited_routing_match_one_process(tmp_path, recompute, parallel):
    """2 gloo ranks (EP 2 = one 'node' each, tokens to at most 1 node) with recomputation train
    exactly like one process without recomputation and with the same routing rule."""
    from test_distributed import assert_same_steps, raw_config, spawn
    routing = {"max_nodes_per_token": 1, "expert_nodes": 2, "seq_aux_alpha": 0.01}
    ref = raw_config(tmp_path / "one" / "run", 4, steps=3)
    ref["model"].update(n_group=1, topk_group=1)
    ref["train"].update(routing)
    (tmp_path / "one").mkdir()
    _layout_worker(0, tmp_path / "one", ref)
    raw = raw_config(tmp_path / "two" / "run", 2, steps=3, **parallel)
    raw["model"].update(n_group=1, topk_group=1)
    raw["train"].update(routing, recompute=recompute)
    (tmp_path / "two").mkdir()
    spawn(_layout_worker, tmp_path / "two", raw, world=2)
    assert_same_steps(tmp_path / "two" / "run", tmp_path / "one" / "run", [1, 2, 3])
    for r in (0, 1):
        spans = json.loads((tmp_path / "two" / f"spans{r}.json").read_text())
        assert spans and max(spans) == 1          # every token's experts on one node (rank)
    free = json.loads((tmp_path / "one" / "spans0.json").read_text())
    assert free and max(free) == 1


def test_benchmark_runs_and_its_figures_agree(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_recompute", Path(__file__).parent.parent / "benchmarks"
                                                  / "bench_recompute.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    assert bench.main(["--layers", "2", "--hidden", "64", "--seq", "32", "--steps", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    for f in figures.values():
        assert f["layer_bytes_per_token"] == pytest.approx(f["analytic_bytes_per_token"], rel=0.01)
    assert figures["full"]["layer_fraction"] < figures["selective"]["layer_fraction"] < 0.6


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_first_forward_of_a_process_inside_a_recomputed_layer(mode):
    """The MoE's one-time grouped-matmul probe (a forward and backward of its own) runs in the
    first MoE forward, i.e. inside a checkpointed layer: it must stay out of the region's hooks
    and selective cache."""
    from nanoseek.model.moe import grouped_mm_supported
    base = make_tiny_model(seed=6)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    ref_loss, ref_grads, _ = _grads_after(copy.deepcopy(base), ids)
    grouped_mm_supported.cache_clear()
    loss, grads, _ = _grads_after(apply_recompute(copy.deepcopy(base), mode), ids)
    assert torch.equal(loss, ref_loss)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=1e-6, msg=n)


def test_analytic_count_names_what_it_does_not_model():
    with pytest.raises(EstimateError, match="DeepSeek-V4 layers are not modelled"):
        activation_bytes_per_token(load_config("v4-tiny"), 0, kernels="eager")
    with pytest.raises(EstimateError, match="attention_type 'mha' is not modelled"):
        activation_bytes_per_token(make_tiny_model(attention_type="mha").config, 0, mode="selective", kernels="eager")
    with pytest.raises(EstimateError, match="no FP8"):
        activation_bytes_per_token(make_tiny_model().config, 0, fp8=True, kernels="eager")
    with pytest.raises(EstimateError, match="unknown --recompute 'most'"):
        activation_bytes_per_token(make_tiny_model().config, 0, mode="most")
    v3 = load_config("deepseek-v3")      # DeepSeek-V3 per MoE layer, bf16: selective keeps about a third
    none, sel = (activation_bytes_per_token(v3, 5, 2, m, kernels="eager") for m in ("none", "selective"))
    assert 0.3 < sel / none < 0.4


def test_fit_check_counts_what_the_runs_recompute_mode_keeps(monkeypatch):
    """The up-front memory check reads the same count (nanoseek's modules, the run's mode): a batch of
    tiny (32 x 1024 tokens, fp32: ~1.0 GB kept with none, ~0.6 with selective, ~0.4 with full) is
    refused or accepted by the mode alone."""
    from nanoseek import limits
    raw = {"model": {"preset": "tiny"}, "data": {"source": "synthetic"},
           "optim": {"seq_len": 1024, "micro_batch_size": 32}}
    for gb, accepted in ((0.5, {"full"}), (0.8, {"full", "selective"})):
        monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu", gb=gb: int(gb * 1e9))
        for mode in MODES:
            run = {**raw, "train": {"max_steps": 1, "recompute": mode}}
            if mode in accepted:
                assert config_from_dict(run).train.recompute == mode
            else:
                with pytest.raises(ConfigError, match="micro_batch_size x seq_len"):
                    config_from_dict(run)


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2-lite", "deepseek-v3.2", "tiny"])
def test_fused_count_is_the_measured_one_less_its_fusions(preset):
    """The estimate's count (kernels="fused") is this measured one with fused RMSNorm / SwiGLU / MoE
    kernels: equal on every other kind, never more, except that its selective keeps the experts'
    all-to-all input where nanoseek re-derives it and drops the MLP outputs torch's policy keeps."""
    cfg = load_config(preset)
    fused_only = {"norm_outputs", "qkv_up", "expert_intermediates", "mlp_intermediates", "moe_combine", "router"}
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        for mode in MODES:
            f = activation_breakdown(cfg, i, 2, mode=mode)
            e = activation_breakdown(cfg, i, 2, mode=mode, kernels="eager")
            assert {k: v for k, v in f.items() if k not in fused_only} == \
                {k: v for k, v in e.items() if k not in fused_only | {"mlp_output"}} | \
                ({"moe_dispatch": f["moe_dispatch"]} if mode == "selective" and "moe_dispatch" in f else {})
            assert all(e.get(k, 0) >= v for k, v in f.items() if k != "moe_dispatch" or mode != "selective")
            mlp_out = not cfg.is_moe_layer(i) or cfg.n_shared_experts > 0        # a dense MLP or shared experts
            assert ("mlp_output" in e) == (mode == "selective" and mlp_out)
        assert sum(e.values()) == cfg.hidden_size * 2                    # full: the layer's input
