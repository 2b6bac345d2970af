"""nanoseek ablate: derived arms match as claimed (parameters, KV bytes), every arm gets the same
data order and seeds, the budget sizing, the comparison rule, the report from stubbed runs, and
one real two-step suite through the shared training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoseek.ablate import runner
from nanoseek.ablate.report import read_results, table_rows, write_combined_markdown
from nanoseek.ablate.results import ArmResult, SeedRun, claim_status, compare
from nanoseek.ablate.runner import Plan, make_plan, run_and_report, run_suite, solve_steps, train_config
from nanoseek.ablate.suites import (ATTENTION_TOLERANCE, PARAM_TOLERANCE, base_model, build_suite,
                                    dense_with_matched_params, gqa_with_matched_kv_cache, mha_with_matched_params,
                                    non_embedding_params)
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.model.params import attention_params, kv_cache_bytes_per_token


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small prepared corpus (the built-in generator, a 300-token BPE)."""
    from nanoseek.data.corpus import default_corpus_records
    from nanoseek.data.prepare import PrepareConfig, prepare
    from nanoseek.data.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("ablate_data")
    docs = list(default_corpus_records(80, seed=0))
    tok = Tokenizer.train([d.text for d in docs], vocab_size=300)
    prepare(docs, out, tok, PrepareConfig(val_fraction=0.1, near_dedup_threshold=None))
    return out


def vocab_of(data_dir) -> int:
    return json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def non_embedding_of_module(model) -> int:
    """Counted on the instantiated model: every tensor except embedding, head and MTP (+ the bias buffers)."""
    n = model.num_parameters()
    return n - model.model.embed_tokens.weight.numel() - model.lm_head.weight.numel()


# ---------------------------------------------------------------------------- derived configs
@pytest.mark.parametrize("overrides", [{}, dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1),
                                       dict(num_hidden_layers=3, first_k_dense_replace=0, n_shared_experts=2)])
def test_dense_arms_match_the_moe_activated_and_total_params(overrides):
    moe = base_model(1000, **overrides)
    total, active = non_embedding_params(moe)
    dense_a = dense_with_matched_params(moe, "active")
    dense_t = dense_with_matched_params(moe, "total")
    for dense, target in ((dense_a, active), (dense_t, total)):
        assert dense.num_moe_layers == 0
        t, a = non_embedding_params(dense)
        assert t == a                                             # dense: everything is activated
        assert abs(t - target) / target <= PARAM_TOLERANCE
        # the analytic count is what the instantiated model holds
        assert non_embedding_of_module(DeepseekV3ForCausalLM(dense, init_weights=False)) == t
        # nothing but the MLP width changed
        assert dense.replace(intermediate_size=moe.intermediate_size, n_routed_experts=moe.n_routed_experts) == moe
    assert non_embedding_of_module(DeepseekV3ForCausalLM(moe, init_weights=False)) == total
    suite = build_suite("moe-vs-dense", 1000, **overrides)
    assert suite.arm("dense-active").model == dense_a and suite.arm("dense-total").model == dense_t


def test_attention_arms_match_mla_params_and_report_kv_bytes():
    mla = base_model(1000)
    suite = build_suite("attention", 1000)
    mha, gqa = suite.arm("mha").model, suite.arm("gqa-2").model
    assert mha.attention_type == gqa.attention_type == "mha"
    assert mha.num_key_value_heads == mla.num_attention_heads == mha.num_attention_heads
    assert gqa.num_key_value_heads == mla.num_attention_heads // 2
    target = attention_params(mla)
    for cfg in (mha, gqa):
        err = abs(attention_params(cfg) - target)
        assert err / target <= ATTENTION_TOLERANCE
        # the search found the best achievable: one step of v_head_dim moves hidden x (heads + kv_heads)
        assert err <= mla.hidden_size * (cfg.num_attention_heads + cfg.num_key_value_heads) / 2
        assert cfg.qk_rope_head_dim == mla.qk_rope_head_dim
        t, _ = non_embedding_params(cfg)
        assert abs(t - non_embedding_params(mla)[0]) / non_embedding_params(mla)[0] <= PARAM_TOLERANCE
        assert non_embedding_of_module(DeepseekV3ForCausalLM(cfg, init_weights=False)) == t
        # only attention fields differ
        assert cfg.replace(attention_type="mla", num_key_value_heads=mla.num_key_value_heads,
                           qk_nope_head_dim=mla.qk_nope_head_dim, v_head_dim=mla.v_head_dim) == mla
    kv = {a.name: a.info(128)["kv_bytes_per_token"] for a in suite.arms}
    assert kv["mla"] == kv_cache_bytes_per_token(mla)
    assert kv["mla"] == 2 * (mla.kv_lora_rank + mla.qk_rope_head_dim) * mla.num_hidden_layers
    assert kv["mla"] < kv["gqa-2"] < kv["mha"]
    with pytest.raises(ValueError, match="must divide"):
        mha_with_matched_params(mla, 3)


@pytest.mark.parametrize("overrides", [{}, dict(num_attention_heads=8, kv_lora_rank=56, qk_rope_head_dim=8),
                                       dict(kv_lora_rank=24, qk_nope_head_dim=12, v_head_dim=12)])
