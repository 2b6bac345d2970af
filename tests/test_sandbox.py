"""The code sandbox contains what model-written code can do: each test runs in a few seconds.

Where this machine cannot give a protection (no root for the uid switch, no network namespace),
the test that needs it is skipped with the reason, and ``test_report_isolation`` prints what is on.
Tests that see the filesystem run in both modes where bwrap is present: with the boundary and in
the fallback (``bwrap=None``); escape attempts live in ``test_adversarial_sandbox.py``.
"""

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.tasks.sandbox import _run, live_processes, run_code, sandbox_capabilities

pytestmark = pytest.mark.timeout(60)

CAPS = sandbox_capabilities()
needs_uid = pytest.mark.skipif(not CAPS["uid_isolation"], reason="not root: no per-run sandbox uid")
MODES = ["bwrap", "fallback"] if CAPS["bwrap"] else ["fallback"]


def run_in(mode, code, stdin="", **kw):
    """run_code with the filesystem boundary (``mode="bwrap"``) or in the fallback."""
    args = dict(timeout_s=5, memory_mb=256, max_file_mb=16, max_processes=16,
                max_output_bytes=1 << 16, block_sockets=True)
    args.update(kw)
    return _run(CAPS["python"], code, stdin, args.pop("timeout_s"), args.pop("memory_mb"),
                args.pop("max_file_mb"), args.pop("max_processes"), args.pop("max_output_bytes"),
                args.pop("block_sockets"), True, CAPS["uid_isolation"],
                bwrap=CAPS["bwrap"] if mode == "bwrap" else None, seccomp=CAPS["seccomp"])


def assert_nothing_left(r):
    uid = r.isolation["uid"]
    if uid is not None:
        assert live_processes(uid=uid) == [], "sandbox processes survived"


def test_report_isolation():
    r = run_code("print('hi')")
    print("sandbox isolation:", CAPS, r.isolation["network"])
    assert r.isolation["python"] == CAPS["python"]
    if CAPS["root"]:
        assert CAPS["uid_isolation"] and r.isolation["uid"] is not None


def test_runs_code_with_stdin_and_exit_status():
    r = run_code("import sys\nname = input()\nprint('hello', name)\nsys.exit(3)", stdin="ada\n")
    assert r.stdout == "hello ada\n" and r.returncode == 3 and not r.timed_out and not r.ok
    assert r.killed_reason is None and r.wall_s < 5
    r = run_code("raise ValueError('boom')")
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_code("print(sum(range(10)))")
    assert r.ok and r.stdout.strip() == "45"


@needs_uid
@pytest.mark.parametrize("mode", MODES)
def test_runs_as_unprivileged_fresh_uid_in_fresh_dir(mode):
    r = run_in(mode, "import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n"
               "print(os.getcwd())\nprint(sorted(os.listdir('.')))")
    uid_line, cwd, listing = r.stdout.splitlines()
    uid = r.isolation["uid"]
    assert uid_line == f"{uid} {uid} []" and uid != 0
    if mode == "bwrap":  # the work folder is the sandbox's private tmpfs
        assert cwd == "/tmp" and listing == "['main.py']" and r.isolation["filesystem"] == "bwrap"
    else:
        assert not os.path.exists(cwd), "work dir not removed"
    other = run_in(mode, "print(1)")
    assert other.isolation["uid"] != uid


@needs_uid
@pytest.mark.parametrize("mode", MODES)
def test_files_left_in_shared_tmp_are_removed(mode):
    code = ("import os\nfor d in ('/tmp', '/dev/shm'):\n    p = os.path.join(d, f'nanoseek-stray-{os.getuid()}')\n"
            "    open(p, 'w').write('x')\n    print(p)")
    r = run_in(mode, code)
    paths = r.stdout.split()
    # bwrap: the files lived in the sandbox's own tmpfs; fallback: swept from the host's folders
    assert r.ok and len(paths) == 2 and r.isolation["stray_files_removed"] == (mode != "bwrap") * 2
    assert not any(os.path.exists(p) for p in paths)


def test_process_group_cleanup_without_uid_switch():
    # The non-root code path (no fresh uid): the process group is killed when the main exits.
    python = CAPS["python"]
    code = ("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print(os.getpgid(0))")
    r = _run(python, code, "", timeout_s=3, memory_mb=256, max_file_mb=1, max_processes=16,
             max_output_bytes=4096, block_sockets=True, netns=False, switch_uid=False)
    assert r.isolation["uid"] is None and r.wall_s < 2.5
    assert live_processes(pgid=int(r.stdout)) == []


