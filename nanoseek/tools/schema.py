"""Tool parameters as JSON Schema: checking a call's arguments, and a schema from a Python signature.

A tool declares its parameters as OpenAI's function definitions do, a JSON Schema object.
:func:`check_arguments` checks the arguments a model wrote before the tool runs, so a wrong call
is one line the model reads as the tool's output (``argument 'n' must be integer, got string``)
instead of an exception inside the tool. It checks the part of JSON Schema that function
definitions use: ``type`` (one name or a list), ``enum``, ``const``, ``properties``, ``required``
and ``additionalProperties`` (at every depth), ``items``, ``anyOf``/``oneOf`` (both read as "any
of"), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``minLength``/
``maxLength`` and ``minItems``/``maxItems``. Other keywords (``pattern``, ``format``, ``$ref``,
``allOf``, ...) are not checked: the tool sees such values as written.

Two choices differ from plain JSON Schema, on purpose: an object schema that lists ``properties``
accepts no other keys unless ``additionalProperties`` allows them (a Python callable fails on an
unexpected keyword anyway, and the model learns the names from the error), and numbers must be
finite (JSON has no NaN or Infinity, but Python's ``json`` module reads them). ``integer`` takes
ints only (not ``3.0``), ``number`` ints and floats, and neither takes ``true``/``false``.

:func:`parameters_from_signature` writes the schema of a Python callable's parameters: ``str``,
``int``, ``float``, ``bool``, ``list``/``tuple``/``set`` (with their item type), ``dict`` (with its
value type), ``None``, ``Optional``/unions, ``Literal`` (an ``enum``) and ``Annotated[T, "text"]``
(the text becomes the parameter's description); any other annotation, or none, accepts any
value. Parameters with a default are optional (the default is shown when it is a JSON scalar),
``*args`` cannot be passed by name and is left out, ``**kwargs`` opens the object to other keys.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import types
import typing
from typing import Any, Callable

_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
    "object": dict, "null": type(None)}
_ANNOTATION_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                     tuple: "array", set: "array", frozenset: "array", dict: "object", type(None): "null"}
_ARRAY_ORIGINS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
                  collections.abc.Set, collections.abc.MutableSequence)
_OBJECT_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def json_type(value: Any) -> str:
    """The JSON name of a parsed JSON value's type (``string``, ``integer``, ``boolean``, ...)."""
    if isinstance(value, bool):
        return "boolean"
    for name in ("string", "integer", "number", "array", "object", "null"):
        if isinstance(value, _PY_TYPES[name]):
            return name
    return type(value).__name__


def _is(value: Any, kind: Any) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    py = _PY_TYPES.get(kind) if isinstance(kind, str) else None
    return py is None or isinstance(value, py)     # a type name JSON Schema lacks: not checked


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python says it is)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _show(values: list[Any]) -> str:
    shown = ", ".join(json.dumps(v, ensure_ascii=False) for v in values[:20])
    return shown + (f", ... ({len(values)} values)" if len(values) > 20 else "")


def _name(path: str) -> str:
    return f"argument {path!r}" if path else "the arguments"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(schema: Any, value: Any, path: str) -> str | None:
    if not isinstance(schema, dict):
        return None                                # `true` / unknown: anything goes
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_name(path)} must be a finite number, got {value}"
    t = schema.get("type")
    kinds = t if isinstance(t, list) else [t] if t is not None else []
    if kinds and not any(_is(value, k) for k in kinds):
        return f"{_name(path)} must be {' or '.join(map(str, kinds))}, got {json_type(value)}"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{_name(path)} must be {json.dumps(schema['const'], ensure_ascii=False)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(_same(value, e) for e in enum):
        return f"{_name(path)} must be one of {_show(enum)}"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            problems = [_check(o, value, path) for o in options]
            if all(problems):
                return f"{problems[0]} (or match another of its {len(options)} allowed forms)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, bad, word in (("minimum", lambda v, b: v < b, ">="), ("maximum", lambda v, b: v > b, "<="),
                               ("exclusiveMinimum", lambda v, b: v <= b, ">"),
                               ("exclusiveMaximum", lambda v, b: v >= b, "<")):
            bound = schema.get(key)
            if isinstance(bound, (int, float)) and not isinstance(bound, bool) and bad(value, bound):
                return f"{_name(path)} must be {word} {bound}, got {value}"
    sized = (("minLength", "maxLength", "characters") if isinstance(value, str) else
             ("minItems", "maxItems", "items") if isinstance(value, list) else None)
    if sized:
        lo, hi = schema.get(sized[0]), schema.get(sized[1])
        if isinstance(lo, int) and len(value) < lo:
            return f"{_name(path)} must have at least {lo} {sized[2]}, got {len(value)}"
        if isinstance(hi, int) and len(value) > hi:
            return f"{_name(path)} must have at most {hi} {sized[2]}, got {len(value)}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = _check(schema["items"], item, f"{path}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict):
        return _check_object(schema, value, path)
    return None


