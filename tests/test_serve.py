"""Engine.serve: the transmission loop that serves READ, WRITE and FLUSH without the GIL, driven
here directly over a socket pair, as cow.server's reader thread drives it.  What it serves, the
requests it leaves to the front end (with their header still in the receive buffer), and each
way it returns: a failed request, the end of the stream between requests and inside a payload,
the server's shutdown, the send lock shared with the front end's threads.  Every server test
goes through it too (it is cow.server's path unless --verbose or TLS)."""

import errno
import os
import queue
import socket
import struct
import threading
import time

import pytest

from cow import protocol as P
from cow.engine import (
    SERVE_EOF,
    SERVE_FAILED,
    SERVE_FRONT_END,
    SERVE_STOP,
    SERVE_TRUNCATED,
    Engine,
    Transmission,
)

KiB = 1024
SIZE = 1024 * KiB
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")


@pytest.fixture
def backing(tmp_path):
    data = bytearray(os.urandom(SIZE))
    data[512 * KiB:] = bytes(SIZE - 512 * KiB)         # a hole in the second half
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(data[:512 * KiB])
        f.truncate(SIZE)
    return path, bytes(data)


class Session:
    """An engine, a socket pair (client, server end) and a receive buffer, as cow.server has."""

    def __init__(self, path, *, structured=False, readonly=False, payload_timeout=None,
                 **engine_args):
        self.engine = Engine(str(path), **engine_args)
        self.client, self.server = socket.socketpair()
        self.tx = Transmission()
        self.tx.configure(self.server.fileno(), structured=structured, fua=True,
                          readonly=readonly, size=self.engine.size, max_payload=32 << 20,
                          slow_backing=False, large_request=128 * KiB,
                          zero_copy_read=64 * KiB, zero_copy_write=64 * KiB,
                          recv_ahead=64 * KiB, exact_reads=16,
                          payload_timeout=payload_timeout)
        self.rx = bytearray(256 * KiB)
        self.start = self.end = 0
        self.outbox = queue.SimpleQueue()
        self.sender = None

    def serve(self):
        self.start, self.end, status, info = self.engine.serve(self.tx, self.rx, self.start,
                                                               self.end)
        return status, info

    def send(self, cmd, offset=0, count=0, *, flags=0, cookie=1, payload=b""):
        """Queued for a sender thread: a socket pair holds less than some requests here."""
        self.send_raw(P.pack_request(cmd, offset, count, flags=flags, cookie=cookie) + payload)

    def send_raw(self, data):
        if self.sender is None:
            self.sender = threading.Thread(target=self._send_all, daemon=True)
            self.sender.start()
        self.outbox.put(data)

    def _send_all(self):
        while (data := self.outbox.get()) is not None:
            if data == b"EOF":
                self.client.shutdown(socket.SHUT_WR)
            else:
                self.client.sendall(data)

    def end_stream(self):
        self.send_raw(b"EOF")

    def recv_exact(self, n):
        out = bytearray()
        while len(out) < n:
            got = self.client.recv(n - len(out))
            assert got, "the server end closed"
            out += got
        return bytes(out)

    def simple_reply(self, data_len=0):
        magic, error, cookie = SIMPLE.unpack(self.recv_exact(SIMPLE.size))
        assert magic == P.NBD_SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv_exact(data_len) if data_len else b""

    def chunks(self):
        """The structured chunks of one reply, to the one flagged DONE."""
        out = []
        while True:
            magic, flags, kind, cookie, length = CHUNK.unpack(self.recv_exact(CHUNK.size))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
            out.append((kind, cookie, self.recv_exact(length)))
            if flags & P.NBD_REPLY_FLAG_DONE:
                return out

    def close(self):
        if self.sender is not None:
            self.outbox.put(None)
            self.sender.join(10)
        self.client.close()
        self.server.close()
        self.engine.close()


@pytest.fixture
def session(backing):
    sessions = []

    def make(**kw):
        s = Session(backing[0], **kw)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


