"""DeepSeek-V4's compressed-sparse-attention indexers train as V3.2's do (nanoseek/model/v4/compressor.py,
nanoseek/train/dsa.py): the KL over the compressed entries, the dense warm-up and sparse stages.

* the KL each CSA layer leaves in ``indexer_loss`` equals an independent float64 computation from
  the attention's own query, keys and sinks and the indexer's scores, in both stages, on the
  random configs of the parity tests (every layer kind, other rates, top-k, windows, hc_mult);
  the dense stage attends every visible entry, the sparse stage the top-k (ties by position);
* its gradient reaches the indexers and nothing else (the indexer's input is detached), and the
  language-model loss never reaches the indexers;
* no stage is the inference forward, bit for bit (the parity with transformers is
  tests/test_model_v4.py's), and so is the sparse stage's output; the engine decodes the same
  tokens whatever stage the model was left in, and restores it;
* a frozen dense warm-up trains only the indexers and their KL falls; pre-training ``v4-tiny``
  (dense warm-up, then sparse) changes every indexer tensor; a run resumed across the dense ->
  sparse boundary is exact;
* a V4 model without CSA layers refuses the indexer settings in one line.
"""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.model.v4 import attention as v4_attention
from nanoseek.model.v4.config import DeepseekV4Config
from nanoseek.model.v4.transformer import DeepseekV4ForCausalLM
from nanoseek.train.config import load_config
from nanoseek.train.dsa import IndexerTraining, indexed_attention
from nanoseek.train.metrics import events, read_metrics, step_records
from nanoseek.train.pretrain import build_pretraining
from train_helpers import check_resume_across_the_indexer_stages, dsa_config, fit_pretraining as run
from v4_helpers import BASE, CASES, CSA, HCA, SWA, ids_batch, randomise


def v4(case: str, seed: int = 0) -> tuple[DeepseekV4ForCausalLM, int]:
    overrides, T = CASES[case]
    model = DeepseekV4ForCausalLM(DeepseekV4Config.from_dict({**BASE, **overrides}))
    randomise(model, seed)
    return model, T


class Capture:
    """Records, per CSA layer forward, what ``attend`` got and what the compressor returned."""

    def __init__(self, model, monkeypatch):
        self.calls: list[dict] = []
        self.comp: list[tuple] = []
        real = v4_attention.attend

        def spy(q, keys, visible, sinks, scale, return_probs=False):
            self.calls.append(dict(q=q, keys=keys, visible=visible, sinks=sinks, scale=scale))
            return real(q, keys, visible, sinks, scale, return_probs)

        monkeypatch.setattr(v4_attention, "attend", spy)
        self.attn = [b.self_attn for b in model.model.layers]
        for a in self.attn:
            if a.compressor is not None:
                a.compressor.register_forward_hook(lambda m, args, out: self.comp.append((m, out)))


def reference_kl(call: dict, scores: torch.Tensor, keep: torch.Tensor) -> float:
    """KL(p_t || softmax(I_t)) over ``keep``, p_t the attention's probabilities of the compressed
    entries (sink in the softmax, window keys excluded) summed over heads and renormalised; float64,
    mean over the queries keeping at least one entry."""
    q, keys, visible, sinks = (call[k].detach().double() if call[k].is_floating_point() else call[k]
                               for k in ("q", "keys", "visible", "sinks"))
    B, T, H, _ = q.shape
    N = keep.shape[-1]
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not keep[b, t].any():
                continue
            logits = torch.einsum("hd,kd->hk", q[b, t], keys[b]) * call["scale"]
            logits = logits.masked_fill(~visible[b, t][None], -math.inf)
            full = torch.cat([logits, sinks[:, None]], dim=1).softmax(-1)[:, :-1]     # [H, K]
            p = full[:, -N:].sum(0) * keep[b, t]
            p = p / p.sum()
            s = scores[b, t].double().masked_fill(~keep[b, t], -math.inf)
            logq = s - torch.logsumexp(s, 0)
            k = keep[b, t] & (p > 0)
            total += float((p[k] * (p[k].log() - logq[k])).sum())
            count += 1
    return total / count


