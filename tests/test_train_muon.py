"""Muon as a trainer option (``[optim] optimizer = "muon"``): which parameters it trains, its step
against ``torch.optim.Muon``'s, the combined optimizer's state dict, the schedule, the config, refusals,
and short pre-training and SFT runs whose loss falls. Exact resume: tests/test_train_loop.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.model.moe import MoE
from nanoseek.train.checkpoint import CheckpointError, flatten_state, latest_checkpoint, unflatten_state
from nanoseek.train.config import OPTIMIZERS as OPTIMIZER_NAMES
from nanoseek.train.config import OptimSection, config_from_dict, config_to_toml, read_toml
from nanoseek.train.metrics import read_metrics, step_records
from nanoseek.train.muon import Muon, orthogonalize
from nanoseek.train.optim import OPTIMIZERS, LRSchedule, MuonAdamW, build_optimizer, muon_param_groups, set_lr

MUON = OptimSection(optimizer="muon")


def _backward(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    model(ids, labels=ids).loss.backward()


# ---------------------------------------------------------------------------- which parameters go where
@pytest.mark.parametrize("overrides", [
    {},                                                    # MLA with q LoRA, a dense layer, shared experts, MTP
    {"q_lora_rank": None, "tie_word_embeddings": True, "first_k_dense_replace": 0, "n_shared_experts": None,
     "num_nextn_predict_layers": 0, "n_routed_experts": 4, "n_group": 1, "topk_group": 1},
], ids=["v3", "q_proj-tied-all-moe"])
def test_muon_trains_the_hidden_matrices_and_adamw_the_rest(tiny_model, overrides):
    model = tiny_model(**overrides)
    opt = build_optimizer(model, MUON)
    assert isinstance(opt, MuonAdamW)
    group_of: dict[int, str] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in group_of                   # each parameter once (a tied head too)
            group_of[id(p)] = g["name"]
    named = dict(model.named_parameters())
    assert set(group_of) == {id(p) for p in named.values()}
    role = {n: group_of[id(p)] for n, p in named.items()}
    adamw_matrices = {"model.embed_tokens.weight", "lm_head.weight"} | {
        n for n in named if n.endswith("mlp.gate.weight")}            # the routers
    for n, p in named.items():
        want = "no_decay" if p.ndim == 1 else "decay" if n in adamw_matrices else "muon"
        assert role[n] == want, n
    # the classes of matrix Muon must get, by name
    muon = [n for n, r in role.items() if r == "muon"]
    for part in ("experts.gate_up_proj", "experts.down_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                 "q_a_proj" if overrides.get("q_lora_rank", 16) else "q_proj"):
        assert any(part in n for n in muon), part
    assert any("shared_experts.up_proj" in n for n in muon) == bool(overrides.get("n_shared_experts", 1))
    assert any("mtp.0.eh_proj" in n for n in muon) == bool(overrides.get("num_nextn_predict_layers", 1))
    n_moe = sum(isinstance(m, MoE) for m in model.modules())          # MTP's block too
    assert sum(n.endswith("mlp.gate.weight") for n in adamw_matrices) == n_moe > 0
    # the fused SwiGLU: each expert's gate and up are two matrices; nothing else is split
    _, blocks = muon_param_groups(model)
    assert {n for n, p in named.items() if p in blocks} == {n for n in named if n.endswith("experts.gate_up_proj")}
    assert set(blocks.values()) == {2}
    # the aux-loss-free bias is a buffer: no optimizer touches it
    biases = {id(m.gate.e_score_correction_bias) for m in model.modules() if isinstance(m, MoE)}
    assert not biases & set(group_of)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == groups["muon"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert (groups["muon"]["momentum"], groups["muon"]["nesterov"], groups["muon"]["ns_steps"],
            groups["muon"]["adjust_lr_fn"]) == (0.95, True, 5, "match_rms_adamw")


def test_adamw_stays_the_default_and_the_names_agree(tiny_model):
    assert OptimSection().optimizer == "adamw"
    assert isinstance(build_optimizer(tiny_model(), OptimSection()), torch.optim.AdamW)
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES            # the config's names = the builders'


# ---------------------------------------------------------------------------- the step, against torch's
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("adjust,nesterov,wd", [("match_rms_adamw", True, 0.1), ("original", False, 0.0)])
def test_a_matrix_steps_exactly_like_torch_muon(shape, adjust, nesterov, wd):
    torch.manual_seed(0)
    w = torch.randn(shape)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    kw = dict(lr=0.02, weight_decay=wd, momentum=0.9, nesterov=nesterov, ns_steps=4, adjust_lr_fn=adjust)
    a, b = Muon([ours], **kw), torch.optim.Muon([ref], **kw)
    for _ in range(3):
        g = torch.randn(shape)
        ours.grad, ref.grad = g.clone(), g.clone()
        a.step()
        b.step()
        assert torch.equal(ours, ref)                      # bit for bit
    assert torch.equal(a.state[ours]["momentum_buffer"], b.state[ref]["momentum_buffer"])
    assert (ours - w).abs().max() > 1e-3


@pytest.mark.parametrize("experts,rows,cols,blocks", [(3, 16, 12, 2), (3, 12, 8, 1), (2, 6, 20, 2), (4, 8, 8, 1)],
                         ids=["gate_up", "down-tall", "gate_up-wide", "square"])
def test_stacked_expert_matrices_each_step_like_torch_muon_on_that_matrix(experts, rows, cols, blocks):
    """[E, k*A, B] with k row blocks = E*k separate A x B matrices, each stepped as torch's Muon does."""
    torch.manual_seed(1)
    w = torch.randn(experts, rows, cols)
    p = torch.nn.Parameter(w.clone())
    a_rows = rows // blocks
    refs = [torch.nn.Parameter(w[e, j * a_rows:(j + 1) * a_rows].clone()) for e in range(experts) for j in range(blocks)]
    kw = dict(lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    ours, ref = Muon([p], row_blocks={p: blocks}, **kw), torch.optim.Muon(refs, **kw)
    assert ours.matrix_shape(p) == (a_rows, cols)
    for _ in range(3):
        g = torch.randn(experts, rows, cols)
        p.grad = g.clone()
        for i, r in enumerate(refs):
            e, j = divmod(i, blocks)
            r.grad = g[e, j * a_rows:(j + 1) * a_rows].clone()
        ours.step()
        ref.step()
        got = p.detach().reshape(experts * blocks, a_rows, cols)
        for i, r in enumerate(refs):
            # batched bf16 matmuls may round differently from one-by-one ones: within bf16 noise of the update
            torch.testing.assert_close(got[i], r.detach(), rtol=0, atol=1e-4)
    if blocks > 1:                                         # the split matters: one [k*A, B] matrix steps otherwise
        g = torch.randn(rows, cols)
        whole, split = orthogonalize(g, 5)[:a_rows].float(), orthogonalize(g[:a_rows], 5).float()
        assert not torch.allclose(whole, split, atol=1e-2)


# ---------------------------------------------------------------------------- one optimizer to the trainer
def test_state_dict_is_one_optimizers_and_resumes_exactly(tiny_model):
    model = tiny_model()
    opt = build_optimizer(model, MUON)
    _backward(model)
    opt.step()
    sd = opt.state_dict()
    flat = [p for g in opt.param_groups for p in g["params"]]
    assert [g["name"] for g in sd["param_groups"]] == ["decay", "no_decay", "muon"]
    assert sorted(i for g in sd["param_groups"] for i in g["params"]) == list(range(len(flat)))
    for i, p in enumerate(flat):                          # indexed like one optimizer: distributed.py's gather
        if p.grad is None and i not in sd["state"]:
            continue                                       # (the MTP module: no gradient without its loss)
        keys = {"momentum_buffer"} if i in sd["param_groups"][2]["params"] else {"step", "exp_avg", "exp_avg_sq"}
        assert set(sd["state"][i]) == keys and sd["state"][i][min(keys)].shape == p.shape
    assert sum(i in sd["state"] for i in sd["param_groups"][2]["params"]) > 10
    opt.zero_grad()
    # through a checkpoint's JSON + tensors into a fresh copy: the next steps are identical
    meta, tensors = flatten_state({"optimizer": sd})
    back = unflatten_state(json.loads(json.dumps(meta)), tensors)["optimizer"]
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, MUON)
    opt2.load_state_dict(back)
    for seed in (1, 2):
        for m, o in ((model, opt), (twin, opt2)):
            _backward(m, seed)
            o.step()
            o.zero_grad()
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"parameter groups \['decay', 'no_decay'\], this one \['decay', 'no_decay', 'muon'\]"):
        opt2.load_state_dict(build_optimizer(twin, OptimSection()).state_dict())


