"""Prompts that say whether tools are there: ``describe_tools = "names"`` (a system turn naming the
tools) and ``offer`` (a share of a partly-calling tool task's training problems asked with the tools,
the rest without them and worked in the head), through ToolUse, the cold-start traces, GRPO's prompts,
evaluation, the server, the CLIs and the speedrun recipe (nanoseek.tasks.tool_use)."""

from __future__ import annotations

import httpx
import pytest

from nanoseek.tasks.generators import get_task
from nanoseek.tasks.reply import render_prompt
from nanoseek.tasks.tool_use import DESCRIBE, ToolUse, announce, describe_mode, tools_named_text, with_system
from nanoseek.tools.format import TOOLS_HEADER
from nanoseek.tools.toolbox import Toolbox
from post_helpers import tiny_model, tool_tokenizer

NAMED = tools_named_text(["calculator"])


def test_describe_modes_and_their_bools():
    assert describe_mode(True) == "full" and describe_mode(False) == "none"
    assert [describe_mode(m) for m in DESCRIBE] == list(DESCRIBE)
    for bad in ("brief", "", "Names", 1):
        with pytest.raises(ValueError, match="must be one of full, names, none"):
            describe_mode(bad, "tools.describe")
    assert ToolUse.of("calculator", "big_arithmetic", False).describe == "none"
    assert ToolUse.of("calculator", "big_arithmetic", "names").describe == "names"
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="offer must be in"):
            ToolUse.of("calculator", "arithmetic=0.5", "names", bad)


def test_what_a_prompt_says_of_its_tools_per_mode():
    tk = tool_tokenizer()
    p = get_task("arithmetic").generate("test", 1, seed=0)[0]
    plain = render_prompt(tk, p, "chat")
    full, named, none = (ToolUse.of("calculator", "arithmetic", m) for m in DESCRIBE)
    assert full.specs_for("arithmetic") and full.system_for("arithmetic") is None
    assert named.specs_for("arithmetic") is None and named.system_for("arithmetic") == NAMED == "Tools: calculator."
    assert none.specs_for("arithmetic") is None and none.system_for("arithmetic") is None
    assert named.system_for("compare") is None                   # a task without the tools: nothing
    ids = render_prompt(tk, p, "chat", system=named.system_for("arithmetic"))
    text = tk.decode(ids)
    assert NAMED in text and TOOLS_HEADER.strip() not in text and ids != plain
    assert ids == tk.encode_chat([{"role": "system", "content": NAMED}, {"role": "user", "content": p.prompt}],
                                 add_generation_prompt=True)[0]
    assert len(ids) - len(plain) < 12                            # a few tokens, not the description's hundreds
    with pytest.raises(ValueError, match="need a chat template"):
        render_prompt(tk, p, "fewshot", system=NAMED)


def test_with_system_and_announce():
    msgs = [{"role": "user", "content": "hi"}]
    assert with_system(msgs, NAMED) == [{"role": "system", "content": NAMED}] + msgs
    own = [{"role": "system", "content": "Be brief."}] + msgs
    assert with_system(own, NAMED)[0] == {"role": "system", "content": "Be brief.\n\n" + NAMED}
    assert own[0]["content"] == "Be brief."                      # the caller's list is not changed
    box = Toolbox.builtin("calculator")
    assert announce(msgs, box, "names") == ([{"role": "system", "content": NAMED}] + msgs, {})
    assert announce(msgs, box, "full")[1]["tools"] == box.openai_tools()
    assert announce(msgs, box, "none") == (msgs, {}) == announce(msgs, None, "names")


