"""An NBD backing whose connection breaks (issue 19, item 2): it is connected again with backoff (a
command that exited is started again), reads that need it wait for it up to --backing-wait and
are sent again (a copy through six restarts of the backing is identical), then fail with EIO once
the limit passes; reads the overlay serves never wait; a backing that comes back as another disk
is refused; each change is one line in the log.  The backing is real nbdkit on a Unix socket,
started by the test so that it can be killed (SIGKILL: nbdkit ignores SIGTERM while a client is
connected) and started again on the same socket."""

import errno
import os
import re
import signal
import subprocess
import threading
import time

import nbd
import pytest

from conftest import wait_for_socket, write_sample
from support_engine import engines, states  # noqa: F401 - a fixture
from support_server import start_server

MiB = 1 << 20
NA = 0


class Restartable:
    """nbdkit serving a file on a Unix socket, killed (SIGKILL) and started again by the test."""

    def __init__(self, tmp_path, disk, *extra):
        self.sock = tmp_path / "back.sock"
        self.disk = disk
        self.extra = extra
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.proc = None
        self.start()

    def start(self, disk=None):
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=noparallel",
             "--filter=multi-conn", "--filter=delay", "file", str(disk or self.disk),
             "serialize=requests", "multi-conn-mode=disable", *self.extra],
            stderr=subprocess.DEVNULL)
        wait_for_socket(self.sock, self.proc)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        self.kill()


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def lines(log_path, words):
    return [ln for ln in log_path.read_text().splitlines() if words in ln]


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_a_copy_through_six_backing_restarts(tmp_path):
    """nbdcopy through the server while its backing is killed and started again six times: the
    copy completes with identical bytes; the log says each loss and each return once, never a
    traceback, and nothing gave up."""
    disk = write_sample(tmp_path / "base.img", 32 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=40ms")
    out = tmp_path / "out.img"
    try:
        with start_server(back.uri, "--backing-connections", "2",
                          tmp_path=tmp_path) as (uri, proc):
            copy = subprocess.Popen(["nbdcopy", "-C", "4", uri, str(out)],
                                    stderr=subprocess.PIPE, text=True)
            for i in range(1, 7):
                time.sleep(0.3)
                assert copy.poll() is None, "the copy ended before the restarts"
                back.kill()
                wait_for(lambda: len(lines(proc.log_path, "backing connection broke")) >= i,
                         "no line for the loss")
                back.start()
                wait_for(lambda: len(lines(proc.log_path, " is back, after ")) >= i,
                         f"the backing was not connected again:\n{proc.log_path.read_text()}")
            _, err = copy.communicate(timeout=120)
            assert copy.returncode == 0, err
            h = connect(uri)                # every read afterwards is right
            assert h.pread(1 * MiB, 7 * MiB) == disk.read_bytes()[7 * MiB:8 * MiB]
            h.shutdown()
            log = proc.log_path.read_text()
    finally:
        back.stop()
    assert out.read_bytes() == disk.read_bytes()
    assert len(lines(proc.log_path, "backing connection broke")) == 6, log
    assert len(lines(proc.log_path, " is back, after ")) == 6, log
    assert "Traceback" not in log and "has been down" not in log, log


def command_child(server_pid):
    """The backing command started by the server (its one child, started by any of its
    threads)."""
    kids = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        try:
            with open(f"/proc/{server_pid}/task/{task}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue        # a thread that ended meanwhile: it started no child
    assert len(kids) == 1, kids
    return kids[0]


def test_a_command_backing_that_is_killed_is_started_again(tmp_path):
    """A backing command killed during a copy is started again on its socket; the copy completes
    with identical bytes."""
    disk = write_sample(tmp_path / "base.img", 16 * MiB, holes=False)
    out = tmp_path / "out.img"
    with start_server(None, "--backing-connections", "2", "--", "nbdkit", "--filter=noparallel",
                      "--filter=delay", "file", disk, "serialize=requests", "rdelay=40ms",
                      tmp_path=tmp_path) as (uri, proc):
        first = command_child(proc.pid)
        assert first is not None
        copy = subprocess.Popen(["nbdcopy", "-C", "4", uri, str(out)],
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert copy.poll() is None
        os.kill(first, signal.SIGKILL)
        _, err = copy.communicate(timeout=120)
        assert copy.returncode == 0, err
        second = command_child(proc.pid)
        log = proc.log_path.read_text()
    assert second is not None and second != first, log
    assert out.read_bytes() == disk.read_bytes()
    assert len(lines(proc.log_path, "backing connection broke")) == 1, log
    assert len(lines(proc.log_path, " is back, after ")) == 1, log
    assert "Traceback" not in log


def test_a_backing_that_never_comes_back(tmp_path):
    """--backing-wait 2: with the backing gone, a read that needs it fails with EIO once the limit
    passes (not before), later ones fail at once, the overlay is still served, new clients are
    accepted, and one line says the server gave up."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        with start_server(back.uri, "--backing-wait", "2", tmp_path=tmp_path) as (uri, proc):
            h = connect(uri)
            h.pwrite(b"k" * 65536, 0)
            back.kill()
            t0 = time.monotonic()
            with pytest.raises(nbd.Error) as ei:
                h.pread(4096, 4 * MiB)
            assert ei.value.errnum == errno.EIO
            assert time.monotonic() - t0 >= 1.5, "it did not wait for the backing"
            t0 = time.monotonic()
            with pytest.raises(nbd.Error) as ei:
                h.pread(4096, 5 * MiB)
            assert ei.value.errnum == errno.EIO
            assert time.monotonic() - t0 < 1.5, "after giving up, it waited again"
            assert h.pread(65536, 0) == b"k" * 65536
            h.shutdown()
            h2 = connect(uri)
            assert h2.pread(4, 0) == b"kkkk"
            h2.shutdown()
            log = proc.log_path.read_text()
    finally:
        back.stop()
    given_up = lines(proc.log_path, "has been down for 2 s")
    assert len(given_up) == 1 and back.uri in given_up[0], log
    assert "fail with EIO until it is back" in given_up[0]
    assert len(lines(proc.log_path, "backing connection broke")) == 1, log
    assert "Traceback" not in log and " is back, after " not in log


def test_a_backing_that_comes_back_as_another_disk(tmp_path):
    """The backing comes back with another size: refused (one line), reads that need it still
    wait and then fail with EIO, the overlay is served; when the right disk comes back, it is
    used again."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    other = write_sample(tmp_path / "other.img", 4 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        with start_server(back.uri, "--backing-wait", "3", tmp_path=tmp_path) as (uri, proc):
            h = connect(uri)
            h.pwrite(b"k" * 65536, 0)
            back.kill()
            back.start(other)
            waiting = nbd.Buffer(4096)
            cookie = h.aio_pread(waiting, 1 * MiB)     # finds the backing gone, and waits
            wait_for(lambda: lines(proc.log_path, "came back as another disk"),
                     "no line for another disk")
            assert h.pread(65536, 0) == b"k" * 65536
            with pytest.raises(nbd.Error) as ei:
                while not h.aio_command_completed(cookie):
                    h.poll(1)
            assert ei.value.errnum == errno.EIO
            time.sleep(1)           # more attempts, all refused: still one line
            back.kill()
            back.start(disk)
            wait_for(lambda: lines(proc.log_path, " is back, after "), "not connected again")
            assert h.pread(4096, 1 * MiB) == disk.read_bytes()[1 * MiB:1 * MiB + 4096]
            h.shutdown()
            log = proc.log_path.read_text()
    finally:
        back.stop()
    other_lines = lines(proc.log_path, "came back as another disk")
    assert len(other_lines) == 1, log
    assert f"(size {4 * MiB}, was {8 * MiB}): refused" in other_lines[0], log
    assert "Traceback" not in log


def test_overlay_reads_never_wait_for_a_backing_that_is_down(tmp_path):
    """With the backing down and a read waiting for it, reads of blocks the overlay holds are
    answered, on the same connection and on another; the waiting read gets the right bytes once
    the backing is back."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        with start_server(back.uri, "--backing-wait", "120", tmp_path=tmp_path) as (uri, proc):
            h = connect(uri)
            h.pwrite(b"k" * 65536, 0)
            back.kill()
            waiting = nbd.Buffer(4096)
            cookie = h.aio_pread(waiting, 2 * MiB)
            h2 = connect(uri)
            done = threading.Event()

            def overlay_read():
                assert h2.pread(65536, 0) == b"k" * 65536
                done.set()

            t = threading.Thread(target=overlay_read)
            t.start()
            t.join(20)
            assert done.is_set(), "a read of the overlay waited for the backing"
            assert h.pread(65536, 0) == b"k" * 65536      # same connection, read in flight
            assert not h.aio_command_completed(cookie), "the backing read did not wait"
            assert back.proc.poll() is not None           # the backing is still down
            back.start()
            while not h.aio_command_completed(cookie):
                h.poll(1)
            assert waiting.to_bytearray() == disk.read_bytes()[2 * MiB:2 * MiB + 4096]
            h.shutdown()
            h2.shutdown()
    finally:
        back.stop()


def test_a_copy_up_caught_by_a_drop_leaves_its_block(engines, tmp_path):
    """A partial write (a copy-up from the backing) while the backing is down past its wait fails
    with EIO and leaves its block not allocated; once the backing is back it copies up whole.
    Engine.backing_error says what broke while the backing is down, None once it is back."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        eng = engines(back.uri, block_size="64K", backing_wait=1)
        bs = eng.block_size
        buf = bytearray(bs)
        eng.pread(buf, 0)
        assert eng.backing_error is None
        back.kill()
        with pytest.raises(OSError) as ei:
            eng.pwrite(b"p" * 10, 3 * bs + 5)
        assert ei.value.errno == errno.EIO
        assert states(eng)[3] == NA, "a failed copy-up changed its block's state"
        assert eng.backing_error
        back.start()
        wait_for(lambda: eng.backing_error is None, "not connected again")
        eng.pwrite(b"p" * 10, 3 * bs + 5)
        eng.pread(buf, 3 * bs)
        want = bytearray(disk.read_bytes()[3 * bs:4 * bs])
        want[5:15] = b"p" * 10
        assert buf == want
    finally:
        back.stop()


def test_the_shim_rides_out_a_backing_restart(tmp_path):
    """The nbdkit shim gets the same: a read waiting while the backing is down is answered once it
    is back (backing-wait=60)."""
    from support_shim import run_shim
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        with run_shim(back.uri, tmp_path / "shim.sock", "backing-wait=60") as server:
            h = connect(server.uri)
            assert h.pread(4096, 0) == disk.read_bytes()[:4096]
            back.kill()
            buf = nbd.Buffer(4096)
            cookie = h.aio_pread(buf, 3 * MiB)
            time.sleep(0.5)
            assert not h.aio_command_completed(cookie)
            back.start()
            while not h.aio_command_completed(cookie):
                h.poll(1)
            assert buf.to_bytearray() == disk.read_bytes()[3 * MiB:3 * MiB + 4096]
            h.shutdown()
    finally:
        back.stop()


@pytest.mark.parametrize("bad", ["-1", "x", "inf"])
def test_backing_wait_must_be_seconds(tmp_path, bad):
    from support_server import server_command
    r = subprocess.run(server_command(None, "-U", tmp_path / "s.sock", f"--backing-wait={bad}"),
                       capture_output=True, text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "--backing-wait" in last and "seconds >= 0" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_repeats_the_default_wait():
    from cow import backing, cli
    assert cli.DEFAULT_BACKING_WAIT == backing.DEFAULT_WAIT


def test_sigterm_while_a_read_waits_for_the_backing(tmp_path):
    """SIGTERM while a read waits for a backing that is down (--backing-wait 120): the read fails
    with EIO at once and the server exits 0 without waiting out the limit."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = Restartable(tmp_path, disk, "rdelay=0")
    try:
        with start_server(back.uri, "--backing-wait", "120", tmp_path=tmp_path) as (uri, proc):
            h = connect(uri)
            assert h.pread(4096, 0) == disk.read_bytes()[:4096]
            back.kill()
            buf = nbd.Buffer(4096)
            cookie = h.aio_pread(buf, 2 * MiB)
            time.sleep(0.5)
            assert not h.aio_command_completed(cookie)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(nbd.Error) as ei:
                while not h.aio_command_completed(cookie):
                    h.poll(1)
            assert ei.value.errnum == errno.EIO
            assert proc.wait(60) == 0
            assert time.monotonic() - t0 < 30, "the server waited out --backing-wait"
    finally:
        back.stop()