def test_same_cache_arms_cache_exactly_mlas_bytes_with_fewer_parameters(overrides):
    mla = base_model(1000, **overrides)
    suite = build_suite("attention", 1000, **overrides)
    same = [a for a in suite.arms if a.name.endswith("-same-cache")]
    assert [a.name for a in same] == ["mqa-same-cache", f"gqa-{mla.num_attention_heads // 2}-same-cache"]
    for arm in same:
        cfg = arm.model
        assert cfg.attention_type == "mha" and cfg.num_attention_heads == mla.num_attention_heads
        assert kv_cache_bytes_per_token(cfg) == kv_cache_bytes_per_token(mla)
        assert cfg.num_key_value_heads * (cfg.qk_head_dim + cfg.v_head_dim) == mla.kv_lora_rank + mla.qk_rope_head_dim
        assert cfg.qk_rope_head_dim == mla.qk_rope_head_dim and cfg.qk_nope_head_dim >= 1 and cfg.v_head_dim >= 1
        assert non_embedding_params(cfg)[0] < non_embedding_params(mla)[0]
        assert cfg.replace(attention_type="mla", num_key_value_heads=mla.num_key_value_heads,
                           qk_nope_head_dim=mla.qk_nope_head_dim, v_head_dim=mla.v_head_dim) == mla
        model = DeepseekV3ForCausalLM(cfg)
        assert model(torch.randint(0, 1000, (1, 6))).logits.shape == (1, 6, 1000)
    assert same[0].model.qk_head_dim == mla.qk_head_dim or mla.qk_head_dim + mla.v_head_dim != (
        mla.kv_lora_rank + mla.qk_rope_head_dim)
    with pytest.raises(ValueError, match="cannot be split"):
        gqa_with_matched_kv_cache(base_model(1000, num_attention_heads=8, kv_lora_rank=30), 4)
    with pytest.raises(ValueError, match="must divide"):
        gqa_with_matched_kv_cache(mla, 3)


def test_attention_judge_reports_the_same_cache_comparisons():
    suite = build_suite("attention", 1000)
    names = [a.name for a in suite.arms]
    losses = {"mla": 3.0, "mha": 3.1, "gqa-2": 3.2, "mqa-same-cache": 3.3, "gqa-2-same-cache": 3.25}
    r = {n: arm_with(n, {0: v, 1: v + 0.001}) for n, v in losses.items()}
    for n in names:
        r[n].info, r[n].label = suite.arm(n).info(128), suite.arm(n).label
    v = suite.judge(r)
    assert v.status == "held"
    assert "MLA vs MQA, MLA's KV cache (the same KV cache): validation loss lower" in v.summary
    r["mqa-same-cache"] = arm_with("mqa-same-cache", {0: 2.9, 1: 2.901})
    r["mqa-same-cache"].info = suite.arm("mqa-same-cache").info(128)
    r["mqa-same-cache"].label = suite.arm("mqa-same-cache").label
    assert suite.judge(r).status == "partly held"


def test_recipe_suites_share_the_model_and_change_only_the_claimed_knob():
    base = base_model(1000)
    bal = build_suite("balance", 1000)
    assert all(a.model == base for a in bal.arms)
    free, fast, none = bal.arm("aux-free"), bal.arm("aux-free-0.01"), bal.arm("none")
    assert free.train["bias_update_gamma"] == 0.001 and free.train["seq_aux_alpha"] == 0
    assert fast.train["bias_update_gamma"] == 0.01 and fast.train["seq_aux_alpha"] == 0
    assert none.train["bias_update_gamma"] == 0 == none.train["seq_aux_alpha"]
    alphas = sorted(a.train["seq_aux_alpha"] for a in bal.arms if a.name.startswith("aux-0"))
    assert len(alphas) >= 3 and all(a.train["bias_update_gamma"] == 0 for a in bal.arms if a.name.startswith("aux-0"))
    m = build_suite("mtp", 1000)
    assert m.arm("no-mtp").model == base and m.arm("no-mtp").train["mtp_lambda"] == 0
    assert m.arm("mtp").model == base.replace(num_nextn_predict_layers=1) and m.arm("mtp").train["mtp_lambda"] == 0.3
    p = build_suite("precision", 1000)
    assert [a.precision for a in p.arms] == [None, "bf16", "fp8"] and all(a.model == base for a in p.arms)
    assert len({json.dumps(a.train, sort_keys=True) for a in p.arms}) == 1


# ---------------------------------------------------------------------------- same data, same seeds
@pytest.mark.parametrize("name", ["moe-vs-dense", "attention", "precision"])
def test_arms_share_data_order_seeds_and_schedule(name, data_dir, tmp_path):
    from nanoseek.train.pretrain import build_pretraining

    suite = build_suite(name, vocab_of(data_dir))
    plan = Plan(name, str(data_dir), [3], steps=5, micro_batch_size=2, seq_len=32, val_batches=1)
    first = {}
    for arm in suite.arms:
        cfg = train_config(arm, plan, 3, tmp_path / arm.name)
        d = cfg.to_dict()
        assert d["train"]["seed"] == 3 and d["train"]["max_steps"] == 5
        first.setdefault("sections", (d["data"], d["optim"]))
        assert (d["data"], d["optim"]) == first["sections"]
        assert cfg.model.build_config() == arm.model
        _, task, _ = build_pretraining(cfg)
        it = task.batches()
        batches = [next(it) for _ in range(2)]
        val = next(task.val_loader)
        got = (torch.cat([b.input_ids for b in batches]), torch.cat([b.labels for b in batches]), val[0])
        if "batches" not in first:
            first["batches"] = got
        else:
            assert all(torch.equal(a, b) for a, b in zip(got, first["batches"])), arm.name
    # another seed gives another order: the seed really drives the data
    cfg = train_config(suite.arms[0], plan, 4, tmp_path / "other")
    _, task, _ = build_pretraining(cfg)
    assert not torch.equal(next(task.batches()).input_ids, first["batches"][0][:2])


# ---------------------------------------------------------------------------- sizing
def test_plan_gives_equal_tokens_and_trades_seeds_for_steps(monkeypatch):
    suite = build_suite("mtp", 1000)
    fake = {"no-mtp": {"step_s": 0.1, "eval_s": 0.5, "startup_s": 1.0},
            "mtp": {"step_s": 0.2, "eval_s": 0.7, "startup_s": 1.0}}
    monkeypatch.setattr(runner, "probe_arms", lambda *a, **k: fake)
    plan = make_plan(suite, "d", budget_minutes=5, min_steps=100)
    assert len(plan.seeds) == 3 and plan.steps >= 100
    # the runs (steps x seconds per step + validations + start-up) fit 90% of the budget
    per_seed = sum(plan.steps * p["step_s"] + 9 * p["eval_s"] + runner.STARTUP_S + p["startup_s"] for p in fake.values())
    assert per_seed * len(plan.seeds) <= 0.9 * 300 and solve_steps(fake, 0.9 * 300, 3) == plan.steps
    small = make_plan(suite, "d", budget_minutes=1.2, min_steps=100)
    assert len(small.seeds) == 1 and small.steps < 100 * 3
    assert make_plan(suite, "d", budget_minutes=5, seeds=2).seeds == [0, 1]
    assert make_plan(suite, "d", budget_minutes=None, steps=7, seed_base=5).seeds == [5]
    with pytest.raises(Exception, match="give at least"):
        make_plan(suite, "d", budget_minutes=0.2)


