"""``nanoseek estimate`` for the layouts the code runs: pipeline schedules (in-flight activations
checked against the action lists torch itself generates, bubbles against DualPipe's table),
recompute modes from the per-tensor-kind activation breakdown, DeepSeek-V3's own layout on 2,048
H800s, ``--layouts`` and one-line errors for bad flags."""

from __future__ import annotations

import io
import json

import pytest

from nanoseek.cli import main
from nanoseek.estimate.cli import load_config
from nanoseek.estimate.flops import EstimateError, layer_forward_flops_per_token
from nanoseek.estimate.gpus import get_gpu
from nanoseek.estimate.activations import (
    FP8_BYTES, RECOMPUTE_MODES, TENSOR_KINDS, activation_breakdown, activation_bytes_per_token)
from nanoseek.estimate.memory import (
    Layout,
    estimate_for_layout, recompute_flops_per_token, stage_layers,
)
from nanoseek.estimate.pipeline import SCHEDULES, get_schedule
from nanoseek.estimate.search import search_layouts
from nanoseek.model.config import ModelConfig, load_model_config
from nanoseek.model.params import layer_params

TORCH_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B",
               "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}


@pytest.fixture(scope="module")
def v3():
    return load_model_config("deepseek-v3")


def _deep(layers: int = 16, **kw) -> ModelConfig:
    """A small MoE config with enough layers for 8 pipeline ranks of two chunks."""
    return load_model_config("tiny").replace(num_hidden_layers=layers, **kw)


# ---------------------------------------------------------------------- schedules
def _torch_peaks(name: str, pp: int, m: int) -> list[int]:
    """Peak (stage, micro-batch) activation sets alive per rank in torch's own action lists: a
    forward adds one, a full backward or a weight backward frees it; an overlapped F&B counts its
    forward before its backward."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    ops = visualizer.get_schedule_ops(TORCH_NAMES[name], pp, m)

    def flat(a):
        if a.computation_type.name == "OVERLAP_F_B":
            for sub in a.sub_actions:
                yield from flat(sub)
        else:
            yield a

    peaks = []
    for rank in ops:
        alive, peak = set(), 0
        for action in (a for a in rank if a is not None):
            for a in flat(action):
                key = (a.stage_index, a.microbatch_index)
                if a.computation_type.name == "FORWARD":
                    alive.add(key)
                elif a.computation_type.name in ("FULL_BACKWARD", "BACKWARD_WEIGHT"):
                    alive.discard(key)
                peak = max(peak, len(alive))
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("name", list(TORCH_NAMES))
def test_in_flight_activations_equal_torchs_schedules(name):
    """The estimate's in-flight count for every torch schedule, rank, pp and micro-batch count
    (including counts below the steady state) equals the peak of torch's generated schedule."""
    sched = SCHEDULES[name]
    assert sched.torch_class == "Schedule" + TORCH_NAMES[name]
    checked = 0
    for pp in (2, 3, 4, 8):
        for m in sorted({1, pp - 1, pp, pp + 2, 2 * pp, 3 * pp + 2, 4 * pp}):
            try:
                sched.validate(pp, m)
            except EstimateError:
                continue
            mine = [sched.in_flight_chunks(pp, r, m) for r in range(pp)]
            assert mine == _torch_peaks(name, pp, m), (pp, m)
            checked += 1
    assert checked >= 8


