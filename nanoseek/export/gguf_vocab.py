"""The tokenizer part of a GGUF file: an HF byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` vocabulary.

Read from the tokenizer files themselves (``tokenizer.json``, and ``tokenizer_config.json`` /
``chat_template.jinja`` beside it), so any HF byte-level BPE tokenizer exports, not only
nanoseek's. What is written (keys ``tokenizer.ggml.*``, as llama.cpp's ``llama-vocab.cpp`` reads them):

* ``model = "gpt2"``: byte-level BPE; ``tokens``: the token strings by id, in their byte-level
  form (``Ġ`` for a space), padded to the model's ``vocab_size`` with ``[PAD{id}]`` (type UNUSED);
  ``token_type``: CONTROL for added tokens HF marks special (BOS, EOS, the role markers),
  USER_DEFINED for added tokens it does not (``<think>``/``</think>``: llama.cpp then matches them
  in text and prints them, as HF's ``skip_special_tokens`` keeps them), NORMAL otherwise (the
  same rule as llama.cpp's ``convert_hf_to_gguf.py``); ``merges``: ``"left right"`` in rank order.
* ``pre``: the name of llama.cpp's pre-tokenizer (its regex split before BPE), recognised from
  the ``pre_tokenizer`` of ``tokenizer.json`` by :data:`PRE_TOKENIZERS`. nanoseek's own
  (``Digits(individual_digits=True)`` then ``ByteLevel(use_regex=True)``: every digit alone, then
  GPT-2's regex) is llama.cpp's ``smollm`` type: ``\\p{N}`` then GPT-2's regex, with
  ``clean_spaces`` off as nanoseek's ``clean_up_tokenization_spaces: false``. The one difference
  in the regex, llama.cpp's GPT-2 pattern lacking the final ``|\\s+`` alternative, changes no
  split (llama.cpp keeps unmatched text as its own piece, which is what ``\\s+`` matched).
  A pre-tokenizer not in the table is refused, naming it.
* ``bos_token_id`` / ``eos_token_id`` / ``padding_token_id`` from ``tokenizer_config.json``'s
  token strings (else the model config's ids); ``add_bos_token`` from ``tokenizer_config.json``
  or, when it does not say, from whether the post-processor prepends BOS (nanoseek's does);
  ``chat_template``: ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError, UserError
from nanoseek.model.config_fields import read_json


class VocabError(UserError, ValueError):
    """A tokenizer llama.cpp cannot represent, or unreadable tokenizer files (the message names the file)."""


def _is_byte_level(spec: dict | None) -> bool:
    return (isinstance(spec, dict) and spec.get("type") == "ByteLevel" and spec.get("use_regex", True)
            and not spec.get("add_prefix_space", False))


def _steps(spec: dict | None) -> list[dict]:
    if isinstance(spec, dict) and spec.get("type") == "Sequence":
        steps = spec.get("pretokenizers")
        return [p for p in steps if isinstance(p, dict)] if isinstance(steps, list) else []
    return [spec] if isinstance(spec, dict) else []


def _digits_then_byte_level(spec: dict | None) -> bool:
    s = _steps(spec)
    return (len(s) == 2 and s[0].get("type") == "Digits" and s[0].get("individual_digits") is True
            and _is_byte_level(s[1]))


def _byte_level_only(spec: dict | None) -> bool:
    s = _steps(spec)
    return len(s) == 1 and _is_byte_level(s[0])


# llama.cpp pre-tokenizer name -> the HF pre_tokenizer it reproduces (first match wins).
PRE_TOKENIZERS: list[tuple[str, Callable[[dict | None], bool], str]] = [
    ("smollm", _digits_then_byte_level, "Digits(individual_digits=True) + ByteLevel (nanoseek's)"),
    ("gpt-2", _byte_level_only, "ByteLevel with GPT-2's regex"),
]


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    """A tokenizer file's JSON; a missing, unreadable or invalid file is one VocabError line."""
    try:
        return read_json(path)
    except ConfigError as e:
        raise VocabError(str(e)) from None


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _prepends_bos(post: dict | None, bos: str | None) -> bool:
    """Whether the HF post-processor puts BOS in front of a single sequence."""
    if not isinstance(post, dict) or bos is None:
        return False
    if post.get("type") == "Sequence":
        return any(_prepends_bos(p, bos) for p in post.get("processors") or [])
    if post.get("type") == "TemplateProcessing":
        first = (post.get("single") or [{}])[0]
        return first.get("SpecialToken", {}).get("id") == bos
    return False


