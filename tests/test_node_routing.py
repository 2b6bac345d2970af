"""Node-limited routing (DeepSeek-V3 2.1.2) against a per-token reference, group-limited routing
and transformers' router; refusals; and the span of routed experts in a real expert-parallel run.

The reference (:func:`reference_route`) is written from the paper's sentence, one token at a time
in plain Python: node score = sum of the node's ceil(K/M) highest biased affinities, keep the M best
nodes (ties: the lower node), then the K best experts of those nodes (ties: the lower expert), weights
the unbiased scores normalised and scaled. Ties are made exact by logits in {-200, 0, 200}
(sigmoid: 0, 0.5, 1 exactly) and biases in eighths, so every sum is exact in fp32 and in Python.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.model.moe import Gate
from nanoseek.model.routing import layout_nodes, node_limit_problem, set_node_limit
from nanoseek.train.config import config_from_dict

from conftest import make_tiny_config, make_tiny_model


def reference_route(scores: list[float], bias: list[float], nodes: int, m: int, k: int, scale: float):
    """One token: (sorted expert ids, {expert: weight})."""
    E = len(scores)
    per = E // nodes
    biased = [s + b for s, b in zip(scores, bias)]
    take = math.ceil(k / m)
    node_score = [sum(sorted(biased[n * per:(n + 1) * per], reverse=True)[:take]) for n in range(nodes)]
    kept = sorted(range(nodes), key=lambda n: (-node_score[n], n))[:m]
    allowed = [e for e in range(E) if e // per in kept]
    chosen = sorted(allowed, key=lambda e: (-biased[e], e))[:k]
    total = sum(scores[e] for e in chosen)
    return sorted(chosen), {e: scores[e] / (total + 1e-20) * scale for e in chosen}


def gate_for(E: int, k: int, nodes: int | None, m: int | None, n_group: int = 1, topk_group: int = 1) -> Gate:
    cfg = make_tiny_config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                           topk_group=topk_group)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(E))       # logits = x: the test chooses the scores
    if nodes is not None:
        gate.set_node_limit(nodes, m, cfg)
    return gate


def check_against_reference(gate: Gate, x: torch.Tensor, nodes: int, m: int) -> None:
    weights, idx, scores = gate(x)
    bias = gate.e_score_correction_bias.tolist()
    for t in range(x.shape[0]):
        want_ids, want_w = reference_route(scores[t].tolist(), bias, nodes, m, gate.top_k, gate.routed_scaling_factor)
        got = sorted(idx[t].tolist())
        assert got == want_ids, (t, nodes, m, got, want_ids)
        for e, w in zip(idx[t].tolist(), weights[t].tolist()):
            assert w == pytest.approx(want_w[e], rel=1e-6)
        spanned = {e // (gate.n_experts // nodes) for e in got}
        assert len(spanned) <= m


SHAPES = [(8, 2, 2), (16, 4, 4), (16, 8, 8), (12, 3, 3), (16, 3, 4)]    # (E, top_k, nodes)


@pytest.mark.parametrize("E,k,nodes", SHAPES)
def test_node_limited_routing_matches_the_per_token_reference_with_ties(E, k, nodes, ties_by_position):
    g = torch.Generator().manual_seed(E * 100 + k * 10 + nodes)
    for m in range(1, nodes + 1):
        if m * (E // nodes) < k:
            continue
        gate = gate_for(E, k, nodes, m)
        # exact ties: scores in {0, 0.5, 1}, biases in eighths
        x = (torch.randint(-1, 2, (64, E), generator=g) * 200).float()
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(torch.randint(0, 4, (E,), generator=g) / 8)
        check_against_reference(gate, x, nodes, m)
        # continuous scores and biases
        x = torch.randn(64, E, generator=g) * 2
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
        check_against_reference(gate, x, nodes, m)


def test_all_nodes_allowed_is_plain_top_k():
    E, k = 16, 4
    x = torch.randn(32, E, generator=torch.Generator().manual_seed(1))
    free, limited = gate_for(E, k, None, None), gate_for(E, k, 4, 4)
    for a, b in zip(free(x), limited(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("G,M", [(4, 1), (4, 2), (8, 4), (2, 1)])
def test_nodes_as_groups_equal_group_limited_routing(G, M, ties_by_position):
    """With K = 2M (V3: 8 = 2 x 4) node scores are V3's top-2 group sums: identical routing."""
    E, k = 16, 2 * M
    grouped = gate_for(E, k, None, None, n_group=G, topk_group=M)
    limited = gate_for(E, k, G, M)
    assert limited.node_limit == (G, M) and grouped.node_limit is None
    g = torch.Generator().manual_seed(G * 10 + M)
    ties = ((torch.randint(-1, 2, (64, E), generator=g) * 200).float(), torch.randint(0, 4, (E,), generator=g) / 8)
    for x, bias in [ties, (torch.randn(64, E, generator=g), torch.randn(E, generator=g) * 0.1)]:
        with torch.no_grad():
            grouped.e_score_correction_bias.copy_(bias)
            limited.e_score_correction_bias.copy_(bias)
        for a, b in zip(grouped(x), limited(x)):
            assert torch.equal(a, b)


def test_node_limit_equal_to_the_configs_own_groups_keeps_the_config_rule():
    """Groups = nodes and K = 2M (node scores are top-2 sums, as noaux_tc's group scores): the
    config's own rule is the node rule; with K = M (tiny: top-1 per node) it is not."""
    cfg = make_tiny_config()                          # n_group 4, topk_group 2, K = 2
    gate = Gate(cfg)
    gate.set_node_limit(4, 2, cfg)
    assert gate.node_limit == (4, 2)                  # node scores: top ceil(2/2) = 1, not the config's top-2 sums
    cfg4 = make_tiny_config(num_experts_per_tok=4)
    gate4 = Gate(cfg4)
    gate4.set_node_limit(4, 2, cfg4)
    assert gate4.node_limit is None                   # K = 4 = 2M: the config's group-limited routing is that rule


