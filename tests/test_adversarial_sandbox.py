"""Escape attempts against the sandbox: model-written code trying to see, keep or reach what is
not its own. Each attempt runs with the filesystem boundary (bubblewrap) where this machine has it,
and the ones the fallback also claims to contain (seccomp: namespaces, ptrace, SysV IPC, memfd)
run in the fallback too. The fallback's announcement (one warning listing what it does not
contain) is tested in a fresh interpreter with ``NANOSEEK_SANDBOX_BWRAP=0``.
"""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nanoseek.tasks.sandbox import _run, live_processes, sandbox_capabilities, seccomp_filter

pytestmark = pytest.mark.timeout(120)

CAPS = sandbox_capabilities()
needs_bwrap = pytest.mark.skipif(not CAPS["bwrap"], reason="bubblewrap is not usable here "
                                 "(make install-sandbox): the fallback is tested below")
needs_seccomp = pytest.mark.skipif(not CAPS["seccomp"], reason="no seccomp filter on this machine")
REPO = Path(__file__).resolve().parents[1]


def run(code, mode="bwrap", **kw):
    args = dict(timeout_s=5, memory_mb=256, max_file_mb=16, max_processes=16)
    args.update(kw)
    r = _run(CAPS["python"], code, "", args["timeout_s"], args["memory_mb"], args["max_file_mb"],
             args["max_processes"], 1 << 16, False, True, CAPS["uid_isolation"],
             bwrap=CAPS["bwrap"] if mode == "bwrap" else None, seccomp=CAPS["seccomp"])
    if r.isolation["uid"] is not None:
        assert live_processes(uid=r.isolation["uid"]) == []
    return r


def probe(code, mode="bwrap", **kw):
    """Run ``code`` that ends by printing one JSON value; return it."""
    r = run(code, mode, **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TRY_READ = """
import json
out = {}
for p in PATHS:
    try:
        with open(p, 'rb') as f:
            out[p] = 'read %d bytes' % len(f.read(100))
    except OSError as e:
        out[p] = type(e).__name__
print(json.dumps(out))
"""


@needs_bwrap
def test_reads_outside_the_runtime_find_nothing():
    secret = REPO / "README.md"
    paths = ["/etc/passwd", "/etc/shadow", "/etc/hostname", str(secret), str(Path(__file__)),
             "/root/.bashrc", "/home", "/work", f"/proc/{os.getpid()}/cmdline",
             f"/proc/{os.getpid()}/environ", "/proc/1/environ", "/var/run/docker.sock",
             "/sys/kernel/notes", "/usr/share/dict/words", "/usr/bin/env"]
    got = probe(f"PATHS = {paths!r}\n" + TRY_READ)
    # the parent's /proc/1 is the sandbox's own init; no other path exists inside
    assert all(v in ("FileNotFoundError", "PermissionError") for k, v in got.items()
               if k != "/proc/1/environ"), got
    listing = probe("import os, json\nprint(json.dumps(sorted(os.listdir('/')) + "
                    "sorted(os.listdir('/usr'))))")
    assert set(listing) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                            "usr", "lib", "local"} | {"bin", "lib", "lib64"}


