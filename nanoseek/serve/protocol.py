"""Request schemas and error objects of the OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``).

Requests are validated by pydantic models in strict mode: a number sent as a string, a boolean
sent as an integer or a field the server does not know is rejected rather than coerced or
ignored, with an OpenAI-style error naming the field (``param``). Fields of OpenAI's API that
nanoseek does not implement (penalties, logprobs, tools...) are accepted only at their neutral
value, so a client never silently gets something other than what it asked for.

Extensions beyond OpenAI's fields, as vLLM and SGLang accept them: ``top_k``, and
``ignore_eos`` (generate all ``max_tokens``, for benchmarks). Output follows
DeepSeek's own API: the chain of thought inside ``<think>...</think>`` is returned apart from
the answer, in ``reasoning_content`` on the message (or on each streamed delta). As DeepSeek's
API does, an input message carrying ``reasoning_content`` is refused: send back only
``content`` in multi-turn chats.

Every numeric field has a bounded range (:data:`INT_MAX` for counts, OpenAI's ranges for
temperature and top_p, 0..2**63-1 for ``seed``): a value outside it, of the wrong type, or not
finite is a 400 naming the field before anything reaches the engine; the server's configurable
limits (``max_tokens``, ``n``, the context) are checked after these.

Errors are :class:`APIError` exceptions rendered by :func:`error_body` as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on ``stop``
INT_MAX = 2**31 - 1     # the largest count a field takes (tokens, choices, top_k): what int32 tensors hold
SEED_MAX = 2**63 - 1    # seeds: a non-negative int64

# OpenAI request fields nanoseek does not implement -> the values that mean "off". Any other
# value is a 400 naming the field; the neutral values are accepted so generic clients still work.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "suffix": (None, ""),
}


# ---------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as an OpenAI error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAG = re.compile(r"[\[\]]|^(str|int|float|bool|list|dict|none)$")


def param_path(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (union tags dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _UNION_TAG.search(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """One 400 error from pydantic's error list: the first error, naming its field."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    param = param_path(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail or msg})", None, "invalid_json")
    if kind == "missing" and param is None:
        return APIError(400, "request body is missing: send a JSON object", None, "invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if param is None and kind in ("model_type", "model_attributes_type", "dict_type"):
        hint = " sent with Content-Type: application/json" if isinstance(first.get("input"), bytes) else ""
        return APIError(400, f"request body must be a JSON object{hint}", None, "invalid_json")
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param, "invalid_value")


# ---------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for "system"; DeepSeek's template has no tool role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    reasoning_content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content part {i} has type {part.get('type')!r}: only 'text' parts "
                                     "are supported by this text-only model")
        elif not isinstance(v, str):
            raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts")
        return v

    @field_validator("reasoning_content")
    @classmethod
    def _no_reasoning(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("reasoning_content must not be sent back in input messages (as in DeepSeek's "
                             "API): pass only the previous answer's content")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=INT_MAX)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=INT_MAX)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # not implemented: accepted only at their neutral values (see NEUTRAL_VALUES)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    logit_bias: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop has {len(v)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty strings")
        for s in v:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("stop sequences must be valid Unicode text (no lone surrogates)") from None
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Raise a 400 for an unimplemented OpenAI option set to a non-neutral value."""
        for name, neutral in NEUTRAL_VALUES.items():
            if name in type(self).model_fields:
                value = getattr(self, name)
                if not any(type(value) is type(n) and value == n for n in neutral):
                    raise APIError(400, f"{name}={value!r} is not supported by this server", name,
                                   "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)  # OpenAI's newer name for max_tokens
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree: send only one",
                           "max_completion_tokens", "invalid_value")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Messages as the tokenizer's chat template takes them (``developer`` -> ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: Any
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=INT_MAX)
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(v, str) or is_ids(v):
            return v
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(is_ids(p) for p in v)):
            return v
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "lists of token ids (non-empty)")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported by this server", "best_of",
                           "unsupported_parameter")
