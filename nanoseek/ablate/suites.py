"""Ablation suites: a DeepSeek claim, the matched arms that test it, and how to judge the result.

Every suite starts from one base model, a small DeepSeek-V3 (:data:`BASE_MODEL`: MLA, one dense
layer then DeepSeekMoE layers with a shared expert and 16 fine-grained routed experts, top-4,
group-limited routing, sigmoid gate), and derives its other arms from it. Matched configs are
*solved for*, never typed in:

* ``moe-vs-dense``: :func:`dense_with_matched_params` gives the dense SwiGLU width whose
  non-embedding parameters equal the MoE's *activated* (resp. *total*) non-embedding parameters,
  within :data:`PARAM_TOLERANCE`;
* ``attention``: :func:`mha_with_matched_params` keeps the number of query heads and the RoPE
  dims and searches the other head dims (q/k no-RoPE part and value) of multi-head / grouped-
  query attention for the attention parameter count closest to MLA's, within
  :data:`ATTENTION_TOLERANCE` (the achievable step is ``hidden x (heads + kv_heads)``), and
  :func:`gqa_with_matched_kv_cache` gives MQA / GQA arms that cache exactly MLA's bytes per token;
* ``balance``, ``mtp``, ``precision``, ``optimizer``: the same model, only the training recipe
  differs (bias update speed gamma, balance-loss weight alpha, MTP depth and lambda, simulated GEMM
  precision, the optimizer and its learning rate), so parameters match exactly.

A suite with a ``downstream`` spec (``mtp``) also has every run's final model evaluated on held-out
task problems, and that comparison joins its verdict (:mod:`nanoseek.ablate.downstream`).

Each suite's ``judge`` turns the measured arms into a :class:`Verdict`: "held", "did not hold",
"partly held" or "unresolved" (with the effect size the seeds cannot rule out), by the rule of
:func:`nanoseek.ablate.results.compare` (a difference counts when its 95% interval over seeds excludes zero).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data.corpus import DEFAULT_TASKS
from ..model.config import ModelConfig
from ..model.params import attention_params, count_params, kv_cache_bytes_per_token
from .downstream import Downstream
from ..eval.stats import t_interval
from .results import claim_status, combine_statuses, compare, compare_at_wall, tokens_ratio

# A small DeepSeek-V3: dense first layer as wide as the activated experts (1 shared + 4 routed of
# width 32 -> 160, as V3's 18432 = 9 x 2048), 16 routed experts in 4 groups (keep 2), MLA with
# query and KV compression and a shared RoPE key. vocab_size comes from the prepared data.
BASE_MODEL: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    first_k_dense_replace=1, moe_layer_freq=1, num_nextn_predict_layers=0,
    max_position_embeddings=512, rope_scaling=None, initializer_range=0.02, tie_word_embeddings=False,
)

# DeepSeek-V3's balancing recipe for every arm that is not about balancing.
BASE_TRAIN: dict[str, Any] = dict(bias_update_gamma=0.001, seq_aux_alpha=0.0001, mtp_lambda=0.0)

PARAM_TOLERANCE = 0.01          # moe-vs-dense: relative error of the matched non-embedding parameters
ATTENTION_TOLERANCE = 0.03      # attention: relative error of the matched attention parameters
THRESHOLD = 0.0025              # precision: DeepSeek-V3's bound on FP8's relative loss difference to bf16

# What each claim's authors measured at their scale, in a few words: the summary table's last column
# (docs/ablations.md), next to what these runs found. The suites' ``claim`` texts give the sources.
REPORTED: dict[str, str] = {
    "moe-vs-dense": "DeepSeekMoE 2B (100B tokens): far above dense at equal activated parameters, near dense at "
                    "equal total parameters, its upper bound",
    "balance": "DeepSeek-V3, MoE models of 15.7B and 228.7B parameters: aux-loss-free better than the aux loss on "
               "most benchmarks",
    "attention": "DeepSeek-V2: MLA above MHA on benchmarks (a small and a large MoE model) with a KV cache like "
                 "GQA's with 2.25 groups; at 7B dense, MHA above GQA and MQA",
    "mtp": "DeepSeek-V3, 15.7B and 228.7B MoE: MTP better on most benchmarks; 85-90% acceptance of the drafted "
           "token",
    "precision": "DeepSeek-V3, 16B and 230B MoE for about 1T tokens: FP8 within 0.25% relative loss of bf16",
    "optimizer": "Moonlight: Muon about 2x AdamW's compute efficiency in compute-optimal scaling-law runs; "
                 "a 3B/16B MoE trained on 5.7T tokens with it",
    "rl": "DAPO 50 vs GRPO 30 on AIME (Qwen2.5-32B); Dr. GRPO as accurate with shorter answers; GSPO more stable "
          "and efficient (Qwen3 MoE); CISPO DAPO's accuracy in half the steps (MiniMax-M1)",
}


# ---------------------------------------------------------------------------- data classes
@dataclass
class Arm:
    """One configuration of a suite: a model, [train] overrides and an optional GEMM simulation."""
    name: str                               # slug: the run folder's name
    label: str                              # for tables and legends
    model: ModelConfig
    train: dict[str, Any] = field(default_factory=dict)     # [train] keys: gamma, alpha, mtp_lambda
    precision: str | None = None            # None, "bf16" or "fp8" (nanoseek.model.fp8)
    note: str = ""                          # how it was derived
    optim: dict[str, Any] = field(default_factory=dict)     # [optim] keys: optimizer, muon_*
    lr_scale: float = 1.0                   # the arm's peak (and min) lr = the plan's x lr_scale

    def info(self, seq_len: int) -> dict[str, Any]:
        """Sizes the report shows: non-embedding params, KV bytes/token, training FLOPs/token."""
        from ..estimate.flops import flops_per_token
        from ..model.params import kv_cache_bytes_per_token
        total, active = non_embedding_params(self.model)
        use_mtp = self.model.num_nextn_predict_layers > 0 and self.train.get("mtp_lambda", 0) > 0
        return {"params_total": total, "params_active": active,
                "attention_params": attention_params(self.model) * self.model.num_hidden_layers,
                "mtp_params": count_params(self.model).mtp,
                "kv_bytes_per_token": kv_cache_bytes_per_token(self.model, dtype_bytes=2),
                "flops_per_token": flops_per_token(self.model, seq_len, include_mtp=use_mtp)}


@dataclass
class Verdict:
    status: str                             # "held", "did not hold", "partly held", "unresolved..."
    summary: str


@dataclass
class Suite:
    name: str
    title: str
    claim: str                              # what DeepSeek reported, with the source
    arms: list[Arm]
    baseline: str                           # the arm the others are compared with in the table
    judge: Callable[[dict], Verdict]        # arm name -> ArmResult  ->  Verdict
    show_maxvio: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    downstream: Downstream | None = None    # held-out task accuracy of every run's final model (.downstream)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"suite {self.name} has no arm {name!r} (arms: {[a.name for a in self.arms]})")


# ---------------------------------------------------------------------------- derivations
def non_embedding_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated) parameters without the input embedding and the output head (and MTP)."""
    pc = count_params(cfg)
    emb = pc.breakdown["embedding"] + pc.breakdown["lm_head"]
    return pc.total - emb, pc.active - emb


