"""Sandbox for untrusted model-written Python: the only place such code runs.

Code rewards (GRPO on programming problems) execute whatever the policy writes, so a run must
survive infinite loops, fork bombs, memory hogs, disk fillers, secret snooping and network use.
:func:`run_code` runs the code in a child process built in layers:

1. A trusted *launcher* (``python -I -S -c LAUNCHER``, started with ``start_new_session`` so the
   child leads its own process group, an explicit minimal environment and ``close_fds``) sets
   the resource limits ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (largest file),
   ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_NOFILE``, ``RLIMIT_MSGQUEUE=0`` and ``RLIMIT_CORE=0``,
   lowers its priority (nice 10), detaches from the network with ``unshare(CLONE_NEWNET)`` (a
   fresh network namespace with no interfaces up, not even loopback), then drops root and execs.
2. Root ignores ``RLIMIT_NPROC`` and can read everyone's ``/proc/PID/environ``, so when we run as
   root (as on the dev and CI machines) the child runs under a *fresh, unused uid* picked per run
   (no supplementary groups). The kernel then caps that uid's process count, the child cannot
   signal or inspect our processes, and on exit or timeout a helper running as that uid sends
   ``kill(-1, SIGKILL)``, which kills every process of the uid atomically, including ones that
   left the process group with ``setsid``. ``/proc`` is then scanned to confirm none is left.
3. **Filesystem boundary** (bubblewrap, ``bwrap``; Debian package ``bubblewrap``, installed by
   ``make install-sandbox``). The launcher execs ``bwrap`` as the sandbox uid, which builds an
   empty root with: read-only binds of only the interpreter, its standard library and the shared
   libraries they load (found with ``ldd``), nothing else from the host (no ``/etc``, ``/home``,
   ``/root``, repository or data); a fresh ``/proc`` for a new pid namespace (only the sandbox's
   own processes); a minimal ``/dev`` (null, zero, full, random, urandom, tty, pts), remounted
   read-only; a private tmpfs ``/tmp`` as the work folder and a tmpfs ``/dev/shm``, together
   sized to ``memory_mb`` (so RAM-backed files cannot exceed the memory limit); the root itself
   read-only. ``--unshare-all`` gives new user, pid, network, ipc, uts and cgroup namespaces
   (abstract and path Unix sockets of the host are out of reach), ``--disable-userns`` forbids
   nested user namespaces, ``--die-with-parent`` and the pid namespace kill the whole tree when
   the sandbox's init dies, ``--new-session`` detaches the terminal. Everything the code writes
   lives in the tmpfs and vanishes with it.
4. **seccomp** (a small BPF filter built here, :func:`seccomp_filter`): the code cannot create
   namespaces (``unshare``, ``setns``, ``clone`` with ``CLONE_NEW*``; ``clone3`` answers
   ``ENOSYS`` so libc falls back to ``clone``), ``ptrace`` or read other processes' memory
   (``process_vm_*``, ``pidfd_getfd``), use SysV IPC, ``memfd_create`` or POSIX message queues
   (RAM the limits above would not see), ``mount``, ``bpf``, ``perf_event_open``, ``userfaultfd``,
   ``io_uring``, keyrings or ``open_by_handle_at``. Foreign syscall ABIs (i386, x32) kill the
   process. Loaded by bwrap (``--seccomp``) or, without bwrap, by the launcher (x86_64, aarch64).
5. The interpreter runs ``-I -S -B``: no ``PYTHON*`` variables, no site-packages (stdlib only), no
   bytecode writes; stdin comes from a file. Unless ``block_sockets=False`` a prelude also
   replaces the ``socket`` constructors with ones that raise (defence in depth only: code can
   re-import the C module; the namespaces above are the boundary).
6. A wall-clock timeout kills everything; stdout and stderr are read concurrently with a byte
   cap each (the rest is drained and dropped, and the result says it was truncated).

Without bwrap (not installed, user namespaces forbidden, or ``NANOSEEK_SANDBOX_BWRAP=0``) the
sandbox warns once and :func:`sandbox_capabilities` lists in ``not_contained`` what is then not
contained: the code can read every world-readable file (the repository, ``/etc/passwd``, other
processes' command lines), write files in world-writable directories (swept from ``/tmp``,
``/var/tmp`` and ``/dev/shm`` after the run, each bounded by ``RLIMIT_FSIZE``, but RAM-backed
ones in ``/dev/shm`` are not bounded by ``memory_mb`` in total while it runs), and reach host
services through Unix-domain sockets. Namespaces, ptrace and SysV IPC stay blocked by seccomp.

Linux only (it reads /proc). Not root (a developer's own machine): no uid switch is possible, so
``RLIMIT_NPROC`` is set to the user's current process count plus ``max_processes`` and, without
bwrap, cleanup kills the process group only (a process that calls ``setsid`` can escape it); with
bwrap the pid namespace still takes every process down. :func:`sandbox_capabilities` reports
what is active on this machine and every :class:`SandboxResult` carries ``isolation`` saying what
applied to that run.

Not contained in any mode: kernel memory held in pipe and socket buffers (bounded by the per-uid
pipe limit and ``RLIMIT_NOFILE`` per process, not by ``memory_mb``) and in the tmpfs's inodes
(empty files; bwrap cannot cap their number, the timeout bounds it), CPU-cache and timing side
channels, and kernel bugs (this is a namespace sandbox, not a virtual machine).
"""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

