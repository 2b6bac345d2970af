"""DeepSeek-V3.2's indexer training in the shared trainer (nanoseek/train/dsa.py), and V3.2 models
used end to end.

* the dense warm-up trains only the indexers (every other weight, the expert biases and their AdamW
  state untouched), sparse training trains everything, the KL is logged as ``indexer_loss``;
* a run stopped before the boundary and killed after it resumes to the same losses and weights;
* the KL of a micro-batch is collected from any forward (with or without labels, MTP's too), never
  from a forward without gradient, and the model has no stage outside a step;
* the settings' refusals (one line naming the key), a V3 model unchanged;
* SFT and GRPO of a V3.2 checkpoint train its indexers; the engine samples with no stage whatever the
  model was left in, and restores it;
* `nanoseek generate`, `nanoseek chat`, the OpenAI server and `nanoseek eval` on a V3.2 checkpoint;
  the shipped ``v32-tiny`` recipe (slow: its whole run, with the measured figures).

Models are the trainer tests' hidden-32 DeepSeek-V3 with a 4-head indexer keeping the top 4 keys,
trained on 16-token sequences, so sparsity is active for most queries.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.model.config import load_model_config
from nanoseek.train.config import TrainSection, config_from_dict, load_config
from nanoseek.train.dsa import IndexerTraining, indexed_attention
from nanoseek.train.loop import Hook
from nanoseek.train.metrics import events, read_metrics, step_records
from nanoseek.train.pretrain import build_pretraining

from conftest import make_tiny_model, reference_greedy
from train_helpers import check_resume_across_the_indexer_stages, dsa_config, fit_pretraining as run

INDEXER = dict(index_n_heads=4, index_head_dim=8, index_topk=4)
MODEL = dict(preset="tiny", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=128, **INDEXER)


def make_cfg(tmp_path, name="run", model=None, **sections):
    return dsa_config(tmp_path, model or MODEL, 16, name, **sections)


def indexer_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".indexer." in n}


class Snapshots(Hook):
    """After each step: the step's stage, every parameter, the expert biases, the stages left on the model."""

    def __init__(self):
        self.rows: list[dict] = []

    def after_step(self, trainer, applied):
        m = trainer.model
        self.rows.append({"stage": trainer.dsa_stage, "bias": m.expert_bias().clone(),
                          "params": {n: p.detach().clone() for n, p in m.named_parameters()},
                          "left": {a.dsa_stage for a in indexed_attention(m)},
                          "adam": {n for n, p in m.named_parameters() if p in trainer.optimizer.state}})


# ---------------------------------------------------------------------------- the two stages
def test_dense_warmup_trains_only_the_indexers_then_sparse_training_trains_everything(tmp_path):
    cfg = make_cfg(tmp_path)
    model, _, _ = build_pretraining(cfg)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    snaps = Snapshots()
    trainer, res = run(cfg, hooks=[snaps])
    assert res.status == "done"
    names = indexer_names(trainer.model)
    layers = cfg.model.build_config().num_hidden_layers + 1            # MTP's block has an indexer too
    assert len({n.split(".indexer.")[0] for n in names}) == layers
    assert [r["stage"] for r in snaps.rows] == ["dense"] * 3 + ["sparse"] * 3
    before, bias0, bias_moved = start, torch.zeros_like(snaps.rows[0]["bias"]), []
    for i, row in enumerate(snaps.rows):
        changed = {n for n, p in row["params"].items() if not torch.equal(p, before[n])}
        wk = {n for n in names if n.endswith("indexer.wk.weight")}
        assert wk <= changed, i                                          # every indexer learns, MTP's too
        if row["stage"] == "dense":
            assert changed <= names, sorted(changed - names)[:5]          # nothing else moves...
            assert torch.equal(row["bias"], bias0)                        # ...not even the expert biases
            assert row["adam"] <= names                                   # no AdamW state for the frozen weights
        else:
            assert {"lm_head.weight", "model.embed_tokens.weight"} <= changed and len(changed - names) > 20
            bias_moved.append(not torch.equal(row["bias"], bias0))
        assert row["left"] == {None}                                      # no stage outside a step
        before, bias0 = row["params"], row["bias"]
    assert any(bias_moved)                                                # the balancing resumes
    recs = read_metrics(tmp_path / "run")
    steps = step_records(recs)
    kl = [steps[s]["indexer_loss"] for s in range(1, 7)]
    assert all(math.isfinite(v) and v > 0 for v in kl), kl
    # the logged loss is the task's (CE + MTP + balance), in both stages; the spike guard watches it
    for s in (1, 6):
        r = steps[s]
        assert r["loss"] == pytest.approx(r["ce"] + 0.3 * r["mtp_loss"] + r["aux_loss"], rel=1e-5)
    assert [(e["step"], e["stage"]) for e in events(recs, "dsa_stage")] == [(1, "dense"), (4, "sparse")]


