"""The tools a model calls: the calculator against hostile input, argument checks against JSON
Schemas, Python callables registered from their signatures, timeouts that never block the caller
beyond the limit, the limits read from a config, and Toolbox.run's contract (a result, never an
exception). The sandboxed ``python`` built-in has its own file, ``test_tools_python.py``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Annotated, Literal, Optional

import pytest

from nanoseek.errors import ConfigError, UserError
from nanoseek.tools import (BUILTINS, Tool, ToolCall, Toolbox, ToolError, ToolLimits, ToolResult, ToolSpec,
                           check_arguments)
from nanoseek.tools import toolbox as toolbox_mod
from nanoseek.tools.calculator import MAX_DIGITS, CalculatorError, calculator, evaluate
from nanoseek.tools.schema import parameters_from_signature, schema_of

pytestmark = pytest.mark.timeout(60)


def call(box: Toolbox, name: str, args) -> ToolResult:
    return box.run(ToolCall(name, args if isinstance(args, str) else json.dumps(args)))


# ----------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr, want", [
    ("347*829", "287663"), ("(347 * 829) - 12", "287651"), ("2**10", "1024"), ("2 ^ 10", "1024"),
    ("10/4", "2.5"), ("12/4", "3"), ("7//2", "3"), ("-7 % 3", "2"), ("-(-3)", "3"), ("+4", "4"),
    ("0.1+0.2", "0.3"), ("1/3", "0.333333333333"), ("2**-2", "0.25"), ("1e5", "100000"),
    ("123456789012345678901234567890 * 3", "370370367037037036703703703670"),  # exact big ints
    ("9" * MAX_DIGITS, "9" * MAX_DIGITS), ("1_000 + 1", "1001"), ("((((1))))", "1"),
    ("６×７", "42"), ("٨÷٢", "4"), ("5 − 2", "3"), ("1 +\n 2", "3"), ("  3  ", "3"), ("0**0", "1"),
])
def test_calculator_values(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr, why", [
    ("10**10**10", "exponent"), ("9**9**9", "exponent"), ("2**65", "exponent"), ("2**-65", "exponent"),
    ("(10**59)**64", "digits"), ("10**60", "digits"), ("9" * (MAX_DIGITS + 1), "digits"),
    ("99999999999999999999999999999999 * 99999999999999999999999999999999", "digits"),
    ("1e400", "finite"), ("1e308*10", "finite"), ("1e308//1e-308", "finite"), ("1e200**2", "too large"),
    ("(-8)**(1/3)", "real"), ("(-1)**0.5", "real"), ("1j", "numbers"), ("1/0", "division by zero"),
    ("5 % 0", "division by zero"), ("0.0**-1", "division by zero"), ("7.0 // 0", "division by zero"),
    ("(" * 150 + "1" + ")" * 150, "longer than"), ("1" * 10_000, "longer than"), ("-" * 199 + "1", "parts"),
    ("1+" * 99 + "1", "parts"),
    ("__import__('os').system('true')", "function calls"), ("(1).__class__", "attributes"), ("abs(-1)", "function"),
    ("lambda: 1", "lambdas"), ("[x for x in (1, 2)]", "ListComp"), ("{x: 1 for x in (1,)}", "DictComp"),
    ("x", "names"), ("True + 1", "numbers"), ("None", "numbers"), ("'a' * 3", "numbers"), ("b'a'", "numbers"),
    ("f'{1}'", "JoinedStr"), ("1 if 1 else 2", "IfExp"), ("1 < 2", "comparisons"), ("1 and 2", "'and'"),
    ("1, 2", "commas"), ("[1][0]", "indexing"), ("~1", "UnaryOp"), ("1 << 70", "BinOp"), ("1 & 2", "BinOp"),
    ("1; 2", "not an arithmetic"), ("(x := 1)", "NamedExpr"), ("", "empty"), ("   ", "empty"),
    ("3²", "U\\+00B2"), ("１＋１", "U\\+FF0B"), ("2 ** ٩٩", "exponent"), ("\x00", "not an arithmetic"),
    ("50%", "not an arithmetic"), ("2^^3", "not an arithmetic"),
])
def test_calculator_refuses_hostile_expressions_quickly(expr, why):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError, match=why) as info:
        evaluate(expr)
    assert time.perf_counter() - t0 < 0.5
    assert "\n" not in str(info.value) and isinstance(info.value, ToolError)


@pytest.mark.parametrize("value", [5, None, ["1+1"], b"1+1"])
def test_calculator_needs_a_string(value):
    with pytest.raises(CalculatorError, match="string"):
        evaluate(value)


def test_calculator_matches_python_on_random_expressions():
    """The evaluator against Python's own arithmetic on expressions we generate (so eval is safe)."""
    rng = random.Random(0)

    def expr(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(-999, 999)) if rng.random() < 0.8 else f"{rng.uniform(-99, 99):.3f}"
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
        right = str(rng.randint(0, 4)) if op == "**" else expr(depth - 1)
        return f"({expr(depth - 1)} {op} {right})"

    checked = 0
    for _ in range(400):
        e = expr(3)
        try:
            want = eval(e)  # noqa: S307 - our own generated arithmetic
        except (ZeroDivisionError, OverflowError):
            with pytest.raises(CalculatorError):
                evaluate(e)
            continue
        if isinstance(want, complex) or (isinstance(want, float) and not math.isfinite(want)) or \
                (isinstance(want, int) and abs(want) >= 10 ** MAX_DIGITS) or len(e) > 200:
            continue
        got = evaluate(e)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300), e
        if isinstance(want, int) and "/" not in e and "." not in e:
            assert got == want and isinstance(got, int), e          # integer arithmetic stays exact
        checked += 1
    assert checked > 250