# ---------------------------------------------------------------------------- comparisons
def arm_with(name, losses, maxvio=None):
    runs = [SeedRun(seed=s, run_dir="", final_val_loss=v, curve=[], maxvio=[], tokens=0, wall_s=0.0,
                    tokens_per_s=1.0, config_seed=s, maxvio_mean=None if maxvio is None else maxvio[i])
            for i, (s, v) in enumerate(losses.items())]
    return ArmResult(name, name, {}, runs=runs)


def test_compare_calls_a_difference_clear_only_when_its_t_interval_over_seeds_excludes_zero():
    from nanoseek.eval.stats import t95, t_interval

    a = arm_with("a", {0: 3.00, 1: 3.10})
    b = arm_with("b", {0: 3.20, 1: 3.30})
    c = compare(a, b)                                   # paired: the same shift on both seeds
    assert c.clear is True and math.isclose(c.diff, -0.2) and c.per_seed == pytest.approx({0: -0.2, 1: -0.2})
    noisy = arm_with("n", {0: 3.02, 1: 3.00})
    assert compare(a, noisy).clear is False                          # seeds disagree on the sign
    # three seeds, by hand: d = -0.10, -0.12, -0.08: mean -0.10, sd 0.02, half-width 4.303 x 0.02 / sqrt(3)
    three = compare(arm_with("a", {0: 2.90, 1: 2.88, 2: 2.92}), arm_with("b", {0: 3.0, 1: 3.0, 2: 3.0}))
    assert three.interval.low == pytest.approx(-0.10 - 4.303 * 0.02 / 3 ** 0.5, abs=1e-9)
    assert three.interval.high == pytest.approx(-0.10 + 4.303 * 0.02 / 3 ** 0.5, abs=1e-9)
    assert three.clear is True and "95% interval over 3 seeds [-0.1497, -0.0503]" in three.text()
    # d = -0.10, -0.02, +0.01: every interval end within 0.178 of zero, the sign unresolved
    wide = compare(arm_with("a", {0: 2.90, 1: 2.98, 2: 3.01}), arm_with("b", {0: 3.0, 1: 3.0, 2: 3.0}))
    d = [-0.10, -0.02, 0.01]
    ci = t_interval(d)
    assert wide.clear is False and wide.bound == pytest.approx(max(-ci.low, ci.high))
    assert "unresolved" in wide.text() and f"|effect| < {wide.bound:.4f} at this power" in wide.text()
    assert claim_status(wide, True) == f"unresolved: |effect| < {wide.bound:.3g} at this power"
    assert claim_status(three, True) == "held" and claim_status(three, False) == "did not hold"
    assert compare(arm_with("x", {0: 1.0}), arm_with("y", {0: 2.0})).clear is None
    assert t95(1) == 12.706 and t95(2) == 4.303 and t95(1000) == pytest.approx(1.96, abs=1e-3)


def precision_results(fp32, bf16, fp8):
    def arm(name, losses):
        a = arm_with(name, losses)
        for r in a.runs:
            r.curve = [{"step": 1, "val_loss": r.final_val_loss + 1}, {"step": 2, "val_loss": r.final_val_loss}]
        return a
    return {"fp32": arm("fp32", fp32), "bf16": arm("bf16", bf16), "fp8": arm("fp8", fp8)}


def test_precision_verdict_uses_the_threshold_and_the_noise_floor():
    judge = build_suite("precision", 1000).judge
    held = judge(precision_results({0: 2.000, 1: 2.100}, {0: 2.001, 1: 2.101}, {0: 2.003, 1: 2.102}))
    assert held.status == "held" and "+0.100%" in held.summary
    failed = judge(precision_results({0: 2.000, 1: 2.000}, {0: 2.000, 1: 2.001}, {0: 2.050, 1: 2.060}))
    assert failed.status == "did not hold"
    noisy = judge(precision_results({0: 2.000, 1: 2.0}, {0: 2.080, 1: 1.95}, {0: 2.040, 1: 1.99}))
    assert noisy.status == "unresolved: this scale cannot resolve 0.25%" and "cannot resolve" in noisy.summary
    assert judge(precision_results({0: 2.0}, {0: 2.0}, {0: 2.001})).status == "held (one seed)"


# ---------------------------------------------------------------------------- runner + report with a stub loop
def fake_trainer(losses: dict[str, dict[int, float]], calls: list):
    """A stand-in for pretrain(): writes the run folder the real loop writes (config, metrics)."""
    from nanoseek.train.config import config_to_toml
    from nanoseek.train.loop import FitResult

    def train(cfg, progress=None, quiet=False, hooks=None):
        from pathlib import Path
        run = Path(cfg.train.out_dir)
        arm = json.loads((run / runner.ARM_FILE).read_text())
        calls.append((arm["arm"], cfg.train.seed, [type(h).__name__ for h in hooks or []]))
        (run / "config.toml").write_text(config_to_toml(cfg))
        final = losses[arm["arm"]][cfg.train.seed]
        steps, tps = cfg.train.max_steps, cfg.tokens_per_step()
        lines = [{"event": "start", "step": 0}]
        for s in range(1, steps + 1):
            lines.append({"step": s, "loss": 5.0, "tokens_seen": s * tps, "elapsed": 0.1 * s, "tokens_per_s": 1000.0,
                          "maxvio": [0.5, 0.3]})
            if s % cfg.train.eval_every == 0 or s == steps:
                lines.append({"event": "eval", "step": s, "val_loss": final + (steps - s) * 0.1})
        lines.append({"event": "done", "step": steps})
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return FitResult("done", steps, steps * tps, run, last_eval={"val_loss": final})

    return train


