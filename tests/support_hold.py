"""A backing whose requests a test can hold and release: real nbdkit with its log filter outside
its pause filter.  While held, a request the backing received is logged ("Read id=N offset=...")
and then waits in the pause filter until release(), so a test knows for certain that it is still
pending, on any machine, however slow or fast: no delay stands in for "still in flight".

    with HeldBacking(tmp_path, "file", disk) as back:
        with start_server(back.uri, ...) as (uri, proc):
            back.hold()                       # from now on the backing answers nothing
            ... start a client read that needs the backing ...
            back.wait_for(r" Read id=\\d+ offset=0x10000 ")   # it reached the backing: pending
            ... check what must happen meanwhile ...
            back.release()

hold() returns once every request received before it has completed (the pause filter's 'P').
release_after(seconds) starts a separate process that releases the backing later: a test whose
own thread might be the one stuck (a GIL held across a backing read) still ends.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for_socket

_counter = iter(range(1 << 30))


class HeldBacking:
    """nbdkit -U SOCK --filter=log --filter=pause [--filter=... more] PLUGIN ARGS: uri, log,
    proc, hold(), release(), wait_for(), entries(), pending()."""

    def __init__(self, tmp_path, *plugin_args, nbdkit_args=(), filters=()):
        n = next(_counter)
        tmp = Path(tmp_path)
        self.sock = tmp / f"held{n}.sock"
        self.ctl = tmp / f"held{n}.ctl"
        self.log = tmp / f"held{n}.log"
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), *map(str, nbdkit_args),
               "--filter=log", "--filter=pause", *(f"--filter={f}" for f in filters),
               *map(str, plugin_args), f"logfile={self.log}", f"pause-control={self.ctl}"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self._watchdogs = []
        try:
            wait_for_socket(self.sock, self.proc)
            wait_for_socket(self.ctl, self.proc)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _command(self, c: bytes, timeout: float) -> None:
        # One connection per command: the filter serves one control connection at a time, and
        # release_after's process needs its turn.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.ctl))
            s.sendall(c)
            got = s.recv(1)
        assert got == c.upper(), (c, got)

    def hold(self, timeout: float = 60.0) -> None:
        """From now on requests reach the backing's log and then wait.  Returns once the
        requests received before have completed."""
        self._command(b"p", timeout)

    def release(self) -> None:
        self._command(b"r", 60.0)

    def release_after(self, seconds: float) -> None:
        """Release from another process after `seconds` (a way out if this process is stuck)."""
        code = ("import socket, sys, time; time.sleep(float(sys.argv[2])); "
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'r'); "
                "s.recv(1)")
        self._watchdogs.append(subprocess.Popen([sys.executable, "-c", code, str(self.ctl),
                                                 str(seconds)]))

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60.0) -> list:
        """Wait until the log holds `count` matches of the regex `pattern`; return them."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.findall(self.text())
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, \
                f"{pattern!r} not {count} times in the backing's log:\n{self.text()[-3000:]}"
            time.sleep(0.005)

    def entries(self, kind: str = "Read") -> dict:
        """{(connection, id): (offset, count)} of every request of `kind` the backing received."""
        return {(int(n), int(i)): (int(o, 16), int(c, 16)) for n, i, o, c in re.findall(
            rf"connection=(\d+) {kind} id=(\d+) offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ",
            self.text())}

    def returned(self, kind: str = "Read") -> set:
        """(connection, id) of the requests of `kind` that the backing has answered."""
        return {(int(n), int(i)) for n, i in re.findall(
            rf"connection=(\d+) \.\.\.{kind} id=(\d+) ", self.text())}

    def pending(self, kind: str = "Read") -> dict:
        """{(connection, id): (offset, count)} received and not yet answered."""
        done = self.returned(kind)
        return {i: v for i, v in self.entries(kind).items() if i not in done}

    def close(self) -> None:
        for w in self._watchdogs:
            if w.poll() is None:
                w.kill()
            w.wait()
        if self.proc.poll() is None:
            try:
                self._command(b"r", 10.0)        # nothing may stay held past the test
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()



@pytest.fixture
def held(tmp_path):
    """held(plugin, args..., nbdkit_args=(), filters=()) -> a HeldBacking stopped after the
    test.  Ask for it before `engines` so that engines close first."""
    made = []

    def make(*plugin_args, **kw):
        b = HeldBacking(tmp_path, *plugin_args, **kw)
        made.append(b)
        return b

    yield make
    for b in reversed(made):
        b.close()
