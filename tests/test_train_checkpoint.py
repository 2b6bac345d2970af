"""Training checkpoints: no pickle, exact round trip, atomic writes, keep-last-K, partial leftovers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nanoseek.train.checkpoint as ck
from nanoseek.model.checkpoint import from_pretrained
from nanoseek.train.checkpoint import (flatten_state, latest_checkpoint, list_checkpoints, load_model_weights,
                                       load_state, remove_partials, save_checkpoint, step_of, unflatten_state)


def test_flatten_round_trips_optimizer_rng_and_loader_state(tiny_model):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    opt.step()
    import random
    state = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "loader": {"epoch": 1, "offset": 7, "seed": 3}, "nan": float("nan"),
             "tuple": (1, (2.5, "x"), None), "intkeys": {0: "a", 5: [1, 2]}, "weird": {"__tensor__": 1}}
    meta, tensors = flatten_state(state)
    text = json.dumps(meta)                              # plain JSON...
    back = unflatten_state(json.loads(text), tensors)   # ...and tensors: nothing pickled
    assert back["python"] == state["python"] and back["tuple"] == state["tuple"] and back["intkeys"] == state["intkeys"]
    assert back["weird"] == {"__tensor__": 1} and back["loader"] == state["loader"] and np.isnan(back["nan"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert torch.equal(back["torch"], state["torch"])
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert len(opt.state) > 10
    for p in opt.state:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p][k])
    with pytest.raises(TypeError, match="cannot checkpoint state.obj"):
        flatten_state({"obj": object()})


def test_checkpoint_is_hf_loadable_exact_and_keeps_the_last_k(tiny_model, tmp_path):
    model = tiny_model()
    for m in model.moe_layers():
        m.gate.e_score_correction_bias.uniform_(-0.01, 0.01)
    for step in (1, 2, 3, 4):
        path = save_checkpoint(tmp_path, step, model, {"step": step, "t": torch.arange(3)}, keep_last=2)
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path) == path and (tmp_path / "latest").read_text().strip() == "checkpoints/step-000004"
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json",
                                                      "trainer_state.safetensors"]
    state = load_state(path)
    assert state["step"] == 4 and torch.equal(state["t"], torch.arange(3))
    again = from_pretrained(path)                                    # an ordinary HF-format model dir
    other = tiny_model(seed=1)
    load_model_weights(other, path)
    for (k, a), b, c in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), k


def test_a_crash_mid_write_never_leaves_a_checkpoint_that_loads(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    good = save_checkpoint(tmp_path, 5, model, {"step": 5}, keep_last=3)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)                      # fails after the model files are written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 6, model, {"step": 6}, keep_last=3)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [good] and latest_checkpoint(tmp_path) == good
    assert not list((tmp_path / "checkpoints").glob(".step-*"))      # the partial directory is gone
    # a process killed hard mid-write leaves a partial directory: it is invisible, then cleaned up
    partial = tmp_path / "checkpoints" / ".step-000007.partial-999"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == good and list_checkpoints(tmp_path) == [good]
    assert remove_partials(tmp_path) == [partial] and not partial.exists()
    # a stale `latest` pointing at a missing dir falls back to the newest complete checkpoint
    (tmp_path / "latest").write_text("checkpoints/step-000099\n")
    assert latest_checkpoint(tmp_path) == good


@pytest.mark.parametrize("model,old_form", [
    ({"preset": "tiny", "n_routed_experts": 0}, {"first_k_dense_replace": 1}),
    ({"preset": "tiny", "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
     {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}),
], ids=["dense", "v2-router"])
def test_a_run_saved_before_a_config_json_change_still_resumes(tmp_path, model, old_form):
    """A dense model's config.json now says every layer is dense (first_k_dense_replace = layers)
    and V2 routing is written as deepseek_v2; runs saved before compared field by field as "another
    model" and refused to resume. The check reads both configs and writes them again; a real
    change of the model is still refused."""
    from nanoseek.errors import ConfigError
    from nanoseek.train.pretrain import pretrain
    from train_helpers import dsa_config

    cfg = dsa_config(tmp_path, model, 16, train={"dsa_warmup_steps": 0, "max_steps": 2, "save_every": 2})
    pretrain(cfg, quiet=True, progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    saved = json.loads((ckpt / "config.json").read_text())
    assert any(saved[k] != v for k, v in old_form.items())          # this version writes it otherwise
    (ckpt / "config.json").write_text(json.dumps({**saved, **old_form}))
    more = dsa_config(tmp_path, model, 16, train={"dsa_warmup_steps": 0, "max_steps": 4, "save_every": 2})
    assert pretrain(more, resume=True, quiet=True, progress=False).status == "done"
    other = dsa_config(tmp_path, {**model, "hidden_size": 48}, 16,
                       train={"dsa_warmup_steps": 0, "max_steps": 6, "save_every": 2})
    with pytest.raises(ConfigError, match="holds another model: hidden_size = 48"):
        pretrain(other, resume=True, quiet=True, progress=False)


@pytest.mark.parametrize("kind", ["not-utf8", "fifo", "folder"])
def test_an_unreadable_latest_pointer_is_one_line_and_never_hangs(tmp_path, kind):
    """RUN/latest was read with read_text(): bytes that are not UTF-8 were a traceback, a FIFO
    blocked every command that looked for the run's checkpoint forever."""
    import os

    from nanoseek.model.checkpoint import CheckpointError
    from nanoseek.train.pretrain import pretrain
    from train_helpers import dsa_config

    cfg = dsa_config(tmp_path, {"preset": "tiny"}, 16, train={"dsa_warmup_steps": 0, "max_steps": 2, "save_every": 2})
    pretrain(cfg, quiet=True, progress=False)
    run = tmp_path / "run"
    newest = list_checkpoints(run)[-1]
    (run / "latest").unlink()
    if kind == "not-utf8":
        (run / "latest").write_bytes(b"\xff\xfe")
    elif kind == "fifo":
        os.mkfifo(run / "latest")
    else:
        (run / "latest").mkdir()
    assert latest_checkpoint(run) == newest                         # the newest complete one, as without a pointer
    with pytest.raises(CheckpointError, match=r"latest: unreadable .*--resume-from"):
        ck.resume_checkpoint(run)
