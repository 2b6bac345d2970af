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
* ``sliding``, ``csa``, ``hca`` (DeepSeek-V4, :mod:`nanoseek.model.v4`; one shared K=V head of
  ``head_dim`` read by all heads): every V4 layer attends to the last min(sliding_window, n)
  tokens; an ``hca`` layer also to all floor(n / m') entries its compressor pooled from each run
  of m' = ``compress_rates[HCA]`` tokens (128); a ``csa`` layer to the min(index_topk, floor(n / m))
  its lightning indexer picks among the floor(n / m) entries pooled from overlapping windows of 2m
  tokens at stride m = ``compress_rates[CSA]`` (4). A query at position t sees the entries that
  are complete, floor((t + 1) / m) of them, as in transformers' ``DeepseekV4*Compressor``.

Per kind, counted (2 FLOPs per multiply-add, forward pass):

* core attention per attended key: the naive form (training and prefill; DeepSeek-V3 prefills in
  this MHA form) 2h(qk_head_dim + v_head_dim), for MLA 2h(192 + 128) = 81,920 for V3; the absorbed
  form (decode, the MQA form of DeepSeek's decode kernels) 2h(kv_lora_rank + qk_rope_head_dim) +
  2h kv_lora_rank = 278,528 for V3 (more FLOPs per key, far fewer bytes);
* the indexer per scored key: 2 H_I D_I (its H_I dot products) + 2 H_I (the ReLU'd scores weighted
  by w_{t,h} and summed) = 16,512 for V3.2. Its projections (wq_b, wk, weights_proj), like MLA's, are
  parameters and counted as 2 x parameters by the callers; top-k selection, softmax and RoPE are
  not counted;
* V4's core attention per attended key: 4 H head_dim (q.k and p.v over the shared K=V entry; no
  absorbed form), 131,072 for V4-Flash, 262,144 for V4-Pro; its indexer per scored entry as V3.2's;
  its compressors' pooling per token (the gated sum each token's projected row enters; its
  projections are parameters): 2 head_dim for ``hca``, 4 head_dim + 4 index_head_dim for ``csa``
  (two overlapping series, the KV's and the indexer keys');
* training (:meth:`AttentionKind.train_flops`): the mean over a causal sequence of L of the naive
  forward, (L + 1) / 2 keys for dense MLA and mean_t min(k, t) for sparse MLA;
* cache bytes per token and layer by part (:func:`nanoseek.model.params.kv_cache_parts`, in a
  :class:`~nanoseek.model.params.KVFormat`), and the bytes one decode step reads from it: all of
  it for dense kinds; for ``mla+indexer`` every indexer key but only the top-k MLA entries. A V4
  layer caches a ring of ``sliding_window`` K=V entries (:meth:`~AttentionKind.fixed_bytes`, its
  full size; min(n, window) for a request of n tokens), an ``hca`` layer one entry per m' tokens,
  a ``csa`` layer one entry and one indexer key (``index_head_dim``) per m tokens; the entries'
  non-RoPE dims are stored as the format's ``latent``, their RoPE dims as its ``rope``, the indexer
  keys as its ``index``; the compressors' state for the window not yet closed (kv and gate rows,
  at most 2m tokens) is counted in fp32, as transformers keeps the gate. A ``csa`` decode step
  reads the ring, every indexer key and the top-k entries.

