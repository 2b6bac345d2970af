"""AdamW parameter groups and the WSD / cosine / constant learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.train.config import OptimSection
from nanoseek.train.optim import LRSchedule, build_optimizer, param_groups


def lrs(cfg: OptimSection, total: int) -> list[float]:
    s = LRSchedule(cfg, total)
    return [s.lr(i, (i + 1) / total) for i in range(total)]


def test_wsd_warmup_then_constant_then_decay_to_min_lr():
    cfg = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape="linear")
    x = lrs(cfg, 100)
    assert x[0] == pytest.approx(0.1) and x[9] == pytest.approx(1.0)                # linear warm-up from 0
    assert all(a < b for a, b in zip(x[:10], x[1:10]))
    assert all(v == pytest.approx(1.0) for v in x[10:80])                           # stable
    assert all(a > b for a, b in zip(x[80:], x[81:]))                               # decaying
    assert x[-1] == pytest.approx(0.1)                                              # ends at min_lr
    assert x[89] == pytest.approx(0.1 + 0.9 * (1 - 0.5))                            # linear halfway


def test_wsd_cosine_decay_and_decay_steps():
    cfg = OptimSection(lr=2.0, min_lr=0.0, warmup_steps=0, schedule="wsd", decay_steps=10, decay_shape="cosine")
    x = lrs(cfg, 50)
    assert all(v == 2.0 for v in x[:40])
    assert x[44] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert x[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_and_constant():
    x = lrs(OptimSection(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="cosine"), 100)
    assert x[49] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert x[-1] == pytest.approx(0.1)
    y = lrs(OptimSection(lr=1.0, warmup_steps=4, schedule="constant"), 20)
    assert y[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(y[4:]) == {1.0}


def test_wsd_by_progress_when_the_budget_is_time():
    cfg = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="wsd", decay_fraction=0.5, decay_shape="linear")
    s = LRSchedule(cfg, total_steps=None)
    assert s.lr(1000, 0.25) == 1.0 and s.lr(1000, 0.75) == pytest.approx(0.55) and s.lr(1000, 1.0) == pytest.approx(0.1)


def test_param_groups_decay_matrices_only(tiny_model):
    model = tiny_model()
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert any("layernorm" in names[i] for i in map(id, groups[1]["params"]))
    assert any("experts.gate_up_proj" in names[i] for i in decay) and any("embed_tokens" in names[i] for i in decay)
    n_params = len({id(p) for p in model.parameters()})
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_params
    opt = build_optimizer(model, OptimSection(betas=[0.9, 0.95], weight_decay=0.1))
    assert opt.defaults["betas"] == (0.9, 0.95)
    # the expert bias is a buffer: never in the optimizer
    assert not any(p is m.gate.e_score_correction_bias for g in opt.param_groups for p in g["params"]
                   for m in model.moe_layers())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]     # the CPU's fused kernel (bench_train_small.py)


def test_fused_adamw_steps_as_foreach_adamw(tiny_model):
    """The fused CPU kernel is AdamW: the same update as the foreach one, to rounding."""
    models = [tiny_model(), tiny_model()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimSection(lr=1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    fused = build_optimizer(models[0], cfg)
    foreach = torch.optim.AdamW(param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    for step in range(3):
        for m, opt in zip(models, (fused, foreach)):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
