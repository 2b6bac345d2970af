"""The DeepSeek-V3 transformer (and V3.2, its MLA with a lightning indexer): layers, MTP and the head.

Module names match HF's ``DeepseekV3ForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.
self_attn.kv_a_proj_with_mqa``, ``model.layers.{i}.mlp.gate.e_score_correction_bias``,
``lm_head``...), so checkpoints map one to one (see ``checkpoint.py``); the only differences are
the stacked routed experts and ``model.mtp.{k}`` standing for ``model.layers.{L+k}`` on disk.

Layer i: h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)), FFN dense SwiGLU for the first
``first_k_dense_replace`` layers, DeepSeekMoE after.

Multi-token prediction, depth k = 1..D (``num_nextn_predict_layers``), at position i:
  h^k_i = Block_k(W_proj [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)])   (embedding first)
  logits = Head(RMSNorm_k(h^k_i)) predict t_{i+k+1}
with h^0 the main model's final (normed) hidden state as in HF's MTP, the embedding and output
head shared with the main model. ``mtp_loss`` is (1/D) sum_k CE_k; the trainer multiplies it by
lambda. At inference the modules can be dropped or used to draft tokens (speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MHA, MLA, CacheMask
from .cache import KVCache
from .config import ModelConfig
from .kmajor import Linear
from .moe import MLP, MoE, max_violation
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None                  # [B, T, V] (or the kept positions)
    loss: torch.Tensor | None = None             # main next-token CE (mean over labels != -100)
    mtp_loss: torch.Tensor | None = None         # (1/D) sum_k CE_k, unweighted
    aux_loss: torch.Tensor | None = None         # sum of the MoE layers' (MTP's too) sequence-wise balance losses
    indexer_loss: torch.Tensor | None = None     # V3.2, while the indexer trains: mean over layers of its KL (dsa.py)
    hidden: torch.Tensor | None = None           # final normed hidden states [B, T, d]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        attn_cls = MLA if config.attention_type == "mla" else MHA
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, positions, cache=None, rows=None, mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, cache, rows, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """HF's ``shared_head``: the MTP module's output norm (its ``head`` is the main lm_head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One MTP module: enorm, hnorm, eh_proj, a full decoder block, shared_head.norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, emb, h_prev, cos, sin, positions, cache=None, rows=None, mask=None):
        """emb: Emb(t_{i+k}), h_prev: h^{k-1}_i -> normed h^k_i (feed to the shared head)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.shared_head.norm(super().forward(h, cos, sin, positions, cache, rows, mask))


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary_emb = RotaryEmbedding(config)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32, mean over the labels that are not -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def sum_aux_loss(moes: list[nn.Module]) -> torch.Tensor | None:
    """The sum of the MoE blocks' sequence-wise balance losses of this forward (None: none had one)."""
    aux = [moe.aux_loss for moe in moes if moe.aux_loss is not None]
    return torch.stack(aux).sum() if aux else None


