"""GRPO: the rollout -> reward -> advantage -> update machinery, and a short run that learns.

The fast end-to-end test is the issue's trivial task: a tiny model (byte-level tokenizer) is first
fine-tuned to answer a digit-7 prompt with a uniformly random digit (P(7) ~ 0.1, so groups carry
signal), then GRPO with reward 1 iff the first generated token is "7" must drive the mean reward
up, through the real inference engine and the shared trainer.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek.model.checkpoint import save_pretrained
from nanoseek.post.datasets import RLPrompt, SFTExample, load_rl_prompts
from nanoseek.post.grpo import GRPOSection, GRPOTask, train_grpo
from nanoseek.tasks.reply import render_prompt
from nanoseek.tasks.rewards import RewardConfig, build_reward_fn
from nanoseek.tasks.rewards import RewardResult
from nanoseek.post.sft import train_sft
from nanoseek.post.registry import stage_config_from_dict
from post_helpers import tiny_model, tiny_tokenizer




def first_token_is_7(texts, items):
    return [RewardResult(reward=float(t[:1] == "7"), format_ok=True, correct=t[:1] == "7", answer=t[:1])
            for t in texts]


# GSPO and CISPO take two passes (optimizer steps) per rollout, so their importance ratios move off 1
# (GSPO's tiny sequence-level clip range then limits the second pass); the same 16 rollouts as GRPO.
# CISPO aggregates over tokens, as MiniMax-M1 does.
@pytest.mark.parametrize("variant", [
    {}, {"policy_loss": "gspo", "num_iterations": 2},
    {"policy_loss": "cispo", "loss_agg": "dapo", "num_iterations": 2}], ids=["clip", "gspo", "cispo"])
def test_grpo_drives_reward_up_on_digit7(tmp_path, one_thread, variant):
    passes = variant.get("num_iterations", 1)
    tk = tiny_tokenizer()
    save_pretrained(tiny_model(tk.vocab_size), tmp_path / "base")
    tk.save(tmp_path / "base")
    prompts = load_rl_prompts("digit7@fixed", 8, seed=0)   # the one short wording: rows of 64 tokens
    warm = [SFTExample(messages=[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": str(d)}])
            for p in prompts for d in range(10)]
    sft = stage_config_from_dict("sft", {
        "model": {"init_from": str(tmp_path / "base")}, "sft": {"mode": "pad"},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 40,
                  "seq_len": 64},
        "train": {"max_steps": 12, "out_dir": str(tmp_path / "sft"), "device": "cpu", "seed": 0}})
    res = train_sft(sft, examples=warm, quiet=True)
    assert res.status == "done" and (res.final_dir / "tokenizer.json").exists()
    assert res.history[-1]["ce"] < res.history[0]["ce"]

    grpo = stage_config_from_dict("grpo", {
        "model": {"init_from": str(tmp_path / "sft")},
        "grpo": {"prompts": "digit7@fixed", "num_prompts": 8, "template": "chat", "prompts_per_step": 4, "group_size": 8,
                 "max_new_tokens": 1, "micro_batch_size": 16, **variant},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "seq_len": 64},
        "train": {"max_steps": 16 * passes, "out_dir": str(tmp_path / "grpo"), "device": "cpu", "seed": 0}})
    res = train_grpo(grpo, reward_fn=first_token_is_7, quiet=True)
    rewards = [h["reward_mean"] for h in res.history][::passes]              # one per rollout
    assert len(rewards) == 16
    # seeds 0-5 all gain 0.4-0.85 over 12 steps (measured); the test runs seed 0 for 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3, rewards
    last = res.history[-1]
    for key in ("reward_std", "accuracy", "format_rate", "response_len_mean", "response_len_max", "truncated_frac",
                "zero_std_frac", "clip_frac", "kl", "entropy", "rollout_tokens_per_s", "tokens_per_s"):
        assert key in last, key
    assert last["entropy"] < res.history[0]["entropy"]              # the policy sharpens on "7"
    samples = [json.loads(x) for x in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 * 2 and {"prompt", "completion", "reward"} <= set(samples[0])


# ----------------------------------------------------------------------------- mechanics with a scripted engine


class ScriptedEngine:
    """Returns scripted completions: ``script(prompt_index_in_call, sample_index) -> token ids``."""

    def __init__(self, tokenizer, script, max_new_tokens):
        self.tk, self.script, self.max_new = tokenizer, script, max_new_tokens
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(params.n):
                ids = list(self.script(len(self.calls) - 1, i, j))
                eos = bool(ids) and ids[-1] == self.tk.eos_id
                group.append(SimpleNamespace(token_ids=ids, text=self.tk.decode(ids[:-1] if eos else ids),
                                             finish_reason="stop" if eos else "length",
                                             stop_reason="eos" if eos else None))
            out.append(group)
        return out


def _task(script, monkeypatch=None, prompts=None, **cfg):
    tk = tiny_tokenizer()
    model = tiny_model(tk.vocab_size)
    prompts = prompts or load_rl_prompts("digit7", 4, seed=0)
    c = GRPOSection(**{"template": "chat", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6,
                      "micro_batch_size": 3, **cfg})
    engine = ScriptedEngine(tk, script, c.max_new_tokens)
    task = GRPOTask(model, tk, prompts, c, reward_fn=first_token_is_7, engine=engine)
    task._sampling_params = lambda seed: SimpleNamespace(n=c.group_size, seed=seed, stop=[])
    return task, tk


def test_rollout_layout_advantages_and_stats():
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id

    def script(call, i, j):      # prompt 0: one "7" of four; prompt 1: all "1" (a zero-std group)
        if i == 0:
            return [seven, eos] if j == 0 else [one, one, one, one, one, one]
        return [one, eos]

    task, tk = _task(script)
    batch = task.rollout()
    s = batch.stats
    assert s["reward_mean"] == pytest.approx(1 / 8) and s["accuracy"] == pytest.approx(1 / 8)
    assert s["zero_std_frac"] == 0.5 and s["truncated_frac"] == pytest.approx(3 / 8)
    assert s["response_len_max"] == 6 and s["response_len_mean"] == pytest.approx((2 + 18 + 8) / 8)
    # group 0: rewards [1, 0, 0, 0] -> (r - 1/4) / std; group 1: all equal -> 0
    std = torch.tensor([1.0, 0, 0, 0]).std().item()
    assert batch.advantages[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-4)
    assert batch.advantages[4:].tolist() == [0, 0, 0, 0]
    # targets: exactly the completion tokens (EOS included), aligned to predict input_ids[t + 1]
    prompt = render_prompt(tk, task.prompts[0], "chat")
    row0 = batch.targets[0][batch.targets[0] != -100].tolist()
    assert row0 == [seven, eos]
    assert batch.input_ids[0, :len(prompt)].tolist() == prompt
    t = len(prompt) - 1
    assert batch.targets[0, t].item() == batch.input_ids[0, t + 1].item() == seven
    assert batch.num_tokens == 2 + 18 + 8
    assert batch.old_logp is None and batch.ref_logp is None and task.ref_model is None   # mu = 1, beta = 0


def test_passes_are_steps_whose_microbatch_losses_add_up():
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id
    task, tk = _task(lambda c, i, j: [seven, eos] if j % 2 else [one] * (j + 2), num_iterations=2, loss_agg="dapo")
    batch = task.rollout()
    assert batch.old_logp is not None                      # mu > 1: pi_old computed once, before the first pass
    steps = list(task.passes(batch))
    assert len(steps) == 2 and [len(s) for s in steps] == [3, 3]     # 8 rows in micro-batches of <= 3
    model = task.model
    total = sum(task.loss(model, mb)[0] for mb in steps[0])
    # the same loss over the whole batch at once
    from nanoseek.post.common import sequence_logprobs
    from nanoseek.post.grpo_loss import grpo_loss
    logp, _ = sequence_logprobs(model, batch.input_ids, batch.targets)
    full = grpo_loss(logp, batch.old_logp, batch.advantages, batch.targets != -100, loss_agg="dapo")
    assert total.item() == pytest.approx(full.loss.item(), abs=1e-5)
    assert task.micro_batch_reduction == "sum"
    _, m = task.loss(model, steps[0][0])
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["clip_frac"] == 0.0


def test_reference_model_only_with_beta_and_kl_zero_at_start():
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id
    task, _ = _task(lambda c, i, j: [seven, eos] if j == 0 else [one, eos], beta=0.1)
    assert task.ref_model is not None and not any(p.requires_grad for p in task.ref_model.parameters())
    batch = task.rollout()
    assert batch.ref_logp is not None
    _, m = task.loss(task.model, next(task.passes(batch))[0])
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)


def test_filter_zero_std_resamples_and_drops_agreeing_groups():
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id

    def script(call, i, j):    # first rollout: both groups all-wrong; second: group 0 mixed, group 1 all-right
        if call == 0:
            return [one, eos]
        return [seven, eos] if (i == 1 or j == 0) else [one, eos]

    task, _ = _task(script, filter_zero_std=True, max_rollout_attempts=2)
    batch = task.rollout()
    assert batch.stats["rollout_attempts"] == 2 and batch.stats["kept_sequences"] == 4
    assert batch.stats["zero_std_frac"] == pytest.approx(3 / 4)    # 3 of the 4 sampled groups agreed
    assert batch.advantages.abs().sum() > 0 and batch.input_ids.shape[0] == 4
    assert task.rollouts == 2 and task.cursor == 0                # 2 rollouts x 2 prompts of 4
    # with more attempts it keeps sampling until the batch is full of informative groups
    task, _ = _task(script, filter_zero_std=True, max_rollout_attempts=5)
    batch = task.rollout()
    assert batch.stats["rollout_attempts"] == 3 and batch.input_ids.shape[0] == 8
    assert (batch.advantages.view(-1, 4).abs().sum(1) > 0).all()
    # without filtering the agreeing groups stay (with zero advantage)
    task, _ = _task(script)
    assert task.rollout().input_ids.shape[0] == 8 and task.rollouts == 1


def test_overlong_penalty_shapes_rewards():
    tk = tiny_tokenizer()
    one, eos = tk.encode("1")[0], tk.eos_id
    # lengths 2, 4, 6, 6 with max_new_tokens 6 and a buffer of 4: penalties 0, -0.5, -1, -1
    task, _ = _task(lambda c, i, j: [one] * (1 + 2 * j) + [eos] if j < 2 else [one] * 6,
                    overlong_buffer=4, scale_rewards=False)
    batch = task.rollout()
    assert batch.stats["reward_mean"] == pytest.approx((0 - 0.5 - 1 - 1) / 4)
    assert batch.advantages[:4].tolist() == pytest.approx([0.625, 0.125, -0.375, -0.375])


def test_state_dict_round_trip():
    task, _ = _task(lambda c, i, j: [1])
    task.rollout()
    state = task.batches().state_dict()
    assert state == {"rollouts": 1, "cursor": 2, "num_prompts": 4}
    other, _ = _task(lambda c, i, j: [1])
    other.load_state_dict(state)
    assert (other.rollouts, other.cursor) == (1, 2)
    with pytest.raises(ValueError, match="prompts"):
        _task(lambda c, i, j: [1], prompts=load_rl_prompts("digit7", 3))[0].load_state_dict(state)


def test_templates_and_default_rewards():
    tk = tiny_tokenizer()
    item = load_rl_prompts("arithmetic", 1, seed=0)[0]
    zero = tk.decode(render_prompt(tk, item, "r1-zero"))
    assert "<think> </think>" in zero and zero.rstrip().endswith("Assistant:") and item.prompt in zero
    think = render_prompt(tk, item, "chat-think")
    assert think[-3:-1] == [tk.token_to_id("<｜Assistant｜>"), tk.think_id] or tk.think_id in think[-3:]
    fn = build_reward_fn(RewardConfig.for_template("r1-zero"))
    good, plain = fn([f"<think> sum </think> <answer>{item.answer}</answer>", item.answer], [item, item])
    assert good.correct and good.format_ok and good.reward == pytest.approx(1.1)
    assert plain.reward == 0.0 and not plain.format_ok
    fn = build_reward_fn(RewardConfig.for_template("chat-think"))
    (r,) = fn([f"steps\n</think>\n\nAnswer: {item.answer}"], [item])      # <think> was in the prompt
    assert r.format_ok and r.correct
    ext = RLPrompt(prompt="q", answer="4", task="rg:x", score_answer=lambda a: float(a == "4"))
    (r,) = build_reward_fn(RewardConfig.for_template("chat"))(["<think>x</think>\n4"], [ext])
    assert r.correct and r.reward == pytest.approx(1.1)


def test_config_validation():
    for bad, needle in [({"loss_agg": "mean"}, "loss_agg"), ({"group_size": 1}, "group_size"),
                        ({"template": "chatml"}, "template"), ({"beta": -1.0}, "beta"),
                        ({"overlong_buffer": 999}, "overlong_buffer"),
                        ({"temperature": 0.0}, "temperature"), ({"temperature": 1e-40}, "greedy"),
                        ({"temperature": float("inf")}, "temperature"), ({"temperature": 1e39}, "temperature")]:
        with pytest.raises(ValueError, match=needle):
            GRPOSection(**bad).validate()


def test_grpo_resumes_exactly_through_the_trainer(tmp_path, one_thread):
    """Killed after step 2 and resumed, a run repeats the uninterrupted run's steps 3-4: the prompt
    position and the engine's per-rollout seeds are part of the checkpointed data state."""
    tk = tiny_tokenizer()
    save_pretrained(tiny_model(tk.vocab_size), tmp_path / "base")
    tk.save(tmp_path / "base")

    def cfg(out, steps):
        return stage_config_from_dict("grpo", {
            "model": {"init_from": str(tmp_path / "base")},
            "grpo": {"prompts": "digit7", "num_prompts": 6, "template": "chat", "prompts_per_step": 2,
                     "group_size": 4, "max_new_tokens": 4, "micro_batch_size": 4, "num_iterations": 2, "beta": 0.1},
            "optim": {"lr": 1e-2, "min_lr": 1e-2, "seq_len": 64},
            "train": {"max_steps": steps, "out_dir": str(tmp_path / out), "device": "cpu", "save_every": 2}})

    def parity(texts, items):
        return [RewardResult(reward=float(sum(map(ord, t)) % 2), format_ok=True, correct=False, answer=None)
                for t in texts]

    full = train_grpo(cfg("full", 6), reward_fn=parity, quiet=True).history
    train_grpo(cfg("cut", 4), reward_fn=parity, quiet=True)
    resumed = train_grpo(cfg("cut", 6), reward_fn=parity, resume=True, quiet=True).history
    keys = ("loss", "grad_norm", "reward_mean", "kl", "clip_frac")
    tail = [h for h in resumed if h["step"] > 4]
    assert [h["step"] for h in tail] == [5, 6]
    for a, b in zip(full[4:], tail):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5, abs=1e-7)
    assert full[-1]["kl"] > 0                                            # the policy moved away from the reference