def test_infinite_loop_is_killed_promptly():
    t = time.monotonic()
    r = run_code("while True:\n    pass", timeout_s=1)
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode != 0
    assert time.monotonic() - t < 3
    assert_nothing_left(r)


def test_sleeping_child_is_killed_promptly():
    r = run_code("import time\ntime.sleep(60)", timeout_s=0.5)
    assert r.timed_out and r.wall_s < 2
    assert_nothing_left(r)


@needs_uid
def test_process_count_is_capped():
    # A bounded bomb: children sleep, the parent counts how many forks the kernel allowed.
    code = ("import os, time\nok = fail = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        fail += 1\n        continue\n    if pid == 0:\n"
            "        time.sleep(30)\n        os._exit(0)\n    ok += 1\nprint(ok, fail)")
    r = run_code(code, timeout_s=3, max_processes=6)
    ok, fail = map(int, r.stdout.split())
    assert ok <= 5 and fail >= 35  # the parent itself is one of the 6
    assert r.wall_s < 2.5  # returns when the parent exits; the sleeping children are killed
    assert_nothing_left(r)


@needs_uid
def test_fork_bomb_is_contained_and_cleaned_up():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t = time.monotonic()
    r = run_code(code, timeout_s=1.5, max_processes=8)
    assert r.timed_out and time.monotonic() - t < 5
    assert_nothing_left(r)
    assert run_code("print('alive')").stdout == "alive\n"  # the machine still spawns processes


@needs_uid
def test_escaped_session_is_still_killed():
    # Children that leave the process group with setsid are killed through their uid.
    code = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        time.sleep(60)\n        os._exit(0)\nprint('parent done')")
    r = run_code(code, timeout_s=3)
    assert r.stdout == "parent done\n" and r.wall_s < 2.5
    assert_nothing_left(r)


def test_memory_hog_hits_rlimit_as():
    r = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))",
                 memory_mb=128, timeout_s=5)
    assert r.returncode != 0 and not r.timed_out
    assert r.killed_reason == "memory_limit" and "MemoryError" in r.stderr
    r = run_code("x = bytearray(64 * 1024 * 1024)\nprint(len(x))", memory_mb=256)
    assert r.ok  # the limit leaves room for ordinary programs


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2")
    r = run_code("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOSEEK_TEST_SECRET'))")
    keys, secret = r.stdout.splitlines()
    assert secret == "None" and "NANOSEEK_TEST_SECRET" not in keys
    assert set(eval(keys)) <= {"PATH", "LANG", "LC_ALL", "HOME", "PWD"}


@needs_uid
@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_parent_environment_through_proc(monkeypatch, mode):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2")
    code = (f"try:\n    data = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
            "    print('READ', b'hunter2' in data)\nexcept PermissionError:\n    print('denied')\n"
            "except FileNotFoundError:\n    print('absent')")
    r = run_in(mode, code)
    # fallback: another uid's environ is unreadable; bwrap: our pid is not in its pid namespace
    assert r.stdout.strip() == ("absent" if mode == "bwrap" else "denied")


def test_huge_file_hits_rlimit_fsize():
    r = run_code("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 65536)",
                 max_file_mb=1)
    assert r.returncode != 0 and not r.timed_out and r.killed_reason == "file_size_limit"


def test_output_is_truncated_at_the_byte_cap():
    r = run_code("import sys\nfor _ in range(2000):\n    sys.stdout.write('y' * 1000)\n"
                 "sys.stderr.write('e' * 100000)", max_output_bytes=10_000)
    assert r.returncode == 0 and len(r.stdout) == 10_000 and r.stdout_truncated
    assert len(r.stderr) == 10_000 and r.stderr_truncated


def test_socket_prelude_blocks_sockets():
    r = run_code("import socket\ns = socket.socket()\nprint('made a socket')")
    assert r.returncode != 0 and "network access is disabled" in r.stderr
    assert "socket-prelude" in r.isolation["network"]


@pytest.mark.skipif(not CAPS["netns"], reason="unshare(CLONE_NEWNET) not permitted here: only the "
                    "socket prelude blocks the network")
def test_network_namespace_blocks_even_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (f"import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', {port}))\n"
                "    print('connected')\nexcept OSError as e:\n    print('blocked', e.errno)")
        r = run_code(code, block_sockets=False)  # only the namespace stands in the way
    assert r.stdout.startswith("blocked") and r.isolation["network"] == "netns"


def test_concurrent_runs_from_threads():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_code(f"print({i} * {i})"), range(8)))
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(8)]
    uids = [r.isolation["uid"] for r in results]
    if CAPS["uid_isolation"]:
        assert len(set(uids)) == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        run_code("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="max_file_mb"):
        run_code("print(1)", max_file_mb=-5)