def read_vocab(tokenizer_json: str | Path, vocab_size: int, config_ids: dict[str, Any] | None = None) -> Vocab:
    """The GGUF vocabulary of ``tokenizer_json`` for a model of ``vocab_size`` rows.

    ``config_ids``: the model config's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``,
    used where tokenizer_config.json names no such token.
    """
    path = Path(tokenizer_json)
    spec = _read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise VocabError(f"{path}: not a tokenizers JSON file (no 'model' object)")
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabError(f"{path}: model type {model.get('type')!r}: the GGUF export writes byte-level BPE only")
    if spec.get("normalizer") is not None:
        raise VocabError(f"{path}: has a normalizer ({json.dumps(spec['normalizer'])[:80]}); llama.cpp's gpt2 "
                         "vocabulary has none")
    decoder = spec.get("decoder") if isinstance(spec.get("decoder"), dict) else {}
    if decoder.get("type") != "ByteLevel":
        raise VocabError(f"{path}: decoder {decoder.get('type')!r}: the GGUF export needs a ByteLevel decoder")
    pre = next((name for name, match, _ in PRE_TOKENIZERS if match(spec.get("pre_tokenizer"))), None)
    if pre is None:
        known = "; ".join(f"{what} ({name})" for name, _, what in PRE_TOKENIZERS)
        raise VocabError(f"{path}: pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no llama.cpp "
                         f"equivalent the export knows (known: {known})")

    by_id: dict[int, str] = {}
    try:
        for token, token_id in (model.get("vocab") or {}).items():
            by_id[int(token_id)] = token
        added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
        for token_id, t in added.items():
            by_id[token_id] = str(t["content"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise VocabError(f"{path}: malformed vocab or added_tokens ({type(e).__name__}: {e})") from None
    if by_id and max(by_id) >= vocab_size:
        raise VocabError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size={vocab_size}: "
                         "the tokenizer does not belong to this checkpoint")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)                                       # UNUSED
        else:
            tokens.append(by_id[i])
            types.append((3 if added[i].get("special") else 4) if i in added else 1)   # CONTROL / USER_DEFINED / NORMAL

    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            if " " in m[0] or " " in m[1]:
                raise VocabError(f"{path}: merge {m!r} holds a space, which llama.cpp's merge list cannot represent")
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise VocabError(f"{path}: merge {m!r} is neither 'a b' nor ['a', 'b']")

    folder = path.parent
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    if not isinstance(tcfg, dict):
        raise VocabError(f"{tcfg_path}: expected a JSON object")
    ids = {t: i for i, t in by_id.items()}
    vocab = Vocab(tokens, types, merges, pre)
    config_ids = config_ids or {}
    for attr, key, cfg_key in (("bos_id", "bos_token", "bos_token_id"), ("eos_id", "eos_token", "eos_token_id"),
                               ("pad_id", "pad_token", "pad_token_id")):
        text = _token_text(tcfg.get(key))
        if text is not None:
            if text not in ids:
                raise VocabError(f"{tcfg_path}: {key} {text!r} is not a token of {path}")
            setattr(vocab, attr, ids[text])
        else:
            v = config_ids.get(cfg_key)
            setattr(vocab, attr, v[0] if isinstance(v, list) and v else v if isinstance(v, int) else None)
    bos_text = by_id.get(vocab.bos_id) if vocab.bos_id is not None else None
    if isinstance(tcfg.get("add_bos_token"), bool):
        vocab.add_bos = tcfg["add_bos_token"]
    else:
        vocab.add_bos = _prepends_bos(spec.get("post_processor"), bos_text)
    if isinstance(tcfg.get("add_eos_token"), bool):
        vocab.add_eos = tcfg["add_eos_token"]
    jinja = folder / "chat_template.jinja"
    template = tcfg.get("chat_template")
    if jinja.is_file():
        try:
            vocab.chat_template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VocabError(f"{jinja}: cannot read ({type(e).__name__})") from None
    elif isinstance(template, str):
        vocab.chat_template = template
    elif isinstance(template, list):          # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        vocab.chat_template = named.get("default")
    if vocab.chat_template is None:
        vocab.notes.append("no chat template in the tokenizer files: the GGUF has none")
    return vocab


def write_vocab(writer, vocab: Vocab) -> None:
    """Add the ``tokenizer.ggml.*`` keys (and the chat template) to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


__all__ = ["Vocab", "VocabError", "PRE_TOKENIZERS", "read_vocab", "write_vocab"]
