"""The backing over NBD (cow/backing.pyx): many requests in flight on one connection, extra
connections only with multi-conn, a command as the backing, and a backing that dies.  The backing
server is real nbdkit; what it saw is read from its log filter."""

import errno
import os
import re
import signal
import subprocess
import threading
import time

import nbd
import pytest

from conftest import wait_for_socket
from cow import engine as E
from cow.backing import Backing
from support_engine import engines, states  # noqa: F401 - a fixture
from support_hold import held  # noqa: F401 - a fixture

NA, AL, TR = 0, 1, 3
KiB = 1024
MiB = 1024 * KiB


def max_in_flight(log):
    """Most read requests the server had at once, from nbdkit's log filter (each request is
    logged when it arrives and again when it returns)."""
    now = peak = 0
    for line in log.read_text().splitlines():
        if re.search(r" Read id=\d+ ", line):
            now += 1
            peak = max(peak, now)
        elif re.search(r" \.\.\.Read id=\d+ return", line):
            now -= 1
    return peak


def wait_for_log(log, pattern, count=1, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(re.findall(pattern, log.read_text())) >= count:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{pattern!r} not {count} times in {log}")


def slow_backing(nbdkit, log, *, multi_conn=False, delay="300ms", plugin=("memory", "64M")):
    """A backing that takes `delay` per read and, unless multi_conn, does not advertise multi-conn;
    nbdkit gets enough threads to have every request in flight at once."""
    args = ["-t", "64", "--filter=log"]
    params = [f"logfile={log}", f"rdelay={delay}"]
    if not multi_conn:
        args.append("--filter=multi-conn")
        params.append("multi-conn-mode=disable")
    args.append("--filter=delay")
    return nbdkit(*args, *plugin, *params)


@pytest.mark.parametrize("threads", [32])
def test_dozens_of_reads_in_flight_on_one_connection(held, engines, tmp_path, threads):
    """One libnbd handle (nbd_connections=1): every engine thread's read is in flight on it at
    once (the backing holds them until all have come), and each gets its own data."""
    back = held("pattern", "64M", "multi-conn-mode=disable", nbdkit_args=("-t", "64"),
                filters=("multi-conn",))
    eng = engines(back.uri, block_size="64K", nbd_connections=1)
    bs = eng.block_size
    results = [None] * threads

    def read(i):
        buf = bytearray(bs)
        eng.pread(buf, i * bs)
        results[i] = bytes(buf[:8])

    pool = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    back.hold()
    try:
        for t in pool:
            t.start()
        back.wait_for(r" Read id=\d+ ", count=threads)   # all at the backing together
        assert len(back.pending()) == threads, "backing reads waited for each other"
    finally:
        back.release()
    for t in pool:
        t.join(60)
    assert results == [(i * bs).to_bytes(8, "big") for i in range(threads)]
    assert len(re.findall(r"connection=\d+ Connect ", back.text())) == 1


def test_the_default_limit_is_lower_where_the_backing_advertises_multi_conn(nbdkit, tmp_path):
    """A server that advertises multi-conn serves many requests on one connection at once (more
    connections only cost CPU): 4 by default; one that does not (a request at a time per
    connection, as nbdkit's curl plugin): 8.  A limit given is kept either way."""
    from cow.backing import DEFAULT_CONNECTIONS, DEFAULT_CONNECTIONS_MULTI_CONN

    assert (DEFAULT_CONNECTIONS_MULTI_CONN, DEFAULT_CONNECTIONS) == (4, 8)
    with_mc = slow_backing(nbdkit, tmp_path / "a.log", multi_conn=True, delay="0")
    without = slow_backing(nbdkit, tmp_path / "b.log", delay="0")
    with Backing(with_mc) as b:
        assert b.max_connections == DEFAULT_CONNECTIONS_MULTI_CONN
    with Backing(without) as b:
        assert b.max_connections == DEFAULT_CONNECTIONS
    with Backing(with_mc, connections=8) as b:
        assert b.max_connections == 8


def test_one_connection_at_open_more_as_load_needs_them(nbdkit, tmp_path):
    """Extra connections are opened as load needs them, multi-conn or not (see
    test_backing_connections.py): at open there is one."""
    with_mc = slow_backing(nbdkit, tmp_path / "a.log", multi_conn=True, delay="0")
    without = slow_backing(nbdkit, tmp_path / "b.log", delay="0")
    with Backing(with_mc, connections=4) as b:
        assert b.connections == 1 and b.max_connections == 4
        assert b.is_nbd and b.size == 64 * MiB
    with Backing(without, connections=4) as b:
        assert b.connections == 1 and b.max_connections == 4
    with Backing(with_mc, connections=1) as b:
        assert b.connections == 1 and b.max_connections == 1


def test_copy_up_holds_up_only_its_own_block(held, engines, tmp_path):
    """A partial write copies its block up from a backing that holds the read; meanwhile
    writes, trims and zeroes of other blocks, including blocks that share a bitmap byte or would
    have shared a lock stripe, go through without waiting for it."""
    back = held("memory", "64M")
    eng = engines(back.uri, block_size="4K")
    bs = eng.block_size
    eng.pwrite(b"a" * bs, 1 * bs)
    eng.pwrite(b"a" * bs, 1025 * bs)
    copy_up = threading.Thread(target=eng.pwrite, args=(b"x" * 100, 2 * bs + 7))

    def other_blocks():
        eng.pwrite(b"y" * 100, 1 * bs + 9)             # same bitmap byte, allocated
        eng.trim(bs, 1026 * bs)                        # 1024 blocks further on
        eng.pwrite(b"z" * 100, 1025 * bs + 9)
        eng.zero(bs, 3 * bs, may_trim=False)

    others = threading.Thread(target=other_blocks)
    back.hold()
    try:
        copy_up.start()
        back.wait_for(rf" Read id=\d+ offset={hex(2 * bs)} ")   # held at the backing
        others.start()
        others.join(60)
        assert not others.is_alive(), "work on other blocks waited for a copy-up"
        assert copy_up.is_alive() and back.pending()
    finally:
        back.release()
    copy_up.join(30)
    others.join(30)
    assert states(eng)[:4] == [NA, AL, AL, AL]
    buf = bytearray(bs)
    eng.pread(buf, 2 * bs)
    assert buf[7:107] == b"x" * 100


def test_command_backing(engines, tmp_path):
    """A command that serves NBD on socket activation is the backing; closing stops it."""
    pidfile = tmp_path / "nbdkit.pid"
    eng = engines(["nbdkit", "-P", str(pidfile), "pattern", "3M"], block_size="64K")
    assert eng.backing_is_nbd and eng.size == 3 * MiB
    assert eng.backing == f"nbdkit -P {pidfile} pattern 3M"
    buf = bytearray(16)
    eng.pread(buf, 1 * MiB)
    assert buf == (1 * MiB).to_bytes(8, "big") + (1 * MiB + 8).to_bytes(8, "big")
    eng.pwrite(b"w" * 10, 1 * MiB)
    eng.pread(buf, 1 * MiB)
    assert buf[:10] == b"w" * 10
    pid = int(pidfile.read_text())
    os.kill(pid, 0)
    eng.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("argv, words", [
    (["/nonexistent/nbd-server"], "command not found"),
    (["false"], "exited with status 1 before serving NBD"),
    ([], "empty"),
])
def test_bad_command_backing(engines, argv, words):
    with pytest.raises((OSError, ValueError)) as ei:
        engines(argv)
    assert words in str(ei.value)


def test_backing_shared_by_engines(tmp_path, nbdkit):
    """One Backing under two engines: each has its own overlay; closing an engine leaves the
    backing open for the other."""
    uri = nbdkit("pattern", "1M")
    with Backing(uri) as b:
        e1 = E.Engine(b, tmpdir=str(tmp_path))
        e2 = E.Engine(b, tmpdir=str(tmp_path))
        e1.pwrite(b"one", 0)
        buf = bytearray(8)
        e2.pread(buf, 0)
        assert buf == bytes(8)                      # pattern: offset 0 reads as 0
        e1.close()
        e2.pread(buf, 8)
        assert buf == (8).to_bytes(8, "big")
        e2.close()
        assert not b.closed


class KillableBacking:
    """nbdkit started by the test itself, so that it can be killed with SIGKILL."""

    def __init__(self, tmp_path, *args):
        self.sock = tmp_path / "killable.sock"
        self.log = tmp_path / "killable.log"
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-t", "64", "-U", str(self.sock), "--filter=log", "--filter=delay",
             *args, f"logfile={self.log}"], stderr=subprocess.DEVNULL)
        wait_for_socket(self.sock, self.proc)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_dead_backing_fails_fast(engines, tmp_path, capfd):
    """The backing server dies with reads in flight, and reads wait for nothing (backing_wait=0;
    test_backing_reconnect.py has the wait): each of them fails with EIO at once, later reads that
    need the backing fail at once, copy-ups leave their blocks not allocated, the overlay is still
    served, and stderr says what broke."""
    back = KillableBacking(tmp_path, "pattern", "64M", "rdelay=30")
    try:
        eng = engines(back.uri, block_size="64K", cow_on_read=True, backing_wait=0)
        bs = eng.block_size
        eng.pwrite(b"o" * bs, 40 * bs)                      # in the overlay
        errors = []

        def read(i):
            try:
                eng.pread(bytearray(bs), i * bs)
            except OSError as e:
                errors.append(e.errno)

        def rmw(i):
            try:
                eng.pwrite(b"p" * 10, i * bs + 5)
            except OSError as e:
                errors.append(e.errno)

        pool = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        pool += [threading.Thread(target=rmw, args=(i,)) for i in range(8, 12)]
        for t in pool:
            t.start()
        wait_for_log(back.log, r" Read id=\d+ ", count=12)
        back.kill()
        deadline = time.monotonic() + 10                # not 30 s: no request waits for a reply
        for t in pool:
            t.join(max(0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in pool), "requests in flight hung on a dead backing"
        assert errors == [errno.EIO] * 12
        with pytest.raises(OSError) as ei:
            eng.pread(bytearray(100), 20 * bs)
        assert ei.value.errno == errno.EIO
        assert states(eng)[:40] == [NA] * 40, "a failed copy-up changed a block's state"
        buf = bytearray(bs)
        eng.pread(buf, 40 * bs)
        assert buf == b"o" * bs
        eng.pwrite(b"n" * bs, 41 * bs)                       # whole blocks need no backing
        eng.pread(buf, 41 * bs)
        assert buf == b"n" * bs
        assert eng.backing_error
        err = capfd.readouterr().err
        assert "backing connection broke" in err and back.uri in err
    finally:
        if back.proc.poll() is None:
            back.kill()


def test_read_of_a_piece_with_cow_on_read_reads_the_block_once(engines, nbdkit, tmp_path):
    """cow-on-read, a read of 100 bytes inside a block and one across two blocks' edges: each
    block is read from the backing once, whole, and installed; the data is right."""
    log = tmp_path / "backing.log"
    uri = nbdkit("--filter=log", "pattern", "1M", f"logfile={log}")
    eng = engines(uri, block_size="4K", cow_on_read=True)
    buf = bytearray(100)
    eng.pread(buf, 5 * 4096 + 10)
    big = bytearray(3 * 4096)
    eng.pread(big, 7 * 4096 + 2048)                 # half of 7, 8 and 9, half of 10
    reads = [(int(o, 16), int(c, 16)) for o, c in
             re.findall(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ", log.read_text())]
    blocks = sorted(b for o, c in reads for b in range(o // 4096, (o + c + 4095) // 4096))
    assert blocks == [5, 7, 8, 9, 10], reads
    assert states(eng)[5:11] == [AL, NA, AL, AL, AL, AL]
    h = nbd.NBD()
    h.connect_uri(uri)
    assert big == h.pread(3 * 4096, 7 * 4096 + 2048)
    assert buf == h.pread(100, 5 * 4096 + 10)
    h.shutdown()


def test_reads_started_without_waiting(engines, nbdkit, tmp_path):
    """Engine.pread_start: one thread starts 32 reads over a slow backing without waiting for
    any (all in flight at once at the server), and collects them from a ReadQueue; a read that
    is half overlay, half backing comes out whole; blocks the overlay holds are read at once."""
    log = tmp_path / "backing.log"
    uri = slow_backing(nbdkit, log, plugin=("pattern", "64M"))
    eng = engines(uri, block_size="64K")
    bs = eng.block_size
    eng.pwrite(b"o" * bs, 40 * bs)
    q = E.ReadQueue()
    bufs = {}
    for i in range(32):
        bufs[i] = bytearray(bs)
        assert eng.pread_start(bufs[i], i * bs, q, i) is False
    bufs["mixed"] = bytearray(2 * bs)
    assert eng.pread_start(bufs["mixed"], 39 * bs, q, "mixed") is False
    local = bytearray(100)
    assert eng.pread_start(local, 40 * bs + 5, q, "local") is True and local == b"o" * 100
    done = []
    while len(done) < 33:
        done += q.wait()
    assert sorted(done, key=str) == sorted([(i, 0) for i in range(32)] + [("mixed", 0)], key=str)
    assert all(bufs[i][:8] == (i * bs).to_bytes(8, "big") for i in range(32))
    assert bufs["mixed"][:8] == (39 * bs).to_bytes(8, "big") and bufs["mixed"][bs:] == b"o" * bs
    assert max_in_flight(log) >= 24
    assert q.pending == 0
    q.close()
    assert q.wait() == []


def test_reads_started_on_a_dead_backing_fail_with_eio(engines, tmp_path):
    back = KillableBacking(tmp_path, "pattern", "64M", "rdelay=30")
    try:
        eng = engines(back.uri, block_size="64K")
        q = E.ReadQueue()
        bufs = [bytearray(65536) for _ in range(4)]
        for i, b in enumerate(bufs):
            assert eng.pread_start(b, i * 65536, q, i) is False
        wait_for_log(back.log, r" Read id=\d+ ", count=4)
        back.kill()
        done = []
        while len(done) < 4:
            done += q.wait()
        assert sorted(done) == [(i, -errno.EIO) for i in range(4)]
        with pytest.raises(OSError) as ei:        # later: refused at once
            eng.pread_start(bytearray(10), 0, q, "late")
        assert ei.value.errno == errno.EIO
        eng.close()                                 # nothing left in flight
    finally:
        if back.proc.poll() is None:
            back.kill()


@pytest.mark.parametrize("why", ["cow-on-read-mixed", "global", "file"])
def test_reads_that_cannot_be_started_say_so(engines, nbdkit, tmp_path, why):
    """pread_start returns None where the read must be done with pread (the global lock, a
    file backing that pread serves as fast, a copy-up on read over blocks partly allocated)."""
    if why == "file":
        path = tmp_path / "f.img"
        path.write_bytes(b"f" * 3 * 65536)
        eng = engines(path)
    else:
        uri = nbdkit("pattern", "1M")
        eng = engines(uri, **({"cow_on_read": True} if why == "cow-on-read-mixed"
                              else {"lock_mode": "global"}))
        eng.pwrite(b"w" * 65536, 65536)
    q = E.ReadQueue()
    assert eng.pread_start(bytearray(3 * 65536), 0, q, "x") is None
    assert q.pending == 0
    eng.close()


def test_cow_on_read_started_reads_copy_up_once(engines, nbdkit, tmp_path):
    """cow-on-read, 4K blocks, reads started with pread_start (aligned, inside one block,
    across block edges): the data is right, every block touched is copied up when the read is
    collected, and reading it all again reads nothing from the backing."""
    log = tmp_path / "backing.log"
    uri = nbdkit("--filter=log", "pattern", "1M", f"logfile={log}")
    eng = engines(uri, block_size="4K", cow_on_read=True)
    q = E.ReadQueue()
    want = {}
    reads = [(0, 8192), (5 * 4096 + 10, 100), (7 * 4096 + 2048, 3 * 4096), (20 * 4096, 65536)]
    for i, (off, n) in enumerate(reads):
        buf = bytearray(n)
        assert eng.pread_start(buf, off, q, i) is False
        want[i] = (buf, off, n)
    done = []
    while len(done) < len(reads):
        done += q.wait()
    assert sorted(done) == [(i, 0) for i in range(len(reads))]
    h = nbd.NBD()
    h.connect_uri(uri)
    for buf, off, n in want.values():
        assert buf == h.pread(n, off)
    h.shutdown()
    st = states(eng)
    assert st[0:2] == [AL, AL] and st[5] == AL and st[7:11] == [AL] * 4
    assert st[20:36] == [AL] * 16 and st[2:5] == [NA] * 3
    before = log.read_text().count(" Read id=")
    for i, (off, n) in enumerate(reads):
        assert eng.pread_start(bytearray(n), off, q, i) is True      # all local now
    assert log.read_text().count(" Read id=") == before
