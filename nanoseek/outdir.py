"""Output folders are sacred: how every command that writes a folder claims it, locks it and replaces in it.

Every command that leaves a folder behind (``demo``, ``pretrain``, ``sft``/``dpo``/``grpo``/
``distill``, ``speedrun``, ``data prepare``, ``tokenizer train``, ``ablate``) opens it with
:func:`claim`, and the policy is the same everywhere:

* **Claim.** A missing or empty folder is taken. A non-empty folder is taken only if it is this
  command's own run: it holds the lock file ``.nanoseek.lock`` whose JSON names the command (the
  marker is written by the first claim and kept), or, for folders made before the marker existed,
  the command's own files (``own``: e.g. a pretrain run's ``config.toml`` + ``checkpoints/``).
  Anything else is refused with one line naming the folder and the flag to use (another
  ``--out``, or ``--overwrite`` where the command has it). Nothing is created in a folder that is
  refused.
* **Lock.** The claim holds an exclusive ``flock`` on ``.nanoseek.lock`` while the command runs;
  the kernel releases it when the process exits or dies, so a crash never leaves a stale lock.
  A second process claiming the same folder gets one line saying which process holds it. Claims
  nest within one process (the speedrun claims its folder, then each stage its sub-folder; a
  repeated claim of a folder this process holds is a no-op). A sub-folder of a folder this
  process holds counts as own: the command that claimed the parent laid it out (an ablation
  writes each arm's ``arm.json`` before its pre-training run claims the folder). A folder inside
  a run folder that another live process holds is refused too.
* **Replace.** A command never deletes or overwrites a file it did not write. Replacing a result
  (``--overwrite``, saving over an existing ``final/``) builds the new result beside the target
  and swaps it in with :func:`nanoseek.atomic.replace_dir` only after every input was read and
  every check passed, so a failure leaves the old result intact; a folder that also holds files
  the command does not write is refused, never cleaned.

Deliberately left out: locks across machines (``flock`` on NFS is best effort), and guarding
against another program (not nanoseek) writing into a claimed folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from nanoseek.cli import UserError

LOCK_NAME = ".nanoseek.lock"

# realpath -> [fd, depth] of the claims this process holds
_HELD: dict[str, list[int]] = {}


class OutputDirError(UserError):
    """An output folder cannot be claimed: not this command's, or in use by another process."""


