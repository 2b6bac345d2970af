"""GRPO step time: nanoseek's GRPO stage vs TRL's ``GRPOTrainer`` on the same model and rollouts.

    python benchmarks/bench_grpo.py                        # 1 and 2 threads, 4 timed steps per side
    python benchmarks/bench_grpo.py --threads 1 --steps 6 --profile
    pip install -e '.[bench]'                              # TRL (the benchmark extra), once

Both sides train the same weights: a model of the speedrun's ``[model]`` (hidden 128, 3 layers, MoE
8 experts top-2, vocab 1024; random init, MTP off as the GRPO stage runs it) saved with
``save_pretrained`` and loaded by ``transformers.AutoModelForCausalLM.from_pretrained``, with one
tokenizer (a 1024-token BPE trained here on the task text, saved by nanoseek and loaded by
``AutoTokenizer``; the prompt ids of both sides are checked equal before timing). One step = a
rollout of ``--prompts`` built-in task prompts (the speedrun's curriculum, ``chat`` template) x
``--group`` samples of up to ``--max-new`` tokens at temperature 1 (top-k / top-p off), the
rule-based rewards of :mod:`nanoseek.tasks.rewards` (TRL gets them through a ``reward_funcs``
wrapper), group advantages, then ONE optimizer step (AdamW, lr 1e-5, grad clip 1.0) over the 64
rows in micro-batches of ``--micro-batch``: beta = 0 (no reference model), one pass per rollout
(TRL: ``num_iterations=1``, ``steps_per_generation = gradient_accumulation_steps`` so neither side
computes old log-probs), DAPO token-mean loss with eps_high 0.28 (the speedrun's).

The two sides alternate in one process: TRL's ``train()`` runs, and its ``on_step_end`` callback
runs one nanoseek step (the shared trainer's own ``_draw`` = rollout + scoring, and
``_train_step`` = update, as ``nanoseek grpo`` runs them); a TRL step is the wall time between
two callbacks less the nanoseek step inside. Phases: nanoseek's rollout is the engine's
generation time, scoring the reward function's; TRL's rollout is its ``_generate``, scoring its
``_calculate_rewards`` (both wrapped with a timer); "prep" is the rest of building the batch
(tokenising, padding, advantages), "update" the remainder of the step (forward, backward,
optimizer). The first ``--warmup`` steps of each side are not timed; figures are medians.

``--profile`` ends with torch.profiler tables (top operators by self time) of one nanoseek
rollout and one update, the per-operator view of where the time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEEDRUN_TASKS = "compare:1-2,arithmetic:1-2,modular:1,word_problems:1"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts to run, comma-separated (default 1,2)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--max-new", type=int, default=48, help="max completion tokens (default 48)")
    p.add_argument("--micro-batch", type=int, default=32, help="rows per forward/backward (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (default 1)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side (default 4)")
    p.add_argument("--pool", type=int, default=256, help="prompts in the pool (default 256)")
    p.add_argument("--nanoseek-only", action="store_true", help="time nanoseek alone (no TRL needed)")
    p.add_argument("--profile", action="store_true", help="per-operator profile of a nanoseek rollout and update")
    p.add_argument("--compile", action="store_true",
                   help="also time nanoseek with [train] compile = true (the update's forward + backward and the "
                        "rollout's decode step through torch.compile), alternating with the other sides; it "
                        "compiles in the warm-up steps (use --warmup 2 or more) and prints the seconds")
    return p.parse_args()


# ----------------------------------------------------------------------------- shared setup


def build_shared(tmp: Path, pool: int):
    """The model folder (weights + tokenizer) both sides load, and the prompt pool."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model.registry import build_model, save_pretrained
    from nanoseek.post.datasets import load_rl_prompts
    from nanoseek.train.config import ModelSection, read_toml

    prompts = load_rl_prompts(SPEEDRUN_TASKS, pool, "train", seed=0)
    corpus = load_rl_prompts(SPEEDRUN_TASKS, 4000, "train", seed=1)
    tok = Tokenizer.train([f"{p.prompt} {p.answer}" for p in corpus], vocab_size=1024)
    spec = dict(read_toml(Path(__file__).resolve().parents[1] / "nanoseek/configs/train/speedrun.toml")["model"])
    fields = {**spec, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    cfg = ModelSection(preset=fields.pop("preset"), fields=fields).build_config()
    torch.manual_seed(0)
    save_pretrained(build_model(cfg), tmp / "model")
    tok.save(tmp / "model")
    return tmp / "model", prompts


class Timer:
    """Accumulates the wall time of wrapped calls since the last ``take()``."""

    def __init__(self):
        self.t = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t += time.perf_counter() - t0
        return timed

    def take(self) -> float:
        t, self.t = self.t, 0.0
        return t


# ----------------------------------------------------------------------------- nanoseek


class NanoseekSide:
    """nanoseek's GRPO stage (the shared trainer over a GRPOTask), stepped one rollout at a time."""

    def __init__(self, model_dir: Path, prompts, args, run_dir: Path, compile: bool = False):
        from nanoseek.model.registry import from_pretrained
        from nanoseek.post.grpo import GRPOTask
        from nanoseek.post.registry import stage_config_from_dict
        from nanoseek.tasks.rewards import RewardConfig, build_reward_fn
        from nanoseek.data.tokenizer import Tokenizer
        from nanoseek.train.loop import ExpertBalanceHook, Trainer

        cfg = stage_config_from_dict("grpo", {
            "model": {"init_from": str(model_dir)},
            "grpo": {"prompts": SPEEDRUN_TASKS, "template": "chat", "prompts_per_step": args.prompts,
                     "group_size": args.group, "max_new_tokens": args.max_new, "micro_batch_size": args.micro_batch,
                     "loss_agg": "dapo", "eps_high": 0.28, "log_samples": 0},
            "train": {"max_steps": 10_000, "out_dir": str(run_dir), "device": "cpu", "seed": 0,
                      "compile": compile}})
        self.model = from_pretrained(model_dir, dtype=torch.float32).train()
        self.model.use_mtp = False
        self.tokenizer = Tokenizer.load(model_dir)
        self.score, self.rollout_t = Timer(), 0.0
        reward_fn = self.score.wrap(build_reward_fn(RewardConfig.for_template("chat"), cfg.algo.reward_workers))
        self.task = GRPOTask(self.model, self.tokenizer, prompts, cfg.algo, reward_fn=reward_fn, compile=compile)
        self.trainer = Trainer(self.model, self.task, cfg.optim, cfg.train, cfg.spike, run_dir=run_dir,
                               hooks=[ExpertBalanceHook(cfg.train.bias_update_gamma)], quiet=True, progress=False)
        self.rows: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        micro = self.trainer._draw()                     # rollout + scoring + batching
        t1 = time.perf_counter()
        rec = self.trainer._train_step(micro)            # forward + backward + optimizer + bias update
        t2 = time.perf_counter()
        stats = micro[0]["stats"]
        score = self.score.take()
        row = {"rollout": stats["rollout_s"], "scoring": score, "prep": (t1 - t0) - stats["rollout_s"] - score,
               "update": t2 - t1, "step": t2 - t0, "len": stats["response_len_mean"],
               "reward": stats["reward_mean"], "loss": rec["loss"] if rec else float("nan")}
        self.rows.append(row)
        return row


# ----------------------------------------------------------------------------- TRL


def build_trl(model_dir: Path, prompts, args, out_dir: Path, on_step):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.tasks.rewards import RewardConfig, build_reward_fn

    reward = build_reward_fn(RewardConfig.for_template("chat"), 4)
    by_id = {str(i): p for i, p in enumerate(prompts)}

    def verifier(prompts, completions, pid, **kwargs):   # TRL's reward_funcs signature
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(r.reward) for r in reward(texts, [by_id[i] for i in pid])]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "pid": str(i)}
                              for i, p in enumerate(prompts)])
    steps = args.prompts * args.group // args.micro_batch
    cfg = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=steps,
        steps_per_generation=steps, num_generations=args.group, max_completion_length=args.max_new,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo", epsilon_high=0.28,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta2=0.95, max_steps=args.warmup + args.steps, logging_steps=10_000, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()     # the MTP layer's weights, which transformers has no module for
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)

    class Alternate(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            on_step()

    trainer = GRPOTrainer(model=model, reward_funcs=verifier, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Alternate()])
    return trainer, tok