Deliberately left out: DeepSeek-V3.2's sparse training and prefill kernels run MLA in its MQA
form (the absorbed per-key cost above), while this module keeps the naive form for training so
that V3 and V3.2 compare like for like; nanoseek's own V3.2 training and prefill compute dense
scores and mask them, so they do not save what is counted here. Not counted for V4: the
attention sinks, the inverse RoPE on the output, top-k selection. A config names its layers'
kinds through an ``attention_layer_kinds`` attribute (V4's, :class:`nanoseek.estimate.family.V4Estimand`)
and its MTP blocks' through ``attention_kind_of``; otherwise :func:`layer_kinds` derives them.
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

    def compressor_flops(self, cfg: ModelConfig) -> float:
        """Parameter-free FLOPs per token of a KV compressor (pooling), beyond its projections."""
        return 0.0

    def fixed_bytes(self, cfg: ModelConfig, fmt: KVFormat) -> float:
        """Bytes per request and layer that do not grow with the context (a window's ring, at
        its full size); 0 for caches that hold every token."""
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
                "indexer": scored * self.flops_per_scored_key(cfg),
                "compressor": self.compressor_flops(cfg)}

    def train_flops(self, cfg: ModelConfig, length: int) -> dict[str, float]:
        """Forward FLOPs per token in one layer over a causal training sequence (naive form)."""
        attended, scored = self.mean_keys(cfg, length)
        return {"core": attended * self.flops_per_key(cfg, absorbed=False),
                "indexer": scored * self.flops_per_scored_key(cfg),
                "compressor": self.compressor_flops(cfg)}


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