def _check_object(schema: dict[str, Any], value: dict[str, Any], path: str) -> str | None:
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = schema.get("required")
    for key in required if isinstance(required, list) else []:
        if key not in value:
            return f"missing required argument {_join(path, str(key))!r}"
    extra = schema.get("additionalProperties")
    for key, item in value.items():
        where = _join(path, key)
        if key in props:
            problem = _check(props[key], item, where)
        elif extra is False or (extra is None and props):
            return f"unknown argument {where!r} (expected: {', '.join(map(str, props)) or 'none'})"
        else:
            problem = _check(extra, item, where)
        if problem:
            return problem
    return None


def check_arguments(spec_or_parameters: Any, args: Any) -> str | None:
    """The first way ``args`` (a parsed JSON object) break a tool's parameters schema (a
    :class:`~nanoseek.tools.format.ToolSpec` or the schema itself), as one line; None when they fit."""
    params = getattr(spec_or_parameters, "parameters", spec_or_parameters)
    if not isinstance(args, dict):
        return f"the arguments must be a JSON object, got {json_type(args)}"
    try:
        return _check({**params, "type": "object"} if isinstance(params, dict) else {}, args, "")
    except RecursionError:
        return "the arguments are nested too deeply to check"


# ----------------------------------------------------------------------------- from a signature
def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of one parameter annotation (module docstring); ``{}`` (anything) when unknown."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any or annotation is object:
        return {}
    if annotation is None:
        return {"type": "null"}
    if isinstance(annotation, str):                 # an annotation that did not resolve
        return {}
    if isinstance(annotation, type) and annotation in _ANNOTATION_TYPES:
        return {"type": _ANNOTATION_TYPES[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = schema_of(args[0])
        text = next((a for a in args[1:] if isinstance(a, str)), None)
        return {**inner, "description": text} if text else inner
    if origin is typing.Literal:
        values = [a for a in args if _scalar(a)]
        kinds = {json_type(v) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
    if origin in (typing.Union, types.UnionType):
        parts = [schema_of(a) for a in args]
        if any(not p for p in parts):
            return {}
        if all(set(p) == {"type"} and isinstance(p["type"], str) for p in parts):
            return {"type": list(dict.fromkeys(p["type"] for p in parts))}
        return {"anyOf": parts}
    if origin in _ARRAY_ORIGINS:
        out: dict[str, Any] = {"type": "array"}
        item_args = [a for a in args if a is not Ellipsis]
        if item_args and (origin is not tuple or len(set(item_args)) == 1):
            item = schema_of(item_args[0])
            if item:
                out["items"] = item
        return out
    if origin in _OBJECT_ORIGINS:
        out = {"type": "object"}
        if len(args) == 2 and schema_of(args[1]):
            out["additionalProperties"] = schema_of(args[1])
        return out
    return {}


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    for target in (fn, getattr(fn, "__call__", None), getattr(fn, "func", None)):   # functions, instances, partials
        try:
            return typing.get_type_hints(target, include_extras=True)
        except Exception:  # noqa: BLE001 - one unresolvable annotation: resolve the others one by one
            continue
    return {}


def _resolve(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) evaluated where ``fn`` was
    defined, as typing.get_type_hints does; left a string when it does not resolve."""
    target = getattr(fn, "func", fn)
    scope = getattr(inspect.unwrap(target), "__globals__", None) or getattr(type(target).__call__, "__globals__", {})
    for _ in range(2):                              # a quoted annotation under the __future__ import: "'int'"
        if not isinstance(annotation, str):
            break
        try:
            annotation = eval(annotation, dict(scope), {})  # noqa: S307 - the registering program's own annotation
        except Exception:  # noqa: BLE001 - an unknown name: the schema accepts anything there
            break
    return annotation


def parameters_from_signature(fn: Callable[..., Any], sig: inspect.Signature) -> dict[str, Any]:
    """The parameters schema of ``fn`` (its signature ``sig``), as the module docstring describes."""
    hints = _hints(fn)
    props: dict[str, Any] = {}
    required: list[str] = []
    open_object = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            open_object = True
            continue
        schema = dict(schema_of(hints[p.name] if p.name in hints else _resolve(p.annotation, fn)))
        if p.default is p.empty:
            required.append(p.name)
        elif _scalar(p.default):
            schema["default"] = p.default
        props[p.name] = schema
    return {"type": "object", "properties": props, "required": required, "additionalProperties": open_object}


__all__ = ["check_arguments", "schema_of", "parameters_from_signature", "json_type"]