def visible_entries(path: str | Path) -> list[str]:
    """Names in ``path`` other than the lock file (sorted; [] for a missing folder)."""
    try:
        return sorted(n for n in os.listdir(path) if n != LOCK_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_owner(path: str | Path) -> dict | None:
    """The marker in ``path/.nanoseek.lock`` ({"command", "pid", "started", "host"}) or None."""
    try:
        data = json.loads((Path(path) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:3])
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def check_claimable(path: str | Path, command: str, *, flag: str, own: Callable[[Path], bool] | None = None,
                    overwrite: bool = False, overwrite_flag: str | None = None) -> bool:
    """Raise :class:`OutputDirError` unless :func:`claim` would take ``path``; True if it is an own run.

    Has no side effects, so a command can check its folder before doing anything slow.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; choose another {flag}")
    entries = visible_entries(path)
    owner = read_owner(path)
    if owner is not None and owner.get("command") == command:
        return True
    if not entries:
        return False
    if _inside_held(path):
        return True                           # the command holding a parent folder laid this one out
    if owner is None and own is not None and own(path):
        return True
    if overwrite:
        return False
    hint = f"choose another {flag}"
    if overwrite_flag:
        hint = f"pass {overwrite_flag} to write into it (nanoseek replaces only its own files), or " + hint
    if owner and owner.get("command"):
        raise OutputDirError(f"{path} belongs to nanoseek {owner['command']} ({_describe(entries)}), not to "
                             f"nanoseek {command}: {hint}")
    raise OutputDirError(f"{path} is not empty ({_describe(entries)}) and was not made by nanoseek {command}: {hint}")


@contextlib.contextmanager
def claim(path: str | Path, command: str, *, flag: str, own: Callable[[Path], bool] | None = None,
          overwrite: bool = False, overwrite_flag: str | None = None, lock: bool = True) -> Iterator[Path]:
    """Claim the output folder ``path`` for ``command`` and hold its lock until the block ends.

    ``flag`` names the option that chose the folder (for the messages); ``own(path)`` recognises
    a run of this command made before the marker existed; ``overwrite`` (the user passed
    ``overwrite_flag``) allows a non-empty folder that is not this command's; ``lock=False`` neither
    checks nor locks (the non-zero ranks under torchrun: rank 0 checks and holds the folder).
    """
    path = Path(path)
    if not lock:                              # rank 0 checks and holds the folder for every rank
        yield path
        return
    check_claimable(path, command, flag=flag, own=own, overwrite=overwrite, overwrite_flag=overwrite_flag)
    key = os.path.realpath(path)
    if key in _HELD:                          # this process holds it already (a nested stage)
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    _check_ancestors(Path(key), flag)
    made_dir = not path.exists()
    lock_path = path / LOCK_NAME
    made_lock = not lock_path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock_path, path, flag)
    except OSError as e:
        _tidy(path, made_dir, False)
        raise OutputDirError(f"{path}: cannot lock the folder ({e.strerror or e}); choose another {flag}") from None
    except BaseException:
        _tidy(path, made_dir, False)
        raise
    try:
        try:                                  # re-check under the lock: a finished writer may have filled it
            is_own = check_claimable(path, command, flag=flag, own=own, overwrite=overwrite,
                                     overwrite_flag=overwrite_flag)
        except OutputDirError:
            _tidy(path, made_dir, made_lock)
            raise
        previous = read_owner(path) or {}
        marker = {"command": previous.get("command", command) if is_own else command, "pid": os.getpid(),
                  "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(marker) + "\n").encode(), 0)
        _HELD[key] = [fd, 1]
        try:
            yield path
        except BaseException:
            _tidy(path, made_dir, made_lock)  # a command that failed before writing anything leaves nothing
            raise
        finally:
            del _HELD[key]
    finally:
        os.close(fd)                          # releases the lock


def _lock(lock_path: Path, path: Path, flag: str) -> int:
    """An fd holding an exclusive flock on ``lock_path`` (the file now at that path, not an unlinked one)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = read_owner(path) or {}
            who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            what = f"nanoseek {holder['command']}" if holder.get("command") else "nanoseek"
            since = f", since {holder['started']}" if holder.get("started") else ""
            raise OutputDirError(f"{path} is in use by another process ({what}, {who}{since}); wait for it to "
                                 f"finish or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)                          # its holder removed it while we waited: take the new one


def _check_ancestors(real: Path, flag: str) -> None:
    """Refuse a folder inside a run folder another live process holds (a speedrun's stage folder)."""
    for parent in real.parents:
        lock_path = parent / LOCK_NAME
        if str(parent) in _HELD or not lock_path.is_file():
            continue
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = read_owner(parent) or {}
            what = f"nanoseek {holder['command']}" if holder.get("command") else "nanoseek"
            raise OutputDirError(f"{real} is inside {parent}, which is in use by another process ({what}, pid "
                                 f"{holder.get('pid', '?')}); wait for it to finish or choose another {flag}") from None
        finally:
            os.close(fd)


def _tidy(path: Path, made_dir: bool, made_lock: bool) -> None:
    """Undo what a claim created when nothing else was written: its lock file, then its folder."""
    if visible_entries(path):
        return
    with contextlib.suppress(OSError):
        if made_lock:
            (path / LOCK_NAME).unlink(missing_ok=True)
        if made_dir:
            path.rmdir()


def _inside_held(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return any(str(parent) in _HELD for parent in real.parents)


def holds(path: str | Path) -> bool:
    """Whether this process holds the claim on ``path``."""
    return os.path.realpath(path) in _HELD


__all__ = ["LOCK_NAME", "OutputDirError", "claim", "check_claimable", "visible_entries", "read_owner", "holds"]
