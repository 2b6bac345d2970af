"""Serving from redundant experts (nanoseek/model/expert_replicas.py) on gloo: an EPLB placement
applied to an expert-parallel model gives the single-device model's logits and per-expert loads,
and a replicated expert's tokens really are spread over its replicas on different ranks."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist

from conftest import make_tiny_model
from test_distributed import spawn


def _worker(rank: int, out, world: int) -> None:
    from nanoseek.model.expert_replicas import ReplicatedExperts, apply_redundant_experts
    from nanoseek.train.eplb import rebalance

    dist.init_process_group("gloo")
    model = make_tiny_model(seed=0, n_routed_experts=8, n_group=4, topk_group=2, num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank:2 * rank + 2]
    with torch.no_grad():
        model.train()                                      # MoE layers count their load in training mode
        ref = model(mine).logits
        ref_load = torch.stack([m.load.clone() for m in model.moe_layers()])
        for m in model.moe_layers():
            m.load.zero_()
    total = ref_load.clone()
    dist.all_reduce(total)                                 # the measured load of all ranks' tokens
    placement = rebalance(total, 8 + 2 * world, 4, 1, world, "global")      # 2 spare slots per rank
    mods = apply_redundant_experts(model, dist.group.WORLD, *placement)
    assert all(isinstance(m, ReplicatedExperts) for m in mods)
    assert mods[0].gate_up_proj.shape[0] == (8 + 2 * world) // world
    seen = []                                   # rows each local slot of layer 0 computes
    mlp = mods[0].expert_mlp
    mods[0].expert_mlp = lambda x, counts: (seen.append(counts.clone()), mlp(x, counts))[1]
    with torch.no_grad():
        got = model(mine).logits
        load = torch.stack([m.load.clone() for m in model.moe_layers()])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(load, ref_load)
    # every rank's slot counts of layer 0 -> rows per physical slot; expert e's replicas share its load
    m = mods[0]
    parts = [torch.empty_like(seen[0]) for _ in range(world)]
    dist.all_gather(parts, seen[0])
    per_slot = torch.cat(parts)                                                 # [slots]
    for e in range(8):
        reps = m.log2phy[e, :int(m.logcnt[e])]
        assert int(per_slot[reps].sum()) == int(total[0, e])
    hot = int(total[0].argmax())
    reps = m.log2phy[hot, :int(m.logcnt[hot])]                                  # the hottest expert
    # a forward that needs gradients is refused
    refused = False
    try:
        m(torch.randn(3, model.config.hidden_size, requires_grad=True), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long))
    except RuntimeError as e:
        refused = "inference only" in str(e)
    (out / f"r{rank}.json").write_text(json.dumps({"replicas": reps.tolist(), "rows": per_slot[reps].tolist(),
                                                   "ranks": sorted({s // m.n_local for s in reps.tolist()}),
                                                   "refused": refused}))


@pytest.mark.parametrize("world", [2, 4])
def test_redundant_experts_match_one_device(tmp_path, world):
    spawn(_worker, tmp_path, world, world=world)
    for r in range(world):
        rec = json.loads((tmp_path / f"r{r}.json").read_text())
        assert len(rec["replicas"]) >= 2 and all(n > 0 for n in rec["rows"])     # every replica serves
        assert len(rec["ranks"]) >= 2 and rec["refused"]


def test_a_placement_that_does_not_fit_is_refused():
    from nanoseek.model.expert_replicas import _check_layer
    phy2log = torch.tensor([0, 1, 2, 3, 0, 0])
    logcnt = torch.tensor([3, 1, 1, 1])
    log2phy = torch.tensor([[0, 4, 5], [1, -1, -1], [2, -1, -1], [3, -1, -1]])
    _check_layer(phy2log, log2phy, logcnt, 4, 2)
    for args, why in [((phy2log, log2phy, logcnt, 4, 4), "do not split evenly over 4"),
                      ((phy2log, log2phy, torch.tensor([2, 1, 1, 1]), 4, 2), "logcnt is not the replica count"),
                      ((phy2log, log2phy[:, :2], logcnt, 4, 2), "holds 2 replicas per expert"),
                      ((phy2log, torch.tensor([[0, 4, 1], [1, -1, -1], [2, -1, -1], [3, -1, -1]]), logcnt, 4, 2),
                       "log2phy[0] does not list"),
                      ((torch.tensor([0, 1, 2, 9, 0, 0]), log2phy, logcnt, 4, 2), "outside 0..3")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            _check_layer(*args)
