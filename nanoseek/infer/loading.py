"""Find and load what inference needs: a checkpoint (from a run folder or an HF directory) and its tokenizer.

``--model`` may name

* an HF-format checkpoint directory (``config.json`` + safetensors): nanoseek's own, or any
  DeepSeek-V3/V2-architecture checkpoint;
* a run folder: its finished model ``RUN/final`` when it exists, else the checkpoint
  ``RUN/latest`` points to (else the newest ``RUN/checkpoints/step-*``), else an HF directory
  ``RUN/model`` or ``RUN/hf``.

:func:`~nanoseek.train.checkpoint.resolve_checkpoint` is the one place that decides this (beside the
trainer's checkpoints, whose ``latest`` it follows): the CLIs (chat, generate, serve,
eval), the post-training stages' ``init_from``, pre-training's ``[model] init_from`` and the
report's stages all call it.

Every checkpoint the trainer writes (``final/`` and each ``checkpoints/step-*``) carries the
tokenizer it was trained with (``tokenizer.json``, ``tokenizer_config.json``) when the run had one
(packed data, post-training); a run on synthetic tokens has none. The tokenizer is looked for in
the checkpoint directory, a ``tokenizer/``
folder next to it, and the same two places in each parent up to three levels up (so a run
folder's tokenizer serves all its checkpoints); ``tokenizer_path`` overrides the search.
Errors list every place that was searched.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek import limits
from nanoseek.train.checkpoint import LoadError, resolve_checkpoint


def find_tokenizer(checkpoint: str | Path) -> Path | None:
    """The ``tokenizer.json`` belonging to a checkpoint, or None."""
    d = Path(checkpoint).resolve()
    for base in [d, *list(d.parents)[:3]]:
        for cand in (base / "tokenizer.json", base / "tokenizer" / "tokenizer.json"):
            if cand.is_file():
                return cand
    return None


def no_tokenizer_hint(checkpoint: str | Path) -> str:
    """Why a checkpoint may have no tokenizer, when its run says so: a run on synthetic token ids
    (``[data] source = "synthetic"`` in the run's ``config.toml``) never had one."""
    d = Path(checkpoint).resolve()
    for base in [d, *list(d.parents)[:3]]:
        cfg = base / "config.toml"
        if cfg.is_file():
            try:
                import tomllib

                source = tomllib.loads(cfg.read_text(encoding="utf-8")).get("data", {}).get("source")
            except (OSError, ValueError, AttributeError):
                return ""
            if source == "synthetic":
                return (f"; {base} was trained on synthetic token ids, which have no tokenizer: pre-train on "
                        "prepared data (--set data.source=packed --set data.dir=DIR) to get one")
            return ""
    return ""


def load_tokenizer(path: str | Path):
    from nanoseek.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


def load_for_inference(path: str | Path, tokenizer_path: str | Path | None = None, dtype=None,
                       device: str = "cpu", require_tokenizer: bool = False):
    """(model in eval mode, tokenizer or None) for a run folder or checkpoint directory."""
    from nanoseek.model.registry import from_pretrained

    ckpt = resolve_checkpoint(path)
    tok_file = Path(tokenizer_path) if tokenizer_path else find_tokenizer(ckpt)
    if tok_file is None and require_tokenizer:
        places = [str(b) for b in [ckpt, *list(ckpt.resolve().parents)[:3]]]
        raise LoadError(f"no tokenizer.json for {ckpt} (searched {', '.join(places)} and their tokenizer/ "
                        "folders); pass --tokenizer PATH" + no_tokenizer_hint(ckpt))
    tokenizer = load_tokenizer(tok_file) if tok_file is not None else None
    limits.check_checkpoint_fits(ckpt)          # before its weights are read
    model = from_pretrained(ckpt, dtype=dtype, device=device).eval()
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise LoadError(f"tokenizer {tok_file} has {tokenizer.vocab_size} tokens but the model {ckpt} only "
                        f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer


__all__ = ["find_tokenizer", "no_tokenizer_hint", "load_tokenizer", "load_for_inference", "LoadError"]