@needs_bwrap
def test_other_processes_are_invisible():
    got = probe("import os, json\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                "cmd = [open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace') for p in pids]\n"
                "print(json.dumps([pids, cmd, os.uname().nodename]))")
    pids, cmdlines, host = got
    assert len(pids) <= 3 and host == "sandbox"  # bwrap's init, python, maybe a thread group
    assert not any("pytest" in c for c in cmdlines)


@needs_bwrap
def test_writes_outside_the_work_folder_fail_and_nothing_is_left():
    mark = f"nanoseek-escape-{uuid.uuid4().hex}"
    code = (f"import os, json\nMARK = {mark!r}\nout = {{}}\n"
            "for d in ['/', '/usr', '/usr/lib', '/dev', '/proc', '/var/tmp', '/home', '/tmp', '/dev/shm']:\n"
            "    try:\n        open(os.path.join(d, MARK), 'w').write('x')\n        out[d] = 'wrote'\n"
            "    except OSError as e:\n        out[d] = type(e).__name__\n"
            "os.symlink('/etc', '/tmp/link-' + MARK)\nprint(json.dumps(out))")
    got = probe(code)
    assert got["/tmp"] == "wrote" and got["/dev/shm"] == "wrote"
    assert all(v != "wrote" for d, v in got.items() if d not in ("/tmp", "/dev/shm")), got
    left = [str(p) for d in ("/tmp", "/var/tmp", "/dev/shm", str(REPO), os.getcwd())
            for p in Path(d).glob(f"*{mark}*")]
    assert left == []


@needs_bwrap
def test_ram_backed_writes_are_bounded_by_the_memory_limit():
    # many files, each under max_file_mb, in both RAM-backed folders: the tmpfs sizes cap the sum
    code = ("import json, os\ntotal = 0\nerr = None\nchunk = b'x' * (1 << 20)\n"
            "for d in ('/tmp', '/dev/shm'):\n    for i in range(400):\n        try:\n"
            "            with open(f'{d}/f{i}', 'wb') as f:\n                for _ in range(4):\n"
            "                    f.write(chunk)\n                    total += len(chunk)\n"
            "        except OSError as e:\n            err = e.errno\n            break\n"
            "print(json.dumps([total >> 20, err]))")
    written_mb, errno_ = probe(code, memory_mb=64, max_file_mb=8)
    assert errno_ == 28 and written_mb <= 64  # ENOSPC at the memory limit, not 3.2 GB later


@needs_bwrap
def test_runtime_and_program_are_read_only():
    got = probe("import json, os\nout = []\n"
                "for p in ('main.py', os.__file__, '/usr/bin/python3'):\n"
                "    try:\n        open(p, 'a').write('# pwned')\n        out.append('wrote')\n"
                "    except OSError as e:\n        out.append(type(e).__name__)\nprint(json.dumps(out))")
    assert "wrote" not in got


@needs_bwrap
def test_host_unix_sockets_are_unreachable(tmp_path):
    path = tmp_path / "host.sock"
    abstract = "\0nanoseek-test-" + uuid.uuid4().hex
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    servers[0].bind(str(path))
    servers[1].bind(abstract)
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)
    for s in servers:
        s.listen()
    try:
        # re-importing the C module defeats the socket prelude; only the boundary stands
        code = ("import importlib, json, sys\nsys.modules.pop('socket', None)\nsys.modules.pop('_socket', None)\n"
                "import _socket\nout = []\n"
                f"for addr in ({str(path)!r}, {abstract!r}):\n"
                "    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                "    try:\n        s.connect(addr)\n        out.append('connected')\n"
                "    except OSError as e:\n        out.append(e.errno)\nprint(json.dumps(out))")
        got = probe(code)
        assert "connected" not in got
    finally:
        for s in servers:
            s.close()


NS_ATTEMPTS = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    ctypes.set_errno(0)
    rc = fn()
    out[name] = 'ok' if rc not in (-1, None) else os.strerror(ctypes.get_errno())
attempt('unshare_user', lambda: libc.unshare(0x10000000))
attempt('unshare_net', lambda: libc.unshare(0x40000000))
attempt('unshare_mount', lambda: libc.unshare(0x00020000))
attempt('clone_newuser', lambda: libc.syscall(56 if os.uname().machine == 'x86_64' else 220,
                                              0x10000000 | 17, 0, 0, 0, 0))
attempt('setns', lambda: libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0))
child = os.fork()
if child == 0:
    import time
    time.sleep(5)
    os._exit(0)