def test_reads_writes_and_flushes_are_served_until_a_request_of_the_front_end(session, backing):
    s = session()
    disk = bytearray(backing[1])
    small, large = os.urandom(3000), os.urandom(200 * KiB)
    s.send(P.NBD_CMD_WRITE, 1000, len(small), cookie=1, payload=small)
    s.send(P.NBD_CMD_WRITE, 300 * KiB, len(large), cookie=2, payload=large, flags=P.NBD_CMD_FLAG_FUA)
    s.send(P.NBD_CMD_FLUSH, cookie=3)
    s.send(P.NBD_CMD_READ, 0, 8 * KiB, cookie=4)                   # read into memory
    s.send(P.NBD_CMD_READ, 290 * KiB, 100 * KiB, cookie=5)         # sent from the files
    s.send(P.NBD_CMD_TRIM, 0, 4096, cookie=6)                      # the front end's
    disk[1000:1000 + len(small)] = small
    disk[300 * KiB:300 * KiB + len(large)] = large
    status, info = s.serve()
    assert (status, info) == (SERVE_FRONT_END, None)
    header = bytes(s.rx[s.start:s.start + P.REQUEST_SIZE])
    assert header == P.pack_request(P.NBD_CMD_TRIM, 0, 4096, cookie=6)
    assert [s.simple_reply()[:2] for _ in range(3)] == [(0, 1), (0, 2), (0, 3)]
    assert s.simple_reply(8 * KiB) == (0, 4, bytes(disk[:8 * KiB]))
    assert s.simple_reply(100 * KiB) == (0, 5, bytes(disk[290 * KiB:390 * KiB]))


def test_structured_reads_describe_holes_unless_df(session, backing):
    s = session(structured=True)
    s.send(P.NBD_CMD_READ, 448 * KiB, 128 * KiB - 1, cookie=7)     # data, then the hole
    s.send(P.NBD_CMD_READ, 448 * KiB, 100 * KiB, cookie=8, flags=P.NBD_CMD_FLAG_DF)
    s.send(P.NBD_CMD_READ, 10, 100, cookie=9)
    s.end_stream()
    assert s.serve() == (SERVE_EOF, None)
    data, hole = s.chunks()
    assert data[:2] == (P.NBD_REPLY_TYPE_OFFSET_DATA, 7)
    assert data[2] == struct.pack(">Q", 448 * KiB) + backing[1][448 * KiB:512 * KiB]
    assert hole == (P.NBD_REPLY_TYPE_OFFSET_HOLE, 7, struct.pack(">QI", 512 * KiB, 64 * KiB - 1))
    (one,) = s.chunks()
    assert one == (P.NBD_REPLY_TYPE_OFFSET_DATA, 8,
                   struct.pack(">Q", 448 * KiB) + backing[1][448 * KiB:548 * KiB])
    (small,) = s.chunks()
    assert small == (P.NBD_REPLY_TYPE_OFFSET_DATA, 9, struct.pack(">Q", 10) + backing[1][10:110])


@pytest.mark.parametrize("request_", [
    P.pack_request(P.NBD_CMD_READ, 0, 512, magic=0x12345678),          # out of step
    P.pack_request(P.NBD_CMD_READ, SIZE - 512, 1024),                  # beyond the end
    P.pack_request(P.NBD_CMD_READ, 0, 0),                              # empty
    P.pack_request(P.NBD_CMD_READ, 0, 512, flags=P.NBD_CMD_FLAG_DF),   # DF, no structured
    P.pack_request(P.NBD_CMD_READ, 0, 128 * KiB),                      # large: the workers'
    P.pack_request(P.NBD_CMD_WRITE, 0, 512, flags=1 << 9),             # an unknown flag
    P.pack_request(P.NBD_CMD_FLUSH, 0, 512),                           # FLUSH with a length
    P.pack_request(P.NBD_CMD_BLOCK_STATUS, 0, 512),
    P.pack_request(P.NBD_CMD_DISC),
])
def test_what_is_not_served_stays_in_the_buffer_for_the_front_end(session, request_):
    s = session()
    s.send_raw(request_ + bytes(512))
    assert s.serve() == (SERVE_FRONT_END, None)
    assert bytes(s.rx[s.start:s.start + P.REQUEST_SIZE]) == request_
    s.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.client.recv(1)                                # and nothing was answered


def test_writes_to_a_read_only_export_are_the_front_ends(session):
    s = session(readonly=True)
    s.send(P.NBD_CMD_WRITE, 0, 512, payload=bytes(512))
    assert s.serve() == (SERVE_FRONT_END, None)


def test_a_failed_request_is_consumed_and_handed_back(session, backing):
    s = session(overlay_max_size="64K")
    s.send(P.NBD_CMD_WRITE, 0, 4096, cookie=1, payload=b"a" * 4096)
    s.send(P.NBD_CMD_WRITE, 256 * KiB, 4096, cookie=2, payload=b"b" * 4096)   # over the cap
    s.send(P.NBD_CMD_READ, 0, 4096, cookie=3)
    status, info = s.serve()
    assert status == SERVE_FAILED
    cookie, cmd, flags, offset, count, e = info
    assert (cookie, cmd, flags, offset, count) == (2, P.NBD_CMD_WRITE, 0, 256 * KiB, 4096)
    assert e.errno == errno.ENOSPC and "pwrite offset=262144 count=4096" in e.strerror
    assert s.simple_reply() == (0, 1, b"")
    s.end_stream()
    assert s.serve() == (SERVE_EOF, None)               # and the next request is served
    assert s.simple_reply(4096) == (0, 3, b"a" * 4096)