# ----------------------------------------------------------------------------- argument checks
OBJ = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 1, "maximum": 10}, "x": {"type": "number"},
    "s": {"type": "string", "minLength": 1, "maxLength": 3}, "b": {"type": "boolean"},
    "unit": {"type": "string", "enum": ["C", "F"]}, "opt": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    "where": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
              "required": ["city"]},
    "any": {}, "either": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["all"]}]},
    "k": {"const": 3}, "free": {"type": "object", "additionalProperties": {"type": "integer"}},
}, "required": ["n"]}


@pytest.mark.parametrize("args, problem", [
    ({"n": 3}, None), ({"n": 3, "x": 2}, None), ({"n": 3, "x": 2.5, "s": "abc", "b": False}, None),
    ({"n": 1, "unit": "F", "opt": None, "tags": ["a"], "where": {"city": "Oslo", "zip": 1}}, None),
    ({"n": 1, "any": [1, {"a": None}], "either": 4, "k": 3, "free": {"a": 1, "b": 2}}, None),
    ({"n": 1, "either": "all"}, None),
    ({}, "missing required argument 'n'"), ({"n": "3"}, "argument 'n' must be integer, got string"),
    ({"n": 3.0}, "must be integer, got number"), ({"n": True}, "must be integer, got boolean"),
    ({"n": 0}, "'n' must be >= 1"), ({"n": 11}, "'n' must be <= 10"), ({"n": 1, "x": True}, "must be number"),
    ({"n": 1, "x": float("nan")}, "finite"), ({"n": 1, "x": float("inf")}, "finite"),
    ({"n": 1, "s": ""}, "at least 1 characters"), ({"n": 1, "s": "abcd"}, "at most 3 characters"),
    ({"n": 1, "b": 1}, "must be boolean, got integer"), ({"n": 1, "unit": "K"}, 'one of "C", "F"'),
    ({"n": 1, "unit": None}, "must be string"), ({"n": 1, "opt": 5}, "string or null"),
    ({"n": 1, "tags": "a"}, "must be array"), ({"n": 1, "tags": ["a", 2]}, "argument 'tags[1]' must be string"),
    ({"n": 1, "tags": ["a", "b", "c"]}, "at most 2 items"), ({"n": 1, "where": {}}, "'where.city'"),
    ({"n": 1, "where": {"city": "x", "zip": "1"}}, "'where.zip' must be integer"),
    ({"n": 1, "where": {"city": "x", "country": "y"}}, "unknown argument 'where.country'"),
    ({"n": 1, "either": "some"}, "allowed forms"), ({"n": 1, "k": 4}, "must be 3"), ({"n": 1, "k": True}, "must be 3"),
    ({"n": 1, "free": {"a": "x"}}, "'free.a' must be integer"), ({"n": 1, "nope": 1}, "unknown argument 'nope'"),
    ([1], "must be a JSON object"), ("x", "must be a JSON object"),
])
def test_check_arguments(args, problem):
    got = check_arguments(OBJ, args)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and "\n" not in got


