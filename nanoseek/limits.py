"""Checked ranges for every number a user can give, and the memory check before big allocations.

One place for the ranges of command-line numbers: each ``add_arguments`` uses these argparse
types (``positive_int``, ``nonneg_int``, ``prob``, ``seed``, ...) instead of bare ``int``/``float``,
so ``--batch-size 0``, ``--seed -1`` or ``--top-p nan`` stop at parse time with one line naming
the flag. The same bounds serve the config dataclasses (:func:`check_number`) and the server's
request fields, so a value means the same thing wherever it enters.

Memory-sized values (a KV cache of ``--batch-size`` x ``--max-seq-len``, a batch of
``micro_batch_size`` x ``seq_len`` logits) are checked with :func:`check_fits` against the memory
that is free right now (``MemAvailable`` in ``/proc/meminfo``, else ``os.sysconf``; the free
memory of a CUDA device) before anything is allocated, so a typo is an error naming the flag,
not a 256 GB allocation. The check is a lower bound on what the allocation needs: it never
refuses a size that would fit.

Text input (``--input`` files, stdin) is decoded strictly with :func:`decode_utf8`: invalid UTF-8
is an error naming the file and the byte offset. Standard library only (imported by every CLI).
"""

from __future__ import annotations

import argparse
import math
import os

from nanoseek.errors import UserError

SEED_MAX = 2**64 - 1          # torch.manual_seed accepts 0 .. 2**64 - 1


class LimitError(UserError, ValueError):
    """A value outside its checked range, or a size that does not fit in memory."""


# ---------------------------------------------------------------------------- numbers
def check_number(value, *, lo=None, hi=None, lo_open: bool = False, integer: bool = False,
                 what: str = "value"):
    """``value`` if it is a finite number in the range, else :class:`LimitError` naming ``what``.

    ``lo``/``hi`` are inclusive (``lo_open``: ``value > lo``); None leaves that side open. Booleans
    are not numbers here; ``integer`` refuses floats.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise LimitError(f"{what} must be {kind}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise LimitError(f"{what} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = "positive" if lo_open and lo == 0 else f"{'>' if lo_open else '>='} {lo}"
        raise LimitError(f"{what} must be {bound}{_range_hint(lo, hi, lo_open)}, got {value!r}")
    if hi is not None and value > hi:
        raise LimitError(f"{what} must be <= {hi}{_range_hint(lo, hi, lo_open)}, got {value!r}")
    return value


def _range_hint(lo, hi, lo_open: bool) -> str:
    if lo is None or hi is None:
        return ""
    return f" (range {'(' if lo_open else '['}{lo}, {hi}])"


def _arg_type(name: str, parse, **bounds):
    """An argparse ``type`` that parses with ``parse`` and checks ``bounds`` (see check_number)."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            kind = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return check_number(value, integer=parse is int, what="the value", **bounds)
        except LimitError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("the value ")) from None
    convert.__name__ = name       # argparse names the type in "invalid <name> value" messages
    return convert


def int_range(lo: int | None = None, hi: int | None = None):
    """argparse type: an integer in [lo, hi]."""
    return _arg_type("int", int, lo=lo, hi=hi)


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """argparse type: a finite number in [lo, hi] (``lo_open``: > lo)."""
    return _arg_type("float", float, lo=lo, hi=hi, lo_open=lo_open)


positive_int = int_range(1)                     # counts and sizes: --batch-size, --n, --shard-tokens, ...
nonneg_int = int_range(0)                       # 0 means "off": --top-k, --repetition-guard, ...
seed = int_range(0, SEED_MAX)                   # every seed torch accepts
port = int_range(0, 65535)                      # 0: any free port
prob = float_range(0.0, 1.0)                    # fractions and probabilities: --top-p, --val-fraction
open_prob = float_range(0.0, 1.0, lo_open=True)  # (0, 1]: --top-p where 0 would sample nothing
positive_float = float_range(0.0, lo_open=True)  # durations, prices, learning rates
nonneg_float = float_range(0.0)                 # --temperature (0: greedy)
TEMPERATURE_MAX = 100.0                         # uniform enough (a huge one is inf in fp32: -inf / inf is NaN)
temperature = float_range(0.0, TEMPERATURE_MAX)  # sampling temperature: 0 greedy .. 100
threads = int_range(1, 4096)                    # torch CPU threads
seconds = float_range(0.0, 86400.0, lo_open=True)  # intervals and timeouts: (0 s, one day]