def test_a_v3_checkpoint_becomes_v32_by_the_dense_warmup_alone(tmp_path):
    """The paper's path from V3.1 to V3.2: init_from a dense checkpoint, indexers added fresh, the dense
    warm-up trains them and nothing else; the result is a V3.2 checkpoint with the V3 model's weights."""
    from nanoseek.model.checkpoint import from_pretrained, save_pretrained

    v3 = {k: v for k, v in MODEL.items() if k not in INDEXER}
    cfg = make_cfg(tmp_path, "v3", model=v3, train={"max_steps": 1, "dsa_warmup_steps": 0})
    dense, _, _ = build_pretraining(cfg)
    save_pretrained(dense, tmp_path / "v3ckpt")
    up = make_cfg(tmp_path, "up", model={"init_from": str(tmp_path / "v3ckpt"), **INDEXER},
                  train={"max_steps": 3, "dsa_warmup_steps": 3, "save_every": 0})
    _, res = run(up)
    assert res.status == "done"
    final = from_pretrained(res.final_dir)
    assert json.loads((res.final_dir / "config.json").read_text())["model_type"] == "deepseek_v32"
    old = dense.state_dict()
    for k, v in final.state_dict().items():
        if ".indexer." not in k:
            assert torch.equal(v, old[k]), k
    assert all(r["indexer_loss"] > 0 for r in step_records(read_metrics(tmp_path / "up")).values())
    other = make_cfg(tmp_path, "bad", model={"init_from": str(tmp_path / "v3ckpt"), **INDEXER, "hidden_size": 48})
    with pytest.raises(Exception, match="do not fit this model"):
        build_pretraining(other)


def test_resume_across_the_warmup_boundary_is_exact(tmp_path):
    check_resume_across_the_indexer_stages(tmp_path, make_cfg)


def test_zero_weight_freezes_the_indexers_and_a_v3_model_is_unchanged(tmp_path):
    snaps = Snapshots()
    trainer, _ = run(make_cfg(tmp_path, "frozen", train={"max_steps": 2, "dsa_warmup_steps": 0,
                                                          "indexer_loss_weight": 0.0}), hooks=[snaps])
    names = indexer_names(trainer.model)
    first, last = snaps.rows[0]["params"], snaps.rows[-1]["params"]
    assert names and all(torch.equal(first[n], last[n]) for n in names)
    assert not torch.equal(first["lm_head.weight"], last["lm_head.weight"])
    recs = read_metrics(tmp_path / "frozen")
    assert all("indexer_loss" not in r for r in step_records(recs).values()) and not events(recs, "dsa_stage")
    v3 = {k: v for k, v in MODEL.items() if k not in INDEXER}
    run(make_cfg(tmp_path, "v3", model=v3, train={"max_steps": 1, "dsa_warmup_steps": 0}))
    recs = read_metrics(tmp_path / "v3")
    assert "indexer_loss" not in step_records(recs)[1] and not events(recs, "dsa_stage")


def test_unfrozen_warmup_is_dense_pretraining_of_everything(tmp_path):
    """``dsa_warmup_freeze = false`` (a run from scratch): the warm-up trains the model too, with dense
    attention and the indexers' KL over every key; the expert biases move from the first step."""
    snaps = Snapshots()
    trainer, _ = run(make_cfg(tmp_path, "unfrozen", train={"max_steps": 3, "dsa_warmup_steps": 2,
                                                          "dsa_warmup_freeze": False}), hooks=[snaps])
    names = indexer_names(trainer.model)
    assert [r["stage"] for r in snaps.rows] == ["dense", "dense", "sparse"]
    first = snaps.rows[0]
    assert first["adam"] > names and not torch.equal(first["bias"], torch.zeros_like(first["bias"]))
    steps = step_records(read_metrics(tmp_path / "unfrozen"))
    assert all(steps[s]["indexer_loss"] > 0 for s in (1, 2, 3))


