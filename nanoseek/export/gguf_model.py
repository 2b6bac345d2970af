"""GGUF export: an HF DeepSeek-V3 checkpoint as one llama.cpp ``deepseek2`` model file.

llama.cpp runs DeepSeek-V2 and V3 as the architecture ``deepseek2`` (``src/models/deepseek2.cpp``).
This module writes what its loader reads, from the checkpoint's ``config.json`` and safetensors
(HF names, as :mod:`nanoseek.model.checkpoint` saves them), in the layout of llama.cpp's own
``convert_hf_to_gguf.py``:

* **Metadata** ``deepseek2.*`` (:func:`arch_metadata`): layers, widths, heads (``head_count_kv =
  1``: absorbed MLA is MQA over the latent), ``kv_lora_rank``, ``q_lora_rank`` (0 when the
  query is full rank), ``key_length = kv_lora_rank + qk_rope_head_dim`` and ``value_length =
  kv_lora_rank`` (the latent cache), ``key_length_mla`` / ``value_length_mla`` (the per-head
  dims), RoPE dims and base (and YaRN), the MoE (experts, experts per token, groups and groups
  kept, gating function sigmoid/softmax, weight normalisation, ``routed_scaling_factor`` as
  ``expert_weights_scale``, shared experts, leading dense layers), ``nextn_predict_layers`` with MTP.
* **Tensors** (:func:`gguf_tensors`), each the checkpoint's tensor under llama.cpp's name with
  these transforms only: ``kv_b_proj`` [H*(nope+v), c] is split per head into ``attn_k_b``
  (W_UK transposed, [H, c, nope]) and ``attn_v_b`` (W_UV, [H, v, c]), the absorbed-MLA form; the
  routed experts are stacked into ``ffn_{gate,up,down}_exps`` [E, ...]; the router bias
  ``e_score_correction_bias`` is ``exp_probs_b.bias``; with ``rope_interleave: false`` (HF's
  halves layout) the rope rows of ``q_b_proj``/``q_proj`` and ``kv_a_proj_with_mqa`` are
  permuted to llama.cpp's adjacent pairs (a permutation applied to queries and keys alike, so
  every attention score is unchanged); a MoE layer without shared experts gets one all-zero
  shared expert (llama.cpp's deepseek2 always adds one; zero weights add exactly zero). MTP
  module k (``model.layers.{L+k}``) becomes block ``L+k`` with its ``nextn.*`` tensors, written
  only with ``mtp`` (llama.cpp's converter drops them for deepseek2, and older llama.cpp/ollama
  builds refuse a file with tensors they do not load).
* Matrices in F32, F16 or BF16; vectors (norms, the expert bias) and the router stay F32.

Configs llama.cpp cannot run are refused by :func:`check_config` with one line naming the key:
standard attention (``attention_type: mha``), attention biases, MoE every n-th layer
(``moe_layer_freq > 1``), V2's group-limited routing by the group maximum, YaRN with ``mscale``
!= ``mscale_all_dim``, more experts or layers than llama.cpp holds, and the layer counts llama.cpp
takes for a V2-Lite (26, 27) with a low-rank query. Norm epsilons: llama.cpp uses
``rms_norm_eps`` for every norm, HF and nanoseek 1e-6 for the two latent norms (``q_a_layernorm``,
``kv_a_layernorm``), so a config with another ``rms_norm_eps`` runs differently there (measured on
the tiny test model: max logit difference 6e-4 at 1e-4, 0.93 with other greedy tokens at 1e-2); it
is refused unless ``allow_norm_eps_mismatch`` (``--allow-norm-eps-mismatch``) accepts the
difference, and then exported with a note.

:func:`inputs` lists the files an export reads, so the command can refuse an output path that
would replace one of them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanoseek.errors import ConfigError, UserError

ARCH = "deepseek2"
MAX_LAYERS = 512            # llama.cpp's LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024          # llama.cpp's LLAMA_MAX_EXPERTS
LATENT_NORM_EPS = 1e-6      # the q_a/kv_a latent norms' epsilon in HF's DeepseekV3 and nanoseek (not configurable)
LITE_LAYER_COUNTS = (26, 27)  # llama.cpp reads no q_lora_rank for these (DeepSeek-V2-Lite and kin; also 48 layers
                              # with a 128256-token vocabulary)


def _refuse(key: str, value, why: str) -> ConfigError:
    return ConfigError(f"config field '{key}' = {value!r}: {why} (llama.cpp's deepseek2 cannot run it)")


def check_config(cfg, allow_norm_eps_mismatch: bool = False) -> list[str]:
    """Raise ConfigError naming the key if llama.cpp cannot run ``cfg`` (as nanoseek runs it); returns notes on
    what is approximated. ``allow_norm_eps_mismatch`` accepts an ``rms_norm_eps`` other than the latent norms'."""
    notes = []
    if cfg.attention_type != "mla":
        raise _refuse("attention_type", cfg.attention_type, "only MLA is supported")
    if cfg.index_n_heads:
        raise _refuse("index_n_heads", cfg.index_n_heads, "DeepSeek-V3.2's sparse attention (lightning indexer) "
                      "is not in llama.cpp's deepseek2 architecture")
    if cfg.attention_bias:
        raise _refuse("attention_bias", cfg.attention_bias, "the attention projections have no bias there")
    if cfg.num_hidden_layers + cfg.num_nextn_predict_layers > MAX_LAYERS:
        raise _refuse("num_hidden_layers", cfg.num_hidden_layers, f"more than {MAX_LAYERS} layers with MTP")
    if cfg.q_lora_rank and (cfg.num_hidden_layers in LITE_LAYER_COUNTS
                            or (cfg.num_hidden_layers == 48 and cfg.vocab_size == 128256)):
        raise _refuse("q_lora_rank", cfg.q_lora_rank, f"llama.cpp reads no q_lora_rank for a {cfg.num_hidden_layers}-"
                      "layer model (it takes it for DeepSeek-V2-Lite, whose query is full rank)")
    if cfg.qk_nope_head_dim < 1:
        raise _refuse("qk_nope_head_dim", cfg.qk_nope_head_dim, "must be >= 1")
    if has_moe(cfg):
        if cfg.moe_layer_freq != 1:
            raise _refuse("moe_layer_freq", cfg.moe_layer_freq, "only leading dense layers then all-MoE is supported")
        if cfg.n_routed_experts > MAX_EXPERTS:
            raise _refuse("n_routed_experts", cfg.n_routed_experts, f"at most {MAX_EXPERTS} experts")
        if (_groups(cfg) and cfg.topk_method == "group_limited_greedy"):
            raise _refuse("topk_method", cfg.topk_method, "its groups are ranked by their best expert; llama.cpp "
                          "ranks them by the sum of the top two (noaux_tc)")
    rs = cfg.rope_scaling
    if rs and (rs.get("type", rs.get("rope_type")) == "yarn"):
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if not (m and m_all and m == m_all):
            raise _refuse("rope_scaling", rs, "YaRN is supported with mscale == mscale_all_dim (as DeepSeek-V2/V3 "
                          "release it) only")
    if not math.isclose(cfg.rms_norm_eps, LATENT_NORM_EPS, rel_tol=1e-4):
        why = (f"llama.cpp also applies it to the q_a/kv_a latent norms, which use {LATENT_NORM_EPS:g} in HF and "
               "nanoseek, so llama.cpp's logits would differ from the checkpoint's")
        if not allow_norm_eps_mismatch:
            raise ConfigError(f"config field 'rms_norm_eps' = {cfg.rms_norm_eps!r}: {why}; pass "
                              "--allow-norm-eps-mismatch to export it anyway")
        notes.append(f"rms_norm_eps={cfg.rms_norm_eps:g}: {why} (accepted by --allow-norm-eps-mismatch)")
    return notes


