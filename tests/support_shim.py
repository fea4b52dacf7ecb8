"""Start real nbdkit with the cow shim (cow/nbdkit_plugin.py) on a Unix socket.

Used by tests/test_nbdkit_shim.py and by bench/.  Self-contained (no pytest, no conftest):

    from support_shim import run_shim
    with run_shim("disk.img", "/tmp/cow.sock", "cow-block-size=4K") as server:
        ... connect to server.uri (nbd+unix:///?socket=/tmp/cow.sock) ...
    print(server.stderr_text())

The plugin path comes from the installed package (`python -P -m cow.nbdkit --print-plugin-path`).
Installed editable (./dev setup), that is the source file cow/nbdkit_plugin.py, which finds the
compiled engine through the build folder's record of its environment.
"""

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
NBDKIT = "nbdkit"


@functools.cache
def plugin_path():
    """Absolute path of the shim the installed package runs."""
    out = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "--print-plugin-path"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return out


def backing_param(backing):
    """file=PATH or uri=URI for a backing given as a path or an NBD URI."""
    backing = str(backing)
    if backing.startswith(("file=", "uri=")):
        return backing
    return ("uri=" if "://" in backing else "file=") + backing


def shim_command(backing, *params, nbdkit_args=(), plugin=None):
    """nbdkit [nbdkit_args] python SHIM file=|uri=BACKING [params]: the caller adds -U etc."""
    return [NBDKIT, *map(str, nbdkit_args), "python", plugin or plugin_path(),
            backing_param(backing), *map(str, params)]


def wait_for_pidfile(path, proc=None, timeout=30.0):
    """Wait until nbdkit has written its pid file: it does so once it accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nbdkit exited early with status {proc.returncode}")
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        time.sleep(0.01)
    raise TimeoutError(f"pid file {path} did not appear within {timeout}s")


@dataclass
class ShimServer:
    uri: str
    sock: Path
    proc: subprocess.Popen
    stderr_path: Path
    cmd: list = field(default_factory=list)

    def stderr_text(self):
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout=20):
        """SIGTERM nbdkit and wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def run_nbdkit_cmd(cmd, sock, env=None, stderr_path=None, timeout=30.0):
    """Run `cmd` (an nbdkit command line without -f/-U) in the foreground on Unix socket sock."""
    sock = Path(sock)
    if stderr_path is None:
        fd, name = tempfile.mkstemp(prefix="nbdkit-", suffix=".stderr", dir=sock.parent)
        os.close(fd)
        stderr_path = name
    stderr_path = Path(stderr_path)
    pidfile = Path(f"{sock}.pid")
    full = [cmd[0], "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile), *cmd[1:]]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL, stderr=err)
    server = ShimServer(f"nbd+unix:///?socket={sock}", sock, proc, stderr_path, full)
    try:
        try:
            # Not a probe connection: nbdkit would log the aborted handshake as an error.
            wait_for_pidfile(pidfile, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            server.stop()
            raise RuntimeError(f"{exc}\ncommand: {full}\nstderr:\n{server.stderr_text()}") from None
        yield server
    finally:
        server.stop()


@contextmanager
def run_shim(backing, sock, *params, nbdkit_args=(), env=None, stderr_path=None, timeout=30.0):
    """nbdkit -f -U sock [nbdkit_args] python SHIM file=|uri=BACKING [params]; yields a ShimServer."""
    cmd = shim_command(backing, *params, nbdkit_args=nbdkit_args)
    with run_nbdkit_cmd(cmd, sock, env=env, stderr_path=stderr_path, timeout=timeout) as server:
        yield server


@contextmanager
def run_cow_filter(backing, sock, *params, nbdkit_args=(), env=None, stderr_path=None, timeout=30.0):
    """nbdkit's own C cow filter on the same backing, for comparison: nbdkit --filter=cow file ..."""
    backing = str(backing)
    if "://" in backing:
        plugin = ["nbd", f"uri={backing}"]
    else:
        plugin = ["file", backing]
    cmd = [NBDKIT, *map(str, nbdkit_args), "--filter=cow", *plugin, *map(str, params)]
    with run_nbdkit_cmd(cmd, sock, env=env, stderr_path=stderr_path, timeout=timeout) as server:
        yield server