def test_runner_and_report_from_stubbed_runs(tmp_path):
    suite = build_suite("moe-vs-dense", 1000)
    losses = {"moe": {0: 3.00, 1: 3.02}, "dense-active": {0: 3.20, 1: 3.25}, "dense-total": {0: 2.90, 1: 2.95}}
    calls = []
    plan = Plan("moe-vs-dense", "unused", [0, 1], steps=16, eval_every=4, command="nanoseek ablate --suite moe-vs-dense")
    data = run_and_report(suite, plan, tmp_path / "moe-vs-dense", train_fn=fake_trainer(losses, calls))
    assert [c[:2] for c in calls] == [("moe", 0), ("dense-active", 0), ("dense-total", 0),
                                      ("moe", 1), ("dense-active", 1), ("dense-total", 1)]
    assert data["verdict"]["status"] == "held"
    rows = table_rows(data)
    assert [r[0] for r in rows[1:]] == ["DeepSeekMoE", "dense, same activated params", "dense, same total params"]
    assert rows[1][3] == "3.0100 ± 0.0141" and rows[1][4] == "baseline"
    assert rows[2][4].startswith("+0.2150")
    curve = data["arms"]["moe"]["runs"][0]["curve"]
    assert [p["step"] for p in curve] == [4, 8, 12, 16] and curve[-1]["tokens"] == 16 * 8 * 128
    assert curve[-1]["flops"] == curve[-1]["tokens"] * data["arms"]["moe"]["info"]["flops_per_token"]
    out = tmp_path / "moe-vs-dense"
    assert (out / "moe-vs-dense.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "**Result: held.**" in report and "| DeepSeekMoE |" in report and "nanoseek ablate --suite" in report
    assert read_results(out)["arms"]["dense-total"]["stats"]["final_val_loss"]["mean"] == pytest.approx(2.925)
    # a second invocation reuses finished runs with the identical config
    run_suite(suite, plan, out, train_fn=fake_trainer(losses, calls))
    assert len(calls) == 6
    # the combined document links the copied plots
    md = write_combined_markdown([out], tmp_path / "docs" / "ablations.md", tmp_path / "docs" / "ablations", "base")
    text = md.read_text()
    assert "(ablations/moe-vs-dense.png)" in text and (tmp_path / "docs" / "ablations" / "moe-vs-dense.png").is_file()
    assert "| [`moe-vs-dense`](#moe-vs-dense) | held |" in text
    row = next(line for line in text.splitlines() if line.startswith("| [`moe-vs-dense`]"))
    assert row.endswith("| DeepSeekMoE 2B (100B tokens): far above dense at equal activated parameters, near dense at "
                        "equal total parameters, its upper bound |")     # next to what was reported at scale


def test_budget_deadline_keeps_whole_seeds_and_interrupts_stop_the_suite(tmp_path):
    import time
    from nanoseek.train.loop import FitResult

    suite = build_suite("mtp", 1000)
    calls = []
    plan = Plan("mtp", "unused", [0, 1, 2], steps=4, eval_every=2, downstream_problems=0)
    run_suite(suite, plan, tmp_path / "mtp", train_fn=fake_trainer({a.name: {0: 3.0} for a in suite.arms}, calls),
              deadline=time.perf_counter())                             # already past: only the first seed runs
    assert [c[:2] for c in calls] == [("no-mtp", 0), ("mtp", 0)]
    saved = json.loads((tmp_path / "mtp" / "plan.json").read_text())
    assert saved["seeds"] == [0] and saved["planned_seeds"] == [0, 1, 2]

    def interrupted(cfg, **kw):
        return FitResult("interrupted", 1, 10, cfg.train.out_dir)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, Plan("mtp", "unused", [5], steps=4, eval_every=2, downstream_problems=0), tmp_path / "x", train_fn=interrupted)


def test_balance_report_has_maxvio_and_precision_arms_get_the_hook(tmp_path):
    bal = build_suite("balance", 1000)
    losses = {a.name: {0: 3.0 + 0.01 * i} for i, a in enumerate(bal.arms)}
    calls = []
    plan = Plan("balance", "unused", [0], steps=8, eval_every=4)
    data = run_and_report(bal, plan, tmp_path / "balance", train_fn=fake_trainer(losses, calls))
    assert data["verdict"]["status"].startswith("unresolved (one seed; ")
    assert table_rows(data)[0][-1] == "MaxVio mean / final" and table_rows(data)[1][-1] == "0.400 / 0.400"
    assert (tmp_path / "balance" / "balance-maxvio.png").is_file()
    prec = build_suite("precision", 1000)
    calls = []
    run_suite(prec, Plan("precision", "unused", [0], steps=4, eval_every=2), tmp_path / "precision",
              train_fn=fake_trainer({a.name: {0: 3.0} for a in prec.arms}, calls))
    assert [c[2] for c in calls] == [[], ["SimulatedPrecisionHook"], ["SimulatedPrecisionHook"]]


# ---------------------------------------------------------------------------- a real (tiny) suite
def test_real_two_step_precision_suite(data_dir, tmp_path):
    suite = build_suite("precision", vocab_of(data_dir))
    plan = Plan("precision", str(data_dir), [0], steps=2, micro_batch_size=2, seq_len=32, val_batches=1,
                warmup_steps=1, eval_every=1, device="cpu")
    data = run_and_report(suite, plan, tmp_path / "precision")
    losses = {n: a["stats"]["final_val_loss"]["mean"] for n, a in data["arms"].items()}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["fp8"] != losses["fp32"]                              # the simulation really ran
    assert abs(losses["fp8"] - losses["fp32"]) / losses["fp32"] < 0.05
    seeds = {r["config_seed"] for a in data["arms"].values() for r in a["runs"]}
    assert seeds == {0}
    assert [r[0] for r in table_rows(data)[1:]] == [a.label for a in suite.arms]
    for a in suite.arms:
        run = tmp_path / "precision" / "runs" / a.name / "seed0"
        assert json.loads((run / runner.ARM_FILE).read_text())["precision"] == a.precision
        assert (run / "final").is_dir()