def test_prompts_longer_than_the_context_are_dropped_before_any_rollout_and_none_fitting_is_one_line():
    """reasoning-gym grids (rectangle_count: thousands of tokens) next to short sums: GRPO, DPO's automatic pairs
    and distillation (one sampler) drop what does not fit context - max_new_tokens, before sampling (no engine
    cache sized for them), count it, and refuse in one line when nothing fits."""
    from nanoseek.post.datasets import DataError
    from nanoseek.post.rollout import sample_and_score

    tk = tiny_tokenizer()
    model = tiny_model(tk.vocab_size, max_position_embeddings=1024)
    short = load_rl_prompts("rg:chain_sum(min_terms=2, max_terms=2, min_digits=1, max_digits=1)", 3)
    long = load_rl_prompts("rg:rectangle_count", 2)
    c = GRPOSection(template="r1-zero", prompts_per_step=1, group_size=2, max_new_tokens=8)
    task = GRPOTask(model, tk, long + short, c, reward_fn=lambda texts, items: [RewardResult(0.0, False, False)] * len(texts))
    assert task.dropped == 2 and [p.id for p in task.prompts] == [p.id for p in short]
    assert max(len(x) for x in task.prompt_ids) + 8 <= 1024
    assert task._engine().max_seq_len <= 1024 + 1
    with pytest.raises(DataError, match=r"^grpo.prompts: none of the 2 prompts fits the model's context of 1024 tokens "
                                        r"with max_new_tokens=8 \(prompts of \d+(-\d+)? tokens\)"):
        GRPOTask(model, tk, long, c)
    with pytest.raises(DataError, match="max_new_tokens=1100 leaves no room"):
        GRPOTask(model, tk, short, GRPOSection(template="r1-zero", prompts_per_step=1, group_size=2, max_new_tokens=1100))
    for template in ("chat", "r1-zero"):
        scored, report = sample_and_score(model, tk, long + short, 2, template=template, max_new_tokens=4,
                                          temperature=1.0, top_p=1.0)
        assert [len(s) for s in scored] == [0, 0, 2, 2, 2] and report.as_dict()["dropped_prompts"] == 2
        with pytest.raises(DataError, match="none of the 2 prompts fits"):
            sample_and_score(model, tk, long, 2, template=template, max_new_tokens=4, temperature=1.0, top_p=1.0)