def test_offer_splits_training_problems_and_calls_stay_within_the_offered():
    """A SHARE task's problems: ``offer`` of them asked with the tools (a fixed draw per problem,
    independent of the call draw), a share of those calling; a task whose every trace calls is always
    offered; offer 1 keeps the earlier behaviour (every problem offered, the same calls)."""
    use = ToolUse.of("calculator", "big_arithmetic,arithmetic=0.5", "names", 0.4)
    problems = get_task("arithmetic").generate("train", 3000, seed=5)
    offered = [use.offers(p) for p in problems]
    calls = [use.calls(p) for p in problems]
    assert 0.36 < sum(offered) / len(problems) < 0.44
    assert all(o for o, c in zip(offered, calls) if c)
    assert 0.45 < sum(calls) / sum(offered) < 0.55                # the call draw is independent of the offer draw
    assert offered == [ToolUse.of("calculator", "big_arithmetic,arithmetic=0.5", "names", 0.4).offers(p) for p in problems]
    assert all(use.offers(p) and use.calls(p) for p in get_task("big_arithmetic").generate("train", 40, seed=5))
    assert not any(use.offers(p) for p in get_task("compare").generate("train", 40, seed=5))
    everyone = ToolUse.of("calculator", "arithmetic=0.5", "names")
    assert all(everyone.offers(p) for p in problems)
    assert [everyone.calls(p) for p in problems] == [ToolUse.of("calculator", "arithmetic=0.5").calls(p) for p in problems]


def test_cold_start_traces_name_the_tools_only_where_offered():
    from nanoseek.post.sft import task_sft_examples

    use = ToolUse.of("calculator", "big_arithmetic,arithmetic=0.5", "names", 0.5)
    examples = task_sft_examples("arithmetic:1-2,big_arithmetic:1", 600, seed=3, tool_use=use)
    seen = {"named call": 0, "named head": 0, "plain head": 0}
    for e in examples:
        named = e.messages[0] == {"role": "system", "content": NAMED}
        called = any(m.get("tool_calls") for m in e.messages)
        assert e.tools is None                                     # named, never described
        assert named or not called                                 # no call without the tools in the prompt
        if e.meta["task"] == "big_arithmetic":
            assert named and called
        else:
            seen["named call" if called else "named head" if named else "plain head"] += 1
    n = sum(seen.values())
    assert all(0.15 < v / n < 0.35 for k, v in seen.items() if k != "plain head"), seen
    assert 0.4 < seen["plain head"] / n < 0.6, seen
    # in full mode a head-worked trace of an offered problem is prompted with the description too
    full = task_sft_examples("arithmetic:1", 200, seed=3, tool_use=ToolUse.of("calculator", "arithmetic=0.5"))
    assert all(e.tools for e in full)
    assert 0.3 < sum(bool(e.messages[1].get("tool_calls")) for e in full) / len(full) < 0.7


def test_grpo_prompts_offer_the_tools_per_problem():
    from nanoseek.post.datasets import load_rl_prompts
    from nanoseek.post.grpo import GRPOSection, GRPOTask

    tk = tool_tokenizer()
    cfg = GRPOSection(template="chat", tools="calculator", tool_tasks="arithmetic=0.25", describe_tools="names",
                      tool_offer=0.5, prompts="arithmetic:1-2,compare:1", num_prompts=200)
    prompts = load_rl_prompts(cfg.prompts, cfg.num_prompts, seed=0)
    trainer = GRPOTask(tiny_model(tk.vocab_size, max_position_embeddings=512), tk, prompts, cfg)
    use = cfg.tool_use
    assert trainer.with_tools == [use.offers(p) for p in trainer.prompts]
    arith = [w for p, w in zip(trainer.prompts, trainer.with_tools) if p.task == "arithmetic"]
    assert 0.3 < sum(arith) / len(arith) < 0.7
    for p, ids, offered in zip(trainer.prompts, trainer.prompt_ids, trainer.with_tools):
        assert (NAMED in tk.decode(ids)) == offered
        assert ids == render_prompt(tk, p, "chat", system=NAMED if offered else None)


