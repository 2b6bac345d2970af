"""The speedrun's [tools] table: off by default (the stages exactly as before), and when enabled the tool
tasks join the SFT data (traces that call the tool), the GRPO prompts (rolled out with the tools) and the
evaluation (with and without tools); bad settings are one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoseek.errors import UserError
from nanoseek.post.registry import stage_config_from_dict
from nanoseek.speedrun_recipe import load_recipe
from nanoseek.tasks.generators import split_specs


def _stage(rc, kind):
    raw = rc.stage_raw(kind, {"preset": rc.model.preset, **rc.model.fields}, Path("run") / kind, 1.0, 0)
    return stage_config_from_dict(kind, raw, source="test", init_pending=True).algo


def test_tools_off_change_nothing():
    rc = load_recipe("speedrun", ["tools.enabled=false"])
    assert not rc.tools.enabled
    for kind in ("sft", "grpo"):
        assert rc.tool_keys(kind, {}) == {}
        algo = _stage(rc, kind)
        assert algo.tools == "" and algo.tool_tasks == "" and not algo.tool_use.enabled
    assert rc.eval_tasks() == split_specs(rc.eval.tasks)
    assert rc.resolved()["tools"]["enabled"] is False


def test_the_speedrun_trains_a_built_in_calculator_by_default():
    """The shipped recipe: tools on, the calculator built in (its prompts carry no description)."""
    rc = load_recipe("speedrun", [])
    assert rc.tools.enabled and not rc.tools.describe
    from nanoseek.post.sft import load_sft_examples

    sft = _stage(rc, "sft")
    assert not sft.describe_tools and not _stage(rc, "grpo").describe_tools
    examples = [e for e in load_sft_examples(sft.data, 400, 0, sft.template, sft.tool_use)
                if e.meta["task"] == "big_arithmetic"]
    assert examples and all(e.tools is None for e in examples)
    # half of its cold-start traces call the calculator, the rest are worked in the head, so GRPO has the
    # call left to teach; none of it is in the pre-training corpus (a task with a share keeps its documents
    # worked steps, and big_arithmetic is not one of [data] tasks)
    assert rc.tools.tool_tasks == "big_arithmetic=0.5" and rc.tools.corpus_task_names == []
    calls = [bool(e.messages[1].get("tool_calls")) for e in examples]
    assert 0.35 < sum(calls) / len(calls) < 0.65, (sum(calls), len(calls))
    assert all(e.messages[1]["reasoning"] and e.messages[1]["content"].startswith("Answer: ") and len(e.messages) == 2
               for e, c in zip(examples, calls) if not c)


def test_enabled_tools_reach_every_stage():
    rc = load_recipe("speedrun", ["tools.enabled=true", "tools.failure_penalty=0.1", "tools.describe=true",
                                  'tools.tasks=["big_arithmetic:1-2"]'])
    sft, grpo = _stage(rc, "sft"), _stage(rc, "grpo")
    assert sft.data == rc.sft.algo.data + ",big_arithmetic:1-2"
    assert grpo.prompts == rc.grpo.algo.prompts + ",big_arithmetic:1-2"
    for algo in (sft, grpo):
        assert algo.tool_use.applies("big_arithmetic") and not algo.tool_use.applies("arithmetic")
    assert grpo.tool_failure_penalty == 0.1 and grpo.template == "chat"
    assert rc.eval_tasks() == split_specs(rc.eval.tasks) + ["big_arithmetic:1-2"]
    # the SFT data it builds: the tool task's traces call the calculator, the others are head math
    from nanoseek.post.sft import load_sft_examples

    examples = load_sft_examples(sft.data, 30, 0, sft.template, sft.tool_use)
    tooled = [e for e in examples if e.meta["task"] == "big_arithmetic"]
    assert tooled and all(e.tools and e.messages[1].get("tool_calls") for e in tooled)
    assert all(e.tools is None and "tool_calls" not in e.messages[1] for e in examples if e not in tooled)


def test_each_stage_can_leave_the_tools_out():
    rc = load_recipe("speedrun", ["tools.enabled=true", "tools.sft=false", "tools.eval=false"])
    assert _stage(rc, "sft").tools == "" and _stage(rc, "grpo").tools == "calculator"
    assert rc.eval_tasks() == split_specs(rc.eval.tasks)


@pytest.mark.parametrize("override, message", [
    ('tools.tools="abacus"', r"\[tools\] tools = 'abacus': .*unknown built-in tool 'abacus'"),
    ('tools.tools=""', r"\[tools\] tools = '': name at least one built-in tool"),
    ('tools.tasks=["compare:1"]', r"\[tools\] tasks = \['compare:1'\]: task 'compare' has no tool call"),
    ('tools.tasks=["algebra"]', r"\[tools\] tasks = \['algebra'\]: .*unknown task 'algebra'"),
    ("tools.failure_penalty=-1", r"\[tools\] failure_penalty = -1.0: must be >= 0"),
    ("tools.enabledd=true", r"unknown key 'enabledd' in \[tools\]"),
])
def test_bad_tool_settings_are_named(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("speedrun", [override])


def test_tools_need_generated_sft_data(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(UserError, match=r"\[tools\] sft = true needs generated \[sft\] data"):
        load_recipe("speedrun", ["tools.enabled=true", f'sft.data="{data}"'])
    assert load_recipe("speedrun", ["tools.enabled=true", "tools.sft=false", f'sft.data="{data}"']).tools.enabled


def test_tool_traces_that_do_not_fit_fail_before_pretraining_naming_the_key():
    from nanoseek.errors import ConfigError
    from nanoseek.speedrun import check_tool_fit
    from post_helpers import WithoutToolTokens, tool_tokenizer
    from test_tasks_tools import _template_takes_tool_messages

    tk = tool_tokenizer()
    if not _template_takes_tool_messages(tk):
        pytest.skip("this chat template has no tool messages yet (the tool-use template lands with issue 20)")
    check_tool_fit(load_recipe("speedrun", []), tk)                     # off: nothing to check
    big = ["tools.enabled=true", "sft.optim.seq_len=1024", "grpo.max_new_tokens=400", "eval.max_new_tokens=400"]
    check_tool_fit(load_recipe("speedrun", big), tk)
    for key in ("sft.optim.seq_len", "grpo.max_new_tokens", "eval.max_new_tokens"):
        rc = load_recipe("speedrun", [x for x in big if not x.startswith(key)] + [f"{key}=16"])
        with pytest.raises(ConfigError, match=rf"need {key} >= \d+ tokens .* it is 16: --set {key}=\d+"):
            check_tool_fit(rc, tk)
    off = load_recipe("speedrun", big[:1] + ["tools.grpo=false", "tools.eval=false", "sft.optim.seq_len=1024"])
    check_tool_fit(off, tk)                                             # only the stages that use tools count
    with pytest.raises(ConfigError, match="cannot call tools"):
        check_tool_fit(load_recipe("speedrun", big), WithoutToolTokens(tk))


def test_a_tool_task_already_in_the_recipe_is_not_added_twice():
    """tools.tasks naming a task the stages already have (arithmetic:1-2): it gets the tool, once."""
    rc = load_recipe("speedrun", ['tools.tasks=["arithmetic:1-2"]'])
    assert rc.eval_tasks() == split_specs(rc.eval.tasks)
    assert rc.tool_keys("sft", {})["data"] == rc.sft.algo.data
    assert rc.tool_keys("grpo", {})["prompts"] == rc.grpo.algo.prompts
    assert _stage(rc, "sft").tool_use.applies("arithmetic") and not _stage(rc, "sft").tool_use.applies("compare")


def test_a_tool_task_with_a_share_calls_in_that_share_of_its_traces_and_gets_the_tool_everywhere():
    """tools.tasks "arithmetic:1-2=0.25": the tool in arithmetic's GRPO rollouts and evaluation, a quarter
    of its cold-start traces calling it (the rest head math), its corpus documents left as worked steps."""
    from nanoseek.post.sft import load_sft_examples

    rc = load_recipe("speedrun", ['tools.tasks=["big_arithmetic:1-2", "arithmetic:1-2=0.25"]'])
    assert rc.tools.specs == ["big_arithmetic:1-2", "arithmetic:1-2"]
    assert rc.tools.tool_tasks == "big_arithmetic,arithmetic=0.25" and rc.tools.corpus_task_names == ["big_arithmetic"]
    assert rc.eval_tasks() == split_specs(rc.eval.tasks) + ["big_arithmetic:1-2"]
    sft, grpo = _stage(rc, "sft"), _stage(rc, "grpo")
    assert sft.data == rc.sft.algo.data + ",big_arithmetic:1-2" and grpo.prompts == rc.grpo.algo.prompts + ",big_arithmetic:1-2"
    for algo in (sft, grpo):
        assert algo.tool_use.applies("arithmetic") and algo.tool_use.applies("big_arithmetic")
    examples = load_sft_examples(sft.data, 800, 0, sft.template, sft.tool_use)
    calls = {t: [bool(e.messages[1].get("tool_calls")) for e in examples if e.meta["task"] == t]
             for t in ("arithmetic", "big_arithmetic", "compare")}
    assert all(calls["big_arithmetic"]) and not any(calls["compare"])
    assert 0.15 < sum(calls["arithmetic"]) / len(calls["arithmetic"]) < 0.35


@pytest.mark.parametrize("share", ["0", "1.5", "half"])
def test_a_bad_share_is_named(share):
    with pytest.raises(UserError, match=rf"\[tools\] tasks = .*: tool_tasks: 'arithmetic=.*': the share after '=' must be"):
        load_recipe("speedrun", [f'tools.tasks=["arithmetic:1-2={share}"]'])


def test_grpo_prompt_weights_reach_the_tool_task_the_recipe_adds():
    """``--set grpo.prompt_weights="big_arithmetic=0.25"``: the tool task [tools] adds to GRPO's prompts
    is a quarter of each other task's share (the weight written in [grpo] wins over [tools] grpo_weight);
    a name that is not among the stage's prompts is one line."""
    from collections import Counter

    from nanoseek.post.datasets import load_rl_prompts

    for name in ("speedrun", "speedrun-tools"):
        grpo = _stage(load_recipe(name, ['grpo.prompt_weights="big_arithmetic=0.25"']), "grpo")
        assert grpo.prompt_weights == "big_arithmetic=0.25"
        grpo.check_sources()
        others = len(split_specs(grpo.prompts)) - 1
        got = Counter(p.task for p in load_rl_prompts(grpo.prompts, 200 * others + 50, seed=0, weights=grpo.prompt_weights))
        assert got["big_arithmetic"] == 50 and got["arithmetic"] == got["modular"] == 200
    from nanoseek.errors import UserError

    with pytest.raises(UserError, match=r"grpo.prompt_weights: 'big_arithmetic' is not one of the prompt sources"):
        load_recipe("speedrun", ["tools.enabled=false", 'grpo.prompt_weights="big_arithmetic=0.25"'])


