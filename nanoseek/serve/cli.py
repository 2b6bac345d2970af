"""``nanoseek serve``: an OpenAI-compatible HTTP server and web chat for a checkpoint.

Loads ``--model`` (a run folder or an HF checkpoint directory, with its ``tokenizer.json``),
starts the continuous-batching inference engine and serves, on 127.0.0.1:8000 by default:

  /                       the web chat (streaming, the reasoning in a collapsible "thinking" block)
  /v1/models              the model served (its id is --model-name)
  /v1/chat/completions    chat, the answer in ``content`` and the chain of thought in ``reasoning_content``
  /v1/completions         raw text continuation (logprobs, echo: what lm-evaluation-harness scores with)
  /tokenize, /detokenize, /tokenizer_info   vLLM's tokenizer endpoints (lm-eval's remote tokenizer)

Thinking is per request (``chat_template_kwargs: {"thinking": true}`` or ``reasoning_effort``);
``--think/--no-think`` sets it for requests that do not say (default off, as ``chat`` and ``generate``).

Tool calls (DeepSeek-V3.1's format; the tokenizer needs its tool tokens): a request with ``tools``
gets OpenAI's ``tool_calls`` back and runs them itself. ``--tools calculator,python`` makes the
server run those built-ins for requests without their own ``tools`` (the web chat shows each call
and its output in a collapsible block).

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``.
Concurrent requests are decoded together, up to --max-batch-size rows (a request with ``n``
samples takes ``n`` rows). Requests over the limits below get a 4xx error naming the limit;
a request body that takes longer than --body-timeout seconds to arrive gets 408 and its
connection is closed. The KV cache (--max-batch-size x --max-seq-len) is checked against free
memory before it is allocated.
The server binds 127.0.0.1 unless --host says otherwise; it has no authentication, so expose
it beyond this machine only behind something that has.
"""

from __future__ import annotations

import argparse

from nanoseek import limits
from nanoseek.infer.thinking import add_think_argument

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek.tasks.tool_use import add_describe_argument

    p.add_argument("--model", required=True, metavar="RUN_OR_DIR",
                   help="run folder (its final/ or latest checkpoint) or HF-format checkpoint directory")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its directory (default: found next to the checkpoint)")
    p.add_argument("--model-name", default=None,
                   help="model id clients send and /v1/models lists (default: the run folder's name)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=limits.port, default=DEFAULT_PORT,
                   help=f"port to bind, 0 for any free one (default: {DEFAULT_PORT})")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch-size", type=limits.positive_int, default=16,
                   help="KV-cache rows decoded together in one step, across requests (default: 16)")
    g.add_argument("--max-seq-len", type=limits.int_range(2), default=None,
                   help="prompt + completion tokens per row (default: the model's, at most 4096)")
    g.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding (model needs MTP modules)")
    g.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (the first requests wait while it compiles; "
                        "falls back to eager with a warning if compiling fails)")
    add_think_argument(g, "chat requests that do not set chat_template_kwargs.thinking or reasoning_effort")
    g.add_argument("--tools", default=None, metavar="NAMES",
                   help="built-in tools the server runs itself, comma-separated (e.g. calculator,python): chat "
                        "requests without their own `tools` (the web chat) get them, each call and its output "
                        "reported in message.tool_runs; requests with `tools` stay client-run (default: none)")
    add_describe_argument(g)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and cache dtype (default: the checkpoint's)")
    g.add_argument("--device", default=None, type=limits.device, help="torch device (default: cuda if available, else cpu)")
    lim = p.add_argument_group("limits (a request over one gets a 4xx error)")
    lim.add_argument("--max-tokens-limit", type=limits.positive_int, default=2048,
                     help="largest max_tokens per choice (default: 2048)")
    lim.add_argument("--default-max-tokens", type=limits.positive_int, default=512,
                     help="chat max_tokens when the request has none, capped by the context (default: 512)")
    lim.add_argument("--max-n", type=limits.positive_int, default=8, help="largest n (choices per prompt) (default: 8)")
    lim.add_argument("--max-prompts", type=limits.positive_int, default=16,
                     help="prompts per /v1/completions request (default: 16)")
    lim.add_argument("--max-body-bytes", type=limits.positive_int, default=1 << 20,
                     help="request body size (default: 1 MiB)")
    lim.add_argument("--max-prompt-tokens", type=limits.positive_int, default=None,
                     help="prompt length in tokens (default: the context length minus one)")
    lim.add_argument("--body-timeout", type=limits.seconds, default=10.0, metavar="S",
                     help="seconds a request body may take to arrive; slower gets 408 and the connection is "
                          "closed (default: 10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")


def default_model_name(model_path: str) -> str:
    """``runs/r1-tiny`` and ``runs/r1-tiny/final`` -> ``r1-tiny``."""
    from pathlib import Path

    from nanoseek.train.checkpoint import HF_SUBDIRS

    p = Path(model_path).resolve()
    return p.parent.name if p.name in HF_SUBDIRS or p.name.startswith("step-") else p.name


def build_server(args: argparse.Namespace):
    """(FastAPI app, started engine) for parsed ``nanoseek serve`` arguments; user mistakes raise UserError."""
    import torch

    from nanoseek.errors import UserError
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.loading import load_for_inference
    from nanoseek.tools.format import ToolTokens

    from .api import ServeLimits, create_app
    from .tools import no_tool_tokens_message

    for flag in ("max_batch_size", "max_tokens_limit", "default_max_tokens", "max_n", "max_prompts", "max_body_bytes"):
        if getattr(args, flag) < 1:      # parsed flags are checked by their types; this guards direct callers
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UserError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.default_max_tokens > args.max_tokens_limit:
        raise UserError(f"--default-max-tokens {args.default_max_tokens} exceeds "
                        f"--max-tokens-limit {args.max_tokens_limit}")
    toolbox = None
    if getattr(args, "tools", None):
        from nanoseek.tools.toolbox import Toolbox
        try:
            toolbox = Toolbox.builtin(args.tools)
        except ValueError as e:          # ConfigError: an unknown name, or python without a sandbox
            raise UserError(f"--tools: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, tokenizer = load_for_inference(args.model, args.tokenizer, dtype=dtype, device=device,
                                              require_tokenizer=True)
        if toolbox is not None and ToolTokens.of(tokenizer) is None:
            raise UserError(f"--tools: {no_tool_tokens_message(tokenizer, args.tokenizer or args.model)}")
        limits.check_kv_cache(model, args.max_batch_size, args.max_seq_len, "--max-batch-size x --max-seq-len")
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                        use_mtp=args.mtp, compile=args.compile)
    except (ValueError, OSError) as e:  # LoadError, CheckpointError, ConfigError, TokenizerError, bad sizes
        raise UserError(str(e)) from e
    serve_limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                         max_n=args.max_n, max_prompts=args.max_prompts,
                         body_timeout_s=getattr(args, "body_timeout", 10.0))
    name = args.model_name or default_model_name(args.model)
    from nanoseek.tasks.tool_use import describe_for

    app = create_app(engine, tokenizer, name, serve_limits, think=args.think, toolbox=toolbox,
                     describe_tools=describe_for(args.describe_tools, args.model))
    engine.start()
    return app, engine


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, engine = build_server(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{args.port}"
    where = f"web chat at {url}/, OpenAI API at {url}/v1" if args.port else "on a free port (uvicorn logs it below)"
    print(f"nanoseek serve: model '{app.state.model_name}' (context {engine.max_seq_len} tokens, "
          f"{engine.max_batch_size} rows); {where}", flush=True)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0
