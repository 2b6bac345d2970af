"""Atomic file writes: the one helper every module that leaves a file behind uses.

A reader (a resumed run, ``nanoseek watch``, a browser refreshing the report) sees either the
old file or the new one, never half of one: the data goes to a hidden temporary file next to the
target (same filesystem), is flushed and fsynced, and then replaces the target in one
``os.replace``. A crash leaves at most a stray ``.NAME.tmp-PID`` file that nothing reads.

A result that is a folder of files (an HF model directory, a tokenizer) is built in a hidden
folder next to the target and swapped in by :func:`replace_dir`, which refuses to replace a
folder holding anything its writer does not write: it never deletes a user's file (the policy
for output folders is in :mod:`nanoseek.outdir`). Training checkpoints, which are many files,
use the same idea in :mod:`nanoseek.train.checkpoint`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# files replace_dir carries from the old folder into the new one (the output folder's lock:
# moving it keeps the inode, so the lock its holder has stays held)
CARRIED = (".nanoseek.lock",)


class ReplaceRefused(ValueError):
    """A folder cannot be replaced: it holds files the writer did not write (or is not a folder)."""


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


def foreign_entries(directory: str | Path, owned: Callable[[str], bool]) -> list[str]:
    """Names in ``directory`` that ``owned`` does not claim (the carried lock file aside).

    A sub-folder is foreign even under an owned name: the writers write files only.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    directory = Path(directory)

    def is_folder(n: str) -> bool:
        return (directory / n).is_dir() and not (directory / n).is_symlink()

    return sorted(n for n in names if n not in CARRIED and (not owned(n) or is_folder(n)))


def check_replaceable(directory: str | Path, owned: Callable[[str], bool],
                      what: str = "the files nanoseek writes there") -> None:
    """Raise :class:`ReplaceRefused` if ``directory`` exists and is not a folder of only owned names."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ReplaceRefused(f"{directory}: exists and is not a folder")
    foreign = foreign_entries(directory, owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ReplaceRefused(f"{directory} holds files other than {what} ({shown}); nanoseek never deletes "
                             "files it did not write: move them away or write somewhere else")


def replace_dir(src: str | Path, dst: str | Path, owned: Callable[[str], bool],
                what: str = "the files nanoseek writes there",
                carry: Iterable[str] = CARRIED) -> Path:
    """Make the finished folder ``src`` appear at ``dst`` in one rename; returns ``dst``.

    A missing or empty ``dst`` is simply replaced. An existing ``dst`` is replaced only when every
    name in it is ``owned`` (files this kind of writer writes) and is otherwise refused with
    :class:`ReplaceRefused` before anything moves. The lock file is carried over. The old folder
    is renamed aside, ``src`` renamed into place, and the old one removed; a file that appeared
    in the old folder during the swap is moved into the new one, not deleted.
    """
    src, dst = Path(src), Path(dst)
    check_replaceable(dst, owned, what)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    for name in carry:
        if (dst / name).exists() and not (src / name).exists():
            os.replace(dst / name, src / name)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        for name in carry:
            if (src / name).exists() and not (dst / name).exists():
                os.replace(src / name, dst / name)
        raise
    for name in os.listdir(old):              # written by someone else while we swapped: keep it
        if name in carry or not owned(name) or ((old / name).is_dir() and not (old / name).is_symlink()):
            if not (dst / name).exists():
                os.replace(old / name, dst / name)
    shutil.rmtree(old, ignore_errors=True)
    return dst


__all__ = ["write_atomic", "replace_dir", "check_replaceable", "foreign_entries", "ReplaceRefused", "CARRIED"]