def test_the_schedule_moves_muons_lr_in_proportion(tiny_model):
    cfg = OptimSection(optimizer="muon", lr=1e-3, min_lr=1e-4, muon_lr=2e-2, warmup_steps=3, schedule="wsd",
                       decay_fraction=0.5, decay_shape="linear")
    opt, sched = build_optimizer(tiny_model(), cfg), LRSchedule(cfg, 20)
    seen = []
    for step in range(20):
        lr = sched.lr(step, (step + 1) / 20)
        set_lr(opt, lr)
        by = {g["name"]: g["lr"] for g in opt.param_groups}
        assert by["decay"] == by["no_decay"] == lr and by["muon"] == pytest.approx(20 * lr, rel=1e-12)
        seen.append(by["muon"])
    assert seen[0] == pytest.approx(2e-2 / 3) and max(seen) == pytest.approx(2e-2) and seen[-1] == pytest.approx(2e-3)
    opt = build_optimizer(tiny_model(), OptimSection(optimizer="muon", lr=1e-3))    # muon_lr unset: lr's
    set_lr(opt, 5e-4)
    assert {g["lr"] for g in opt.param_groups} == {5e-4}


# ---------------------------------------------------------------------------- the config
MODEL = dict(preset="tiny", vocab_size=128, hidden_size=32, moe_intermediate_size=16, num_attention_heads=2,
             q_lora_rank=16, kv_lora_rank=16, max_position_embeddings=128)


