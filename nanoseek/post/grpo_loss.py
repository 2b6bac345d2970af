"""The GRPO objective as pure tensor functions (no model, no sampling), unit-tested by hand.

Group Relative Policy Optimization (DeepSeekMath, used for DeepSeek-R1): for a question q the
old policy samples a group of G outputs o_1..o_G with rewards r_1..r_G. There is no value model;
the advantage of output i is its reward relative to its own group, the same for all its tokens:

    A_i = (r_i - mean(r)) / std(r)                                   (std: unbiased, as torch.std)

Dr. GRPO drops the division by std (``scale_rewards=False``): A_i = r_i - mean(r).

Per token t of output i, with rho = pi_theta / pi_old (the importance ratio):

    J_it = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta * KL_it
    KL_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1          (Schulman's k3 estimator, >= 0)

eps_low = eps_high = 0.2 is the original; DAPO raises eps_high ("clip-higher"). The loss is
-J aggregated over the valid (completion) tokens in one of three ways:

* ``grpo``:    mean over sequences of (per-sequence token mean)   (DeepSeekMath / R1)
* ``dapo``:    sum over all tokens / number of tokens              (token-level mean, DAPO)
* ``dr_grpo``: sum over all tokens / (num_sequences * max_len)     (constant normaliser, Dr. GRPO)

With gradient accumulation the batch is split into micro-batches; :func:`aggregate` takes the
*whole* batch's sequence and token counts as normalisers, so the micro-batch losses add up to
exactly the full-batch loss.

DAPO's soft overlong punishment (:func:`overlong_penalty`) is a reward-shaping term added to r
before the advantages are computed.

The clipped surrogate above is one of three policy losses (``policy_loss``, :data:`POLICY_LOSSES`),
which differ in what the importance weight is and what is clipped; aggregation and KL are shared:

* ``clip``:  the token-level PPO/GRPO surrogate above (also DAPO's and Dr. GRPO's).
* ``gspo``:  Group Sequence Policy Optimization (Qwen, arXiv 2507.18071): one importance ratio per
  sequence, the geometric mean of its token ratios,
  ``s_i = exp(1/|o_i| sum_t (log pi_theta - log pi_old))``, in the same clipped surrogate
  ``min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``; every token of o_i carries that
  value, so with ``loss_agg = "grpo"`` the loss is the paper's mean over sequences. Its epsilons are
  tiny because s_i is a per-token geometric mean: 3e-4 / 4e-4 (GSPO paper v2 section 5.1, as TRL's
  and ms-swift's docs reproduce it with ``importance_sampling_level = "sequence"``, beta = 0).
  On-policy (s_i = 1) its gradient is the sequence-level policy gradient
  ``-1/B sum_i A_i 1/|o_i| sum_t grad log pi(o_it)``.
* ``cispo``: CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance-sampling *weight*, not the
  update: ``J_it = sg(clip(rho_it, 1 - eps_low, 1 + eps_high)) A_i log pi_theta(o_it)``, so every
  token keeps a gradient (``w A grad log pi``), none is dropped by the clip; the paper aggregates
  over tokens (``loss_agg = "dapo"``), imposes no lower bound (eps_low = 1: the weight is >= 0
  anyway) and tunes only eps_high. Public CISPO setups put the weight's upper bound anywhere from
  1.28 (Trinity-RFT's default eps_high 0.28) to 5-9 (eps_high 4-8 in TRL-based configs); the
  default here, eps_high 4, caps it at 5. Its loss *value* is -A log pi, not about 0 on-policy as
  the surrogates' is.

The epsilons given to :func:`grpo_loss` are the chosen policy loss's (each has its own keys in
:class:`~nanoseek.post.grpo.GRPOSection`); ``clip_*_frac`` count the tokens whose ratio (GSPO: whose
sequence's ratio) took the clipped branch, for CISPO the tokens whose weight was clipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps), or r_i - mean without ``scale_rewards``.

    ``rewards`` [N] holds N = num_groups * group_size rewards, the G outputs of one prompt
    contiguous. A group whose rewards all agree gets advantage exactly 0 (it carries no signal).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)                                 # [groups, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards all agree (all right or all wrong)."""
    r = rewards.float().view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term per response of ``lengths`` tokens.

    0 up to ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at ``max_len``, and
    ``-factor`` beyond. ``buffer=0`` turns it off (all zeros).
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"overlong buffer {buffer} exceeds max_len {max_len}")
    over = (lengths - (max_len - buffer)).clamp(min=0) / buffer              # 0..1 inside the buffer
    return -factor * over.clamp(max=1.0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32: [B, T, V], [B, T] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, max_len: int | None = None,
              total_sequences: int | None = None, total_tokens: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the valid tokens (``mask`` 1) to a scalar; see module doc.

    ``total_sequences`` / ``total_tokens`` are the normalisers of the whole batch when this is one
    micro-batch of it (default: this batch). ``max_len`` is the constant of ``dr_grpo``.
    """
    mask = mask.to(per_token.dtype)
    n_seq = per_token.shape[0] if total_sequences is None else total_sequences
    if mode == "grpo":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / n_seq
    if mode == "dapo":
        n_tok = mask.sum() if total_tokens is None else total_tokens
        return (per_token * mask).sum() / max(float(n_tok), 1.0)
    if mode == "dr_grpo":
        if not max_len:
            raise ValueError("loss aggregation 'dr_grpo' needs max_len (the constant normaliser)")
        return (per_token * mask).sum() / (n_seq * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")


# ---------------------------------------------------------------------------- policy losses
def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rho_it = pi_theta / pi_old per token: [B, T]."""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's s_i = exp(mean over o_i's valid tokens of log pi_theta - log pi_old), on every token: [B, T]."""
    log_ratio = ((logp - old_logp) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)     # [B]
    return torch.exp(log_ratio).unsqueeze(1).expand_as(logp)


def clipped_surrogate(ratio, A, logp, eps_low, eps_high):
    """PPO's min(ratio A, clip(ratio) A) and the (low, high) masks where the clipped branch is taken."""
    objective = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    return objective, (ratio < 1 - eps_low) & (A < 0), (ratio > 1 + eps_high) & (A > 0)


