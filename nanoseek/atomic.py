"""Atomic file writes: the one helper every module that leaves a file behind uses.

A reader (a resumed run, ``nanoseek watch``, a browser refreshing the report) sees either the
old file or the new one, never half of one: the data goes to a hidden temporary file next to the
target (same filesystem), is flushed and fsynced, and then replaces the target in one
``os.replace``. A crash leaves at most a stray ``.NAME.tmp-PID`` file that nothing reads.
:func:`atomic_path` gives the same to a writer that needs a file name (a GGUF export).

A result that is a folder of files (an HF model directory, a tokenizer) is built in a hidden
folder next to the target and swapped in by :func:`replace_dir`. The swap replaces exactly the
files the writer wrote now, plus the ``stale`` names of its kind the new result no longer has
(the shards and index of an older save, which would corrupt loading); every other file and
folder of the old one stays (files are hard-linked into the new folder before the swap, folders
moved after it), and the folder's and files' permission modes are kept. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``: at every moment the target holds the whole old result or the
whole new one. Where the kernel or filesystem lacks it, the old folder is renamed aside to
``.NAME.old-PID-NS`` and the new one into place; a kill between the two renames leaves the old
result hidden, and :func:`recover` (run by every claim of :mod:`nanoseek.outdir`) puts it back.
Training checkpoints, which are many files, use the same idea in :mod:`nanoseek.train.checkpoint`.

A file a command writes in its run folder is never written *through*: ``os.replace`` replaces a
symbolic link the user put there (it never follows it), and the append-only logs
(``metrics.jsonl``, ``samples.jsonl``) are opened by :func:`open_append` with ``O_NOFOLLOW``, so a
link, FIFO or device file there is one :class:`RecordError` line naming the file. The small
records a claim reads to decide whose folder it is (``.nanoseek.lock``, ``run.json``,
``stage.json``, ``manifest.json``, ``config.toml``, ``plan.json``) are read by
:func:`read_record`: a regular file of at most :data:`RECORD_LIMIT` bytes, opened without following
a link and without blocking, so a FIFO or ``/dev/zero`` there neither hangs nor exhausts memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from nanoseek import claims
from nanoseek.errors import UserError

_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)-\d+$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


RECORD_LIMIT = 1 << 20                # the largest record file read_record reads (1 MiB)


class RecordError(UserError, ValueError):
    """A record or log file in a run folder is a link, not a regular file, or too large (the message names it).

    A ``ValueError``, so the checks that read a record treat it as "not nanoseek's"; a ``UserError``,
    so one that reaches the CLI is one line."""


def _regular(fd: int, path: Path, limit: int | None) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RecordError(f"{path}: not a regular file (a FIFO, device or folder); nanoseek reads and writes only "
                          "regular files there: move it away or choose another folder")
    if limit is not None and st.st_size > limit:
        raise RecordError(f"{path}: {st.st_size} bytes, larger than any record nanoseek writes ({limit} bytes); "
                          "move it away or choose another folder")


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RecordError(f"{path}: is a symbolic link; nanoseek never reads or writes its run files through a "
                              "link: move it away or choose another folder") from None
        if e.errno == errno.ENXIO:        # a FIFO opened for writing with no reader
            raise RecordError(f"{path}: not a regular file (a FIFO or socket); move it away or choose another "
                              "folder") from None
        raise


def read_record(path: str | Path, limit: int = RECORD_LIMIT) -> str:
    """The UTF-8 text of the small record file ``path``, never following a link or blocking.

    Raises :class:`RecordError` (naming the file) for a symbolic link, a FIFO, device or folder, or
    a file over ``limit`` bytes; ``FileNotFoundError`` when it is missing; ``UnicodeDecodeError``
    (a ``ValueError``) for bytes that are not UTF-8."""
    path = Path(path)
    fd = _open_nofollow(path, os.O_RDONLY)
    try:
        _regular(fd, path, limit)
        chunks, size = [], 0
        while size <= limit:
            b = os.read(fd, min(1 << 16, limit + 1 - size))
            if not b:
                break
            chunks.append(b)
            size += len(b)
        if size > limit:
            raise RecordError(f"{path}: larger than any record nanoseek writes ({limit} bytes); move it away or "
                              "choose another folder")
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def open_append(path: str | Path):
    """``path`` opened for appending text (UTF-8), created if missing; a symbolic link, FIFO or
    device there is a :class:`RecordError` naming the file (never appended through)."""
    path = Path(path)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        _regular(fd, path, None)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class ReplaceRefused(ValueError):
    """A folder cannot be replaced: it is not a folder, or a name the writer writes is a sub-folder there."""


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


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """For a writer that needs a file name (a large binary written piece by piece): yields the
    hidden temporary path next to ``path``; on a clean exit it is fsynced and replaces ``path`` in
    one ``os.replace`` (a link at ``path`` is replaced, not followed), on an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_folder(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def check_replaceable(directory: str | Path, owned: Callable[[str], bool],
                      what: str = "the files nanoseek writes there") -> None:
    """Raise :class:`ReplaceRefused` if ``directory`` exists and is not a folder, or if a name
    ``owned`` claims (one the writer may write or remove) is a sub-folder there: replacing it
    would delete a folder the writer never wrote."""
    directory = Path(directory)
    if directory.exists() and not _is_folder(directory):
        raise ReplaceRefused(f"{directory}: exists and is not a folder")
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    clash = sorted(n for n in names if owned(n) and _is_folder(directory / n))
    if clash:
        raise ReplaceRefused(f"{directory}: {', '.join(clash[:5])} is a folder where nanoseek writes one of "
                             f"{what}; nanoseek never deletes files it did not write: move it away or write "
                             "somewhere else")


def _umask() -> int:
    """The process umask (from /proc where it can be read without changing it, which races threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(src: str | Path, dst: str | Path, stale: Callable[[str], bool] = lambda n: False,
                what: str = "the files nanoseek writes there") -> Path:
    """Make the finished folder ``src`` appear at ``dst``, keeping what the writer does not write.

    The new ``dst`` holds the files of ``src``, plus every entry of the old ``dst`` except those
    ``src`` replaces and those ``stale`` names (files of this kind the new result no longer has).
    A missing ``dst`` is simply renamed into place. Refused (:class:`ReplaceRefused`, before
    anything moves) when ``dst`` is not a folder or a name to replace or remove is a sub-folder.
    Folder and file modes of the old ``dst`` are kept; new ones get the umask's default.
    A claim of :mod:`nanoseek.outdir` held on ``dst`` stays held across the swap.
    """
    src, dst = Path(src), Path(dst)
    written = set(os.listdir(src))
    check_replaceable(dst, lambda n: n in written or stale(n), what)
    mask = _umask()
    exists = _is_folder(dst)
    for name in written:
        p = src / name
        if p.is_symlink() or not p.is_file():
            continue
        old = dst / name
        mode = stat.S_IMODE(old.stat().st_mode) if exists and old.is_file() and not old.is_symlink() else 0o666 & ~mask
        os.chmod(p, mode)
    os.chmod(src, stat.S_IMODE(dst.stat().st_mode) if exists else 0o777 & ~mask)
    if not exists:
        os.replace(src, dst)
        return dst
    for name in os.listdir(dst):                  # keep what the writer does not write (folders: after the swap)
        if name in written or stale(name) or _is_folder(dst / name):
            continue
        try:
            os.link(dst / name, src / name, follow_symlinks=False)
        except OSError:
            shutil.copy2(dst / name, src / name, follow_symlinks=False)
    handover = claims.handover_prepare(dst, src)
    try:
        if _exchange(src, dst):
            old = src
        else:
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(dst, old)
            try:
                os.replace(src, dst)
            except BaseException:
                os.replace(old, dst)
                raise
    except BaseException:
        claims.handover_abort(handover)
        raise
    claims.handover_complete(dst, handover)
    for name in os.listdir(old):                  # folders kept, and files that appeared during the swap
        if name in written or stale(name):
            continue
        if not (dst / name).exists() and not (dst / name).is_symlink():
            os.replace(old / name, dst / name)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(directory: str | Path, only: str | None = None) -> list[str]:
    """Put back every ``.NAME.old-PID-NS`` in ``directory`` whose ``NAME`` is missing and whose
    writer is dead (a kill between the two renames of :func:`replace_dir`'s fallback), or only
    ``.ONLY.old-*``; the names restored."""
    restored = []
    try:
        names = os.listdir(directory)
    except OSError:
        return restored
    for n in sorted(names):
        m = _OLD_RE.match(n)
        if not m or (only is not None and m["name"] != only) or _alive(int(m["pid"])):
            continue
        target = Path(directory) / m["name"]
        if target.exists() or target.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.rename(Path(directory) / n, target)
            restored.append(m["name"])
    return restored


__all__ = ["write_atomic", "atomic_path", "read_record", "open_append", "RecordError", "RECORD_LIMIT", "replace_dir", "check_replaceable", "recover", "ReplaceRefused"]
