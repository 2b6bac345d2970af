"""Many wordings of one problem (nanoseek.tasks.phrasing): variety, unchanged answers, the split by the
underlying problem, determinism, held-out wordings kept out of training, the report's robustness table,
and reasoning-gym's evaluation wordings kept out of training."""

from __future__ import annotations

import functools
import re

import pytest

from eval_helpers import ScriptedEngine
from nanoseek.data.bytetok import ByteTokenizer
from nanoseek.tasks import phrasing as ph
from nanoseek.tasks.generators import TASKS, get_task, parse_task_items, split_of
from nanoseek.tasks.sources import RewordSource, resolve

WORDED = ("arithmetic", "big_arithmetic", "compare", "modular", "word_problems", "countdown", "digit7")
CURRICULUM = ["compare:1-2", "arithmetic:1-2", "modular:1", "word_problems:1"]     # the speedrun's


def _shape(prompt: str) -> str:
    """A prompt with its numbers replaced by N: what is left is the wording."""
    return re.sub(r"[−-]?\d[\d,]*", "N", prompt)


def _pattern(template: str) -> re.Pattern:
    """A regex that finds text made from ``template`` (its {fields} any text)."""
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template.strip())))


UNSEEN = ([_pattern(t) for t in ph.UNSEEN_EXPR_FRAMES + ph.UNSEEN_SUM_FRAMES + ph.UNSEEN_DIFF_FRAMES
           + ph.UNSEEN_COMPARE_FRAMES + ph.UNSEEN_MODULAR_FRAMES]
          + [re.compile(re.escape(t.strip())) for t in ph.UNSEEN_LEADS + ph.UNSEEN_ENDS])


@pytest.mark.parametrize("name", WORDED)
def test_every_task_has_many_wordings_of_one_problem(name):
    task = get_task(name)
    p = task.generate("test", 1, seed=0, level=task.levels[0], phrasing="fixed")[0]
    seen = {task.reword(p, "seen", seed).prompt for seed in range(200)}
    unseen = {task.reword(p, "unseen", seed).prompt for seed in range(50)}
    assert len(seen) >= 8 and len(unseen) >= 2, (name, seen, unseen)
    assert p.prompt not in seen | unseen and not seen & unseen
    shapes = {_shape(q.prompt) for q in task.generate("train", 400, seed=0)}
    assert len(shapes) >= 10, (name, shapes)          # the training stream itself is varied


@pytest.mark.parametrize("name", WORDED)
def test_a_wording_changes_the_prompt_only(name):
    task = get_task(name)
    for p in task.generate("test", 20, seed=1, phrasing="fixed"):
        for group in ph.GROUPS:
            q = task.reword(p, group, seed=3)
            assert (q.id, q.answer, q.reasoning, q.canonical, q.level) == (p.id, p.answer, p.reasoning, p.canonical, p.level)
            assert task.verify(p.answer, q) and task.verify(f"{p.answer}.", q)
            assert not task.verify("999999", q)
        assert task.reword(p, "original", 5).prompt == p.prompt


def test_answers_in_the_forms_a_user_writes():
    task = get_task("arithmetic")
    neg = next(p for p in task.generate("train", 200, seed=0, level=2) if p.answer.startswith("-"))
    for written in (neg.answer, neg.answer.replace("-", "\u2212"), neg.answer + ".", f"\\boxed{{{neg.answer}}}"):
        assert task.verify(written, neg), written
    assert not task.verify(neg.answer.lstrip("-"), neg)


def test_split_is_by_the_problem_not_the_wording():
    for name in WORDED:
        task = get_task(name)
        test = task.generate("test", 40, seed=0, allow_fewer=True, phrasing="fixed")
        train = task.generate("train", 2000, seed=0, unique=False)
        held = {p.canonical for p in test}
        assert all(split_of(name, p.canonical) == "train" for p in train)
        assert not held & {p.canonical for p in train}
        assert not {p.id for p in test} & {p.id for p in train}
        for p in test:                  # any wording of a held-out problem is still held out
            assert all(split_of(name, task.reword(p, g, 0).canonical) == "test" for g in ph.GROUPS)


def test_wordings_are_deterministic_per_seed():
    for name in WORDED:
        task = get_task(name)
        a = [p.prompt for p in task.generate("train", 50, seed=7)]
        assert a == [p.prompt for p in task.generate("train", 50, seed=7)]
        assert a != [p.prompt for p in task.generate("train", 50, seed=8)]