def _small_stage(tmp_path, compile: bool, max_new_tokens: int):
    """A 2-step GRPO stage config over a saved tiny model (in ``tmp_path / "base"``)."""
    tk = tiny_tokenizer()
    save_pretrained(tiny_model(tk.vocab_size), tmp_path / "base")
    tk.save(tmp_path / "base")
    return stage_config_from_dict("grpo", {
        "model": {"init_from": str(tmp_path / "base")},
        "grpo": {"prompts": "digit7@fixed", "num_prompts": 4, "template": "chat", "prompts_per_step": 2,
                 "group_size": 2, "max_new_tokens": max_new_tokens, "micro_batch_size": 4},
        "optim": {"seq_len": 64},
        "train": {"max_steps": 2, "out_dir": str(tmp_path / "grpo"), "device": "cpu", "seed": 0, "compile": compile}})


@pytest.mark.parametrize("compile", [False, True])
def test_train_compile_reaches_the_rollout_engine(tmp_path, monkeypatch, compile):
    """``[train] compile = true`` in GRPO compiles the rollout engine's decode step as well as the
    update; here the compiler fails on first use, so both warn, run eagerly and the stage finishes."""
    from nanoseek.infer import engine as engine_module

    built = []
    init = engine_module.Engine.__init__
    monkeypatch.setattr(engine_module.Engine, "__init__",
                        lambda self, *a, **k: built.append(k.get("compile", False)) or init(self, *a, **k))

    def failing_compile(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    cfg = _small_stage(tmp_path, compile, max_new_tokens=2)
    if compile:
        with pytest.warns(RuntimeWarning) as caught:
            res = train_grpo(cfg, reward_fn=first_token_is_7, quiet=True)
        said = " ".join(str(w.message) for w in caught)
        assert "decoding eagerly" in said and "training eagerly" in said, said
    else:
        res = train_grpo(cfg, reward_fn=first_token_is_7, quiet=True)
    assert res.status == "done" and built == [compile]


def test_rope_table_built_while_generating_is_not_an_inference_tensor():
    """Rollouts build RoPE's cos/sin table under inference_mode; the compiled update then reads it
    as a graph input and may save it for its backward, which autograd refuses for an inference
    tensor: the compiled GRPO update failed on its first step and trained eagerly from there."""
    model = tiny_model(64)
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long))
    cos, sin = model.model.rotary_emb._table(8, torch.device("cpu"))
    assert not cos.is_inference() and not sin.is_inference()


