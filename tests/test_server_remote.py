"""cow.server over a remote (NBD) backing, with real clients: every client request that needs
the backing is a backing request in flight, a backing that is a command, cow-on-read as a local
cache of a remote base, and a backing that dies mid-copy.  What the backing server saw is read
from nbdkit's log filter."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import nbd
import pytest

from conftest import write_sample
from support_hold import held  # noqa: F401 - a fixture
from support_server import start_server

MiB = 1 << 20


def backing_reads(log):
    """(offset, count) of every read the backing served."""
    return [(int(o, 16), int(c, 16)) for o, c in re.findall(
        r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ", log.read_text())]


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_client_queue_depth_becomes_backing_reads_in_flight(held, tmp_path):
    """4 connections with 16 reads each in flight, over one libnbd handle
    (--backing-connections 1): the backing holds every read until all 64 have reached it at
    once (were any waiting for another's answer, they never would), then releases them."""
    back = held("pattern", "64M", "multi-conn-mode=disable", nbdkit_args=("-t", "128"),
                filters=("multi-conn",))
    with start_server(back.uri, "--backing-connections", "1", tmp_path=tmp_path) as (uri, _):
        handles = [connect(uri) for _ in range(4)]
        back.hold()
        bufs = []
        for k, h in enumerate(handles):
            for i in range(16):
                b = nbd.Buffer(65536)
                off = (k * 16 + i) * 65536
                bufs.append((off, b, h, h.aio_pread(b, off)))
        try:
            back.wait_for(r" Read id=\d+ ", count=64)   # all 64 at the backing together
            assert len(back.pending()) == 64
        finally:
            back.release()
        for h in handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)
        for off, b, h, c in bufs:
            assert h.aio_command_completed(c)
            assert b.to_bytearray()[:8] == off.to_bytes(8, "big")
        for h in handles:
            h.shutdown()
    assert len(re.findall(r"connection=\d+ Connect ", back.text())) == 1


def test_overlay_requests_do_not_wait_for_the_backing(held, tmp_path):
    """While a connection has a backing read in flight (held at the backing until the test
    releases it), the same connection's reads and writes of blocks already in the overlay are
    answered (out of order, before it)."""
    back = held("memory", "16M")
    with start_server(back.uri, tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        h.pwrite(b"o" * 65536, 0)
        back.hold()
        slow = h.aio_pread(nbd.Buffer(4096), 5 * 65536)
        back.wait_for(rf" Read id=\d+ offset={hex(5 * 65536)} ")
        buf = nbd.Buffer(100)
        quick = [h.aio_pread(buf, 10),                       # overlay
                 h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"p" * 100)), 200),
                 h.aio_trim(65536, 8 * 65536)]               # allocated block, trim
        deadline = time.monotonic() + 60
        while quick:              # a completed cookie is retired: ask about each one once
            quick = [c for c in quick if not h.aio_command_completed(c)]
            assert time.monotonic() < deadline, "overlay requests waited for the backing read"
            if quick:
                h.poll(1000)
        assert buf.to_bytearray() == b"o" * 100
        assert back.pending(), "the backing read was not held"
        assert not h.aio_command_completed(slow)              # still held: answered after
        back.release()
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert h.aio_command_completed(slow)
        assert h.pread(300, 0) == b"o" * 200 + b"p" * 100
        h.shutdown()


