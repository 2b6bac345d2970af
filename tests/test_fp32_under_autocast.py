"""What computes in fp32 on purpose stays fp32 under bf16 autocast (``[train] dtype = "bfloat16"``).

Autocast runs every linear and matmul in bf16 whatever its inputs' dtype, so ``F.linear(x.float(),
w.float())`` in a router gave bf16 scores in a bf16-autocast training step (found while looking
for why bf16 autocast trailed fp32 per token; :mod:`nanoseek.model.fp32`). Each such computation, called inside a real
model's forward under autocast, must return exactly what it returns on the same inputs without
autocast: V3's router, V3.2's indexer, V4's router, hyper-connections and compressed-attention
indexer scorer.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from nanoseek.model import dsa, moe
from nanoseek.model.fp32 import fp32_linear, fp32_matmul, no_autocast
from nanoseek.model.v4 import compressor, hyper
from nanoseek.model.v4 import moe as v4_moe
from nanoseek.model.v4.config import DeepseekV4Config
from nanoseek.model.v4.transformer import DeepseekV4ForCausalLM
from v4_helpers import BASE, CASES, ids_batch, randomise

# (class, method): the computations that promise fp32 results
FP32_SITES = {
    "v3 router": (moe.Gate, "forward"),
    "v3.2 indexer": (dsa.Indexer, "scores"),
    "v4 router": (v4_moe.Router, "forward"),
    "v4 hyper-connection": (hyper.HyperConnection, "forward"),
    "v4 hyper head": (hyper.HyperHead, "forward"),
    "v4 indexer scorer": (compressor.IndexerScorer, "forward"),
}


def record_calls(monkeypatch, sites: list[str]) -> list[tuple[str, object, tuple, dict, object]]:
    """Wrap each site's method: every call's (site, module, args, kwargs, output) is recorded."""
    calls = []
    for site in sites:
        cls, name = FP32_SITES[site]
        original = getattr(cls, name)

        def wrapped(self, *args, _site=site, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            calls.append((_site, self, args, kwargs, out))
            return out

        monkeypatch.setattr(cls, name, wrapped)
    return calls


def tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def fp32_projections(model, monkeypatch) -> None:
    """The indexers' own projections (``wq_b``, ``weights_proj``...) run in the step's precision, as
    DeepSeek's (FP8 in V3.2); pinned to fp32 here so that only the score products are compared."""
    for module in model.modules():
        if isinstance(module, (dsa.Indexer, compressor.IndexerScorer)):
            for lin in module.children():
                if isinstance(lin, torch.nn.Linear):
                    monkeypatch.setattr(lin, "forward", lambda t, _w=lin.weight: fp32_linear(t, _w))


def check(model, ids, monkeypatch, sites: list[str], **forward) -> None:
    originals = {s: getattr(*FP32_SITES[s]) for s in sites}
    fp32_projections(model, monkeypatch)
    calls = record_calls(monkeypatch, sites)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, **forward)
    assert {c[0] for c in calls} == set(sites), f"not called: {set(sites) - {c[0] for c in calls}}"
    for site, module, args, kwargs, out in calls:
        with torch.no_grad():
            ref = originals[site](module, *args, **kwargs)            # no autocast
        for got, want in zip(tensors(out), tensors(ref), strict=True):
            assert got.dtype == want.dtype, f"{site}: {got.dtype} under autocast, {want.dtype} without"
            assert torch.equal(got, want), f"{site}: differs under autocast by {(got.float() - want.float()).abs().max()}"


def test_v3_router_is_fp32_under_autocast(monkeypatch):
    model = make_tiny_model(seed=0).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    check(model, ids, monkeypatch, ["v3 router"], labels=ids)


def test_v32_indexer_is_fp32_under_autocast(monkeypatch):
    model = make_tiny_model(seed=0, index_n_heads=4, index_head_dim=8, index_topk=4).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    check(model, ids, monkeypatch, ["v3 router", "v3.2 indexer"])


@pytest.mark.parametrize("case", ["all_kinds_hc2", "default_schedule_yarn_sigmoid_hc3"])
def test_v4_fp32_parts_are_fp32_under_autocast(monkeypatch, case):
    overrides, T = CASES[case]
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config.from_dict({**BASE, **overrides})).eval()
    randomise(model, 0)
    ids = ids_batch(0, 2, T, BASE["vocab_size"])
    check(model, ids, monkeypatch, ["v4 router", "v4 hyper-connection", "v4 hyper head", "v4 indexer scorer"])


def test_helpers_are_fp32_under_autocast_and_a_no_op_where_there_is_none():
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    want, want_bf16_input = x @ w.T, x.bfloat16().float() @ w.T              # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16      # what the helpers guard against
        assert torch.equal(fp32_linear(x, w), want)
        assert torch.equal(fp32_linear(x.bfloat16(), w), want_bf16_input)
        assert torch.equal(fp32_matmul(x, w.T), want)
    with no_autocast("meta"):                                               # no autocast there: nothing to do
        assert (torch.empty(2, 3, device="meta") @ torch.empty(3, 4, device="meta")).shape == (2, 4)