# ---------------------------------------------------------------------------- CLI
def test_cli_errors_name_the_fix(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["ablate", "--suite", "nope", "--budget-minutes", "1"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["ablate", "--suite", "mtp", "--budget-minutes", "1", "--data", str(tmp_path / "none")]) == 2
    assert "nanoseek data prepare --default-corpus" in capsys.readouterr().err
    assert main(["ablate", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no finished suite" in capsys.readouterr().err
    assert main(["ablate", "--list"]) == 0
    assert "moe-vs-dense" in capsys.readouterr().out


# ---------------------------------------------------------------------------- optimizer suite, resuming
def test_optimizer_suite_changes_only_the_optimizer_and_its_lr(data_dir, tmp_path):
    from nanoseek.ablate.cli import SUITE_NAMES
    from nanoseek.ablate.suites import SUITES
    from nanoseek.train.optim import build_optimizer, optimizer_kind
    from nanoseek.train.pretrain import build_pretraining

    assert SUITE_NAMES == tuple(SUITES)                         # the CLI's list is the registry's
    from nanoseek.ablate.cli import RL
    from nanoseek.ablate.suites import REPORTED
    assert set(REPORTED) == set(SUITES) | {RL} and all(REPORTED.values())   # every suite's at-scale column
    suite = build_suite("optimizer", vocab_of(data_dir))
    assert [a.name for a in suite.arms] == [f"{o}-lr{k}x" for o in ("adamw", "muon")
                                            for k in ("0.125", "0.25", "0.5", "1", "2")]
    assert suite.baseline == "adamw-lr1x" and all(a.model == base_model(vocab_of(data_dir)) for a in suite.arms)
    plan = Plan("optimizer", str(data_dir), [0], steps=5, micro_batch_size=2, seq_len=32, val_batches=1, lr=2e-3,
                min_lr=2e-4)
    sections = {}
    for arm in suite.arms:
        d = train_config(arm, plan, 0, tmp_path / arm.name).to_dict()
        opt = d["optim"]
        assert opt["optimizer"] == arm.name.split("-")[0]
        assert opt["lr"] == pytest.approx(2e-3 * arm.lr_scale) and opt["min_lr"] == pytest.approx(2e-4 * arm.lr_scale)
        rest = {k: v for k, v in opt.items() if k not in ("optimizer", "lr", "min_lr") and not k.startswith("muon_")}
        sections.setdefault("same", (d["data"], d["train"] | {"out_dir": ""}, rest))
        assert (d["data"], d["train"] | {"out_dir": ""}, rest) == sections["same"], arm.name
    cfg = train_config(suite.arm("muon-lr1x"), plan, 0, tmp_path / "m")
    model, _, _ = build_pretraining(cfg)
    assert optimizer_kind(build_optimizer(model, cfg.optim).param_groups) == "muon"


@pytest.mark.parametrize("name", ["mtp", "optimizer"])
def test_an_interrupted_suite_resumes_without_redoing_finished_runs(name, tmp_path):
    from nanoseek.train.loop import FitResult

    suite = build_suite(name, 1000)
    losses = {a.name: {0: 3.0 + 0.01 * i, 1: 3.01 + 0.01 * i} for i, a in enumerate(suite.arms)}
    plan = Plan(name, "unused", [0, 1], steps=4, eval_every=2, downstream_problems=0)
    out = tmp_path / name
    order = [(a.name, s) for s in (0, 1) for a in suite.arms]
    cut = len(order) // 2 + 1                                   # interrupted inside seed 1 (or mid seed 0)
    calls: list = []
    done_fn = fake_trainer(losses, calls)

    def until_cut(cfg, **kw):
        if len(calls) == cut - 1:
            calls.append(("interrupted",))
            return FitResult("interrupted", 1, 10, cfg.train.out_dir)
        return done_fn(cfg, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, plan, out, train_fn=until_cut)
    assert [c[:2] for c in calls[:-1]] == order[:cut - 1]
    for arm, seed in order[:cut - 1]:                           # a redone run would lose this file
        (out / "runs" / arm / f"seed{seed}" / "kept").write_text("")
        saved = out / "runs" / arm / f"seed{seed}" / "config.toml"      # a header comment naming another
        saved.write_text("# from /elsewhere\n" + saved.read_text())     # installation changes nothing
    calls.clear()
    data = run_and_report(suite, plan, out, train_fn=fake_trainer(losses, calls))
    assert [c[:2] for c in calls] == order[cut - 1:]            # only the interrupted run and those after it
    assert all((out / "runs" / a / f"seed{s}" / "kept").is_file() for a, s in order[:cut - 1])
    assert sorted(data["arms"]) == sorted(a.name for a in suite.arms)
    assert all(len(a["runs"]) == 2 for a in data["arms"].values())


def test_tokens_to_reach_a_loss_interpolates_between_evaluations():
    from nanoseek.ablate.results import ArmResult, SeedRun, tokens_ratio, tokens_to_reach

    curve = [{"tokens": 100, "val_loss": 3.0}, {"tokens": 200, "val_loss": 2.0}, {"tokens": 300, "val_loss": 1.5}]
    assert tokens_to_reach(curve, 2.5) == 150 and tokens_to_reach(curve, 2.0) == 200
    assert tokens_to_reach(curve, 1.75) == 250 and tokens_to_reach(curve, 1.4) is None
    assert tokens_to_reach(curve, 3.5) == 100                   # reached by the first evaluation: no earlier point
    run = lambda seed, c: SeedRun(seed, "", c[-1]["val_loss"], c, [], c[-1]["tokens"], 1.0, 1.0, seed)  # noqa: E731
    fast = ArmResult("a", "A", {}, runs=[run(0, curve), run(1, [dict(p, val_loss=p["val_loss"] + 1) for p in curve])])
    slow = ArmResult("b", "B", {}, runs=[run(0, [dict(p, val_loss=p["val_loss"] + 0.25) for p in curve]),
                                         run(1, curve)])
    assert tokens_ratio(fast, slow) == {0: 250 / 300, 1: None}   # seed 0: 1.75 reached at 250; seed 1 never 1.5

    from nanoseek.ablate.suites import half_the_tokens

    assert half_the_tokens({0: 0.40, 1: 0.45, 2: 0.42})[0] == "held"
    assert half_the_tokens({0: 0.91, 1: 0.88, 2: 0.92})[0] == "did not hold"
    assert half_the_tokens({0: 0.30, 1: 0.70})[0].startswith("unresolved")
    assert half_the_tokens({0: 0.30, 1: None}) == ("did not hold", "by seed 30%, never")
    assert [half_the_tokens({0: f})[0] for f in (0.4, 0.6)] == ["for", "against"]


def test_optimizer_verdict_compares_best_lrs_and_refuses_an_untuned_grid(tmp_path):
    suite = build_suite("optimizer", 1000)
    base = {"adamw-lr0.125x": 3.5, "adamw-lr0.25x": 3.4, "adamw-lr0.5x": 3.3, "adamw-lr1x": 3.1, "adamw-lr2x": 3.2,
            "muon-lr0.125x": 3.2, "muon-lr0.25x": 3.1, "muon-lr0.5x": 3.0, "muon-lr1x": 2.9, "muon-lr2x": 3.05}
    losses = {n: {0: v, 1: v + 0.01} for n, v in base.items()}
    data = run_and_report(suite, Plan("optimizer", "unused", [0, 1], steps=4, eval_every=2), tmp_path / "a",
                          train_fn=fake_trainer(losses, []))
    assert data["verdict"]["status"] == "held"
    assert "Best Muon (Muon, lr x1) vs best AdamW (AdamW, lr x1)" in data["verdict"]["summary"]
    assert "Tokens Muon, lr x1 needed to reach AdamW, lr x1's final loss: 50%, 95% interval" in data["verdict"]["summary"]
    slower = {n: {0: v + 0.1, 1: v + 0.11} if n.startswith("muon") else losses[n] for n, v in base.items()}
    slower["muon-lr1x"] = {0: 3.0, 1: 3.01}                     # lower, but reached AdamW's 3.1 at 3/4 of the tokens
    data = run_and_report(suite, Plan("optimizer", "unused", [0, 1], steps=4, eval_every=2), tmp_path / "c",
                          train_fn=fake_trainer(slower, []))
    assert data["verdict"]["status"] == "partly held"           # lower loss held; half the tokens did not
    assert "final loss: 75%, 95% interval over seeds [75%, 75%]" in data["verdict"]["summary"], data["verdict"]["summary"]
    losses["muon-lr2x"] = {0: 2.5, 1: 2.51}                     # Muon's best lr is the grid's largest
    data = run_and_report(suite, Plan("optimizer", "unused", [0, 1], steps=4, eval_every=2), tmp_path / "b",
                          train_fn=fake_trainer(losses, []))
    assert data["verdict"]["status"].startswith("unresolved: the learning rates are not tuned")
    assert "edge of the grid" in data["verdict"]["summary"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "peak lr 0.003 x the arm's factor (x0.125, x0.25, x0.5, x1, x2)" in report and "AdamW lr" not in report


# ---------------------------------------------------------------------------- --jobs: runs in worker processes
def _val_losses(run_dir) -> list[float]:
    from nanoseek.train.metrics import events, read_metrics
    return [e["val_loss"] for e in events(read_metrics(run_dir), "eval")]


def _tiny_plan(name, data_dir, seeds, downstream=2):
    return Plan(name, str(data_dir), seeds, steps=2, micro_batch_size=2, seq_len=32, val_batches=1, warmup_steps=1,
                eval_every=1, device="cpu", downstream_problems=downstream)


def test_parallel_jobs_train_exactly_the_runs_of_a_sequential_suite(data_dir, tmp_path, one_thread):
    from nanoseek.ablate.parallel import run_suites

    vocab = vocab_of(data_dir)
    suites = [(build_suite("mtp", vocab), [0, 1]), (build_suite("precision", vocab), [0])]
    for suite, seeds in suites:
        run_suite(suite, _tiny_plan(suite.name, data_dir, seeds), tmp_path / "seq" / suite.name, log=lambda m: None)
    logs: list[str] = []
    entries = [(s, _tiny_plan(s.name, data_dir, seeds), tmp_path / "par" / s.name) for s, seeds in suites]
    done = run_suites(entries, jobs=2, threads=1, log=logs.append)
    assert ("6 runs, 2 at a time, each in its own process (1 thread(s)); 1 more are the same run as one of them in "
            "another suite and are copied from it") in logs
    assert any(m.endswith("the same run as precision/fp32 seed 0, copied there") for m in logs)
    assert {k: len(v) for k, v in done.items()} == {"mtp": 4, "precision": 3}
    # the base model is the no-mtp arm and the fp32 arm: trained once, copied, and really the same run
    fp32 = tmp_path / "par" / "precision" / "runs" / "fp32" / "seed0"
    assert json.loads((fp32 / runner.ARM_FILE).read_text())["reused_from"].endswith("mtp/runs/no-mtp/seed0")
    assert json.loads((fp32 / runner.ARM_FILE).read_text())["arm"] == "fp32" and (fp32 / "final").is_dir()
    run_suite(suites[1][0], _tiny_plan("precision", data_dir, [0]), tmp_path / "alone" / "precision",
              log=lambda m: None)                               # no twin there: fp32 trained
    alone = tmp_path / "alone" / "precision" / "runs" / "fp32" / "seed0"
    assert "reused_from" not in json.loads((alone / runner.ARM_FILE).read_text())
    assert _val_losses(alone) == _val_losses(fp32)
    for suite, seeds in suites:
        for arm in suite.arms:
            for seed in seeds:
                rel = f"{suite.name}/runs/{arm.name}/seed{seed}"
                seq, par = _val_losses(tmp_path / "seq" / rel), _val_losses(tmp_path / "par" / rel)
                assert len(par) == 2 and par == seq, rel         # the same run, whichever process trained it
                if suite.name == "mtp":                          # and evaluated alike, downstream
                    assert _downstream(tmp_path / "par" / rel) == _downstream(tmp_path / "seq" / rel), rel
                assert (tmp_path / "par" / rel / "config.toml").read_text() == \
                    (tmp_path / "seq" / rel / "config.toml").read_text().replace("/seq/", "/par/")
    # a second call reuses every finished run and trains none
    logs.clear()
    run_suites(entries, jobs=2, threads=1, log=logs.append)
    assert len(logs) == 7 and all("already finished" in m for m in logs)
    report = run_and_report(suites[0][0], _tiny_plan("mtp", data_dir, [0, 1]), tmp_path / "par" / "mtp",
                            log=lambda m: None)
    assert sorted(report["arms"]) == ["mtp", "no-mtp"]


def stop_the_no_mtp_arm(cfg, progress=None, quiet=False, hooks=None):
    """A picklable stand-in for pretrain() in worker processes: the no-mtp arm is interrupted."""
    from nanoseek.train.loop import FitResult
    from nanoseek.train.pretrain import pretrain

    if "/no-mtp/" in str(cfg.train.out_dir):
        return FitResult("interrupted", 1, 10, cfg.train.out_dir)
    return pretrain(cfg, progress=progress, quiet=quiet, hooks=hooks)


def fail_the_no_mtp_arm(cfg, progress=None, quiet=False, hooks=None):
    from nanoseek.train.pretrain import pretrain

    if "/no-mtp/" in str(cfg.train.out_dir):
        raise RuntimeError("boom")
    return pretrain(cfg, progress=progress, quiet=quiet, hooks=hooks)


@pytest.mark.slow
def test_parallel_jobs_stop_on_an_interrupted_or_failed_run_and_resume_the_rest(data_dir, tmp_path, one_thread):
    from nanoseek.ablate.parallel import run_suites
    from nanoseek.errors import UserError

    suite = build_suite("mtp", vocab_of(data_dir))
    entries = [(suite, _tiny_plan("mtp", data_dir, [0]), tmp_path / "mtp")]
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_suites(entries, jobs=2, threads=1, train_fn=stop_the_no_mtp_arm, log=logs.append)
    assert "mtp/no-mtp seed 0: interrupted" in logs and "the same command resumes" in logs[-1]
    assert not (tmp_path / "mtp" / "runs" / "no-mtp" / "seed0" / "final").exists()
    with pytest.raises(UserError, match="mtp/no-mtp seed 0 failed .exit code 1"):
        run_suites(entries, jobs=2, threads=1, train_fn=fail_the_no_mtp_arm, log=logs.append)
    logs.clear()
    run_suites(entries, jobs=2, threads=1, log=logs.append)     # the same command resumes what is unfinished
    assert any("runs, 2 at a time" in m or "already finished" in m for m in logs)
    for arm in ("mtp", "no-mtp"):
        assert len(_val_losses(tmp_path / "mtp" / "runs" / arm / "seed0")) == 2
    logs.clear()
    run_suites(entries, jobs=2, threads=1, log=logs.append)
    assert len(logs) == 2 and all("already finished" in m for m in logs)


@pytest.mark.slow
def test_jobs_flag_needs_steps(tmp_path, capsys, data_dir):
    from nanoseek.cli import main

    assert main(["ablate", "--suite", "mtp", "--budget-minutes", "1", "--jobs", "2", "--data", str(data_dir),
                 "--out", str(tmp_path / "a")]) == 2
    assert "--jobs needs --steps N" in capsys.readouterr().err
    # the command holds --out and the suite folder; its workers train inside them
    out = tmp_path / "c"
    assert main(["ablate", "--suite", "mtp", "--steps", "2", "--seeds", "1", "--jobs", "2", "--data", str(data_dir),
                 "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--val-batches", "1", "--threads", "1",
                 "--device", "cpu", "--downstream-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs, 2 at a time" in printed and "2 downstream evaluations, 2 at a time" in printed
    assert (out / "mtp" / "report.md").is_file() and (out / "mtp" / "results.json").is_file()
    assert "--downstream-n 2" in json.loads((out / "mtp" / "plan.json").read_text())["command"]
    assert main(["ablate", "--suite", "rl", "--model", str(tmp_path), "--steps", "2", "--downstream-n", "2",
                 "--out", str(tmp_path / "d")]) == 2
    assert "--downstream-n applies to the pre-training suites" in capsys.readouterr().err


def test_the_regenerating_prepare_command_carries_the_corpus_settings(data_dir, tmp_path):
    from nanoseek.ablate.report import prepare_command

    assert prepare_command(tmp_path / "none") == f"nanoseek data prepare --default-corpus --out {tmp_path / 'none'}"
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"sources": [{"kind": "default-corpus", "task_docs": 60000,
                                                              "seed": 0, "task_level": None, "text_repeats": 1}]}))
    assert prepare_command(d) == f"nanoseek data prepare --default-corpus --out {d} --task-docs 60000"
    (d / "manifest.json").write_text(json.dumps({"sources": [{"kind": "default-corpus", "task_docs": 20000,
                                                              "seed": 3, "task_level": 2, "text_repeats": 1}]}))
    assert prepare_command(d) == f"nanoseek data prepare --default-corpus --out {d} --seed 3 --task-level 2"


def test_an_unresolved_verdict_keeps_the_markdown_tables_intact(tmp_path):
    import re

    suite = build_suite("mtp", 1000)
    losses = {"no-mtp": {0: 3.00, 1: 3.05, 2: 2.98}, "mtp": {0: 3.01, 1: 3.02, 2: 3.00}}
    plan = Plan("mtp", "unused", [0, 1, 2], steps=8, eval_every=4, downstream_problems=0)
    data = run_and_report(suite, plan, tmp_path / "mtp", train_fn=fake_trainer(losses, []))
    assert data["verdict"]["status"].startswith("unresolved: |effect| < ")
    md = write_combined_markdown([tmp_path / "mtp"], tmp_path / "docs" / "ablations.md", tmp_path / "docs" / "img",
                                 "base").read_text()
    for text in (md, (tmp_path / "mtp" / "report.md").read_text()):
        tables = [ln for ln in text.splitlines() if ln.startswith("|")]
        assert tables and (text is not md or any("unresolved: \\|effect\\| <" in ln for ln in tables))
        for ln in tables:                       # every row of a table has its header's number of cells
            cells = re.split(r"(?<!\\)\|", ln)
            header = next(h for h in tables[:tables.index(ln) + 1][::-1] if h.startswith("| ") and
                          tables.index(h) + 1 < len(tables) and tables[tables.index(h) + 1].startswith("|---"))
            assert len(cells) == len(re.split(r"(?<!\\)\|", header)), ln


def test_a_worker_adopts_only_a_folder_its_parent_holds(tmp_path):
    from nanoseek.claims import HELD
    from nanoseek.outdir import OutputDirError, adopt, claim

    free = tmp_path / "free"
    free.mkdir()
    with pytest.raises(OutputDirError, match="not claimed"):
        adopt(free)                                  # nobody holds it: a worker may not take it as its own
    assert str(free.resolve()) not in HELD
    held = tmp_path / "held"
    with claim(held, "ablate", flag="--out"):
        adopt(held)                                  # this process holds it already: nothing changes
        assert HELD[str(held.resolve())][1] == 1


def _downstream(run_dir):
    return {p["id"]: p["correct"] for p in json.loads((run_dir / "downstream.json").read_text())["problems"]}


@pytest.mark.slow
def test_mtp_suite_evaluates_every_run_downstream_and_judges_it(data_dir, tmp_path, one_thread):
    """The mtp suite's runs are evaluated on held-out task problems after training (the MTP arm
    decoding with its own module as the draft, its acceptance recorded), the comparison joins the
    verdict and the report; a re-run redoes no evaluation, another --downstream-n redoes them all,
    0 skips them."""
    suite = build_suite("mtp", vocab_of(data_dir))
    assert suite.downstream.tasks == ("arithmetic", "countdown", "word_problems", "compare", "modular")
    out = tmp_path / "mtp"
    report = run_and_report(suite, _tiny_plan("mtp", data_dir, [0, 1]), out, log=lambda m: None)
    runs = {(a, s): out / "runs" / a / f"seed{s}" for a in ("mtp", "no-mtp") for s in (0, 1)}
    for (arm, seed), d in runs.items():
        ev = json.loads((d / "downstream.json").read_text())
        assert len(ev["problems"]) == 2 * 5 and ev["config"]["temperature"] == 0.0 and ev["config"]["mode"] == "fewshot"
        assert ("mtp_acceptance" in ev["model"]) == (arm == "mtp")          # only the MTP arm drafts
    ds = report["downstream"]
    assert set(ds["arms"]) == {"mtp", "no-mtp"} and set(ds["arms"]["mtp"]["acceptance"]) == {0, 1}
    [c] = ds["comparisons"]
    assert (c["arm"], c["baseline"]) == ("mtp", "no-mtp") and c["interval"]["n"] == 2 and set(c["per_seed"]) == {0, 1}
    assert "Downstream held-out pass@1, MTP (D=1, lambda 0.3) vs next token only" in report["verdict"]["summary"]
    text = (out / "report.md").read_text()
    assert "**Downstream.**" in text and "drafts accepted" in text
    stamps = {k: (d / "downstream.json").stat().st_mtime_ns for k, d in runs.items()}
    logs: list[str] = []
    run_suite(suite, _tiny_plan("mtp", data_dir, [0, 1]), out, log=logs.append)       # nothing to redo
    assert not any("downstream" in m for m in logs)
    assert {k: (d / "downstream.json").stat().st_mtime_ns for k, d in runs.items()} == stamps
    (runs[("mtp", 1)] / "downstream.json").write_text("{not json")          # a damaged file is redone, alone
    logs.clear()
    run_suite(suite, _tiny_plan("mtp", data_dir, [0, 1]), out, log=logs.append)
    assert sum("downstream" in m for m in logs) == 1 and "mtp_acceptance" in \
        json.loads((runs[("mtp", 1)] / "downstream.json").read_text())["model"]
    logs.clear()
    run_suite(suite, _tiny_plan("mtp", data_dir, [0, 1], downstream=3), out, log=logs.append)
    assert sum("downstream" in m for m in logs) == 4
    assert all(len(json.loads((d / "downstream.json").read_text())["problems"]) == 15 for d in runs.values())
    none = run_and_report(suite, _tiny_plan("mtp", data_dir, [0], downstream=0), tmp_path / "none", log=lambda m: None)
    assert "downstream" not in none and not list((tmp_path / "none").rglob("downstream.json"))


def test_equal_wall_clock_comparison_reads_both_curves_when_the_sooner_run_ended():
    """moe-vs-dense at equal training time: a slower arm is read at the moment the faster one ended
    (interpolated between evaluations), not at its own end."""
    from nanoseek.ablate.results import compare_at_wall, loss_at

    curve = [{"wall_s": 10.0, "val_loss": 3.0}, {"wall_s": 20.0, "val_loss": 2.0}, {"wall_s": 40.0, "val_loss": 1.0}]
    assert loss_at(curve, 5.0) == 3.0 and loss_at(curve, 15.0) == 2.5 and loss_at(curve, 30.0) == 1.5
    assert loss_at(curve, 99.0) == 1.0

    def arm(name, curves):
        a = ArmResult(name, name, {})
        for seed, c in curves.items():
            a.runs.append(SeedRun(seed, "", c[-1]["val_loss"], c, [], 0, c[-1]["wall_s"], 0.0, seed))
        return a

    slow = arm("slow", {s: [{"wall_s": 10.0, "val_loss": 3.0}, {"wall_s": 40.0, "val_loss": 1.0 + 0.01 * s}]
                        for s in range(3)})
    fast = arm("fast", {s: [{"wall_s": 5.0, "val_loss": 2.5}, {"wall_s": 20.0, "val_loss": 1.5 - 0.01 * s}]
                        for s in range(3)})
    c = compare_at_wall(slow, fast)                      # at 20 s the slow arm is at 3 - 2/3 = 2.333
    assert c.per_seed[0] == pytest.approx((3.0 - 2.0 * 10 / 30) - 1.5)
    assert c.clear and c.diff > 0 and compare(slow, fast).diff < 0   # worse at equal time, better at equal tokens
