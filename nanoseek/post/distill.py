"""Verified reasoning traces: rejection sampling and distillation into a student.

DeepSeek-R1's last stages and its R1-Distill models rest on the same operation: sample reasoning
traces from a strong model on verifiable prompts, keep only the ones a verifier accepts, and SFT
a model on them.

* **Rejection sampling** (R1, stage 3): the teacher is the RL checkpoint itself; the verified
  samples become SFT data (R1 retrained DeepSeek-V3-Base on ~800K of them before the final RL).
* **Distillation** (R1-Distill): the teacher is a bigger model (a nanoseek run or an HF
  DeepSeek-V3/R1 checkpoint) and the student a smaller dense or MoE model, from a checkpoint or
  from scratch; R1 found this beats running RL on the small model directly.

Teacher and student talk through text, so their vocabularies may differ: the teacher's completions
are decoded, split into reasoning (inside ``<think>...</think>``) and answer, and rendered with the
student's chat template (``{"role": "assistant", "reasoning", "content"}``).

The teacher samples through :func:`nanoseek.post.rollout.sample_and_score` (the sampler GRPO and
DPO's automatic pairs share): ``n`` completions per prompt from the inference engine, scored by
the rule-based rewards of the template's reply format; :func:`verified_examples`
keeps up to ``keep_per_prompt`` distinct correct, well-formed traces per prompt;
:func:`run_distill` is the whole stage from a config: sample, write the traces to
``RUN/distill.jsonl`` (the SFT format, reusable), free the teacher, SFT the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanoseek import limits
from nanoseek.limits import TEMPERATURE_MAX
from nanoseek.tasks.reply import split_leading_think

from .datasets import (DataError, RLPrompt, SFTExample, check_rl_source, check_task_level, load_rl_prompts, source_key,
                       write_jsonl)
from . import rollout
from .rollout import Scored


@dataclass
class DistillSection:
    """The ``[distill]`` table (the SFT of the student uses ``[optim]`` / ``[train]`` as usual)."""

    teacher: str = ""                 # teacher checkpoint / run folder ("": the [model] init itself: rejection sampling)
    teacher_tokenizer: str = ""       # default: found next to the teacher checkpoint
    prompts: str = "arithmetic"       # RL prompt source: .jsonl, rg:NAME or built-in task names
    num_prompts: int = 256
    split: str = "train"
    level: int | None = None
    samples_per_prompt: int = 4       # completions sampled per prompt
    keep_per_prompt: int = 1          # distinct verified traces kept per prompt
    max_new_tokens: int = 256
    temperature: float = 0.6          # R1's recommended sampling
    top_p: float = 0.95
    template: str = "chat"            # how the teacher is prompted: chat | chat-think | r1-zero
    engine_batch_size: int = 64       # engine cache rows
    data_out: str = ""                # where the traces go (default RUN/distill.jsonl)
    mode: str = "pack"                # student SFT batching: pack | pad
    tokenizer: str = ""               # the student's tokenizer (default: its checkpoint's, else the teacher's)
    seed: int = 0

    def validate(self) -> "DistillSection":
        from nanoseek.tasks.reply import TEMPLATES

        from .sft import SFT_MODES

        if self.template not in TEMPLATES:
            raise ValueError(f"template = {self.template!r}: must be one of {TEMPLATES}")
        if self.mode not in SFT_MODES:
            raise ValueError(f"mode = {self.mode!r}: must be one of {SFT_MODES}")
        for name in ("num_prompts", "samples_per_prompt", "keep_per_prompt", "max_new_tokens", "engine_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.keep_per_prompt > self.samples_per_prompt:
            raise ValueError("keep_per_prompt must be <= samples_per_prompt")
        if not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be in [0, {TEMPERATURE_MAX:g}] (0 is greedy)")
        return self

    @property
    def eval_mode(self) -> str:
        """The prompt template the student answers in (recorded in stage.json): it is SFT'd on chats."""
        return "chat"

    def check_sources(self) -> None:
        """The prompts and the teacher, checked without a model (:func:`~nanoseek.post.stage.parse_stage_config`
        calls it): a DataError ``KEY: why`` for a prompt source ``load_rl_prompts`` would refuse, a
        level or split the tasks lack, or a teacher where there is no checkpoint (a recipe's chain
        placeholders ``previous`` / ``base`` are resolved, and checked, by the recipe)."""
        from nanoseek.tasks.generators import SPLITS

        from .stage import CHAIN_REFS

        with source_key("prompts"):
            specs = check_rl_source(self.prompts)
        with source_key("level"):
            check_task_level(specs, self.level)
        if specs and self.split not in SPLITS:
            raise DataError(f"split: {self.split!r}: must be one of {SPLITS}")
        if self.teacher and self.teacher not in CHAIN_REFS:
            from nanoseek.train.checkpoint import resolve_checkpoint

            with source_key("teacher"):
                resolve_checkpoint(self.teacher)