class DeepSeekCausalLM(nn.Module):
    """What both families' causal LMs share (V3 here, V4 in :mod:`nanoseek.model.v4.transformer`):
    the head over ``model`` (tied to the embedding with ``tie_word_embeddings``), and the trainer's
    interface to the MoE blocks (balance-loss weight, expert biases) and the parameter count.

    A family sets ``model_class`` (its decoder stack: ``embed_tokens``, ``layers``, ``mtp``),
    ``moe_class`` (its routed MoE block; other MLPs are dense), ``router_bias_counted`` (whether
    the routers' ``e_score_correction_bias`` buffers count as parameters, as in V3's published
    671B and transformers' V3, or not, as in transformers' V4) and the parameter leaves its
    initialisation sets to one or zero (``init_ones``, ``init_zeros``; every norm weight is one)."""

    model_class: type[nn.Module]
    moe_class: type[nn.Module]
    router_bias_counted: bool = False
    init_ones: tuple[str, ...] = ()
    init_zeros: tuple[str, ...] = ("bias",)

    def __init__(self, config, init_weights: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.use_mtp = config.num_nextn_predict_layers > 0   # compute the MTP loss when labels are given
        if init_weights:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix; ones for norms and ``init_ones``; zeros for
        ``init_zeros`` and the routers' correction biases."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or "layernorm" in name or leaf in self.init_ones:
                p.fill_(1.0)
            elif leaf in self.init_zeros:
                p.zero_()
            else:
                p.normal_(0.0, std)
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()

    @staticmethod
    def _positions(input_ids: torch.Tensor, positions: torch.Tensor | None, cache) -> torch.Tensor:
        """The forward's positions [B, T]: as given, else 0..T-1 (a cached forward must give them)."""
        if positions is not None:
            return positions
        if cache is not None:
            raise ValueError("positions are required when decoding with a cache")
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device).expand(B, T)

    @staticmethod
    def _cache_length(cache, positions: torch.Tensor, length: int | None) -> int:
        """The slots a cached forward attends over: max(positions) + 1, checked against the cache
        (read from ``positions`` unless the caller gives it)."""
        if length is None:
            return cache.check_positions(positions)
        if not 0 < length <= cache.max_len:
            raise ValueError(f"cache_length {length} is outside the cache's 1..{cache.max_len}")
        return length

    # ------------------------------------------------------------------ MoE helpers (trainer interface)
    def absorb_modules(self) -> list[nn.Module]:
        """The attention modules with a naive and an absorbed MLA path (none unless a family has them)."""
        return []

    def set_absorb(self, absorb: bool) -> None:
        """Switch every attention module between the naive and the absorbed MLA path."""
        for mod in self.absorb_modules():
            mod.absorb = absorb

    def moe_layers(self) -> list[nn.Module]:
        """The routed MoE blocks of the main model (MTP blocks excluded)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, self.moe_class)]

    def mtp_moe_layers(self) -> list[nn.Module]:
        """The routed MoE blocks of the MTP modules."""
        return [x.mlp for x in self.model.mtp if isinstance(x.mlp, self.moe_class)]

    def set_seq_aux_alpha(self, alpha: float) -> None:
        for moe in self.moe_layers() + self.mtp_moe_layers():
            moe.seq_aux_alpha = alpha

    def expert_bias(self) -> torch.Tensor | None:
        """The main model's learned routers' correction biases [L_biased, E] (None without any)."""
        biases = [m.gate.e_score_correction_bias for m in self.moe_layers() if m.gate.e_score_correction_bias is not None]
        return torch.stack(biases) if biases else None

    def num_parameters(self, exclude_mtp: bool = True) -> int:
        """Unique parameters (a tied head counts once), MTP modules apart unless ``exclude_mtp`` is False."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if exclude_mtp and name.startswith("model.mtp."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        if self.router_bias_counted:
            n += sum(m.gate.e_score_correction_bias.numel() for m in self.moe_layers()
                     if m.gate.e_score_correction_bias is not None)
        return n