def test_tools_grpo_weight_sets_the_tool_tasks_share_of_grpo_prompts():
    """``[tools] grpo_weight``: each tool task's weight in GRPO's prompt pool, added to the stage's
    prompt_weights (the shipped recipe: a tenth); it goes with the tools (off: no weights, the recipe still
    valid), a weight [grpo] writes for another source is kept, and a bad value is one line naming the key."""
    from collections import Counter

    from nanoseek.post.datasets import load_rl_prompts

    rc = load_recipe("speedrun", [])
    grpo = _stage(rc, "grpo")
    assert rc.tools.grpo_weight == 0.1 and grpo.prompt_weights == "big_arithmetic=0.1"
    got = Counter(p.task for p in load_rl_prompts(grpo.prompts, 620, seed=0, weights=grpo.prompt_weights))
    assert got == {"arithmetic": 200, "modular": 200, "word_problems": 200, "big_arithmetic": 20}
    assert _stage(load_recipe("speedrun", ["tools.enabled=false"]), "grpo").prompt_weights == ""
    assert _stage(load_recipe("speedrun", ["tools.grpo=false"]), "grpo").prompt_weights == ""
    both = _stage(load_recipe("speedrun", ['grpo.prompt_weights="modular=2"', "tools.grpo_weight=0.5"]), "grpo")
    assert both.prompt_weights == "modular=2,big_arithmetic=0.5"
    both.check_sources()
    assert _stage(load_recipe("speedrun", ["tools.grpo_weight=1"]), "grpo").prompt_weights == ""
    shares = _stage(load_recipe("speedrun-tools", ["tools.grpo_weight=0.5"]), "grpo")   # every tool task
    assert shares.prompt_weights == "big_arithmetic=0.5,arithmetic=0.5"
    for bad in ("0", "-1", "nan"):
        with pytest.raises(UserError, match=r"tools.*grpo_weight"):
            load_recipe("speedrun", [f"tools.grpo_weight={bad}"])