def test_schedule_minimums_match_torch():
    """What the estimate refuses, torch refuses too (and the smallest accepted count runs)."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    for name in ("1f1b", "dualpipev"):
        for pp in (2, 4):
            low = SCHEDULES[name].min_microbatches(pp)
            visualizer.get_schedule_ops(TORCH_NAMES[name], pp, low)
            with pytest.raises(ValueError):
                visualizer.get_schedule_ops(TORCH_NAMES[name], pp, low - 1)
            with pytest.raises(EstimateError, match=f"--micro-batches >= {low}"):
                SCHEDULES[name].validate(pp, low - 1)
    with pytest.raises(ValueError):
        visualizer.get_schedule_ops("Interleaved1F1B", 4, 14)
    with pytest.raises(EstimateError, match="multiple of its rounds"):
        SCHEDULES["interleaved-1f1b"].validate(4, 14)


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
@pytest.mark.parametrize("m", [1, 20, 120])
def test_bubbles_match_dualpipes_table(pp, m):
    """DualPipe's README: 1F1B (PP-1)(F+B), ZB1P-style V (PP-1)(F+B-2W) with B split, DualPipe
    (PP/2-1)(F&B+B-3W); DualPipeV the same with PP = 2 pp half-size stages; parameters 1x, 2x, 1x;
    activations PP, PP+1. Times arbitrary (not the defaults) so each term counts."""
    F, B, W, FB = 1.3, 2.9, 0.7, 3.6
    assert SCHEDULES["1f1b"].bubble(pp, F, B, W, FB) == pytest.approx((pp - 1) * (F + B))
    assert SCHEDULES["gpipe"].bubble(pp, F, B, W, FB) == pytest.approx((pp - 1) * (F + B))
    assert SCHEDULES["interleaved-1f1b"].bubble(pp, F / 2, B / 2, W / 2) == pytest.approx((pp - 1) * (F + B) / 2)
    assert SCHEDULES["dualpipe"].bubble(pp, F, B, W, FB) == pytest.approx((pp / 2 - 1) * (FB + B - 3 * W))
    assert SCHEDULES["dualpipev"].bubble(pp, F, B, W, FB) == pytest.approx((2 * pp / 2 - 1) * (FB + B - 3 * W))
    assert SCHEDULES["zbv"].bubble(pp, F, B, W) == pytest.approx((pp - 1) * (F + (B - W) - 2 * W))
    # zero bubble when forward, input backward and weight backward take equal time (ZB-V's claim)
    assert SCHEDULES["zbv"].bubble(pp, 1.0, 2.0, 1.0) == 0
    # fractions: bubble / (bubble + the rank's compute); 1F1B's ratio to compute is (p - 1) / m
    f = SCHEDULES["1f1b"].bubble_fraction(pp, m, F, B, W)
    assert f / (1 - f) == pytest.approx((pp - 1) / m)
    for name, per_mb in (("dualpipev", 2), ("zbv", 2), ("dualpipe", 1), ("interleaved-1f1b", 2)):
        s = SCHEDULES[name]
        idle = s.bubble(pp, F, B, W, FB)
        assert s.bubble_fraction(pp, m, F, B, W, FB) == pytest.approx(idle / (idle + m * per_mb * (F + B)))
    # parameters and activations per rank, as the table says
    assert [SCHEDULES[n].param_copies for n in ("1f1b", "zbv", "dualpipe", "dualpipev")] == [1, 1, 2, 1]
    if m >= 2 * pp:
        assert SCHEDULES["1f1b"].in_flight_chunks(pp, 0, m) == pp
        assert SCHEDULES["dualpipe"].in_flight_chunks(pp, 0, m) == pp + 1
        assert SCHEDULES["dualpipev"].in_flight_chunks(pp, 0, m) == 2 * pp + 1      # PP + 1, PP = 2 pp


def test_dualpipes_bubble_is_smaller_and_falls_with_micro_batches():
    for pp in (4, 8, 16):
        fracs = {n: SCHEDULES[n].bubble_fraction(pp, 8 * pp) for n in SCHEDULES}
        assert fracs["dualpipev"] < fracs["interleaved-1f1b"] < fracs["1f1b"] == fracs["gpipe"]
        assert fracs["zbv"] == 0 and fracs["dualpipe"] < fracs["1f1b"]
        assert SCHEDULES["dualpipev"].bubble_fraction(pp, 16 * pp) < fracs["dualpipev"]


def test_stage_placement():
    assert SCHEDULES["1f1b"].stages_of_rank(4, 1) == [1]
    assert SCHEDULES["interleaved-1f1b"].stages_of_rank(4, 1) == [1, 5]
    assert SCHEDULES["dualpipev"].stages_of_rank(4, 1) == [1, 6]
    assert SCHEDULES["zbv"].stages_of_rank(4, 0) == [0, 7]
    assert SCHEDULES["dualpipe"].stages_of_rank(4, 1) == [1, 2] and SCHEDULES["dualpipe"].stages(4) == 4
    with pytest.raises(EstimateError, match="even --pp"):
        SCHEDULES["dualpipe"].validate(3, 6)
    with pytest.raises(EstimateError, match="unknown --schedule 'dualpipe-v'"):
        get_schedule("dualpipe-v")


# ---------------------------------------------------------------------- memory per schedule
def test_twice_the_parameters_per_rank_only_for_dualpipe():
    """DualPipe's "2x": a rank holds two full stages (r and pp - 1 - r), twice 1F1B's layers, and
    each stage lives on two ranks, which split what ZeRO shards; DualPipeV's two half-size stages
    are 1x."""
    cfg = _deep(16, num_nextn_predict_layers=0)
    per_layer = {i: sum(layer_params(cfg, i)[0].values()) for i in range(16)}
    for zero in (0, 1):
        mems = {name: estimate_for_layout(cfg, Layout(dp=2, pp=4, ep=1, zero=zero, schedule=name, micro_batches=8))
                for name in ("1f1b", "dualpipe", "dualpipev")}
        assert [len(mems[n].stage_layers) for n in mems] == [4, 8, 4]
        for name, mem in mems.items():
            held = sum(per_layer[i] for i in mem.stage_layers) + _ends(cfg, mem)
            assert mem.params_per_gpu == held
            assert mem.weights_bytes == pytest.approx(2 * held) and mem.grads_bytes == pytest.approx(4 * held)
            shards = (2 if zero else 1) * (2 if name == "dualpipe" and zero else 1)   # dp, then the mirror pair
            assert mem.master_bytes == pytest.approx(4 * held / shards), (name, zero)


def _ends(cfg, mem) -> int:
    d, v = cfg.hidden_size, cfg.vocab_size
    return ((v * d if "embedding" in mem.stage_holds else 0)
            + (d + v * d if "output head" in mem.stage_holds else 0))


def test_activations_follow_the_schedules_in_flight_count():
    cfg = _deep(16, num_nextn_predict_layers=0)
    seq = 64
    for name in SCHEDULES:
        m = 8
        mem = estimate_for_layout(cfg, Layout(dp=1, pp=4, schedule=name, micro_batches=m), seq_len=seq)
        s = SCHEDULES[name]
        r = mem.stage
        held = s.stages_of_rank(4, r)
        per_token = sum(activation_bytes_per_token(cfg, i) for i in mem.stage_layers)
        logits = mem.activation_kinds_bytes.get("logits", 0)
        expect = s.in_flight_chunks(4, r, m) / len(held) * per_token * seq + logits
        assert mem.activations_bytes == pytest.approx(expect), name
    gp = estimate_for_layout(cfg, Layout(dp=1, pp=4, schedule="gpipe", micro_batches=32), seq_len=seq)
    f1 = estimate_for_layout(cfg, Layout(dp=1, pp=4, schedule="1f1b", micro_batches=32), seq_len=seq)
    assert gp.activations_bytes > 7 * f1.activations_bytes / 2


# ---------------------------------------------------------------------- recompute modes
@pytest.mark.parametrize("make", [lambda: load_model_config("deepseek-v3"), lambda: load_model_config("tiny"),
                                  lambda: load_model_config("deepseek-v3.2"), lambda: load_model_config("deepseek-v2-lite")])
def test_recompute_modes_order_and_what_they_keep(make):
    cfg = make()
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        b = {mode: activation_bytes_per_token(cfg, i, mode=mode) for mode in RECOMPUTE_MODES}
        assert b["full"] < b["selective"] < b["none"]
        assert b["full"] == cfg.hidden_size * 2                        # the layer's input only
        full, sel = activation_breakdown(cfg, i), activation_breakdown(cfg, i, mode="selective")
        assert sum(full.values()) == b["none"] and sum(sel.values()) == b["selective"]
        # selective (nanoseek's policy, tests/test_recompute.py measures it) recomputes the RMSNorms,
        # MLA's up-projected q, k, v, the router's top-k and SwiGLU's product; keeps the rest as is
        assert "norm_outputs" not in sel and set(sel) <= set(full)
        q = cfg.num_attention_heads * cfg.qk_head_dim * 2
        assert sel.get("qkv_up") == (None if cfg.q_lora_rank else q)    # q_proj's q is no up-projection
        for kind in ("expert_intermediates", "mlp_intermediates"):
            assert sel.get(kind, 0) == full.get(kind, 0) * 2 / 3          # gate and up, not their product
        if "router" in full:
            assert sel["router"] == cfg.n_routed_experts * 4 < full["router"]
        assert {k: v for k, v in sel.items() if k not in ("qkv_up", "router", "expert_intermediates",
                                                           "mlp_intermediates")} == \
            {k: v for k, v in full.items() if k not in ("norm_outputs", "qkv_up", "router", "expert_intermediates",
                                                        "mlp_intermediates")}
        assert set(full) <= set(TENSOR_KINDS)
    lay = dict(dp=8, pp=1, ep=8 if cfg.n_routed_experts % 8 == 0 else 1)
    mems = [estimate_for_layout(cfg, Layout(**lay, recompute=mode), seq_len=256) for mode in ("full", "selective", "none")]
    assert mems[0].activations_bytes < mems[1].activations_bytes < mems[2].activations_bytes
    cost = [m.recompute["recompute_flops_fraction"] for m in mems]
    assert cost[0] == pytest.approx(1.0) and 0 < cost[1] < 0.2 and cost[2] == 0


def test_recompute_breakdown_by_hand_v3(v3):
    d, h, i = 7168, 128, 5
    b = activation_breakdown(v3, i)
    assert b["qkv_up"] == (2 * h * 192 + h * 128) * 2
    assert b["norm_outputs"] == (2 * d + 1536 + 512) * 2 + 4 * 4           # and each RMSNorm's fp32 1/rms
    assert b["router"] == 256 * 4 + (1 + 8) * 4 + 8 * 8                     # scores, top-k weights, sum, ids
    assert b["qkv_latents"] == (1536 + 512 + 64) * 2
    assert b["moe_dispatch"] == b["moe_combine"] == 8 * d * 2
    assert b["expert_intermediates"] == (8 + 1) * 3 * 2048 * 2
    assert "attention_probs" not in b and b["attention_stats"] == h * 4
    eager = activation_breakdown(v3, i, flash=False, seq_len=4096)
    assert eager["attention_probs"] == h * 4096 * 2 and "attention_stats" not in eager
    fp8 = activation_breakdown(v3, i, fp8=True)
    assert fp8["moe_dispatch"] == 8 * d * FP8_BYTES and fp8["moe_combine"] == 0
    assert fp8["expert_intermediates"] == (8 + 1) * 2 * 2048 * FP8_BYTES
    assert fp8["qkv_up"] == b["qkv_up"] and fp8["layer_input"] == b["layer_input"]
    # selective recomputes q_b_proj and kv_b_proj: 2 x their weights per token
    assert recompute_flops_per_token(v3, i, "selective") == 2 * (1536 * h * 192 + 512 * h * 256)
    assert recompute_flops_per_token(v3, i, "full") == layer_forward_flops_per_token(v3, i, 4096)


def test_selective_refused_for_v4_in_one_line(capsys):
    with pytest.raises(EstimateError, match="selective"):
        activation_bytes_per_token(load_model_config_v4(), 0, mode="selective")
    assert main(["estimate", "--config", "v4-tiny", "--recompute", "selective"]) == 2
    err = capsys.readouterr().err
    assert "selective" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["estimate", "--config", "v4-tiny", "--recompute", "full"]) == 2     # the trainer refuses it
    err = capsys.readouterr().err
    assert "--estimate-only" in err and "recompute" in err and len(err.strip().splitlines()) == 1
    assert main(["estimate", "--config", "v4-tiny", "--recompute", "full", "--json", "--estimate-only"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["recompute"]["mode"] == "full" and "recompute" in mem["estimate_only"]


def load_model_config_v4():
    from nanoseek.estimate.cli import load_config
    return load_config("v4-tiny")


# ---------------------------------------------------------------------- DeepSeek-V3 on 2,048 H800s
V3_LAYOUT = ["estimate", "--config", "deepseek-v3", "--gpu", "h800", "--gpus", "2048", "--pp", "16", "--ep", "64",
             "--zero", "1", "--micro-batches", "120", "--recompute", "selective", "--precision", "fp8", "--json"]


def test_deepseek_v3_layout_fits_80gb(capsys):
    """The report's layout with DualPipeV (the schedule torch ships), selective recompute and FP8:
    58.2 GB on the heaviest rank, which fits an 80 GB H800."""
    assert main(V3_LAYOUT + ["--schedule", "dualpipev"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert 55e9 < mem["total_bytes"] < 61e9 and mem["fits"]
    assert mem["schedule"]["name"] == "dualpipev" and mem["schedule"]["stages"] == 32
    assert mem["schedule"]["torch_class"] == "ScheduleDualPipeV"
    assert 0.03 < mem["schedule"]["bubble_fraction"] < 0.05
    # the router's top-k weights and ids are re-derived from its kept scores (measured: test_recompute.py);
    # with fp8 SwiGLU's product is recomputed in every mode, so it is no extra kind here
    assert mem["recompute"]["recomputed_kinds"] == ["norm_outputs", "qkv_up", "router"]
    assert 0.07 < mem["recompute"]["recompute_flops_fraction"] < 0.09
    # DualPipe itself (two copies of the parameters): the ranks holding the embedding and the head twice
    assert main(V3_LAYOUT + ["--schedule", "dualpipe"]) == 0
    dual = json.loads(capsys.readouterr().out)["memory"]
    assert dual["fits"] and dual["stage"] in (0, 15) and 68e9 < dual["total_bytes"] < 73e9
    assert dual["grads_bytes"] > 20e9 and dual["schedule"]["param_copies"] == 2
    # what nanoseek runs (bf16 activations, experts' outputs kept) does not fit with selective...
    assert main([a if a != "fp8" else "bf16" for a in V3_LAYOUT] + ["--schedule", "dualpipev"]) == 0
    assert not json.loads(capsys.readouterr().out)["memory"]["fits"]
    # ...and does with full recomputation
    assert main([a if a not in ("fp8", "selective") else {"fp8": "bf16", "selective": "full"}[a]
                 for a in V3_LAYOUT] + ["--schedule", "dualpipev"]) == 0
    full = json.loads(capsys.readouterr().out)["memory"]
    assert full["fits"] and full["total_bytes"] < 40e9


def test_v3_stage_split(v3):
    assert [len(r) for r in stage_layers(v3, 32)] == [2] * 29 + [1] * 3
    mem = estimate_for_layout(v3, Layout(dp=128, pp=16, ep=64, schedule="dualpipev", micro_batches=32,
                                         recompute="selective"), "fp8", gpu=get_gpu("h800"))
    assert mem.stage == 0 and mem.stage_holds == ["embedding", "output head", "MTP"]
    assert mem.stage_layers == [0, 1, 60]


# ---------------------------------------------------------------------- --layouts
def test_layouts_search_finds_only_fitting_layouts(capsys):
    cfg = load_model_config("deepseek-v2-lite")
    gpu = get_gpu("h100")
    found = search_layouts(cfg, gpu, 16, precision="bf16", seq_len=4096)
    assert found and all(f.total_bytes <= gpu.hbm_bytes for f in found)
    assert all(f.dp * f.pp == 16 and cfg.n_routed_experts % f.ep == 0 and f.dp % f.ep == 0 for f in found)
    assert [f.time_factor for f in found] == sorted(f.time_factor for f in found)
    f = found[0]
    mem = estimate_for_layout(cfg, Layout(dp=f.dp, pp=f.pp, ep=f.ep, schedule=f.schedule if f.pp > 1 else "1f1b",
                                          recompute=f.recompute, micro_batches=f.micro_batches), seq_len=4096)
    assert mem.total_bytes == pytest.approx(f.total_bytes)
    assert main(["estimate", "--config", "deepseek-v2-lite", "--gpu", "h100", "--gpus", "16", "--layouts"]) == 0
    out = capsys.readouterr().out
    assert "Layouts of 16 x H100" in out and "time factor" in out
    assert main(["estimate", "--config", "deepseek-v3", "--gpu", "h100", "--gpus", "8", "--layouts"]) == 0
    assert "No layout of 8 x H100" in capsys.readouterr().out


def test_layouts_mark_schedules_nanoseek_cannot_run(v3):
    import io

    from rich.console import Console

    from nanoseek.estimate.report import print_layouts
    found = search_layouts(v3, get_gpu("h800"), 2048, precision="fp8", micro_batches=120)
    dual = [f for f in found if f.schedule == "dualpipe"]
    assert dual and all(f.pp % 2 == 0 for f in dual)
    buf = io.StringIO()
    print_layouts(dual[:3], cfg_name="deepseek-v3", gpu="H800", gpus=2048, seq_len=4096, micro_batch=1,
                  precision="fp8", console=Console(file=buf, width=200))
    assert "dualpipe *" in buf.getvalue() and "estimate only" in buf.getvalue()
    # the V3 layout itself is among those found, with the figure a plain estimate gives
    v = next(f for f in found if (f.pp, f.ep, f.schedule, f.recompute) == (16, 64, "dualpipev", "selective"))
    assert v.total_bytes == pytest.approx(58.19e9, rel=1e-3)


# ---------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, words", [
    (["--pp", "16", "--schedule", "dualpipe-v"], ["--schedule", "dualpipe-v", "dualpipev"]),
    (["--recompute", "partial"], ["--recompute", "partial", "selective"]),
    (["--schedule", "1f1b"], ["--pp > 1"]),
    (["--pp", "16", "--schedule", "dualpipev", "--micro-batches", "16"], ["--micro-batches >= 32"]),
    (["--pp", "15", "--gpus", "30", "--schedule", "dualpipe"], ["even --pp"]),
    (["--pp", "32", "--gpus", "64", "--schedule", "dualpipev"], ["64 stages", "num_hidden_layers=61"]),
    (["--layouts", "--pp", "4"], ["--layouts", "--pp"]),
    (["--layouts", "--recompute", "full"], ["--layouts", "--recompute"]),
    (["--micro-batches", "0"], ["--micro-batches"]),
    (["--micro-batches", "8"], ["--micro-batches 8 needs a pipeline", "--pp > 1"]),
    (["--pp", "16", "--ep", "64", "--gpus", "2048", "--fsdp", "--recompute", "full"],
     ["pipeline stages without FSDP", "--estimate-only"]),
    (["--pp", "16", "--ep", "64", "--gpus", "2048", "--zero", "3"], ["without FSDP", "--estimate-only"]),
    (["--layouts", "--estimate-only"], ["--layouts", "--estimate-only"]),
])
def test_bad_flags_are_one_line(capsys, argv, words):
    assert main(["estimate", "--config", "deepseek-v3"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    assert all(w in err for w in words), err


def test_recompute_flag_alone_means_full(capsys):
    assert main(["estimate", "--config", "tiny", "--recompute", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["layout"]["recompute"] == "full"
    assert Layout(recompute=True).recompute == "full" and Layout(recompute=False).recompute == "none"


# ---------------------------------------------------------------------- what the trainer refuses
@pytest.mark.parametrize("name, layout, refused", [
    ("deepseek-v3", dict(dp=8, pp=2, zero=3), "without FSDP"),
    ("deepseek-v3", dict(dp=8, pp=2, zero=1, recompute="full"), None),
    ("deepseek-v3", dict(dp=8, pp=1, zero=3, recompute="selective"), None),
    ("deepseek-v2-lite", dict(dp=8, pp=2, zero=0, schedule="dualpipev"), None),
    ("deepseek-v3.2", dict(dp=8, pp=2), "DeepSeek-V3 models only"),
    ("deepseek-v3.2", dict(dp=8, pp=1, recompute="selective"), None),
    ("deepseek-v4-flash", dict(dp=8, pp=2), "DeepSeek-V3 models only"),
    ("deepseek-v4-flash", dict(dp=8, pp=1, recompute="full"), "recompute"),
    ("deepseek-v4-flash", dict(dp=8, pp=1, zero=3), "fsdp"),
    ("deepseek-v4-flash", dict(dp=8, pp=1), None),
])
def test_trainer_refusal_follows_the_trainers_checks(name, layout, refused, tmp_path):
    """The estimate's trainer_refusal says what nanoseek.train.config refuses, for each family."""
    from nanoseek.estimate.memory import trainer_refusal
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import config_from_dict
    from test_pipeline import raw_config
    cfg = load_config(name)
    why = trainer_refusal(cfg, Layout(**layout))
    assert (why is None) == (refused is None) and (refused or "") in (why or ""), why
    # the trainer agrees on the same layout (a small model of the same family, same pp / fsdp / recompute)
    pp = layout.get("pp", 1)
    raw = raw_config(tmp_path, 1, 4 * pp, 1, pp=pp, fsdp=layout.get("zero", 1) == 3, ep=1,
                     schedule=layout.get("schedule", "1f1b"))
    if pp == 1:
        raw["parallel"].pop("schedule", None)         # a schedule without a pipeline is itself refused
    raw["model"] = {"preset": {"deepseek-v3": "tiny", "deepseek-v2-lite": "tiny", "deepseek-v3.2": "v32-tiny",
                               "deepseek-v4-flash": "v4-tiny"}[name], "num_hidden_layers": 4}
    raw["train"]["recompute"] = layout.get("recompute", "none")
    raw["spike"]["reference_batches"] = 4 * pp
    try:
        config_from_dict(raw, "t.toml")
        trainer = None
    except ConfigError as e:
        trainer = str(e)
    assert (trainer is None) == (why is None), (why, trainer)


