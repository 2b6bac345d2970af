"""GRPO with tools: multi-turn rollouts through the engine's tool loop (a scripted engine returning what the
design's Completion carries: model_mask, tool_calls, tool_results, final_text), the loss on the model's own
tokens only for every loss aggregation, rewards on the final answer with the failed-call penalty."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek.post.common import IGNORE, sequence_logprobs
from nanoseek.post.datasets import load_rl_prompts
from nanoseek.post.grpo import GRPOSection, GRPOTask
from nanoseek.post.grpo_loss import LOSS_AGGREGATIONS, grpo_loss
from nanoseek.tools.format import TOOLS_HEADER, ToolTokens
from nanoseek.tools.toolbox import Toolbox
from post_helpers import tiny_model, tiny_tokenizer, tool_completion, tool_tokenizer

HEAD = "<think>\nThis needs the calculator tool.\n</think>\n\n"


class ToolLoopEngine:
    """Stands in for the engine's run mode: per prompt, ``script(prompt_text, j, toolbox)`` -> a completion."""

    def __init__(self, tk, script):
        self.tk, self.script, self.calls = tk, script, []

    def generate(self, prompts, params, toolbox=None):
        self.calls.append((len(prompts), getattr(params, "tools", "off"), toolbox))
        if getattr(params, "tools", "off") == "run":
            assert toolbox is not None and "calculator" in toolbox
        return [[self.script(self.tk.decode(p), j, toolbox) for j in range(params.n)] for p in prompts]


def _plain(tk, text):
    ids = tk.encode_text(text) + [tk.eos_id]
    return SimpleNamespace(token_ids=ids, text=text, finish_reason="stop", stop_reason="eos")


def _script(tk, answers):
    """For a tool prompt: j=0 right via the tool, j=1 calls but answers wrong, j=2 a failed call, j=3 no call.
    For a prompt without tools: a plain reply."""

    def script(prompt_text, j, toolbox):
        question = prompt_text.rsplit("What is ", 1)[-1].split("?")[0]
        if TOOLS_HEADER.strip() not in prompt_text:
            return _plain(tk, HEAD + "Answer: 1")
        args = json.dumps({"expression": question})
        if j == 0:
            return tool_completion(tk, toolbox, HEAD, args, f"Answer: {answers[question]}")
        if j == 1:
            return tool_completion(tk, toolbox, HEAD, args, "Answer: 5")
        if j == 2:
            return tool_completion(tk, toolbox, HEAD, json.dumps({"expression": question + " *"}), "Answer: 1")
        return _plain(tk, HEAD + "Answer: 3")

    return script


def _task(**cfg):
    tk = tool_tokenizer()
    model = tiny_model(tk.vocab_size, max_position_embeddings=1024)
    prompts = load_rl_prompts("big_arithmetic:2@fixed,compare:1@fixed", 4, seed=0)   # the script reads "What is EXPR?"
    answers = {p.prompt[len("What is "):-1]: p.answer for p in prompts if p.task == "big_arithmetic"}
    c = GRPOSection(**{"template": "chat", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40,
                      "micro_batch_size": 5, "tools": "calculator", "tool_tasks": "big_arithmetic", **cfg})
    engine = ToolLoopEngine(tk, _script(tk, answers))
    task = GRPOTask(model, tk, prompts, c, engine=engine)
    task._sampling_params = lambda seed, tools=False: SimpleNamespace(n=c.group_size, seed=seed, stop=[],
                                                                      tools="run" if tools else "off")
    return task, tk, engine


def test_rollouts_run_tools_only_for_the_tool_tasks_and_mask_the_loops_tokens():
    task, tk, engine = _task(tool_failure_penalty=0.5)
    batch = task.rollout()
    # one engine call per kind: the compare prompts without tools, the big_arithmetic ones with the toolbox
    kinds = sorted((n, mode, tb is not None) for n, mode, tb in engine.calls)
    assert kinds == [(2, "off", False), (2, "run", True)]
    assert [TOOLS_HEADER.strip() in tk.decode(ids) for ids in task.prompt_ids] == \
        [p.task == "big_arithmetic" for p in task.prompts]
    t = ToolTokens.of(tk)
    with_tools = 0
    for row in range(batch.input_ids.shape[0]):
        ids, tgt = batch.input_ids[row].tolist(), batch.targets[row].tolist()
        start = next(i for i, x in enumerate(tgt) if x != IGNORE) + 1     # the completion (the prompt's tools
        if t.output_begin not in ids[start:]:                              # description shows the call format)
            continue
        with_tools += 1
        b, e = ids.index(t.output_begin, start), ids.index(t.output_end, start)
        assert tgt[b - 2] == IGNORE and ids[b - 1] == tk.eos_id            # the loop's EOS after the call block
        assert all(tgt[i - 1] == IGNORE for i in range(b, e + 1))          # the tool's output
        assert tgt[e] != IGNORE                                             # the model goes on after it
        assert tgt[ids.index(t.calls_end, start) - 1] == t.calls_end        # the call is the model's: trained
    assert with_tools == 6                      # 2 tool prompts x 3 samples that called
    s = batch.stats
    assert s["tool_calls_mean"] == pytest.approx(6 / 16) and s["tool_use_rate"] == pytest.approx(6 / 16)
    assert s["tool_failed_mean"] == pytest.approx(2 / 16)