def dense_with_matched_params(moe: ModelConfig, match: str) -> ModelConfig:
    """The dense model (every layer a SwiGLU MLP) whose non-embedding parameters equal the MoE's
    ``match`` = "active" or "total" non-embedding parameters; solves for intermediate_size."""
    if match not in ("active", "total"):
        raise ValueError(f"match must be 'active' or 'total', got {match!r}")
    if not moe.n_routed_experts:
        raise ValueError("dense_with_matched_params needs an MoE config (n_routed_experts > 0)")
    total, active = non_embedding_params(moe)
    target = active if match == "active" else total
    d, L = moe.hidden_size, moe.num_hidden_layers
    dense0 = moe.replace(n_routed_experts=0, intermediate_size=1)
    fixed = non_embedding_params(dense0)[0] - 3 * d * L               # attention + norms
    inter = max(1, round((target - fixed) / (3 * d * L)))
    return moe.replace(n_routed_experts=0, intermediate_size=inter)


def mha_with_matched_params(mla: ModelConfig, kv_heads: int) -> ModelConfig:
    """Standard attention with ``kv_heads`` key/value heads (= heads: MHA; fewer: GQA) whose
    attention parameters are closest to the MLA config's: same heads and RoPE dims, searched
    qk_nope_head_dim and v_head_dim (ties: the q/k and value head dims closest to each other)."""
    H = mla.num_attention_heads
    if kv_heads < 1 or H % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide num_attention_heads={H}")
    target = attention_params(mla)
    rope = mla.qk_rope_head_dim
    best: tuple[tuple[int, int], ModelConfig] | None = None
    for nope in range(0, 4 * mla.qk_head_dim + 1):
        # attention params are linear in v_head_dim: solve for it, then try the integers around
        lo = dataclasses.replace(mla, attention_type="mha", num_key_value_heads=kv_heads, qk_nope_head_dim=nope,
                                 v_head_dim=1)
        per_v = attention_params(dataclasses.replace(lo, v_head_dim=2)) - attention_params(lo)
        v_star = 1 + (target - attention_params(lo)) / per_v
        for v in {max(1, int(v_star)), max(1, int(v_star) + 1)}:
            cand = dataclasses.replace(lo, v_head_dim=v)
            key = (abs(attention_params(cand) - target), abs(nope + rope - v))
            if best is None or key < best[0]:
                best = (key, cand)
    return best[1].validate()