def test_settings_are_checked_with_one_line_naming_the_key(tmp_path, capsys):
    v3 = {k: v for k, v in MODEL.items() if k not in INDEXER}
    for train, model, words in [
        ({"dsa_warmup_steps": -1}, MODEL, "dsa_warmup_steps = -1: must be >= 0"),
        ({"indexer_loss_weight": -0.5}, MODEL, "indexer_loss_weight = -0.5: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            make_cfg(tmp_path, train=train, model=model)
    for train, model, words in [
        ({"dsa_warmup_steps": 3}, v3, "dsa_warmup_steps = 3 would have no effect: the model has no lightning indexer"),
        ({"dsa_warmup_steps": 0, "indexer_loss_weight": 0.5}, v3, "indexer_loss_weight = 0.5 would have no effect"),
        ({"dsa_warmup_steps": 3, "indexer_loss_weight": 0.0}, MODEL, "indexer_loss_weight = 0 freezes"),
        ({"dsa_warmup_steps": 0, "dsa_warmup_freeze": False}, MODEL, "dsa_warmup_freeze = false would have no effect"),
        ({"dsa_warmup_steps": 2, "dsa_warmup_freeze": False}, v3,
         r"dsa_warmup_steps = 2, dsa_warmup_freeze = false would have no effect.*\(--set train.dsa_warmup_steps=null "
         r"--set train.dsa_warmup_freeze=null\)"),
    ]:
        with pytest.raises(ConfigError, match=words):
            build_pretraining(make_cfg(tmp_path, train=train, model=model))
    # the trainer itself checks (post-training stages build their models elsewhere)
    with pytest.raises(ConfigError, match=r"\[train\] dsa_warmup_steps = 2 would have no effect"):
        IndexerTraining(make_tiny_model(), 2)
    out = tmp_path / "cli"
    assert main(["pretrain", "--config", "tiny", "--out-dir", str(out), "--set", "train.dsa_warmup_steps=5",
                 "--no-progress", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dsa_warmup_steps = 5 would have no effect" in err
    assert not (out / "config.toml").exists()


# ---------------------------------------------------------------------------- the KL of a micro-batch
def test_kl_is_collected_from_every_forward_with_gradient_and_the_stage_never_leaks():
    torch.manual_seed(0)
    model = make_tiny_model(**INDEXER, vocab_size=128)
    dsa = IndexerTraining(model)
    ids = torch.randint(0, 128, (2, 16))
    attn = indexed_attention(model)
    L = model.config.num_hidden_layers
    assert len(attn) == L + 1 and dsa.stage(0) == "sparse"
    with dsa.step(model, "sparse"):
        assert {a.dsa_stage for a in attn} == {"sparse"}
        out = model(ids, labels=ids)                           # labels: MTP runs, its KL counts too
        kl = dsa.take()
        assert kl.requires_grad and torch.allclose(kl, out.indexer_loss, rtol=1e-6, atol=0)
        model(ids)                                             # no labels (DPO, GRPO): the main layers
        manual = torch.stack([a.indexer_loss for a in attn[:L]]).mean()
        model(ids[:1])                                         # a second forward of the same micro-batch
        second = torch.stack([a.indexer_loss for a in attn[:L]]).mean()
        assert torch.allclose(dsa.take(), (manual + second) / 2, rtol=1e-6, atol=0)
        with torch.no_grad():
            model(ids)
        assert dsa.take() is None                              # a forward without gradient trains nothing
    assert {a.dsa_stage for a in attn} == {None} and all(not a._forward_hooks for a in attn)
    with pytest.raises(KeyError), dsa.step(model, "dense"):
        raise KeyError("a failing step")
    assert {a.dsa_stage for a in attn} == {None} and all(not a._forward_hooks for a in attn)
    with pytest.raises(RuntimeError, match="computed no indexer loss"):
        dsa.objective(torch.tensor(1.0), None, "dense", 1.0)
    loss, kl = torch.tensor(2.0), torch.tensor(0.5)
    assert float(dsa.objective(loss, kl, "sparse", 0.5)) == 2.25 and float(dsa.objective(loss, kl, "dense", 0.5)) == 0.25
    assert dsa.objective(loss, kl, None, 0.5) is loss
    assert IndexerTraining(model, 2).stage(1) == "dense" and IndexerTraining(model, 2).stage(2) == "sparse"
    assert IndexerTraining(make_tiny_model()).stage(0) is None


def test_engine_samples_without_a_stage_and_restores_it():
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from post_helpers import tiny_tokenizer

    tk = tiny_tokenizer()
    model = make_tiny_model(seed=1, vocab_size=tk.vocab_size, **INDEXER).eval()
    prompt = tk.encode("Reply with the digit 7. Answer:")
    want = reference_greedy(model, prompt, 10)
    model.set_dsa_stage("dense")
    assert reference_greedy(model, prompt, 10) != want       # dense attention would answer otherwise
    engine = Engine(model, tk, max_batch_size=2, max_seq_len=64)
    for stage in ("dense", "sparse"):
        model.set_dsa_stage(stage)
        got = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
        assert got[0][0].token_ids == want, stage
        assert {a.dsa_stage for a in indexed_attention(model)} == {stage}     # restored
        assert all(a.indexer_loss is None for a in indexed_attention(model))   # no KL was computed


# ---------------------------------------------------------------------------- post-training a V3.2 model
def test_sft_and_grpo_train_the_indexers_of_a_v32_checkpoint(tmp_path):
    from nanoseek.model.checkpoint import from_pretrained, save_pretrained
    from nanoseek.post.datasets import SFTExample, load_rl_prompts
    from nanoseek.post.grpo import train_grpo
    from nanoseek.post.registry import stage_config_from_dict
    from nanoseek.post.sft import train_sft
    from post_helpers import tiny_model, tiny_tokenizer

    tk = tiny_tokenizer()
    base = tiny_model(tk.vocab_size, index_n_heads=4, index_head_dim=8, index_topk=4)
    save_pretrained(base, tmp_path / "base")
    tk.save(tmp_path / "base")
    prompts = load_rl_prompts("digit7", 4, seed=0)
    warm = [SFTExample(messages=[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": str(d)}])
            for p in prompts for d in range(4)]
    sft = stage_config_from_dict("sft", {
        "model": {"init_from": str(tmp_path / "base")}, "sft": {"mode": "pad"},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 8,
                  "seq_len": 64},
        "train": {"max_steps": 3, "out_dir": str(tmp_path / "sft"), "device": "cpu", "seed": 0}})
    res = train_sft(sft, examples=warm, quiet=True)
    assert res.status == "done" and len(res.history) == 3
    assert all(h["indexer_loss"] > 0 for h in res.history)
    grpo = stage_config_from_dict("grpo", {
        "model": {"init_from": str(tmp_path / "sft")},
        "grpo": {"prompts": "digit7", "num_prompts": 4, "template": "chat", "prompts_per_step": 2, "group_size": 4,
                 "max_new_tokens": 8, "micro_batch_size": 4, "beta": 0.04},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "seq_len": 64},
        "train": {"max_steps": 2, "out_dir": str(tmp_path / "grpo"), "device": "cpu", "seed": 0}})
    res = train_grpo(grpo, quiet=True)
    assert res.status == "done" and all(h["indexer_loss"] > 0 and math.isfinite(h["kl"]) for h in res.history)
    samples = (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()
    assert samples and all(json.loads(s)["completion"] is not None for s in samples)   # the real engine sampled
    models = {name: from_pretrained(tmp_path / name / "final" if name != "base" else tmp_path / name)
              for name in ("base", "sft", "grpo")}
    assert json.loads((tmp_path / "grpo" / "final" / "config.json").read_text())["model_type"] == "deepseek_v32"
    for a, b in (("base", "sft"), ("sft", "grpo")):
        pa, pb = dict(models[a].named_parameters()), dict(models[b].named_parameters())
        moved = [n for n in indexer_names(models[a]) if not torch.equal(pa[n], pb[n])]
        assert any(n.endswith("indexer.wk.weight") for n in moved), (a, b)


# ---------------------------------------------------------------------------- using a V3.2 checkpoint
@pytest.fixture(scope="module")
def v32_run(tmp_path_factory):
    """A run folder whose final/ holds a random ``v32-tiny`` model (vocabulary of the test tokenizer)."""
    from nanoseek.model.checkpoint import save_pretrained
    from serve_helpers import make_test_tokenizer

    tk = make_test_tokenizer()
    cfg = load_model_config("v32-tiny").replace(vocab_size=tk.vocab_size, max_position_embeddings=256)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    run_dir = tmp_path_factory.mktemp("v32") / "run"
    final = save_pretrained(model, run_dir / "final")
    tk.save(final)
    return run_dir, model, tk


def test_v32_tiny_preset_and_recipe_have_sparsity_active():
    cfg = load_config("v32-tiny")
    model = cfg.model.build_config()
    assert model.index_n_heads > 0 and model.index_topk * 2 <= cfg.optim.seq_len
    assert 0 < cfg.train.dsa_warmup_steps < cfg.train.max_steps
    assert model.to_dict()["model_type"] == "deepseek_v32"


def test_generate_chat_serve_and_eval_a_v32_checkpoint(v32_run, tmp_path, capsys, monkeypatch):
    import io

    from openai import OpenAI

    from nanoseek.cli import build_parser
    from nanoseek.serve.cli import build_server
    from serve_helpers import background_server

    run_dir, model, tk = v32_run
    prompt = "Hello world! How are you today? I am fine, thank you."
    ids = tk.encode(prompt, add_bos=True)
    assert len(ids) > load_model_config("v32-tiny").index_topk          # the prompt alone is past top-k
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--token-ids", "--output", str(out)]) == 0
    got = json.loads(out.read_text().splitlines()[0])["completions"][0]
    assert got["token_ids"] and got["token_ids"] == reference_greedy(model, ids, 12)[:len(got["token_ids"])]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2?\n"))
    assert main(["chat", "--model", str(run_dir), "--max-new-tokens", "4", "--seed", "0"]) == 0
    capsys.readouterr()
    args = build_parser().parse_args(["serve", "--model", str(run_dir), "--port", "0", "--max-batch-size", "4"])
    app, engine = build_server(args)
    try:
        with background_server(app) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.completions.create(model="run", prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == got["text"] and r.usage.completion_tokens == got["tokens"]
            chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0.8, seed=1)
            assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    finally:
        engine.shutdown()
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run_dir), "--tasks", "arithmetic", "--n", "2", "--max-new-tokens", "8",
                 "--mode", "fewshot", "--out", str(res)]) == 0
    assert json.loads(res.read_text())


# the documented switch: the speedrun with a V3.2 model (its default recipe stays DeepSeek-V3); as in
# v32-tiny, from scratch the warm-up trains everything (a frozen one would match random attention)
SPEEDRUN_V32 = ["model.index_n_heads=4", "model.index_head_dim=32", "model.index_topk=64",
                "pretrain.train.dsa_warmup_steps=500", "pretrain.train.dsa_warmup_freeze=false"]


def test_speedrun_switch_to_a_v32_model_resolves(tmp_path):
    from nanoseek import speedrun as sp
    from nanoseek.speedrun_recipe import load_recipe

    rc = load_recipe("speedrun", SPEEDRUN_V32)          # every stage's config is checked here
    cfg = sp._pretrain_config(tmp_path, rc, 15.0, 0)
    model = cfg.model.build_config()
    assert model.index_n_heads == 4 and model.index_topk * 4 == cfg.optim.seq_len
    assert cfg.train.dsa_warmup_steps == 500 and not cfg.train.dsa_warmup_freeze
    default = sp._pretrain_config(tmp_path, load_recipe("speedrun", []), 15.0, 0)
    assert default.model.build_config().index_n_heads == 0 and default.train.dsa_warmup_steps == 0


@pytest.mark.slow
def test_v32_tiny_recipe_and_the_upgrade_of_a_v3_run_train_and_serve(tmp_path):
    """On prepared text shards: the shipped recipe from scratch (`nanoseek pretrain --config v32-tiny`),
    the same model without indexers, and the paper's path from that dense run to V3.2 (a frozen
    dense warm-up of fresh indexers, then sparse training); the V3.2 model generates."""
    from nanoseek.data.corpus import plain_text_documents
    from nanoseek.data.prepare import PrepareConfig, prepare_inputs

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in plain_text_documents()), encoding="utf-8")
    prepare_inputs([src], tmp_path / "data", None, PrepareConfig(vocab_size=300, val_fraction=0.1))
    data = ["--set", "data.source=packed", "--set", f"data.dir={tmp_path / 'data'}", "--no-progress", "--quiet"]
    no_dsa = ["--set", "train.dsa_warmup_steps=null", "--set", "train.dsa_warmup_freeze=null"]
    indexer = [f"--set=model.{k}={v}" for k, v in load_model_config("v32-tiny").to_dict().items() if k.startswith("index_")]
    runs = {"v32": [], "v3": ["--set", "model.preset=tiny", *no_dsa],
            "up": ["--set", f"model.init_from={tmp_path / 'v3'}", *indexer, "--set", "train.max_steps=100",
                   "--set", "train.dsa_warmup_steps=50", "--set", "train.dsa_warmup_freeze=true",
                   "--set", "train.save_every=50"]}
    for name, extra in runs.items():
        assert main(["pretrain", "--config", "v32-tiny", "--out-dir", str(tmp_path / name), *data, *extra]) == 0, name
    mean = lambda xs: sum(xs) / len(xs)                              # noqa: E731
    # the upgraded model before its warm-up: sparse attention over the fresh indexers' choice
    up_cfg = load_config("v32-tiny", [a.removeprefix("--set=") for a in runs["up"] if a != "--set"]
                         + ["data.source=packed", f"data.dir={tmp_path / 'data'}"])
    fresh, task, _ = build_pretraining(up_cfg)
    with torch.no_grad():
        val_fresh = task.evaluate(fresh.eval())["val_loss"]
    got = {}
    for name in runs:
        recs = read_metrics(tmp_path / name)
        steps = step_records(recs)
        got[name] = {"ce": [steps[s]["ce"] for s in sorted(steps)],
                     "kl": [steps[s].get("indexer_loss") for s in sorted(steps)],
                     "val": {e["step"]: e["val_loss"] for e in events(recs, "eval")}}
    v32, v3, up = got["v32"], got["v3"], got["up"]
    print(f"from scratch: CE {mean(v32['ce'][:5]):.3f} -> {mean(v32['ce'][-5:]):.3f}, val {v32['val'][300]:.4f} "
          f"(no indexers: {v3['val'][300]:.4f}), KL last 5 {mean(v32['kl'][-5:]):.4f}")
    print(f"upgrade: KL steps 1-5 {mean(up['kl'][:5]):.4f}, 46-50 {mean(up['kl'][45:50]):.4f}, 96-100 "
          f"{mean(up['kl'][-5:]):.4f}; CE 1-5 {mean(up['ce'][:5]):.3f}, 46-50 {mean(up['ce'][45:50]):.3f}; "
          f"val (sparse) fresh indexers {val_fresh:.4f}, step 50 {up['val'][50]:.4f}, 100 {up['val'][100]:.4f}")
    assert mean(v32["ce"][-5:]) < mean(v32["ce"][:5]) - 2 and v32["val"][300] < v32["val"][50]
    assert abs(v32["val"][300] - v3["val"][300]) < 0.1                # top-16 of 64 keys: about as good as dense
    assert all(math.isfinite(k) and k >= 0 for k in v32["kl"]) and all(k is None for k in v3["kl"])
    assert mean(up["kl"][45:50]) < 0.3 * mean(up["kl"][:5])          # the warm-up teaches the fresh indexers
    assert abs(up["val"][50] - v3["val"][300]) < 0.02                # sparse over their choice ~ the dense model
    assert val_fresh > up["val"][50] + 0.02                          # ...which it was not before the warm-up
    old, warm = (from_pretrained_dir(tmp_path / d) for d in ("v3/final", "up/checkpoints/step-000050"))
    assert all(torch.equal(v, old[k]) for k, v in warm.items() if ".indexer." not in k)   # nothing else moved
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tmp_path / "v32"), "--prompt", "The", "--max-new-tokens", "20",
                 "--temperature", "0", "--output", str(out)]) == 0
    print("generated:", json.loads(out.read_text().splitlines()[0])["completions"][0]["text"])


def from_pretrained_dir(path):
    from nanoseek.model.checkpoint import from_pretrained

    return from_pretrained(path).state_dict()


def test_memory_check_counts_the_explicit_attention_of_indexer_training(monkeypatch):
    """While V3.2's indexers train, each layer materialises [heads x seq_len] fp32 attention per
    query (for the KL): a batch that fits with flash-style attention must be refused up front when
    it does not fit with the explicit one, and accepted once the indexers are frozen."""
    from nanoseek import limits
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import config_from_dict

    # 1.5 GiB: the frozen case keeps ~1.1 GB (nanoseek's own modules, as measured), the training one ~4 GB
    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": 3 << 29)
    raw = {"model": {"preset": "v32-tiny"}, "data": {"source": "synthetic"},
           "optim": {"seq_len": 1024, "micro_batch_size": 32}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="micro_batch_size x seq_len"):
        config_from_dict(raw)
    config_from_dict({**raw, "train": {"max_steps": 1, "indexer_loss_weight": 0.0}})      # frozen: flash-style sparse attention
