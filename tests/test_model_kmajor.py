"""K-major weight copies (``nanoseek/model/kmajor.py``): the same products as the model's own
weights, on the modules only inside ``installed()`` and fresh there whenever a weight changed,
never part of the model otherwise, and left out where a module's product is not a plain ``x W^T``. The compiled engine's use of them
(tokens equal to the eager engine's, also after the weights change between calls) is in
``test_infer_compile.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from nanoseek.infer.engine import Engine
from nanoseek import limits
from nanoseek.model.kmajor import KMajorWeights, Linear


def _copies_match(layout: KMajorWeights) -> bool:
    for w, copy in zip(layout.weights(), layout.copies):
        if copy is None or not copy.is_contiguous() or not torch.equal(copy, w.detach().t()):
            return False
    return True


def _installed_match(layout: KMajorWeights) -> bool:
    return all(m.weight_t is copy for m, copy in zip(layout.layers, layout.copies))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_reads_its_copy_only_while_installed(bias):
    torch.manual_seed(0)
    lin = Linear(8, 5, bias=bias)
    x = torch.randn(3, 2, 8)
    layout = KMajorWeights(lin)
    assert layout.layers == [lin]
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
        with layout.installed():
            assert _installed_match(layout)
            layout.copies[0].normal_()          # spoiled on purpose: shows which one is read
            torch.testing.assert_close(lin(x), x @ layout.copies[0] + (lin.bias if bias else 0))
            with torch.enable_grad():          # autograd on (a training step, another thread): the weight
                y = lin(x)
                torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
                y.sum().backward()
                assert lin.weight.grad is not None
        assert lin.weight_t is None and "weight_t" not in lin.__dict__
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="boom"), layout.installed():
            raise RuntimeError("boom")
        assert "weight_t" not in lin.__dict__   # removed after a failing call too


@pytest.mark.parametrize("overrides", [{}, {"index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
                                       {"attention_type": "mha"}, {"attention_bias": True}],
                         ids=["mla", "v32-dsa", "mha", "bias"])
def test_forward_with_copies_equals_the_model(overrides):
    model = make_tiny_model(seed=0, **overrides).eval()
    layout = KMajorWeights(model)
    assert layout.refresh() == len(layout.layers) > 0 and _copies_match(layout)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        expected = model(ids).logits
        with layout.installed():
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_refresh_follows_every_way_a_weight_changes():
    model = make_tiny_model(seed=0)
    layout = KMajorWeights(model)
    with torch.inference_mode():                # as the engine's step runs it
        assert layout.refresh() == len(layout.layers)
        assert layout.refresh() == 0
    first = [id(c) for c in layout.copies]

    # an optimizer step changes every weight in place
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(torch.randint(0, model.config.vocab_size, (2, 8)), labels=torch.randint(0, model.config.vocab_size, (2, 8))).loss.backward()
    opt.step()
    with torch.inference_mode():
        assert layout.refresh() == len(layout.layers) and _copies_match(layout)
    # the same tensors were refreshed in place: a compiled graph that reads them stays valid
    assert [id(c) for c in layout.copies] == first
    with torch.inference_mode(), layout.installed():    # installing refreshes: nothing left to copy
        assert _installed_match(layout) and layout.refresh() == 0

    # load_state_dict copies in place; .data replaced moves the storage
    model.load_state_dict(make_tiny_model(seed=1).state_dict())
    with torch.inference_mode():
        assert layout.refresh() == len(layout.layers) and _copies_match(layout)
    lin = model.lm_head
    lin.weight.data = lin.weight.data * 2
    with torch.inference_mode():
        assert layout.refresh() == 1 and _copies_match(layout)
    with torch.no_grad():                       # installed refreshes what changed outside inference mode too
        lin.weight.mul_(0.5)
        with layout.installed():
            assert _copies_match(layout)
    # a new parameter set on the module (the copies follow the module, not the old object)
    lin.weight = torch.nn.Parameter(torch.randn_like(lin.weight))
    with torch.no_grad(), layout.installed():
        assert _copies_match(layout) and lin.weight_t is layout.copies[layout.layers.index(lin)]


def test_forget_recopies_what_refresh_cannot_see():
    """Fused optimizer steps leave version counters alone and ``.data`` writes bump another
    counter: ``forget`` (the engine calls it when a decode run starts) re-copies everything."""
    model = make_tiny_model(seed=0)
    layout = KMajorWeights(model)
    layout.refresh()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.lm_head.weight.data.mul_(2)
    layout.refresh()
    layout.forget()
    assert layout.refresh() == len(layout.layers) and _copies_match(layout)


def test_weights_without_a_version_counter_or_a_parameter():
    """A model built under inference mode (inference tensors have no version counter) and linear
    layers whose weight is no longer a parameter (pruned, parametrized) keep decoding right."""
    with torch.inference_mode():
        model = make_tiny_model(seed=0).eval()
        layout = KMajorWeights(model)
        assert layout.refresh() == len(layout.layers) and _copies_match(layout)
        ids = torch.randint(0, model.config.vocab_size, (2, 6))
        expected = model(ids).logits
        with layout.installed():
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)

    from torch.nn.utils import parametrizations, prune

    model = make_tiny_model(seed=0).eval()
    layout = KMajorWeights(model)
    layout.refresh()
    full = layout.nbytes
    gone = (model.lm_head.weight.numel() + model.model.layers[0].self_attn.o_proj.weight.numel()) * 4
    prune.l1_unstructured(model.lm_head, "weight", amount=0.5)
    parametrizations.weight_norm(model.model.layers[0].self_attn.o_proj)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
        with layout.installed():
            assert model.lm_head.weight_t is None
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    late = KMajorWeights(model)                 # made after pruning: no copy for those layers
    assert late.nbytes == layout.nbytes == full - gone
    with torch.no_grad(), late.installed():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    engine = Engine(model, max_batch_size=2, max_seq_len=16, compile=True)
    assert engine._kmajor_weights() is not None


def test_copies_are_not_part_of_the_model():
    import copy
    import pickle

    model = make_tiny_model(seed=0)
    before = set(model.state_dict())
    n_params, n_buffers = len(list(model.parameters())), len(list(model.buffers()))
    layout = KMajorWeights(model)
    with torch.no_grad(), layout.installed():
        pass
    assert set(model.state_dict()) == before
    assert len(list(model.parameters())) == n_params and len(list(model.buffers())) == n_buffers
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    for m in (model, clone, restored):
        assert not any(k in mod.__dict__ for mod in m.modules() for k in ("weight_t",))
    assert layout.nbytes == sum(w.numel() * w.element_size() for w in layout.weights()) > 0


def test_modules_with_another_product_are_left_alone():
    from nanoseek.model.fp8 import enable_simulated_precision

    model = make_tiny_model(seed=0, num_nextn_predict_layers=1)
    changed = set(enable_simulated_precision(model, "bf16"))
    names = {id(m): n for n, m in model.named_modules()}
    covered = {names[id(m)] for m in KMajorWeights(model).layers}
    assert covered == {"lm_head"}               # fp8's rebound forwards and GEMMs: not a plain product
    assert "lm_head" not in changed

    model = make_tiny_model(seed=0, num_nextn_predict_layers=1)
    names = {id(m): n for n, m in model.named_modules()}
    covered = {names[id(m)] for m in KMajorWeights(model).layers}
    assert not any(n.startswith("model.mtp.") for n in covered)     # MTP runs in the eager speculative step
    assert "lm_head" in covered and "model.layers.0.self_attn.q_a_proj" in covered
    assert not any(n.endswith("experts") for n in covered)          # they gather (moe.py): no copies


def test_v4_grouped_projection_is_left_alone():
    from nanoseek.model import registry
    from nanoseek.model.v4.attention import GroupedLinear

    model = registry.build_model(registry.load_config("v4-tiny"))
    layers = KMajorWeights(model).layers
    assert layers and not any(isinstance(m, GroupedLinear) for m in layers)


def test_engine_makes_no_copies_where_memory_is_short(monkeypatch):
    model = make_tiny_model(seed=0).eval()
    engine = Engine(model, max_batch_size=2, max_seq_len=16, compile=True)
    assert engine._kmajor_weights() is not None
    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": 1024)
    with pytest.warns(RuntimeWarning, match="k-major"):
        assert engine._kmajor_weights() is None
    monkeypatch.setattr(limits, "available_memory_bytes", lambda device="cpu": None)     # cannot tell: make them
    assert engine._kmajor_weights() is not None
