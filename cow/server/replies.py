"""The reply machinery: batches of inline replies (_ReplyBatch), reply buffers (_BufferPool,
_WorkerSpace), READs sent from the files (_PlannedReply), and the read budget (_ReadBudget).

Memory and descriptors.  READ replies held in memory (reads in flight to an NBD backing, READs read
by workers) are charged to a read budget, READ_BUDGET per connection and SERVER_READ_BUDGET in all
(_ReadBudget): a client at its budget is not read from until its replies leave, so one that never
reads them holds its budget and no more; large WRITE payloads have PAYLOAD_BUDGET per connection.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from cow.protocol import READ_REPLY_PREFIX
from cow.server.sockets import sendmsg_all
from cow.server.tuning import (
    BATCH_BUFFER,
    KEEP_BUFFER,
    MAX_BATCH_REPLIES,
    READ_ALWAYS,
    READ_BUDGET,
    READ_POOL_BUDGET,
    SERVER_READ_BUDGET,
)

if TYPE_CHECKING:
    from cow.server.connection import _Connection


class _ReadBudget:
    """Bytes of READ replies held in memory, per connection and server-wide.

    A reply's buffer is charged from before it is allocated until the reply has left (or
    failed): reads started over an NBD backing, READs read by workers, and under TLS a READ
    larger than the batch buffer.  A connection over its READ_BUDGET, or the server over
    SERVER_READ_BUDGET, waits before the next such READ, and its reader stops reading requests
    meanwhile: a client that never reads its replies holds at most its own budget, never the
    server's.  A connection with nothing charged may always take one READ however large
    (a request above the budget is served alone), as long as the server has room, or holds
    nothing, or it is at most READ_ALWAYS: so that however many clients hold their budgets,
    every other client can still have one READ of a usual size at a time.  The server holds
    at most SERVER_READ_BUDGET, plus READ_ALWAYS for each connection (whose receive and batch
    buffers cost about as much: --max-connections bounds both).  A waiter gives up with
    ESHUTDOWN once the server is shutting down, so that shutdown never waits for it."""

    __slots__ = ("per_connection", "total", "in_use", "waiting", "cond")

    def __init__(self, per_connection: int = READ_BUDGET, total: int = SERVER_READ_BUDGET):
        self.per_connection = per_connection
        self.total = total
        self.in_use = 0
        self.waiting = 0
        self.cond = threading.Condition(threading.Lock())

    def _fits(self, conn: _Connection, count: int) -> bool:
        mine, used = conn.read_in_use, self.in_use
        if mine and mine + count > self.per_connection:
            return False
        return not used or used + count <= self.total or (not mine and count <= READ_ALWAYS)

    def try_take(self, conn: _Connection, count: int) -> bool:
        with self.cond:
            if not self._fits(conn, count):
                return False
            conn.read_in_use += count
            self.in_use += count
            return True

    def take(self, conn: _Connection, count: int) -> None:
        """Charge count bytes to conn, waiting for room.  OSError(ESHUTDOWN) once the server
        is shutting down, OSError(ECONNRESET) once the connection is broken, if still waiting."""
        with self.cond:
            if not self._fits(conn, count):
                self.waiting += 1
                try:
                    while True:
                        if conn.stopping:
                            raise OSError(errno.ESHUTDOWN, "the server is shutting down")
                        if conn.broken:
                            raise OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
                        self.cond.wait(1.0)  # woken by give() and wake(); the timeout: a net
                        if self._fits(conn, count):
                            break
                finally:
                    self.waiting -= 1
            conn.read_in_use += count
            self.in_use += count

    def give(self, conn: _Connection, count: int) -> None:
        with self.cond:
            conn.read_in_use -= count
            self.in_use -= count
            if self.waiting:
                self.cond.notify_all()

    def wake(self) -> None:
        """Make every waiter look again (shutdown, a connection broken)."""
        with self.cond:
            if self.waiting:
                self.cond.notify_all()


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
        budget.take(conn, count)
        try:
            self.buf = conn._read_buffers.get(count)
        except BaseException:
            budget.give(conn, count)
            raise
        self.count = count
        return self.buf, 0

    def release(self) -> None:
        buf, self.buf = self.buf, None
        if buf is not None:
            conn = self.conn
            conn._read_buffers.put(buf)
            conn.server.read_budget.give(conn, self.count)


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
            conn.server.read_budget.take(conn, count)
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
                self.conn.server.read_budget.give(self.conn, self.charged)
                self.charged = 0


class _PlannedReply:
    """A READ reply sent from the files: the engine's plan (held until sent) and the reply's
    items (protocol.read_reply_items), which ReadPlan.send sends with sendfile."""

    __slots__ = ("plan", "items")

    def __init__(self, plan, items):
        self.plan = plan
        self.items = items