def verified_examples(prompts: list[RLPrompt], scored: list[list[Scored]], keep_per_prompt: int = 1,
                      source: str = "") -> list[SFTExample]:
    """SFT examples from the correct, well-formed samples: up to ``keep_per_prompt`` distinct
    traces per prompt (shortest first, as R1 preferred concise, readable traces)."""
    out = []
    for item, samples in zip(prompts, scored):
        good = sorted({s.text for s in samples if s.result.correct and s.result.format_ok}, key=len)
        for text in good[:keep_per_prompt]:
            reasoning, answer = split_leading_think(text)
            if not answer:
                continue
            assistant = {"role": "assistant", "content": answer}
            if reasoning is not None:
                assistant["reasoning"] = reasoning
            out.append(SFTExample(messages=[{"role": "user", "content": item.prompt}, assistant],
                                  meta={"id": item.id, "task": item.task, "source": source}, where=f"sample {item.id}"))
    return out


def run_distill(cfg, *, teacher=None, teacher_tokenizer=None, student=None, tokenizer=None, resume: bool = False,
                quiet: bool = False, progress: bool | None = None):
    """Sample verified traces from the teacher and SFT the student (a StageConfig of kind "distill").

    With ``[distill] teacher = ""`` the teacher is the ``[model] init_from`` checkpoint: rejection
    sampling from the model itself. Returns the SFT StageResult; ``extra`` holds the sampling
    report and the path of the traces file. The run folder is claimed (:mod:`nanoseek.outdir`)
    before the traces are written into it.
    """
    from nanoseek.outdir import claim

    from .stage import is_stage_run

    with claim(Path(cfg.train.out_dir or "runs/distill"), cfg.kind, flag="--out",
               own=lambda p: is_stage_run(p, cfg.kind)):
        return _run_distill(cfg, teacher=teacher, teacher_tokenizer=teacher_tokenizer, student=student,
                            tokenizer=tokenizer, resume=resume, quiet=quiet, progress=progress)


def _run_distill(cfg, *, teacher, teacher_tokenizer, student, tokenizer, resume, quiet, progress):
    import torch

    from .sft import train_sft
    from .stage import check_vocab, load_model, load_tokenizer_for

    a = cfg.algo
    run_dir = Path(cfg.train.out_dir or "runs/distill")
    if teacher is None:
        from nanoseek.model.registry import from_pretrained
        from nanoseek.train.checkpoint import resolve_checkpoint

        path = a.teacher or cfg.model.init_from
        if not path:
            raise DataError(f"{cfg.source}: [distill] teacher is empty and [model] has no init_from: no teacher")
        tpath = resolve_checkpoint(path)
        from nanoseek.train.loop import resolve_device

        limits.check_checkpoint_fits(tpath)
        teacher = from_pretrained(tpath, dtype=torch.float32, device=resolve_device(cfg.train.device)).eval()
        if teacher_tokenizer is None:
            teacher_tokenizer = load_tokenizer_for(tpath, a.teacher_tokenizer)
    if teacher_tokenizer is None:
        raise ValueError("run_distill: pass teacher_tokenizer with a teacher model")
    check_vocab(teacher, teacher_tokenizer, "teacher")
    prompts = load_rl_prompts(a.prompts, a.num_prompts, a.split, a.seed, a.level)
    scored, report = rollout.sample_and_score(teacher, teacher_tokenizer, prompts, a.samples_per_prompt,
                                              template=a.template, max_new_tokens=a.max_new_tokens,
                                              temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                              engine_batch_size=a.engine_batch_size)
    examples = verified_examples(prompts, scored, a.keep_per_prompt, source=a.teacher or "self")
    report.kept = len(examples)
    data_out = Path(a.data_out) if a.data_out else run_dir / "distill.jsonl"
    write_jsonl(data_out, [{"messages": e.messages, **e.meta} for e in examples])
    if not quiet:
        r = report.as_dict()
        print(f"distill: {r['samples']} samples from {r['prompts']} prompts, accuracy {r['accuracy']:.3f}, "
              f"format {r['format_rate']:.3f}, kept {len(examples)} verified traces -> {data_out}")
    if not examples:
        raise DataError(f"distill: no verified sample among {report.samples} (teacher accuracy 0); nothing to train "
                        "on: use a stronger teacher, easier prompts (level = 1) or more samples_per_prompt")
    del teacher
    ckpt = None
    if student is None:
        student, ckpt = load_model(cfg.model, cfg.train.device)
    if tokenizer is None:
        tokenizer = (load_tokenizer_for(ckpt, a.tokenizer) if (ckpt is not None or a.tokenizer) else teacher_tokenizer)
    result = train_sft(cfg, model=student, tokenizer=tokenizer, examples=examples, resume=resume, quiet=quiet,
                       progress=progress)
    result.extra.update({"sampling": report.as_dict(), "data": str(data_out)})
    return result


__all__ = ["DistillSection", "verified_examples", "run_distill"]