def test_fixed_phrasing_reproduces_the_original_problems():
    """The draws main made before wordings existed (ids pin the numbers, prompts the wording)."""
    got = [(p.id, p.prompt) for p in get_task("arithmetic").generate("train", 3, seed=0, phrasing="fixed")]
    assert got == [("arithmetic-train-L2-5f3daa7e60", "What is 81 + 66?"),
                   ("arithmetic-train-L3-4563f016c5", "What is 79 + 30 + 76?"),
                   ("arithmetic-train-L1-c41a434637", "What is 0 - 0?")]
    got = [(p.id, p.prompt) for p in get_task("compare").generate("train", 3, seed=0, phrasing="fixed")]
    assert got == [("compare-train-L3-6f7032061f", "Which is larger, 66409 or 66440?"),
                   ("compare-train-L1-5ab21363d0", "Which is larger, 4 or 87?"),
                   ("compare-train-L2-1c4683bceb", "Which is larger, 607 or 218?")]
    assert [(p.id, p.prompt) for p in resolve("arithmetic").test_problems(5, 0)] == \
        [(p.id, p.prompt) for p in get_task("arithmetic").generate("test", 5, seed=0, phrasing="fixed")]


def test_the_spec_names_the_phrasing():
    assert parse_task_items("arithmetic:1-2@fixed,compare") == [("arithmetic", (1, 2), "fixed"),
                                                                ("compare", None, ph.DEFAULT_PHRASING)]
    assert resolve("arithmetic:1@fixed").phrasing == "fixed" and resolve("arithmetic:1").phrasing == "varied"
    assert all(p.prompt.startswith("What is ") for p in resolve("arithmetic:1@fixed").problems("train", 30, 0))
    with pytest.raises(ValueError, match=r"phrasing must be one of .*arithmetic:1@fixed"):
        parse_task_items("arithmetic:1@wild")
    with pytest.raises(ValueError, match="reword:GROUP"):
        resolve("reword:often:arithmetic")
    assert not resolve("reword:seen:arithmetic").trainable


@functools.lru_cache(maxsize=1)
def _training_prompts() -> tuple[str, ...]:
    """Prompts of every stage's training data as the speedrun draws them: corpus documents, SFT traces,
    RL prompts (its curriculum), plus every worded task's train split."""
    from nanoseek.data.corpus import task_documents
    from nanoseek.post.datasets import load_rl_prompts
    from nanoseek.post.sft import task_sft_examples

    out = [d.text.split("\n", 1)[0].removeprefix("Question: ") for d in task_documents(1500, 0, CURRICULUM)]
    out += [ex.messages[0]["content"] for ex in task_sft_examples(",".join(CURRICULUM), 600, seed=0)]
    out += [r.prompt for r in load_rl_prompts(",".join(CURRICULUM), 600, seed=0)]
    for name in WORDED:
        out += [p.prompt for p in get_task(name).generate("train", 400, seed=1)]
    return tuple(out)


def test_held_out_wordings_never_reach_training():
    prompts = _training_prompts()
    assert len({_shape(p) for p in prompts}) > 100
    for pat in UNSEEN:
        hits = [p for p in prompts if pat.search(p)]
        assert not hits, (pat.pattern, hits[:3])
    task = get_task("arithmetic")                       # ...while the robustness table asks in them
    p = task.generate("test", 1, seed=0, phrasing="fixed")[0]
    assert any(pat.search(task.reword(p, "unseen", 0).prompt) for pat in UNSEEN)


def test_reasoning_gym_evaluation_wordings_are_not_trained_on():
    """The speedrun's external tasks ask in wordings the training data never uses."""
    from nanoseek.speedrun_recipe import load_recipe

    rc = load_recipe("speedrun", [])
    external = [q.prompt for item in rc.eval.external_tasks for q in resolve(item).test_problems(30, 0)]
    assert external
    prompts = _training_prompts()
    assert not {_shape(q) for q in external} & {_shape(p) for p in prompts}
    for p in prompts:
        assert not p.startswith(("State the final answer", "Calculate ", "Solve the following multiplication")), p


