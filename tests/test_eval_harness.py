"""The evaluation harness: prompts per mode, scoring, metric plumbing, seeds, JSON, bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_model
from eval_helpers import ScriptedEngine, problems_of, synthetic_result
from nanoseek.data.shards import FORMAT, FORMAT_VERSION, SplitWriter, token_dtype, write_manifest
from nanoseek.train.bpb import bits_per_byte, token_bytes_table
from nanoseek.eval.harness import EvalConfig, draw_problems, evaluate, request_seed
from nanoseek.eval.results import EvalFileError, EvalResult, k_values, paired_comparison
from nanoseek.eval.stats import mean_interval, paired_difference
from nanoseek.data.bytetok import ByteTokenizer

TOK = ByteTokenizer()


def r1(answer) -> str:
    return f"<think>\nworking\n</think>\nAnswer: {answer}"


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]


def test_chat_metrics_are_exact_for_scripted_completions():
    probs = problems_of("arithmetic", 4, seed=3)
    index = {p.id: i for i, p in enumerate(probs)}

    def script(p, j):
        i = index[p.id]
        gold = int(p.answer)
        if i == 0:
            return r1(gold)                                             # 4/4 right, formatted
        if i == 1:
            return r1(gold) if j < 2 else r1(gold + 100 + j)            # 2/4 right, wrong answers differ
        if i == 2:
            return f"Answer: {gold}" if j == 0 else f"Answer: {gold + 1}"   # 1/4 right, never formatted
        return r1(gold + 1)                                             # 0/4, formatted

    engine = ScriptedEngine(TOK, probs, script)
    res = evaluate(None, TOK, ["arithmetic"], n_problems=4, k=4, mode="chat", seed=3, engine=engine)
    s = res.summary("arithmetic")
    assert [p.id for p in res.problems] == [p.id for p in probs]
    assert [p.score for p in res.problems] == [1.0, 0.5, 0.25, 0.0]
    assert s["pass@1"] == mean_interval([1.0, 0.5, 0.25, 0.0], samples=4).to_dict()
    assert s["pass@k"]["1"] == pytest.approx(0.4375)
    assert s["pass@k"]["2"] == pytest.approx((1 + 5 / 6 + 0.5 + 0) / 4)
    assert s["pass@k"]["4"] == pytest.approx(0.75)
    assert s["maj@k"]["4"] == pytest.approx(0.5)         # problems 0 and 1 (2 right votes beat 1+1 wrong)
    assert s["format_rate"]["mean"] == pytest.approx(0.75)
    assert s["strict@1"]["mean"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert s["n"] == 4 and s["samples"] == 4 and s["correct_samples"] == 7
    assert res.summary()["pass@1"] == s["pass@1"]        # one task: overall = the task
    # every request is the chat template with the generation prompt, R1 settings
    text, params = engine.calls[0]
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>") and text.endswith("<｜Assistant｜>")
    assert (params.temperature, params.top_p, params.n) == (0.6, 0.95, 4)
    assert res.samples[0]["response"] == r1(probs[0].answer) and res.samples[0]["correct"]


def test_fewshot_prompt_uses_train_examples_and_stops_at_next_question():
    probs = problems_of("arithmetic", 3, seed=0)
    engine = ScriptedEngine(TOK, probs, lambda p, j: f"{p.reasoning}\nAnswer: {p.answer}")
    res = evaluate(None, TOK, "arithmetic", n_problems=3, k=1, mode="fewshot", few_shot=2, engine=engine)
    assert res.summary()["pass@1"]["mean"] == 1.0 and res.summary()["format_rate"]["mean"] == 1.0
    text, params = engine.calls[0]
    docs = text.split("<｜begin▁of▁sentence｜>")
    assert docs[0] == "" and len(docs) == 4                      # BOS + 2 examples, BOS + the question
    test_prompts = {p.prompt for p in probs}
    for d in docs[1:3]:
        assert d.startswith("Question: ") and "\nAnswer: " in d and d.endswith("\n")
        assert d.split("\n", 1)[0][len("Question: "):] not in test_prompts
    assert docs[3].endswith("\nSolution:\n")
    assert params.stop == ["\nQuestion:"] and TOK.bos_id in params.stop_token_ids
    # an answer with no "Answer:" line is still extracted (last number) but is not "formatted"
    engine2 = ScriptedEngine(TOK, probs, lambda p, j: f"adding up\nso it is {p.answer}")
    res2 = evaluate(None, TOK, "arithmetic", n_problems=3, k=1, mode="fewshot", engine=engine2)
    assert res2.summary()["pass@1"]["mean"] == 1.0 and res2.summary()["format_rate"]["mean"] == 0.0


def test_fewshot_drops_examples_to_fit_the_context_and_says_so():
    probs = problems_of("arithmetic", 2, seed=0)
    engine = ScriptedEngine(TOK, probs, lambda p, j: f"Answer: {p.answer}", max_seq_len=200)
    res = evaluate(None, TOK, "arithmetic", n_problems=2, k=1, mode="fewshot", few_shot=3, max_new_tokens=64,
                   engine=engine)
    assert all(len(TOK.encode(t)) + 64 <= 200 for t, _ in engine.calls)
    assert any("dropped examples" in n for n in res.notes)


def test_r1_zero_puts_the_stop_string_back_before_scoring():
    probs = problems_of("countdown", 2, seed=1)
    script = lambda p, j: (f"<think>\nx\n</think> <answer>{p.answer}", "stop", "stop_string")  # noqa: E731
    engine = ScriptedEngine(TOK, probs, script)
    res = evaluate(None, TOK, "countdown", n_problems=2, k=1, mode="r1-zero", seed=1, engine=engine)
    assert engine.calls[0][1].stop == ["</answer>"]
    assert "User: " in engine.calls[0][0]
    assert res.samples[0]["response"].endswith("</answer>")
    assert res.summary()["format_rate"]["mean"] == 1.0
    # gold of a countdown problem is one solving expression: the verifier accepts it
    assert res.summary()["pass@1"]["mean"] == 1.0


@pytest.mark.parametrize("t", [0, 1e-40, 1e-6])
def test_greedy_sets_k_to_one_and_notes_it(t):
    """Greedy is any temperature below sampling's GREEDY_BELOW, as the engine decodes it."""
    probs = problems_of("arithmetic", 2)
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer))
    res = evaluate(None, TOK, "arithmetic", n_problems=2, k=8, temperature=t, engine=engine)
    assert res.config["k"] == 1 and all(p.k == 1 for p in res.problems)
    assert engine.calls[0][1].temperature == t and engine.calls[0][1].n == 1
    assert any("greedy" in n for n in res.notes)


