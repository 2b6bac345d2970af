"""Model FLOPs per token, and the pieces every section of ``nanoseek estimate`` shares.

The floor of :mod:`nanoseek.estimate`: :mod:`.memory`, :mod:`.inference`, :mod:`.comm` and
:mod:`.estimate` (which runs them all) import :class:`EstimateError`, :data:`DEFAULT_SEQ_LEN` and
the FLOPs functions from here; this module imports only the model's config, the families'
parameter counts (:mod:`.family`) and the layer-kind registry :mod:`.attention` (pure
arithmetic, the floor below this one).

What :func:`flops_per_token` counts (training, forward + backward, per token of the sequence):

* ``matmul``: 6 x every activated parameter except the input embedding table (a lookup, no
  FLOPs). The output head is counted; so are the router and the norm weights, although norms are
  elementwise (they are < 0.001% of the total). 2 FLOPs per multiply-add in the forward pass,
  twice that in the backward (gradients of inputs and of weights).
* ``attention``: the score and value products that have no parameters: per layer and head,
  2 (q.k over ``qk_head_dim``) + 2 (p.v over ``v_head_dim``) FLOPs per attended position, over
  a causal window whose mean length is (seq_len + 1) / 2, times 3 for the backward. MLA trains in
  its naive (non-absorbed) form, so ``qk_head_dim`` = 192 and ``v_head_dim`` = 128 for V3. A
  DeepSeek-V3.2 layer attends to at most ``index_topk`` positions (mean_t min(k, t)).
* ``indexer`` (DeepSeek-V3.2): the lightning indexer scoring every visible position, 2 H_I (D_I + 1)
  FLOPs each, times 3 (its backward, from its KL loss).
  Both come from the layer-kind registry in :mod:`.attention`.
* ``compressor`` (DeepSeek-V4): its KV compressors' pooling (:mod:`.attention`), times 3.
* ``mixing`` (DeepSeek-V4): the hyper-connections' parameter-free stream mixing
  (:meth:`.family.V4Estimand.mixing_flops_per_token`), times 3; their projections and V4's
  grouped low-rank output projection (``o_a_proj``, ``o_b_proj``) are parameters, in ``matmul``.
* ``mtp``: the same for each multi-token-prediction module (eh_proj, one block, and the shared
  output head computed again), when ``include_mtp`` and the config has MTP modules.

Softmax, RoPE, activation functions, the optimizer step and recomputation are not counted: this
is *model* FLOPs, so MFU = achieved model FLOP/s over the dense BF16 peak (the PaLM convention).
"""

from __future__ import annotations

from ..model.config import ModelConfig
from .attention import kind_of, train_attention_flops
from .family import count_params, layer_params, mixing_flops

DEFAULT_SEQ_LEN = 4096          # DeepSeek-V3 pre-training sequence length


class EstimateError(ValueError):
    """An input the estimate cannot use (inconsistent layout, both --mfu and --gpu-hours, ...)."""


def mtp_active_params(cfg: ModelConfig) -> int:
    """Unique MTP parameters a token activates: all of the MTP modules' own parameters (the
    family's count: V3's enorm, hnorm, eh_proj, block and shared_head.norm; V4's also its mHC
    head) less the routed experts each block's token is not sent to."""
    n = count_params(cfg).mtp
    for k in range(cfg.num_nextn_predict_layers):
        tot, act = layer_params(cfg, cfg.num_hidden_layers + k)
        n -= sum(tot.values()) - sum(act.values())
    return n


# ---------------------------------------------------------------------- FLOPs
def attention_flops_per_token(cfg: ModelConfig, seq_len: int, layers: int | None = None,
                              part: str | None = None) -> float:
    """Forward FLOPs of the parameter-free attention work (q.k and p.v, and a V3.2 indexer's
    scores) per token of a causal sequence, over every decoder layer, or over ``layers`` MTP
    blocks when given. ``part``: only "core" or only "indexer"."""
    if seq_len < 1:
        raise EstimateError(f"seq_len must be >= 1, got {seq_len}")
    if layers is None:
        parts = train_attention_flops(cfg, seq_len)
    else:   # MTP blocks: the attention kind of the last decoder layer
        per = kind_of(cfg, cfg.num_hidden_layers).train_flops(cfg, seq_len)
        parts = {k: v * layers for k, v in per.items()}
    return parts.get(part, 0.0) if part else sum(parts.values())


def training_flops_breakdown(cfg: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN,
                             include_mtp: bool = True) -> dict[str, float]:
    """Training (forward + backward) model FLOPs per token by term; see the module docstring."""
    pc = count_params(cfg)
    out = {"matmul": 6.0 * pc.active_without_embedding,
           "attention": 3.0 * attention_flops_per_token(cfg, seq_len, part="core"),
           "indexer": 3.0 * attention_flops_per_token(cfg, seq_len, part="indexer"),
           "compressor": 3.0 * attention_flops_per_token(cfg, seq_len, part="compressor"),
           "mixing": 3.0 * mixing_flops(cfg),
           "mtp": 0.0}
    if include_mtp and cfg.num_nextn_predict_layers:
        head = cfg.vocab_size * cfg.hidden_size       # the shared output head, run again per module
        out["mtp"] = (6.0 * (mtp_active_params(cfg) + head * cfg.num_nextn_predict_layers)
                      + 3.0 * attention_flops_per_token(cfg, seq_len, cfg.num_nextn_predict_layers)
                      + 3.0 * mixing_flops(cfg, cfg.num_hidden_layers) * cfg.num_nextn_predict_layers)
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN, include_mtp: bool = True) -> float:
    """Training model FLOPs per token: 6 x activated non-embedding parameters + causal attention
    (+ MTP modules). Independent of the hardware; the training loop divides achieved FLOP/s by
    the peak to report MFU. DeepSeek-V3 at seq_len 4096: about 2.6e11 (with its MTP module)."""
    return sum(training_flops_breakdown(cfg, seq_len, include_mtp).values())


def layer_forward_flops_per_token(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Forward FLOPs one token spends in decoder layer ``layer_idx`` (matmuls + attention)."""
    _, act = layer_params(cfg, layer_idx)
    if seq_len < 1:
        raise EstimateError(f"seq_len must be >= 1, got {seq_len}")
    return (2.0 * sum(act.values()) + sum(kind_of(cfg, layer_idx).train_flops(cfg, seq_len).values())
            + mixing_flops(cfg, layer_idx))