def device_problem(name: str) -> str | None:
    """Why torch device ``name`` cannot be used here ("auto" always can), or None."""
    if name == "auto":
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{name!r} is not a torch device (cpu, cuda, cuda:N, mps, auto)"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return f"{name!r}: this torch ({torch.__version__}) sees no CUDA device"
        if dev.index is not None and dev.index >= n:
            return f"{name!r}: this machine has {n} CUDA device(s)"
        return None
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return None
    return f"{name!r}: no such device on this machine"


def device(text: str) -> str:
    """argparse type: a torch device this machine has (or "auto")."""
    why = device_problem(text)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


# ---------------------------------------------------------------------------- memory
def available_memory_bytes(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now on ``device`` (None when unknown)."""
    if str(device).startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except Exception:          # no CUDA, or a driver that cannot say: no check
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_fits(nbytes: int, what: str, flags: str, device: str = "cpu") -> None:
    """:class:`LimitError` when ``nbytes`` (``what``, set by ``flags``) exceed the free memory."""
    free = available_memory_bytes(device)
    if free is not None and nbytes > free:
        raise LimitError(f"{flags}: {what} needs {_gib(nbytes)} but only {_gib(free)} of memory is available "
                         f"on {device}; make it smaller")


def kv_cache_bytes(config, batch: int, seq_len: int, dtype_bytes: int = 4, with_mtp: bool = True) -> int:
    """Lower bound of the bytes of an inference KV cache of ``batch`` rows x ``seq_len`` positions."""
    from nanoseek.model.registry import cache_bytes

    return cache_bytes(config, batch, seq_len, dtype_bytes, with_mtp)


def check_kv_cache(model, batch: int, seq_len: int | None, flags: str = "--batch-size x --max-seq-len",
                   device: str | None = None) -> None:
    """Refuse an engine whose KV cache cannot fit before the engine allocates it."""
    if seq_len is None:
        return
    cfg = model.config
    param = next(iter(model.parameters()), None)
    dtype_bytes = param.element_size() if param is not None else 4
    dev = device or (str(param.device) if param is not None else "cpu")
    nbytes = kv_cache_bytes(cfg, batch, seq_len, dtype_bytes)
    check_fits(nbytes, f"a KV cache of {batch} rows x {seq_len:,} positions", flags, dev)


def check_model_fits(config, flag: str, dtype_bytes: int = 4, device: str = "cpu") -> None:
    """Refuse building a model (``config``, chosen by ``flag``) whose weights alone exceed free memory."""
    from nanoseek.model.registry import count_params

    n = count_params(config).total
    check_fits(n * dtype_bytes, f"a model of {n:,} parameters", flag, device)


def check_checkpoint_fits(directory) -> None:
    """Refuse loading a checkpoint whose config.json asks for more weights than free memory holds
    (before its weights are read: the kernel would kill the process without a word). A config.json
    that does not read is left to the loader, which words that error."""
    from pathlib import Path

    from nanoseek.errors import UserError
    from nanoseek.model.registry import config_from_json

    path = Path(directory) / "config.json"
    try:
        config = config_from_json(path)
    except (UserError, OSError, ValueError):
        return
    check_model_fits(config, str(path))


# ---------------------------------------------------------------------------- text input
def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text, or :class:`LimitError` naming ``source`` and the first bad byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LimitError(f"{source}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset "
                         f"{e.start}); convert it to UTF-8 first, e.g. with iconv") from None


def read_text(path, flag: str = "") -> str:
    """A whole text file, strictly UTF-8; missing/unreadable files and bad bytes are one-line errors."""
    name = f"{flag} {path}" if flag else str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except IsADirectoryError:
        raise LimitError(f"{name}: is a directory, expected a file") from None
    except OSError as e:
        raise LimitError(f"{name}: cannot read ({e.strerror})") from None
    return decode_utf8(data, name)


def read_stdin_text(stream=None) -> str:
    """All of stdin, strictly UTF-8 (the error names <stdin> and the byte offset)."""
    import sys

    stream = stream if stream is not None else sys.stdin
    buf = getattr(stream, "buffer", None)
    if buf is None:                  # a text stream without bytes underneath (tests' StringIO)
        return stream.read()
    return decode_utf8(buf.read(), "<stdin>")


__all__ = ["LimitError", "check_number", "int_range", "float_range", "positive_int", "nonneg_int", "seed", "port",
           "prob", "open_prob", "positive_float", "nonneg_float", "temperature", "TEMPERATURE_MAX", "threads", "seconds", "SEED_MAX",
           "available_memory_bytes", "check_fits", "check_model_fits", "check_checkpoint_fits", "kv_cache_bytes", "check_kv_cache", "decode_utf8",
           "read_text",
           "read_stdin_text"]