def reference_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The k visible entries of highest score, equal scores earliest first (a stable sort)."""
    s = scores.masked_fill(~visible, -math.inf)
    order = torch.sort(-s, dim=-1, stable=True).indices[..., :k]
    chosen = torch.zeros_like(visible).scatter(-1, order, True)
    return chosen & visible


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_kl_equals_an_independent_computation(case, stage, monkeypatch):
    model, T = v4(case)
    cap = Capture(model, monkeypatch)
    ids = ids_batch(5, 2, T, model.config.vocab_size)
    model.set_dsa_stage(stage)
    out = model(ids, labels=ids)
    csa = [i for i, a in enumerate(cap.attn) if a.indexer is not None]
    assert csa and len(cap.calls) == len(cap.attn)
    kls = []
    for i, (comp, (entries, attend_mask, train)) in zip(csa, [c for c in cap.comp if c[0].indexer is not None]):
        scores, keep = train
        N = entries.shape[1]
        m = comp.rate
        visible = torch.arange(N) < ((torch.arange(T) + 1) // m)[:, None]                   # w < (p + 1) // m
        chosen = reference_topk(scores.detach(), visible.expand_as(keep), model.config.index_topk)
        want = visible.expand_as(keep) if stage == "dense" else chosen
        assert torch.equal(keep, want) and torch.equal(attend_mask, want), (case, i)
        assert torch.equal(cap.calls[i]["visible"][..., -N:], want)                         # what attention read
        if stage == "sparse":
            assert (want.sum(-1) < visible.sum(-1)).any()                                   # sparsity is active
        got = cap.attn[i].indexer_loss
        assert got.requires_grad and got > 0
        want_kl = reference_kl(cap.calls[i], scores.detach(), keep)
        assert float(got.detach()) == pytest.approx(want_kl, rel=1e-5, abs=1e-9)
        kls.append(got)
    assert torch.allclose(out.indexer_loss, torch.stack(kls).mean())


def test_the_kl_trains_only_the_indexers_and_the_lm_loss_never_does():
    model, T = v4("all_kinds_hc2")
    ids = ids_batch(1, 2, T, model.config.vocab_size)
    indexer = {id(p) for p in model.indexer_parameters()}
    assert indexer and all(".indexer." in n for n, p in model.named_parameters() if id(p) in indexer)
    for stage in ("dense", "sparse"):
        model.zero_grad()
        model.set_dsa_stage(stage)
        out = model(ids, labels=ids)
        out.indexer_loss.backward()
        got = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == indexer, stage                          # every indexer weight, nothing else
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.indexer_parameters()), stage
    model.set_dsa_stage(None)


def test_no_stage_is_the_inference_forward_and_sparse_attends_the_same(monkeypatch):
    for case in sorted(CASES):
        model, T = v4(case, seed=3)
        ids = ids_batch(2, 2, T, model.config.vocab_size)
        fresh = model(ids).logits
        model.set_dsa_stage("sparse")
        sparse = model(ids, labels=ids).logits
        model.set_dsa_stage("dense")
        dense = model(ids, labels=ids).logits
        model.set_dsa_stage(None)
        again = model(ids, labels=ids)
        assert torch.equal(again.logits, fresh) and again.indexer_loss is None, case
        assert all(a.indexer_loss is None for a in indexed_attention(model))
        assert torch.equal(sparse, fresh), case               # the explicit path is the same attention
        assert not torch.allclose(dense, fresh), case         # the dense stage reads every visible entry
    with pytest.raises(ValueError, match="DSA stage"):
        model.set_dsa_stage("warm")


def test_engine_decodes_the_same_tokens_while_a_stage_is_set():
    from nanoseek.infer.engine import Engine, SamplingParams

    overrides, _ = CASES["all_kinds_hc2"]
    cfg = DeepseekV4Config.from_dict({**BASE, **overrides, "eos_token_id": None, "bos_token_id": None})
    model = DeepseekV4ForCausalLM(cfg).eval()
    randomise(model, 4)
    engine = Engine(model, max_batch_size=2, max_seq_len=96)
    prompt = [int(t) for t in ids_batch(7, 1, 30, cfg.vocab_size)[0]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    want = engine.generate([prompt], params)[0][0].token_ids
    attn = indexed_attention(model)
    assert len(attn) == 2
    for stage in ("dense", "sparse"):
        model.set_dsa_stage(stage)
        assert engine.generate([prompt], params)[0][0].token_ids == want, stage
        assert {a.dsa_stage for a in attn} == {stage}                          # restored
        assert all(a.indexer_loss is None for a in attn)                       # no KL was computed


# ---------------------------------------------------------------------------- in the trainer
MODEL = dict(preset="v4-tiny", vocab_size=128, index_topk=2, num_nextn_predict_layers=0)


def make_cfg(tmp_path, name="run", model=None, **sections):
    return dsa_config(tmp_path, model or MODEL, 32, name, **sections)


def test_frozen_dense_warmup_trains_only_the_indexers_and_their_kl_falls(tmp_path):
    cfg = make_cfg(tmp_path, model={**MODEL, "initializer_range": 0.2},
                   optim={"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "grad_accum": 1},
                   train={"max_steps": 12, "dsa_warmup_steps": 12, "eval_every": 0, "save_every": 0})
    model, _, _ = build_pretraining(cfg)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 32))
    model.set_dsa_stage("dense")
    with torch.no_grad():
        before = float(model(ids, labels=ids).indexer_loss)
    model.set_dsa_stage(None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, res = run(cfg)
    assert res.status == "done"
    m = trainer.model
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, start[n])}
    names = {n for n, _ in m.named_parameters() if ".indexer." in n}
    assert changed == names                                   # every indexer tensor, nothing else
    m.set_dsa_stage("dense")
    with torch.no_grad():
        after = float(m(ids, labels=ids).indexer_loss)
    m.set_dsa_stage(None)
    assert after < 0.7 * before, (before, after)            # measured: 0.377 -> 0.227
    kl = [r["indexer_loss"] for r in step_records(read_metrics(tmp_path / "run")).values()]
    assert len(kl) == 12 and all(math.isfinite(v) and v > 0 for v in kl)


def test_resume_across_the_dense_to_sparse_boundary_is_exact(tmp_path):
    check_resume_across_the_indexer_stages(tmp_path, make_cfg, train={"dsa_warmup_freeze": False})


def test_v4_tiny_pretraining_trains_every_csa_indexer(tmp_path, capsys):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    assert load_config("v4-tiny").train.dsa_warmup_steps > 0            # the recipe warms up (unfrozen)
    assert main(["pretrain", "--config", "v4-tiny", "--out-dir", str(run_dir), "--set", "train.max_steps=2",
                 "--set", "train.save_every=1", "--set", "data.val_batches=0", "--set", "optim.grad_accum=1",
                 "--set", "train.dsa_warmup_steps=1", "--no-progress", "--quiet"]) == 0
    a = load_file(run_dir / "checkpoints" / "step-000001" / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "step-000002" / "model.safetensors")
    indexer = [k for k in a if ".indexer." in k]
    assert len({k.split(".indexer.")[0] for k in indexer}) == 2       # v4-tiny's two CSA layers
    assert all(not torch.equal(a[k], b[k]) for k in indexer), [k for k in indexer if torch.equal(a[k], b[k])]
    recs = read_metrics(run_dir)
    steps = step_records(recs)
    assert all(steps[s]["indexer_loss"] > 0 for s in (1, 2))
    assert [(e["step"], e["stage"]) for e in events(recs, "dsa_stage")] == [(1, "dense"), (2, "sparse")]


def test_indexer_settings_on_a_v4_model_without_csa_layers_are_refused_in_one_line(tmp_path, capsys):
    no_csa = {**MODEL, "layer_types": [SWA, HCA, HCA, SWA]}
    with pytest.raises(ConfigError, match="dsa_warmup_steps = 3 would have no effect: the model has no lightning"):
        build_pretraining(make_cfg(tmp_path, model=no_csa))
    assert main(["pretrain", "--config", "v4-tiny", "--out-dir", str(tmp_path / "x"), "--set",
                 f"model.layer_types={[SWA, HCA, HCA, SWA]}".replace("'", '"'), "--set", "train.dsa_warmup_steps=5",
                 "--no-progress", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dsa_warmup_steps = 5, dsa_warmup_freeze = false would have no effect" in err
    model, _, _ = build_pretraining(make_cfg(tmp_path, "ok", model=no_csa, train={"dsa_warmup_steps": 0}))
    assert not indexed_attention(model) and IndexerTraining(model).stage(0) is None
    assert CSA not in model.config.layer_types


@pytest.mark.slow
def test_trained_csa_indexers_pick_the_blocks_dense_attention_reads(tmp_path):
    """v4-tiny with a 4-token window and top-2 CSA, trained dense for 300 steps on the prose shards
    (the indexers following by KL, unfrozen warm-up throughout; about 3 min on one core). Sparse
    attention over the trained indexers' choice loses far less to dense than over fresh indexers'
    (measured: dense 2.6220, trained 2.6265, fresh 2.6339; KL 0.057 -> 0.017)."""
    import json

    from nanoseek.data.corpus import plain_text_documents
    from nanoseek.data.prepare import PrepareConfig, prepare_inputs
    from nanoseek.model.registry import from_pretrained

    torch.set_num_threads(1)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in plain_text_documents()), encoding="utf-8")
    prepare_inputs([src], tmp_path / "data", None, PrepareConfig(vocab_size=300, val_fraction=0.1))
    sets = ["data.source=packed", f"data.dir={tmp_path / 'data'}", "data.val_batches=8", "model.index_topk=2",
            "model.sliding_window=4", "train.max_steps=300", "train.dsa_warmup_steps=300", "train.eval_every=300",
            "train.save_every=300"]
    run_dir = tmp_path / "dense"
    assert main(["pretrain", "--config", "v4-tiny", "--out-dir", str(run_dir), "--no-progress", "--quiet",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    kl = [r["indexer_loss"] for r in step_records(read_metrics(run_dir)).values()]
    _, task, _ = build_pretraining(load_config("v4-tiny", sets))
    model = from_pretrained(run_dir / "final").eval()

    def val(stage=None):
        model.set_dsa_stage(stage)
        with torch.no_grad():
            v = task.evaluate(model)["val_loss"]
        model.set_dsa_stage(None)
        return v

    dense, trained = val("dense"), val()
    torch.manual_seed(0)
    fresh = DeepseekV4ForCausalLM(model.config)
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
            if ".indexer." in n:
                p.copy_(q)
    untrained = val()
    print(f"dense {dense:.4f}, sparse over trained indexers {trained:.4f}, over fresh ones {untrained:.4f}; "
          f"KL steps 1-5 {sum(kl[:5]) / 5:.4f}, 296-300 {sum(kl[-5:]) / 5:.4f}")
    assert sum(kl[-5:]) < 0.5 * sum(kl[:5])
    assert untrained - dense > 0.005 and trained - dense < 0.6 * (untrained - dense)