def check_prompt_ids(model_dir: Path, prompts) -> None:
    """Both sides must feed the model the same prompt tokens (nanoseek's chat rendering = the HF template's)."""
    from transformers import AutoTokenizer

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.tasks.reply import render_prompt

    ours, hf = Tokenizer.load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for p in prompts[:16]:
        a = render_prompt(ours, p, "chat")
        b = hf.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
        b = list(b["input_ids"] if isinstance(b, dict) else b)
        if a != b:
            sys.exit(f"bench_grpo: prompt ids differ between nanoseek and AutoTokenizer for {p.prompt!r}:\n{a}\n{b}")


# ----------------------------------------------------------------------------- run


PHASES = ("rollout", "scoring", "prep", "update", "step")


def med(rows, key):
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def report(threads: int, sides: dict[str, list], compiled: "NanoseekSide | None") -> None:
    """Medians per phase of each side (nanoseek, optionally nanoseek compiled, TRL) and the ratios to TRL."""
    n = len(next(iter(sides.values())))
    print(f"\n== {threads} thread(s): median of {n} steps, seconds ==")
    if compiled is not None:
        c, engine = compiled.trainer.compiler, compiled.task.engine
        print(f"nanoseek compiled: the update compiled in {c.compile_seconds or 0:.1f} s, the rollout's decode step "
              f"in {engine.compile_seconds:.1f} s (warm-up steps); still compiled after the run: update "
              f"{c.failure is None}, decode {engine.compile}")
    names = list(sides)
    trl = sides.get("TRL")
    print(f"{'phase':<10}" + "".join(f"{k:>20}" for k in names) + "".join(f"{'TRL / ' + k:>26}" for k in names[:-1] if trl))
    for ph in PHASES:
        vals = [med(sides[k], ph) for k in names]
        line = f"{ph:<10}" + "".join(f"{v:>20.3f}" for v in vals)
        if trl:
            line += "".join(f"{med(trl, ph) / v if v > 0 else float('nan'):>25.2f}x" for v in vals[:-1])
        print(line)
    print(f"{'mean len':<10}" + "".join(f"{med(sides[k], 'len'):>20.1f}" for k in names) + "   (completion tokens)")
    if trl:
        print("GRPO step: " + ", ".join(f"{k} {med(sides[k], 'step'):.3f} s" for k in names) + "; TRL / "
              + ", TRL / ".join(f"{k}: {med(trl, 'step') / med(sides[k], 'step'):.2f}x" for k in names[:-1]))


