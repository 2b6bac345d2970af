"""DeepSeek-V4's KV compressors and the lightning indexer of compressed sparse attention.

A compressor turns every ``m`` consecutive tokens into ONE compressed key/value entry (keys and
values are the same vector in V4). Per token x_t it projects a candidate ``c_t = W_kv x_t`` and
a gate ``z_t = W_z x_t``; window w (tokens wm .. wm+m-1) gives

  HCA (heavily compressed, m' = 128, ``overlap=False``):
      C_w = RMSNorm( sum_j softmax_j(z_j + B_j) * c_j )                       j over the window
  CSA (compressed sparse, m = 4, ``overlap=True``): c, z have 2 halves [a | b] per token and
      C_w = RMSNorm( sum_j softmax_j(.) * c_j ) over the 2m slots (window w-1's a-halves,
      window w's b-halves), so entries overlap: width 2m, stride m (window -1 is empty).

then RoPE (the "compress" base) on its last ``qk_rope_head_dim`` dims at position w*m. A query at
position p may see entry w only once its window is complete: w < (p + 1) // m.
``position_bias`` is B [m, c]. HF names: ``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``.

CSA attends to only ``index_topk`` of the entries, chosen per query by the lightning indexer
(HF ``compressor.indexer``): its own CSA-style compressor at ``index_head_dim`` (the keys K^I),
a query ``q^I = W^I_q q_latent`` (``q_b_proj`` from the attention's query latent, ``index_n_heads``
heads, RoPE'd at the query position) and per-head weights ``w = W_w x`` (``scorer.weights_proj``):

  I(t, s) = sum_h (w_{t,h} / sqrt(H^I)) * ReLU(q^I_{t,h} . K^I_s) / sqrt(c^I)

the top-k visible entries by I are the ones attended (fewer when fewer are visible), selected as
V3.2's indexer selects (:func:`nanoseek.model.dsa.top_k_visible`): exact ties (every head's ReLU 0)
are ranked by position, so a full forward and cached decoding pick the same entries; transformers
keeps ``torch.topk``'s choice, which depends on the tensor's width, so where the k-th score is
tied its full forward and its cached decoding can differ, and nanoseek agrees with one of them. The
selection is discrete: the language-model loss trains no indexer weight.

Training the indexer (V3.2's recipe, :mod:`nanoseek.model.dsa` and :mod:`nanoseek.train.dsa`,
applied to the compressed entries): while the attention module has a ``dsa_stage`` the indexer's
input (x and the query latent) is detached and its scores keep their gradient; the attention
computes the KL(p_t || softmax(I_t)) of :func:`compressed_kl`, where p_t is the attention's own
probability of each compressed entry, summed over heads and renormalised over the entries the KL
is about (detached). The dense stage attends to every visible entry and takes the KL over all of
them; the sparse stage attends to the top-k and takes it over those. The target is over the
compressed entries only: the sliding-window keys (which every query attends anyway) and the sink
are left out, since what the indexer decides is which compressed blocks to read; the window's
share of the attention would only rescale p_t, which the renormalisation undoes. DeepSeek has not
published V4's indexer objective and transformers has none (inference only); this is V3.2's
objective over V4's candidates.

Two ways to produce entries, same function: without a cache every complete window of the
sequence is pooled at once (training, the parity tests); with a :class:`~.cache.V4Cache` the
tokens of still-open windows wait in a small ring per layer and each step pools exactly the
windows it completes (see ``cache.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..dsa import indexer_kl, top_k_visible
from ..fp32 import fp32_matmul, keep_fp32
from ..kmajor import Linear
from .config import CSA, HCA, DeepseekV4Config
from .rope import Rope, rope_tail


class FP32RMSNorm(nn.Module):
    """RMSNorm whose weight stays fp32 and multiplies before the cast back (transformers' V4 norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class WindowCompressor(nn.Module):
    """Pools windows of ``rate`` tokens into entries of ``dim`` (see the module docstring)."""

    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, eps: float, name: str):
        super().__init__()
        self.dim, self.rate, self.overlap, self.name = dim, rate, overlap, name
        width = 2 * dim if overlap else dim
        self.kv_proj = Linear(hidden_size, width, bias=False)
        self.gate_proj = Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width, dtype=torch.float32))
        self.kv_norm = FP32RMSNorm(dim, eps)

    def _apply(self, fn, recurse=True):   # position_bias stays fp32, the projections follow fn
        if recurse:
            for child in self.children():
                child._apply(fn)
        return super()._apply(keep_fp32(fn), recurse=False)

    @property
    def span(self) -> int:
        """Tokens one entry reads: m, or 2m with overlap."""
        return 2 * self.rate if self.overlap else self.rate

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, w0: torch.Tensor | int, rope: Rope,
             length: int | None = None) -> torch.Tensor:
        """kv, gate [B, N, span, dim] (gate with the bias added; -inf = absent) -> entries [B, N, dim]
        for windows w0 + 0..N-1 (w0 an int or [B]); ``length``: a bound on their last position + 1."""
        B, N = kv.shape[:2]
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        entries = self.kv_norm(pooled)
        w = torch.arange(N, device=kv.device)
        w = (w + w0[:, None]) if isinstance(w0, torch.Tensor) else (w + w0).expand(B, N)
        cos, sin = rope(w * self.rate, length)
        return rope_tail(entries, cos, sin)

    def layout(self, kv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole windows [B, N, m, width] (bias added) -> the pooling slots [B, N, span, dim]; with
        overlap the a-halves of window w-1 come first (window -1: absent), then window w's b-halves."""
        if not self.overlap:
            return kv, gate
        d = self.dim
        B, N, m, _ = kv.shape
        first_kv = kv.new_zeros(B, 1, m, d)
        first_gate = gate.new_full((B, 1, m, d), float("-inf"))
        prev_kv = torch.cat([first_kv, kv[:, :-1, :, :d]], dim=1)
        prev_gate = torch.cat([first_gate, gate[:, :-1, :, :d]], dim=1)
        return torch.cat([prev_kv, kv[..., d:]], dim=2), torch.cat([prev_gate, gate[..., d:]], dim=2)

    def full(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """No cache: entries of every complete window of x [B, T, d] (positions 0..T-1) -> [B, T // m, dim]."""
        B, T, _ = x.shape
        m = self.rate
        n = T // m
        if n == 0:
            return x.new_zeros(B, 0, self.dim)
        kv = self.kv_proj(x[:, :n * m]).view(B, n, m, -1)
        gate = self.gate_proj(x[:, :n * m]).view(B, n, m, -1) + self.position_bias
        kv, gate = self.layout(kv, gate)
        return self.pool(kv, gate, 0, rope, T)

    def cached(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope, store, rows, valid,
               length: int | None = None) -> torch.Tensor:
        """With a cache: pool the windows this step completes into the store; return the entries
        every row of the step may see, [B, N, dim] (N = max over rows of (last position + 1) // m,
        i.e. ``length // m`` when the caller gives ``length`` = max(positions) + 1: then nothing is
        read back from the positions, and a compiled decode step stays one graph)."""
        if length is None:
            length = int(positions[:, -1].max()) + 1
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        store.update(self, kv, gate, positions, rope, rows, valid, length)
        return store.read(length // self.rate, rows)


def visible_entries(positions: torch.Tensor, n: int, rate: int) -> torch.Tensor:
    """[B, T, n] bool: the query at position p sees entry w iff w < (p + 1) // rate."""
    return torch.arange(n, device=positions.device) < ((positions + 1) // rate)[..., None]


class IndexerScorer(nn.Module):
    """HF ``indexer.scorer``: the per-head weights projection and the ReLU-weighted score."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.softmax_scale = config.index_head_dim ** -0.5
        self.weights_scaling = config.index_n_heads ** -0.5
        self.weights_proj = Linear(config.hidden_size, config.index_n_heads, bias=False)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, c], keys [B, N, c], x [B, T, d] -> scores [B, T, N] (fp32)."""
        scores = fp32_matmul(q, keys.transpose(-1, -2).unsqueeze(1))                      # [B, T, H, N]
        scores = F.relu(scores) * self.softmax_scale
        weights = self.weights_proj(x).float() * self.weights_scaling                      # [B, T, H]
        return (scores * weights.unsqueeze(-1)).sum(dim=2)


class Indexer(WindowCompressor):
    """The lightning indexer (HF ``compressor.indexer``): a CSA compressor at ``index_head_dim``
    plus ``q_b_proj`` and ``scorer``; :meth:`scores` gives I, :meth:`Compressor.forward` selects."""

    def __init__(self, config: DeepseekV4Config):
        c = config
        super().__init__(c.hidden_size, c.index_head_dim, c.compress_rates[CSA], True, c.rms_norm_eps, "indexer")
        self.n_heads, self.topk = c.index_n_heads, c.index_topk
        self.q_b_proj = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.scorer = IndexerScorer(c)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
               rope: Rope, length: int | None = None) -> torch.Tensor:
        """I(t, s) [B, T, N] fp32 of the queries x [B, T, d] (the attention's query latent q_latent)
        against the indexer's compressed keys [B, N, c]."""
        B, T, _ = x.shape
        cos, sin = rope(positions, length)
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.n_heads, self.dim), cos, sin)
        return self.scorer(q, keys, x)


class Compressor(WindowCompressor):
    """HF ``self_attn.compressor``: HCA (no overlap) or CSA (overlap, with ``indexer``)."""

    def __init__(self, config: DeepseekV4Config, kind: str):
        c = config
        super().__init__(c.hidden_size, c.head_dim, c.compress_rates[kind], kind == CSA, c.rms_norm_eps, "compressor")
        self.indexer = Indexer(c) if kind == CSA else None

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, rope: Rope,
                cache=None, rows=None, valid=None, stage: str | None = None,
                length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """-> (entries [B, N, head_dim], attend [B, T, N] bool: the entries each query attends,
        train): ``train`` is None unless the indexer trains (``stage`` "dense" / "sparse", see the
        module docstring), then (scores [B, T, N] fp32 with gradient, keep [B, T, N] bool: the
        entries its KL is over, every visible one in the dense stage, the selected ones in the
        sparse stage); in the dense stage ``attend`` is every visible entry."""
        if cache is None:
            entries = self.full(x, rope)
        else:
            entries = self.cached(x, positions, rope, cache.store(self.name), rows, valid, length)
        visible = visible_entries(positions, entries.shape[1], self.rate)
        if self.indexer is None:
            return entries, visible, None
        training = stage is not None
        xi, qi = (x.detach(), q_latent.detach()) if training else (x, q_latent)   # the KL alone trains it
        if cache is None:
            keys = self.indexer.full(xi, rope)
        else:
            keys = self.indexer.cached(xi, positions, rope, cache.store(self.indexer.name), rows, valid, length)
        if keys.shape[1] == 0:
            return entries, visible, None
        with contextlib.nullcontext() if training else torch.no_grad():
            scores = self.indexer.scores(xi, qi, positions, keys, rope, length)
        chosen = top_k_visible(scores, visible, self.indexer.topk)[0]
        if not training:
            return entries, chosen, None
        if stage == "dense":
            return entries, visible, (scores, visible)
        return entries, chosen, (scores, chosen)


def compressed_kl(scores: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """The CSA indexer's KL (V3.2's :func:`~nanoseek.model.dsa.indexer_kl`) over the compressed
    entries ``keep`` [B, T, N]: ``probs`` [B, H, T, N] are the attention's probabilities of the
    compressed entries (its sliding-window keys and sink left out; the target renormalises over
    ``keep``), ``scores`` [B, T, N] the indexer's I. The mean is over the queries that keep at least
    one entry (the first m - 1 positions see none); None when no query does."""
    has = keep.any(-1)                                                        # [B, T]
    if not bool(has.any()):
        return None
    probs = probs.transpose(1, 2)[has].transpose(0, 1).unsqueeze(0)           # [1, H, Q, N]
    return indexer_kl(scores[has].unsqueeze(0), probs, keep[has].unsqueeze(0))


__all__ = ["Compressor", "Indexer", "compressed_kl", "WindowCompressor", "FP32RMSNorm", "visible_entries", "HCA", "CSA"]
