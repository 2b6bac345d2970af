"""`nanoseek export --format gguf`: the file llama.cpp's deepseek2 architecture reads.

Tiny checkpoints of several configs (a dense first layer then MoE, several expert counts and
group settings, a full-rank query, a dense model, softmax V2-style routing without shared
experts, HF's halves RoPE layout with tied embeddings, YaRN, MTP on and off) are exported and
read back with ``gguf.GGUFReader``: the tensor names are exactly the set llama.cpp loads, every
tensor equals the model's own after the documented transforms (computed here from the model in
memory, not from the exporter's HF-name path), every metadata key llama.cpp reads has the value
the config implies, and the vocabulary is the tokenizer's. Error cases: configs llama.cpp cannot
run (one line naming the key), tokenizers it cannot represent, and the output-file rules.

The ``slow`` tests load the files in llama.cpp itself (llama-cpp-python; skipped when it is not
installed) and compare logits, greedy tokens and tokenization with nanoseek's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import gguf
from conftest import make_tiny_model
from nanoseek.cli import main
from nanoseek.data.tokenizer import CHAT_TEMPLATE, Tokenizer
from nanoseek.export.gguf_model import rope_pair_order
from nanoseek.export.gguf_vocab import VocabError, read_vocab
from nanoseek.model.checkpoint import save_pretrained

CORPUS = ["The quick brown fox jumps over the lazy dog. What is 17 + 25? It is 42.",
          "héllo wörld 🙂 — naïve café, 日本語のテキスト, Ελληνικά, русский текст.",
          "def f(x):\n    return x * 2  # code\n\tindented\n\n  spaces   between",
          "<think>\nreasoning 1234567890\n</think>\n\nanswer: 3.14159, 1e-5, $100, 50%"] * 8

# name -> model config overrides (on conftest's tiny DeepSeek-V3 shape: vocab 128 -> ours, 3 layers)
CONFIGS = {
    "v3": dict(),                                                 # q LoRA, 1 dense + 2 MoE, 8 experts, 4 groups keep 2, MTP
    "full_q_no_mtp": dict(q_lora_rank=None, num_nextn_predict_layers=0, n_routed_experts=4, n_group=1,
                          topk_group=1, first_k_dense_replace=0, num_experts_per_tok=3),
    "dense": dict(n_routed_experts=0, num_hidden_layers=2),
    "v2_softmax": dict(scoring_func="softmax", topk_method="greedy", n_shared_experts=0, norm_topk_prob=False,
                       routed_scaling_factor=1.0, n_routed_experts=6, n_group=1, topk_group=1, first_k_dense_replace=2,
                       num_hidden_layers=4, rms_norm_eps=1e-5),                 # exported with the eps flag
    "halves_tied": dict(rope_interleave=False, tie_word_embeddings=True, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=3, n_shared_experts=2, qk_rope_head_dim=8),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
                 max_position_embeddings=256, qk_rope_head_dim=8),
    "yarn_v3": dict(rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,  # V3's values
                                  "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
                    max_position_embeddings=640, qk_rope_head_dim=8, rope_theta=500.0),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=400, min_frequency=1)


def make_checkpoint(path, tokenizer, seed=0, **overrides):
    model = make_tiny_model(seed=seed, vocab_size=tokenizer.vocab_size + 5, **overrides).eval()
    with torch.no_grad():      # a trained-looking expert bias, so a dropped or misplaced one shows
        for m in model.moe_layers() + [x.mlp for x in model.model.mtp if hasattr(x.mlp, "gate")]:
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.normal_(0, 0.1)
    save_pretrained(model, path)
    tokenizer.save(path)
    return model


def export(*args) -> int:
    return main(["export", "--format", "gguf", *map(str, args)])


def eps_flag(overrides: dict) -> list[str]:
    """The flag a config whose rms_norm_eps is not the latent norms' 1e-6 needs to export."""
    return ["--allow-norm-eps-mismatch"] if overrides.get("rms_norm_eps", 1e-6) != 1e-6 else []


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, data.astype(np.float32))
    return fields, tensors


