"""Tool use: DeepSeek-V3.1's tool-call format, the tools a model may call, and the limits around them.

* :mod:`~nanoseek.tools.format`: the V3.1 control strings, a tool's definition (:class:`ToolSpec`,
  OpenAI's ``{"type": "function", "function": {...}}``), a call (:class:`ToolCall`), rendering and
  parsing calls, the tools' description in the system turn (the chat template writes the same),
  and the ids of the tool tokens in a vocabulary (:class:`ToolTokens`).
* :mod:`~nanoseek.tools.toolbox`: :class:`Toolbox`, the tools one sample may call (built-ins and
  Python callables a library user registers), run under :class:`ToolLimits`; a bad call is an error
  message the model reads as the tool's output, never an exception.
* :mod:`~nanoseek.tools.calculator`: the ``calculator`` built-in, a safe arithmetic evaluator.

The engine (:mod:`nanoseek.infer`) pauses a sample on a complete call and appends the result; the
server (:mod:`nanoseek.serve`) speaks OpenAI's ``tools`` API; post-training and evaluation use
both. This package imports nothing from those layers.
"""