class DeepseekV3ForCausalLM(DeepSeekCausalLM):
    """DeepSeek-V3 / V3.2. Initialised Normal(0, initializer_range) (the report uses 0.006), norms
    one, biases (and the routers' correction biases) zero."""

    model_class = DeepseekV3Model
    moe_class = MoE
    router_bias_counted = True

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: torch.Tensor | None = None, logits_to_keep: int | None = None,
                return_hidden: bool = False, cache_length: int | None = None) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] next-token targets (-100 = ignore).

        Without a cache positions default to 0..T-1 and attention is causal over the sequence
        (documents packed without cross-document masks, as DeepSeek trains). With a cache the
        caller passes absolute ``positions`` [B, T] and optionally the cache ``rows`` [B].
        ``logits_to_keep=n`` computes logits for the last n positions only. ``cache_length``:
        max(positions) + 1 when the caller knows it (the engine does), so the forward reads
        nothing back from the tensors and a compiled decode step is one graph; it is trusted (only
        checked against the cache's length): a smaller value hides the later slots from the queries.
        """
        T = input_ids.shape[1]
        rope_length = T if positions is None else None       # default positions 0..T-1: known here
        positions = self._positions(input_ids, positions, cache)
        m = self.model
        if cache is not None:
            rope_length = cache_length = self._cache_length(cache, positions, cache_length)
        cos, sin = m.rotary_emb(positions, rope_length)
        h = m.embed_tokens(input_ids)
        # which cached slots each query sees: computed once, shared by every layer
        mask = None if cache is None else CacheMask(positions, cache_length)
        for attn in self._indexed_attention(with_mtp=True):
            attn.indexer_loss = None
        for layer in m.layers:
            h = layer(h, cos, sin, positions, cache, rows, mask)
        h = m.norm(h)

        out = CausalLMOutput(logits=None, hidden=h if return_hidden else None)
        if labels is not None:
            logits = self.lm_head(h)
            out.logits = logits
            out.loss = lm_loss(logits, labels)
            if self.use_mtp and len(m.mtp) and T > len(m.mtp):
                out.mtp_loss = self._mtp_loss(input_ids, labels, h, cos, sin, positions)
            # the MTP blocks' MoE ran in this forward too when it has an MTP loss
            out.aux_loss = sum_aux_loss(self.moe_layers() + (self.mtp_moe_layers() if out.mtp_loss is not None else []))
            kl = [a.indexer_loss for a in self._indexed_attention(with_mtp=out.mtp_loss is not None)
                  if a.indexer_loss is not None]
            if kl:
                out.indexer_loss = torch.stack(kl).mean()
        else:
            hk = h if logits_to_keep is None else h[:, -logits_to_keep:]
            out.logits = self.lm_head(hk)
        return out

    def _mtp_loss(self, input_ids, labels, h, cos, sin, positions):
        losses = []
        T = input_ids.shape[1]
        emb = self.model.embed_tokens
        for k, layer in enumerate(self.model.mtp, start=1):
            n = T - k                                                 # positions i = 0..T-k-1
            h = layer(emb(input_ids[:, k:]), h[:, :n], cos[:, :n], sin[:, :n], positions[:, :n])
            losses.append(lm_loss(self.lm_head(h), labels[:, k:]))
        return torch.stack(losses).mean()

    def mtp_forward(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    cache: KVCache | None = None, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth k (0-based) at positions i: h^{k}_i from h^{k-1}_i and t_{i+k+1}; returns (h, logits).

        With a cache, the cache must have num_hidden_layers + num_nextn_predict_layers layers.
        """
        cos, sin = self.model.rotary_emb(positions)
        h = self.model.mtp[k](self.model.embed_tokens(next_ids), h_prev, cos, sin, positions, cache, rows)
        return h, self.lm_head(h)

    # ------------------------------------------------------------------ MoE helpers
    @torch.no_grad()
    def update_expert_bias(self, gamma: float, load_reduce=None) -> torch.Tensor | None:
        """Aux-loss-free step for every MoE layer (MTP included); returns main-model load [L_moe, E]."""
        loads = [moe.update_bias(gamma, load_reduce) for moe in self.moe_layers()]
        for moe in self.mtp_moe_layers():
            moe.update_bias(gamma, load_reduce)
        return torch.stack(loads) if loads else None

    # ------------------------------------------------------------------ DeepSeek-V3.2's indexer
    def _indexed_attention(self, with_mtp: bool) -> list[MLA]:
        blocks = list(self.model.layers) + (list(self.model.mtp) if with_mtp else [])
        return [b.self_attn for b in blocks if getattr(b.self_attn, "indexer", None) is not None]

    def set_dsa_stage(self, stage: str | None) -> None:
        """V3.2's indexer training (dsa.py): ``"dense"`` (warm-up: dense attention, the indexer learns
        the dense distribution), ``"sparse"`` (top-k attention, the indexer learns over its selection)
        or None (no indexer loss: inference). In either training stage every attention module keeps its
        KL in ``indexer_loss`` after a forward, and a forward with labels also returns their mean over
        layers as the output's ``indexer_loss`` (the trainer reads the modules: ``train/dsa.py``)."""
        if stage not in (None, "dense", "sparse"):
            raise ValueError(f"DSA stage must be 'dense', 'sparse' or None, got {stage!r}")
        for attn in self._indexed_attention(with_mtp=True):
            attn.dsa_stage = stage

    def indexer_parameters(self) -> list[nn.Parameter]:
        """The lightning indexers' parameters (what the dense warm-up trains)."""
        return [p for a in self._indexed_attention(with_mtp=True) for p in a.indexer.parameters()]

    def absorb_modules(self) -> list[nn.Module]:
        """The attention modules :meth:`set_absorb` switches (the inference engine finds them once)."""
        return [mod for mod in self.modules() if isinstance(mod, (MLA, MHA))]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  with_mtp: bool = False) -> KVCache:
        p = next(self.parameters())
        n = self.config.num_hidden_layers + (self.config.num_nextn_predict_layers if with_mtp else 0)
        return KVCache(self.config, batch_size, max_len, dtype or p.dtype, p.device, num_layers=n)


__all__ = ["DeepseekV3ForCausalLM", "DeepSeekCausalLM", "CausalLMOutput", "lm_loss", "sum_aux_loss", "max_violation"]
