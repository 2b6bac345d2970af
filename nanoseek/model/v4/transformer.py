"""The DeepSeek-V4 transformer: hyper-connected decoder layers, MTP modules and the causal-LM head.

Module names match transformers' ``DeepseekV4ForCausalLM`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.compressor.indexer.scorer.weights_proj``, ``model.layers.{i}.attn_hc.fn``,
``model.layers.{i}.mlp.gate.tid2eid``, ``model.hc_head.hc_fn``, ``lm_head``...), so checkpoints map
one to one (``checkpoint.py``); routed experts are stacked in memory exactly as transformers keeps
them (``mlp.experts.gate_up_proj [E, 2I, d]``).

  X_0 = [Emb(t)] * hc_mult                                        streams [B, T, n, d]
  layer i:  X = mHC(X, Attn_i ∘ RMSNorm)  then  X = mHC(X, MoE_i ∘ RMSNorm)   (hyper.py)
  h = RMSNorm(HyperHead(X_L));  logits = lm_head(h)

Multi-token prediction (DeepSeek's reference ``MTPBlock``; transformers does not build it and
skips ``mtp.*`` tensors on load): depth k = 1..D, at position i, from the previous depth's streams
S^{k-1}_i (S^0 = X_L, the main model's last streams before the head):
  S^k_i = Block_k( e_proj(RMSNorm_e(Emb(t_{i+k}))) [broadcast over streams] + h_proj(RMSNorm_h(S^{k-1}_i)) )
  logits = lm_head(RMSNorm_k(HyperHead_k(S^k_i)))  predict t_{i+k+1}
Block_k is a full V4 layer with sliding-window attention and a learned MoE; the embedding and
the head are the main model's. ``mtp_loss`` = (1/D) sum_k CE_k (the trainer weights it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kmajor import Linear
from ..transformer import CausalLMOutput, DeepSeekCausalLM, lm_loss, sum_aux_loss
from .attention import Attention
from .compressor import FP32RMSNorm
from .config import DeepseekV4Config
from .hyper import HyperConnection, HyperHead, hc_merge
from .moe import MoE
from .rope import Rope


@dataclass
class V4Output(CausalLMOutput):
    streams: torch.Tensor | None = None     # the last layer's streams [B, T, n, d] (MTP input), with return_hidden


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.self_attn = Attention(c, layer_idx)
        self.mlp = MoE(c, hashed=c.is_hash_layer(layer_idx))
        self.input_layernorm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn_hc = HyperConnection(c.hc_mult, c.hidden_size, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        self.ffn_hc = HyperConnection(c.hc_mult, c.hidden_size, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes, input_ids: torch.Tensor | None,
                cache=None, rows=None, valid=None, length: int | None = None) -> torch.Tensor:
        """x: streams [B, T, n, d] -> [B, T, n, d]; ``length``: max(positions) + 1 when known."""
        view = None if cache is None else cache.layer(self.layer_idx)
        post, comb, u = self.attn_hc(x)
        a = self.self_attn(self.input_layernorm(u), positions, ropes, view, rows, valid, length)
        x = hc_merge(x, a, post, comb)
        post, comb, u = self.ffn_hc(x)
        f = self.mlp(self.post_attention_layernorm(u), input_ids)
        return hc_merge(x, f, post, comb)


class MTPLayer(DecoderLayer):
    """One MTP module (DeepSeek's names): ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, a full block,
    its own ``hc_head`` and ``norm``."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__(config, layer_idx)
        c = config
        self.e_proj = Linear(c.hidden_size, c.hidden_size, bias=False)
        self.h_proj = Linear(c.hidden_size, c.hidden_size, bias=False)
        self.enorm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hc_mult, c.hidden_size, c.hc_eps, c.rms_norm_eps)

    def forward(self, emb, prev, positions, ropes, input_ids, cache=None, rows=None, valid=None):
        """emb Emb(t_{i+k}) [B, T, d], prev S^{k-1}_i [B, T, n, d] -> (S^k_i, normed head input [B, T, d])."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(prev))
        x = super().forward(x, positions, ropes, input_ids, cache, rows, valid)
        return x, self.norm(self.hc_head(x))


class DeepseekV4Model(nn.Module):
    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = FP32RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hc_mult, c.hidden_size, c.hc_eps, c.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPLayer(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers))
        self.ropes = nn.ModuleDict({"main": Rope(c, "main"), "compress": Rope(c, "compress")})


class DeepseekV4ForCausalLM(DeepSeekCausalLM):
    # What the inference engine asks of a model (a model without them: V3's defaults). The cached
    # forward and mtp_forward take ``valid`` [B, T] (a padded batched prefill must not let padding
    # overwrite the sliding-window and compressor rings of shorter rows), and MTP continues from
    # the output's hyper-connection ``streams`` while ``hidden`` stays the normed state for lm_head.
    takes_valid = True
    mtp_input = "streams"
    rows_gathered = True      # the cached forward indexes the cache by row even when no rows are given
    model_class = DeepseekV4Model
    moe_class = MoE                  # every V4 layer's (hash-routed or learned)
    router_bias_counted = False      # transformers' V4 keeps e_score_correction_bias a buffer
    init_ones = ("scale", "hc_scale")
    init_zeros = ("bias", "base", "hc_base", "sinks", "position_bias")

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: Normal(0, initializer_range) for matrices and the mHC projections; ones
        for norms and mHC scales; zeros for biases, mHC bases, sinks, compressor position biases and
        the router correction biases; tid2eid a uniform random table."""
        super().reset_parameters()
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is None:
                m.gate.tid2eid.random_(0, self.config.n_routed_experts)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache=None, rows: torch.Tensor | None = None,
                logits_to_keep: int | None = None, return_hidden: bool = False,
                valid: torch.Tensor | None = None, cache_length: int | None = None) -> V4Output:
        """input_ids [B, T]; labels [B, T] next-token targets (-100 = ignore).

        Without a cache positions are 0..T-1 (causal over the sequence). With a :class:`V4Cache`
        the caller passes absolute ``positions`` [B, T] (consecutive per row), optionally the cache
        ``rows`` [B] and ``valid`` [B, T] (False = padding: neither cached nor used as context).
        ``cache_length``: max(positions) + 1 when the caller knows it (checked against the cache
        instead of reading the positions back; trusted to be max(positions) + 1).
        """
        B, T = input_ids.shape
        positions = self._positions(input_ids, positions, cache)
        length = None
        if cache is not None:
            length = self._cache_length(cache, positions, cache_length)
            if rows is None:
                rows = torch.arange(B, device=input_ids.device)
        m = self.model
        ropes = m.ropes
        x = m.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in m.layers:
            x = layer(x, positions, ropes, input_ids, cache, rows, valid, length)
        h = m.norm(m.hc_head(x))

        out = V4Output(logits=None, hidden=h if return_hidden else None, streams=x if return_hidden else None)
        if labels is not None:
            logits = self.lm_head(h)
            out.logits = logits
            out.loss = lm_loss(logits, labels)
            if self.use_mtp and len(m.mtp) and T > len(m.mtp):
                out.mtp_loss = self._mtp_loss(input_ids, labels, x, positions)
            out.aux_loss = sum_aux_loss(self.moe_layers() + (self.mtp_moe_layers() if out.mtp_loss is not None else []))
            kl = [a.indexer_loss for a in self._indexed_attention() if a.indexer_loss is not None]
            if kl:                  # the CSA indexers train (set_dsa_stage)
                out.indexer_loss = torch.stack(kl).mean()
        else:
            hk = h if logits_to_keep is None else h[:, -logits_to_keep:]
            out.logits = self.lm_head(hk)
        return out

    def _mtp_loss(self, input_ids, labels, x, positions):
        losses = []
        T = input_ids.shape[1]
        emb = self.model.embed_tokens
        for k, layer in enumerate(self.model.mtp, start=1):
            n = T - k
            ids = input_ids[:, k:]
            x, h = layer(emb(ids), x[:, :n], positions[:, :n], self.model.ropes, ids)
            losses.append(lm_loss(self.lm_head(h), labels[:, k:]))
        return torch.stack(losses).mean()

    def mtp_forward(self, k: int, prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    cache=None, rows: torch.Tensor | None = None,
                    valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth k (0-based) at positions i from the streams S^{k} (``out.streams``) and t_{i+k+1};
        returns (the depth's streams, logits). With a cache it must have been made ``with_mtp``;
        ``valid`` [B, T] as in :meth:`forward` (False: padding, never cached)."""
        if cache is not None and rows is None:
            rows = torch.arange(next_ids.shape[0], device=next_ids.device)
        x, h = self.model.mtp[k](self.model.embed_tokens(next_ids), prev, positions, self.model.ropes, next_ids,
                                 cache, rows, valid)
        return x, self.lm_head(h)

    # ------------------------------------------------------------------ MoE helpers (trainer interface)
    @torch.no_grad()
    def update_expert_bias(self, gamma: float, load_reduce=None) -> torch.Tensor | None:
        """Aux-loss-free step for the learned MoE layers (MTP included); returns the main model's learned
        layers' load [L_learned, E] (None without learned layers)."""
        loads = []
        for i, moe in enumerate(self.moe_layers() + self.mtp_moe_layers()):
            if load_reduce is not None:
                moe.load.copy_(load_reduce(moe.load))
            load = moe.update_bias(gamma)            # hash layers: no bias, the counter resets
            if i < self.config.num_hidden_layers and not moe.gate.hashed:
                loads.append(load)
        return torch.stack(loads) if loads else None

    # ------------------------------------------------------------------ CSA indexer training (as V3.2's)
    def _indexed_attention(self) -> list[Attention]:
        """The compressed-sparse attention modules (the MTP blocks are sliding-window: none there)."""
        blocks = list(self.model.layers) + list(self.model.mtp)
        return [b.self_attn for b in blocks if b.self_attn.indexer is not None]

    def set_dsa_stage(self, stage: str | None) -> None:
        """The CSA indexers' training stage, V3's ``set_dsa_stage`` (nanoseek/train/dsa.py): ``"dense"``
        (every visible compressed entry attended, the KL over all of them), ``"sparse"`` (the top-k,
        the KL over those) or None (inference: no KL, outputs as without this method)."""
        if stage not in (None, "dense", "sparse"):
            raise ValueError(f"DSA stage must be 'dense', 'sparse' or None, got {stage!r}")
        for attn in self._indexed_attention():
            attn.dsa_stage = stage

    def indexer_parameters(self) -> list[nn.Parameter]:
        """The CSA lightning indexers' parameters (what a frozen dense warm-up trains)."""
        return [p for a in self._indexed_attention() for p in a.indexer.parameters()]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, with_mtp: bool = False):
        from .cache import V4Cache

        p = self.lm_head.weight
        n = self.config.num_hidden_layers + (self.config.num_nextn_predict_layers if with_mtp else 0)
        return V4Cache(self.config, batch_size, max_len, dtype or p.dtype, p.device, num_layers=n)


__all__ = ["DeepseekV4ForCausalLM", "DeepseekV4Model", "DecoderLayer", "MTPLayer", "V4Output"]
