"""Attention by layer kind: FLOPs per token at a context length, KV-cache bytes, decode reads.

What separates DeepSeek's attention designs is what one layer does for one query as a function
of ``n``, the tokens it may see (itself included). Each design is an :class:`AttentionKind` in
the registry :data:`LAYER_KINDS`, keyed by name, and :func:`layer_kinds` says which kind each
decoder layer of a config is; every section of ``nanoseek estimate`` (training FLOPs, memory,
decode, the per-context table) goes through them and never branches on a model family.

* ``mla`` (DeepSeek-V2/V3): MLA attends to all n keys; caches the latent and the rope key.
* ``mla+indexer`` (DeepSeek-V3.2, :mod:`nanoseek.model.dsa`): the lightning indexer scores all n
  keys, MLA attends to the min(index_topk, n) best; also caches the indexer key.
* ``mha``: standard attention with ``num_key_value_heads`` KV heads (nanoseek's ablation baseline,
  and the MHA / GQA / MQA comparison rows of the decode table).

Per kind, counted (2 FLOPs per multiply-add, forward pass):

* core attention per attended key: the naive form (training and prefill; DeepSeek-V3 prefills in
  this MHA form) 2h(qk_head_dim + v_head_dim), for MLA 2h(192 + 128) = 81,920 for V3; the absorbed
  form (decode, the MQA form of DeepSeek's decode kernels) 2h(kv_lora_rank + qk_rope_head_dim) +
  2h kv_lora_rank = 278,528 for V3 (more FLOPs per key, far fewer bytes);
* the indexer per scored key: 2 H_I D_I (its H_I dot products) + 2 H_I (the ReLU'd scores weighted
  by w_{t,h} and summed) = 16,512 for V3.2. Its projections (wq_b, wk, weights_proj), like MLA's, are
  parameters and counted as 2 x parameters by the callers; top-k selection, softmax and RoPE are
  not counted;
* training (:meth:`AttentionKind.train_flops`): the mean over a causal sequence of L of the naive
  forward, (L + 1) / 2 keys for dense MLA and mean_t min(k, t) for sparse MLA;
* cache bytes per token and layer by part (:func:`nanoseek.model.params.kv_cache_parts`, in a
  :class:`~nanoseek.model.params.KVFormat`), and the bytes one decode step reads from it: all of
  it for dense kinds; for ``mla+indexer`` every indexer key but only the top-k MLA entries.

Deliberately left out: DeepSeek-V3.2's sparse training and prefill kernels run MLA in its MQA
form (the absorbed per-key cost above), while this module keeps the naive form for training so
that V3 and V3.2 compare like for like; nanoseek's own V3.2 training and prefill compute dense
scores and mask them, so they do not save what is counted here. DeepSeek-V4 adds its kinds
(``sliding``, ``csa``, ``hca``) as new :class:`AttentionKind` subclasses in :data:`LAYER_KINDS`,
overriding :meth:`~AttentionKind.cache_bytes` for compressed or windowed caches, and names each
layer's kind through :func:`layer_kinds` (a config with an ``attention_layer_kinds`` attribute
names its own).
"""

from __future__ import annotations

from ..model.config import ModelConfig
from ..model.params import KVFormat, get_kv_format, kv_cache_parts


def mean_min(k: float, length: int) -> float:
    """Mean over causal positions t = 1..length of min(k, t): keys a top-k query attends to."""
    if length <= k:
        return (length + 1) / 2
    return (k * (k + 1) / 2 + k * (length - k)) / length


class AttentionKind:
    """One kind of attention layer. Subclasses say how many keys a query attends to and scores,
    what each costs, and what a token caches; the rest follows here."""

    name = ""
    about = ""

    # ---- what a subclass defines
    def keys(self, cfg: ModelConfig, n: int) -> tuple[float, float]:
        """(keys the core attention reads, keys an indexer scores) for a query seeing n tokens."""
        return float(n), 0.0

    def mean_keys(self, cfg: ModelConfig, length: int) -> tuple[float, float]:
        """:meth:`keys` averaged over the causal positions 1..length of a training sequence."""
        return (length + 1) / 2, 0.0

    def flops_per_key(self, cfg: ModelConfig, absorbed: bool) -> float:
        """Forward FLOPs of the core attention per attended key (q.k and p.v over all heads)."""
        return 2.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)

    def flops_per_scored_key(self, cfg: ModelConfig) -> float:
        return 0.0

    def cache_parts(self, cfg: ModelConfig, fmt: KVFormat) -> dict[str, float]:
        """Bytes one cached token takes in one layer, by part."""
        return kv_cache_parts(cfg, fmt, absorbed=True)

    # ---- derived
    def cache_bytes(self, cfg: ModelConfig, n: int, fmt: KVFormat) -> float:
        """Bytes one layer caches for a request of n tokens (kinds with windows or compression
        override this)."""
        return n * sum(self.cache_parts(cfg, fmt).values())

    def read_bytes(self, cfg: ModelConfig, n: int, fmt: KVFormat) -> float:
        """Bytes one decode step reads from one layer's cache of n tokens (dense: all of it)."""
        return self.cache_bytes(cfg, n, fmt)

    def decode_flops(self, cfg: ModelConfig, n: int) -> dict[str, float]:
        """Forward FLOPs one new token spends in one layer's parameter-free attention work."""
        attended, scored = self.keys(cfg, n)
        return {"core": attended * self.flops_per_key(cfg, absorbed=True),
                "indexer": scored * self.flops_per_scored_key(cfg)}

    def train_flops(self, cfg: ModelConfig, length: int) -> dict[str, float]:
        """Forward FLOPs per token in one layer over a causal training sequence (naive form)."""
        attended, scored = self.mean_keys(cfg, length)
        return {"core": attended * self.flops_per_key(cfg, absorbed=False),
                "indexer": scored * self.flops_per_scored_key(cfg)}