@pytest.mark.parametrize("count", [4096, 256 * KiB])
def test_a_payload_cut_short_writes_nothing(session, backing, count):
    s = session()
    s.send(P.NBD_CMD_WRITE, 0, count, payload=b"x" * (count - 100))
    s.end_stream()
    assert s.serve()[0] == SERVE_TRUNCATED
    out = bytearray(count)
    s.engine.pread(out, 0)
    assert out == backing[1][:count]


@pytest.mark.parametrize("count", [4096, 256 * KiB])
def test_a_payload_that_stops_arriving_times_out_and_writes_nothing(session, backing, count):
    """Small (received into the buffer) and large (spliced): nothing for 0.5 s inside the
    payload ends serve() with SERVE_TRUNCATED, info ETIMEDOUT; the stream stays open."""
    s = session(payload_timeout=0.5)
    s.send(P.NBD_CMD_WRITE, 0, count, payload=b"x" * (count // 2))
    assert s.serve() == (SERVE_TRUNCATED, errno.ETIMEDOUT)
    out = bytearray(count)
    s.engine.pread(out, 0)
    assert out == backing[1][:count]


def test_replies_held_back_leave_before_a_large_payload_is_waited_for(session, backing):
    """A READ and a large WRITE's header arrive together; the client sends the payload only
    once it has the READ's reply (it builds the payload from it)."""
    s = session(payload_timeout=30)
    out = []
    s.client.sendall(P.pack_request(P.NBD_CMD_READ, 0, 4096, cookie=1) +
                     P.pack_request(P.NBD_CMD_WRITE, 128 * KiB, 128 * KiB, cookie=2))
    t = threading.Thread(target=lambda: out.append(s.serve()), daemon=True)
    t.start()
    s.client.settimeout(10)
    try:
        error, cookie, data = s.simple_reply(4096)
    except TimeoutError:
        pytest.fail("the READ's reply was held back while serve() waited for the payload")
    assert (error, cookie, data) == (0, 1, backing[1][:4096])
    s.client.sendall(data * 32)
    assert s.simple_reply()[:2] == (0, 2)
    s.client.shutdown(socket.SHUT_WR)
    t.join(10)
    assert out == [(SERVE_EOF, None)]
    got = bytearray(128 * KiB)
    s.engine.pread(got, 128 * KiB)
    assert got == data * 32


def test_stop_before_waiting_returns_at_once(session):
    s = session()
    s.tx.stop()
    assert s.serve() == (SERVE_STOP, None)
    s.client.sendall(P.pack_request(P.NBD_CMD_READ, 0, 512))
    assert s.serve() == (SERVE_FRONT_END, None)         # the front end says ESHUTDOWN


def test_a_waiting_serve_is_seen_waiting_and_woken_by_shutting_the_socket(session):
    """cow.server's begin_shutdown: stop(), then, if serve() is waiting, shut the socket for
    reading; serve() then sees the end of the stream."""
    s = session()
    out = []
    t = threading.Thread(target=lambda: out.append(s.serve()))
    t.start()
    deadline = time.monotonic() + 10
    while not s.tx.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.tx.waiting
    s.tx.stop()
    s.server.shutdown(socket.SHUT_RD)
    t.join(10)
    assert out == [(SERVE_EOF, None)] and not s.tx.waiting


def test_replies_wait_for_the_send_lock(session, backing):
    s = session()
    with s.tx:                                          # another thread is sending a reply
        s.send(P.NBD_CMD_READ, 0, 512, cookie=5)
        t = threading.Thread(target=s.serve)
        t.start()
        s.client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.client.recv(1)
    s.client.settimeout(10)
    assert s.simple_reply(512) == (0, 5, backing[1][:512])
    s.end_stream()
    t.join(10)


def test_reads_served_in_memory_must_fit_the_replies_held_back(session):
    s = session()
    with pytest.raises(ValueError, match="large_request"):
        s.tx.configure(s.server.fileno(), structured=False, fua=True, readonly=False,
                       size=SIZE, max_payload=32 << 20, slow_backing=False,
                       large_request=1 << 20, zero_copy_read=64 * KiB,
                       zero_copy_write=64 * KiB, recv_ahead=64 * KiB, exact_reads=16)