def test_eval_names_the_tools_for_the_tool_tasks_only():
    from nanoseek.eval.harness import EvalConfig, evaluate

    class Recorder:
        max_batch_size, max_seq_len = 64, 2048

        def __init__(self):
            self.prompts = []

        def generate(self, prompts, params, toolbox=None):
            from types import SimpleNamespace

            self.prompts += [(tk.decode(p), toolbox is not None) for p in prompts]
            body = "<think>\nx\n</think>\n\nAnswer: 3"
            ids = tk.encode_text(body) + [tk.eos_id]
            return [[SimpleNamespace(token_ids=ids, text=body, final_text=body, model_mask=[1] * len(ids),
                                     tool_calls=[], tool_results=[], reasoning=None, finish_reason="stop",
                                     stop_reason="eos", completion_tokens=len(ids)) for _ in range(params.n)]
                    for _ in prompts]

    tk = tool_tokenizer()
    engine = Recorder()
    cfg = EvalConfig(tasks=["arithmetic:1", "compare:1"], n_problems=4, k=1, mode="chat", max_new_tokens=32,
                     tools="calculator", tool_tasks="arithmetic=0.25", describe_tools="names")
    evaluate(tiny_model(tk.vocab_size, max_position_embeddings=2048), tk, cfg, engine=engine)
    got = {(("Which" in t or "larger" in t.lower() or "bigger" in t.lower()), NAMED in t, run) for t, run in engine.prompts}
    assert (False, True, True) in got and all(named == run for _, named, run in got)    # every arithmetic prompt offered
    assert sum(named for _, named, _ in got) >= 1 and sum(not named for _, named, _ in got) >= 1


