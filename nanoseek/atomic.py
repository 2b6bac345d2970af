"""Atomic file writes: the one helper every module that leaves a file behind uses.

A reader (a resumed run, ``nanoseek watch``, a browser refreshing the report) sees either the
old file or the new one, never half of one: the data goes to a hidden temporary file next to the
target (same filesystem), is flushed and fsynced, and then replaces the target in one
``os.replace``. A crash leaves at most a stray ``.NAME.tmp-PID`` file that nothing reads.
Checkpoint directories, which are many files, use the same idea at directory level in
:mod:`nanoseek.train.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["write_atomic"]
