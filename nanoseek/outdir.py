"""Output folders are sacred: how every command that writes a folder claims it, locks it and replaces in it.

Every command that leaves a folder behind (``demo``, ``pretrain``, ``sft``/``dpo``/``grpo``/
``distill``, ``speedrun``, ``data prepare``, ``tokenizer train``, ``ablate``) opens it with
:func:`claim`, and the policy is the same everywhere:

* **Claim.** A missing or empty folder is taken. A non-empty folder is taken only if it is this
  command's own run: it holds the marker ``.nanoseek.lock`` whose JSON names the command, or, for
  folders made before the marker existed, the command's own record, parsed and checked (``own``:
  a speedrun's ``run.json``, a data manifest's format fields, a pretrain ``config.toml`` that
  loads as a nanoseek config, a stage's ``stage.json``); a file that merely has such a name is
  not a claim. These records and the marker are read by :func:`nanoseek.atomic.read_record`
  (a regular file of at most 1 MiB, never through a link), so a FIFO, ``/dev/zero`` or a huge
  file there is "not ours" at once, and a marker of that kind is a one-line refusal naming it.
  A command never takes another command's run. Anything else is refused with one
  line naming the folder and the flag to use (another ``--out``, or ``--overwrite`` where the
  command has it, naming which of the folder's files ``--overwrite`` would replace). A refused claim creates nothing: no folder, no marker (a path that climbs out
  of a missing folder, ``missing/../x``, is refused before anything is made).
* **Marker.** The marker is written once the claim holds the lock. A command that then fails
  before writing anything else leaves the folder exactly as it found it: the marker is removed
  (or the previous one put back) and the folders the claim made are removed again.
* **Lock.** The claim holds an exclusive ``flock`` on the folder itself (an fd of the
  directory), not on the marker file, so deleting ``.nanoseek.lock`` cannot release it; the
  kernel releases it when the process exits or dies, so a crash never leaves a stale lock.
  A second process claiming the same folder gets one line saying which process holds it. When
  the claimed folder itself is replaced (:func:`nanoseek.atomic.replace_dir`), the new folder is
  locked before the swap (:mod:`nanoseek.claims`, below both modules, keeps the claims held).
  Claims nest within one process (the speedrun claims its folder, then each stage its
  sub-folder; a repeated claim of a folder this process holds is a no-op). A
  sub-folder of a folder this process holds counts as own: the command that claimed the parent
  laid it out (an ablation writes each arm's ``arm.json`` before its pre-training run claims the
  folder). A folder inside a run folder that another live process holds is refused too.
* **Replace.** A command never deletes or overwrites a file it did not write. Replacing a result
  (``--overwrite``, saving over an existing ``final/``) builds the new result beside the target
  and swaps it in with :func:`nanoseek.atomic.replace_dir` only after every input was read and
  every check passed, so a failure leaves the old result intact; the swap replaces exactly the
  files written now (and stale weight shards of the old result), keeping every other file and
  the permission modes. A claim first puts back an old result that a kill mid-swap left hidden.

Deliberately left out: locks across machines (``flock`` on NFS is best effort), guarding
against another program (not nanoseek) writing into a claimed folder or removing the whole
folder (a folder deleted and re-made is a new folder, claimable again), and undoing the marker
of a process killed (SIGKILL) before it wrote anything (it names that command until the next
claim). A kill inside :func:`nanoseek.atomic.replace_dir`, after the swap and before its
clean-up, can leave a sub-folder the user had put in the old result in the hidden old copy next
to it (never deleted).
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

from nanoseek.claims import HELD
from nanoseek.errors import UserError

LOCK_NAME = ".nanoseek.lock"



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
    from nanoseek.atomic import read_record

    try:
        data = json.loads(read_record(Path(path) / LOCK_NAME))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:3])
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def check_claimable(path: str | Path, command: str, *, flag: str, own: Callable[[Path], bool] | None = None,
                    overwrite: bool = False, overwrite_flag: str | None = None,
                    replaces: Callable[[str], bool] | None = None) -> bool:
    """Raise :class:`OutputDirError` unless :func:`claim` would take ``path``; True if it is an own run.

    Has no side effects, so a command can check its folder before doing anything slow. ``replaces``
    names the files the command writes (what ``overwrite_flag`` would replace): the refusal lists
    exactly those of the folder's files, so the user knows what the flag costs before passing it.
    """
    path = Path(path)
    _check_path(path, flag)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; choose another {flag}")
    entries = visible_entries(path)
    _check_marker(path, flag)
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
        if replaces is None:
            cost = f"{overwrite_flag} replaces only the files nanoseek {command} writes"
        else:
            hit = [n for n in entries if replaces(n) and not (path / n).is_dir()]
            named = ", ".join(hit[:10]) + (f" and {len(hit) - 10} more of its files" if len(hit) > 10 else "")
            cost = (f"{overwrite_flag} replaces {named} here; other files are kept" if hit else
                    f"{overwrite_flag} replaces none of the files here")
        hint = f"pass {overwrite_flag} to write into it ({cost}), or " + hint
    if owner and owner.get("command"):
        raise OutputDirError(f"{path} belongs to nanoseek {owner['command']} ({_describe(entries)}), not to "
                             f"nanoseek {command}: {hint}")
    raise OutputDirError(f"{path} is not empty ({_describe(entries)}) and was not made by nanoseek {command}: {hint}")


@contextlib.contextmanager
def claim(path: str | Path, command: str, *, flag: str, own: Callable[[Path], bool] | None = None,
          overwrite: bool = False, overwrite_flag: str | None = None, lock: bool = True,
          replaces: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Claim the output folder ``path`` for ``command`` and hold its lock until the block ends.

    ``flag`` names the option that chose the folder (for the messages); ``own(path)`` recognises
    a run of this command made before the marker existed; ``overwrite`` (the user passed
    ``overwrite_flag``) allows a non-empty folder that is not this command's; ``lock=False`` neither
    checks nor locks (the non-zero ranks under torchrun: rank 0 checks and holds the folder).
    """
    from nanoseek.atomic import recover, write_atomic

    path = Path(path)
    if not lock:                              # rank 0 checks and holds the folder for every rank
        yield path
        return
    _check_path(path, flag)
    if path.parent.is_dir() and not path.exists():
        recover(path.parent, only=path.name)  # a replace killed mid-swap hid the old folder
    key = os.path.realpath(path)
    if key not in HELD and path.is_dir():    # another live holder: say "in use", whatever the folder holds
        with contextlib.suppress(OSError):
            os.close(_lock(path, flag, shared=True))
    check_claimable(path, command, flag=flag, own=own, overwrite=overwrite, overwrite_flag=overwrite_flag,
                    replaces=replaces)
    if key in HELD:                          # this process holds it already (a nested stage)
        HELD[key][1] += 1
        try:
            yield path
        finally:
            HELD[key][1] -= 1
        return
    _check_ancestors(Path(key), flag)
    made = _missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, flag)
    except OutputDirError:                    # in use: the folder is the holder's, perhaps made since we looked
        raise
    except OSError as e:
        _tidy(made)
        raise OutputDirError(f"{path}: cannot lock the folder ({e.strerror or e}); choose another {flag}") from None
    except BaseException:
        _tidy(made)
        raise
    HELD[key] = [fd, 1]
    try:
        try:                                  # re-check under the lock: a finished writer may have filled it
            is_own = check_claimable(path, command, flag=flag, own=own, overwrite=overwrite,
                                     overwrite_flag=overwrite_flag, replaces=replaces)
        except OutputDirError:
            _tidy(made)
            raise
        recover(path)
        marker_path = path / LOCK_NAME
        try:
            before_marker = marker_path.read_bytes()
        except OSError:
            before_marker = None
        previous = read_owner(path) or {}
        marker = {"command": previous.get("command", command) if is_own else command, "pid": os.getpid(),
                  "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            write_atomic(marker_path, json.dumps(marker) + "\n")
        except OSError as e:
            _tidy(made)
            raise OutputDirError(f"{path}: cannot write into the folder ({e.strerror or e}); "
                                 f"choose another {flag}") from None
        before = _snapshot(path)
        try:
            yield path
        except BaseException:
            if _snapshot(path) == before:     # failed before writing anything: leave the folder as found
                with contextlib.suppress(OSError):
                    if before_marker is None:
                        marker_path.unlink()
                    else:
                        write_atomic(marker_path, before_marker)
                _tidy(made)
            raise
    finally:
        os.close(HELD.pop(key)[0])           # releases the lock


def _check_marker(path: Path, flag: str) -> None:
    """Refuse a folder whose ``.nanoseek.lock`` is a link, FIFO, device or huge file: nanoseek never
    wrote it, and reading it could hang or exhaust memory (:func:`nanoseek.atomic.read_record`)."""
    from nanoseek.atomic import RecordError, read_record

    try:
        read_record(path / LOCK_NAME)
    except RecordError as e:
        raise OutputDirError(str(e).replace("choose another folder", f"choose another {flag}")) from None
    except (OSError, ValueError):
        pass                                  # missing, unreadable or not JSON: read_owner says None


def _check_path(path: Path, flag: str) -> None:
    """Refuse a path that climbs out of a missing folder (``missing/../x``): the kernel cannot
    resolve it, and making ``missing`` to get there would create a folder nobody asked for."""
    for i, part in enumerate(path.parts):
        if part == ".." and not Path(*path.parts[:i] or ".").is_dir():
            raise OutputDirError(f"{path}: {Path(*path.parts[:i])} is not an existing folder, so '..' after it "
                                 f"does not lead anywhere; choose another {flag}")


def _missing_dirs(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    out = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _snapshot(path: Path) -> list[tuple]:
    """What a command writing into ``path`` changes: every folder's entries and mtime, every file's size and mtime."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for n in [root, *(os.path.join(root, f) for f in sorted(files) if f != LOCK_NAME or root != str(path))]:
            try:
                st = os.lstat(n)
            except OSError:
                continue
            out.append((n, st.st_ino, st.st_size, st.st_mtime_ns if n != root else None))
        out.append((root, tuple(sorted(set(dirs) | set(files)) )))
    return out


def _lock(path: Path, flag: str, shared: bool = False) -> int:
    """An fd of the folder ``path`` itself (the folder now at that path) holding an exclusive flock.

    The lock is the folder's own inode, so deleting ``.nanoseek.lock`` (only the ownership
    record) cannot release it; a folder removed and re-made while we waited is taken anew.
    ``shared`` takes a shared lock instead (a probe: refused the same way while another process holds it).
    """
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)                          # its holder swapped or removed it while we waited: take the new one


def _check_ancestors(real: Path, flag: str) -> None:
    """Refuse a folder inside a run folder another live process holds (a speedrun's stage folder)."""
    for parent in real.parents:               # every ancestor: its marker may have been deleted
        if str(parent) in HELD:
            continue
        try:
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
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


def _tidy(made: list[Path]) -> None:
    """Remove the folders a claim created (deepest first) while they are empty."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            return


def _inside_held(path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return any(str(parent) in HELD for parent in real.parents)


def adopt(path: str | Path) -> None:
    """In a worker process of a command that holds ``path`` (``nanoseek ablate --jobs``): count the
    parent's claim as this process's, so the folders the worker fills inside it are the command's own.
    The lock stays with the parent; refused when nobody holds the folder."""
    key = os.path.realpath(path)
    if key in HELD:
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:                           # held (by the parent that started this worker): adopt it
        HELD[key] = [fd, 1]
        return
    os.close(fd)
    raise OutputDirError(f"{path}: not claimed by the process that started this worker")


def holds(path: str | Path) -> bool:
    """Whether this process holds the claim on ``path``."""
    return os.path.realpath(path) in HELD


__all__ = ["LOCK_NAME", "OutputDirError", "claim", "check_claimable", "visible_entries", "read_owner", "holds",
           "adopt"]