def test_check_arguments_open_and_closed_objects():
    assert check_arguments({"type": "object"}, {"anything": 1}) is None           # no properties: open
    assert check_arguments({"type": "object", "properties": {}, "additionalProperties": False}, {"a": 1})
    assert check_arguments({"type": "object", "properties": {"a": {}}, "additionalProperties": True},
                           {"a": 1, "b": 2}) is None
    assert check_arguments({"type": "object", "properties": {"a": {}}}, {"b": 2}).startswith("unknown argument 'b'")
    # keywords it does not check are ignored, not errors; malformed parts of a schema are skipped
    assert check_arguments({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x$",
                                                                   "format": "email"}}}, {"a": "y"}) is None
    assert check_arguments({"type": "object", "properties": {"a": {"type": "mystery"}}}, {"a": 1}) is None
    deep = {"type": "object", "properties": {}}
    node = deep
    for _ in range(5000):
        node["properties"]["a"] = {"type": "object", "properties": {}}
        node = node["properties"]["a"]
    value: dict = {}
    cur = value
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    assert check_arguments(deep, value) in (None, "the arguments are nested too deeply to check")


# ----------------------------------------------------------------------------- registering callables
def weather(city: str, days: int = 3, unit: Literal["C", "F"] = "C", detail: Optional[bool] = None,
            tags: list[str] | None = None, scale: Annotated[float, "a factor"] = 1.0) -> str:
    """Forecast for a city.

    Long description that is not shown."""
    return f"{city}:{days}:{unit}:{detail}:{tags}:{scale}"


def test_schema_from_signature():
    box = Toolbox().register(weather)
    spec = box.specs()[0]
    assert spec.name == "weather" and spec.description == "Forecast for a city."
    assert spec.parameters == {"type": "object", "required": ["city"], "additionalProperties": False, "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "default": 3},
        "unit": {"type": "string", "enum": ["C", "F"], "default": "C"},
        "detail": {"type": ["boolean", "null"], "default": None},
        "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
        "scale": {"type": "number", "description": "a factor", "default": 1.0}}}
    r = call(box, "weather", {"city": "Oslo", "unit": "F", "tags": ["x"]})
    assert r.ok and r.output == "Oslo:3:F:None:['x']:1.0"
    assert call(box, "weather", {"city": "Oslo", "unit": "K"}).output.startswith("error: argument 'unit' must be one of")
    assert call(box, "weather", {"city": "Oslo", "wind": 1}).output.startswith("error: unknown argument 'wind'")
    json.dumps(box.openai_tools())                           # the schema is JSON (the API and template show it)


def test_signature_kinds():
    def varargs(a, *args, b: int = 2, **kwargs):
        return [a, list(args), b, kwargs]

    box = Toolbox().register(varargs)
    p = box.specs()[0].parameters
    assert p["properties"] == {"a": {}, "b": {"type": "integer", "default": 2}} and p["additionalProperties"] is True
    assert json.loads(call(box, "varargs", {"a": {"x": 1}, "c": 5}).output) == [{"x": 1}, [], 2, {"c": 5}]

    def posonly(x: float, /, y: float = 1.0) -> float:
        return x * 10 + y

    box.register(posonly).register(math.sqrt)
    assert call(box, "posonly", {"x": 2}).output == "21.0" and call(box, "posonly", {"x": 2, "y": 0.5}).output == "20.5"
    assert call(box, "sqrt", {"x": 16}).output == "4.0"
    assert box.tools["sqrt"].spec.description.startswith("Return the square root")

    def unannotated(a, b="x", c=None, d=(1, 2)):
        return [a, b, c, list(d)]

    p = parameters_from_signature(unannotated, __import__("inspect").signature(unannotated))
    assert p["properties"] == {"a": {}, "b": {"default": "x"}, "c": {"default": None}, "d": {}}
    assert p["required"] == ["a"]

    def stringly(a: "int", b: "Undefined") -> None:   # noqa: F821 - an annotation typing cannot resolve
        return None

    assert Toolbox().register(stringly).specs()[0].parameters["properties"] == {"a": {"type": "integer"}, "b": {}}
    assert schema_of(dict[str, int]) == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert schema_of(tuple[int, ...]) == {"type": "array", "items": {"type": "integer"}}
    assert schema_of(tuple[int, str]) == {"type": "array"} and schema_of(set) == {"type": "array"}
    assert schema_of(Literal[1, "a"]) == {"enum": [1, "a"]} and schema_of(object) == {}


