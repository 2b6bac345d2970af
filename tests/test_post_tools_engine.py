"""Tool use through the REAL inference engine's tool loop (not a stand-in): GRPO rollouts and the evaluation
harness on a tiny random model whose choices are scripted (``Engine._ban`` biased toward a scripted reply,
as tests/test_infer_tools.py does), so the call, the calculator's output appended by the engine, the
model_mask, the final text, the loss targets and the recorded calls are the engine's own."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, script_engine
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.eval.harness import EvalConfig, evaluate
from nanoseek.infer.engine import Engine
from nanoseek.post.common import IGNORE
from nanoseek.post.datasets import load_rl_prompts
from nanoseek.post.grpo import GRPOSection, GRPOTask
from nanoseek.tools.calculator import calculator
from nanoseek.tools.format import ToolCall, ToolTokens, render_calls

TOK = ByteTokenizer()
HEAD = "<think>\nThis needs the calculator tool.\n</think>\n\n"


@pytest.fixture(scope="module")
def model():
    if ToolTokens.of(TOK) is None:
        pytest.skip("the byte tokenizer has no tool tokens")
    return make_tiny_model(seed=0, vocab_size=TOK.vocab_size, max_position_embeddings=2048)


def script_for(question: str, wrong: bool = False) -> list[int]:
    expr = question + (" *" if wrong else "")
    block = render_calls([ToolCall("calculator", json.dumps({"expression": expr}))])
    answer = "1" if wrong else calculator(question)
    return TOK.encode(HEAD + block + f"Answer: {answer}")


def scripted(monkeypatch, scripts: dict[int, list[int]]):
    """Sample i of a request follows scripts[prompt length] over its own (model-written) tokens, then EOS."""
    script_engine(monkeypatch, scripts, TOK.eos_id)


def test_grpo_rollout_through_the_engines_tool_loop(model, monkeypatch):
    prompts = (load_rl_prompts("big_arithmetic:1@fixed", 1, seed=0)     # "What is EXPR?": the script reads EXPR
               + load_rl_prompts("big_arithmetic:2@fixed", 1, seed=0))
    cfg = GRPOSection(template="chat", prompts_per_step=2, group_size=2, max_new_tokens=220, micro_batch_size=4,
                      tools="calculator", tool_failure_penalty=0.25)
    task = GRPOTask(model, TOK, prompts, cfg)
    lengths = [len(ids) for ids in task.prompt_ids]
    assert len(set(lengths)) == 2, "the script tells prompts apart by length"
    questions = [p.prompt[len("What is "):-1] for p in task.prompts]
    scripted(monkeypatch, {lengths[0]: script_for(questions[0]), lengths[1]: script_for(questions[1], wrong=True)})
    batch = task.rollout()
    s = batch.stats
    assert s["tool_calls_mean"] == 1.0 and s["tool_use_rate"] == 1.0 and s["tool_failed_mean"] == 0.5
    assert s["accuracy"] == 0.5                         # the right call's final answer; the failed one answers 1
    t = ToolTokens.of(TOK)
    for row in range(4):
        ids, tgt = batch.input_ids[row].tolist(), batch.targets[row].tolist()
        b, e = ids.index(t.output_begin), ids.index(t.output_end)
        out = TOK.decode(ids[b + 1:e])
        assert out == calculator(questions[0]) if row < 2 else out.startswith("error:")   # the engine ran the tool
        assert all(tgt[i - 1] == IGNORE for i in range(b - 1, e + 1))   # the loop's EOS and the tool's output
        trained = [ids[i + 1] for i, x in enumerate(tgt) if x != IGNORE]
        assert TOK.decode(trained).endswith("Answer: " + (calculator(questions[0]) if row < 2 else "1") +
                                            TOK.decode([TOK.eos_id]))
        assert t.calls_end in trained and t.output_begin not in trained
    # rewards: right (1 + format 0.1) vs wrong with a failed call (0.1 - 0.25)
    assert s["reward_mean"] == pytest.approx((1.1 * 2 + (0.1 - 0.25) * 2) / 4, abs=1e-6)
    loss, metrics = task.loss(model, next(iter(task.passes(batch)))[0])
    assert torch.isfinite(loss) and metrics["tokens"] == batch.num_tokens


def test_eval_runs_the_tool_loop_and_records_calls(model, monkeypatch):
    cfg = EvalConfig(tasks=["big_arithmetic:1", "big_arithmetic:2"], n_problems=1, k=2, mode="chat", max_new_tokens=220,
                     tools="calculator", batch_size=4)
    from nanoseek.eval import harness

    problems, _, prompts, _ = harness._render(cfg, TOK, 2048)
    assert len({len(p) for p in prompts}) == 2
    scripted(monkeypatch, {len(ids): script_for(p.prompt[len("What is "):-1], wrong=i == 1)
                           for i, (p, ids) in enumerate(zip(problems, prompts))})
    engine = Engine(model, TOK, max_batch_size=4, max_seq_len=2048)
    res = evaluate(model, TOK, cfg, engine=engine)
    by_id = {p.id: p for p in res.problems}
    right, wrong = by_id[problems[0].id], by_id[problems[1].id]
    assert right.tool_calls == [1, 1] and right.tool_failed == [0, 0] and right.correct == [True, True]
    assert wrong.tool_calls == [1, 1] and wrong.tool_failed == [1, 1] and wrong.correct == [False, False]
    assert right.format_ok == [True, True]
    assert res.summary()["tools"]["failed_rate"] == 0.5