SANDBOX_UID_RANGE = (3_000_000, 3_999_999)  # fresh uids for sandbox runs; nothing else uses them
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # swept for files the sandbox uid left

# Runs as the caller (root) in the new session, before the untrusted code; argv[1] is JSON config.
# Then it execs bwrap (which loads the seccomp filter from a pipe) or, without bwrap, loads the
# filter itself and execs the interpreter.
LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
status = os.fdopen(cfg["status_fd"], "w")
try:
    net = False
    if cfg["netns"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        net = libc.unshare(0x40000000) == 0  # CLONE_NEWNET
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.nice(cfg["nice"])
    os.umask(0o077)
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("uid switch did not take effect")
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("could regain root after dropping it")
    filt = bytes.fromhex(cfg["seccomp"] or "")
    argv, exe = cfg["argv"], cfg["python"]
    if cfg["bwrap"]:
        exe, prefix = cfg["bwrap"][0], cfg["bwrap"]
        if filt:
            r, w = os.pipe()
            os.write(w, filt)
            os.close(w)
            os.set_inheritable(r, True)
            prefix = [str(r) if a == "@SECCOMP_FD@" else a for a in prefix]
        argv = prefix + ["--"] + argv
    elif filt:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
        buf = ctypes.create_string_buffer(filt, len(filt))
        prog = Prog(len(filt) // 8, ctypes.cast(buf, ctypes.c_char_p))
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    status.write(json.dumps({"netns": net, "uid": os.getuid()}))
    status.close()
except BaseException as e:
    status.write(json.dumps({"error": repr(e)}))
    status.close()
    os._exit(126)
os.execve(exe, argv, cfg["env"])
"""

# Runs inside the sandbox before the user's program when block_sockets is on.
SOCKET_PRELUDE = r"""
import socket as _socket_mod, _socket as _csocket_mod
def _no_network(*args, **kwargs):
    raise PermissionError(1, "network access is disabled in the nanoseek sandbox")
def _guarded(base):
    # Still a class (ssl, asyncio and unittest.mock subclass it); only wrapping an existing
    # descriptor works, so socketpair() (asyncio's self-pipe) and fromfd() keep working.
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _no_network()
        base.__init__(self, family, type, proto, fileno)
    return type("socket", (base,), {"__init__": __init__, "__module__": base.__module__})
for _mod in (_socket_mod, _csocket_mod):
    _mod.socket = _guarded(_mod.socket)
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _no_network)
del _socket_mod, _csocket_mod, _mod, _name, _guarded
import runpy as _runpy, sys as _sys
_sys.argv = ["main.py"]
_runpy.run_path("main.py", run_name="__main__")
"""

KILL_ALL = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n"


BWRAP_ENV = "NANOSEEK_SANDBOX_BWRAP"  # "0": do not use bubblewrap (the weaker fallback, warned)
BWRAP_EXTRA_PROCS = 2  # bwrap's own monitor and the pid namespace's init count toward RLIMIT_NPROC
WORK_DIR = "/tmp"      # the code's working folder inside bwrap: a private tmpfs

# ----------------------------------------------------------------------------- seccomp

# Syscalls the code never needs, by (x86_64, aarch64) number: what could break out of or see past
# the namespaces, or hold RAM that RLIMIT_AS and the tmpfs sizes do not count.
_SECCOMP_DENY = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40),
    "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "fsopen": (430, 430),
    "fsmount": (432, 432), "open_tree": (428, 428), "move_mount": (429, 429),
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "memfd_create": (319, 279), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "syslog": (103, 116), "reboot": (169, 142),
}
_SECCOMP_ARCH = {"x86_64": (0, 0xC000003E, 56, 435), "aarch64": (1, 0xC00000B7, 220, 435)}
_CLONE_NEW_FLAGS = 0x7E020080  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET,TIME}


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The sandbox's seccomp-BPF program (``struct sock_filter[]``) for this machine, or None on an
    architecture without a table here. Denied calls fail with EPERM (``clone3``: ENOSYS, so libc
    falls back to ``clone``, whose flags are checked); another syscall ABI kills the process."""
    machine = machine or os.uname().machine
    if machine not in _SECCOMP_ARCH:
        return None
    col, audit_arch, clone_nr, clone3_nr = _SECCOMP_ARCH[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 syscalls (bit 30) would dodge the numbers below
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 4, clone_nr), (LD, 0, 0, 16), (JSET, 0, 1, _CLONE_NEW_FLAGS),
             (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    prog += [(JEQ, 0, 1, clone3_nr), (RET, 0, 0, ENOSYS)]
    for nrs in _SECCOMP_DENY.values():
        prog += [(JEQ, 0, 1, nrs[col]), (RET, 0, 0, EPERM)]
    prog.append((RET, 0, 0, ALLOW))
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


# ----------------------------------------------------------------------------- bubblewrap


def _bwrap_disabled() -> bool:
    return os.environ.get(BWRAP_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _bwrap_path() -> str | None:
    return None if _bwrap_disabled() else shutil.which("bwrap", path=SAFE_PATH)


def _canonical(path: str) -> str:
    """``path`` with its directory resolved (the file itself may stay a symlink)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def runtime_paths(python: str) -> list[str]:
    """The host paths the interpreter needs inside the sandbox: the binary, its standard library
    and lib-dynload, and every shared library these load (``ldd``). Without ``ldd``, the library
    folders of the interpreter's prefix are bound whole."""
    out = subprocess.run([python, "-I", "-S", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, timeout=30, env={"PATH": SAFE_PATH})
    if out.returncode != 0:
        raise SandboxError(f"{python} did not start: {out.stderr[-300:]}")
    stdlib = [os.path.realpath(p) for p in json.loads(out.stdout) if p and os.path.isdir(p)]
    paths = {os.path.realpath(python)} | set(stdlib)
    objects = [python] + [os.path.join(d, f) for d in stdlib if d.endswith("lib-dynload")
                          for f in sorted(os.listdir(d)) if f.endswith(".so")]
    ldd = shutil.which("ldd", path=SAFE_PATH)
    if ldd:
        r = subprocess.run([ldd, *objects], capture_output=True, text=True, timeout=60,
                           env={"PATH": SAFE_PATH, "LC_ALL": "C"})
        for line in r.stdout.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
            if lib.startswith("/") and os.path.exists(lib):
                paths.add(_canonical(lib))
    else:
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        paths |= {p for p in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64"), "/lib",
                              "/lib64") if os.path.isdir(p)}
    kept = sorted(paths)  # drop paths inside a bound folder
    return [p for p in kept if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in kept)]


def _root_symlinks() -> list[tuple[str, str]]:
    """Top-level symlinks of the host (merged /usr: /lib -> usr/lib), recreated so library paths
    resolve inside the sandbox as they do outside."""
    links = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        if os.path.islink(path):
            links.append((os.readlink(path), path))
    return links


def bwrap_args(bwrap: str, runtime: list[str], main_py: str, memory_mb: int,
               seccomp: bool) -> list[str]:
    """The bwrap command line up to (not including) ``--``; see the module docstring."""
    shm_mb = max(1, memory_mb // 4)
    tmp_mb = max(1, memory_mb - shm_mb)
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox", "--clearenv"]
    for p in runtime:
        args += ["--ro-bind", p, p]
    for target, link in _root_symlinks():
        if not any(p == link or p.startswith(link + "/") for p in runtime):
            args += ["--symlink", target, link]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(shm_mb << 20), "--tmpfs", "/dev/shm",
             "--perms", "0700", "--size", str(tmp_mb << 20), "--tmpfs", WORK_DIR,
             "--ro-bind", main_py, os.path.join(WORK_DIR, "main.py"),
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORK_DIR]
    for k, v in (("PATH", SAFE_PATH), ("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8"), ("HOME", WORK_DIR)):
        args += ["--setenv", k, v]
    if seccomp:
        args += ["--seccomp", "@SECCOMP_FD@"]
    return args


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (never raised for anything the code does)."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None   # negative: killed by that signal
    timed_out: bool          # the wall-clock timeout fired
    killed_reason: str | None  # "timeout" | "cpu_limit" | "memory_limit" | "file_size_limit" | "signal:NAME"
    wall_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    isolation: dict[str, Any] = field(default_factory=dict)  # uid, network, python, limits

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _is_root() -> bool:
    return os.geteuid() == 0


def _uids_of(pid: str) -> tuple[set[int], str] | None:
    """(real/effective/saved/fs uids, state letter) of a process from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uids: set[int] = set()
    state = ""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uids = {int(x) for x in line.split()[1:]}
        elif line.startswith("State:"):
            state = line.split()[1]
    return uids, state


def live_processes(uid: int | None = None, pgid: int | None = None) -> list[int]:
    """PIDs of non-zombie processes with that uid (real, effective or saved) or in that process
    group, read from /proc: how tests and cleanup confirm nothing outlived a run."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        info = _uids_of(pid)
        if info is None or info[1] in ("Z", "X"):
            continue
        if uid is not None and uid in info[0]:
            found.append(int(pid))
        elif pgid is not None:
            try:
                if os.getpgid(int(pid)) == pgid:
                    found.append(int(pid))
            except OSError:
                pass
    return found


def _world_accessible(path: str) -> bool:
    """Can a stranger uid execute ``path`` (every parent directory searchable by others)?"""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


_CAPS: dict[str, Any] | None = None
_CAPS_LOCK = threading.Lock()
_UID_LOCK = threading.Lock()
_UIDS_IN_USE: set[int] = set()


def _python_candidates() -> list[str]:
    cands = [getattr(sys, "_base_executable", "") or "", sys.executable, shutil.which("python3") or "",
             "/usr/bin/python3", "/usr/local/bin/python3"]
    out = []
    for c in cands:
        if c and os.path.exists(c) and os.path.realpath(c) not in out:
            out.append(os.path.realpath(c))
    return out


# What is not contained without bwrap (the seccomp filter still holds when the machine has one).
FALLBACK_GAPS = (
    "reads of every world-readable file (the repository, /etc/passwd, other processes' "
    "command lines in /proc)",
    "files written to world-writable folders (swept from /tmp, /var/tmp and /dev/shm only after "
    "the run)",
    "RAM-backed files in /dev/shm beyond the memory limit (each file is capped by max_file_mb)",
    "Unix-domain sockets of host services (the socket prelude can be bypassed)",
)


def _probe(python: str, bwrap: str | None, root: bool, seccomp: bool) -> tuple[dict | None, str]:
    try:
        r = _run(python, "import json\nprint('ok')", "", timeout_s=10.0, memory_mb=256,
                 max_file_mb=1, max_processes=16, max_output_bytes=1 << 16, block_sockets=True,
                 netns=True, switch_uid=root, bwrap=bwrap, seccomp=seccomp)
    except SandboxError as e:
        return None, str(e)
    if r.stdout.strip() == "ok":
        return r.isolation, ""
    return None, f"probe printed {r.stdout!r}, stderr {r.stderr[-300:]!r}"


def sandbox_capabilities() -> dict[str, Any]:
    """What isolation this machine gives (probed once per process by running a tiny program):
    ``root``, ``uid_isolation``, ``netns``, ``python`` (the interpreter the child runs),
    ``bwrap`` (its path, or None for the fallback), ``seccomp``, ``not_contained`` (what the
    fallback leaves open; empty with bwrap). The fallback is announced once with a warning."""
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is not None:
            return dict(_CAPS)
        root = _is_root()
        errors: list[str] = []
        bwrap = _bwrap_path()
        why_not = ""
        if bwrap is None:
            why_not = f"{BWRAP_ENV}={os.environ[BWRAP_ENV]}" if _bwrap_disabled() else \
                "bubblewrap (bwrap) is not installed"
        for python in _python_candidates():
            if root and not _world_accessible(python):
                errors.append(f"{python}: not executable by other users")
                continue
            iso = None
            if bwrap is not None:
                iso, err = _probe(python, bwrap, root, True)
                if iso is None:
                    why_not = f"bwrap does not run here ({err[:200]})"
            if iso is None:
                iso, err = _probe(python, None, root, True)
                if iso is None:  # a kernel without seccomp filters: run without it
                    iso, err2 = _probe(python, None, root, False)
                    err = err2 or err
            if iso is None:
                errors.append(f"{python}: {err}")
                continue
            fs = iso["filesystem"] == "bwrap"
            gaps = [] if fs else list(FALLBACK_GAPS)
            if not iso["seccomp"]:
                gaps.append("new namespaces, ptrace of other processes, SysV shared memory and "
                            "memfd (no seccomp filter on this machine)")
            _CAPS = {"root": root, "uid_isolation": root, "netns": iso["netns"], "python": python,
                     "bwrap": iso["bwrap"], "seccomp": iso["seccomp"], "not_contained": gaps}
            if not fs:
                warnings.warn("nanoseek sandbox without a filesystem boundary: " + why_not +
                              " (install Debian's 'bubblewrap': make install-sandbox). Not "
                              "contained: " + "; ".join(gaps) + ".", RuntimeWarning, stacklevel=2)
            return dict(_CAPS)
        raise SandboxError("no Python interpreter usable inside the sandbox: " + "; ".join(errors))


def run_code(code: str, stdin: str = "", timeout_s: float = 5, memory_mb: int = 256, *,
             max_file_mb: int = 16, max_processes: int = 16, max_output_bytes: int = 1 << 16,
             block_sockets: bool = True) -> SandboxResult:
    """Run untrusted Python ``code`` (stdlib only) with ``stdin``; see the module docstring.

    ``timeout_s`` is wall clock (CPU time is capped a second above it); ``memory_mb`` caps
    the address space of each process and, with bwrap, the RAM-backed files (tmpfs) in total;
    ``max_file_mb`` the size of any one file written; ``max_processes`` the processes and
    threads; ``max_output_bytes`` each of stdout and stderr as returned.
    """
    caps = sandbox_capabilities()
    return _run(caps["python"], code, stdin, timeout_s, memory_mb, max_file_mb, max_processes,
                max_output_bytes, block_sockets, True, caps["uid_isolation"], bwrap=caps["bwrap"],
                seccomp=caps["seccomp"])


_RUNTIME: dict[str, list[str]] = {}
_RUNTIME_LOCK = threading.Lock()


def _runtime_for(python: str) -> list[str]:
    with _RUNTIME_LOCK:
        if python not in _RUNTIME:
            _RUNTIME[python] = runtime_paths(python)
        return _RUNTIME[python]


def _fresh_uid() -> int:
    with _UID_LOCK:
        rng = random.SystemRandom()
        for _ in range(100):
            uid = rng.randint(*SANDBOX_UID_RANGE)
            if uid not in _UIDS_IN_USE and not live_processes(uid=uid):
                _UIDS_IN_USE.add(uid)
                return uid
    raise SandboxError("could not find an unused sandbox uid")


def _own_process_count() -> int:
    return len(live_processes(uid=os.getuid()))


def _kill_everything(proc: subprocess.Popen, uid: int | None, python: str) -> list[int]:
    """Kill the child's process group and, with uid isolation, every process of the sandbox uid.
    Returns the PIDs still alive after 5 s of trying (empty unless something is badly wrong)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        left = live_processes(uid=uid) if uid is not None else live_processes(pgid=proc.pid)
        if not left or time.monotonic() > deadline:
            return left
        if uid is not None:  # kill(-1) as the sandbox uid: every process of that uid, atomically
            subprocess.run([python, "-I", "-S", "-c", KILL_ALL], user=uid, group=uid,
                           extra_groups=[], env={"PATH": SAFE_PATH}, cwd="/",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)
        time.sleep(0.01)


def _remove_files_of(uid: int, workdir: str) -> int:
    """Remove what the sandbox uid left in the shared writable directories (other than its work
    dir, removed separately); returns the count."""
    removed = 0
    for d in SHARED_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid or \
                        os.path.realpath(e.path) == os.path.realpath(workdir):
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed += 1
            except OSError:
                pass
    return removed


def _classify(returncode: int | None, timed_out: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if returncode is None or returncode == 0:
        return None
    if returncode == -signal.SIGXCPU:
        return "cpu_limit"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return "file_size_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    return None


def _run(python: str, code: str, stdin: str, timeout_s: float, memory_mb: int, max_file_mb: int,
         max_processes: int, max_output_bytes: int, block_sockets: bool, netns: bool,
         switch_uid: bool, *, bwrap: str | None = None, seccomp: bool = False) -> SandboxResult:
    """One run. ``bwrap``: the bubblewrap binary for the filesystem boundary (None: fallback);
    ``seccomp``: load :func:`seccomp_filter` (where this architecture has one)."""
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_file_mb", max_file_mb),
                        ("max_processes", max_processes), ("max_output_bytes", max_output_bytes)):
        if not value > 0:
            raise ValueError(f"run_code: {name} must be positive, got {value!r}")
    uid = _fresh_uid() if switch_uid else None
    base = tempfile.gettempdir()
    if uid is not None and not _world_accessible(base):
        base = "/tmp"  # the sandbox uid must be able to enter its work dir
    workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-", dir=base)
    status_r, status_w = os.pipe()
    try:
        # lone surrogates (undecodable model output) become U+FFFD rather than an exception here
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        with open(os.path.join(workdir, "stdin.txt"), "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        if uid is not None:
            for p in (workdir, os.path.join(workdir, "main.py"), os.path.join(workdir, "stdin.txt")):
                os.chown(p, uid, uid)
        nproc = max_processes if uid is not None else _own_process_count() + max_processes
        nproc += BWRAP_EXTRA_PROCS if bwrap else 0
        cpu = math.ceil(timeout_s) + 1  # a backstop: the wall-clock timeout normally fires first
        mb = 1 << 20
        rlimits = {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (memory_mb * mb, memory_mb * mb),
                   "RLIMIT_FSIZE": (max_file_mb * mb, max_file_mb * mb),
                   "RLIMIT_NPROC": (nproc, nproc), "RLIMIT_NOFILE": (64, 64), "RLIMIT_CORE": (0, 0),
                   "RLIMIT_MSGQUEUE": (0, 0)}
        argv = [python, "-I", "-S", "-B"] + (["-c", SOCKET_PRELUDE] if block_sockets else ["main.py"])
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": WORK_DIR if bwrap else workdir}
        filt = seccomp_filter() if seccomp else None
        wrap = bwrap_args(bwrap, _runtime_for(python), os.path.join(workdir, "main.py"), memory_mb,
                          filt is not None) if bwrap else None
        cfg = {"status_fd": status_w, "netns": netns, "rlimits": rlimits, "nice": 10, "uid": uid,
               "python": python, "argv": argv, "env": env, "bwrap": wrap,
               "seccomp": filt.hex() if filt else None}
        start = time.monotonic()
        with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin_f:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)],
                                    stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env={"PATH": SAFE_PATH}, start_new_session=True,
                                    close_fds=True, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        try:
            status = _read_status(status_r)
            if "error" in status:
                proc.wait(timeout=5)
                raise SandboxError(f"sandbox launcher failed: {status['error']}")
            # The clock starts when the launcher hands over, so its own start-up is not charged.
            out, err, timed_out = _collect(proc, time.monotonic() + timeout_s, max_output_bytes)
        finally:
            leftovers = _kill_everything(proc, uid, python)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                leftovers.append(proc.pid)
            for pipe in (proc.stdout, proc.stderr):
                if not pipe.closed:
                    pipe.close()
        if leftovers:
            raise SandboxError(f"sandbox processes survived cleanup: {leftovers}")
        stray_files = _remove_files_of(uid, workdir) if uid is not None else 0
        wall = time.monotonic() - start
        stdout = out[0].decode("utf-8", "replace")
        stderr = err[0].decode("utf-8", "replace")
        network = ["netns"] if status.get("netns") else []
        network += ["socket-prelude"] if block_sockets else []
        return SandboxResult(
            stdout=stdout, stderr=stderr, returncode=proc.returncode, timed_out=timed_out,
            killed_reason=_classify(proc.returncode, timed_out, stderr), wall_s=wall,
            stdout_truncated=out[1], stderr_truncated=err[1],
            isolation={"uid": uid, "netns": bool(status.get("netns")),
                       "network": "+".join(network) or "none", "python": python,
                       "rlimits": rlimits, "stray_files_removed": stray_files,
                       "filesystem": "bwrap" if bwrap else "none", "bwrap": bwrap,
                       "seccomp": filt is not None})
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir):
            raise SandboxError(f"could not remove sandbox work dir {workdir}")
        if uid is not None:
            with _UID_LOCK:
                _UIDS_IN_USE.discard(uid)


def _read_status(fd: int) -> dict[str, Any]:
    """The launcher's one JSON line, written just before it execs the code (EOF at exec)."""
    chunks = []
    deadline = time.monotonic() + 30
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=1):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            raise SandboxError("sandbox launcher did not report within 30 s")
    raw = b"".join(chunks).decode("utf-8", "replace")
    if not raw:
        raise SandboxError("sandbox launcher exited without reporting")
    return json.loads(raw)


def _collect(proc: subprocess.Popen, deadline: float,
             cap: int) -> tuple[tuple[bytes, bool], tuple[bytes, bool], bool]:
    """Read stdout and stderr until both close, the main process exits, or the deadline passes."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = dict.fromkeys(bufs, False)
    timed_out = False
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the main process is gone; descendants holding the pipes get killed
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = cap - len(buf)
                if len(chunk) > room:
                    truncated[key.fd] = True
                buf += chunk[:max(room, 0)]
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    proc.stdout.close()
    proc.stderr.close()
    return (bytes(bufs[out_fd]), truncated[out_fd]), (bytes(bufs[err_fd]), truncated[err_fd]), timed_out