@pytest.mark.parametrize("form", ["dashdash", "brackets"])
def test_command_backing_from_the_command_line(tmp_path, form):
    """`python -m cow.server ... -- nbdkit ...`: the server starts the command on socket
    activation, serves it, and stops it when it exits."""
    pidfile = tmp_path / "backing.pid"
    cmd = ["nbdkit", "-P", str(pidfile), "pattern", "2M"]
    opts = ["--", *cmd] if form == "dashdash" else ["[", *cmd, "]"]
    with start_server(None, "--cow-block-size", "4K", *opts, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        assert h.get_size() == 2 * MiB
        assert h.pread(8, MiB) == MiB.to_bytes(8, "big")
        h.pwrite(b"x" * 10, MiB)
        assert h.pread(10, MiB) == b"x" * 10
        h.shutdown()
        assert f"serving nbdkit -P {pidfile} pattern 2M " in proc.log_path.read_text()
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("args, words", [
    (["disk.img", "--", "nbdkit", "memory", "1M"], "not both"),
    (["--"], "is empty"),
    (["--", "/nonexistent/server"], "the backing command /nonexistent/server: command not found"),
])
def test_command_backing_errors(tmp_path, args, words):
    r = subprocess.run([sys.executable, "-P", "-m", "cow.server", *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cow_on_read_is_a_local_cache_of_a_remote_base(nbdkit, tmp_path):
    """virt-v2v's setting (4K blocks, cow-on-read): nbdcopy reads the disk twice; the second
    copy reads nothing from the backing, and both copies are the backing's bytes."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB)
    log = tmp_path / "backing.log"
    back = nbdkit("-r", "--filter=log", "file", disk, f"logfile={log}")
    with start_server(back, "--cow-block-size", "4K", "--cow-on-read", "true",
                      tmp_path=tmp_path) as (uri, _):
        first = tmp_path / "first.img"
        second = tmp_path / "second.img"
        subprocess.run(["nbdcopy", uri, str(first)], check=True, timeout=120)
        reads = backing_reads(log)
        blocks = [b for o, c in reads for b in range(o // 4096, (o + c + 4095) // 4096)]
        assert len(blocks) == len(set(blocks)), "a block was read from the backing twice"
        subprocess.run(["nbdcopy", uri, str(second)], check=True, timeout=120)
        assert backing_reads(log) == reads, "the second copy read the backing"
    data = disk.read_bytes()
    assert first.read_bytes() == data and second.read_bytes() == data


def test_backing_killed_mid_copy(held, tmp_path):
    """The backing dies while nbdcopy copies through the server, with --backing-wait 0 (no
    waiting for it to come back: test_backing_reconnect.py has the wait): the copy fails at once
    (EIO, no hang), the server stays up and serves the overlay, and its log says what broke.  The
    backing holds every request from the copy's start, so the copy is certainly under way, and
    unfinished, when the backing is killed."""
    disk = write_sample(tmp_path / "base.img", 64 * MiB, holes=False)
    back = held("file", disk, nbdkit_args=("-t", "64"))
    with start_server(back.uri, "--backing-wait", "0", tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        h.pwrite(b"k" * 65536, 0)
        back.hold()
        copy = subprocess.Popen(["nbdcopy", "-C", "4", uri, "null:"],
                                stderr=subprocess.PIPE, text=True)
        back.wait_for(r" (Read|Extents) id=\d+ ")          # the copy reached the backing
        assert copy.poll() is None
        back.proc.send_signal(signal.SIGKILL)
        back.proc.wait()
        _, err = copy.communicate(timeout=60)     # not a hang
        assert copy.returncode != 0 and "Input/output error" in err, err
        assert h.pread(65536, 0) == b"k" * 65536  # the overlay is still served
        with pytest.raises(nbd.Error) as ei:
            h.pread(4096, 32 * MiB)
        assert ei.value.errnum == errno.EIO
        h.shutdown()
        h2 = connect(uri)                          # and new clients are accepted
        assert h2.pread(4, 0) == b"kkkk"
        h2.shutdown()
        log = proc.log_path.read_text()
        assert "backing connection broke" in log and back.uri in log, log


def test_shim_keeps_a_slow_backing_busy(held, tmp_path):
    """The nbdkit shim over one backing connection (backing-connections=1): nbdkit's threads
    each wait for their own backing read, all on the engine's one libnbd handle, so a client's
    16 reads in flight are all in flight at the backing at once (it holds them until they
    are)."""
    from support_shim import run_shim

    back = held("pattern", "64M", "multi-conn-mode=disable", nbdkit_args=("-t", "64"),
                filters=("multi-conn",))
    with run_shim(back.uri, tmp_path / "shim.sock", "backing-connections=1") as server:
        h = connect(server.uri)
        back.hold()
        bufs = [(i * 65536, nbd.Buffer(65536)) for i in range(16)]
        cookies = [h.aio_pread(b, off) for off, b in bufs]
        try:
            back.wait_for(r" Read id=\d+ ", count=16)
            assert len(back.pending()) == 16
        finally:
            back.release()
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        assert all(b.to_bytearray()[:8] == off.to_bytes(8, "big") for off, b in bufs)
        h.shutdown()
    assert len(re.findall(r"connection=\d+ Connect ", back.text())) == 1