def test_samples_beyond_the_batch_are_chunked_with_their_own_seeds():
    probs = problems_of("arithmetic", 2, seed=11)
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer) if j % 2 == 0 else r1("no"), max_batch_size=2)
    res = evaluate(None, TOK, "arithmetic", n_problems=2, k=5, seed=11, engine=engine)
    assert [c[1].n for c in engine.calls] == [2, 2, 1, 2, 2, 1]
    seeds = [c[1].seed for c in engine.calls]
    assert len(set(seeds)) == 6
    assert seeds[:3] == [request_seed(11, probs[0].id, c) for c in range(3)]
    assert [p.k for p in res.problems] == [5, 5] and res.problems[0].correct == [True, False, True, False, True]
    assert res.config["ks"] == [1, 2, 4, 5]


def test_mixed_tasks_overall_pools_problems_and_levels_split_evenly():
    probs = draw_problems("arithmetic", 3, 0, [1, 2]) + draw_problems("countdown", 3, 0, [1, 2])
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer) if p.task == "arithmetic" else r1("1+1"))
    res = evaluate(None, TOK, "arithmetic,countdown", n_problems=3, k=1, levels=[1, 2], engine=engine)
    assert res.task_names == ["arithmetic", "countdown"]
    assert sorted(p.level for p in res.problems if p.task == "arithmetic") == [1, 1, 2]
    assert res.summary("arithmetic")["pass@1"]["mean"] == 1.0
    assert res.summary("countdown")["pass@1"]["mean"] == 0.0
    assert res.summary()["pass@1"]["mean"] == pytest.approx(3 / 6) and res.summary()["n"] == 6
    assert res.summary("arithmetic")["levels"]["1"]["n"] == 2 and res.summary("arithmetic")["levels"]["2"]["n"] == 1


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="valid tasks"):
        evaluate(None, TOK, "nosuchtask", engine=object())
    with pytest.raises(ValueError, match="mode"):
        evaluate(None, TOK, "arithmetic", mode="zero-shot", engine=object())
    with pytest.raises(ValueError, match="level"):
        evaluate(None, TOK, "arithmetic", levels=[99], engine=ScriptedEngine(TOK, [], lambda p, j: ""))


