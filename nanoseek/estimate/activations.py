"""Activation bytes per token a decoder layer keeps for its backward, per recomputation mode.

The analytic twin of what ``nanoseek.train.recompute.held_activation_bytes`` measures on a real
forward (``tests/test_recompute.py`` holds them equal, to the byte, on several configs): each
tensor kind nanoseek's eager DeepSeek-V3 layer leaves saved, per token, under
``[train] recompute`` = ``none`` (everything autograd saves), ``selective`` (DeepSeek-V3's
recomputation of RMSNorm and the MLA up-projections: only matmul and attention outputs kept) or
``full`` (the layer's input only). The memory estimate multiplies these by tokens per micro-batch
and layers per stage.

Assumptions: attention on a fused kernel (flash / memory-efficient SDPA keeps its output and
log-sum-exp, no T x T scores; the CPU uses one when MLA's key and value head sizes are equal,
and the math path, with O(T) more per token and head, otherwise); activations of one dtype
(``dtype_bytes``) with the router, RMSNorm statistics and log-sum-exp in fp32 and routing
indices int64. Left out: V3.2's indexer in training (its query/key/weights, counted roughly, and
the O(T) attention probabilities of the KL stage), and MHA layers (MLA only).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..model.registry import V3, family_of

MODES = ("none", "selective", "full")     # the [train] recompute values (train/recompute.py's POLICIES)


def layer_activation_bytes(config, mode: str, moe: bool, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes per token one decoder layer keeps for its backward, by tensor kind (MLA models).

    Counts what autograd (or the checkpoint) holds after the forward, with attention on a fused
    kernel (flash / memory-efficient SDPA: output and log-sum-exp kept, no T x T scores; the
    CPU takes it when MLA's key and value head sizes are equal). ``dtype_bytes`` is the size of an
    activation; the router, RMSNorm statistics, log-sum-exp are fp32 and routing indices int64.
    Each layer's own output (the residual stream it hands on) is counted in the layer.
    """
    if mode not in MODES:
        raise ConfigError(f"recompute = {mode!r}: unknown; choose one of {', '.join(MODES)}")
    c = config
    if family_of(c) is not V3:
        raise ConfigError(f"activation count: {family_of(c).name} layers are not modelled (DeepSeek-V3 family only)")
    if c.attention_type != "mla":
        raise ConfigError(f"activation count: attention_type {c.attention_type!r} is not modelled (MLA only)")
    b, f32, idx = dtype_bytes, 4, 8
    d, H = c.hidden_size, c.num_attention_heads
    qr, kv, r = c.q_lora_rank or 0, c.kv_lora_rank, c.qk_rope_head_dim
    qk, v, nope = c.qk_nope_head_dim + r, c.v_head_dim, c.qk_nope_head_dim
    k, E = c.num_experts_per_tok, c.n_routed_experts
    inter = c.moe_intermediate_size if moe else c.intermediate_size
    shared = c.moe_intermediate_size * c.n_shared_experts if moe else 0
    out: dict[str, int] = {}
    if mode == "full":
        return {"layer output (checkpoint input)": d * b}
    if mode == "none":
        norm = lambda n: 2 * n * b + f32        # normalised x, the weighted output; 1/rms  # noqa: E731
        out["residual stream (2 adds)"] = 2 * d * b
        out["RMSNorm x2 (input, post-attention)"] = 2 * norm(d)
        if qr:
            out["c_Q = q_a_proj, q_a_layernorm"] = qr * b + norm(qr)
        out["[c_KV | k_rope] = kv_a_proj, kv_a_layernorm"] = (kv + r) * b + norm(kv)
        out["kv_b_proj output (k_nope, v per head)"] = H * (nope + v) * b
        out["q, k per head (concatenated with rope)"] = 2 * H * qk * b
        out["attention output + log-sum-exp"] = H * v * b + H * f32
        if getattr(c, "index_n_heads", 0):     # V3.2 (rough, not measured): the indexer's q, k, weights
            out["indexer q, k, weights (approx.)"] = (c.index_n_heads * c.index_head_dim + 2 * c.index_head_dim
                                                      + c.index_n_heads) * b
        if moe:
            out["router (scores, weights, ids)"] = (E + 1 + k) * f32 + k * idx
            out["routed experts (k x: input, SwiGLU, output, weighted)"] = (k * (3 * d + 4 * inter) * b
                                                                             + k * (f32 + 2 * idx))
            if shared:
                out["shared experts SwiGLU"] = 4 * shared * b
        else:
            out["dense SwiGLU"] = 4 * inter * b
        return out
    # selective: kept matmul / attention outputs, everything else recomputed
    out["layer output (checkpoint input)"] = d * b
    out["c_Q (q_a_proj) or q (q_proj)"] = (qr if qr else H * qk) * b
    out["[c_KV | k_rope] (kv_a_proj)"] = (kv + r) * b
    out["attention output + log-sum-exp"] = H * v * b + H * f32
    out["o_proj output"] = d * b
    if moe:
        out["router logits"] = E * f32
        out["routed experts (k x: gate_up, down)"] = k * (2 * inter + d) * b
        if shared:
            out["shared experts (gate, up, down)"] = (2 * shared + d) * b
    else:
        out["dense MLP (gate, up, down)"] = (2 * inter + d) * b
    return out


def activation_bytes_per_token(config, mode: str, layer_idx: int | None = None, dtype_bytes: int = 4) -> float:
    """Bytes per token a decoder layer keeps for the backward under ``mode`` (see
    :func:`layer_activation_bytes`): layer ``layer_idx``, or the mean over the main layers."""
    if family_of(config) is not V3:
        raise ConfigError(f"activation count: {family_of(config).name} layers are not modelled "
                          "(DeepSeek-V3 family only)")
    layers = range(config.num_hidden_layers) if layer_idx is None else [layer_idx]
    total = sum(sum(layer_activation_bytes(config, mode, config.is_moe_layer(i), dtype_bytes).values())
                for i in layers)
    return total / len(layers)


__all__ = ["MODES", "layer_activation_bytes", "activation_bytes_per_token"]