def expected_tensors(model, with_mtp: bool) -> dict[str, np.ndarray]:
    """What llama.cpp must find, from the model in memory (nanoseek's names and stacked experts)."""
    c = model.config
    H, nope, v, c_kv, rope = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank,
                              c.qk_rope_head_dim)
    f = lambda t: t.detach().float().numpy().copy()  # noqa: E731
    out = {"token_embd.weight": f(model.model.embed_tokens.weight), "output_norm.weight": f(model.model.norm.weight)}
    if not c.tie_word_embeddings:
        out["output.weight"] = f(model.lm_head.weight)
    order = None if c.rope_interleave else rope_pair_order(rope)
    blocks = list(model.model.layers) + (list(model.model.mtp) if with_mtp else [])
    for i, layer in enumerate(blocks):
        b, a = f"blk.{i}.", layer.self_attn
        out[b + "attn_norm.weight"] = f(layer.input_layernorm.weight)
        out[b + "ffn_norm.weight"] = f(layer.post_attention_layernorm.weight)
        q = f(a.q_b_proj.weight if c.q_lora_rank else a.q_proj.weight).reshape(H, nope + rope, -1)
        kv_a = f(a.kv_a_proj_with_mqa.weight)
        if order is not None:        # HF halves -> llama.cpp adjacent pairs, queries and keys alike
            q[:, nope:] = q[:, nope:][:, order]
            kv_a[c_kv:] = kv_a[c_kv:][order]
        if c.q_lora_rank:
            out[b + "attn_q_a.weight"] = f(a.q_a_proj.weight)
            out[b + "attn_q_a_norm.weight"] = f(a.q_a_layernorm.weight)
            out[b + "attn_q_b.weight"] = q.reshape(H * (nope + rope), -1)
        else:
            out[b + "attn_q.weight"] = q.reshape(H * (nope + rope), -1)
        out[b + "attn_kv_a_mqa.weight"] = kv_a
        out[b + "attn_kv_a_norm.weight"] = f(a.kv_a_layernorm.weight)
        kv_b = f(a.kv_b_proj.weight).reshape(H, nope + v, c_kv)
        out[b + "attn_k_b.weight"] = kv_b[:, :nope].transpose(0, 2, 1)        # [H, c, nope]
        out[b + "attn_v_b.weight"] = kv_b[:, nope:]                           # [H, v, c]
        out[b + "attn_output.weight"] = f(a.o_proj.weight)
        mlp = layer.mlp
        if hasattr(mlp, "gate"):
            I = c.moe_intermediate_size
            out[b + "ffn_gate_inp.weight"] = f(mlp.gate.weight)
            if mlp.gate.e_score_correction_bias is not None:
                out[b + "exp_probs_b.bias"] = f(mlp.gate.e_score_correction_bias)
            out[b + "ffn_gate_exps.weight"] = f(mlp.experts.gate_up_proj[:, :I])
            out[b + "ffn_up_exps.weight"] = f(mlp.experts.gate_up_proj[:, I:])
            out[b + "ffn_down_exps.weight"] = f(mlp.experts.down_proj)
            se = mlp.shared_experts
            zero = lambda *s: np.zeros(s, np.float32)  # noqa: E731  llama.cpp always has a shared expert
            out[b + "ffn_gate_shexp.weight"] = f(se.gate_proj.weight) if se else zero(I, c.hidden_size)
            out[b + "ffn_up_shexp.weight"] = f(se.up_proj.weight) if se else zero(I, c.hidden_size)
            out[b + "ffn_down_shexp.weight"] = f(se.down_proj.weight) if se else zero(c.hidden_size, I)
        else:
            out[b + "ffn_gate.weight"] = f(mlp.gate_proj.weight)
            out[b + "ffn_up.weight"] = f(mlp.up_proj.weight)
            out[b + "ffn_down.weight"] = f(mlp.down_proj.weight)
        if i >= c.num_hidden_layers:
            out[b + "nextn.eh_proj.weight"] = f(layer.eh_proj.weight)
            out[b + "nextn.enorm.weight"] = f(layer.enorm.weight)
            out[b + "nextn.hnorm.weight"] = f(layer.hnorm.weight)
            out[b + "nextn.shared_head_norm.weight"] = f(layer.shared_head.norm.weight)
            out[b + "nextn.embed_tokens.weight"] = f(model.model.embed_tokens.weight)
            out[b + "nextn.shared_head_head.weight"] = f(model.lm_head.weight)
    return out