def test_server_names_its_own_tools():
    from nanoseek.serve.api import ServeLimits, create_app
    from serve_helpers import ScriptedEngine, background_server, make_tool_tokenizer

    tk = make_tool_tokenizer()
    engine = ScriptedEngine(tk, lambda prompt, params, i: "Answer: 4", max_seq_len=2048)
    app = create_app(engine, tk, "m", ServeLimits(max_tokens=64), toolbox=Toolbox.builtin("calculator"),
                     describe_tools="names")
    with background_server(app) as url, httpx.Client(base_url=url, timeout=20) as raw:
        def prompt(body):
            r = raw.post("/v1/chat/completions", json={"model": "m", **body})
            assert r.status_code == 200, r.text
            return tk.decode(engine.prompts[-1])

        text = prompt({"messages": [{"role": "user", "content": "What is 2 + 2?"}]})
        assert NAMED in text and TOOLS_HEADER.strip() not in text and engine.params[-1].tools == "run"
        text = prompt({"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 2 + 2?"}]})
        assert "Be brief.\n\n" + NAMED in text
        assert NAMED not in prompt({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none"})


@pytest.mark.parametrize("argv, want", [([], None), (["--describe-tools", "names"], "names"),
                                        (["--no-describe-tools"], "none"), (["--describe-tools", "none"], "none")])
def test_describe_flag_on_every_command(argv, want):
    from nanoseek.cli import build_parser

    parser = build_parser()
    for cmd in (["serve", "--model", "m"], ["eval", "--model", "m"], ["generate", "--model", "m", "--prompt", "x"],
                ["chat", "--model", "m"]):
        assert parser.parse_args(cmd + argv).describe_tools == want, cmd


def test_describe_flag_rejects_other_values(capsys):
    from nanoseek.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--describe-tools", "brief"])
    assert "--describe-tools: invalid choice: 'brief'" in capsys.readouterr().err


def test_speedrun_recipe_passes_describe_and_offer_and_checks_them():
    from nanoseek.errors import UserError
    from nanoseek.speedrun_recipe import load_recipe
    from test_speedrun_tools import _stage

    rc = load_recipe("speedrun", ['tools.describe="names"', "tools.offer=0.5",
                                  'tools.tasks=["big_arithmetic:1-2", "arithmetic:1-2=0.25"]'])
    for kind in ("sft", "grpo"):
        use = _stage(rc, kind).tool_use
        assert (use.describe, use.offer, dict(use.task_shares)) == ("names", 0.5, {"big_arithmetic": 1.0, "arithmetic": 0.25})
    for key, value in (("describe", '"brief"'), ("offer", "0"), ("offer", "2")):
        with pytest.raises(UserError, match=rf"^--set 'tools.{key}={value}': \[tools\] {key} = .*must be"):
            load_recipe("speedrun", [f"tools.{key}={value}"])


def test_the_speedrun_tools_recipe_names_the_calculator_where_it_is_offered():
    """speedrun-tools: the big-number task always has the calculator, half of arithmetic does, a
    quarter of those traces call it; the other tasks and the other half are head math."""
    from nanoseek.post.sft import load_sft_examples
    from nanoseek.speedrun_recipe import load_recipe
    from test_speedrun_tools import _stage

    rc = load_recipe("speedrun-tools", [])
    sft = _stage(rc, "sft")
    assert (sft.tool_use.describe, sft.tool_use.offer) == ("names", 0.5)
    assert _stage(rc, "grpo").tool_use == sft.tool_use
    kinds: dict[str, set] = {}
    for e in load_sft_examples(sft.data, 600, 0, sft.template, sft.tool_use):
        named = e.messages[0] == {"role": "system", "content": NAMED}
        kinds.setdefault(e.meta["task"], set()).add((named, any(m.get("tool_calls") for m in e.messages)))
    assert kinds["big_arithmetic"] == {(True, True)}
    assert kinds["arithmetic"] == {(True, True), (True, False), (False, False)}
    assert all(k == {(False, False)} for t, k in kinds.items() if t not in ("arithmetic", "big_arithmetic"))


def test_tool_fit_counts_the_named_prompt():
    """check_tool_fit measures the trace as it is trained: with the system turn that names the tools."""
    from nanoseek.errors import ConfigError
    from nanoseek.speedrun import check_tool_fit
    from nanoseek.speedrun_recipe import load_recipe

    tk = tool_tokenizer()
    big = ["sft.optim.seq_len=1024", "grpo.max_new_tokens=400", "eval.max_new_tokens=400"]
    check_tool_fit(load_recipe("speedrun-tools", big), tk)
    need = {}
    for describe in ("names", "none"):
        rc = load_recipe("speedrun-tools", big[1:] + ["sft.optim.seq_len=16", f'tools.describe="{describe}"'])
        with pytest.raises(ConfigError, match=r"need sft.optim.seq_len >= (\d+) tokens") as e:
            check_tool_fit(rc, tk)
        need[describe] = int(str(e.value).split(">= ")[1].split()[0])
        assert ("prompt naming the tools" in str(e.value)) == (describe == "names")
    assert need["names"] > need["none"]


def test_the_stage_record_says_how_the_tools_were_prompted(tmp_path):
    """stage.json of a post-training stage with tools records them and their describe mode; commands
    read it from the stage folder, its final/ or a checkpoints/step-N (describe_for)."""
    import json

    from nanoseek.post.sft import SFTSection
    from nanoseek.post.stage import _tool_record
    from nanoseek.tasks.tool_use import describe_for, trained_describe

    sft = SFTSection(data="tasks:big_arithmetic:1", num_examples=4, tools="calculator", describe_tools="names")
    assert _tool_record(sft) == {"tools": "calculator", "describe_tools": "names"}
    assert _tool_record(SFTSection(data="tasks:compare:1", num_examples=4)) == {}
    stage = tmp_path / "grpo"
    (stage / "final").mkdir(parents=True)
    (stage / "checkpoints" / "step-5").mkdir(parents=True)
    assert trained_describe(stage / "final") is None and describe_for(None, stage / "final") == "full"
    (stage / "stage.json").write_text(json.dumps({"kind": "grpo", **_tool_record(sft)}))
    for where in (stage, stage / "final", stage / "checkpoints" / "step-5"):
        assert trained_describe(where) == "names" == describe_for(None, where)
        assert describe_for("full", where) == "full" and describe_for("none", where) == "none"
    for bad in ("{not json", json.dumps({"describe_tools": "brief"}), json.dumps(["names"])):
        (stage / "stage.json").write_text(bad)
        assert trained_describe(stage / "final") is None and describe_for(None, stage / "final") == "full"