def test_json_round_trip(tmp_path):
    probs = problems_of("arithmetic", 3)
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer) if j == 0 else r1("x"))
    res = evaluate(None, TOK, "arithmetic", n_problems=3, k=2, engine=engine)
    path = res.save(tmp_path / "eval.json")
    back = EvalResult.load(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.metrics == res.metrics and back.scores() == res.scores() and back.config == res.config
    assert [p.maj_at for p in back.problems] == [p.maj_at for p in res.problems]
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(EvalFileError, match="bad.json"):
        EvalResult.load(tmp_path / "bad.json")


def test_paired_comparison_matches_stats_and_handles_partial_overlap():
    a = synthetic_result({f"p{i}": [i % 2 == 0, False] for i in range(8)})
    b = synthetic_result({f"p{i}": [True, i % 3 == 0] for i in range(8)})
    comps = paired_comparison(a, b)
    task = comps[0]
    sa, sb = a.scores(), b.scores()
    ref = paired_difference([sa[k] for k in sa], [sb[k] for k in sa])
    assert task.diff == ref and task.n_shared == 8 and task.verdict == "B better"
    assert comps[-1].task == "overall"
    c = synthetic_result({f"p{i}": [True, True] for i in range(4, 12)})
    part = paired_comparison(a, c)[0]
    assert part.n_shared == 4 and "4 shared" in part.note
    d = synthetic_result({f"q{i}": [True, True] for i in range(4)})
    assert paired_comparison(a, d)[0].verdict == "not paired"


def test_real_engine_is_deterministic_and_batch_size_independent():
    torch.manual_seed(0)
    model = make_tiny_model(seed=0, vocab_size=264, max_position_embeddings=512).eval()
    kw = dict(n_problems=3, k=2, mode="chat-think", max_new_tokens=6, seed=5)
    r1_ = evaluate(model, TOK, "arithmetic", batch_size=4, **kw)
    r2_ = evaluate(model, TOK, "arithmetic", batch_size=2, **kw)
    assert [p.answers for p in r1_.problems] == [p.answers for p in r2_.problems]
    assert [p.tokens for p in r1_.problems] == [p.tokens for p in r2_.problems]
    assert r1_.samples[0]["response"] == r2_.samples[0]["response"]
    assert r1_.model["params_total"] > 0 and r1_.stats["generated_tokens"] == sum(sum(p.tokens) for p in r1_.problems)


def _manual_bpb(model, docs, seq_len):
    stream = torch.tensor([t for d in docs for t in d])
    rows = (len(stream) - 1) // seq_len
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for r in range(rows):
            chunk = stream[r * seq_len: r * seq_len + seq_len + 1]
            logits = model(chunk[None, :-1]).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            for t, y in enumerate(chunk[1:].tolist()):
                if y < 256:
                    nats -= float(logp[t, y])
                    nbytes += 1
    return nats / math.log(2) / nbytes


def test_bits_per_byte_from_documents_and_from_a_data_dir(tmp_path):
    model = make_tiny_model(seed=2, vocab_size=264).eval()
    docs = [TOK.encode(t, add_bos=True) for t in ("Question: 1 + 1?\nAnswer: 2\n", "héllo wörld " * 4, "abc " * 9)]
    res = bits_per_byte(model, docs, TOK, seq_len=16, max_tokens=10_000)
    assert res.bpb == pytest.approx(_manual_bpb(model, docs, 16), rel=1e-5)
    assert res.tokens == res.bytes                      # byte tokenizer: one byte per non-special token
    table = token_bytes_table(TOK, 264)
    assert table[:256].eq(1).all() and table[256:].eq(0).all()

    dtype = token_dtype(264)
    w = SplitWriter(tmp_path, "val", dtype)
    for d in docs:
        w.add(d, "doc")
    tr = SplitWriter(tmp_path, "train", dtype)
    tr.add(docs[0], "doc")
    write_manifest(tmp_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                              "tokenizer": {"hash": "x", "vocab_size": 264, "bos_id": TOK.bos_id},
                              "splits": {"train": tr.close(), "val": w.close()}})
    from_dir = bits_per_byte(model, tmp_path, TOK, seq_len=16, max_tokens=10_000)
    assert from_dir.bpb == pytest.approx(res.bpb, rel=1e-6) and "val" in from_dir.source
    small = bits_per_byte(model, docs, TOK, seq_len=16, max_tokens=32)
    assert small.tokens <= 32
    with pytest.raises(ValueError, match="fewer than"):
        bits_per_byte(model, [docs[0][:5]], TOK, seq_len=16)


