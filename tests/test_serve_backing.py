"""Engine.serve over an NBD backing: READs of blocks not copied up are started by serve() itself,
which goes on reading requests, and answered by serve_replies without the GIL (cow/areads.pxi).
Driven directly over a socket pair, as cow.server's reader and served replier threads drive
them, against a real nbdkit whose requests are held (support_hold): the reads are all at the
backing at once, their replies leave as the backing answers, a failed read comes back to the
caller to answer, and the read slots and the read budget bound what is in flight."""

import errno
import socket
import struct
import threading

import pytest

from cow import protocol as P
from cow.engine import (
    REPLIED_BROKEN,
    REPLIED_END,
    REPLIED_FAILED,
    SERVE_EOF,
    SERVE_FAILED,
    Engine,
    ReadBudget,
    Transmission,
    serve_replies,
)
from support_hold import held  # noqa: F401 - a fixture
from test_serve import Session

KiB = 1024
MiB = 1024 * KiB
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQIQ")


def pattern(offset, count):
    """What nbdkit's pattern plugin reads: each 8-byte word is its own offset, big-endian."""
    return b"".join((offset + i).to_bytes(8, "big") for i in range(0, count, 8))


class Served:
    """An engine over uri, a socket pair, the Transmission with its budget, a reader thread
    running serve() and a replier thread running serve_replies(), as cow.server runs them."""

    def __init__(self, uri, *, structured=False, max_reads=64, budget=(32 * MiB, 256 * MiB)):
        self.engine = Engine(uri)
        self.client, self.server = socket.socketpair()
        self.tx = Transmission()
        self.budget = ReadBudget(budget[0], budget[1], 2 * MiB)
        self.tx.configure_reads(self.budget, max_reads, serve=True)
        self.tx.configure(self.server.fileno(), structured=structured, fua=True,
                          readonly=False, size=self.engine.size, max_payload=32 * MiB,
                          slow_backing=True, large_request=128 * KiB,
                          zero_copy_read=64 * KiB, zero_copy_write=64 * KiB,
                          recv_ahead=64 * KiB, exact_reads=16)
        self.rx = bytearray(256 * KiB)
        self.served = []        # (status, info) of every serve() return
        self.replied = []       # (status, info) of every serve_replies() return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.replier = threading.Thread(target=self._reply, daemon=True)
        self.reader.start()
        self.replier.start()

    def _read(self):
        start = end = 0
        while True:
            start, end, status, info = self.engine.serve(self.tx, self.rx, start, end)
            self.served.append((status, info))
            if status != SERVE_FAILED:
                return

    def _reply(self):
        while True:
            got = serve_replies(self.engine, self.tx)
            self.replied.append(got)
            if got[0] == REPLIED_END:
                return

    def read(self, offset, count, cookie):
        self.client.sendall(P.pack_request(P.NBD_CMD_READ, offset, count, cookie=cookie))

    recv_exact = Session.recv_exact   # n bytes from self.client

    def simple_reply(self, count):
        magic, error, cookie = SIMPLE.unpack(self.recv_exact(SIMPLE.size))
        assert magic == P.NBD_SIMPLE_REPLY_MAGIC
        return cookie, error, self.recv_exact(count) if not error else b""

    def finish(self):
        """End the stream; the reader returns SERVE_EOF, the replier REPLIED_END."""
        self.client.shutdown(socket.SHUT_WR)
        self.reader.join(30)
        self.tx.close_reads()
        self.replier.join(30)
        assert not self.reader.is_alive() and not self.replier.is_alive()

    def close(self):
        self.client.close()
        self.server.close()
        self.engine.close()


def send_held(s, back, n, *, at_backing):
    """Send n READs of 64 KiB (cookies 0..n-1) while the backing holds requests; once
    at_backing of them have reached it, note (reads at the backing, reads in flight, bytes
    charged to the connection), release the backing and check every reply.  Returns the note."""
    back.hold()
    for i in range(n):
        s.read(i * 64 * KiB, 64 * KiB, cookie=i)
    try:
        back.wait_for(r" Read id=\d+ ", count=at_backing)
        seen = (len(back.pending()), s.tx.reads_in_flight, s.tx.read_in_use)
    finally:
        back.release()
    got = {}
    for _ in range(n):
        cookie, error, data = s.simple_reply(64 * KiB)
        got[cookie] = (error, data)
    assert got == {i: (0, pattern(i * 64 * KiB, 64 * KiB)) for i in range(n)}
    return seen


