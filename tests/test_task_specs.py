"""Task specs with levels ("arithmetic:1-2,compare:1"): parsing, and every consumer honouring them
(corpus, SFT cold-start data, RL prompts, evaluation problems)."""

import pytest

from nanoseek.data.corpus import task_documents
from nanoseek.tasks.generators import get_task, parse_task_specs
from nanoseek.eval.harness import EvalConfig, draw_problems
from nanoseek.post.datasets import DataError, load_rl_prompts
from nanoseek.post.sft import task_sft_examples


def test_parse_task_specs():
    assert parse_task_specs("arithmetic:1-2, compare:1,modular") == [
        ("arithmetic", (1, 2)), ("compare", (1,)), ("modular", None)]
    assert parse_task_specs(["countdown:3"]) == [("countdown", (3,))]
    for bad, why in [("nosuch", "valid tasks"), ("arithmetic:5", "has levels"), ("compare:x", "N or A-B"),
                     ("compare:2-1", "has levels"), ("", "names no task")]:
        with pytest.raises(ValueError, match=why):
            parse_task_specs(bad)


def test_generate_with_several_levels():
    task = get_task("arithmetic")
    ps = task.generate("test", 40, seed=3, level=[1, 2])
    assert {p.level for p in ps} == {1, 2} and len({p.id for p in ps}) == 40
    assert sum(p.level == 1 for p in ps) == 20                     # equal shares
    assert task.generate("test", 30, level=[1, 2, 3, 4]) == task.generate("test", 30)   # all == None
    assert task.generate("test", 10, level=[2]) == task.generate("test", 10, level=2)
    with pytest.raises(ValueError, match="level must be one of"):
        task.generate("test", 5, level=[1, 9])


def test_every_consumer_honours_spec_levels():
    docs = list(task_documents(60, tasks=["compare:1", "modular:2-3"]))
    levels = [d.origin.split("-L")[1][0] for d in docs]
    assert len(docs) == 60 and set(levels) == {"1", "2", "3"}
    assert all(d.origin.split("-L")[1][0] == "1" for d in docs if d.origin.startswith("task:compare"))
    sft = task_sft_examples("compare:2,arithmetic:1", 20)
    assert all(("-L2-" in e.meta["id"]) == (e.meta["task"] == "compare") for e in sft)
    rl = load_rl_prompts("modular:3", 12, level=1)                # the spec wins over the default level
    assert {p.problem.level for p in rl} == {3}
    with pytest.raises(DataError, match="has levels"):
        load_rl_prompts("modular:7", 4)
    cfg = EvalConfig(tasks=["compare:1"], n_problems=4).validate()
    assert cfg.tasks == ["compare:1"]
    with pytest.raises(ValueError, match="eval tasks"):
        EvalConfig(tasks=["compare:9"]).validate()
    assert {p.level for p in draw_problems("compare", 6, 0, [1])} == {1}


def test_small_levels_give_every_distinct_problem_with_a_note():
    from nanoseek.eval.harness import evaluate
    from tests.test_eval_harness import TOK, ScriptedEngine, r1

    probs = draw_problems("modular", 500, 0, [1])
    assert 50 < len(probs) < 120 and len({p.id for p in probs}) == len(probs)   # the whole L1 test space
    with pytest.raises(ValueError, match="exhausted"):
        get_task("modular").generate("test", 500, level=1)
    engine = ScriptedEngine(TOK, probs, lambda p, j: r1(p.answer))
    res = evaluate(None, TOK, "modular:1", n_problems=500, k=1, engine=engine)
    assert res.summary()["n"] == len(probs) and any("only" in n and "modular:1" in n for n in res.notes)
