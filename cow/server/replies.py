"""The reply machinery: batches of inline replies (_ReplyBatch), reply buffers (_BufferPool,
_WorkerSpace) and READs sent from the files (_PlannedReply).

Memory and descriptors.  READ replies held in memory (reads in flight to an NBD backing, READs read
by workers) are charged to the server's read budget (the engine's ReadBudget, shared with the reads
Engine.serve starts), READ_BUDGET per connection and SERVER_READ_BUDGET in all: a client at its
budget is not read from until its replies leave, so one that never reads them holds its budget and
no more; large WRITE payloads have PAYLOAD_BUDGET per connection.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from cow.protocol import READ_REPLY_PREFIX
from cow.server.sockets import sendmsg_all
from cow.server.tuning import (
    BATCH_BUFFER,
    KEEP_BUFFER,
    MAX_BATCH_REPLIES,
    READ_POOL_BUDGET,
)

if TYPE_CHECKING:
    from cow.server.connection import _Connection


class _WorkerSpace:
    """Where a worker lays out a READ reply: a buffer of the server's pool, charged to the read
    budget from get() (which may wait) until release(), after the reply has left."""

    __slots__ = ("conn", "buf", "count")

    def __init__(self, conn: _Connection):
        self.conn = conn
        self.buf = None
        self.count = 0

    def get(self, count: int) -> tuple[bytearray, int]:
        """(buffer, base): the reply header ends and the data begins at base+READ_REPLY_PREFIX."""
        conn = self.conn
        budget = conn.server.read_budget
        budget.take(conn.tx, count)
        try:
            self.buf = conn._read_buffers.get(count)
        except BaseException:
            budget.give(conn.tx, count)
            raise
        self.count = count
        return self.buf, 0

    def release(self) -> None:
        buf, self.buf = self.buf, None
        if buf is not None:
            conn = self.conn
            conn._read_buffers.put(buf)
            conn.server.read_budget.give(conn.tx, self.count)


class _BufferPool:
    """Reply buffers of reads in flight, kept for reuse by size class (powers of two), so that
    a stream of reads, over one connection or many short ones, does not map, fault in and
    unmap fresh memory for each one (measured: 19% of the server's CPU over a delayed NBD
    backing before the buffers were shared between connections)."""

    __slots__ = ("free", "idle", "lock")

    def __init__(self):
        self.free: dict[int, list[bytearray]] = {}
        self.idle = 0  # bytes kept
        self.lock = threading.Lock()  # the reader takes, the replier gives back

    def get(self, count: int) -> bytearray:
        """A buffer for a reply header and count bytes of data (of a size class up to
        KEEP_BUFFER, the exact size above: those are not kept)."""
        if count > KEEP_BUFFER:
            return bytearray(READ_REPLY_PREFIX + count)
        size = READ_REPLY_PREFIX + (1 << max(16, (count - 1).bit_length()))
        with self.lock:
            kept = self.free.get(size)
            if kept:
                self.idle -= size
                return kept.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        if size > READ_REPLY_PREFIX + KEEP_BUFFER:
            return
        with self.lock:
            if self.idle + size <= READ_POOL_BUDGET:
                self.free.setdefault(size, []).append(buf)
                self.idle += size


class _ReplyBatch:
    """The reader thread's replies, held back while more requests are already buffered and
    then sent together with one sendmsg.  Small READ replies are laid out one after another
    in one buffer, header just before data, so that nothing is copied to batch them."""

    __slots__ = ("conn", "buf", "pos", "replies", "nbytes", "charged")

    def __init__(self, conn: _Connection):
        self.conn = conn
        self.buf = bytearray(BATCH_BUFFER)
        self.pos = 0
        self.replies: list = []
        self.nbytes = 0
        self.charged = 0  # read budget of a one-off buffer, given back once it has left

    def get(self, count: int) -> tuple[bytearray, int]:
        need = READ_REPLY_PREFIX + count
        if need > len(self.buf):  # (under TLS: everything else is a worker's)
            self.flush()  # what is held back leaves first, and gives back its budget
            conn = self.conn
            conn.server.read_budget.take(conn.tx, count)
            self.charged = count
            return bytearray(need), 0
        if self.pos + need > len(self.buf):
            self.flush()
        base = self.pos
        self.pos = base + need
        return self.buf, base

    def add(self, reply) -> None:
        if reply.__class__ is _PlannedReply:  # sent now, after what is held back
            conn = self.conn
            try:
                with conn.send_lock:
                    reply.plan.send(conn.sock.fileno(), reply.items, self.replies)
            finally:
                reply.plan.release()
                self.replies.clear()
                self.nbytes = 0
                self.pos = 0
            return
        self.replies.append(reply)
        self.nbytes += len(reply)
        if self.nbytes >= BATCH_BUFFER or len(self.replies) >= MAX_BATCH_REPLIES:
            self.flush()

    def flush(self) -> None:
        replies = self.replies
        try:
            if replies:
                conn = self.conn
                with conn.send_lock:
                    if len(replies) == 1:
                        conn.sock.sendall(replies[0])
                    else:
                        sendmsg_all(conn.sock, replies)
                replies.clear()
                self.nbytes = 0
            self.pos = 0
        finally:
            if self.charged:
                self.conn.server.read_budget.give(self.conn.tx, self.charged)
                self.charged = 0


class _PlannedReply:
    """A READ reply sent from the files: the engine's plan (held until sent) and the reply's
    items (protocol.read_reply_items), which ReadPlan.send sends with sendfile."""

    __slots__ = ("plan", "items")

    def __init__(self, plan, items):
        self.plan = plan
        self.items = items

