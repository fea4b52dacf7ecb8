"""Hostile WRITE payloads and the GIL-free loop's edges, against a live server (issue 18, items 9
and 12).

* A large WRITE whose payload stops arriving: the connection ends after --payload-timeout, with
  one log line saying so; nothing is written at that offset; the server's descriptors come
  back; other clients are served meanwhile.  Over the spliced path (Engine.serve and
  Engine.pwrite_from) and the Python one (-v: _Receiver.read_into).
* Many such payloads at once: the pipes they hold stay within the process's pipe budget (the
  rest of each payload goes into memory), and every request is still served.
* A client that sends a large WRITE's payload only once it has the reply of the READ before it
  (it builds the payload from that reply): the reply must not be held back meanwhile.
* A file backing that shrinks while served: a read past its new end, large (sendfile) or small
  (pread), with and without structured replies, is an error or a connection that ends, never
  zeroes presented as data.
* A short write into the overlay (provoked with RLIMIT_FSIZE): the next system call starts at
  the sector boundary, never inside the sector (strace).

Times here are limits on waits for events (generous), never performance assertions."""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import nbd
import pytest

from support_engine import overlay_write_calls
from support_reliability import (
    CMD_READ, CMD_WRITE, EIO, RawClient, fd_count, run_server, thread_count, wait_until,
)

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
STALLED = 16 * MiB      # a WRITE of this size...
SENT = 8 * MiB          # ... of which only this much of the payload comes
TIMEOUT = 2             # --payload-timeout in these tests


@pytest.fixture
def disk(backing_factory):
    path = backing_factory(SIZE)
    return path, path.read_bytes()


def _baseline(srv):
    """Descriptors and threads of the idle server, after one connection that wrote a large
    payload (so that whatever is made once is made)."""
    threads = thread_count(srv.pid)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"\x01" * MiB, SIZE - MiB)
    h.shutdown()
    wait_until(lambda: thread_count(srv.pid) <= threads, what="the warm-up connection to end")
    return fd_count(srv.pid), threads


