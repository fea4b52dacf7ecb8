"""Shared fixtures: real backings, real nbdkit, and a check that no test changes a backing."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

PYTHON = sys.executable
# nbdsh and other Debian tools must see Debian's python, not a pyenv one earlier on PATH.
os.environ["PATH"] = "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")

REQUIRED_TOOLS = ["nbdkit", "nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "qemu-nbd", "fio"]


def pytest_sessionstart(session):
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"missing tools (run ./dev setup): {' '.join(missing)}")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sample(path, size, pattern=None, holes=True):
    """A backing file of `size` bytes: data in most 64 KiB pieces, holes in every third one.
    The data is a function of the offset so that misplaced reads are caught."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        piece = 65536
        for i, off in enumerate(range(0, size, piece)):
            if holes and i % 3 == 2:
                continue
            n = min(piece, size - off)
            if pattern is not None:
                data = bytes([pattern]) * n
            else:
                data = bytes(((off + j) * 7 + (off + j) // 4096) & 0xFF for j in range(0, min(n, 4096)))
                data = (data * (n // len(data) + 1))[:n]
            f.seek(off)
            f.write(data)
    return path


@pytest.fixture
def backing_factory(tmp_path):
    """Make backing files; after the test, assert each is byte-identical to what was made."""
    made = []

    def make(size, name=None, **kw):
        p = write_sample(tmp_path / (name or f"backing{len(made)}.img"), size, **kw)
        made.append((p, sha256_file(p)))
        return p

    yield make
    for p, digest in made:
        assert sha256_file(p) == digest, f"backing {p} was modified"


def wait_for_socket(path, proc=None, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise TimeoutError(f"socket {path} did not appear")


@contextmanager
def run_nbdkit(args, sock, env=None):
    """Start real nbdkit in the foreground on a Unix socket; yield its nbd+unix URI."""
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit(args...) -> URI of a real nbdkit started for this test (stopped after it)."""
    stack = []
    counter = iter(range(1000))

    def start(*args, env=None):
        sock = tmp_path / f"nbdkit{next(counter)}.sock"
        cm = run_nbdkit(args, sock, env=env)
        uri = cm.__enter__()
        stack.append(cm)
        return uri

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