def _groups(cfg) -> tuple[int, int] | None:
    """(n_group, topk_group) when group-limited routing changes the choice, else None."""
    g = cfg.n_group or 1
    tg = cfg.topk_group or g
    if cfg.topk_method == "greedy" or g <= 1 or tg >= g:
        return None
    return g, tg


def has_moe(cfg) -> bool:
    """Whether any block, the MTP blocks included, is a MoE block."""
    return any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))


def leading_dense(cfg) -> int:
    """llama.cpp's leading dense blocks: first_k_dense_replace, or every block (MTP too) of a dense model."""
    if not has_moe(cfg):
        return cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return cfg.first_k_dense_replace


def arch_metadata(cfg, n_mtp: int) -> list[tuple[str, str, object]]:
    """(key, GGUF type, value) of every ``deepseek2.*`` key written, keys as llama.cpp names them."""
    import gguf

    K, a = gguf.Keys, ARCH
    moe = has_moe(cfg)
    out: list[tuple[str, str, object]] = [
        (K.LLM.BLOCK_COUNT, "uint32", cfg.num_hidden_layers + n_mtp),
        (K.LLM.CONTEXT_LENGTH, "uint32", cfg.max_position_embeddings),
        (K.LLM.EMBEDDING_LENGTH, "uint32", cfg.hidden_size),
        (K.LLM.FEED_FORWARD_LENGTH, "uint32", cfg.intermediate_size),
        (K.LLM.VOCAB_SIZE, "uint32", cfg.vocab_size),
        (K.Attention.HEAD_COUNT, "uint32", cfg.num_attention_heads),
        (K.Attention.HEAD_COUNT_KV, "uint32", 1),
        (K.Attention.LAYERNORM_RMS_EPS, "float32", cfg.rms_norm_eps),
        (K.Attention.KV_LORA_RANK, "uint32", cfg.kv_lora_rank),
        (K.Attention.KEY_LENGTH, "uint32", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        (K.Attention.VALUE_LENGTH, "uint32", cfg.kv_lora_rank),
        (K.Attention.KEY_LENGTH_MLA, "uint32", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim),
        (K.Attention.VALUE_LENGTH_MLA, "uint32", cfg.v_head_dim),
        (K.Rope.DIMENSION_COUNT, "uint32", cfg.qk_rope_head_dim),
        (K.Rope.FREQ_BASE, "float32", cfg.rope_theta),
        (K.LLM.LEADING_DENSE_BLOCK_COUNT, "uint32", leading_dense(cfg)),
        (K.LLM.EXPERT_FEED_FORWARD_LENGTH, "uint32", cfg.moe_intermediate_size),
        (K.LLM.EXPERT_SHARED_COUNT, "uint32", max(cfg.n_shared_experts or 0, 1) if moe else 0),
    ]
    # required by llama.cpp's loader (except for 26/27-layer models); 0 means a full-rank query (attn_q)
    out.append((K.Attention.Q_LORA_RANK, "uint32", cfg.q_lora_rank or 0))
    if moe:
        out += [
            (K.LLM.EXPERT_COUNT, "uint32", cfg.n_routed_experts),
            (K.LLM.EXPERT_USED_COUNT, "uint32", cfg.num_experts_per_tok),
            (K.LLM.EXPERT_GATING_FUNC, "uint32",
             int(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX)),
            (K.LLM.EXPERT_WEIGHTS_SCALE, "float32", cfg.routed_scaling_factor),
            (K.LLM.EXPERT_WEIGHTS_NORM, "bool", bool(cfg.norm_topk_prob)),
        ]
        if _groups(cfg):
            g, tg = _groups(cfg)
            out += [(K.LLM.EXPERT_GROUP_COUNT, "uint32", g), (K.LLM.EXPERT_GROUP_USED_COUNT, "uint32", tg)]
    if n_mtp:
        out.append((K.LLM.NEXTN_PREDICT_LAYERS, "uint32", n_mtp))
    rs = cfg.rope_scaling
    if rs and (rs.get("type", rs.get("rope_type")) == "yarn"):
        out += [
            (K.Rope.SCALING_TYPE, "string", "yarn"),
            (K.Rope.SCALING_FACTOR, "float32", float(rs["factor"])),
            (K.Rope.SCALING_ORIG_CTX_LEN, "uint32", int(rs["original_max_position_embeddings"])),
            # llama.cpp divides this key by 0.1 on load (its converter's historical convention)
            (K.Rope.SCALING_YARN_LOG_MUL, "float32", 0.1 * float(rs["mscale_all_dim"])),
            (K.Rope.SCALING_YARN_BETA_FAST, "float32", float(rs.get("beta_fast") or 32)),
            (K.Rope.SCALING_YARN_BETA_SLOW, "float32", float(rs.get("beta_slow") or 1)),
        ]
    return [(k.format(arch=a), t, v) for k, t, v in out]


# ---------------------------------------------------------------------------- tensors
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# HF name inside a layer -> gguf MODEL_TENSOR member name (the plain renames)
_LAYER_NAMES = {
    "input_layernorm.weight": "ATTN_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.q_a_proj.weight": "ATTN_Q_A",
    "self_attn.q_a_layernorm.weight": "ATTN_Q_A_NORM",
    "self_attn.q_b_proj.weight": "ATTN_Q_B",
    "self_attn.kv_a_proj_with_mqa.weight": "ATTN_KV_A_MQA",
    "self_attn.kv_a_layernorm.weight": "ATTN_KV_A_NORM",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
    "mlp.gate.weight": "FFN_GATE_INP",
    "mlp.gate.e_score_correction_bias": "FFN_EXP_PROBS_B",
    "mlp.shared_experts.gate_proj.weight": "FFN_GATE_SHEXP",
    "mlp.shared_experts.up_proj.weight": "FFN_UP_SHEXP",
    "mlp.shared_experts.down_proj.weight": "FFN_DOWN_SHEXP",
    # MTP module (model.layers.{L+k})
    "eh_proj.weight": "NEXTN_EH_PROJ",
    "enorm.weight": "NEXTN_ENORM",
    "hnorm.weight": "NEXTN_HNORM",
    "embed_tokens.weight": "NEXTN_EMBED_TOKENS",
    "shared_head.head.weight": "NEXTN_SHARED_HEAD_HEAD",
    "shared_head.norm.weight": "NEXTN_SHARED_HEAD_NORM",
}
_MTP_ONLY = {"eh_proj.weight", "enorm.weight", "hnorm.weight", "embed_tokens.weight", "shared_head.head.weight",
              "shared_head.norm.weight"}
_EXPERT_NAMES = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}