def test_evaluation_defaults_have_one_home():
    """EvalConfig holds every evaluation default: the CLI's flags fall back to it (its --help quotes
    it), evaluate() and the speedrun's [eval] table have none of their own."""
    import argparse
    import dataclasses
    import inspect

    from nanoseek.eval import cli
    from nanoseek.speedrun_recipe import EvalSection

    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    # what `nanoseek eval` resolved to before the defaults moved here
    assert {k: defaults[k] for k in ("n_problems", "k", "temperature", "top_p", "top_k", "max_new_tokens",
                                      "few_shot", "seed", "batch_size", "keep_samples")} == {
        "n_problems": 200, "k": 4, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 256,
        "few_shot": 3, "seed": 0, "batch_size": 16, "keep_samples": 3}
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--model", "m"])
    assert all(getattr(args, flag) is None for flag in cli.SETTINGS)       # not given: EvalConfig decides
    helps = {a.dest: a.help for a in p._actions}
    for flag, name in cli.SETTINGS.items():
        assert f"(default {defaults[name]}" in helps[flag], flag
    own = [n for n, prm in inspect.signature(evaluate).parameters.items()
           if prm.default is not inspect.Parameter.empty and n in defaults]
    assert own == []
    section = {f.name: f.default for f in dataclasses.fields(EvalSection)}
    assert section["few_shot"] == defaults["few_shot"] and section["levels"] == defaults["levels"]
    for name in ("k", "temperature", "top_p", "max_new_tokens", "batch_size"):   # the recipe must write these
        assert section[name] is dataclasses.MISSING, name


def test_evaluate_takes_an_eval_config():
    probs = problems_of("arithmetic", 3)
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer))
    cfg = EvalConfig(tasks=["arithmetic"], n_problems=3, k=2, mode="chat")
    res = evaluate(None, TOK, cfg, engine=engine, seed=0)
    assert res.config["k"] == 2 and res.config["n_problems"] == 3 and res.summary()["n"] == 3
    assert cfg.ks == []                                                     # the caller's config is not changed