class DenseMLA(AttentionKind):
    name = "mla"
    about = "MLA over every visible key (DeepSeek-V2/V3)"

    def flops_per_key(self, cfg, absorbed):
        if not absorbed:
            return super().flops_per_key(cfg, absorbed)
        h, c = cfg.num_attention_heads, cfg.kv_lora_rank
        return 2.0 * h * (c + cfg.qk_rope_head_dim) + 2.0 * h * c


class IndexedMLA(DenseMLA):
    name = "mla+indexer"
    about = "MLA over the index_topk keys the lightning indexer picks (DeepSeek-V3.2)"

    def keys(self, cfg, n):
        return float(min(cfg.index_topk, n)), float(n)

    def mean_keys(self, cfg, length):
        return mean_min(cfg.index_topk, length), (length + 1) / 2

    def flops_per_scored_key(self, cfg):
        return 2.0 * cfg.index_n_heads * (cfg.index_head_dim + 1)

    def read_bytes(self, cfg, n, fmt):
        parts = self.cache_parts(cfg, fmt)
        index = parts.get("indexer_key", 0.0)
        return n * index + min(cfg.index_topk, n) * (sum(parts.values()) - index)


class StandardAttention(AttentionKind):
    name = "mha"
    about = "multi-head / grouped-query attention with num_key_value_heads KV heads"


LAYER_KINDS: dict[str, AttentionKind] = {k.name: k for k in (DenseMLA(), IndexedMLA(), StandardAttention())}


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """The attention kind of each decoder layer (MTP blocks use :func:`kind_of`)."""
    own = getattr(cfg, "attention_layer_kinds", None)
    if own is not None:
        return list(own() if callable(own) else own)
    if cfg.attention_type == "mha":
        kind = "mha"
    else:
        kind = "mla+indexer" if cfg.index_n_heads else "mla"
    return [kind] * cfg.num_hidden_layers


def kind_of(cfg: ModelConfig, layer_idx: int) -> AttentionKind:
    """The kind of decoder layer ``layer_idx``; an MTP block (index >= num_hidden_layers) has the
    kind of the last decoder layer, as its attention is built from the same config."""
    kinds = layer_kinds(cfg)
    return LAYER_KINDS[kinds[min(layer_idx, len(kinds) - 1)]]


def kinds_in_use(cfg: ModelConfig) -> dict[str, int]:
    """{kind name: number of decoder layers of that kind}, in the order they first appear."""
    out: dict[str, int] = {}
    for k in layer_kinds(cfg):
        out[k] = out.get(k, 0) + 1
    return out


def _sum(parts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def decode_attention_flops(cfg: ModelConfig, n: int) -> dict[str, float]:
    """Forward FLOPs of one new token's parameter-free attention work over all decoder layers
    at n tokens of context, by part ("core", "indexer")."""
    return _sum([LAYER_KINDS[k].decode_flops(cfg, n) for k in layer_kinds(cfg)])


def train_attention_flops(cfg: ModelConfig, length: int, layers: list[int] | None = None) -> dict[str, float]:
    """Mean forward FLOPs per token of the parameter-free attention work over a causal sequence
    of ``length``, summed over ``layers`` (default: every decoder layer), by part."""
    idx = range(cfg.num_hidden_layers) if layers is None else layers
    return _sum([kind_of(cfg, i).train_flops(cfg, length) for i in idx])


def kv_bytes(cfg: ModelConfig, n: int, fmt: str | KVFormat = "bf16") -> float:
    """Bytes a request of n tokens caches over all decoder layers."""
    f = get_kv_format(fmt)
    return sum(LAYER_KINDS[k].cache_bytes(cfg, n, f) for k in layer_kinds(cfg))


def kv_read_bytes(cfg: ModelConfig, n: int, fmt: str | KVFormat = "bf16") -> float:
    """Bytes one decode step of a request at n tokens of context reads from the cache (all layers)."""
    f = get_kv_format(fmt)
    return sum(LAYER_KINDS[k].read_bytes(cfg, n, f) for k in layer_kinds(cfg))