attempt('ptrace_attach_child', lambda: libc.ptrace(16, child, 0, 0))
attempt('ptrace_attach_parent', lambda: libc.ptrace(16, os.getppid(), 0, 0))
attempt('ptrace_traceme', lambda: libc.ptrace(0, 0, 0, 0))
os.kill(child, 9)
attempt('shmget', lambda: libc.shmget(0, 1 << 20, 0o1600))
attempt('msgget', lambda: libc.msgget(0, 0o1600))
attempt('memfd_create', lambda: libc.memfd_create(b'x', 0))
attempt('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))
if os.uname().machine == 'x86_64':
    attempt('x32_getpid', lambda: libc.syscall(0x40000000 | 39))
print(json.dumps(out))
"""


@needs_seccomp
@pytest.mark.parametrize("mode", ["bwrap", "fallback"])
def test_no_new_namespaces_ptrace_sysv_ipc_or_memfd(mode):
    if mode == "bwrap" and not CAPS["bwrap"]:
        pytest.skip("bubblewrap is not usable here")
    got = probe(NS_ATTEMPTS, mode)
    assert got and all(v != "ok" for v in got.values()), got


@needs_bwrap
def test_nested_user_namespaces_are_disabled_even_without_seccomp():
    r = _run(CAPS["python"], "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "print(libc.unshare(0x10000000), ctypes.get_errno())", "", 5, 256, 16, 16, 1 << 16,
             False, True, CAPS["uid_isolation"], bwrap=CAPS["bwrap"], seccomp=False)
    rc, errno_ = map(int, r.stdout.split())
    assert rc == -1 and errno_ in (1, 28)  # bwrap --disable-userns: EPERM or ENOSPC


def test_seccomp_filter_shape():
    prog = seccomp_filter("x86_64")
    assert prog and len(prog) % 8 == 0 and len(prog) // 8 < 4096
    assert seccomp_filter("riscv64") is None


def test_fallback_warns_once_and_lists_what_it_does_not_contain():
    code = ("import json, warnings\nwarnings.simplefilter('always')\n"
            "from nanoseek.tasks.sandbox import run_code, sandbox_capabilities\n"
            "caps = sandbox_capabilities()\nsandbox_capabilities()\n"
            "r = run_code(\"print(open('/etc/hostname').read() != '')\")\n"
            "print(json.dumps([caps['bwrap'], caps['not_contained'], r.isolation['filesystem'], r.stdout]))")
    env = {**os.environ, "NANOSEEK_SANDBOX_BWRAP": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    bwrap, gaps, fs, stdout = json.loads(out.stdout.strip().splitlines()[-1])
    assert bwrap is None and fs == "none" and len(gaps) >= 4
    assert any("world-readable" in g for g in gaps) and any("Unix-domain" in g for g in gaps)
    assert out.stderr.count("without a filesystem boundary") == 1
    assert "NANOSEEK_SANDBOX_BWRAP=0" in out.stderr


@pytest.mark.parametrize("mode", ["bwrap", "fallback"])
def test_host_processes_cannot_be_signalled(mode):
    if mode == "bwrap" and not CAPS["bwrap"]:
        pytest.skip("bubblewrap is not usable here")
    if not CAPS["uid_isolation"] and mode == "fallback":
        pytest.skip("not root: the fallback runs as our own uid")
    code = (f"import os, json\ntry:\n    os.kill({os.getpid()}, 0)\n    print(json.dumps('reached'))\n"
            "except OSError as e:\n    print(json.dumps(e.errno))")
    got = probe(code, mode)
    assert got == (3 if mode == "bwrap" else 1)  # ESRCH: not in its pid namespace; EPERM: other uid


@needs_bwrap
def test_proc_root_and_dotdot_lead_back_into_the_sandbox():
    got = probe("import os, json\nos.chdir('/proc/1/root/../../..')\n"
                "print(json.dumps([sorted(os.listdir('.')), sorted(os.listdir('/proc/self/root'))]))")
    assert got[0] == got[1] and "home" not in got[0] and "etc" not in got[0]