def test_layouts_mark_every_layout_nanoseek_cannot_run():
    """--layouts keeps the layouts the trainer refuses, each marked * with its reason under the table."""
    from rich.console import Console

    from nanoseek.estimate.report import print_layouts
    for name, gpus in (("deepseek-v3", 2048), ("deepseek-v4-flash", 256)):
        cfg = load_config(name)
        found = search_layouts(cfg, get_gpu("h800"), gpus, zero=3, limit=40)
        assert any(f.estimate_only for f in found)
        buf = io.StringIO()
        print_layouts(found, cfg_name=name, gpu="H800", gpus=gpus, seq_len=4096, micro_batch=1,
                      precision="bf16", console=Console(file=buf, width=250), top=40)
        rows = [r for r in buf.getvalue().splitlines() if r.startswith("│")]
        assert len(rows) == len(found)
        for f, r in zip(found, rows):
            assert ("*" in r) == bool(f.estimate_only), r
        assert all(f"* estimate only: {f.estimate_only}" in buf.getvalue() for f in found if f.estimate_only)
        assert "estimate only" in buf.getvalue().split("┏")[0]       # said in the caption too


def test_estimate_only_prices_and_marks_the_layout(capsys):
    args = ["estimate", "--config", "deepseek-v3", "--gpu", "h800", "--gpus", "2048", "--pp", "16", "--ep", "64",
            "--fsdp", "--schedule", "dualpipev", "--micro-batches", "120", "--recompute", "full"]
    assert main(args + ["--estimate-only", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert "FSDP" in mem["estimate_only"] and mem["total_bytes"] == pytest.approx(14.1e9, rel=0.01)
    assert main(args + ["--estimate-only"]) == 0
    assert "ESTIMATE ONLY" in capsys.readouterr().out.replace("\n", "")
    assert main(args[:-9] + ["--zero", "1", "--schedule", "dualpipev", "--micro-batches", "120", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["estimate_only"] is None