@pytest.fixture
def served():
    made = []

    def make(uri, **kw):
        s = Served(uri, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_reads_that_need_the_backing_are_started_by_serve_and_answered_by_the_replier(
        held, served):  # noqa: F811 - a fixture
    """32 READs sent at once are all at the backing together while serve() waits for the
    next request (none is left to the front end), then answered, out of order or not, each
    with the backing's bytes."""
    back = held("pattern", "64M", nbdkit_args=("-t", "64"))
    s = served(back.uri)
    back.hold()
    for i in range(32):
        s.read(i * 64 * KiB, 64 * KiB, cookie=100 + i)
    try:
        back.wait_for(r" Read id=\d+ ", count=32)
        assert len(back.pending()) == 32
        assert s.tx.reads_in_flight == 32
        assert s.served == [] and s.replied == []       # nothing came back to Python
    finally:
        back.release()
    got = {}
    for _ in range(32):
        cookie, error, data = s.simple_reply(64 * KiB)
        got[cookie] = (error, data)
    assert got == {100 + i: (0, pattern(i * 64 * KiB, 64 * KiB)) for i in range(32)}
    s.finish()
    assert s.served == [(SERVE_EOF, None)]
    assert s.replied == [(REPLIED_END, None)]
    assert s.tx.reads_in_flight == 0 and s.tx.read_in_use == 0 and s.budget.in_use == 0


def test_structured_replies_carry_one_data_chunk(held, served):  # noqa: F811
    back = held("pattern", "16M")
    s = served(back.uri, structured=True)
    s.read(3 * MiB + 512, 200 * KiB, cookie=7)
    magic, flags, kind, cookie, length, offset = CHUNK.unpack(s.recv_exact(CHUNK.size))
    assert (magic, flags, kind, cookie, length, offset) == (
        P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 7,
        8 + 200 * KiB, 3 * MiB + 512)
    assert s.recv_exact(200 * KiB) == pattern(3 * MiB + 512, 200 * KiB)
    s.finish()


def test_a_read_the_backing_fails_comes_back_for_the_caller_to_answer(held, served):  # noqa: F811
    """nbdkit's error filter fails every read with EIO: serve_replies hands the read back
    (REPLIED_FAILED, with its errno) for the front end to word the reply, and sends nothing."""
    back = held("pattern", "16M", "error-pread=EIO", "error-pread-rate=1", filters=("error",))
    s = served(back.uri)
    s.read(5 * 64 * KiB, 64 * KiB, cookie=9)
    back.wait_for(r" Read id=\d+ ", count=1)
    s.finish()
    assert s.replied == [(REPLIED_FAILED, [(9, 0, 5 * 64 * KiB, 64 * KiB, errno.EIO)]),
                         (REPLIED_END, None)]
    s.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.client.recv(1)
    assert s.tx.reads_in_flight == 0 and s.budget.in_use == 0


def test_the_read_slots_bound_the_reads_in_flight(held, served):  # noqa: F811
    """With 4 slots, 12 READs sent at once reach the backing 4 at a time: serve() waits for a
    slot (sending what it holds back first) and goes on as replies leave."""
    back = held("pattern", "16M", nbdkit_args=("-t", "64"))
    s = served(back.uri, max_reads=4)
    assert send_held(s, back, 12, at_backing=4) == (4, 4, 256 * KiB)
    s.finish()
    assert back.text().count(" Read id=") >= 12


def test_the_read_budget_bounds_the_bytes_in_flight(held, served):  # noqa: F811
    """A per-connection budget of 256 KiB lets 4 READs of 64 KiB be in flight, not more."""
    back = held("pattern", "16M", nbdkit_args=("-t", "64"))
    s = served(back.uri, budget=(256 * KiB, 256 * MiB))
    at_backing, _, charged = send_held(s, back, 8, at_backing=4)
    assert (at_backing, charged) == (4, 256 * KiB)  # (the reader holds a fifth slot, waiting)
    assert s.budget.in_use == 0
    s.finish()
    assert s.budget.in_use == 0


def test_a_broken_connection_stops_a_reader_waiting_for_a_slot(held, served):  # noqa: F811
    back = held("pattern", "16M", nbdkit_args=("-t", "64"))
    s = served(back.uri, max_reads=1)
    back.hold()
    s.read(0, 64 * KiB, cookie=1)
    s.read(64 * KiB, 64 * KiB, cookie=2)
    back.wait_for(r" Read id=\d+ ", count=1)
    s.tx.mark_broken()
    s.client.shutdown(socket.SHUT_WR)
    s.reader.join(30)
    assert not s.reader.is_alive()
    (status, info), end = s.served
    assert status == SERVE_FAILED and info[0] == 2 and info[5].errno == errno.ECONNRESET
    assert end == (SERVE_EOF, None)
    back.release()
    s.tx.close_reads()
    s.replier.join(30)
    assert not s.replier.is_alive()
    assert s.tx.reads_in_flight == 0 and s.budget.in_use == 0


def test_a_client_gone_with_reads_in_flight_leaves_nothing_held(held, served):  # noqa: F811
    """The client hangs up with 16 reads held at the backing: once the backing answers, the
    replier finds the client gone (REPLIED_BROKEN, EPIPE), drops the rest, and every slot,
    byte of budget and buffer is given back."""
    back = held("pattern", "16M", nbdkit_args=("-t", "64"))
    s = served(back.uri)
    back.hold()
    for i in range(16):
        s.read(i * 64 * KiB, 64 * KiB, cookie=i)
    back.wait_for(r" Read id=\d+ ", count=16)
    s.client.close()
    s.reader.join(30)
    assert s.served == [(SERVE_EOF, None)]
    back.release()
    s.tx.close_reads()
    s.replier.join(30)
    assert not s.replier.is_alive()
    assert s.replied[0] == (REPLIED_BROKEN, errno.EPIPE)
    assert s.replied[-1] == (REPLIED_END, None)
    assert s.tx.reads_in_flight == 0 and s.tx.read_in_use == 0 and s.budget.in_use == 0