def tensor_name(member: str, layer: int | None = None) -> str:
    """llama.cpp's tensor name for a gguf ``MODEL_TENSOR`` member (``.bias`` for the expert bias)."""
    import gguf

    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, member)]
    name = base.format(bid=layer) if layer is not None else base
    return name + (".bias" if member == "FFN_EXP_PROBS_B" else ".weight")


def rope_pair_order(rope_dim: int) -> np.ndarray:
    """Row order taking HF's halves layout [x_0..x_{h-1} | y_0..y_{h-1}] to adjacent pairs [x_0, y_0, x_1, y_1, ...]."""
    h = rope_dim // 2
    return np.stack([np.arange(h), np.arange(h) + h], axis=1).reshape(-1)


def gguf_tensors(hf: dict, cfg, with_mtp: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in PyTorch's [out, in] order) for every tensor written."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qk = nope + rope
    order = None if cfg.rope_interleave else rope_pair_order(rope)

    def arr(t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def permute_q(w: np.ndarray) -> np.ndarray:       # rows [H*(nope+rope)]: permute each head's rope rows
        w = w.reshape(H, qk, -1).copy()
        w[:, nope:] = w[:, nope:][:, order]
        return w.reshape(H * qk, -1)

    def permute_kv_a(w: np.ndarray) -> np.ndarray:    # rows [c + rope]: permute the trailing rope rows
        w = w.copy()
        w[cfg.kv_lora_rank:] = w[cfg.kv_lora_rank:][order]
        return w

    names = set(hf)
    done: set[str] = set()
    for top, member in (("model.embed_tokens.weight", "TOKEN_EMBD"), ("model.norm.weight", "OUTPUT_NORM"),
                        ("lm_head.weight", "OUTPUT")):
        if top in hf and not (member == "OUTPUT" and cfg.tie_word_embeddings):
            yield tensor_name(member), arr(hf[top])
        done.add(top)
    n_layers = L + (cfg.num_nextn_predict_layers if with_mtp else 0)
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        layer = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
        experts: dict[str, dict[int, object]] = {}
        for rest, full in sorted(layer.items()):
            done.add(full)
            if rest in _MTP_ONLY and i < L:
                raise UserError(f"checkpoint tensor '{full}': an MTP tensor in a main layer")
            e = _EXPERT_RE.match(rest)
            if e:
                experts.setdefault(e.group(2), {})[int(e.group(1))] = hf[full]
            elif rest == "self_attn.kv_b_proj.weight":
                w = arr(hf[full]).reshape(H, nope + v, cfg.kv_lora_rank)
                yield tensor_name("ATTN_K_B", i), np.ascontiguousarray(w[:, :nope].transpose(0, 2, 1))   # [H, c, nope]
                yield tensor_name("ATTN_V_B", i), np.ascontiguousarray(w[:, nope:])                      # [H, v, c]
            elif rest in _LAYER_NAMES:
                w = arr(hf[full])
                if order is not None and rest in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
                    w = permute_q(w)
                elif order is not None and rest == "self_attn.kv_a_proj_with_mqa.weight":
                    w = permute_kv_a(w)
                yield tensor_name(_LAYER_NAMES[rest], i), w
            else:
                raise UserError(f"checkpoint tensor '{full}' has no place in llama.cpp's deepseek2 layout")
        for kind, by_idx in sorted(experts.items()):
            missing = [j for j in range(cfg.n_routed_experts) if j not in by_idx]
            if missing:
                raise UserError(f"checkpoint layer {i}: routed experts {missing[:8]} have no {kind}")
            yield tensor_name(_EXPERT_NAMES[kind], i), np.stack([arr(by_idx[j]) for j in range(cfg.n_routed_experts)])
        if cfg.is_moe_layer(i) and not cfg.n_shared_experts:
            inter, d = cfg.moe_intermediate_size, cfg.hidden_size
            yield tensor_name("FFN_GATE_SHEXP", i), np.zeros((inter, d), np.float32)
            yield tensor_name("FFN_UP_SHEXP", i), np.zeros((inter, d), np.float32)
            yield tensor_name("FFN_DOWN_SHEXP", i), np.zeros((d, inter), np.float32)
    left = sorted(n for n in names - done if not (_LAYER_RE.match(n) and int(_LAYER_RE.match(n).group(1)) >= L))
    if left:
        raise UserError(f"checkpoint tensors {left[:5]} have no place in llama.cpp's deepseek2 layout")


def _keep_f32(name: str, w: np.ndarray) -> bool:
    """Vectors (norms, the expert bias) and the router stay F32, as llama.cpp's converter keeps them."""
    return w.ndim == 1 or ".ffn_gate_inp." in name


# ---------------------------------------------------------------------------- the file
def _tokenizer_file(checkpoint: Path, options) -> Path | None:
    """The ``tokenizer.json`` the export reads: ``options.tokenizer`` (a file or its folder), else the checkpoint's."""
    from nanoseek.infer.loading import find_tokenizer

    tok = Path(options.tokenizer) if options.tokenizer else find_tokenizer(checkpoint)
    if tok is not None and tok.is_dir():
        tok = tok / "tokenizer.json"
    return tok


def inputs(checkpoint: Path, options) -> list[Path]:
    """Every file :func:`export` may read: the checkpoint folder's files (config, safetensors, the shards its
    index names) and the tokenizer files (``tokenizer.json`` and the config and template beside it)."""
    from nanoseek.model.checkpoint import INDEX_NAME

    files = [p for p in checkpoint.iterdir()] if checkpoint.is_dir() else []
    try:
        files += [checkpoint / f for f in json.loads((checkpoint / INDEX_NAME).read_text(encoding="utf-8"))
                  ["weight_map"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass            # no index, or a broken one the export refuses itself
    tok = _tokenizer_file(checkpoint, options)
    if tok is not None:
        files += [tok, tok.parent / "tokenizer_config.json", tok.parent / "chat_template.jinja"]
    return files


def export(checkpoint: Path, out: Path, options) -> dict:
    """Write ``out`` (a temporary path the caller swaps in) from the HF checkpoint folder ``checkpoint``."""
    import gguf

    from nanoseek.export.gguf_vocab import read_vocab, write_vocab
    from nanoseek.infer.loading import no_tokenizer_hint
    from nanoseek.model.checkpoint import load_hf_tensors
    from nanoseek.model.registry import config_from_json, require

    cfg = config_from_json(checkpoint / "config.json")
    require(cfg, "gguf", f"{checkpoint}: GGUF export")
    notes = check_config(cfg, allow_norm_eps_mismatch=options.allow_norm_eps_mismatch)
    tok = _tokenizer_file(checkpoint, options)
    if tok is None:
        raise UserError(f"no tokenizer.json for {checkpoint} (a GGUF file carries its vocabulary); pass "
                        f"--tokenizer PATH{no_tokenizer_hint(checkpoint)}")
    vocab = read_vocab(tok, cfg.vocab_size, {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")})
    hf = load_hf_tensors(checkpoint, cfg, dtype=None)
    L = cfg.num_hidden_layers
    has_mtp = any(_LAYER_RE.match(n) and int(_LAYER_RE.match(n).group(1)) >= L for n in hf)
    if options.mtp and not (cfg.num_nextn_predict_layers and has_mtp):
        raise UserError(f"--mtp: {checkpoint} has no MTP modules (num_nextn_predict_layers="
                        f"{cfg.num_nextn_predict_layers}{', and no MTP tensors' if not has_mtp else ''})")
    n_mtp = cfg.num_nextn_predict_layers if options.mtp else 0

    ftype, qtype = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
                    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
                    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16)}[options.dtype]
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(options.name or checkpoint.name)
    writer.add_file_type(int(ftype))
    adders = {"uint32": writer.add_uint32, "float32": writer.add_float32, "bool": writer.add_bool,
              "string": writer.add_string}
    for key, kind, value in arch_metadata(cfg, n_mtp):
        adders[kind](key, value)
    write_vocab(writer, vocab)
    n_tensors = n_params = 0
    for name, w in gguf_tensors(hf, cfg, with_mtp=bool(n_mtp)):
        w = np.ascontiguousarray(w, dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32 or _keep_f32(name, w):
            writer.add_tensor(name, w)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        n_tensors += 1
        n_params += w.size
    hf.clear()          # the writer holds its own arrays now
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": ARCH, "tensors": n_tensors, "parameters": n_params, "dtype": options.dtype,
            "mtp_blocks": n_mtp, "tokenizer": str(tok), "pre_tokenizer": vocab.pre, "notes": notes + vocab.notes}


__all__ = ["ARCH", "LATENT_NORM_EPS", "check_config", "inputs", "arch_metadata", "gguf_tensors", "tensor_name", "rope_pair_order",
           "leading_dense", "has_moe", "export"]