def run_threads(threads: int, model_dir: Path, prompts, args, tmp: Path) -> None:
    torch.set_num_threads(threads)
    ns = NanoseekSide(model_dir, prompts, args, tmp / f"ns{threads}")
    nc = NanoseekSide(model_dir, prompts, args, tmp / f"nc{threads}", compile=True) if args.compile else None
    ours = [ns] + ([nc] if nc else [])

    def ours_rows(skip: int) -> dict[str, list]:
        return {"nanoseek": ns.rows[skip:], **({"nanoseek compiled": nc.rows[skip:]} if nc else {})}

    if args.nanoseek_only:
        for _ in range(args.warmup + args.steps):
            for side in ours:                     # alternating, like the sides below
                side.step()
        report(threads, ours_rows(args.warmup), nc)
        return ns

    gen, score, mark = Timer(), Timer(), {"t": None, "gs": Timer()}     # "t": when TRL's step began
    trl_rows: list[dict[str, float]] = []

    def on_step():                       # TRL just finished a step: record it, then one step of each nanoseek side
        now = time.perf_counter()
        if mark["t"] is not None:
            g, s, gs = gen.take(), score.take(), mark["gs"].take()
            trl_rows.append({"rollout": g, "scoring": s, "prep": gs - g - s, "update": (now - mark["t"]) - gs,
                             "step": now - mark["t"], "len": trainer._trl_len})
        for side in ours:
            side.step()
        mark["t"] = time.perf_counter()

    trainer, tok = build_trl(model_dir, prompts, args, tmp / f"trl{threads}", on_step)
    trainer._generate = gen.wrap(trainer._generate)
    trainer._calculate_rewards = score.wrap(trainer._calculate_rewards)
    inner = mark["gs"].wrap(trainer._generate_and_score_completions)

    def gen_and_score(inputs):
        out = inner(inputs)
        trainer._trl_len = float(out["completion_mask"].sum(1).float().mean())
        return out

    trainer._generate_and_score_completions = gen_and_score
    mark["t"] = time.perf_counter()
    trainer.train()
    report(threads, {**ours_rows(args.warmup), "TRL": trl_rows[args.warmup:]}, nc)   # the steps after the warm-up
    return ns


def profile(ns: NanoseekSide) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        micro = ns.trainer._draw()
    print("\n== nanoseek rollout (engine decode + scoring), top operators by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ns.trainer._train_step(micro)
    print("\n== nanoseek update (forward + backward + AdamW), top operators by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    args = parse_args()
    if not args.nanoseek_only:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("bench_grpo: TRL is not installed; pip install -e '.[bench]' (or run with --nanoseek-only)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, prompts = build_shared(tmp, args.pool)
        if not args.nanoseek_only:
            check_prompt_ids(model_dir, prompts)
        print(f"bench_grpo: {args.prompts} prompts x {args.group} samples x up to {args.max_new} new tokens, "
              f"micro-batch {args.micro_batch}, model {model_dir}")
        ns = None
        for threads in [int(t) for t in args.threads.split(",")]:
            ns = run_threads(threads, model_dir, prompts, args, tmp)
        if args.profile and ns is not None:
            profile(ns)


if __name__ == "__main__":
    main()
