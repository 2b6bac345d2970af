"""Helpers for the eval tests: a scripted fake engine and synthetic eval results.

:class:`ScriptedEngine` has the engine's ``generate(prompts, params)`` interface (no
``submit``) and answers from a script ``script(problem, sample_index) -> text`` (or a
``(text, finish_reason, stop_reason)`` tuple), so the metrics of an evaluation are known
exactly. It finds the problem by decoding the prompt and reading the question back out of
whichever prompt mode rendered it, and records every request's prompt text and parameters.
"""

from __future__ import annotations

import json
from collections import defaultdict

from nanoseek.tasks.generators import get_task
from nanoseek.eval.results import EvalResult, ProblemResult
from nanoseek.infer.engine import Completion


def question_of(prompt_text: str) -> str:
    if "<｜User｜>" in prompt_text:
        return prompt_text.rsplit("<｜User｜>", 1)[1].split("<｜Assistant｜>", 1)[0]
    if "User: " in prompt_text:
        return prompt_text.rsplit("User: ", 1)[1].rsplit(" Assistant:", 1)[0]
    if "Question: " in prompt_text:
        return prompt_text.rsplit("Question: ", 1)[1].split("\nSolution:", 1)[0]
    raise AssertionError(f"no question in prompt {prompt_text[-200:]!r}")


class ScriptedEngine:
    def __init__(self, tokenizer, problems, script, max_batch_size: int = 16, max_seq_len: int | None = None):
        self.tokenizer, self.script = tokenizer, script
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.by_question = {}
        for p in problems:
            self.by_question[p.prompt] = p
            self.by_question[p.prompt.rstrip(".")] = p
            self.by_question[p.prompt + "."] = p
        self.calls: list[tuple[str, object]] = []
        self.served = defaultdict(int)

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.calls.append((text, params))
            problem = self.by_question[question_of(text)]
            comps = []
            for _ in range(params.n):
                idx = self.served[problem.id]
                self.served[problem.id] += 1
                got = self.script(problem, idx)
                body, finish, stop_reason = (got, "stop", "eos") if isinstance(got, str) else got
                toks = self.tokenizer.encode(body)
                comps.append(Completion(token_ids=toks, text=body, reasoning=None, answer=body, finish_reason=finish,
                                        prompt_tokens=len(ids), completion_tokens=len(toks), stop_reason=stop_reason))
            out.append(comps)
        return out


def problems_of(task: str, n: int, seed: int = 0, level=None):
    return get_task(task).generate("test", n, seed=seed, level=level, phrasing="fixed")   # as the harness draws them


def synthetic_result(scores: dict[str, list[bool]], task: str = "arithmetic", mode: str = "chat",
                     seed: int = 0) -> EvalResult:
    """An EvalResult whose problems have the given per-sample correctness (ids are the dict keys)."""
    records = []
    for pid, correct in scores.items():
        records.append(ProblemResult(task=task, id=pid, level=1, gold="7", correct=list(correct),
                                     format_ok=[True] * len(correct),
                                     answers=["7" if c else "8" for c in correct], tokens=[10] * len(correct),
                                     truncated=[False] * len(correct)).compute_curves(seed))
    k = len(next(iter(scores.values())))
    config = {"tasks": [task], "mode": mode, "k": k, "temperature": 0.6, "top_p": 0.95, "seed": seed,
              "max_new_tokens": 64, "levels": None, "few_shot": 3}
    samples = [{"task": task, "id": pid, "level": 1, "mode": mode, "prompt": f"What is 3 + 4? ({pid})",
                "response": "<think>\n3 + 4 = 7\n</think>\nAnswer: 7", "reasoning": "3 + 4 = 7", "answer": "7",
                "gold": "7", "correct": True, "format_ok": True, "finish_reason": "stop", "tokens": 10}
               for pid in list(scores)[:2]]
    return EvalResult.build(config, records, samples=samples, created="2025-01-01T00:00:00+00:00")