def test_reward_reads_the_final_answer_and_subtracts_the_failed_call_penalty():
    task, tk, engine = _task(tool_failure_penalty=0.5)
    got = {}
    orig = task.reward_fn

    def spy(texts, items):
        res = orig(texts, items)
        got.update(texts=texts, items=items, results=res)
        return res

    task.reward_fn = spy
    batch = task.rollout()
    tool_rows = [i for i, it in enumerate(got["items"]) if it.task == "big_arithmetic"]
    results = [got["results"][i] for i in tool_rows]
    texts = [got["texts"][i] for i in tool_rows]
    # j=0: the final answer is the tool's output -> right; j=1: the output is in the text but the answer is wrong
    assert [r.correct for r in results] == [True, False, False, False] * 2
    assert all(r.format_ok for r in results)
    assert all(x.startswith("<think>") and x.count("<think>") == 1 and x.endswith(("Answer: 5", "Answer: 1", "Answer: 3"))
               or r.correct for x, r in zip(texts, results))
    assert all(got["items"][i].answer not in texts[k] for k, i in enumerate(tool_rows) if k % 4 == 1)
    # the advantages come from reward - 0.5 x failed calls (j=2 of each tool group failed once)
    from nanoseek.post.grpo_loss import group_advantages

    failed = torch.tensor([float(it.task == "big_arithmetic" and k % 4 == 2) for k, it in enumerate(got["items"])])
    rewards = torch.tensor([float(x.reward) for x in got["results"]]) - 0.5 * failed
    assert batch.advantages.tolist() == pytest.approx(group_advantages(rewards, 4).tolist(), abs=1e-5)
    assert batch.stats["reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert failed.sum() == 2


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_every_loss_variant_trains_only_the_models_tokens(loss_agg):
    """task.loss equals the clipped loss over the model's tokens (targets from model_mask); the same loss
    with the tool loop's tokens as targets has a different gradient, so the mask is what keeps them out."""
    task, tk, _ = _task(loss_agg=loss_agg, num_iterations=2, beta=0.1, tool_failure_penalty=0.2, micro_batch_size=16)
    batch = task.rollout()
    assert batch.old_logp is not None and batch.ref_logp is not None
    assert (batch.old_logp[batch.targets == IGNORE] == 0).all() and (batch.ref_logp[batch.targets == IGNORE] == 0).all()
    [step] = [next(iter(task.passes(batch)))]
    mb = step[0]
    model = task.model

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    loss, metrics = task.loss(model, mb)
    g = grads(loss)
    ids, targets = mb["input_ids"], mb["targets"]
    # the tool loop's positions: prompt/padding are IGNORE in both; unmasked = every completion token a target
    full = targets.clone()
    t = ToolTokens.of(tk)
    for r in range(ids.shape[0]):
        row = ids[r].tolist()
        if t.output_begin in row:
            b, e = row.index(t.output_begin), row.index(t.output_end)         # (the prompt never holds outputs)
            for i in range(b - 1, e + 1):
                full[r, i - 1] = row[i]
    assert (full != targets).any()
    c = task.cfg

    def manual(tgt, total_tokens):
        logp, _ = sequence_logprobs(model, ids, tgt)
        out = grpo_loss(logp, mb["old_logp"], mb["advantages"], tgt != IGNORE, ref_logp=mb["ref_logp"], beta=c.beta,
                        eps_low=c.eps_low, eps_high=c.eps_high, loss_agg=c.loss_agg, max_len=c.max_new_tokens,
                        total_sequences=mb["total_sequences"], total_tokens=total_tokens)
        return out.loss

    expect = manual(targets, mb["total_tokens"])
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-5, abs=1e-7)
    assert torch.allclose(g, grads(manual(targets, mb["total_tokens"])), atol=1e-6)
    extra = int((full != IGNORE).sum() - (targets != IGNORE).sum())
    g_unmasked = grads(manual(full, mb["total_tokens"] + extra))
    assert not torch.allclose(g, g_unmasked, atol=1e-6)
    assert metrics["tokens"] == int((targets != IGNORE).sum())


def test_tool_settings_are_validated_and_need_tool_tokens():
    with pytest.raises(ValueError, match="chat template"):
        GRPOSection(tools="calculator", template="r1-zero").validate()
    with pytest.raises(ValueError, match="abacus"):
        GRPOSection(tools="abacus", template="chat").validate()
    with pytest.raises(ValueError, match="tool_failure_penalty"):
        GRPOSection(tool_failure_penalty=-1, template="chat").validate()
    tk = tiny_tokenizer()                      # no tool-call tokens
    if ToolTokens.of(tk) is None:
        prompts = load_rl_prompts("big_arithmetic:1", 2, seed=0)
        with pytest.raises(ValueError, match="cannot call tools"):
            GRPOTask(tiny_model(tk.vocab_size, max_position_embeddings=1024), tk, prompts,
                     GRPOSection(template="chat", tools="calculator", prompts_per_step=2, group_size=2),
                     engine=object())


def test_without_tools_nothing_changes():
    """tools off: one engine call, no toolbox, every completion token a target (today's behaviour)."""
    task, tk, engine = _task(tools="", tool_tasks="")
    batch = task.rollout()
    assert [(mode, tb) for _, mode, tb in engine.calls] == [("off", None)]
    assert "tool_calls_mean" not in batch.stats
    assert not any(TOOLS_HEADER.strip() in tk.decode(ids) for ids in task.prompt_ids)