def clipped_weight(ratio, A, logp, eps_low, eps_high):
    """CISPO's sg(clip(ratio)) A log pi and the (low, high) masks where the weight was clipped."""
    weight = ratio.detach().clamp(1 - eps_low, 1 + eps_high)
    return weight * A * logp, ratio < 1 - eps_low, ratio > 1 + eps_high


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss: its importance ratio and its per-token objective (see the module docstring)."""

    ratio: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (logp, old_logp, mask) -> [B, T]
    objective: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ratio, A, logp, eps_low, eps_high)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "clip": PolicyLoss(token_ratio, clipped_surrogate),        # GRPO / DAPO / Dr. GRPO
    "gspo": PolicyLoss(sequence_ratio, clipped_surrogate),     # Qwen's GSPO
    "cispo": PolicyLoss(token_ratio, clipped_weight),          # MiniMax-M1's CISPO
}


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor          # scalar to backpropagate
    clip_frac: torch.Tensor     # share of valid tokens where the clipped branch was taken
    clip_low_frac: torch.Tensor   # ... at the low bound (A < 0, rho < 1 - eps_low; CISPO: any A)
    clip_high_frac: torch.Tensor  # ... at the high bound (A > 0, rho > 1 + eps_high; CISPO: any A)
    kl: torch.Tensor            # mean k3 KL per valid token (0 when no reference)
    ratio_mean: torch.Tensor    # mean rho (GSPO: s_i) over valid tokens


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_agg: str = "grpo", max_len: int | None = None,
              total_sequences: int | None = None, total_tokens: float | None = None,
              policy_loss: str = "clip") -> GRPOLossOutput:
    """The GRPO loss. logp/old_logp/ref_logp/mask [B, T] over completion tokens, advantages [B].

    ``policy_loss`` picks the importance ratio and objective (:data:`POLICY_LOSSES`); ``eps_low`` /
    ``eps_high`` are its clip range. ``ref_logp`` is required when ``beta > 0`` and ignored (no KL)
    when ``beta == 0``.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference log-probs (ref_logp)")
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy_loss!r}; expected one of {tuple(POLICY_LOSSES)}")
    pl = POLICY_LOSSES[policy_loss]
    mask_f = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(1)                               # [B, 1]: same for every token
    ratio = pl.ratio(logp, old_logp, mask_f)                                 # [B, T]
    objective, low, high = pl.objective(ratio, A, logp, eps_low, eps_high)
    kl = k3_kl(logp, ref_logp) if (beta > 0) else torch.zeros_like(logp)
    per_token = -(objective - beta * kl)
    loss = aggregate(per_token, mask_f, loss_agg, max_len=max_len, total_sequences=total_sequences,
                     total_tokens=total_tokens)
    with torch.no_grad():
        n = mask_f.sum().clamp(min=1)
        low, high = low.to(logp.dtype) * mask_f, high.to(logp.dtype) * mask_f
        out = GRPOLossOutput(loss=loss, clip_frac=(low + high).sum() / n, clip_low_frac=low.sum() / n,
                             clip_high_frac=high.sum() / n, kl=(kl * mask_f).sum() / n,
                             ratio_mean=(ratio * mask_f).sum() / n)
    return out


__all__ = ["LOSS_AGGREGATIONS", "POLICY_LOSSES", "PolicyLoss", "token_ratio", "sequence_ratio",
           "clipped_surrogate", "clipped_weight", "group_advantages", "zero_std_groups", "k3_kl", "overlong_penalty",
           "token_logprobs", "token_entropy", "aggregate", "grpo_loss", "GRPOLossOutput"]