def test_equals_transformers_router_when_the_configs_match(tmp_path):
    """A nanoseek model without groups, routed node-limited (4 nodes, M = 2), gives transformers'
    logits for the same checkpoint loaded with n_group = 4, topk_group = 2; its own config.json
    keeps n_group = 1 (the option is not part of the model)."""
    transformers = pytest.importorskip("transformers")
    from nanoseek.model.checkpoint import save_pretrained
    model = make_tiny_model(seed=3, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1).eval()
    with torch.no_grad():
        for moe in model.moe_layers() + [x.mlp for x in model.model.mtp]:
            moe.gate.e_score_correction_bias.normal_(std=0.05)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        free = model(ids).logits
    assert set_node_limit(model, 4, 2) == len(model.moe_layers()) + 1
    with torch.no_grad():
        ours = model(ids).logits
    assert not torch.allclose(free, ours, atol=1e-4)     # the limit changes some routes here
    save_pretrained(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["n_group"] == 1 and cfg["topk_group"] == 1
    cfg.update(n_group=4, topk_group=2)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("nodes,m,ep,fields,needle", [
    (3, 1, 1, {}, "do not split evenly over 3 nodes"),
    (4, 5, 1, {}, "must be in [1, 4]"),
    (4, 0, 1, {}, "must be in [1, 4]"),
    (8, 1, 1, {"num_experts_per_tok": 2}, "cannot hold the 2 experts"),
    (4, 1, 2, {}, "must group whole expert-parallel ranks"),
    (2, 1, 1, {"n_group": 4, "topk_group": 2}, "already limits routing"),
    (2, 1, 1, {"topk_method": "greedy", "scoring_func": "softmax"}, "written for topk_method 'noaux_tc'"),
    (2, 1, 1, {"n_routed_experts": 0, "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1}, "no routed experts"),
])
def test_impossible_limits_are_named(nodes, m, ep, fields, needle):
    base = {"n_group": 1, "topk_group": 1}
    cfg = make_tiny_config(**{**base, **fields})
    assert needle in node_limit_problem(cfg, nodes, m, ep)


def test_layout_nodes():
    assert layout_nodes(1, 8) == 1
    assert layout_nodes(64, 8) == 8          # V3: EP64 over 8 nodes of 8 GPUs
    assert layout_nodes(4, 2) == 2
    assert layout_nodes(2, 8) == 1           # an EP group inside one node


def _raw(tmp_path, train: dict, model: dict | None = None, parallel: dict | None = None) -> dict:
    return {"model": {"preset": "tiny", "n_group": 1, "topk_group": 1, **(model or {})},
            "data": {"source": "synthetic"}, "optim": {"micro_batch_size": 2, "seq_len": 16},
            "train": {"max_steps": 2, "device": "cpu", "out_dir": str(tmp_path / "run"), **train},
            "parallel": parallel or {}}


def test_train_config_checks_node_limits_in_one_line(tmp_path):
    config_from_dict(_raw(tmp_path, {"max_nodes_per_token": 1, "expert_nodes": 2}), "t.toml")
    with pytest.raises(ConfigError, match=r"t.toml: \[train\] max_nodes_per_token = 3: must be in \[1, 2\]"):
        config_from_dict(_raw(tmp_path, {"max_nodes_per_token": 3, "expert_nodes": 2}), "t.toml")
    with pytest.raises(ConfigError, match=r"\[train\] max_nodes_per_token = 1: .*already limits routing"):
        config_from_dict(_raw(tmp_path, {"max_nodes_per_token": 1, "expert_nodes": 2},
                              model={"n_group": 4, "topk_group": 2}), "t.toml")
    with pytest.raises(ConfigError, match=r"\[train\] expert_nodes = -1: must be >= 0"):
        config_from_dict(_raw(tmp_path, {"max_nodes_per_token": 1, "expert_nodes": -1}), "t.toml")


def test_trainer_sets_the_limit_on_every_gate_and_refuses_a_bad_layout(tmp_path):
    from nanoseek.train.pretrain import pretrain
    seen = []

    def spy(module, args, out):
        seen.append((module.node_limit, out[1].detach()))

    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, a, o: spy(mod, a, o) if isinstance(mod, Gate) else None)
    try:
        pretrain(config_from_dict(_raw(tmp_path, {"max_nodes_per_token": 1, "expert_nodes": 4,
                                                  "eval_every": 0, "save_every": 0}), "t"),
                 progress=False, quiet=True)
    finally:
        handle.remove()
    assert seen and all(limit == (4, 1) for limit, _ in seen)
    for _, idx in seen:
        assert ((idx // 2).amax(-1) == (idx // 2).amin(-1)).all()     # 8 experts / 4 nodes: one node each
    # auto nodes in one process: one node, so M = 2 cannot apply
    with pytest.raises(ConfigError, match=r"max_nodes_per_token = 2 with 1 expert node\(s\): must be in \[1, 1\]"):
        pretrain(config_from_dict(_raw(tmp_path / "b", {"max_nodes_per_token": 2}), "t"), progress=False, quiet=True)


def test_v4_refuses_in_one_line(tmp_path):
    raw = _raw(tmp_path, {"max_nodes_per_token": 1, "expert_nodes": 2})
    raw["model"] = {"preset": "v4-tiny"}
    with pytest.raises(ConfigError, match=r"t.toml: \[train\] max_nodes_per_token = 1: not supported for "
                                          r"model_type 'deepseek_v4'"):
        config_from_dict(raw, "t.toml")