def test_robustness_table_on_a_scripted_model():
    from nanoseek.eval.harness import evaluate
    from nanoseek.eval.tables import PHRASING_HEADER, phrasing_rows

    tok = ByteTokenizer()
    items = [f"reword:{g}:arithmetic:1-2" for g in ph.GROUPS]
    problems = [p for item in items for p in resolve(item).test_problems(10, 0)]
    ids = sorted({p.id for p in problems})
    assert len(problems) == 30 and len(ids) == 10   # the same ten problems, three wordings
    half = set(ids[:5])

    def script(p, j):           # right in the original wording, in seen wordings on half, never in unseen ones
        group = (p.task.split(":") + ["original"])[1] if p.task.startswith("reword:") else "original"
        right = group == "original" or (group == "seen" and p.id in half)
        return f"<think>\nsum\n</think>\nAnswer: {int(p.answer) + (0 if right else 1)}"

    res = evaluate(None, tok, items, n_problems=10, k=2, mode="chat", seed=0,
                   engine=ScriptedEngine(tok, problems, script))
    header, rows = phrasing_rows(res)
    assert header == PHRASING_HEADER and len(rows) == 1
    task, n, orig, seen, unseen, d_seen, d_unseen = rows[0]
    assert (task, n) == ("arithmetic", "10")
    assert orig.startswith("100.0%") and seen.startswith("50.0%") and unseen.startswith("0.0%")
    assert d_seen.startswith("-50.0 pts") and d_unseen.startswith("-100.0 pts")

    # the speedrun's way: seen and unseen only, the original wording's scores from the evaluation of more problems
    orig = evaluate(None, tok, ["arithmetic:1-2"], n_problems=25, k=2, mode="chat", seed=0,
                    engine=ScriptedEngine(tok, resolve("arithmetic:1-2").test_problems(25, 0), script))
    assert half < {p.id for p in orig.problems}            # the phrasing sample is a prefix of the evaluation's
    res2 = evaluate(None, tok, items[1:], n_problems=10, k=2, mode="chat", seed=0,
                    engine=ScriptedEngine(tok, problems[10:], script))
    assert phrasing_rows(res2, orig)[1] == rows
    assert phrasing_rows(res2)[1] == [["arithmetic", "0"] + ["-"] * 5]   # no original scores: said, not guessed


def test_report_shows_the_robustness_section(tmp_path):
    from eval_helpers import make_synthetic_run
    from nanoseek.eval.report import build_sections
    from nanoseek.eval.results import EvalResult, ProblemResult

    run = make_synthetic_run(tmp_path / "run")
    sft = EvalResult.load(run / "sft" / "eval.json")            # arithmetic-test-L1-0000 ... 0029
    ids = [p.id for p in sft.problems[:6]]
    recs = [ProblemResult(task=f"reword:{g}:arithmetic", id=pid, level=1, gold="7", correct=[ok] * 4,
                          format_ok=[True] * 4, answers=["7"] * 4, tokens=[5] * 4, truncated=[False] * 4).compute_curves(0)
            for g, ok in (("seen", True), ("unseen", False)) for pid in ids]
    EvalResult.build({"tasks": [], "mode": "chat", "k": 4, "seed": 0}, recs).save(run / "sft" / "phrasing.json")
    _, _, sections, _ = build_sections(run)
    [sec] = [s for s in sections if s.title == "Phrasing robustness"]
    [rows] = [b[2] for b in sec.blocks if b[0] == "table"]
    orig = sum(p.score for p in sft.problems[:6]) / 6
    assert rows[0][:4] == ["sft", "chat", "arithmetic", "6"] and rows[0][4].startswith(f"{100 * orig:.1f}%")
    assert rows[0][-1].startswith(f"{-100 * orig:+.1f} pts") and rows[0][-2].startswith(f"{100 * (1 - orig):+.1f} pts")


def test_reasoning_gym_mixes_into_training_but_never_its_evaluation_settings():
    from nanoseek.data.corpus import task_documents
    from nanoseek.errors import UserError
    from nanoseek.speedrun_recipe import load_recipe

    train_item = "rg:chain_sum(min_terms=3, max_terms=3, min_digits=1, max_digits=2)"
    docs = list(task_documents(6, 0, [train_item, "arithmetic:1"]))
    assert len(docs) == 6 and sum(d.origin.startswith("task:rg:chain_sum") for d in docs) == 3
    rc = load_recipe("speedrun", [])
    ext = rc.eval.external_tasks[0]
    test_q = {p.prompt for p in resolve(ext).test_problems(50, 0)}
    train_q = {p.prompt for p in resolve(ext).problems("train", 200, 0)}
    assert test_q and not test_q & train_q          # the hash split and the seed streams keep them apart
    with pytest.raises(UserError, match="also in eval.external_tasks"):
        load_recipe("speedrun", [f"grpo.prompts=arithmetic:1-2,{ext}"])
    load_recipe("speedrun", [f"grpo.prompts=arithmetic:1-2,{train_item}"])      # other settings: fine
