"""`nanoseek eval` on a speedrun-shaped folder of tiny checkpoints, and `nanoseek compare`."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_model
from eval_helpers import synthetic_result
from nanoseek.cli import main
from nanoseek.data.shards import FORMAT, FORMAT_VERSION, SplitWriter, token_dtype, write_manifest
from nanoseek.tasks.generators import corpus_document, get_task
from nanoseek.eval.results import EvalResult
from nanoseek.model.checkpoint import save_pretrained

ARGS = ["--tasks", "arithmetic", "--n", "3", "--k", "2", "--max-new-tokens", "6", "--batch-size", "4",
        "--few-shot", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/{pretrain,sft}/final (two tiny models) + RUN/tokenizer.json, as the speedrun lays them out."""
    from nanoseek.data.tokenizer import Tokenizer

    texts = [corpus_document(p) for p in get_task("arithmetic").generate("train", 40)]
    tok = Tokenizer.train(texts, vocab_size=300, min_frequency=1)
    root = tmp_path_factory.mktemp("speedrun")
    for i, stage in enumerate(("pretrain", "sft")):
        save_pretrained(make_tiny_model(seed=i, vocab_size=tok.vocab_size).eval(), root / stage / "final")
    tok.save(root)
    return root, tok, texts


def test_eval_of_a_speedrun_folder_evaluates_every_stage_on_the_same_problems(run, capsys):
    root, _, _ = run
    assert main(["eval", "--model", str(root), *ARGS]) == 0
    out = capsys.readouterr().out
    pre, sft = EvalResult.load(root / "pretrain" / "eval.json"), EvalResult.load(root / "sft" / "eval.json")
    assert pre.config["mode"] == "fewshot" and sft.config["mode"] == "chat"
    assert [p.id for p in pre.problems] == [p.id for p in sft.problems] and len(pre.problems) == 3
    assert all(p.k == 2 for p in sft.problems) and pre.model["stage"] == "pretrain"
    assert all(sorted(p.pass_at) == sorted(p.maj_at) == [1, 2] for p in sft.problems)   # pass@k / maj@k per problem
    assert "A = pretrain" in out and "B = sft" in out and "arithmetic" in out

    assert main(["compare", f"{root}:pretrain", f"{root}:sft", "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["tasks"][0]["task"] == "arithmetic" and cmp["tasks"][0]["n_shared"] == 3
    assert "mode: 'fewshot' vs 'chat'" in cmp["config_differences"]
    # a run folder alone means its last evaluated stage
    assert main(["compare", str(root / "pretrain"), str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b"].endswith("sft/eval.json")


def test_a_stage_evaluation_is_not_replaced_by_one_with_other_settings(run, tmp_path, capsys):
    """The stage folder's eval.json is the stage's record (the run report reads it): re-running the same
    evaluation replaces it; another one (other tasks, n, k, temperature...) is kept beside it in the
    next free name (eval-2.json, ...) with a note naming what differs, and the record stays byte for
    byte; --overwrite replaces it, --out names the file; a foreign file there is kept too."""
    import shutil

    src, _, _ = run
    root = tmp_path / "run"
    shutil.copytree(src, root)
    stage, folder = root / "sft" / "final", root / "sft"
    assert main(["eval", "--model", str(stage), *ARGS]) == 0
    assert main(["eval", "--model", str(stage), *ARGS]) == 0                       # the same evaluation: replaced
    assert not (folder / "eval-2.json").exists()
    record = (folder / "eval.json").read_bytes()
    for n, (change, key) in enumerate([(["--n", "2"], "n_problems"), (["--k", "1"], "k"),
                                       (["--tasks", "compare"], "tasks"), (["--temperature", "0"], "temperature")], 2):
        capsys.readouterr()
        assert main(["eval", "--model", str(stage), *ARGS, *change]) == 0
        out = " ".join(capsys.readouterr().out.split())
        differs = out.split("holds another evaluation (")[1].split("): kept")[0]
        assert f"{key} " in differs and f"this one goes to eval-{n}.json" in out, out
        assert (folder / "eval.json").read_bytes() == record
        assert EvalResult.load(folder / f"eval-{n}.json").config[key] != EvalResult.load(folder / "eval.json").config[key]
    assert main(["eval", "--model", str(stage), *ARGS, "--n", "2", "--out", str(tmp_path / "other.json")]) == 0
    assert EvalResult.load(tmp_path / "other.json").config["n_problems"] == 2
    assert main(["eval", "--model", str(stage), *ARGS, "--n", "2", "--overwrite"]) == 0
    assert EvalResult.load(folder / "eval.json").config["n_problems"] == 2
    (root / "pretrain" / "eval.json").write_text("my notes\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(root / "pretrain" / "final"), *ARGS]) == 0
    assert "not a nanoseek eval result" in " ".join(capsys.readouterr().out.split())
    assert (root / "pretrain" / "eval.json").read_text() == "my notes\n"
    assert EvalResult.load(root / "pretrain" / "eval-2.json").config["mode"] == "fewshot"


def test_eval_of_one_checkpoint_with_bits_per_byte(run, tmp_path, capsys):
    root, tok, texts = run
    dtype = token_dtype(tok.vocab_size)
    (tmp_path / "data").mkdir()
    w = SplitWriter(tmp_path / "data", "val", dtype)
    for t in texts[:10]:
        w.add(tok.encode(t, add_bos=True), "val")
    write_manifest(tmp_path / "data", {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                                       "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size,
                                                     "bos_id": tok.bos_id},
                                       "splits": {"val": w.close()}})
    out = tmp_path / "sft-greedy.json"
    code = main(["eval", "--model", str(root / "sft" / "final"), *ARGS, "--temperature", "0", "--out", str(out),
                 "--data", str(tmp_path / "data"), "--bpb-tokens", "256"])
    assert code == 0
    res = EvalResult.load(out)
    assert res.config["k"] == 1 and res.config["mode"] == "chat"        # auto: the folder above is "sft"
    assert res.bpb["bpb"] > 0 and res.bpb["tokens"] > 0
    assert "greedy" in capsys.readouterr().out


def test_eval_errors_are_one_line_user_errors(run, tmp_path, capsys):
    root, _, _ = run
    bare = tmp_path / "mystery"
    save_pretrained(make_tiny_model(vocab_size=300), bare)
    assert main(["eval", "--model", str(bare), *ARGS]) == 2
    assert "--mode fewshot or --mode chat" in capsys.readouterr().err
    assert main(["eval", "--model", str(root), "--stages", "grpo", *ARGS]) == 2
    assert "not in" in capsys.readouterr().err
    assert main(["eval", "--model", str(root), "--out", str(tmp_path / "x.json"), *ARGS]) == 2
    assert "--stages" in capsys.readouterr().err
    assert main(["eval", "--model", str(root / "sft" / "final"), "--tasks", "nosuch", "--n", "2"]) == 2
    assert "valid tasks" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing"), str(root)]) == 2


def test_compare_table_shows_paired_difference_and_verdict(tmp_path, capsys):
    a = synthetic_result({f"p{i}": [i % 4 == 0, False] for i in range(40)})
    b = synthetic_result({f"p{i}": [True, i % 2 == 0] for i in range(40)}, mode="chat-think")
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "B better" in out and "settings differ" in out and "chat-think" in out
    assert "+62.5" in out                    # mean(b) - mean(a) = 0.75 - 0.125


def test_help_names_every_kind_of_task_source():
    import argparse

    from nanoseek.eval import cli
    from nanoseek.tasks.sources import SOURCES

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    tasks_help = " ".join(next(a.help for a in p._actions if a.dest == "tasks").split())
    for text in (tasks_help, " ".join(cli.__doc__.split())):
        assert "arithmetic:1-2" in text                    # built-in tasks with levels
        for prefix in SOURCES:                             # every registered source: rg:NAME(...), humaneval:A-B
            assert f"{prefix}:" in text, (prefix, text)
    assert "rg:NAME(key=value, ...)" in tasks_help and "humaneval:A-B" in tasks_help


def test_eval_with_mtp_speculation_records_its_acceptance_and_changes_no_greedy_answer(run, tmp_path, capsys):
    """``--mtp``: the same greedy completions as plain decoding (speculation is exact at temperature 0),
    and the acceptance of the MTP drafts saved in the result and printed."""
    root, tok, _ = run
    ckpt = tmp_path / "mtp" / "final"
    save_pretrained(make_tiny_model(seed=3, vocab_size=tok.vocab_size, num_nextn_predict_layers=1).eval(), ckpt)
    tok.save(tmp_path / "mtp")
    common = ["eval", "--model", str(ckpt), *ARGS, "--temperature", "0", "--mode", "fewshot"]
    assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    assert main([*common, "--mtp", "--out", str(tmp_path / "spec.json")]) == 0
    assert "MTP self-speculative decoding:" in " ".join(capsys.readouterr().out.split())
    plain, spec = EvalResult.load(tmp_path / "plain.json"), EvalResult.load(tmp_path / "spec.json")
    assert 0.0 <= spec.model["mtp_acceptance"] <= 1.0 and spec.model["mtp_tokens_per_step"] >= 1.0
    assert "mtp_acceptance" not in plain.model
    assert [(p.answers, p.tokens) for p in spec.problems] == [(p.answers, p.tokens) for p in plain.problems]