def _stall(srv, offset, structured=True):
    """A raw client that sends a WRITE of STALLED bytes at offset, SENT bytes of its payload in
    4 KiB sends (a pipe slot each when spliced: 1 MiB a pipe), then nothing more (it stays
    connected)."""
    c = RawClient(srv.sock, timeout=60)
    c.handshake(structured=structured, contexts=())
    c.request(CMD_WRITE, offset, STALLED, cookie=7)
    piece = b"\xee" * 4096
    for _ in range(SENT // len(piece)):
        c.send(piece)
    return c


def _served(srv, backing, offset):
    """Another client reads and writes meanwhile (a large write: spliced, or into memory once
    the pipe budget is spent)."""
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    try:
        assert h.pread(64 * KiB, offset) == backing[offset:offset + 64 * KiB]
        data = os.urandom(MiB)
        h.pwrite(data, SIZE - 2 * MiB)
        assert h.pread(MiB, SIZE - 2 * MiB) == data
    finally:
        h.shutdown()


def _unchanged(srv, backing, offset, count):
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    try:
        return h.pread(count, offset) == backing[offset:offset + count]
    finally:
        h.shutdown()


# ---------------------------------------------------------------- 9: a payload that stalls


@pytest.mark.parametrize("path", ["engine", "python"])
def test_a_stalled_large_write_times_out_and_gives_everything_back(disk, tmp_path, path):
    """The review's attack: a 16 MiB WRITE, half its payload, then silence.  Without a limit it
    held its pipes (or its buffer) and its thread for ever."""
    backing_path, backing = disk
    extra = ["-v"] if path == "python" else []
    with run_server(tmp_path, backing_path, "--payload-timeout", TIMEOUT, *extra) as srv:
        fds, threads = _baseline(srv)
        offset = 5 * MiB + 4096
        started = time.monotonic()
        c = _stall(srv, offset)
        try:
            _served(srv, backing, 1 * MiB)
            assert c.at_eof(timeout=30), "the stalled connection was not ended"
            waited = time.monotonic() - started
        finally:
            c.close()
        assert waited >= TIMEOUT * 0.9, f"ended after {waited:.1f} s, before the timeout"
        wait_until(lambda: fd_count(srv.pid) <= fds and thread_count(srv.pid) <= threads,
                   timeout=30, what=f"fds <= {fds} and threads <= {threads}")
        assert _unchanged(srv, backing, offset, STALLED)
        _served(srv, backing, 2 * MiB)
    log = srv.stderr()
    lines = [line for line in log.splitlines() if "stalled" in line]
    assert len(lines) == 1, log
    assert f"nothing received for {TIMEOUT} s (--payload-timeout)" in lines[0], lines


def test_a_stalled_small_write_times_out_too(disk, tmp_path):
    """A WRITE below the splice size, its payload cut short: Engine.serve's own receive."""
    backing_path, backing = disk
    with run_server(tmp_path, backing_path, "--payload-timeout", TIMEOUT) as srv:
        fds, threads = _baseline(srv)
        with RawClient(srv.sock, timeout=60) as c:
            c.handshake(contexts=())
            c.request(CMD_WRITE, 4096, 32 * KiB, cookie=3, payload=b"\xee" * 1000)
            assert c.at_eof(timeout=30), "the stalled connection was not ended"
        wait_until(lambda: fd_count(srv.pid) <= fds and thread_count(srv.pid) <= threads,
                   timeout=30, what=f"fds <= {fds} and threads <= {threads}")
        assert _unchanged(srv, backing, 0, 64 * KiB)
    assert "WRITE payload stalled" in srv.stderr()


def _limit_descriptors(n):
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return preexec


def test_many_stalled_writes_stay_within_the_pipe_budget(disk, tmp_path):
    """With RLIMIT_NOFILE at 256 the process keeps at most 256 // 8 = 32 pipes (64
    descriptors) for payloads.  Eight clients each stall half-way through a 16 MiB WRITE (8 MiB
    sent: eight full 1 MiB pipes each, 128 descriptors in all, if nothing capped them; before
    the budget the server reached its 256 and could accept nothing more): the server's
    descriptors stay within sockets + budget, the rest is received into memory, and another
    client is served meanwhile; once they time out, everything comes back."""
    backing_path, backing = disk
    budget_fds = 2 * (256 // 8)
    with run_server(tmp_path, backing_path, "--payload-timeout", 6,
                    preexec_fn=_limit_descriptors(256)) as srv:
        fds, threads = _baseline(srv)
        clients, errors = [], []
        lock = threading.Lock()

        def stall(i):
            try:
                c = _stall(srv, i * 6 * MiB + 4096, structured=bool(i % 2))
                with lock:
                    clients.append(c)
            except Exception as e:  # reported below
                errors.append(e)

        workers = [threading.Thread(target=stall, args=(i,)) for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not errors, errors
        # every stalled payload is in: in pipes or in memory (its sender's send returned)
        peak = fd_count(srv.pid)
        assert peak <= fds + len(clients) + budget_fds, \
            f"{peak} descriptors: over {fds} + {len(clients)} sockets + {budget_fds} of pipes"
        _served(srv, backing, 3 * MiB)
        peak = max(peak, fd_count(srv.pid))
        assert peak <= fds + len(clients) + budget_fds, peak
        try:
            for c in clients:
                assert c.at_eof(timeout=60), "a stalled connection was not ended"
        finally:
            for c in clients:
                c.close()
        wait_until(lambda: fd_count(srv.pid) <= fds and thread_count(srv.pid) <= threads,
                   timeout=30, what=f"fds <= {fds} and threads <= {threads}")
        for i in range(8):
            assert _unchanged(srv, backing, i * 6 * MiB + 4096, STALLED), i
    assert srv.stderr().count("WRITE payload stalled") == 8, srv.stderr()


# ---------------------------------------------------------------- 12a: replies before a payload


@pytest.mark.parametrize("path", ["engine", "python"])
def test_a_read_reply_leaves_before_the_next_writes_payload_is_waited_for(disk, tmp_path, path):
    """READ and a 1 MiB WRITE header in one send; the client sends the WRITE's payload, built
    from the READ's data, only once it has the READ's reply.  If the server held the reply back
    while it waits for the payload, both would wait for ever."""
    backing_path, backing = disk
    extra = ["-v"] if path == "python" else []
    with run_server(tmp_path, backing_path, *extra) as srv:
        with RawClient(srv.sock, timeout=20) as c:
            c.handshake(structured=False)
            for i in range(3):                          # also after a first round
                at = (i + 1) * MiB
                c.send(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 10 + i, 4096, 4096) +
                       struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 20 + i, at, MiB))
                try:
                    cookie, error, data, _ = c.reply(4096)
                except socket.timeout:
                    pytest.fail("the READ's reply was held back while the server waited for "
                                "the WRITE's payload")
                assert (cookie, error) == (10 + i, 0)
                assert data == backing[4096:8192]
                c.send(data * (MiB // 4096))
                assert c.reply()[:2] == (20 + i, 0)
                assert c.call(CMD_READ, at, 8192)[:2] == (0, data * 2)


# ---------------------------------------------------------------- 12b: a backing that shrinks


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("path", ["engine", "python"])
def test_a_shrunk_backing_never_reads_as_zeroes(tmp_path, structured, path):
    """The test owns the backing and truncates it from 16 MiB to 8 MiB while it is served.
    Reads past the new end, large (from the files with sendfile) and small (pread): each is an
    error reply, or the connection ends (a reply whose header was already sent), never zeroes
    presented as data.  Reads before the new end still work, and the server goes on."""
    data = os.urandom(16 * MiB)                 # no zeroes, no holes
    backing = tmp_path / "shrinks.img"
    backing.write_bytes(data)
    extra = ["-v"] if path == "python" else []
    with run_server(tmp_path, backing, *extra) as srv:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(srv.uri)
        assert h.pread(MiB, 12 * MiB) == data[12 * MiB:13 * MiB]   # in the page cache now
        h.shutdown()
        os.truncate(backing, 8 * MiB)
        for count, offset in [(MiB, 12 * MiB), (256 * KiB, 8 * MiB - 64 * KiB),
                              (4096, 12 * MiB), (4096, 8 * MiB - 2048)]:
            h = nbd.NBD()
            h.set_request_structured_replies(structured)
            h.connect_uri(srv.uri)
            try:
                got = h.pread(count, offset)
            except nbd.Error:
                got = None          # an error reply, or the connection ended
            finally:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
            assert got is None, f"read {count} at {offset} past the new end succeeded " \
                                f"({'zeroes' if got == bytes(count) else 'data'})"
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert h.pread(MiB, 6 * MiB) == data[6 * MiB:7 * MiB]
        assert h.pread(4096, 4096) == data[4096:8192]
        h.shutdown()
    assert "Traceback" not in srv.stderr()


def test_a_shrunk_backing_gets_an_error_reply_where_none_was_sent_yet(tmp_path):
    """With structured replies the engine looks for the backing's holes before it sends
    anything (SEEK_DATA): past the new end it finds none, so the READ gets an EIO error reply,
    and the connection goes on."""
    data = os.urandom(16 * MiB)
    backing = tmp_path / "shrinks.img"
    backing.write_bytes(data)
    with run_server(tmp_path, backing) as srv:
        os.truncate(backing, 8 * MiB)
        with RawClient(srv.sock) as c:
            c.handshake(structured=True, contexts=())
            for offset, count in [(12 * MiB, MiB), (8 * MiB - 4096, 128 * KiB),
                                  (12 * MiB, 4096)]:
                error, got, _ = c.call(CMD_READ, offset, count)
                assert error == EIO and not got, (offset, count, error)
            assert c.call(CMD_READ, 4096, 64 * KiB)[:2] == (0, data[4096:4096 + 64 * KiB])


# ---------------------------------------------------------------- 12c: short writes and sectors

SHORT_SCRIPT = r"""
import os, resource, socket, sys, threading
from cow.engine import Engine

backing, tmpdir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # Python ignores SIGXFSZ
total = 2 * 1024 * 1024
data = os.urandom(total)

def outcome(call):
    try:
        call()
        return "ok"
    except OSError as e:
        return f"errno {e.errno}"

# spliced: the payload goes through pipes into the (temporary) overlay
eng = Engine(backing, block_size="64K", tmpdir=tmpdir)
a, b = socket.socketpair()
t = threading.Thread(target=a.sendall, args=(data,))
t.start()
print("spliced", outcome(lambda: eng.pwrite_from(b.fileno(), total, 0)), flush=True)
t.join()
os.write(1, b"---\n")
eng.close()
# from memory
eng = Engine(backing, block_size="64K", tmpdir=tmpdir)
print("pwrite", outcome(lambda: eng.pwrite(data, 0)), flush=True)
os.write(1, b"---\n")
eng.close()
"""


def test_a_short_write_into_the_overlay_goes_on_from_the_sector_boundary(tmp_path):
    """A file-size limit 100 bytes into a sector (1.5 MiB in: inside one splice from a pipe)
    makes the kernel stop a write there (a full
    disk stops at a page boundary, but a limit stops anywhere): a splice or pwrite asked for
    whole sectors comes back short, inside a sector.  The next call must start at that
    sector's boundary (rewriting, whole, the bytes just written there), not inside the sector:
    every call the engine makes into the overlay starts and ends on sector boundaries (but the
    write's own ends).  Checked on the system calls, with strace."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(4 * MiB))
    overlays = tmp_path / "ov"
    overlays.mkdir()
    limit = 1536 * KiB + 100
    script = tmp_path / "short.py"
    script.write_text(SHORT_SCRIPT)
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=pwrite64,splice,write",
                          "-o", str(trace), sys.executable, "-P", str(script), str(backing),
                          str(overlays), str(limit)],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "spliced errno 27" in out and "pwrite errno 27" in out, out     # EFBIG
    groups = overlay_write_calls(trace.read_text(), str(overlays))
    assert len(groups) == 2, trace.read_text()[-3000:]
    for name, group in zip(("spliced", "pwrite"), groups):
        short = [i for i, (pos, asked, n) in enumerate(group)
                 if 0 < n < asked and (pos + n) % 512]
        assert short, f"{name}: no short call inside a sector, nothing checked: {group}"
        i = short[0]
        pos, _, n = group[i]
        assert group[i][0] + n == limit, group
        nxt = group[i + 1]
        assert nxt[0] == (pos + n) // 512 * 512, \
            f"{name}: after {group[i]}, the next call starts inside the sector: {nxt}"
