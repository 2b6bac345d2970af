"""report.md + self-contained report.html from a synthetic run folder, and graceful skipping."""

from __future__ import annotations

import base64
import json
import re

import pytest

from eval_helpers import make_synthetic_run, write_metrics
from nanoseek.eval.report import main as report_main
from nanoseek.eval.report import stage_summary, write_report
from nanoseek.eval.runs import find_stages, read_jsonl


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_synthetic_run(tmp_path_factory.mktemp("run"), status="running")
    md, html = write_report(root)
    return root, md.read_text(), html.read_text()


def test_html_is_self_contained_with_embedded_plots(report):
    root, _, html = report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and "<script" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # loss x3 stages, experts x2 (pretrain, sft), grpo, accuracy, test-time compute
    assert len(images) == 8
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert '<meta http-equiv="refresh" content="30">' in html          # run.json status "running"


def test_report_has_every_section_and_the_numbers(report):
    root, md, html = report
    for title in ("Summary", "Model", "Training", "Held-out evaluation", "Test-time compute", "Samples",
                  "Configuration", "Notes"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in html
    assert "| pretrain | done | 40 | 163.84K | 20.0s |" in md            # run.json wall time and tokens win
    assert "| total | running | - | 192.84K | 1m02s |" in md
    assert "50,512" in md and "32,080" in md                            # count_params of the tiny config
    assert "A = pretrain, B = sft" in md and "A = sft, B = grpo" in md
    assert "+20.0 pts [+10.2, +29.8]" in md and "B better" in md
    assert "grpo rollout 12" in md and "&lt;think&gt;" in html          # sample text is escaped in HTML
    assert "max_steps = 40" in md
    for name in re.findall(r"\]\((report_files/[^)]+\.png)\)", md):
        assert (root / name).read_bytes().startswith(b"\x89PNG")


def test_stage_summary_falls_back_to_metrics_without_run_json(tmp_path):
    root = make_synthetic_run(tmp_path, with_grpo=False)
    (root / "run.json").unlink()
    stages = find_stages(root)
    assert [s.name for s in stages] == ["pretrain", "sft"]
    from nanoseek.eval.report import _load_stage

    s = stage_summary(_load_stage(stages[0], []))
    assert s["status"] == "done" and s["wall_s"] == 20.0 and s["tokens"] == 4096 * 40 and s["steps"] == 40
    assert s["spikes"] == 1 and s["val_bpb"] == pytest.approx(1.1)
    assert s["tokens_per_s"] == pytest.approx(9020.5)


def test_missing_and_broken_pieces_are_skipped_with_notes(tmp_path):
    run = tmp_path / "single"
    write_metrics(run / "metrics.jsonl", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("{not json}\n" + json.dumps({"step": 3, "loss": 2.0}) + "\n" + '{"step": 4, "lo')  # torn last line
    (run / "eval.json").write_text('{"format": "nanoseek-eval", "version": 99}')
    md, html = write_report(run, refresh_s=5)
    text = md.read_text()
    assert "skipped a bad line" in text and "eval skipped" in text and "version 99" in text
    assert "no run.json" in text and "no checkpoint" in text
    assert "| single | running | 3 |" in text                           # one stage named after the folder
    assert '<meta http-equiv="refresh" content="5">' in html.read_text()
    records, offset, problems = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and len(problems) == 1
    assert offset < (run / "metrics.jsonl").stat().st_size             # the torn line is left for later

    empty = tmp_path / "empty"
    empty.mkdir()
    md, html = write_report(empty)
    assert "no stage folders" in md.read_text() and "refresh" not in html.read_text()


def test_report_module_cli(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    write_metrics(tmp_path / "r" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    assert report_main([str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file() and "wrote" in capsys.readouterr().out


def test_a_failing_plot_is_a_note_and_extreme_accuracies_plot(tmp_path, monkeypatch):
    from eval_helpers import synthetic_result
    from nanoseek.eval import plots

    # Wilson bounds at 0% and 100% may overshoot the mean by a rounding error: no negative error bar
    for value in (True, False):
        res = synthetic_result({f"p{i}": [value] for i in range(7)})
        assert plots.accuracy_plot([("a", res)]).startswith(b"\x89PNG")

    def broken(*args):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "accuracy_plot", broken)
    for name in ("training_plot", "expert_plot", "grpo_plot", "ttc_plot"):    # not under test here: keep it fast
        monkeypatch.setattr(plots, name, lambda *a: None)
    root = make_synthetic_run(tmp_path, with_grpo=False)
    md, html = write_report(root)
    assert "accuracy: plot skipped (RuntimeError: no fonts)" in md.read_text()
    assert "Paired difference" in md.read_text()                      # the rest is still there


def test_mfu_axis_is_a_rescaled_tokens_per_s_axis_only_when_proportional():
    from nanoseek.eval.plots import _mfu_per_token_s

    tps = ([1, 2, 3], [100.0, 200.0, 50.0])
    assert _mfu_per_token_s(tps, ([1, 2, 3], [0.01, 0.02, 0.005])) == pytest.approx(1e-4)
    assert _mfu_per_token_s(tps, ([1, 2, 3], [0.01, 0.01, 0.01])) is None


def test_pending_stages_and_a_broken_run_json(tmp_path, monkeypatch):
    from nanoseek.eval import plots

    for name in ("training_plot", "expert_plot", "grpo_plot", "accuracy_plot", "ttc_plot"):   # figures: not here
        monkeypatch.setattr(plots, name, lambda *a: None)
    root = make_synthetic_run(tmp_path, with_grpo=False)
    meta = json.loads((root / "run.json").read_text())
    meta["stages"].append({"name": "grpo", "status": "pending"})
    (root / "run.json").write_text(json.dumps(meta))
    from nanoseek.eval.report import build_sections

    _, _, sections, notes = build_sections(root)
    summary = next(s for s in sections if s.title == "Summary").blocks[0][2]
    assert [r[0] for r in summary] == ["pretrain", "sft", "grpo", "total"] and summary[2][1] == "pending"
    assert "grpo: not started yet" in notes
    (root / "run.json").write_text('{"stages": [')                       # caught mid-write
    _, _, sections, notes = build_sections(root)
    assert any("run.json" in n for n in notes)
    assert [r[0] for r in next(s for s in sections if s.title == "Summary").blocks[0][2]][:2] == ["pretrain", "sft"]


def test_expert_plot_of_a_stage_with_one_logged_step_draws_without_warnings():
    import warnings

    from nanoseek.eval.plots import expert_plot

    with warnings.catch_warnings():
        warnings.simplefilter("error")            # matplotlib warned of a zero-width heat map here
        out = expert_plot("sft", ([5], [[0.2, 0.4]]), ([5], [[0.1, 0.3]]))
    assert out is not None and out[:8] == b"\x89PNG\r\n\x1a\n"


def test_configuration_shows_the_resolved_settings_and_reads_older_run_json(tmp_path):
    """run.json's ``resolved`` (every setting, defaults filled in) is shown beside the recipe as
    written; a run.json from before it was recorded shows its config as it always did."""
    root = make_synthetic_run(tmp_path / "run")
    meta = json.loads((root / "run.json").read_text())
    meta["config"] = {"sft": {"optim": {"lr": 1e-3}}, "minutes": 1.0, "seed": 0}
    (root / "run.json").write_text(json.dumps(meta))
    md = write_report(root)[0].read_text()
    assert "**run.json config**" in md and "resolved" not in md.split("## Configuration")[1].split("##")[0]
    meta["resolved"] = {"sft": {"optim": {"lr": 1e-3, "seq_len": 512, "warmup_steps": 10}}, "minutes": 1.0,
                        "seed": 0}
    (root / "run.json").write_text(json.dumps(meta))
    block = write_report(root)[0].read_text().split("## Configuration")[1]
    assert block.index("**run.json resolved") < block.index("**run.json config (as written)**")
    assert '"warmup_steps": 10' in block and '"seq_len": 512' in block


def test_external_tasks_get_their_own_section_with_intervals_and_paired_differences(tmp_path):
    """Stages with an external.json (the speedrun's reasoning-gym tasks) get a section of their own after the
    built-in held-out evaluation: pass@1 per stage and task with intervals, paired stage-to-stage differences;
    a stage without one is simply absent from it, and an unreadable one is a note."""
    from eval_helpers import synthetic_result

    root = make_synthetic_run(tmp_path / "run")
    ids = [f"rg:chain_sum-test-{i:04d}" for i in range(40)]
    for j, st in enumerate(("pretrain", "sft", "grpo")):
        if st == "sft":
            continue
        res = synthetic_result({pid: [i < 4 + 10 * j] * 2 for i, pid in enumerate(ids)}, task="rg:chain_sum",
                               mode="fewshot" if st == "pretrain" else "chat")
        res.save(root / st / "external.json")
    (root / "sft" / "external.json").write_text("{broken")
    md_path, html_path = write_report(root)
    md, html = md_path.read_text(), html_path.read_text()
    titles = re.findall(r"^## (.+)$", md, re.M)
    at = titles.index("Held-out evaluation on external tasks")
    assert titles[at - 1] == "Held-out evaluation" and titles[at + 1] == "Test-time compute"
    assert "<h2>Held-out evaluation on external tasks</h2>" in html
    section = md.split("## Held-out evaluation on external tasks", 1)[1].split("\n## ", 1)[0]
    assert "| pretrain | fewshot | rg:chain_sum | 40 | 2 | 10.0% [" in section
    assert "| grpo | chat | rg:chain_sum | 40 | 2 | 60.0% [" in section
    assert "A = pretrain, B = grpo" in section and "+50.0 pts" in section and "B better" in section
    assert "sft: external evaluation skipped" in md
    assert "pretrain external eval, rg:chain_sum" in md                 # a sample of what the model answered
    plain = write_report(make_synthetic_run(tmp_path / "plain"))[0].read_text()
    assert "external tasks" not in plain
