"""A backing command that cannot serve (issue 20, item 6): `python -m cow.server -U S -- CMD`
with a CMD that is not found, is a file, exits, or never speaks NBD gets one line, exit 1, no
traceback, and leaves no process behind.  Run as a user would, in the folder of the files."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cow import backing as B
from support_reliability import wait_until

MARK = "cow-test-backing-command-marker"


def run_server(tmp_path, *args, timeout=120, start_timeout=None):
    """cow.server in tmp_path; with start_timeout, the backing command's start-up bound is
    lowered to that many seconds (the module's constant, as a test of the bound needs)."""
    if start_timeout is None:
        cmd = [sys.executable, "-P", "-m", "cow.server", *args]
    else:
        code = (f"import sys, cow.backing; cow.backing.START_TIMEOUT = {start_timeout}; "
                f"from cow.cli import main; sys.exit(main())")
        cmd = [sys.executable, "-P", "-c", code, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def processes_with(word):
    """pids of processes whose command line holds word."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if word.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def one_error_line(r):
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("python -m cow.server:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


def test_a_file_after_dashdash_is_not_run(tmp_path, disk):
    """`-- disk.img`: disk.img is no command in PATH: said so, with where the file goes."""
    r = run_server(tmp_path, "-U", "s.sock", "--", "disk.img")
    line = one_error_line(r)
    assert "the backing command disk.img: command not found" in line, line
    assert "to serve the file disk.img, put it before --" in line, line
    assert "Connection reset" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_path_to_a_file_that_is_not_executable(tmp_path, disk):
    r = run_server(tmp_path, "-U", "s.sock", "--", "./disk.img", "x")
    line = one_error_line(r)
    assert "the backing command ./disk.img x: ./disk.img: is a file that is not executable" \
        in line, line
    assert "put it before --" in line, line


@pytest.mark.parametrize("argv", [["no-such-command-cow-test"], ["/nonexistent/server"]])
def test_command_not_found(tmp_path, argv):
    r = run_server(tmp_path, "-U", "s.sock", "--", *argv)
    line = one_error_line(r)
    assert f"the backing command {argv[0]}: command not found" in line, line
    assert "put it before" not in line        # no file of that name here


def test_a_folder_is_not_a_command(tmp_path):
    (tmp_path / "d").mkdir()
    line = one_error_line(run_server(tmp_path, "-U", "s.sock", "--", "./d"))
    assert "./d: is a directory, not a command" in line, line


@pytest.mark.parametrize("argv, status", [
    (["false"], 1),
    (["sh", "-c", "exit 3"], 3),
    (["nbdkit", "--no-such-option"], 1),
    (["nbdkit", "no-such-plugin-cow-test"], 1),
])
def test_a_command_that_exits_says_its_status(tmp_path, argv, status):
    r = run_server(tmp_path, "-U", "s.sock", "--", *argv)
    line = one_error_line(r)
    assert f"exited with status {status} before serving NBD" in line, line
    assert "Connection reset" not in r.stderr and "libnbd" not in line


def test_a_command_killed_by_a_signal(tmp_path):
    r = run_server(tmp_path, "-U", "s.sock", "--", "sh", "-c", "kill -SEGV $$")
    assert "was killed by SIGSEGV before serving NBD" in one_error_line(r)


def test_a_command_that_never_speaks_nbd_is_stopped(tmp_path):
    """`-- sleep 1000` (here a python that sleeps, with a mark in its command line to find
    it by): after the start-up bound, one line; the command is stopped."""
    started = time.monotonic()
    r = run_server(tmp_path, "-U", "s.sock", "--", sys.executable, "-c",
                   f"import time; time.sleep(1000)  # {MARK}", start_timeout=3)
    line = one_error_line(r)
    assert "did not serve NBD within 3 s; it was stopped" in line, line
    assert time.monotonic() - started < 60
    assert processes_with(MARK) == []


def test_a_command_that_speaks_something_else(tmp_path):
    """The command accepts and answers, but not NBD: libnbd's reason, and it is stopped."""
    script = ("import socket, time; s = socket.socket(fileno=3); c, _ = s.accept(); "
              f"c.sendall(b'HTTP/1.0 400 Bad Request' + bytes(100)); time.sleep(1000)  # {MARK}")
    r = run_server(tmp_path, "-U", "s.sock", "--", sys.executable, "-c", script)
    line = one_error_line(r)
    assert "did not serve NBD (" in line and "it was stopped" in line, line
    assert processes_with(MARK) == []


def test_a_command_that_ignores_sigterm_is_killed(tmp_path):
    """Stopping a command that will not stop: SIGKILL after STOP_TIMEOUT."""
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"time.sleep(1000)  # {MARK}")
    code = ("import sys, cow.backing as b; b.STOP_TIMEOUT = 1\n"
            "try:\n"
            f"    b.Backing([sys.executable, '-c', {script!r}], start_timeout=2)\n"
            "except b.CommandError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert "did not serve NBD within 2 s; it was stopped" in r.stdout, r
    assert processes_with(MARK) == []


def test_a_served_command_is_stopped_and_reaped_at_close(tmp_path):
    """A command that serves: the backing works; close() stops the command (no zombie)."""
    pidfile = tmp_path / "nbdkit.pid"
    b = B.Backing(["nbdkit", "-P", str(pidfile), "pattern", "1M"])
    try:
        assert b.size == 1 << 20
        buf = bytearray(8)
        b.pread(buf, 4096)
        assert int.from_bytes(buf, "big") == 4096
        pid = int(pidfile.read_text())
    finally:
        b.close()
    assert not os.path.exists(f"/proc/{pid}"), "the command is still running or a zombie"