def raw(tmp_path, **optim) -> dict:
    return {"model": dict(MODEL), "data": {"source": "synthetic", "val_batches": 1},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "micro_batch_size": 2, "seq_len": 16, **optim},
            "train": {"max_steps": 4, "eval_every": 0, "save_every": 2, "out_dir": str(tmp_path / "run"),
                      "device": "cpu"}}


@pytest.mark.parametrize("key,value,why", [
    ("optimizer", "sgd", "must be 'adamw' or 'muon'"),
    ("muon_lr", 0.0, "must be a positive number"),
    ("muon_momentum", 1.0, r"must be in \[0, 1\)"),
    ("muon_weight_decay", -0.1, "must be >= 0"),
    ("muon_ns_steps", 0, r"must be in \[1, 99\]"),
    ("muon_ns_steps", 100, r"must be in \[1, 99\]"),
    ("muon_adjust_lr", "spectral", "must be 'match_rms_adamw' or 'original'"),
])
def test_bad_muon_settings_are_one_line_naming_the_key(tmp_path, key, value, why):
    settings = {key: value} if key == "optimizer" else {"optimizer": "muon", key: value}
    with pytest.raises(ConfigError, match=rf"^t\.toml: \[optim\] {key} = {value!r}: {why}") as e:
        config_from_dict(raw(tmp_path, **settings), "t.toml")
    assert "\n" not in str(e.value)


def test_muon_config_types_unused_keys_fsdp_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match=r"\[optim\] muon_nesterov must be bool, got str 'yes'"):
        config_from_dict(raw(tmp_path, optimizer="muon", muon_nesterov="yes"), "t.toml")
    with pytest.raises(ConfigError, match=r"\[optim\] muon_lr, muon_ns_steps would have no effect with optimizer = "
                                          r"'adamw'; set optimizer = \"muon\""):
        config_from_dict(raw(tmp_path, muon_lr=0.02, muon_ns_steps=6), "t.toml")
    bad = raw(tmp_path, optimizer="muon")
    bad["parallel"] = {"fsdp": True}
    with pytest.raises(ConfigError, match=r"\[optim\] optimizer = 'muon': cannot run with \[parallel\] fsdp = true"):
        config_from_dict(bad, "t.toml")
    cfg = config_from_dict(raw(tmp_path, optimizer="muon", muon_lr=0.02, muon_nesterov=False,
                               muon_adjust_lr="original", muon_weight_decay=0.0), "t.toml")
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert config_from_dict(read_toml(tmp_path / "c.toml"), "c.toml").to_dict() == cfg.to_dict()
    plain = config_to_toml(config_from_dict(raw(tmp_path), "t.toml"))    # AdamW: no muon_ keys written
    assert 'optimizer = "adamw"' in plain.splitlines() and not [x for x in plain.splitlines() if x.lstrip("# ").startswith("muon_")]


