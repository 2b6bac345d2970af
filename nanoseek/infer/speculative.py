"""MTP self-speculative decoding: draft one token with the MTP module, verify it with the main model.

DeepSeek-V3 trains one multi-token-prediction module (depth 1) that, at position i, combines
the main model's final hidden state h_i with the embedding of token t_{i+1} and predicts
t_{i+2}. At inference it is a free draft model sharing the embedding and the head (the report:
85-90% acceptance of the second token, about 1.8x tokens/s). One engine step per sequence:

    feed [t_p, d] at positions [p, p+1]       (t_p: last accepted token, d: the MTP draft of t_{p+1})
    main logits at p  -> target for t_{p+1};   at p+1 -> target for t_{p+2} if d is accepted
    accept d?  yes: emit d and a "bonus" token from the logits at p+1 (two tokens, one step)
               no:  emit the corrected token (one token, like plain decoding)
    MTP at [p, p+1] with inputs (h_p, t_{p+1}) and (h_{p+1}, t_{p+2}) -> the next draft from the
    last position whose inputs are both real (p+1 if accepted, p if not)

Rejection needs no cache rollback: the cache masks slots beyond each query's position, and the
next step rewrites slot p+1 before anything reads it (main cache and MTP cache alike).

Acceptance (:func:`speculative_accept`) is the standard rule of Leviathan et al. / Chen et al.
(2023): with target distribution p and draft distribution q (the same temperature / top-k /
top-p applied to both), accept d with probability min(1, p(d) / q(d)); on rejection sample from
norm(max(p - q, 0)). The output is distributed exactly as p, so speculative decoding changes
speed, never the distribution. Greedy rows use one-hot p and q: accept iff argmax p == d, and
the corrected token is argmax p, so greedy output is identical with and without drafting (up to
the floating-point differences of a 2-token versus a 1-token forward, which do not flip an
argmax unless two logits tie to rounding).

Only depth-1 drafting is implemented (DeepSeek-V3 ships D = 1); deeper MTP modules are unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample_from_probs


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                       u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one draft per row. p, q [B, V] target / draft distributions, draft [B] ids drawn
    from q, uniforms [B] in [0, 1) -> (token [B]: the draft or its correction, accepted [B] bool)."""
    idx = draft[:, None]
    pd, qd = p.gather(1, idx)[:, 0], q.gather(1, idx)[:, 0]
    accepted = u_accept.to(pd) * qd < pd                        # u < p(d) / q(d) without dividing
    residual = (p - q).clamp_min(0)
    empty = residual.sum(dim=-1) <= 0                           # p == q (then d is always accepted)
    residual = torch.where(empty[:, None], p, residual)
    corrected = sample_from_probs(residual, u_resample)
    return torch.where(accepted, draft, corrected), accepted


@dataclass
class SpeculativeStats:
    """Counts since the engine was built (or since ``reset``)."""

    steps: int = 0        # verify steps x rows
    drafted: int = 0      # drafts proposed
    accepted: int = 0     # drafts accepted
    emitted: int = 0      # tokens emitted by verify steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Average tokens one sequence gains per forward pass (1.0 without speculation)."""
        return self.emitted / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.steps = self.drafted = self.accepted = self.emitted = 0


__all__ = ["speculative_accept", "SpeculativeStats"]