@pytest.mark.slow
def test_compiled_grpo_stays_compiled_after_its_rollouts(tmp_path):
    """``[train] compile = true``: the update and the rollouts' decode step both compile and stay
    compiled through the stage (no fallback warning, a ``compiled`` event, no ``compile_failed``)."""
    import warnings

    from nanoseek.train.metrics import events, read_metrics

    cfg = _small_stage(tmp_path, True, max_new_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)          # a fallback to eager warns: fail here
        res = train_grpo(cfg, reward_fn=first_token_is_7, quiet=True)
    assert res.status == "done"
    records = read_metrics(tmp_path / "grpo")
    assert len(events(records, "compiled")) == 1 and not events(records, "compile_failed")
    from nanoseek.post import common
    assert common._compiled_head is not None      # the update's head ran compiled too


def test_a_compiled_step_gets_the_compiled_head_and_an_eager_one_the_eager_head():
    """``sequence_logprobs`` compiles its head only for a compiled module (the compiled training
    step); the eager model (the step's fallback after a compiler failure, scoring passes) keeps the
    eager head. (Nothing is compiled here: the compiled module is never called.)"""
    from nanoseek.post.common import head_for, head_logprobs

    model = tiny_model(300)
    assert head_for(model) is head_logprobs
    compiled = head_for(torch.compile(model))
    assert compiled is not head_logprobs and compiled is head_for(torch.compile(model))   # one per process


