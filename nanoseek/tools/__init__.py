"""Tool use: DeepSeek-V3.1's tool-call format, the tools a model may call, and the limits around them.

* :mod:`~nanoseek.tools.format`: the V3.1 control strings, a tool's definition (:class:`ToolSpec`,
  OpenAI's ``{"type": "function", "function": {...}}``), a call (:class:`ToolCall`), rendering and
  parsing calls, the tools' description in the system turn (the chat template writes the same),
  and the ids of the tool tokens in a vocabulary (:class:`ToolTokens`).
* :mod:`~nanoseek.tools.toolbox`: :class:`Toolbox`, the tools one sample may call (built-ins and
  Python callables a library user registers), run under :class:`ToolLimits`; a bad call is an error
  message the model reads as the tool's output, never an exception.
* :mod:`~nanoseek.tools.schema`: a call's arguments checked against the tool's JSON Schema, and the
  schema of a Python callable read from its signature.
* :mod:`~nanoseek.tools.calculator`: the ``calculator`` built-in, a safe arithmetic evaluator.
* :mod:`~nanoseek.tools.python_tool`: the ``python`` built-in, model-written code run only in
  nanoseek's sandbox (:mod:`nanoseek.tasks.sandbox`).

The engine (:mod:`nanoseek.infer`) pauses a sample on a complete call and appends the result; the
server (:mod:`nanoseek.serve`) speaks OpenAI's ``tools`` API; post-training and evaluation use
both. This package imports nothing from those layers.
"""

from .format import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN,
                     TOOL_OUTPUT_END, TOOL_SEP, TOOL_TOKENS, ToolCall, ToolFormatError, ToolSpec, ToolTokens,
                     parse_calls, render_call, render_calls, render_output, tools_system_text)
from .schema import check_arguments
from .toolbox import BUILTINS, Tool, Toolbox, ToolError, ToolLimits, ToolResult

__all__ = ["TOOL_CALLS_BEGIN", "TOOL_CALL_BEGIN", "TOOL_SEP", "TOOL_CALL_END", "TOOL_CALLS_END", "TOOL_OUTPUT_BEGIN",
           "TOOL_OUTPUT_END", "TOOL_TOKENS", "ToolCall", "ToolFormatError", "ToolSpec", "ToolTokens", "parse_calls",
           "render_call", "render_calls", "render_output", "tools_system_text", "check_arguments", "BUILTINS", "Tool",
           "Toolbox", "ToolError", "ToolLimits", "ToolResult"]