def write_metrics(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def make_synthetic_run(root, status: str = "done", with_grpo: bool = True):
    """A speedrun-shaped folder with metrics, evals, a model config and run.json; no weights.

    pretrain: 40 steps of a decaying loss (one "nan" step, a skipped spike), per-layer maxvio and
    bias range, tokens/s, MFU and validation events; sft: 10 steps; grpo: 12 steps with reward,
    accuracy, format rate and response length, and samples.jsonl. Each stage has an eval.json on
    the same 30 problem ids, accuracy rising from stage to stage.
    """
    from conftest import make_tiny_config

    stages = ["pretrain", "sft"] + (["grpo"] if with_grpo else [])
    pre = []
    for s in range(1, 41):
        rec = {"step": s, "loss": 5.0 * 0.96 ** s + 0.5, "lr": 1e-3, "grad_norm": 0.5, "tokens": 4096,
               "tokens_per_s": 9000.0 + s, "mfu": 0.05, "maxvio": [0.9 / s ** 0.5, 1.2 / s ** 0.5],
               "bias_range": [0.001 * s, 0.0015 * s], "mtp_loss": 5.5 * 0.96 ** s + 0.6, "tokens_seen": 4096 * s,
               "elapsed": 0.5 * s}
        if s == 7:
            rec["loss"] = "nan"
        pre.append(rec)
        if s % 10 == 0:
            pre.append({"event": "eval", "step": s, "val_loss": 5.0 * 0.96 ** s + 0.6, "val_bpb": 1.5 - s / 100})
    pre.insert(0, {"event": "start", "step": 0})
    pre.insert(20, {"event": "spike_skipped", "step": 18, "loss": 9.0, "reason": "loss z-score 8"})
    pre.append({"event": "done", "step": 40, "tokens": 4096 * 40, "elapsed": 20.0, "status": "done"})
    write_metrics(root / "pretrain" / "metrics.jsonl", pre)
    sft = [{"step": s, "loss": 2.0 - s / 20, "tokens_per_s": 5000.0, "maxvio": [0.2, 0.3], "bias_range": [0.04, 0.06],
            "elapsed": float(s)} for s in range(1, 11)]
    write_metrics(root / "sft" / "metrics.jsonl", sft)
    if with_grpo:
        grpo = [{"step": s, "loss": 0.01, "reward_mean": 0.1 + s / 20, "accuracy": s / 13, "format_rate": 0.5 + s / 30,
                 "response_len_mean": 60.0 - s, "elapsed": 2.0 * s} for s in range(1, 13)]
        write_metrics(root / "grpo" / "metrics.jsonl", grpo)
        write_metrics(root / "grpo" / "samples.jsonl",
                      [{"rollout": 12, "prompt": "What is 2 + 5?", "answer": "7",
                        "completion": "<think>\n2 + 5 = 7\n</think>\nAnswer: 7", "reward": 1.1, "correct": True}])
    ids = [f"arithmetic-test-L1-{i:04d}" for i in range(30)]
    for j, st in enumerate(stages):
        res = synthetic_result({pid: [(i + j * 7) % 10 < 3 + 3 * j, (i * 3 + j) % 10 < 2 + 3 * j, i % 5 < j + 1,
                                      False] for i, pid in enumerate(ids)},
                               mode="fewshot" if st == "pretrain" else "chat")
        res.save(root / st / "eval.json")
    (root / "pretrain" / "final").mkdir(parents=True)
    (root / "pretrain" / "final" / "config.json").write_text(json.dumps(make_tiny_config().to_dict()))
    (root / "pretrain" / "config.toml").write_text('[model]\npreset = "tiny"\n\n[train]\nmax_steps = 40\n')
    meta = {"name": "synthetic", "status": status, "started": "2025-01-01T00:00:00Z", "wall_s": 61.5,
            "device": "cpu", "config": {"preset": "tiny", "tasks": ["arithmetic"]},
            "stages": [{"name": s, "status": "done", "wall_s": w, "tokens": t}
                       for s, w, t in zip(stages, (20.0, 10.0, 24.0), (163840, 20000, 9000))]}
    (root / "run.json").write_text(json.dumps(meta))
    return root