@pytest.mark.slow
def test_the_compiled_head_equals_the_eager_head():
    """Log-probs, entropy and gradients of the compiled head (inductor) equal the eager head's,
    at row counts that change between calls (dynamic shapes)."""
    from nanoseek.post.common import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False)
    compiled = torch.compile(head_logprobs, dynamic=True)
    for n in (7, 19, 64):
        h = torch.randn(n, 32, requires_grad=True)
        t = torch.randint(0, 300, (n,))
        w = torch.randn(n)
        out = []
        for fn in (head_logprobs, compiled):
            head.zero_grad(set_to_none=True)
            h.grad = None
            lp, ent = fn(head, h, t, True)
            (lp * w).sum().backward()
            out.append((lp.detach(), ent, h.grad.clone(), head.weight.grad.clone()))
        for a, b in zip(*out):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert out[1][1].requires_grad is False


# ----------------------------------------------------------------------------- the update's shortcuts are exact


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_sequence_logprobs_at_targets_equal_the_full_logits():
    """The output head runs at the target positions only: same log-probs, entropy and gradients as
    a log-softmax over every position's logits (prompt and padding positions give 0)."""
    from nanoseek.post.common import IGNORE, sequence_logprobs
    from nanoseek.post.grpo_loss import token_entropy, token_logprobs

    model = tiny_model(300)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 9))
    targets = torch.full_like(ids, IGNORE)
    targets[0, 2:8], targets[1, 4:6], targets[2, 0:1] = ids[0, 3:9], ids[1, 5:7], ids[2, 1:2]
    mask = targets != IGNORE
    logp, ent = sequence_logprobs(model, ids, targets, with_entropy=True)
    logits = model(ids).logits
    ref = token_logprobs(logits, targets.clamp(min=0)) * mask
    assert torch.allclose(logp, ref, atol=1e-6) and (logp[~mask] == 0).all()
    assert torch.allclose(ent[mask], token_entropy(logits)[mask], atol=1e-5) and (ent[~mask] == 0).all()
    w = torch.randn(ids.shape)     # any loss over the log-probs: the same gradient
    g = _grads(model, (logp * w).sum())
    assert torch.allclose(g, _grads(model, (ref * w).sum()), atol=1e-6)
    assert g.abs().sum() > 0