def test_register_names_and_duplicates():
    box = Toolbox.builtin("calculator")
    for bad in ("my tool", "", "a" * 65, "é", "a.b", 5):
        with pytest.raises(ValueError, match="1-64 letters") as info:
            box.register(weather, name=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="pass name="):
        box.register(lambda x: x)
    box.register(lambda x: x * 2, name="double")
    assert call(box, "double", {"x": 4}).output == "8"
    with pytest.raises(ValueError, match="'calculator' is already"):
        box.register(weather, name="calculator")
    with pytest.raises(ValueError, match="'double' is already"):
        box.register(weather, name="double")
    with pytest.raises(ValueError, match="already"):
        Toolbox([box.tools["double"], box.tools["double"]])
    with pytest.raises(ValueError, match="not callable"):
        box.register("print")
    with pytest.raises(ValueError, match="pass name="):
        box.register(functools.partial(weather, "Oslo"))
    box.register(functools.partial(weather, days=1), name="weather1")
    assert box.tools["weather1"].spec.description == "Forecast for a city."
    assert call(box, "weather1", {"city": "Rome"}).output.startswith("Rome:1:")
    with pytest.raises(ValueError, match="signature"):
        box.register(max)                                     # a builtin without a readable signature
    box.register(max, parameters={"type": "object", "properties": {"a": {"type": "integer"}}}, description="max")
    with pytest.raises(ValueError, match="register\\(bad\\).function.parameters"):
        box.register(weather, name="bad", parameters={"type": "array"})

    class Counter:
        """Counts calls."""

        def __init__(self):
            self.n = 0

        def __call__(self, step: int = 1) -> int:
            self.n += step
            return self.n

    box.register(Counter(), name="counter")
    assert box.tools["counter"].spec.parameters["properties"] == {"step": {"type": "integer", "default": 1}}
    assert [call(box, "counter", {}).output for _ in range(2)] == ["1", "2"]


@pytest.mark.parametrize("value, text", [
    (3, "3"), (2.5, "2.5"), (True, "true"), (None, "null"), ({"a": [1, "é"]}, '{"a": [1, "é"]}'),
    ((1, 2), "[1, 2]"), (b"bytes \xff", "bytes \ufffd"), (Decimal("1.50"), "1.50"), ({1, 2}, "{1, 2}"),
    ({(1, 2): 3}, "{(1, 2): 3}"), ("", ""), (float("nan"), "NaN"),
])
def test_outputs_that_are_not_strings(value, text):
    r = call(Toolbox().register(lambda: value, name="f"), "f", {})
    assert r.ok and r.output == text


def test_failures_inside_callables_are_results():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    def raiser(kind: str):
        if kind == "value":
            raise ValueError("bad value\nsecond line")
        if kind == "tool":
            raise ToolError("city not found")
        if kind == "exit":
            raise SystemExit(3)
        if kind == "unprintable":
            raise Unprintable()
        if kind == "recursion":
            return raiser(kind)
        return "fine"

    box = Toolbox().register(raiser)
    assert call(box, "raiser", {"kind": "value"}).output == "error: ValueError: bad value"
    assert call(box, "raiser", {"kind": "tool"}).output == "error: city not found"
    assert call(box, "raiser", {"kind": "exit"}).output == "error: SystemExit: 3"
    assert call(box, "raiser", {"kind": "unprintable"}).output == "error: Unprintable"
    assert call(box, "raiser", {"kind": "recursion"}).output.startswith("error: RecursionError")
    assert call(box, "raiser", {"kind": "ok"}).output == "fine"
    assert all(not call(box, "raiser", {"kind": k}).ok for k in ("value", "tool", "exit"))


def test_async_callables_run_to_the_end():
    async def fetch(n: int) -> list[int]:
        import asyncio
        await asyncio.sleep(0.01)
        return list(range(n))

    assert call(Toolbox().register(fetch), "fetch", {"n": 3}).output == "[0, 1, 2]"