def expected_metadata(c, n_mtp: int) -> dict:
    """The deepseek2 keys llama.cpp reads, spelled out from the config by hand."""
    a = "deepseek2"
    moe = bool(c.n_routed_experts) and c.first_k_dense_replace < c.num_hidden_layers + n_mtp
    m = {
        "general.architecture": a, f"{a}.block_count": c.num_hidden_layers + n_mtp,
        f"{a}.context_length": c.max_position_embeddings, f"{a}.embedding_length": c.hidden_size,
        f"{a}.feed_forward_length": c.intermediate_size, f"{a}.vocab_size": c.vocab_size,
        f"{a}.attention.head_count": c.num_attention_heads, f"{a}.attention.head_count_kv": 1,
        f"{a}.attention.kv_lora_rank": c.kv_lora_rank,
        f"{a}.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
        f"{a}.attention.value_length": c.kv_lora_rank,
        f"{a}.attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        f"{a}.attention.value_length_mla": c.v_head_dim, f"{a}.rope.dimension_count": c.qk_rope_head_dim,
        f"{a}.expert_feed_forward_length": c.moe_intermediate_size,
        f"{a}.leading_dense_block_count": c.first_k_dense_replace if moe else c.num_hidden_layers + c.num_nextn_predict_layers,
        f"{a}.expert_shared_count": max(c.n_shared_experts or 0, 1) if moe else 0,
    }
    m[f"{a}.attention.q_lora_rank"] = c.q_lora_rank or 0          # llama.cpp requires the key; 0: full rank
    if moe:
        m.update({f"{a}.expert_count": c.n_routed_experts, f"{a}.expert_used_count": c.num_experts_per_tok,
                  f"{a}.expert_gating_func": 2 if c.scoring_func == "sigmoid" else 1,
                  f"{a}.expert_weights_norm": c.norm_topk_prob})
        if c.n_group and c.topk_group and c.n_group > 1 and c.topk_group < c.n_group:
            m.update({f"{a}.expert_group_count": c.n_group, f"{a}.expert_group_used_count": c.topk_group})
    if n_mtp:
        m[f"{a}.nextn_predict_layers"] = n_mtp
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mtp", [False, True])
def test_tensors_and_metadata_equal_the_checkpoint(name, mtp, tokenizer, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "ck", tokenizer, **CONFIGS[name])
    c = model.config
    if mtp and not c.num_nextn_predict_layers:
        assert export("--mtp", tmp_path / "ck", tmp_path / "m.gguf") == 2
        assert "--mtp" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
        return
    assert export(*(["--mtp"] if mtp else []), *eps_flag(CONFIGS[name]), tmp_path / "ck", tmp_path / "m.gguf") == 0
    summary = json.loads(capsys.readouterr().out)
    fields, tensors = read(tmp_path / "m.gguf")
    want = expected_tensors(model, with_mtp=mtp)
    assert sorted(tensors) == sorted(want)
    assert summary["tensors"] == len(want)
    for k, w in want.items():
        kind, got = tensors[k]
        assert kind == "F32", k
        assert got.shape == w.shape and np.array_equal(got, w), k
    n_mtp = c.num_nextn_predict_layers if mtp else 0
    for key, value in expected_metadata(c, n_mtp).items():
        assert fields.get(key) == value, key
    a = "deepseek2"
    assert fields[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert fields[f"{a}.rope.freq_base"] == pytest.approx(c.rope_theta)
    if c.n_routed_experts:
        assert fields[f"{a}.expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)
    if c.rope_scaling:
        rs = c.rope_scaling
        assert fields[f"{a}.rope.scaling.type"] == "yarn"
        assert fields[f"{a}.rope.scaling.factor"] == pytest.approx(rs["factor"])
        assert fields[f"{a}.rope.scaling.original_context_length"] == rs["original_max_position_embeddings"]
        assert fields[f"{a}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * rs["mscale_all_dim"])
    else:
        assert f"{a}.rope.scaling.type" not in fields
    assert fields["general.file_type"] == 0 and fields["general.name"] == "ck"
    assert not list(tmp_path.glob(".*tmp*"))       # no temporary file left behind


@pytest.mark.parametrize("dtype,kind,torch_dtype", [("f16", "F16", torch.float16), ("bf16", "BF16", torch.bfloat16)])
def test_half_precision_matrices_vectors_stay_f32(dtype, kind, torch_dtype, tokenizer, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "ck", tokenizer)
    assert export("--dtype", dtype, tmp_path / "ck", tmp_path / "m.gguf") == 0
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32}[dtype]
    for name, w in expected_tensors(model, with_mtp=False).items():
        got_kind, got = tensors[name]
        if w.ndim == 1 or ".ffn_gate_inp." in name:
            assert got_kind == "F32" and np.array_equal(got, w), name
        else:
            assert got_kind == kind, name
            assert np.array_equal(got, torch.from_numpy(w).to(torch_dtype).float().numpy()), name


def test_vocabulary_is_the_tokenizers(tokenizer, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "ck", tokenizer)
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 0
    fields, _ = read(tmp_path / "m.gguf")
    V = model.config.vocab_size
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == V
    for i in range(V):
        if i < tokenizer.vocab_size:
            assert tokens[i] == tokenizer.id_to_token(i)
            control = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.token_to_id("<｜User｜>"),
                       tokenizer.token_to_id("<｜Assistant｜>"), *tokenizer.require_tool_tokens().ids}   # tool calls: 7..13
            want = 3 if i in control else 4 if i in (tokenizer.think_id, tokenizer.end_think_id) else 1
            assert types[i] == want, (i, tokens[i])
        else:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", 5)
    merges = json.loads((tmp_path / "ck" / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


def _foreign_tokenizer(folder, config: dict, jinja: str | None = None):
    """A GPT-2-style byte-level BPE with its own special-token names, as other projects ship them."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    tk = HF(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=350, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(["<tool>"])                                  # an added, non-special token
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return tk


def test_a_foreign_tokenizer_exports_with_its_own_names(tmp_path):
    tk = _foreign_tokenizer(tmp_path / "tok", {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                               "add_bos_token": False, "chat_template": "ignored: the .jinja wins"},
                            jinja="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    v = read_vocab(tmp_path / "tok" / "tokenizer.json", vocab_size=tk.get_vocab_size() + 3)
    assert v.pre == "gpt-2" and (v.bos_id, v.eos_id, v.pad_id) == (0, 1, None) and v.add_bos is False
    assert v.chat_template.startswith("{% for m in messages %}")
    assert v.types[:3] == [3, 3, 3] and v.types[tk.token_to_id("<tool>")] == 4 and v.types[-1] == 5
    assert v.tokens[:tk.get_vocab_size()] == [tk.id_to_token(i) for i in range(tk.get_vocab_size())]
    # ids from the model config where tokenizer_config.json names no token; list-form templates
    (tmp_path / "tok" / "chat_template.jinja").unlink()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    v = read_vocab(tmp_path / "tok" / "tokenizer.json", tk.get_vocab_size(), {"bos_token_id": 1, "eos_token_id": [0, 1]})
    assert (v.bos_id, v.eos_id, v.chat_template) == (1, 0, "D")


def test_export_with_a_foreign_tokenizer(tokenizer, tmp_path, capsys):
    tk = _foreign_tokenizer(tmp_path / "tok", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    make_checkpoint(tmp_path / "ck", tokenizer)      # the model's rows cover the foreign vocabulary too
    assert export("--tokenizer", tmp_path / "tok", tmp_path / "ck", tmp_path / "m.gguf") == 0
    fields, _ = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.tokens"][:tk.get_vocab_size()] == [tk.id_to_token(i) for i in range(tk.get_vocab_size())]
    assert "tokenizer.chat_template" not in fields
    assert "no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("change,match", [
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
    (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda s: s["model"].update(type="WordPiece"), "model type"),
    (lambda s: s.update(decoder={"type": "Metaspace"}), "decoder"),
])
def test_tokenizers_llama_cpp_cannot_represent_are_refused(change, match, tmp_path):
    _foreign_tokenizer(tmp_path / "tok", {})
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    change(spec)
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(VocabError, match=match):
        read_vocab(tmp_path / "tok" / "tokenizer.json", 400)


@pytest.mark.parametrize("overrides,key", [
    (dict(attention_type="mha"), "attention_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_hidden_layers=27), "q_lora_rank"),          # llama.cpp takes 27 layers for a full-rank V2-Lite
    (dict(moe_layer_freq=2, first_k_dense_replace=0), "moe_layer_freq"),
    (dict(topk_method="group_limited_greedy", scoring_func="softmax"), "topk_method"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                        "mscale_all_dim": 0.5}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                        "mscale_all_dim": 1.0}), "rope_scaling"),
])
def test_configs_llama_cpp_cannot_run_are_one_line_naming_the_key(overrides, key, tokenizer, tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", tokenizer, **overrides)
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{key}'" in err and "llama.cpp" in err and "Traceback" not in err
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


@pytest.mark.parametrize("eps", [1e-5, 1e-4, 1e-2, 1e-8])
def test_an_rms_norm_eps_llama_cpp_applies_differently_needs_the_flag(eps, tokenizer, tmp_path, capsys):
    """llama.cpp applies rms_norm_eps to the latent norms too (1e-6 in nanoseek): refused, naming the key and why,
    unless --allow-norm-eps-mismatch accepts it; then written with the config's eps and a note."""
    make_checkpoint(tmp_path / "ck", tokenizer, rms_norm_eps=eps)
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'rms_norm_eps'" in err and "latent norms" in err and "Traceback" not in err
    assert "--allow-norm-eps-mismatch" in err
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    assert export("--allow-norm-eps-mismatch", tmp_path / "ck", tmp_path / "m.gguf") == 0
    captured = capsys.readouterr()
    assert "rms_norm_eps" in captured.err and "note" in captured.err
    assert read(tmp_path / "m.gguf")[0]["deepseek2.attention.layer_norm_rms_epsilon"] == pytest.approx(eps)


def test_the_latent_norms_eps_exports_without_the_flag(tokenizer, tmp_path, capsys):
    """1e-6, also as a float32 round trip writes it, is the latent norms' own: no flag, no note."""
    make_checkpoint(tmp_path / "ck", tokenizer, rms_norm_eps=float(np.float32(1e-6)))
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 0
    assert "rms_norm_eps" not in capsys.readouterr().err


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_an_output_that_is_a_file_the_export_reads_is_refused(tokenizer, tmp_path, capsys, monkeypatch):
    """Even with --overwrite: the checkpoint's weights, config and tokenizer files, named directly, with `..`,
    through a symbolic link (to the file or to its folder) or a hard link, or any path inside the checkpoint."""
    run = tmp_path / "run"
    make_checkpoint(run / "final", tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):          # found in the run folder, as runs keep it
        (run / "final" / name).rename(run / name)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "alias").symlink_to(run / "final")
    (tmp_path / "sym.gguf").symlink_to(run / "final" / "model.safetensors")
    (tmp_path / "tok-sym.gguf").symlink_to(run / "tokenizer.json")
    os.link(run / "final" / "model.safetensors", tmp_path / "hard.gguf")
    before, before_run = _bytes(run / "final"), _bytes(run)
    monkeypatch.chdir(tmp_path / "elsewhere")
    cases = [run / "final" / "model.safetensors", run / "final" / "config.json", "../run/final/model.safetensors",
             "../run/final/../final/config.json", run / "tokenizer.json", "../run/tokenizer_config.json",
             tmp_path / "alias" / "model.safetensors", tmp_path / "sym.gguf", tmp_path / "tok-sym.gguf",
             tmp_path / "hard.gguf", run / "final" / "new.gguf", "../alias/new.gguf", "../run/final/./x.gguf"]
    for out in cases:
        for target in (run, "../run", tmp_path / "alias"):
            assert export("--overwrite", target, out) == 2, (out, target)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "the export reads" in err and "Traceback" not in err, (out, err)
    assert _bytes(run / "final") == before and _bytes(run) == before_run
    assert (tmp_path / "sym.gguf").is_symlink() and (tmp_path / "hard.gguf").read_bytes() == before["model.safetensors"]
    assert not list(tmp_path.rglob(".*.tmp-*"))
    # next to the checkpoint (in the run folder, not inside the checkpoint) is fine
    assert export(run, "../run/model.gguf") == 0 and (run / "model.gguf").read_bytes()[:4] == b"GGUF"


def test_a_tokenizer_or_shard_outside_the_checkpoint_is_an_input_too(tokenizer, tmp_path, capsys):
    """--tokenizer's files, and weights the checkpoint links to or its index names outside its folder."""
    make_checkpoint(tmp_path / "ck", tokenizer)
    tokenizer.save(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "blobs").mkdir()                  # a hub-cache layout: the folder holds links to blobs
    (tmp_path / "ck" / "model.safetensors").rename(tmp_path / "blobs" / "abc123")
    (tmp_path / "ck" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc123")
    for out in [tmp_path / "tok" / "tokenizer.json", tmp_path / "tok" / "tokenizer_config.json",
                tmp_path / "tok" / "chat_template.jinja", tmp_path / "blobs" / "abc123"]:
        assert export("--overwrite", "--tokenizer", tmp_path / "tok", tmp_path / "ck", out) == 2, out
        assert "the export reads" in capsys.readouterr().err
    # an index naming a shard outside the folder
    from safetensors.torch import load_file
    names = list(load_file(tmp_path / "blobs" / "abc123"))
    (tmp_path / "ck" / "model.safetensors").unlink()
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../blobs/abc123" for n in names}}))
    assert export("--overwrite", tmp_path / "ck", tmp_path / "blobs" / "abc123") == 2
    assert "the export reads" in capsys.readouterr().err
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 0        # the index works, and the shard is intact
    assert set(load_file(tmp_path / "blobs" / "abc123")) == set(names)


def test_output_file_rules(tokenizer, tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", tokenizer)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's file")
    assert export(tmp_path / "ck", out) == 2                            # never over a file without --overwrite
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"the user's file"
    assert export(tmp_path / "ck", tmp_path) == 2                       # a folder
    assert "is a folder" in capsys.readouterr().err
    assert export(tmp_path / "ck", tmp_path / "missing" / "m.gguf") == 2
    assert "does not exist" in capsys.readouterr().err
    target = tmp_path / "elsewhere.gguf"
    target.write_bytes(b"keep")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    assert export("--overwrite", tmp_path / "ck", link) == 0           # the link is replaced, not written through
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes()[:4] == b"GGUF"
    assert export("--overwrite", tmp_path / "ck", out) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    capsys.readouterr()
    # a failed export (a bad tokenizer, found only after the output checks) leaves the old file whole
    before = out.read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    assert export("--overwrite", "--tokenizer", tmp_path / "bad", tmp_path / "ck", out) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "invalid JSON" in err and err.count("\n") == 1
    assert out.read_bytes() == before and not list(tmp_path.glob(".m.gguf.tmp*"))


def test_missing_tokenizer_and_wrong_tokenizer_are_refused(tokenizer, tmp_path, capsys):
    model = make_tiny_model(vocab_size=tokenizer.vocab_size - 50).eval()     # too small for the tokenizer
    save_pretrained(model, tmp_path / "ck")
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    tokenizer.save(tmp_path / "tok")
    assert export("--tokenizer", tmp_path / "tok", tmp_path / "ck", tmp_path / "m.gguf") == 2
    assert "does not belong" in capsys.readouterr().err
    assert export(tmp_path / "nothing", tmp_path / "m.gguf") == 2
    assert "no such file" in capsys.readouterr().err


def test_a_run_folder_resolves_to_its_checkpoint(tokenizer, tmp_path, capsys):
    make_checkpoint(tmp_path / "run" / "final", tokenizer)
    assert export("--name", "my-model", tmp_path / "run", tmp_path / "m.gguf") == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(tmp_path / "run" / "final")
    assert read(tmp_path / "m.gguf")[0]["general.name"] == "my-model"


# ---------------------------------------------------------------------------- llama.cpp itself
def _llama_cpp():
    try:
        import llama_cpp
    except Exception as e:          # not installed, or its shared library fails to load
        pytest.skip(f"llama-cpp-python is not importable ({type(e).__name__}: {e}); install it to run "
                    "llama.cpp on the exported files (see the README)")
    return llama_cpp


def _llama(llama_cpp, path, n_ctx=128):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=1, n_threads_batch=1, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, seed=0)


def _greedy_llama(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return logits, out


@torch.no_grad()
def _greedy_nanoseek(model, prompt, n):
    ids = list(prompt)
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return logits, ids[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("name,mtp", [(n, False) for n in CONFIGS] + [("v3", True)])
def test_llama_cpp_runs_the_export_like_nanoseek(name, mtp, tokenizer, tmp_path, capsys):
    llama_cpp = _llama_cpp()
    model = make_checkpoint(tmp_path / "ck", tokenizer, seed=1, **CONFIGS[name])
    assert export(*(["--mtp"] if mtp else []), *eps_flag(CONFIGS[name]), tmp_path / "ck", tmp_path / "m.gguf") == 0
    llm = _llama(llama_cpp, tmp_path / "m.gguf")
    prompt = tokenizer.encode("The quick brown fox: what is 17 + 25?", add_bos=True)
    ll_logits, ll_tokens = _greedy_llama(llm, prompt, 24)
    ns_logits, ns_tokens = _greedy_nanoseek(model, prompt, 24)
    diff = float(np.abs(ll_logits - ns_logits).max())
    scale = float(np.abs(ns_logits).max())
    print(f"\n[gguf] {name}{' +mtp' if mtp else ''}: max |logit diff| = {diff:.2e} (logits up to {scale:.2f}); "
          f"greedy tokens equal: {ll_tokens == ns_tokens}", file=os.sys.stderr)
    assert diff < 1e-4 * max(1.0, scale)
    assert ll_tokens == ns_tokens
    if mtp:     # llama.cpp skips MTP blocks unless asked; asked, it loads and shape-checks every one of them
        params = llama_cpp.llama_model_default_params()
        params.load_mtp = True
        m = llama_cpp.llama_model_load_from_file(str(tmp_path / "m.gguf").encode(), params)
        assert m, "llama.cpp failed to load the MTP blocks"
        llama_cpp.llama_model_free(m)


@pytest.mark.slow
def test_llama_cpp_applies_rms_norm_eps_to_the_latent_norms(tokenizer, tmp_path, capsys):
    """Why another rms_norm_eps needs --allow-norm-eps-mismatch: llama.cpp's logits move by far more than the
    1e-4 the exact exports reach (on this model 0.93 at 1e-2), because its latent norms take the config's eps."""
    llama_cpp = _llama_cpp()
    model = make_checkpoint(tmp_path / "ck", tokenizer, seed=3, rms_norm_eps=1e-2)
    assert export("--allow-norm-eps-mismatch", tmp_path / "ck", tmp_path / "m.gguf") == 0
    prompt = tokenizer.encode("The quick brown fox: what is 17 + 25? " * 3, add_bos=True)
    ll_logits, _ = _greedy_llama(_llama(llama_cpp, tmp_path / "m.gguf"), prompt, 0)
    ns_logits, _ = _greedy_nanoseek(model, prompt, 0)
    diff, scale = float(np.abs(ll_logits - ns_logits).max()), float(np.abs(ns_logits).max())
    print(f"\n[gguf] rms_norm_eps=1e-2 (--allow-norm-eps-mismatch): max |logit diff| = {diff:.2e} "
          f"(logits up to {scale:.2f})", file=os.sys.stderr)
    assert diff > 1e-2 * max(1.0, scale)


TOKENIZATION_TEXTS = CORPUS[:4] + [
    "", " ", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n", "12345 678.9 -0.5 1e10 ²³ ½ ٣٤",
    "emoji 🙂🙂 👩‍👩‍👧 flags 🇫🇷", "CJK 日本語 한국어 中文", "don't you'll we've I'M SHE'S", "x" * 300,
    "mixed123abc456 ab12 a1b2c3", "   \n  \t ", "<｜User｜>hi<｜Assistant｜><think>\nok\n</think>\n\n42<｜end▁of▁sentence｜>",
    "naïve café Ωmega ß ﬁ", "punctuation!!! ??? ... --- ((()))", "العربية עברית हिन्दी",
]


# characters where pre-tokenizers part ways: unusual whitespace, numerals beyond 0-9, combining marks,
# joiners, contractions, control-token strings
FUZZ_POOL = (list("abcXYZ019 \t\n\r.,;:!?'\"-_()[]{}<>/\\@#$%^&*+=|~`")
             + ["\u00a0", "\u3000", "\u2028", "\u0085", "\u200b", "é", "ß", "ﬁ", "Ω", "日", "한", "ع", "\u0301", "²",
                "½", "٣", "Ⅻ", "🙂", "👩\u200d👩", "🇫🇷", "\ufeff", "\x1f", "'s", "'LL", " 12", "  ", "\n\n",
                "<｜User｜>", "<think>", "</think>"])


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_nanoseek(tokenizer, tmp_path, capsys):
    llama_cpp = _llama_cpp()
    make_checkpoint(tmp_path / "ck", tokenizer, **CONFIGS["dense"])
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    rng = np.random.default_rng(0)
    fuzz = ["".join(rng.choice(FUZZ_POOL, size=rng.integers(1, 40))) for _ in range(2000)]
    differ = []
    for text in TOKENIZATION_TEXTS + fuzz:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != theirs:
            differ.append((text, ours, theirs))
        assert llm.detokenize(theirs, special=True).decode("utf-8", "replace") == tokenizer.decode(ours) or ours != theirs
    n = len(TOKENIZATION_TEXTS) + len(fuzz)
    print(f"\n[gguf] tokenization (nanoseek's, smollm): {n - len(differ)}/{n} texts identical", file=os.sys.stderr)
    assert not differ, differ[:3]
    # a GPT-2-style tokenizer from elsewhere (llama.cpp's gpt-2 pre-tokenizer) against HF tokenizers
    tk = _foreign_tokenizer(tmp_path / "tok", {"bos_token": "<s>", "eos_token": "</s>"})
    assert export("--tokenizer", tmp_path / "tok", tmp_path / "ck", tmp_path / "f.gguf") == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "f.gguf"), vocab_only=True, verbose=False)
    differ = [t for t in TOKENIZATION_TEXTS + fuzz
              if tk.encode(t, add_special_tokens=False).ids != llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)]
    print(f"[gguf] tokenization (GPT-2 style, gpt-2): {n - len(differ)}/{n} texts identical", file=os.sys.stderr)
    assert not differ, differ[:3]


CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "42", "reasoning": "17 + 25 = 42"}, {"role": "user", "content": "héllo 🙂\n\tok?"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "  spaces  "}],
]