def test_a_registered_source_owns_its_prompts_stop_rule_and_batched_scoring(monkeypatch):
    """The harness asks the task source, never the task's kind: a source registered under a new
    prefix renders its own prompts, stops where it says and scores all its samples in one batch,
    next to a built-in task that keeps the template's defaults."""
    from nanoseek.tasks.generators import Problem
    from nanoseek.tasks.source import TaskSource
    from nanoseek.tasks.sources import SOURCES

    batches = []

    class Echo(TaskSource):
        name = "echo"

        def __init__(self, item):
            self.count = int(item.partition(":")[2] or 2)

        def test_problems(self, n, seed, levels=None):
            return [Problem(task="echo", id=f"echo-{i}", prompt=f"say {i}", answer=str(i), reasoning="", level=0)
                    for i in range(min(n, self.count))]

        def prompt_ids(self, tokenizer, problem, mode, examples=()):
            return [tokenizer.bos_id] + tokenizer.encode_text(f"ECHO Question: {problem.prompt}\nSolution:")

        def stop_rule(self, tokenizer, mode):
            return ["<stop-echo>"], [tokenizer.bos_id]

        def accuracy(self, answer, problem):
            return float(answer == problem.answer)

        def score_replies(self, items, mode):
            batches.append(len(items))
            return [(text.strip() == p.answer, True, text.strip()) for p, text in items]

    monkeypatch.setitem(SOURCES, "echo", Echo)
    arith = problems_of("arithmetic", 2, seed=1)
    echo = Echo("echo:3").test_problems(3, 0)

    def script(p, j):
        return p.answer if p.task == "echo" and j == 0 else r1(p.answer) if p.task == "arithmetic" else "no"

    engine = ScriptedEngine(TOK, arith + echo, script)
    res = evaluate(None, TOK, "arithmetic,echo:3", n_problems=2, k=2, mode="chat", seed=1, engine=engine)
    assert res.task_names == ["arithmetic", "echo"] and res.summary("echo")["n"] == 2
    assert res.pass1("echo").mean == 0.5 and res.pass1("arithmetic").mean == 1.0
    assert batches == [4]                                  # 2 problems x 2 samples, one call
    echo_calls = [(t, sp) for t, sp in engine.calls if "ECHO " in t]
    other_calls = [(t, sp) for t, sp in engine.calls if "ECHO " not in t]
    assert len(echo_calls) == 2 and all(sp.stop == ["<stop-echo>"] for _, sp in echo_calls)
    assert all("<stop-echo>" not in sp.stop for _, sp in other_calls) and len(other_calls) == 2
    # --levels is noted as not applying to a source without levels; built-in tasks take them
    res = evaluate(None, TOK, "echo:2,arithmetic", n_problems=2, k=1, mode="chat", levels=[1],
                   engine=ScriptedEngine(TOK, echo + problems_of("arithmetic", 2, seed=0, level=[1]), script))
    assert any("echo: --levels does not apply" in n for n in res.notes)
    assert {p.level for p in res.problems if p.task == "arithmetic"} == {1}


def test_fractional_scores_keep_wilson_width_near_zero_and_normal_width_in_the_middle():
    """pass@1 averaged over k samples: one right sample in 20 x 4 must not give an interval that
    collapses onto the mean (the normal interval gave [0.0, 3.7]); its upper bound lies between
    Wilson's for 1/80 (independent samples) and for 1/20 (one sample per problem)."""
    from nanoseek.eval.stats import wilson

    scores = [0.25] + [0.0] * 19
    iv = mean_interval(scores, samples=4)
    assert iv.n == 20 and iv.mean == pytest.approx(0.0125)
    assert iv.low > 0 and wilson(1, 80).high - 1e-9 <= iv.high <= wilson(1, 20).high
    assert iv.high > 0.05                                   # the normal interval's 3.7% was far too narrow
    mid = [0.5, 0.25, 0.75, 1.0, 0.0, 0.5] * 20             # the middle: Wilson at n_eff ~ the normal interval
    m = sum(mid) / len(mid)
    sd = (sum((s - m) ** 2 for s in mid) / (len(mid) - 1)) ** 0.5
    normal_half = 1.959963984540054 * sd / len(mid) ** 0.5
    iv = mean_interval(mid, samples=4)
    assert (iv.high - iv.low) / 2 == pytest.approx(normal_half, rel=0.03)
    same = mean_interval([0.5] * 10, samples=4)              # no between-problem variance: k x N draws
    assert same.low == pytest.approx(wilson(20, 40).low) and same.high == pytest.approx(wilson(20, 40).high)