# ---------------------------------------------------------------------------- runs
def test_pretrain_cli_with_muon_loss_falls_and_resume_refuses_the_other_optimizer(tmp_path, capsys):
    from nanoseek.cli import main

    out = str(tmp_path / "muon")
    small = ["--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2", "--set", "model.q_lora_rank=16",
             "--set", "model.kv_lora_rank=16", "--set", "model.moe_intermediate_size=16", "--set", "optim.seq_len=16",
             "--set", "optim.micro_batch_size=8", "--set", "optim.grad_accum=1", "--set", "data.val_batches=1",
             "--set", "optim.lr=1e-2", "--set", "optim.min_lr=1e-3", "--set", "train.max_steps=60",
             "--set", "train.save_every=60", "--set", "train.eval_every=0", "--no-progress", "--quiet"]
    assert main(["pretrain", "--config", "tiny", "--out-dir", out, "--set", "optim.optimizer=muon", *small]) == 0
    loss = [r["loss"] for r in step_records(read_metrics(out)).values()]
    assert len(loss) == 60 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-5:]) / 5 < 0.75 * sum(loss[:5]) / 5, loss          # measured: 8.1 -> 4.9 (AdamW: 6.7)
    assert 'optimizer = "muon"' in (tmp_path / "muon" / "config.toml").read_text()
    capsys.readouterr()
    # resuming it as an AdamW run: refused in one line (its config.toml writes muon_* keys)...
    assert main(["pretrain", "--out-dir", out, "--resume", "--set", "train.max_steps=61",
                 "--set", "optim.optimizer=adamw", "--no-progress", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would have no effect with optimizer = 'adamw'" in err and len(err.splitlines()) == 1
    # ...and a trainer built for AdamW refuses Muon's optimizer state, saying which it is
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import build_pretraining

    cfg = config_from_dict(read_toml(tmp_path / "muon" / "config.toml"), "c")
    cfg.optim.optimizer = "adamw"
    model, task, _ = build_pretraining(cfg)
    trainer = Trainer(model, task, cfg.optim, cfg.train, cfg.spike, tmp_path / "other", quiet=True)
    with pytest.raises(CheckpointError, match=r"its optimizer state is muon's and this run sets \[optim\] optimizer = "
                                              r"'adamw'; resume with --set optim.optimizer=muon") as e:
        trainer.restore(latest_checkpoint(out))
    assert "\n" not in str(e.value)


def test_sft_trains_with_muon(tmp_path):
    from nanoseek.model.checkpoint import save_pretrained
    from nanoseek.post.datasets import SFTExample
    from nanoseek.post.registry import stage_config_from_dict
    from nanoseek.post.sft import train_sft
    from nanoseek.train.checkpoint import load_state
    from post_helpers import tiny_model as post_model
    from post_helpers import tiny_tokenizer

    tk = tiny_tokenizer()
    save_pretrained(post_model(tk.vocab_size), tmp_path / "base")
    tk.save(tmp_path / "base")
    examples = [SFTExample(messages=[{"role": "user", "content": f"digit {d}"}, {"role": "assistant", "content": "7"}])
                for d in range(8)]
    cfg = stage_config_from_dict("sft", {
        "model": {"init_from": str(tmp_path / "base")}, "sft": {"mode": "pad"},
        "optim": {"optimizer": "muon", "lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                  "micro_batch_size": 8, "seq_len": 64},
        "train": {"max_steps": 8, "out_dir": str(tmp_path / "sft"), "device": "cpu", "seed": 0}})
    res = train_sft(cfg, examples=examples, quiet=True)
    assert res.status == "done" and res.history[-1]["ce"] < 0.5 * res.history[0]["ce"]
    state = load_state(latest_checkpoint(tmp_path / "sft"))["optimizer"]
    assert [g["name"] for g in state["param_groups"]] == ["decay", "no_decay", "muon"]
    with pytest.raises(ConfigError, match=r"\[optim\] muon_momentum would have no effect"):
        stage_config_from_dict("sft", {"model": {"init_from": str(tmp_path / "base")}, "optim": {"muon_momentum": 0.9}})