@pytest.mark.slow
def test_llama_cpp_renders_the_chat_template_to_nanoseeks_ids(tokenizer, tmp_path, capsys):
    llama_cpp = _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    make_checkpoint(tmp_path / "ck", tokenizer, **CONFIGS["dense"])
    assert export(tmp_path / "ck", tmp_path / "m.gguf") == 0
    fields, _ = read(tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    # what llama-cpp-python's chat completion does with the template the GGUF carries
    fmt = Jinja2ChatFormatter(fields["tokenizer.chat_template"], bos_token=tokenizer.id_to_token(tokenizer.bos_id),
                              eos_token=tokenizer.id_to_token(tokenizer.eos_id))
    for messages in CHATS:
        result = fmt(messages=messages)
        ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        assert ids == tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_llama_cpp_runs_half_precision_exports(dtype, tokenizer, tmp_path, capsys):
    """llama.cpp also rounds the activations of half-precision matmuls, so only closeness is expected
    (a misplaced tensor would be off by the logits' own size)."""
    llama_cpp = _llama_cpp()
    model = make_checkpoint(tmp_path / "ck", tokenizer, seed=1)
    assert export("--dtype", dtype, tmp_path / "ck", tmp_path / "m.gguf") == 0
    prompt = tokenizer.encode("The quick brown fox: what is 17 + 25?", add_bos=True)
    ll_logits, _ = _greedy_llama(_llama(llama_cpp, tmp_path / "m.gguf"), prompt, 0)
    ns_logits, _ = _greedy_nanoseek(model, prompt, 0)
    diff, scale = float(np.abs(ll_logits - ns_logits).max()), float(np.abs(ns_logits).max())
    print(f"\n[gguf] {dtype}: max |logit diff| = {diff:.2e} (logits up to {scale:.2f})", file=os.sys.stderr)
    assert diff < 0.05 * max(1.0, scale)