def test_huge_outputs_are_cut():
    box = Toolbox(limits=ToolLimits(max_output_chars=100)).register(lambda n: "x" * n, name="big")
    short, exact, long_ = (call(box, "big", {"n": n}) for n in (99, 100, 10**7))
    assert short.output == "x" * 99 and exact.output == "x" * 100
    assert long_.ok and long_.output == "x" * 100 + "... [cut at 100 characters]"
    r = call(box.register(lambda: "a\ud800b", name="surrogate"), "surrogate", {})
    r.output.encode("utf-8")                                  # tokenizable
    assert r.output == "a?b"
    err = call(Toolbox(limits=ToolLimits(max_output_chars=50)), "nope" * 100, {})
    assert err.output.endswith("... [cut at 50 characters]") and err.output.startswith("error: unknown tool")


def test_a_hanging_callable_never_blocks_the_caller_beyond_the_timeout():
    release = threading.Event()
    started = []

    def hang(tag: str) -> str:
        started.append(tag)
        release.wait(30)
        return "late"

    box = Toolbox(limits=ToolLimits(timeout_s=0.2)).register(hang)
    box.register(lambda: "quick", name="quick")
    try:
        for i in range(toolbox_mod.MAX_STUCK_CALLS):
            t0 = time.perf_counter()
            r = call(box, "hang", {"tag": str(i)})
            assert time.perf_counter() - t0 < 1.5
            assert not r.ok and r.output == "error: hang timed out after 0.2 s"
        assert call(box, "quick", {}).output == "quick"                  # other tools still answer
        t0 = time.perf_counter()
        r = call(box, "hang", {"tag": "refused"})                        # too many stuck: refused at once
        assert time.perf_counter() - t0 < 0.1 and not r.ok and "not answering" in r.output
        assert "refused" not in started
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while box._stuck["hang"] and time.monotonic() < deadline:            # the stuck threads finish
        time.sleep(0.01)
    assert box._stuck["hang"] == 0
    box.limits = ToolLimits(timeout_s=5)
    assert call(box, "hang", {"tag": "again"}).output == "late"          # and the tool works again


def test_a_contained_tool_gets_the_limits_and_a_backstop(monkeypatch):
    """A contained tool (the python built-in's kind) stops itself at limits.timeout_s; should it not,
    the caller still stops waiting CONTAINED_GRACE_S later."""
    seen = []

    def contained(args, limits):
        seen.append((args, limits.timeout_s))
        time.sleep(float(args["sleep"]))
        return "done"

    monkeypatch.setattr(toolbox_mod, "CONTAINED_GRACE_S", 0.3)
    spec = ToolSpec("slow", "", {"type": "object", "properties": {"sleep": {"type": "number"}}})
    box = Toolbox([Tool(spec, contained, contained=True)], ToolLimits(timeout_s=0.2))
    assert call(box, "slow", {"sleep": 0.35}).output == "done"          # inside timeout + grace: its own answer
    t0 = time.perf_counter()
    r = call(box, "slow", {"sleep": 5})
    assert not r.ok and r.output == "error: slow timed out after 0.2 s" and time.perf_counter() - t0 < 1.5
    assert seen[0] == ({"sleep": 0.35}, 0.2)


def test_run_is_thread_safe():
    box = Toolbox.builtin("calculator").register(lambda a, b: a * b, name="mul")
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: call(box, "mul" if i % 2 else "calculator",
                                            {"a": i, "b": i} if i % 2 else {"expression": f"{i}*{i}"}).output,
                             range(64)))
    assert outs == [str(i * i) for i in range(64)]