# ---------------------------------------------------------------------- DeepSeek-V4's kinds
def floor_sum(length: int, m: int) -> int:
    """sum_{t=1..length} floor(t / m): compressed entries visible to the queries 1..length."""
    if length <= 0:
        return 0
    q, r = divmod(length, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def mean_min_floor(k: float, m: int, length: int) -> float:
    """Mean over t = 1..length of min(k, floor(t / m)): compressed entries a top-k query reads."""
    k = int(k)
    return (floor_sum(length, m) - floor_sum(length - k * m, m)) / length


class SlidingWindow(AttentionKind):
    """V4's shared-KV MQA (one K=V head of ``head_dim``) over the last ``sliding_window`` tokens."""

    name = "sliding"
    about = "shared K=V MQA over the last sliding_window tokens (DeepSeek-V4)"

    def rate(self, cfg) -> int:
        return 0

    def window_keys(self, cfg, n: int) -> float:
        return float(min(cfg.sliding_window, n))

    def keys(self, cfg, n):
        return self.window_keys(cfg, n), 0.0

    def mean_keys(self, cfg, length):
        return mean_min(cfg.sliding_window, length), 0.0

    def flops_per_key(self, cfg, absorbed):
        # q.k over head_dim and p.v over head_dim (K = V) for each head; no absorbed form
        return 4.0 * cfg.num_attention_heads * cfg.head_dim

    def entry_bytes(self, cfg, fmt: KVFormat) -> dict[str, float]:
        """One cached K=V entry of head_dim: its non-RoPE dims stored as the format's "latent"
        (MLA's latent is the non-RoPE part too), its qk_rope_head_dim RoPE dims as its "rope"."""
        r = cfg.qk_rope_head_dim
        return {"kv": fmt.part_bytes("latent", cfg.head_dim - r), "kv_rope": fmt.part_bytes("rope", r)}

    def cache_parts(self, cfg, fmt):
        """Bytes per token of context at long context, by part (the ring is :meth:`fixed_bytes`)."""
        return {}

    def fixed_bytes(self, cfg, fmt):
        return cfg.sliding_window * sum(self.entry_bytes(cfg, fmt).values())

    def state_values(self, cfg, n: int) -> int:
        """Values a compressor keeps for the window it has not closed yet (counted in fp32)."""
        return 0

    def read_bytes(self, cfg, n, fmt):
        return self.cache_bytes(cfg, n, fmt) - 4.0 * self.state_values(cfg, n)

    def cache_bytes(self, cfg, n, fmt):
        compressed = sum(self.cache_parts(cfg, fmt).values()) * self.rate(cfg)    # bytes per entry
        entries = n // self.rate(cfg) if self.rate(cfg) else 0
        ring = self.window_keys(cfg, n) * sum(self.entry_bytes(cfg, fmt).values())
        return ring + entries * compressed + 4.0 * self.state_values(cfg, n)


class HeavilyCompressed(SlidingWindow):
    """The window plus one compressed entry per ``compress_rates[HCA]`` (m') tokens, all attended."""

    name = "hca"
    about = "the window plus every entry compressed from m' = compress_rates[HCA] tokens (DeepSeek-V4)"
    LAYER_TYPE = "heavily_compressed_attention"

    def rate(self, cfg) -> int:
        return cfg.compress_rates[self.LAYER_TYPE]

    def keys(self, cfg, n):
        return self.window_keys(cfg, n) + n // self.rate(cfg), 0.0

    def mean_keys(self, cfg, length):
        return mean_min(cfg.sliding_window, length) + floor_sum(length, self.rate(cfg)) / length, 0.0

    def compressor_flops(self, cfg):
        # each token's kv row enters one entry's gated sum: a multiply-add per dim (softmax, norm, RoPE uncounted)
        return 2.0 * cfg.head_dim

    def cache_parts(self, cfg, fmt):
        m = self.rate(cfg)
        return {f"compressed/{m}": sum(self.entry_bytes(cfg, fmt).values()) / m}

    def state_values(self, cfg, n):
        return (n % self.rate(cfg)) * 2 * cfg.head_dim          # pending kv and gate rows


class CompressedSparse(HeavilyCompressed):
    """The window plus the ``index_topk`` entries (compressed from m = compress_rates[CSA] tokens,
    overlapping windows of 2m) the lightning indexer picks from all of them."""

    name = "csa"
    about = ("the window plus the index_topk best entries compressed from m = compress_rates[CSA] "
             "tokens, picked by a lightning indexer over all of them (DeepSeek-V4)")
    LAYER_TYPE = "compressed_sparse_attention"

    def keys(self, cfg, n):
        entries = n // self.rate(cfg)
        return self.window_keys(cfg, n) + min(cfg.index_topk, entries), float(entries)

    def mean_keys(self, cfg, length):
        m = self.rate(cfg)
        return (mean_min(cfg.sliding_window, length) + mean_min_floor(cfg.index_topk, m, length),
                floor_sum(length, m) / length)

    def flops_per_scored_key(self, cfg):
        return 2.0 * cfg.index_n_heads * (cfg.index_head_dim + 1)

    def compressor_flops(self, cfg):
        # two overlapping series (each token feeds two entries) for the KV and for the indexer's keys
        return 4.0 * cfg.head_dim + 4.0 * cfg.index_head_dim

    def cache_parts(self, cfg, fmt):
        m = self.rate(cfg)
        return {f"compressed/{m}": sum(self.entry_bytes(cfg, fmt).values()) / m,
                f"indexer key/{m}": fmt.part_bytes("index", cfg.index_head_dim) / m}

    def state_values(self, cfg, n):
        m, D, Di = self.rate(cfg), cfg.head_dim, cfg.index_head_dim
        pending = (n % m) * (4 * D + 4 * Di)                    # kv and gate rows, both series
        overlap = m * (2 * D + 2 * Di) if n >= m else 0         # the last window's first series
        return pending + overlap

    def read_bytes(self, cfg, n, fmt):
        m = self.rate(cfg)
        entries = n // m
        entry = sum(self.entry_bytes(cfg, fmt).values())
        ring = self.window_keys(cfg, n) * entry
        return ring + entries * fmt.part_bytes("index", cfg.index_head_dim) + min(cfg.index_topk, entries) * entry


LAYER_KINDS: dict[str, AttentionKind] = {k.name: k for k in (
    DenseMLA(), IndexedMLA(), StandardAttention(), SlidingWindow(), CompressedSparse(), HeavilyCompressed())}


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
    own = getattr(cfg, "attention_kind_of", None)
    if own is not None:
        return LAYER_KINDS[own(layer_idx)]
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
    at n tokens of context, by part ("core", "indexer", "compressor")."""
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
