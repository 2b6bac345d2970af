"""Request schemas and error objects of the OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``).

Requests are validated by pydantic models in strict mode: a number sent as a string, a boolean
sent as an integer or a field the server does not know is rejected rather than coerced or
ignored, with an OpenAI-style error naming the field (``param``). Fields of OpenAI's API that
nanoseek does not implement (penalties, logit_bias, audio, web search...) are accepted
only at their neutral value (:data:`NEUTRAL_VALUES`), so a client never silently gets something
other than what it asked for. Fields that cannot change the output are accepted and ignored
(:data:`IGNORED_FIELDS`: ``store``, ``metadata``, ``user``, ``service_tier``, ``prediction``...).
An error message never echoes a long value or field name back: both are cut (:func:`short`).

Logprobs (of the model's distribution before temperature/top-p/top-k, as vLLM reports them):
``/v1/completions`` takes ``logprobs`` = N in 0..20 (each token's logprob and its N most likely
alternatives, OpenAI's legacy format) and ``echo`` (the prompt is returned before the completion,
with the prompt tokens' logprobs when ``logprobs`` is set; ``max_tokens`` 0 then only scores
the prompt: what lm-evaluation-harness's loglikelihood requests need). ``/v1/chat/completions``
takes ``logprobs: true`` and ``top_logprobs`` in 0..20.

Thinking per request (DeepSeek-V3.1's convention): ``chat_template_kwargs`` is passed to the chat
template, its ``thinking`` (bool) switching the think block on or off; ``reasoning_effort``
(OpenAI's values) maps onto it (:data:`REASONING_EFFORT_THINKING`): "none" and "minimal" are
off, "low", "medium", "high" and "xhigh" on (the model has one way to think, so the three are
the same). Both given and disagreeing is a 400 naming both; neither given: the server's default
(``nanoseek serve --think/--no-think``, off unless told).

Extensions beyond OpenAI's fields, as vLLM and SGLang accept them: ``top_k``, and
``ignore_eos`` (generate all ``max_tokens``, for benchmarks). Output follows
DeepSeek's own API: the chain of thought inside ``<think>...</think>`` is returned apart from
the answer, in ``reasoning_content`` on the message (or on each streamed delta). As DeepSeek's
API does, an input message carrying ``reasoning_content`` is refused: send back only
``content`` in multi-turn chats.

Tool calls (``serve/tools.py`` checks them against the tokenizer and builds the replies):
``tools`` (OpenAI's function tools), ``tool_choice`` ("auto", "none", "required" or a named
function), ``parallel_tool_calls``, ``tool`` messages (``tool_call_id`` required) and assistant
messages carrying ``tool_calls`` (their ``content`` may then be null; ``arguments`` a JSON string,
or an object written as JSON). The deprecated ``functions``/``function_call`` stay neutral-only.

Every optional field may be sent as JSON ``null``, which means "not given" (its default), as in
OpenAI's spec and vLLM; otherwise types are strict. ``skip_special_tokens`` (bool, default true,
vLLM's extension) leaves control tokens the model generates (BOS, ``<｜Assistant｜>``...: the
tokenizer's "special" tokens, as ``AutoTokenizer.decode(skip_special_tokens=True)`` skips them,
never the reasoning tags) out of the returned text; logprobs still list every generated token.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on ``stop``
INT_MAX = 2**31 - 1     # the largest count a field takes (tokens, choices, top_k): what int32 tensors hold
SEED_MAX = 2**63 - 1    # seeds: a non-negative int64

MAX_LOGPROBS = 20       # top alternatives per token (the engine's limit, vLLM's default)
MAX_ERROR_VALUE = 60    # characters of a client's value or field name an error message may quote

# OpenAI request fields nanoseek does not implement -> the values that mean "off". Any other
# value is a 400 naming the field; the neutral values are accepted so generic clients still work.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "functions": (None, []),                 # the deprecated form of tools (send ``tools``)
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "web_search_options": (None,),
    "verbosity": (None, "medium"),
    "suffix": (None, ""),
}
# OpenAI request fields that cannot change what is generated: accepted (type-checked) and ignored.
# store/metadata: what OpenAI keeps of the request (nothing is kept here); user, safety_identifier,
# prompt_cache_key, prompt_cache_retention, service_tier: accounting and caching hints; prediction:
# a predicted output only speeds OpenAI's decoding up, the output is the same.
IGNORED_FIELDS = ("store", "metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                  "service_tier", "prediction")
# the thinking switch's names in chat_template_kwargs (DeepSeek-V3.1's, Qwen3's): one setting
THINKING_KWARGS = ("thinking", "enable_thinking")
# reasoning_effort -> chat_template_kwargs.thinking
REASONING_EFFORT_THINKING: dict[str, bool] = {"none": False, "minimal": False, "low": True, "medium": True,
                                              "high": True, "xhigh": True}
# chat_template_kwargs keys the server sets itself (the messages, the tokenizer's tokens, the template)
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents", "chat_template",
                                      "tokenize", "continue_final_message", "bos_token", "eos_token", "unk_token",
                                      "sep_token", "pad_token", "cls_token", "mask_token"})


def short(text: str, limit: int = MAX_ERROR_VALUE) -> str:
    """A client's text (a field name, a value's ``repr``) cut to ``limit`` characters, for error messages."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


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
    param = short(param) if param else None            # a field name can be as long as the body
    msg = short(str(first.get("msg", "invalid value")).removeprefix("Value error, "), 4 * MAX_ERROR_VALUE)
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
    """Strict types, no unknown fields; an explicit JSON ``null`` for an optional field means "not
    given" (its default), as OpenAI's spec says and vLLM, LiteLLM and the JS client expect. A
    required field sent as null stays a type error naming it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(v is None for v in data.values()):
            fields = cls.model_fields
            data = {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required())}
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]   # OpenAI sends a JSON string (written verbatim); an object is written as JSON


class AssistantToolCall(_Strict):
    """A call an earlier assistant turn made, sent back in the history (OpenAI's shape)."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for "system"; "tool" carries a tool's output (``tool_call_id``).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[AssistantToolCall] | None = Field(None, validate_default=True)
    tool_call_id: str | None = Field(None, validate_default=True)
    content: str | list[TextPart] | None = Field(None, validate_default=True)  # null: an assistant's tool_calls only
    name: str | None = None          # OpenAI's participant name: accepted, not rendered (DeepSeek's template has none)
    reasoning_content: Any = None

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"only an assistant message carries tool_calls (this one is {info.data['role']!r})")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, v: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if v is None and role == "tool":
            raise ValueError("a tool message needs the id of the call it answers")
        if v is not None and role not in ("tool", None):
            raise ValueError(f"only a tool message carries tool_call_id (this one is {role!r})")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            if not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
                raise ValueError("Field required (null only on an assistant message with tool_calls)")
        elif isinstance(v, list):
            for i, part in enumerate(v):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content part {i} has type {short(repr(part.get('type')))}: only 'text' parts "
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
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template takes it (``developer`` -> ``system``; tool fields kept)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = True     # OpenAI pads chunks against side channels; nothing to pad here: ignored


class SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=INT_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True     # vLLM's extension: control tokens stay out of the text (module docstring)
    n: int = Field(1, ge=1, le=INT_MAX)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # cannot change the output: accepted and ignored (see IGNORED_FIELDS)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # not implemented: accepted only at their neutral values (see NEUTRAL_VALUES)
    presence_penalty: Any = None
    frequency_penalty: Any = None
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
                    raise APIError(400, f"{name}={short(repr(value))} is not supported by this server", name,
                                   "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")


class PredictionContent(_Strict):
    type: Literal["content"]
    content: str | list[TextPart]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal[tuple(REASONING_EFFORT_THINKING)] | None = None  # type: ignore[valid-type]
    prediction: PredictionContent | None = None      # ignored: see IGNORED_FIELDS
    # tool calls (checked against the tokenizer by the server: nanoseek.serve.tools)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # not implemented: accepted only at their neutral values (see NEUTRAL_VALUES)
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        for key in v:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"{short(key)!r} is set by the server, not by chat_template_kwargs")
            if not key.isidentifier():
                raise ValueError(f"{short(repr(key))} is not a template variable name")
        for key in THINKING_KWARGS:
            if v.get(key) is not None and not isinstance(v[key], bool):
                raise ValueError(f"{key} must be true or false")
        if v.get("thinking") is not None and v.get("enable_thinking") is not None \
                and v["thinking"] != v["enable_thinking"]:
            raise ValueError(f"thinking={str(v['thinking']).lower()} and enable_thinking="
                             f"{str(v['enable_thinking']).lower()} contradict each other: they are one switch "
                             "(DeepSeek-V3.1's and Qwen3's name), send one")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")

    def thinking(self, default: bool) -> bool:
        """Whether the chat template opens a think block: ``chat_template_kwargs.thinking`` (or its
        alias ``enable_thinking``, Qwen3's name), else ``reasoning_effort`` mapped by
        :data:`REASONING_EFFORT_THINKING`, else ``default``."""
        kwargs = self.chat_template_kwargs or {}
        asked = next((kwargs[k] for k in THINKING_KWARGS if kwargs.get(k) is not None), None)
        effort = None if self.reasoning_effort is None else REASONING_EFFORT_THINKING[self.reasoning_effort]
        if asked is not None and effort is not None and asked != effort:
            raise APIError(400, f"chat_template_kwargs.thinking={str(asked).lower()} contradicts "
                                f"reasoning_effort={self.reasoning_effort!r} (which means thinking "
                                f"{'on' if effort else 'off'}): send one of them", "reasoning_effort", "invalid_value")
        return next(x for x in (asked, effort, default) if x is not None)

    def template_kwargs(self) -> dict[str, Any]:
        """``chat_template_kwargs`` other than the thinking switch, for the chat template (the
        tokenizer passes the switch under both names)."""
        return {k: v for k, v in (self.chat_template_kwargs or {}).items() if k not in THINKING_KWARGS}

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree: send only one",
                           "max_completion_tokens", "invalid_value")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, Any]]:
        """Messages as the tokenizer's chat template takes them (``developer`` -> ``system``)."""
        return [m.template_message() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: Any
    max_tokens: int | None = Field(None, ge=0, le=INT_MAX)    # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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


class TokenizeRequest(_Strict):
    """vLLM's ``/tokenize``: a raw ``prompt`` (control-token strings parsed, BOS added with
    ``add_special_tokens``) or chat ``messages`` (rendered as ``/v1/chat/completions`` renders them,
    with ``tools`` and ``tool_choice``)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