@pytest.mark.parametrize("name, arguments, problem", [
    ("calculator", "", "missing required argument 'expression'"),
    ("calculator", "{", "not valid JSON"), ("calculator", "[1]", "must be a JSON object"),
    ("calculator", '"1+1"', "must be a JSON object"), ("calculator", "null", "must be a JSON object"),
    ("calculator", '{"expression": NaN}', "NaN is not JSON"), ("calculator", '{"expression": 5}', "must be string"),
    ("calculator", '{"expression": "1", "x": 1}', "unknown argument 'x'"),
    ("calculator", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("calculator", '{"expression": "1/0"}', "error: division by zero"),
    ("calculator", {"expression": "1"}, "must be JSON text"), ("calculator", None, "must be JSON text"),
    ("Calculator", "{}", "unknown tool 'Calculator'; available: calculator"), (None, "{}", "unknown tool None"),
    ("", "{}", "unknown tool ''"), ("calculator\n", "{}", "unknown tool"),
])
def test_run_never_raises(name, arguments, problem):
    r = Toolbox.builtin("calculator").run(ToolCall(name, arguments))
    assert not r.ok and r.output.startswith("error:") and problem in r.output and r.seconds >= 0
    assert r.output.count("\n") == 0


# ----------------------------------------------------------------------------- builtins and limits
def test_builtin_names():
    assert list(Toolbox.builtin(" calculator , calculator,").tools) == ["calculator"]
    assert list(Toolbox.builtin(["calculator"]).tools) == ["calculator"] and "calculator" in Toolbox.builtin("calculator")
    assert set(BUILTINS) >= {"calculator", "python"}
    for bad, why in (("calculater", "unknown built-in tool 'calculater'; built-ins: calculator, python"),
                     ("calculator,Python", "unknown built-in tool 'Python'"), ("", "no name given"), (",", "no name"),
                     (None, "expected names"), ([1], "expected names")):
        with pytest.raises(ConfigError) as info:
            Toolbox.builtin(bad)
        assert why in str(info.value) and "\n" not in str(info.value) and isinstance(info.value, UserError)


def test_limits_defaults_and_validation():
    lim = ToolLimits()
    assert (lim.max_calls, lim.timeout_s, lim.max_output_chars, lim.python_memory_mb) == (4, 5.0, 2000, 256)
    assert ToolLimits(timeout_s=2).timeout_s == 2
    for kwargs, why in (({"timeout_s": -1}, "timeout_s = -1: must be a positive number"),
                        ({"timeout_s": 0}, "timeout_s = 0"), ({"timeout_s": float("nan")}, "timeout_s = nan"),
                        ({"timeout_s": float("inf")}, "timeout_s = inf"), ({"timeout_s": "5"}, "must be a number"),
                        ({"timeout_s": True}, "must be a number"), ({"max_calls": 0}, "max_calls = 0: must be >= 1"),
                        ({"max_calls": 2.5}, "max_calls = 2.5: must be an integer"),
                        ({"max_calls": True}, "must be an integer"), ({"max_output_chars": -5}, ">= 1"),
                        ({"python_memory_mb": 4}, "python_memory_mb = 4: must be >= 16")):
        with pytest.raises(ConfigError) as info:
            ToolLimits(**kwargs)
        assert str(info.value).startswith("ToolLimits: ") and why in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(ValueError, match="^speedrun.toml \\[tools\\]: "):
            ToolLimits.from_dict(kwargs, where="speedrun.toml [tools]")
    with pytest.raises(ConfigError):
        Toolbox(limits={"timeout_s": 1})


def test_limits_from_a_config_table():
    table = tomllib.loads("[tools]\ntimeout_s = 2\nmax_calls = 3\n")["tools"]
    lim = ToolLimits.from_dict(table, where="x.toml [tools]")
    assert lim == ToolLimits(max_calls=3, timeout_s=2.0) and ToolLimits.from_dict({}) == ToolLimits()
    with pytest.raises(ConfigError, match=r"^x.toml \[tools\]: unknown key 'timeout' \(valid: max_calls, timeout_s, "):
        ToolLimits.from_dict({"timeout": 2}, where="x.toml [tools]")
    with pytest.raises(ConfigError, match="must be a table"):
        ToolLimits.from_dict([1], where="x")
    assert Toolbox.builtin("calculator", limits=lim).limits is lim


def test_json_depth_and_the_depth_cap_of_tool_definitions():
    """Tool parameters nested past MAX_JSON_DEPTH are a ToolFormatError naming the field (Python's
    recursive JSON walkers, the chat template's among them, overflow on hundreds of levels), counted
    without recursion however deep the value."""
    from nanoseek.tools.format import MAX_JSON_DEPTH, ToolFormatError, json_depth

    assert [json_depth(v) for v in (1, "s", [], {}, [[1]], {"a": [{"b": 2}]})] == [0, 0, 1, 1, 2, 3]
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == MAX_JSON_DEPTH + 1           # stops past the cap, no RecursionError

    def schema(levels: int) -> dict:
        value: dict = {"type": "string"}
        for _ in range(levels):
            value = {"type": "object", "properties": {"a": value}}
        return value
    fine = {"type": "function", "function": {"name": "f", "parameters": schema(MAX_JSON_DEPTH // 2 - 1)}}
    assert ToolSpec.from_openai(fine).name == "f"
    with pytest.raises(ToolFormatError, match=r"^tools\[2\]\.function\.parameters: nested deeper than 64 levels$"):
        ToolSpec.from_openai({"type": "function", "function": {"name": "f", "parameters": schema(500)}}, "tools[2]")