def gqa_with_matched_kv_cache(mla: ModelConfig, kv_heads: int) -> ModelConfig:
    """Standard attention with ``kv_heads`` key/value heads whose KV cache per token equals the MLA
    config's (absorbed: ``kv_lora_rank + qk_rope_head_dim`` values per layer): same heads and RoPE
    dims, ``kv_heads x (qk_head_dim + v_head_dim)`` = MLA's cached values. MLA's own q/k and value
    head dims are kept when they fit exactly (MQA over MLA's head shapes); otherwise the q/k and
    value dims are split as evenly as the RoPE part allows. Its parameters are fewer than MLA's:
    the arm answers "at the same cache", the other arms "at the same parameters"."""
    H = mla.num_attention_heads
    if kv_heads < 1 or H % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide num_attention_heads={H}")
    target = kv_cache_bytes_per_token(mla)
    rope = mla.qk_rope_head_dim
    per_head, rem = divmod(mla.kv_lora_rank + rope, kv_heads)
    if rem or per_head < rope + 2:
        raise ValueError(f"MLA's {mla.kv_lora_rank + rope} cached values per token cannot be split into {kv_heads} "
                         f"KV heads of a key (RoPE {rope} + at least 1) and a value (at least 1)")
    if mla.qk_head_dim + mla.v_head_dim == per_head:
        qk, v = mla.qk_head_dim, mla.v_head_dim
    else:
        qk = max(rope + 1, (per_head + 1) // 2)
        v = per_head - qk
    cfg = dataclasses.replace(mla, attention_type="mha", num_key_value_heads=kv_heads, qk_nope_head_dim=qk - rope,
                              v_head_dim=v).validate()
    assert kv_cache_bytes_per_token(cfg) == target, (kv_cache_bytes_per_token(cfg), target)
    return cfg


# ---------------------------------------------------------------------------- judging helpers
def _late_curve_rel(a, b, seed: int) -> float:
    """Mean relative validation-loss difference a vs b over the second half of the evaluations of ``seed``."""
    ca = {p["step"]: p["val_loss"] for p in next(r for r in a.runs if r.seed == seed).curve}
    cb = {p["step"]: p["val_loss"] for p in next(r for r in b.runs if r.seed == seed).curve}
    steps = sorted(set(ca) & set(cb))
    steps = steps[len(steps) // 2:]
    return statistics.fmean((ca[k] - cb[k]) / cb[k] for k in steps) if steps else float("nan")


def moe_vs_dense(base: ModelConfig) -> Suite:
    dense_a = dense_with_matched_params(base, "active")
    dense_t = dense_with_matched_params(base, "total")
    arms = [
        Arm("moe", "DeepSeekMoE", base, dict(BASE_TRAIN),
            note=f"{base.n_routed_experts} routed (top-{base.num_experts_per_tok}) + {base.n_shared_experts} shared "
                 f"experts of width {base.moe_intermediate_size}"),
        Arm("dense-active", "dense, same activated params", dense_a, dict(BASE_TRAIN),
            note=f"intermediate_size {dense_a.intermediate_size} solved to match the MoE's activated params"),
        Arm("dense-total", "dense, same total params", dense_t, dict(BASE_TRAIN),
            note=f"intermediate_size {dense_t.intermediate_size} solved to match the MoE's total params"),
    ]

    def judge(r: dict) -> Verdict:
        c_act = compare(r["moe"], r["dense-active"])
        c_tot = compare(r["moe"], r["dense-total"])
        status = combine_statuses([claim_status(c_act, expect_lower=True)])
        la, lt, lm = (r[n].mean("final_val_loss") for n in ("dense-active", "dense-total", "moe"))
        if lt < la:
            bound = (f"the MoE covers {100 * (la - lm) / (la - lt):.0f}% of the gap between the two dense models "
                     "(100%: as good as the same total parameters)")
        else:
            bound = ("the dense model with the same total parameters is not better than the one with the same "
                     "activated parameters here (after this few tokens the smaller model learns faster), so the "
                     "'upper bound' the claim measures the MoE against does not exist yet at this scale")
        tps = {n: r[n].mean("tokens_per_s") for n in ("moe", "dense-active", "dense-total")}
        c_wall = compare_at_wall(r["moe"], r["dense-active"])
        summary = (f"DeepSeekMoE vs the dense model with the same activated parameters: {c_act.text('validation loss')}. "
                   f"Vs the dense model with the same total parameters: {c_tot.text('validation loss')}; "
                   f"{bound}. "
                   f"Throughput on this CPU: MoE {tps['moe']:,.0f} tokens/s, dense-active {tps['dense-active']:,.0f}, "
                   f"dense-total {tps['dense-total']:,.0f}. At equal wall-clock instead of equal tokens (per seed, "
                   "both runs' validation loss when the sooner one ended; the runs shared the machine with others, "
                   f"so this is indicative), the MoE vs dense-active: {c_wall.text('validation loss')}.")
        return Verdict(status, summary)

    return Suite(
        "moe-vs-dense", "DeepSeekMoE vs dense models at matched parameters",
        "DeepSeekMoE (fine-grained routed experts + shared experts) reaches a clearly lower loss than a dense "
        "model with the same activated parameters (the same compute per token), and approaches a dense model "
        "with the same total parameters, its upper bound (DeepSeekMoE paper, arXiv 2401.06066, sections 4-5; "
        "the basis of DeepSeek-V2/V3).",
        arms, "moe", judge)


def balance(base: ModelConfig, alphas: tuple[float, ...] = (0.001, 0.01, 0.1),
            fast_gamma: float = 0.01) -> Suite:
    arms = [Arm("aux-free", "aux-loss-free (gamma 0.001)", base,
                dict(bias_update_gamma=0.001, seq_aux_alpha=0.0, mtp_lambda=0.0),
                note="bias update gamma 0.001 (DeepSeek-V3's), no balance loss"),
            Arm(f"aux-free-{fast_gamma:g}", f"aux-loss-free (gamma {fast_gamma:g})", base,
                dict(bias_update_gamma=fast_gamma, seq_aux_alpha=0.0, mtp_lambda=0.0),
                note=f"bias update gamma {fast_gamma:g}: V3's gamma moves a bias by at most 0.001 x steps, "
                     "little in a run this short, so a faster one is tried too; no balance loss")]
    for a in alphas:
        arms.append(Arm(f"aux-{a:g}", f"aux loss, alpha {a:g}", base,
                        dict(bias_update_gamma=0.0, seq_aux_alpha=a, mtp_lambda=0.0),
                        note=f"sequence-wise balance loss alpha {a:g} (V2-Lite used 0.001, V2 0.003), no bias update"))
    arms.append(Arm("none", "no balancing", base, dict(bias_update_gamma=0.0, seq_aux_alpha=0.0, mtp_lambda=0.0),
                    note="neither bias update nor balance loss"))
    aux = [a.name for a in arms[2:-1]]

    def judge(r: dict) -> Verdict:

        def against_aux(free: str) -> tuple[list[str], str]:
            loss = {n: compare(r[free], r[n]) for n in aux}
            vio = {n: compare(r[free], r[n], "maxvio_mean") for n in aux}
            statuses = [claim_status(c, True) for c in loss.values()] + [claim_status(c, True) for c in vio.values()]
            parts = [f"vs {r[n].label}: {loss[n].text('validation loss')}; {vio[n].text('mean MaxVio')}" for n in aux]
            none_vio = compare(r[free], r["none"], "maxvio_mean")
            return statuses, (f"{r[free].label}: " + "; ".join(parts) +
                              f"; vs no balancing: {none_vio.text('mean MaxVio')}")

        statuses, text = against_aux("aux-free")
        fast_statuses, fast_text = against_aux(f"aux-free-{fast_gamma:g}")
        summary = (f"{text}. Verdict from V3's gamma; with the faster bias update ({combine_statuses(fast_statuses)}): "
                   f"{fast_text}.")
        return Verdict(combine_statuses(statuses), summary)

    return Suite(
        "balance", "Auxiliary-loss-free load balancing vs an auxiliary balance loss",
        "Balancing experts with a per-expert bias that only affects routing (nudged by gamma after every step "
        "towards the mean load) gives a better model than balancing with an auxiliary loss, which interferes "
        "with the language-modelling gradient, while the load stays as balanced or better (DeepSeek-V3 report, "
        "arXiv 2412.19437, section 2.1.2 and the ablation in section 4.5.2; Wang et al., arXiv 2408.15664). "
        "MaxVio = max expert load / mean load - 1, per training batch and MoE layer.",
        arms, "aux-free", judge, show_maxvio=True)


def attention(base: ModelConfig, gqa_kv_heads: int | None = None) -> Suite:
    H = base.num_attention_heads
    kv = gqa_kv_heads or max(1, H // 2)
    mha = mha_with_matched_params(base, H)
    gqa = mha_with_matched_params(base, kv)
    same_cache = {}                          # KV heads -> the arm with MLA's KV cache bytes (where one exists)
    for heads in (1, kv):
        try:
            same_cache[heads] = gqa_with_matched_kv_cache(base, heads)
        except ValueError:
            pass

    def dims(c: ModelConfig) -> str:
        return (f"{c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, q/k dim {c.qk_head_dim}, "
                f"v dim {c.v_head_dim}")

    arms = [
        Arm("mla", "MLA", base, dict(BASE_TRAIN),
            note=f"{H} heads, kv_lora_rank {base.kv_lora_rank}, q_lora_rank {base.q_lora_rank}, "
                 f"q/k dim {base.qk_head_dim} (RoPE {base.qk_rope_head_dim}), v dim {base.v_head_dim}"),
        Arm("mha", "MHA", mha, dict(BASE_TRAIN), note=dims(mha) + ", head dims solved to match MLA's parameters"),
        Arm(f"gqa-{kv}", f"GQA ({kv} KV heads)", gqa, dict(BASE_TRAIN),
            note=dims(gqa) + ", head dims solved to match MLA's parameters"),
    ]
    for heads, cfg in same_cache.items():
        name = "mqa" if heads == 1 else f"gqa-{heads}"
        arms.append(Arm(f"{name}-same-cache", f"{name.upper()}, MLA's KV cache", cfg, dict(BASE_TRAIN),
                        note=dims(cfg) + ": the KV cache bytes per token of MLA (fewer parameters)"))

    def judge(r: dict) -> Verdict:
        c_mha = compare(r["mla"], r["mha"])
        c_gqa = compare(r[f"gqa-{kv}"], r["mha"])
        kvb = {a.name: r[a.name].info["kv_bytes_per_token"] for a in arms}
        cache = [a.name for a in arms if a.name.endswith("-same-cache") and a.name in r]
        c_cache = {n: compare(r["mla"], r[n]) for n in cache}
        summary = (f"MLA vs MHA at matched parameters: {c_mha.text('validation loss')}. GQA vs MHA: "
                   f"{c_gqa.text('validation loss')}. "
                   + "".join(f"MLA vs {r[n].label} (the same KV cache): {c.text('validation loss')}. "
                             for n, c in c_cache.items())
                   + f"KV cache (bf16, all layers): MLA {kvb['mla']:,} bytes/token, "
                   f"GQA {kvb[f'gqa-{kv}']:,}, MHA {kvb['mha']:,} "
                   f"(MLA caches {100 * kvb['mla'] / kvb['mha']:.0f}% of MHA's).")
        return Verdict(combine_statuses([claim_status(c_mha, True)] + [claim_status(c, True) for c in c_cache.values()]),
                       summary)

    return Suite(
        "attention", "MLA vs MHA vs GQA at matched parameters and at MLA's KV cache",
        "Multi-head latent attention caches only a compressed latent and one shared RoPE key per token, a KV "
        "cache far smaller than multi-head attention's, and still performs better than MHA, whereas GQA/MQA "
        "shrink the cache at a cost in quality (DeepSeek-V2 report, arXiv 2405.04434, section 2.1 and "
        "appendix D).",
        arms, "mla", judge, extra={"kv_heads": kv})


def mtp(base: ModelConfig, mtp_lambda: float = 0.3) -> Suite:
    with_mtp = base.replace(num_nextn_predict_layers=1)
    arms = [
        Arm("no-mtp", "next token only", base, dict(BASE_TRAIN, mtp_lambda=0.0), note="num_nextn_predict_layers 0"),
        Arm("mtp", f"MTP (D=1, lambda {mtp_lambda:g})", with_mtp, dict(BASE_TRAIN, mtp_lambda=mtp_lambda),
            note=f"num_nextn_predict_layers 1, loss CE + {mtp_lambda:g} x CE of token t+2"),
    ]

    def judge(r: dict) -> Verdict:
        c = compare(r["mtp"], r["no-mtp"])
        f0, f1 = r["no-mtp"].info["flops_per_token"], r["mtp"].info["flops_per_token"]
        summary = (f"Main-model validation loss (next token only, the MTP module unused at evaluation) with MTP vs "
                   f"without: {c.text('validation loss')}. The MTP arm spends {100 * (f1 / f0 - 1):.0f}% more "
                   "training FLOPs per token (its extra block and output head); at inference the module is dropped.")
        return Verdict(combine_statuses([claim_status(c, True)]), summary)

    return Suite(
        "mtp", "Multi-token prediction",
        "Training with a multi-token-prediction objective (one extra sequential module predicting token t+2, "
        "loss weight lambda = 0.3) improves the main model at the same training data; the module is discarded "
        "at inference, so it costs nothing there (DeepSeek-V3 report, arXiv 2412.19437, section 2.2 and the "
        "ablation in section 4.5.1, Table 4).",
        arms, "no-mtp", judge,
        # DeepSeek measured MTP on benchmarks: the held-out tasks of the corpus, and the module as a draft
        downstream=Downstream(DEFAULT_TASKS, comparisons=(("mtp", "no-mtp"),), speculative_arms=("mtp",)))


def precision(base: ModelConfig, block: int = 128) -> Suite:
    arms = [
        Arm("fp32", "fp32 (no simulation)", base, dict(BASE_TRAIN), None, note="every op fp32: the reference"),
        Arm("bf16", "bf16 GEMMs (simulated)", base, dict(BASE_TRAIN), "bf16",
            note="linear-layer GEMM inputs rounded to bf16, fp32 accumulation, bf16 outputs"),
        Arm("fp8", "FP8 e4m3 GEMMs (simulated)", base, dict(BASE_TRAIN), "fp8",
            note=f"e4m3, 1x{block} activation tiles, {block}x{block} weight blocks, {block}x1 tiles for wgrad, "
                 "fp32 accumulation, bf16 outputs"),
    ]

    def judge(r: dict) -> Verdict:
        c = compare(r["fp8"], r["bf16"])
        c_ref = compare(r["bf16"], r["fp32"])
        rels = [abs(x) for x in c.per_seed_rel.values()]
        # what any harmless perturbation of the trajectory does here: bf16 vs fp32, and the seeds' spread
        floor = max([abs(x) for x in c_ref.per_seed_rel.values()] +
                    [r[n].std("final_val_loss") / r[n].mean("final_val_loss") for n in ("bf16", "fp8")])
        if all(x < THRESHOLD for x in rels):
            status = "held"
        elif floor >= THRESHOLD and statistics.fmean(rels) <= floor:
            status = "unresolved: this scale cannot resolve 0.25%"
        elif all(x >= THRESHOLD for x in rels):
            status = "did not hold"
        else:
            status = "partly held"
        per_seed = ", ".join(f"seed {s}: {100 * x:+.3f}%" for s, x in c.per_seed_rel.items())
        late = {s: _late_curve_rel(r["fp8"], r["bf16"], s) for s in c.per_seed_rel}
        n_seeds = len(r["bf16"].runs)
        rel_sd = max(r[n].std("final_val_loss") / r[n].mean("final_val_loss") for n in ("bf16", "fp8"))
        spread = (f"the spread between seeds is {100 * rel_sd:.2f}% of the loss" if n_seeds > 1
                  else "with one seed there is no spread estimate")
        summary = (f"Relative difference of the final validation loss, FP8 vs bf16, paired by seed (same data order, "
                   f"same initialisation): {per_seed} (the claim's threshold is 0.25%); averaged over the second half "
                   "of the validation curve: " + ", ".join(f"seed {s}: {100 * x:+.3f}%" for s, x in late.items()) +
                   ". For scale, the same measure for bf16-rounded vs exact fp32 GEMMs: "
                   + ", ".join(f"seed {s}: {100 * x:+.3f}%" for s, x in c_ref.per_seed_rel.items())
                   + f"; {spread}."
                   + (" Here any perturbation of the training trajectory moves the loss by more than 0.25%, so "
                      "this scale cannot resolve the claim." if floor >= THRESHOLD else ""))
        if len(rels) == 1:
            status += " (one seed)"
        return Verdict(status, summary)

    return Suite(
        "precision", "FP8 training with fine-grained scaling vs bf16",
        "FP8 mixed-precision training with fine-grained quantisation (e4m3 for all three GEMMs of every linear "
        "layer, 1x128 activation tiles, 128x128 weight blocks, fp32 accumulation; embedding, output head, router, "
        "norms and attention in high precision) stays within 0.25% relative loss of bf16 training (DeepSeek-V3 "
        "report, arXiv 2412.19437, section 3.3 and appendix B.1). Simulated here by quantise-dequantise on the "
        "CPU (nanoseek/model/fp8.py).",
        arms, "bf16", judge, extra={"block": block})


def half_the_tokens(fractions: dict[int, float | None]) -> tuple[str, str]:
    """The status of "Muon needs about half of AdamW's tokens for the same loss" from the per-seed
    fractions of :func:`tokens_ratio`, and how to say them: held when the 95% interval over seeds
    lies at or below 0.5, did not hold when above it (or where Muon never reached the loss),
    unresolved when it contains 0.5; one seed gives only a direction."""
    shown = ", ".join("never" if f is None else f"{f:.0%}" for f in fractions.values())
    if any(f is None for f in fractions.values()):
        return "did not hold", f"by seed {shown}"
    values = list(fractions.values())
    if len(values) < 2:
        return ("for" if values[0] <= 0.5 else "against"), shown
    iv = t_interval(values)
    said = f"{statistics.fmean(values):.0%}, 95% interval over seeds [{iv.low:.0%}, {iv.high:.0%}] (by seed {shown})"
    if iv.high <= 0.5:
        return "held", said
    return ("did not hold" if iv.low > 0.5 else "unresolved: the interval contains 50%"), said


def optimizer(base: ModelConfig, lr_scales: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)) -> Suite:
    """Muon vs AdamW, each at ``lr_scales`` x the plan's lr; the verdict compares each one's best lr.

    The default grid spans 16x around the plan's lr: at 2M tokens a three-point grid (x0.5 to x2) left
    AdamW's best rate at its lowest point, so the verdict could not be read (docs/ablations.md).
    """
    arms = []
    for opt, label, optim, note in (
            ("adamw", "AdamW", {"optimizer": "adamw"}, "AdamW for every parameter"),
            ("muon", "Muon", {"optimizer": "muon"},
             "Muon (Newton-Schulz orthogonalised momentum, update RMS matched to AdamW's) for the hidden "
             "matrices, AdamW for embeddings, head, norms, router and biases")):
        for k in lr_scales:
            arms.append(Arm(f"{opt}-lr{k:g}x", f"{label}, lr x{k:g}", base, dict(BASE_TRAIN), optim=dict(optim),
                            lr_scale=k, note=f"{note}; peak lr {k:g} x the plan's"))

    def suite_arm(name: str) -> Arm:
        return next(a for a in arms if a.name == name)

    def best(r: dict, opt: str) -> str:
        return min((a.name for a in arms if a.name.startswith(opt + "-")), key=lambda n: r[n].mean("final_val_loss"))

    def judge(r: dict) -> Verdict:
        m, a = best(r, "muon"), best(r, "adamw")
        c = compare(r[m], r[a])
        tps = {n: r[n].mean("tokens_per_s") for n in (m, a)}
        wall = {n: r[n].mean("wall_s") for n in (m, a)}
        summary = (f"Best Muon ({r[m].label}) vs best AdamW ({r[a].label}), each at its best of "
                   f"{len(lr_scales)} learning rates, at equal tokens: {c.text('validation loss')}. Throughput: "
                   f"Muon {tps[m]:,.0f} tokens/s, AdamW {tps[a]:,.0f} (training time {wall[m]:.0f}s vs {wall[a]:.0f}s "
                   "per run; the wall-clock plot compares them at equal time). The best lr is picked on the same "
                   "runs it is judged on.")
        need = tokens_ratio(r[m], r[a])
        efficiency, said = half_the_tokens(need)
        summary += (f" Tokens {r[m].label} needed to reach {r[a].label}'s final loss: {said} of AdamW's (the "
                    "claim: about 50%; read from the validation losses, every "
                    f"{r[a].runs[0].curve[0]['tokens']:,} tokens, interpolated between them).")
        edge = [r[n].label for n in (m, a) if suite_arm(n).lr_scale in (min(lr_scales), max(lr_scales))]
        if edge and len(lr_scales) > 1:
            summary += (f" Not tuned: the best lr of {' and '.join(edge)} is at the edge of the grid "
                        f"{', '.join(f'x{k:g}' for k in lr_scales)}; widen it (or --lr) before reading the verdict.")
        status = combine_statuses([claim_status(c, True), efficiency])
        if edge and len(lr_scales) > 1:
            status = f"unresolved: the learning rates are not tuned (was: {status})"
        return Verdict(status, summary)

    return Suite(
        "optimizer", "Muon vs AdamW in pre-training, each at its best learning rate",
        "Muon (momentum orthogonalised by Newton-Schulz iterations, with weight decay and the update RMS "
        "matched to AdamW's) reaches a given loss with about half the training compute of AdamW (Moonlight, "
        "arXiv 2502.16982, section 3); Kimi K2 (MuonClip), DeepSeek-V4 and nanochat train with it.",
        arms, "adamw-lr1x" if 1.0 in lr_scales else arms[0].name, judge, extra={"lr_scales": list(lr_scales)})


SUITES: dict[str, Callable[[ModelConfig], Suite]] = {
    "moe-vs-dense": moe_vs_dense, "balance": balance, "attention": attention, "mtp": mtp, "precision": precision,
    "optimizer": optimizer,
}


def base_model(vocab_size: int, **overrides: Any) -> ModelConfig:
    """The ablation base model for a tokenizer of ``vocab_size`` tokens."""
    return ModelConfig(**{**BASE_MODEL, "vocab_size": vocab_size, **overrides}).validate()


def describe_base(cfg: ModelConfig) -> str:
    """One sentence describing the base model (for reports)."""
    total, active = non_embedding_params(cfg)
    k = cfg.first_k_dense_replace
    dense = "the first" if k == 1 else f"the first {k}"
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({dense} dense, "
            f"SwiGLU width {cfg.intermediate_size}), MLA with {cfg.num_attention_heads} heads (q_lora_rank "
            f"{cfg.q_lora_rank}, kv_lora_rank {cfg.kv_lora_rank}, q/k head dim {cfg.qk_nope_head_dim} + "
            f"{cfg.qk_rope_head_dim} RoPE, v {cfg.v_head_dim}), DeepSeekMoE with {cfg.n_shared_experts} shared + "
            f"{cfg.n_routed_experts} routed experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok} "
            f"within {cfg.topk_group} of {cfg.n_group} groups, sigmoid gate, vocab {cfg.vocab_size}, untied embeddings: "
            f"{total:,} non-embedding parameters, {active:,} activated per token")


def build_suite(name: str, vocab_size: int, **base_overrides: Any) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return SUITES[name](base_model(vocab_size, **base_overrides))


__all__ = ["BASE_MODEL", "BASE_TRAIN", "PARAM_TOLERANCE", "ATTENTION_TOLERANCE", "Arm", "Suite", "Verdict", "SUITES",
           "non_embedding_params", "dense_with_matched_params", "mha_with_matched_params", "gqa_with_matched_kv_cache", "base_model", "build_suite",
           "describe_base"]