def test_one_pass_skips_the_old_logprob_forward_with_the_same_loss_and_gradient():
    """num_iterations = 1: no pi_old forward (old = the detached current log-probs, rho = 1); the
    loss and gradient equal those with pi_old computed by its own forward, as num_iterations > 1 does."""
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id
    task, _ = _task(lambda c, i, j: [seven, eos] if j % 2 else [one] * (j + 2), loss_agg="grpo")
    batch = task.rollout()
    assert batch.old_logp is None and batch.advantages.abs().sum() > 0
    old = task._logprobs(task.model, batch.input_ids, batch.targets, batch.lengths)   # the skipped forward
    for mb in next(task.passes(batch)):
        assert mb["old_logp"] is None
        T = mb["input_ids"].shape[1]
        computed = {**mb, "old_logp": old[mb["rows"], :T]}
        loss_skip, _ = task.loss(task.model, mb)
        g_skip = _grads(task.model, loss_skip)
        loss_full, m_full = task.loss(task.model, computed)
        g_full = _grads(task.model, loss_full)
        assert float(loss_skip.detach()) == pytest.approx(float(loss_full.detach()), abs=1e-6)
        assert torch.allclose(g_skip, g_full, atol=1e-6) and g_skip.abs().sum() > 0
        assert m_full["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_a_rollout_switches_the_policy_to_eval_once_not_per_decode_step():
    """The real engine over a model in train mode: one eval/train switch around the generation (a
    switch per decode step walked every module: a tenth of a rollout); the train mode is back after."""
    from nanoseek.infer.engine import Engine
    from nanoseek.post.rollout import sample, sampling_params

    tk = tiny_tokenizer()
    model = tiny_model(tk.vocab_size).train()
    switches, seen = [], []
    train = model.train

    def counting(mode=True):
        switches.append(mode)
        return train(mode)

    model.train = counting                     # model.eval() calls self.train(False)
    engine = Engine(model, tk, max_batch_size=4, max_seq_len=64)
    forward = model.forward

    def watching(*a, **k):
        seen.append(model.training)
        return forward(*a, **k)

    model.forward = watching
    params = sampling_params(tk, "chat", n=4, seed=0, max_new_tokens=6, temperature=1.0)
    params.stop_token_ids = []
    prompt = render_prompt(tk, load_rl_prompts("digit7", 1, seed=0)[0], "chat")
    out = sample(engine, [prompt], params, "chat")
    assert len(out.groups[0]) == 4 and len(seen) >= 6 and not any(seen)
    assert switches == [False, True] and model.training


def test_microbatches_group_rows_of_similar_length_with_the_whole_batchs_gradient():
    """A pass's micro-batches hold rows sorted by length (each cropped to its longest row: less
    padding through the forward and backward), every row once; the step's gradient equals the one
    over the whole batch at once (the micro-batch losses are shares of the step's loss)."""
    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id
    task, tk = _task(lambda c, i, j: [seven, eos] if j % 2 else [one] * (j + 2), loss_agg="grpo")
    batch = task.rollout()
    [step] = list(task.passes(batch))
    rows = torch.cat([mb["rows"] for mb in step])
    assert sorted(rows.tolist()) == list(range(batch.input_ids.shape[0]))
    lengths = batch.lengths[rows]
    assert (lengths[1:] >= lengths[:-1]).all() and not (batch.lengths[1:] >= batch.lengths[:-1]).all()
    assert [mb["input_ids"].shape[1] for mb in step] == [int(batch.lengths[mb["rows"]].max()) for mb in step]
    assert sum(mb["input_ids"].numel() for mb in step) < len(step) * step[0]["rows"].numel() * batch.input_ids.shape[1]
    model = task.model
    g_parts = _grads(model, sum(task.loss(model, mb)[0] for mb in step))
    whole = {**step[0], "input_ids": batch.input_ids, "targets": batch.targets, "advantages": batch.advantages,
             "rows": torch.arange(batch.input_ids.shape[0])}
    g_whole = _grads(model, task.loss(model, whole)[0])
    assert torch.allclose(g_parts, g_whole, atol=1e-6) and g_whole.abs().sum() > 0


def test_old_and_reference_logprobs_are_scored_in_the_training_micro_batches():
    """pi_old and pi_ref forwards run over the training passes' micro-batches (rows of similar
    length, each cropped, not contiguous rows padded to the whole batch): every target scored as
    it would be alone, 0 past a row's crop, and at the first pass the policy's log-probs equal
    pi_old's bit for bit (ratio exactly 1, KL exactly 0)."""
    from nanoseek.post.common import sequence_logprobs

    tk = tiny_tokenizer()
    seven, one, eos = tk.encode("7")[0], tk.encode("1")[0], tk.eos_id
    task, tk = _task(lambda c, i, j: [seven, eos] if j % 2 else [one] * (j + 2), num_iterations=2, beta=0.1,
                     loss_agg="dapo")
    import nanoseek.post.grpo as grpo_module

    scored = []

    def recording(model, ids, targets, **kw):
        scored.append(tuple(ids.shape))
        return sequence_logprobs(model, ids, targets, **kw)

    grpo_module.sequence_logprobs, real = recording, grpo_module.sequence_logprobs
    try:
        batch = task.rollout()
    finally:
        grpo_module.sequence_logprobs = real
    plan = [tuple(mb["input_ids"].shape) for mb in next(task.passes(batch))]
    assert scored == plan * 2 and len({T for _, T in plan}) > 1      # pi_old's and pi_ref's, cropped
    mask = batch.targets != -100
    for lp in (batch.old_logp, batch.ref_logp):
        assert lp.shape == batch.targets.shape and (lp[~mask] == 0).all() and (lp[mask] < 0).all()
        for r in range(batch.input_ids.shape[0]):
            n = int(batch.lengths[r])
            alone, _ = sequence_logprobs(task.model, batch.input_ids[r:r + 1, :n], batch.targets[r:r + 1, :n])
            torch.testing.assert_close(lp[r, :n][mask[r, :n]], alone[0][mask[r, :n]], atol=1e-5, rtol=0)
    for mb in next(task.passes(batch)):
        T = mb["input_ids"].shape[1]
        logp, _ = sequence_logprobs(task.model, mb["input_ids"], mb["targets"])
        assert torch.equal(logp.detach(), batch.old_logp[mb["rows"], :T])
        _, m = task.loss(task.model, mb)
        assert m["ratio_mean"] == 1.0 and m["clip_frac"] == 0.0 and m["kl"] == 0.0
