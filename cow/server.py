"""python -m cow.server: serve the copy-on-write view of a backing image over NBD.

This module owns the sockets and the threads; the NBD wire format lives in
``cow/protocol.py``, the copy-on-write in the compiled ``cow.engine``, and the
command line (argv, start-up, shutdown) in ``cow/cli.py``.  Per
request: recv -> decode -> validate -> one engine call (GIL released) -> encode
-> send.

Concurrency.  Each connection has one thread that reads requests and serves
them itself, inline: on this 2-core machine a hand-off per request to another
thread costs more than a small request (4 fio jobs x depth 8, 4 KiB random
reads: ~110k/s inline against ~45k/s through 4 workers per connection).
Requests on other connections run in parallel because the engine releases the
GIL.  Overlap within a connection is used only where it pays: large READ/WRITE
(from 128 KiB), whose transfer then overlaps with the next request's, and, when
the backing is an NBD server (a request may wait milliseconds for it), every
request that will read the backing (the engine says which).  A READ of blocks
not yet copied up is started with the engine's pread_start and the reader goes
on: the engine fills the reply's buffer as the backing answers, and the
connection's replier thread sends finished replies, all that finished together
in one sendmsg.  So a client's whole queue depth becomes backing reads in
flight with no thread each (a thread per request measured 2.6x the context
switches and 1.8x the CPU).  The rest (a READ with cow-on-read, a CACHE or
BLOCK_STATUS there, a WRITE, ZERO or TRIM whose partial head or tail block
needs a copy-up) goes to worker threads of the connection, started as they are
needed, up to one per request in flight (``-t`` caps them).  Replies then leave
out of order, each written whole under the connection's send lock.

Data path.  Requests are received with ``recv_into`` into a reusable buffer
(several small requests per system call when the client pipelines); small WRITE
payloads are handed to the engine as views of that buffer.  WRITE payloads from
ZERO_COPY_WRITE (64 KiB) never enter this process: the reader hands the socket to
the engine (Engine.pwrite_from), which receives the payload whole into pipes with
splice and splices it on into the overlay, and the next few requests are read
without reading ahead, so that the next large payload is still in the socket.
Under TLS, over an NBD backing for partial blocks not copied up, and over the
maximum size, large payloads are received straight into one of a few reusable
payload buffers of the connection and written by a worker.
READs from ZERO_COPY_READ (64 KiB) are not read at all: the engine says where their
bytes are (Engine.read_plan: pieces of the overlay, of a file backing, or zeroes) and the reply
leaves with sendfile from those files, header first, whole, under the send lock
(ReadPlan.send, one call with the GIL released).  With structured replies, the zero pieces
(trimmed blocks, the backing's holes) go out as NBD_REPLY_TYPE_OFFSET_HOLE chunks, unless the
client set NBD_CMD_FLAG_DF.  Under TLS, over an NBD backing for blocks not copied up, and
below that size, the engine reads READ data into a reusable buffer just behind the reply
header, so that header and data leave together.  Replies served inline are held
back while the next request is already in the receive buffer, then leave with
one ``sendmsg`` (never delaying a reply while the reader would wait for input);
the socket's send buffer is raised so that a large reply leaves in one call.

Views.  What a client gets is chosen by export name from a catalog (cow.protocol.Exports):
one engine for every name the server answers to, or, with --overlay-dir / --temporary-views, a
view per name (cow/views.py), opened at NBD_OPT_GO and given back when the connection ends, after
its last request; the last client of a view flushes and closes it.  A connection serves every
request with the engine of its own view, reads started over an NBD backing included.

Hostile clients and TLS.  The whole handshake (TLS included) must finish within
``--handshake-timeout`` seconds, so a client that connects and sends nothing, or
drips bytes, is dropped and its thread freed; ``--max-connections`` closes
connections beyond the limit at once, before the greeting.  TLS (``cow/tls.py``
builds the context) starts on NBD_OPT_STARTTLS; under TLS a connection is served
entirely on its own thread, without workers (an OpenSSL connection must not be
read and written from two threads at once), and its TLS session is shut down
(close_notify) before the socket is closed.

Memory and descriptors.  READ replies held in memory (reads in flight to an NBD backing, READs
read by workers) are charged to a read budget, READ_BUDGET per connection and
SERVER_READ_BUDGET in all (_ReadBudget): a client at its budget is not read from until its
replies leave, so one that never reads them holds its budget and no more; large WRITE payloads
have PAYLOAD_BUDGET per connection.  When accept fails for want of descriptors or memory, the
listeners rest (Server.accept_rest) instead of being polled in a loop; the client waits in the
listen backlog, the connections already open are served, and the log says so once a second at
most.  Nothing sent to a client names a path of this server or the backing's command line:
error replies carry what the errno means (client_message), the log keeps the detail.

Shutdown.  At SIGTERM requests in flight finish; requests that arrive after
shutdown began are answered NBD_ESHUTDOWN and options NBD_REP_ERR_SHUTDOWN (the
spec's SHOULDs), so that clients learn why the connection ends.  A connection in
transmission ends once nothing is in flight; one still in the handshake gets a
few seconds to hear why; after a grace period clients that do not read their
replies are cut off.
"""

from __future__ import annotations

if __name__ == "__main__":
    # python -m cow.server: the command line (cow/cli.py).  It imports this module, and with it
    # the compiled engine, only to serve: --help needs no engine, and a missing one is one line.
    import sys

    from cow.cli import main

    sys.exit(main())

import contextlib
import errno
import logging
import math
import os
import queue
import socket
import ssl
import sys
import threading
import time
import traceback

from cow import protocol as P
from cow.engine import (
    SERVE_BROKEN,
    SERVE_EOF,
    SERVE_FAILED,
    SERVE_TRUNCATED,
    ReadQueue,
    Transmission,
)
from cow.protocol import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    READ_REPLY_PREFIX,
    REQUEST_SIZE,
)

log = logging.getLogger("cow.server")

# Over a slow backing, what may read it (the engine says whether it will) goes to workers.
_READS_BACKING = frozenset((NBD_CMD_READ, NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS))
_WRITES_PARTIAL = frozenset((NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM))
_SERVED_BY_ENGINE = frozenset((NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH))  # (Engine.serve)

MAX_QUEUED_PER_CONNECTION = 64  # requests handed to workers and not yet answered (and the
                                # most workers a connection starts over an NBD backing)
RECV_BUFFER = 256 * 1024  # per connection: request headers and small WRITE payloads
RECV_CHUNK = 64 * 1024  # most a recv asks for beyond what the current message needs
LARGE_REQUEST = 128 * 1024  # READ/WRITE from this size go to the connection's workers
LARGE_WORKERS = 8  # most workers of a connection over a file backing, where only large
                   # requests go to them (a client's usual queue depth)
PAYLOAD_BUDGET = 32 * 1024 * 1024  # bytes of large WRITE payloads received and not yet
                                   # written, per connection (one request may exceed it)
KEEP_PAYLOAD_BUFFERS = 8  # idle payload buffers a connection keeps for reuse
BATCH_BUFFER = 512 * 1024  # inline replies held back while more requests are buffered
MAX_BATCH_REPLIES = 256  # ... and at most this many of them (well under IOV_MAX)
KEEP_BUFFER = 4 * 1024 * 1024  # larger one-off buffers are not kept between requests
READ_POOL_BUDGET = 64 * 1024 * 1024  # idle read reply buffers the server keeps for reuse
READ_BUDGET = 32 * 1024 * 1024  # bytes of READ replies a connection may hold in memory at once
                                # (reads in flight to an NBD backing, READs read by workers):
                                # a client at it is not read from until replies leave (one
                                # request may exceed it)
SERVER_READ_BUDGET = 256 * 1024 * 1024  # ... and every connection together
READ_ALWAYS = 2 * 1024 * 1024  # a connection holding no READ reply may take one this large
                               # whatever the server holds: clients that never read their
                               # replies, however many, cannot stop the others' (usual) READs
SOCKET_BUFFER = 4 * 1024 * 1024  # SO_SNDBUF asked for (the kernel caps it at wmem_max)
ZERO_COPY_READ = 64 * 1024  # READs from this size are sent from the files (sendfile), and with
                            # structured replies their holes as OFFSET_HOLE chunks
ZERO_COPY_WRITE = 64 * 1024  # WRITE payloads from this size go from the socket to the overlay
                             # with splice (Engine.pwrite_from): sequential 1 MiB writes 1.7x
                             # the copying path and half its CPU, random 64 KiB rw 1.1x
EXACT_READS = 16  # requests read without reading ahead after such a WRITE
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to transmission (qemu-nbd's default)
DEFAULT_PAYLOAD_TIMEOUT = 60.0  # seconds a WRITE payload may stop arriving (see _Receiver)
SHUTDOWN_GRACE = 20.0  # seconds for in-flight requests at SIGTERM before sends are cut off
SHUTDOWN_HANDSHAKE_WAIT = 5.0  # seconds a client still haggling at SIGTERM may go on (its
                               # options are answered NBD_REP_ERR_SHUTDOWN) before it is dropped
LINGER = 2.0  # seconds a closing connection waits for the client (see _Connection._close)
ACCEPT_REST_FIRST = 0.05  # seconds the listeners rest after accept runs out of descriptors or
ACCEPT_REST_MAX = 1.0     # memory, doubled while it goes on, up to this
ACCEPT_LOG_INTERVAL = 1.0  # at most one line this often about failing accepts, and twice
ACCEPT_LOG_INTERVAL_MAX = 60.0  # that after each while it goes on, up to this
# accept(2) failures that mean "not now": a descriptor or memory comes back when a connection
# ends, and the client waits in the listen backlog meanwhile
_ACCEPT_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _shutdown_socket(sock, how) -> None:
    """shutdown(2) on the descriptor.  Not SSLSocket.shutdown(), which also drops the TLS
    state: another thread still using the socket would then read and write in clear text."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def nbd_error_from_errno(err: int | None) -> int:
    """Map an OSError errno from the engine to the NBD error a client is sent."""
    if err in (errno.EPERM, errno.EROFS):
        return P.NBD_EPERM
    if err == errno.ENOMEM:
        return P.NBD_ENOMEM
    if err == errno.EINVAL:
        return P.NBD_EINVAL
    if err in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return P.NBD_ENOSPC
    if err == errno.EOVERFLOW:
        return P.NBD_EOVERFLOW
    if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return P.NBD_ENOTSUP
    if err == errno.ESHUTDOWN:
        return P.NBD_ESHUTDOWN
    return P.NBD_EIO


def client_message(e: Exception) -> str:
    """The text an error reply carries for an engine error: what its errno means, nothing
    more.  The engine's own text (e.strerror, str(e)) may name a path of this server (the
    overlay's folder, the backing's path, URI or command line); with -v the log keeps it."""
    err = getattr(e, "errno", None)
    if err == errno.ESHUTDOWN:
        return "the server is shutting down"
    if isinstance(e, OSError):
        return os.strerror(err) if err else "input/output error"
    return "invalid request"  # a ValueError: the request does not fit the disk or the engine


# ---- receiving -------------------------------------------------------------------------------

class _PayloadWait:
    """``with``: the receiver's socket waits at most payload_timeout seconds for each recv of a
    payload's bytes, and a wait that runs out raises TimeoutError saying so (see _Receiver).
    Made for each wait, not kept by the receiver: a reference back from it would keep every
    closed connection's receive buffer until the garbage collector's next cycle."""

    __slots__ = ("rx",)

    def __init__(self, rx: _Receiver):
        self.rx = rx

    def __enter__(self) -> None:
        if self.rx.payload_timeout:
            self.rx.sock.settimeout(self.rx.payload_timeout)

    def __exit__(self, kind, e, tb) -> None:
        if self.rx.payload_timeout:
            self.rx.sock.settimeout(None)
            if kind is not None and issubclass(kind, TimeoutError):
                raise TimeoutError(self.rx.stalled()) from None


_NO_LIMIT = contextlib.nullcontext()


class _Receiver:
    """Buffered exact reads from a blocking socket, without per-request allocation.

    ``read(n)`` (n up to the capacity) returns a memoryview that stays valid until the next
    call: the caller uses it (decodes a header, hands a payload to the engine) before reading
    again.  ``read_into(dst)`` fills a buffer the caller owns (large payloads land there
    directly).  Each recv asks for at most RECV_CHUNK bytes, so that a large payload behind a
    header is mostly received straight into its own buffer rather than copied.

    A WRITE payload that stops arriving (``read(n, payload=True)``, ``read_into``, ``skip``)
    raises TimeoutError after ``payload_timeout`` seconds with nothing received (None: no
    limit): the time between bytes is limited, not the whole payload's, so a slow client on a
    slow link keeps going while it makes progress.  Without a limit, a payload that never
    comes would hold its buffer (and, in the engine, its pipes) for ever.  The socket's
    timeout is set only around a payload not yet buffered, where a recv is needed anyway; the
    wait for the next request has no limit (NBD clients may stay idle).
    """

    def __init__(self, sock: socket.socket, capacity: int = RECV_BUFFER,
                 payload_timeout: float | None = DEFAULT_PAYLOAD_TIMEOUT):
        self.sock = sock
        self.capacity = capacity
        self.buf = bytearray(capacity)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.payload_timeout = payload_timeout or None
        # While > 0, read() asks for exactly what it needs, so that a large WRITE's payload
        # stays in the socket for the engine to splice (see _Connection._splice_write).
        self.exact = 0

    def stalled(self) -> str:
        """What the log says of a payload that stopped arriving."""
        return (f"WRITE payload stalled: nothing received for {self.payload_timeout:g} s "
                f"(--payload-timeout): nothing written, closing")

    def read(self, n: int, payload: bool = False) -> memoryview | None:
        """n bytes (n <= capacity), or None if the stream ends first.  payload: they are a
        WRITE's payload, whose wait is limited (TimeoutError)."""
        start = self.start
        if self.end - start >= n:
            self.start = start + n
            return self.mv[start:start + n]
        if start + n > self.capacity:  # make room: move the partial message to the front
            have = self.end - start
            self.mv[:have] = self.mv[start:self.end]
            self.start, self.end = 0, have
        recv_into, mv = self.sock.recv_into, self.mv
        ahead = 0 if self.exact else RECV_CHUNK
        with _PayloadWait(self) if payload else _NO_LIMIT:
            while self.end - self.start < n:
                got = recv_into(mv[self.end:self.end + max(ahead, n - (self.end - self.start))])
                if not got:
                    return None
                self.end += got
        start = self.start
        self.start = start + n
        if self.start == self.end:
            self.start = self.end = 0
        return mv[start:start + n]

    def read_into(self, dst: memoryview) -> bool:
        """Fill dst completely (a WRITE's payload: TimeoutError if it stalls); False if the
        stream ends first."""
        n = len(dst)
        have = min(self.end - self.start, n)
        if have:
            dst[:have] = self.mv[self.start:self.start + have]
            self.start += have
            if self.start == self.end:
                self.start = self.end = 0
        if have == n:
            return True
        recv_into = self.sock.recv_into
        with _PayloadWait(self):
            while have < n:
                got = recv_into(dst[have:])
                if not got:
                    return False
                have += got
        return True

    def take(self, n: int) -> memoryview:
        """Up to n bytes already buffered (maybe none), consumed; valid until the next call."""
        start = self.start
        have = min(self.end - start, n)
        self.start = start + have
        if self.start == self.end:
            self.start = self.end = 0
        return self.mv[start:start + have]

    def skip(self, n: int) -> bool:
        """Consume and drop n bytes (a WRITE's payload: TimeoutError if it stalls) using
        bounded memory; False if the stream ends first."""
        have = min(self.end - self.start, n)
        self.start += have
        if self.start == self.end:
            self.start = self.end = 0
        n -= have
        if n <= 0:
            return True
        scratch = memoryview(bytearray(min(n, 65536)))
        with _PayloadWait(self):
            while n > 0:
                got = self.sock.recv_into(scratch[:min(n, len(scratch))])
                if not got:
                    return False
                n -= got
        return True


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
                        _sendmsg_all(conn.sock, replies)
                replies.clear()
                self.nbytes = 0
            self.pos = 0
        finally:
            if self.charged:
                self.conn.server.read_budget.give(self.conn, self.charged)
                self.charged = 0


def _sendmsg_all(sock: socket.socket, buffers: list, flags: int = 0) -> None:
    """Send every buffer in order, whole, with as few sendmsg calls as the socket allows."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS: one record write each
        for b in buffers:
            sock.sendall(b)
        return
    bufs = buffers
    while bufs:
        sent = sock.sendmsg(bufs, (), flags)
        i = 0
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        bufs = bufs[i:]
        if bufs and sent:
            bufs[0] = memoryview(bufs[0])[sent:]


class _PlannedReply:
    """A READ reply sent from the files: the engine's plan (held until sent) and the reply's
    items (protocol.read_reply_items), which ReadPlan.send sends with sendfile."""

    __slots__ = ("plan", "items")

    def __init__(self, plan, items):
        self.plan = plan
        self.items = items


# ---- one connection --------------------------------------------------------------------------

class _Connection:
    def __init__(self, server: Server, sock: socket.socket, conn_id: int):
        self.server = server
        self.engine = None  # the engine of the view the client chose (at GO or EXPORT_NAME)
        self.sock = sock
        self.id = conn_id
        self.rx = _Receiver(sock)
        self.proto = P.ServerConnection(server.exports, tls=server.tls.mode)
        # The lock every reply is sent under, and what Engine.serve needs of the connection.
        self.tx = self.send_lock = Transmission()
        self.verbose = server.verbose
        self.broken = False
        self.workers: _Workers | None = None
        self.handshake_deadline: float | None = None  # while in the handshake (see reap)
        # Shutdown (see begin_shutdown).  ``waiting``: the reader has answered all it read and
        # may block for the next request; ``in_workers``: requests handed to workers and not
        # yet answered.
        self.stopping = False
        self.stop_deadline = math.inf  # a handshake still going on is dropped after this
        self.waiting = False
        self.in_workers = 0
        self._in_workers_lock = threading.Lock()
        self._payload_free: list[bytearray] = []
        self._payload_in_use = 0
        self._payload_cond = threading.Condition()
        # Reads waiting for a slow backing, without a thread each (see _start_read).
        self.reads = None  # the engine's ReadQueue, made at the first such read
        self.replier: threading.Thread | None = None
        self._read_slots = threading.BoundedSemaphore(MAX_QUEUED_PER_CONNECTION)
        self._read_buffers = server.read_buffers
        self.read_in_use = 0  # bytes of READ replies held (server.read_budget's, under its lock)
        self.zero_copy = False  # large READs are sent with sendfile (set for transmission)

    # -- plumbing
    def _send(self, data) -> None:
        if data.__class__ is _PlannedReply:
            try:
                with self.send_lock:
                    data.plan.send(self.sock.fileno(), data.items)
            finally:
                data.plan.release()
            return
        with self.send_lock:
            self.sock.sendall(data)

    def run(self) -> None:
        linger = False
        try:
            if self._handshake():
                self._transmission()
            linger = self.stopping  # the client may not know yet: let it read, then close
        except P.ProtocolError as e:
            log.info("connection %d: closing: %s", self.id, e)
            linger = True  # the client may still be sending
        except OSError as e:
            log.info("connection %d: closing: %s", self.id, e)
        except Exception:  # our bug: this connection ends, the server goes on
            log.error("connection %d: internal error:\n%s", self.id, traceback.format_exc())
        finally:
            if self.workers is not None:
                self.workers.close()  # their replies are sent before the close
            if self.reads is not None:
                self.reads.close()  # the replier sends what is still coming, then returns
                self.replier.join()
            if self.read_in_use:  # nothing of ours runs any more: whatever is left is free
                self.server.read_budget.give(self, self.read_in_use)
            self._close(linger)
            self._release_view()
            self.server._forget(self)

    def _release_view(self) -> None:
        """Give back the view chosen at GO, once nothing of ours runs in its engine any more
        (the last client of a view flushes and closes it)."""
        handle, self.proto.handle = self.proto.handle, None
        engine, self.engine = self.engine, None
        if engine is not None and self.zero_copy:
            engine.drop_idle_pipes()  # a server with no clients holds no pipes
        if handle is None:
            return
        try:
            self.server.exports.release(handle)
        except OSError as e:
            log.error("connection %d: closing view %s: %s; its changes since the last flush may "
                      "be lost", self.id, self.proto.export_name, e.strerror or e)
        except Exception:  # our bug: this connection is over anyway
            log.error("connection %d: internal error releasing its view:\n%s", self.id,
                      traceback.format_exc())

    def _close(self, linger: bool) -> None:
        """Close the socket, TLS session first, without losing replies the client has not
        received yet.

        Under TLS the session is shut down before the socket is closed (the spec: MUST after
        NBD_CMD_DISC, SHOULD otherwise): close_notify goes out, then the client's input is
        dropped until its own close_notify or end of stream, for at most LINGER seconds.
        Only this thread uses the TLS connection by now (under TLS there are no workers, and
        other threads only ever shut down the descriptor).

        close(2) on a socket with input not yet read makes the kernel reset the connection,
        and a reset throws away whatever the client had not received (over TCP a large reply
        may still sit in our send buffer).  So where the client may still be sending (after a
        protocol error), our side is ended first (the replies, then FIN) and the client's
        input is read and dropped until it closes its side or LINGER seconds pass."""
        sock = self.sock
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(LINGER)
                try:
                    sock.unwrap()
                except (OSError, ValueError):  # the client is gone or did not answer in time
                    pass
            if linger:
                _shutdown_socket(sock, socket.SHUT_WR)
                deadline = time.monotonic() + LINGER
                scratch = bytearray(65536)
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not socket.socket.recv_into(sock, scratch):  # raw bytes, even under TLS
                        break
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _handshake(self) -> bool:
        """Greeting and option haggling, all within the handshake timeout (a client that
        connects and sends nothing, or drips bytes, is dropped and its thread freed)."""
        timeout = self.server.handshake_timeout
        deadline = time.monotonic() + timeout if timeout else None
        self.handshake_deadline = math.inf if deadline is None else deadline
        try:
            ok = self._haggle(deadline)
        except (socket.timeout, TimeoutError):
            log.info("connection %d: handshake not finished within %g s: dropped", self.id,
                     timeout)
            return False
        finally:
            self.handshake_deadline = None
        if ok:
            self.sock.settimeout(None)
        return ok

    def _remaining(self, deadline) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("handshake timeout")
            self.sock.settimeout(left)

    def _haggle(self, deadline) -> bool:
        proto, rx = self.proto, self.rx
        self._remaining(deadline)
        self._send(proto.greeting())
        while True:
            n = proto.next_read_size()
            self._remaining(deadline)
            data = rx.read(n)
            if data is None:
                log.info("connection %d: client went away during the handshake", self.id)
                return False
            out = proto.receive(bytes(data))
            if out.data:
                self._send(out.data)
            if out.action is P.Action.CLOSE:
                log.info("connection %d: handshake ended: %s", self.id, out.reason)
                return False
            if out.action is P.Action.TRANSMISSION:
                self.engine = self.server.exports.engine_of(proto.handle)
                if self.verbose:
                    log.info("connection %d: transmission to %r (structured replies %s, "
                             "contexts %s)", self.id, proto.export.name,
                             proto.structured_replies,
                             ",".join(proto.meta_contexts.values()) or "none")
                return True
            if out.action is P.Action.STARTTLS:
                if not self._start_tls(deadline):
                    return False

    def _start_tls(self, deadline) -> bool:
        """TLS handshake on the socket after our ACK to NBD_OPT_STARTTLS."""
        if self.rx.end != self.rx.start:
            # The client must wait for our reply before its TLS hello: bytes already here
            # were sent in clear text after STARTTLS and cannot be trusted.
            log.info("connection %d: data after STARTTLS before the TLS handshake", self.id)
            return False
        self._remaining(deadline)
        try:
            tls_sock = self.server.tls.context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("connection %d: TLS handshake failed: %s", self.id, e)
            return False
        self.sock = tls_sock
        self.rx.sock = tls_sock
        self.proto.tls_started()
        if self.verbose:
            log.info("connection %d: TLS %s (%s)", self.id, tls_sock.version(),
                     tls_sock.cipher()[0])
        return True

    def _transmission(self) -> None:
        """The reader loop: decode, validate, then serve inline or hand to a worker.

        Inline replies wait in ``batch`` for as long as the next request is already in the
        receive buffer, and leave together before the reader could block."""
        proto, rx = self.proto, self.rx
        batch = _ReplyBatch(self)
        engine = self.engine
        slow_backing = self.server.slow_backing
        # Under TLS everything stays on this thread: an OpenSSL connection must not be read
        # and written from two threads at once.  It also keeps the copying path for READs
        # (its records are encrypted in user space).
        inline_only = proto.tls_active
        zero_copy = self.zero_copy = not proto.tls_active
        decode, check, handle = proto.decode_request, proto.check_request, self._handle
        max_payload = proto.max_payload
        # The common requests are served by the engine without the GIL (Engine.serve), until
        # one comes that is ours: then the code below serves that one, and the engine goes on.
        # Not under TLS, and not when every request is logged.
        serve = None if inline_only or self.verbose else engine.serve
        tx, rx_buf = self.tx, rx.buf
        rx.payload_timeout = self.server.payload_timeout or None
        if serve is not None:
            tx.configure(self.sock.fileno(), structured=proto.structured_replies,
                         fua=bool(proto.transmission_flags & P.NBD_FLAG_SEND_FUA),
                         readonly=proto.readonly, size=proto.size, max_payload=max_payload,
                         slow_backing=slow_backing, large_request=LARGE_REQUEST,
                         zero_copy_read=ZERO_COPY_READ, zero_copy_write=ZERO_COPY_WRITE,
                         recv_ahead=RECV_CHUNK, exact_reads=EXACT_READS,
                         payload_timeout=rx.payload_timeout)
        try:
            while not self.broken:
                # A run of requests that are ours (BLOCK_STATUS, TRIM...) already buffered is
                # served here, its replies batched, without a call into the engine between.
                if serve is not None and not (
                        rx.end - rx.start >= REQUEST_SIZE and rx_buf[rx.start + 6] == 0 and
                        rx_buf[rx.start + 7] not in _SERVED_BY_ENGINE):
                    batch.flush()
                    rx.start, rx.end, status, info = serve(tx, rx_buf, rx.start, rx.end)
                    if status == SERVE_FAILED:
                        cookie, cmd, flags, offset, count, e = info
                        batch.add(self._error_reply(cookie, cmd, flags, offset, count,
                                                    nbd_error_from_errno(e.errno),
                                                    client_message(e), e))
                        continue
                    if status == SERVE_EOF:
                        self._log_end_of_stream()
                        break
                    if status == SERVE_TRUNCATED:
                        if info == errno.ETIMEDOUT:
                            log.warning("connection %d: %s", self.id, rx.stalled())
                        else:
                            log.info("connection %d: truncated WRITE payload: nothing written",
                                     self.id)
                        break
                    if status == SERVE_BROKEN:
                        log.info("connection %d: closing: %s", self.id, os.strerror(info))
                        self.broken = True
                        _shutdown_socket(self.sock, socket.SHUT_RDWR)
                        break
                    # SERVE_FRONT_END (a whole header is buffered), or SERVE_STOP: on below
                if rx.end - rx.start < REQUEST_SIZE:
                    batch.flush()
                    # The reader may now block for the next request.  At shutdown, once
                    # nothing is in flight, the connection ends here (see begin_shutdown).
                    self.waiting = True
                    if self.stopping and not self.in_workers:
                        self.waiting = False
                        log.info("connection %d: closing: the server is shutting down",
                                 self.id)
                        break
                    header = rx.read(REQUEST_SIZE)
                    self.waiting = False
                else:
                    header = rx.read(REQUEST_SIZE)
                if header is None:
                    self._log_end_of_stream()
                    break
                flags, cmd, cookie, offset, count = decode(header)
                payload = owned = None
                if cmd == NBD_CMD_WRITE and count >= ZERO_COPY_WRITE and zero_copy and \
                        count <= max_payload and not (
                            slow_backing and engine.needs_backing(count, offset, True)):
                    # The next requests are read without reading ahead, so that more large
                    # payloads reach the engine still in the socket.
                    rx.exact = EXACT_READS
                    if not self._splice_write(flags, cookie, offset, count, batch):
                        break
                    continue
                if rx.exact:
                    rx.exact -= 1
                if cmd == NBD_CMD_WRITE:
                    if count > max_payload:
                        # Refused without allocating its length: drop the payload in pieces.
                        batch.flush()
                        if not rx.skip(count):
                            log.info("connection %d: truncated WRITE payload", self.id)
                            break
                        batch.add(self._error_reply(cookie, cmd, flags, offset, count,
                                                    P.NBD_EINVAL, f"write of {count} bytes is "
                                                    f"over the maximum {max_payload}"))
                        continue
                    if rx.end - rx.start < count:
                        batch.flush()
                    if count >= LARGE_REQUEST or count > RECV_BUFFER:  # own buffer, for a worker
                        owned = self._take_payload_buffer(count)
                        payload = memoryview(owned)[:count]
                        ok = rx.read_into(payload)
                    else:
                        payload = rx.read(count, True)
                        ok = payload is not None
                    if not ok:
                        log.info("connection %d: truncated WRITE payload: nothing written",
                                 self.id)
                        if owned is not None:
                            self._give_back_payload_buffer(owned, count)
                        break
                elif cmd == NBD_CMD_DISC:
                    if self.verbose:
                        log.info("connection %d: DISC", self.id)
                    break
                error = check(cmd, flags, offset, count)
                if error:
                    if owned is not None:
                        self._give_back_payload_buffer(owned, count)
                    batch.add(self._error_reply(
                        cookie, cmd, flags, offset, count, error,
                        "the server is shutting down" if error == P.NBD_ESHUTDOWN
                        else "invalid request"))
                    continue
                if inline_only:
                    try:
                        batch.add(handle(cmd, flags, cookie, offset, count, payload, batch))
                    finally:
                        if owned is not None:
                            self._give_back_payload_buffer(owned, count)
                elif slow_backing and cmd == NBD_CMD_READ and count and \
                        engine.needs_backing(count, offset) and \
                        self._start_read(cookie, flags, offset, count, batch):
                    pass  # its reply comes from the replier thread when the backing answers
                elif owned is not None or (cmd == NBD_CMD_READ and count >= LARGE_REQUEST) or (
                        slow_backing and count and (
                            engine.needs_backing(count, offset) if cmd in _READS_BACKING
                            else cmd in _WRITES_PARTIAL and
                            engine.needs_backing(count, offset, True))):
                    # Overlap where it pays: a large transfer, or a wait for a slow backing.
                    batch.flush()
                    if payload is not None and owned is None:
                        payload = bytes(payload)    # a view of the receive buffer: keep a copy
                    workers = self.workers or self._start_workers()
                    with self._in_workers_lock:
                        self.in_workers += 1
                    workers.submit((cmd, flags, cookie, offset, count, payload, owned))
                else:
                    batch.add(handle(cmd, flags, cookie, offset, count, payload, batch))
        except TimeoutError as e:  # a WRITE payload stopped arriving (_Receiver): we end here
            log.warning("connection %d: %s", self.id, e)
            try:
                batch.flush()
            except OSError:
                pass
        except Exception:
            # A bad magic (the stream is out of step) or our own bug: nothing more is read,
            # but every request executed so far still gets its reply before the hang-up
            # (workers' replies are sent before run() closes the socket).
            try:
                batch.flush()
            except OSError:
                pass
            raise
        finally:
            proto.disconnect()
        batch.flush()

    def _log_end_of_stream(self) -> None:
        if self.stopping:
            log.info("connection %d: closing: the server is shutting down", self.id)
        else:
            log.info("connection %d: client closed the connection without NBD_CMD_DISC",
                     self.id)

    def _splice_write(self, flags, cookie, offset, count, batch) -> bool:
        """A large WRITE whose payload goes from the socket into the overlay with splice
        (Engine.pwrite_from), served here on the reader: the payload is read only by the engine.
        False: the stream ended inside the payload (nothing was written)."""
        rx = self.rx
        error = self.proto.check_request(NBD_CMD_WRITE, flags, offset, count)
        if error:
            batch.flush()
            if not rx.skip(count):
                log.info("connection %d: truncated WRITE payload", self.id)
                return False
            batch.add(self._error_reply(cookie, NBD_CMD_WRITE, flags, offset, count, error,
                                        "the server is shutting down"
                                        if error == P.NBD_ESHUTDOWN else "invalid request"))
            return True
        batch.flush()  # the reply of what was served meanwhile: the payload may take a while
        try:
            self.engine.pwrite_from(self.sock.fileno(), count, offset, rx.take(count),
                                    bool(flags & NBD_CMD_FLAG_FUA), rx.payload_timeout)
        except EOFError as e:
            log.info("connection %d: truncated WRITE payload: nothing written (%s)", self.id, e)
            return False
        except TimeoutError:  # before OSError: the stream cannot go on
            log.warning("connection %d: %s", self.id, rx.stalled())
            return False
        except OSError as e:
            batch.add(self._error_reply(cookie, NBD_CMD_WRITE, flags, offset, count,
                                        nbd_error_from_errno(e.errno), client_message(e), e))
            return True
        except ValueError as e:
            batch.add(self._error_reply(cookie, NBD_CMD_WRITE, flags, offset, count,
                                        P.NBD_EINVAL, client_message(e), e))
            return True
        except Exception:  # our bug: where the payload stands is unknown, so the stream ends
            log.error("connection %d: internal error in a spliced WRITE:\n%s", self.id,
                      traceback.format_exc())
            return False
        if self.verbose:
            log.info("connection %d: WRITE offset=%d count=%d flags=0x%x -> OK (spliced)",
                     self.id, offset, count, flags)
        batch.add(self.proto.ok_reply(cookie))
        return True

    def begin_shutdown(self, handshake_until: float) -> None:
        """The server is shutting down (called from the main thread).

        From now on options are answered NBD_REP_ERR_SHUTDOWN and requests NBD_ESHUTDOWN
        (the protocol's begin_shutdown); requests already in flight complete.  A connection
        in transmission ends as soon as nothing is in flight: the reader stops instead of
        waiting for more, and a reader already blocked waiting is woken by shutting the
        descriptor for reading (by the last worker to finish, if any are busy).  One still in
        the handshake may go on until ``handshake_until``, so that its client hears why
        (Server.shutdown then drops it).

        Without a lock between the reader and this thread, a request that arrives at the very
        moment the reader is woken can find the descriptor shut for reading: its client then
        sees the connection close, a hard disconnect the spec allows at shutdown."""
        self.proto.begin_shutdown()
        self.stop_deadline = handshake_until
        self.stopping = True
        self.tx.stop()
        if (self.waiting or self.tx.waiting) and not self.in_workers:
            _shutdown_socket(self.sock, socket.SHUT_RD)

    def _worker_done(self) -> None:
        """A worker answered a request: at shutdown, the last one wakes a waiting reader."""
        with self._in_workers_lock:
            self.in_workers -= 1
            idle = not self.in_workers
        if idle and self.stopping and (self.waiting or self.tx.waiting):
            _shutdown_socket(self.sock, socket.SHUT_RD)

    def handshake_overdue(self, now: float) -> bool:
        deadline = self.handshake_deadline
        return deadline is not None and now > min(deadline + 1, self.stop_deadline)

    def _start_read(self, cookie, flags, offset, count, batch) -> bool:
        """Start a READ that waits for a slow backing and go on reading requests: the engine
        fills the buffer as the backing answers, and the replier thread sends the reply.  So a
        client's whole queue depth becomes backing reads in flight, with no thread each.
        False: the engine cannot start this one so (cow-on-read...): a worker serves it."""
        reads = self.reads
        if reads is None:
            reads = self.reads = ReadQueue()
            self.replier = threading.Thread(target=self._reply_reads, daemon=True,
                                            name=f"cow-conn{self.id}-replier")
            self.replier.start()
        self._read_slots.acquire()  # a client that never reads its replies stops being read
        budget = self.server.read_budget
        if not budget.try_take(self, count):
            # Over the read budget: no more requests are read until replies leave.  What is
            # held back leaves first (the client may wait for it before reading on).
            batch.flush()
            try:
                budget.take(self, count)
            except OSError as e:  # shutting down (or broken): this one is not started
                self._read_slots.release()
                batch.add(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count,
                                            nbd_error_from_errno(e.errno), client_message(e)))
                return True
        buf = self._read_buffers.get(count)
        at = READ_REPLY_PREFIX
        with self._in_workers_lock:
            self.in_workers += 1
        try:
            started = self.engine.pread_start(memoryview(buf)[at:at + count], offset, reads,
                                              (cookie, flags, offset, count, buf))
        except (OSError, ValueError) as e:
            started = e
        if started is False:
            return True
        self._read_slots.release()
        with self._in_workers_lock:
            self.in_workers -= 1
        budget.give(self, count)
        if started is None:
            self._read_buffers.put(buf)
            return False
        if isinstance(started, BaseException):
            self._read_buffers.put(buf)
            err = nbd_error_from_errno(started.errno) if isinstance(started, OSError) \
                else P.NBD_EINVAL
            batch.add(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count, err,
                                        client_message(started), started))
            return True
        # Done at once (the blocks were copied up meanwhile): the batch sends this buffer
        # later, so it does not go back to the pool (and the batch bounds what it holds).
        start = self.proto.read_reply_into(buf, cookie, offset, count)
        batch.add(memoryview(buf)[start:at + count])
        return True

    def _reply_reads(self) -> None:
        """The replier: send the replies of started reads as they finish, all that finished
        together in one sendmsg."""
        reads, proto, budget = self.reads, self.proto, self.server.read_budget
        while True:
            done = reads.wait()
            if not done:
                return  # closed, and nothing pending
            replies = []
            for (cookie, flags, offset, count, buf), status in done:
                if status:
                    err = -status
                    replies.append(self._error_reply(cookie, NBD_CMD_READ, flags, offset, count,
                                                     nbd_error_from_errno(err),
                                                     os.strerror(err)))
                else:
                    start = proto.read_reply_into(buf, cookie, offset, count)
                    replies.append(memoryview(buf)[start:READ_REPLY_PREFIX + count])
                    if self.verbose:
                        log.info("connection %d: READ offset=%d count=%d flags=0x%x -> OK",
                                 self.id, offset, count, flags)
            try:
                if not self.broken:
                    with self.send_lock:
                        _sendmsg_all(self.sock, replies)
            except OSError as e:  # the client is gone: make the reader stop too
                log.info("connection %d: closing: %s", self.id, e)
                self.broken = True
                _shutdown_socket(self.sock, socket.SHUT_RDWR)
            finally:
                replies.clear()
                for token, _ in done:
                    self._read_buffers.put(token[4])
                    budget.give(self, token[3])
                    self._read_slots.release()
                    self._worker_done()

    def _start_workers(self) -> _Workers:
        self.workers = _Workers(self, self.server.max_workers)
        return self.workers

    def _take_payload_buffer(self, count: int) -> bytearray:
        with self._payload_cond:  # wait while the budget is spent (by other requests)
            while self._payload_in_use and self._payload_in_use + count > PAYLOAD_BUDGET:
                self._payload_cond.wait()
            self._payload_in_use += count
        try:
            buf = self._payload_free.pop()
        except IndexError:
            buf = None
        if buf is None or len(buf) < count:
            buf = bytearray(count)
        return buf

    def _give_back_payload_buffer(self, buf: bytearray, count: int) -> None:
        if len(buf) <= KEEP_BUFFER and len(self._payload_free) < KEEP_PAYLOAD_BUFFERS:
            self._payload_free.append(buf)
        with self._payload_cond:
            self._payload_in_use -= count
            self._payload_cond.notify()

    def _error_reply(self, cookie, cmd, flags, offset, count, error, message,
                     cause: Exception | None = None) -> bytes:
        """An error reply carrying message (which must name no path: see client_message); the
        verbose log tells the cause in full."""
        if self.verbose:
            log.info("connection %d: %s offset=%d count=%d flags=0x%x -> %s (%s)", self.id,
                     P.CMD_NAMES.get(cmd, cmd), offset, count, flags, P.nbd_error_name(error),
                     message if cause is None else cause)
        return self.proto.error_reply(cookie, cmd, error, message)

    def _handle(self, cmd, flags, cookie, offset, count, payload, space):
        """Serve one validated request; return its reply, whole (the caller sends it).

        ``space.get(count)`` gives the (buffer, base) where a READ reply is laid out."""
        engine = self.engine
        try:
            if cmd == NBD_CMD_READ:
                if count >= ZERO_COPY_READ and self.zero_copy:
                    df = bool(flags & NBD_CMD_FLAG_DF)
                    plan = engine.read_plan(count, offset,
                                            self.proto.structured_replies and not df)
                    if plan is not None:
                        try:
                            reply = _PlannedReply(plan, self.proto.read_reply_items(
                                cookie, offset, count, plan.pieces, df))
                        except BaseException:
                            plan.release()
                            raise
                        if self.verbose:
                            log.info("connection %d: READ offset=%d count=%d flags=0x%x -> OK "
                                     "(%d pieces sent from the files)", self.id, offset, count,
                                     flags, len(plan.pieces))
                        return reply
                buf, base = space.get(count)
                mv = memoryview(buf)
                at = base + READ_REPLY_PREFIX
                engine.pread(mv[at:at + count], offset)
                reply = mv[self.proto.read_reply_into(buf, cookie, offset, count, base):at + count]
            elif cmd == NBD_CMD_WRITE:
                engine.pwrite(payload, offset, bool(flags & NBD_CMD_FLAG_FUA))
                reply = self.proto.ok_reply(cookie)
            elif cmd == NBD_CMD_BLOCK_STATUS:
                req_one = bool(flags & NBD_CMD_FLAG_REQ_ONE)
                results = []
                for cid, name in self.proto.meta_contexts.items():
                    if name == P.CONTEXT_BASE_ALLOCATION:
                        runs = engine.extents(count, offset, req_one)
                    else:
                        runs = engine.allocation_depth(count, offset, req_one)
                    results.append((cid, runs))
                reply = self.proto.block_status_reply(cookie, count, req_one, results)
            elif cmd == NBD_CMD_WRITE_ZEROES:
                engine.zero(count, offset, not flags & NBD_CMD_FLAG_NO_HOLE,
                            bool(flags & NBD_CMD_FLAG_FAST_ZERO))
                if flags & NBD_CMD_FLAG_FUA:
                    engine.flush()
                reply = self.proto.ok_reply(cookie)
            elif cmd == NBD_CMD_TRIM:
                engine.trim(count, offset)
                if flags & NBD_CMD_FLAG_FUA:
                    engine.flush()
                reply = self.proto.ok_reply(cookie)
            elif cmd == NBD_CMD_FLUSH:
                engine.flush()
                reply = self.proto.ok_reply(cookie)
            elif cmd == NBD_CMD_CACHE:
                engine.cache(count, offset)
                reply = self.proto.ok_reply(cookie)
            else:  # check_request lets no other command through
                raise AssertionError(f"unexpected command {cmd}")
        except OSError as e:
            return self._error_reply(cookie, cmd, flags, offset, count,
                                     nbd_error_from_errno(e.errno), client_message(e), e)
        except ValueError as e:
            return self._error_reply(cookie, cmd, flags, offset, count, P.NBD_EINVAL,
                                     client_message(e), e)
        except Exception:  # our bug: tell the client EIO, keep the connection and the server
            log.error("connection %d: internal error in %s:\n%s", self.id,
                      P.CMD_NAMES.get(cmd, cmd), traceback.format_exc())
            return self._error_reply(cookie, cmd, flags, offset, count, P.NBD_EIO,
                                     "internal error")
        if self.verbose:
            log.info("connection %d: %s offset=%d count=%d flags=0x%x -> OK", self.id,
                     P.CMD_NAMES.get(cmd, cmd), offset, count, flags)
        return reply


class _Workers:
    """A connection's workers: requests that may wait for a slow (NBD) backing, and large
    READ/WRITE, whose transfer then overlaps with the next request's.  A worker is started
    whenever a request is handed over and none is free, up to ``limit``; they stay until the
    connection ends."""

    def __init__(self, conn: _Connection, limit: int):
        self.conn = conn
        self.limit = limit
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = threading.BoundedSemaphore(MAX_QUEUED_PER_CONNECTION)
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.pending = 0  # handed over and not finished

    def submit(self, job) -> None:
        self.slots.acquire()  # a client that never reads its replies stops being read
        with self.lock:
            self.pending += 1
            grow = self.pending > len(self.threads) and len(self.threads) < self.limit
            if grow:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"cow-conn{self.conn.id}-worker{len(self.threads)}")
                self.threads.append(t)
        if grow:
            t.start()
        self.jobs.put(job)

    def _work(self) -> None:
        conn = self.conn
        space = _WorkerSpace(conn)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            cmd, flags, cookie, offset, count, payload, owned = job
            try:
                if not conn.broken:
                    conn._send(conn._handle(cmd, flags, cookie, offset, count, payload, space))
            except OSError as e:  # the client is gone: make the reader stop too
                log.info("connection %d: closing: %s", conn.id, e)
                conn.broken = True
                _shutdown_socket(conn.sock, socket.SHUT_RDWR)
            finally:
                space.release()
                if owned is not None:
                    conn._give_back_payload_buffer(owned, count)
                with self.lock:
                    self.pending -= 1
                self.slots.release()
                conn._worker_done()

    def close(self) -> None:
        """Finish every queued request, then stop the threads."""
        with self.lock:
            self.limit = 0  # no more
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


# ---- the server ------------------------------------------------------------------------------

class OneEngine(P.SingleExport):
    """Today's server: one engine behind one export (its name, and the default export "")."""

    def __init__(self, engine, export: P.Export):
        super().__init__(export, engine)

    def engine_of(self, handle):
        return handle


class Server:
    """Accepts connections on one or more listening sockets and serves each in a thread.

    ``exports``: what the server offers by name (cow.protocol.Exports) with ``engine_of(handle)``,
    the engine of the handle its acquire gave: :class:`OneEngine`, or cow.views' ViewExports
    (a view per name).  ``slow_backing``: the backing is an NBD server (requests that wait for it
    go to workers)."""

    def __init__(self, exports, *, slow_backing: bool, workers: int = 0,
                 verbose: bool = False, tls=None, max_connections: int = 0,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 payload_timeout: float = DEFAULT_PAYLOAD_TIMEOUT):
        from cow.tls import TLSSettings

        self.exports = exports
        self.read_buffers = _BufferPool()  # shared by the connections
        # Requests wait for an NBD backing (over a network, or a process): hand those over.
        self.slow_backing = slow_backing
        self.max_workers = workers or (MAX_QUEUED_PER_CONNECTION if self.slow_backing
                                       else LARGE_WORKERS)
        self.verbose = verbose
        self.tls = tls if tls is not None else TLSSettings()
        self.max_connections = max_connections  # 0: no limit
        self.handshake_timeout = handshake_timeout  # 0: none
        self.payload_timeout = payload_timeout  # 0: none (see _Receiver)
        self.read_budget = _ReadBudget()
        self._refused = 0
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[_Connection, threading.Thread]] = {}
        self._next_id = 0
        self._accepting = True
        # Accepting when out of descriptors (see accept_rest)
        self._rest_until = 0.0  # monotonic time before which the listeners rest
        self._rest_delay = 0.0
        self._accept_failures = 0  # since the trouble began
        self._accept_trouble_since: float | None = None  # the first failure of a run
        self._accept_log_at = 0.0  # when the next line may be logged
        self._accept_log_interval = ACCEPT_LOG_INTERVAL

    def accept_rest(self) -> float:
        """Seconds the caller must not poll the listeners for (0: poll them).  After accept
        fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM, or no thread
        to be had) the listeners rest, ACCEPT_REST_FIRST seconds and twice that each time it
        fails again, up to ACCEPT_REST_MAX: polling them meanwhile would only spin, since the
        client waits in the listen backlog until a descriptor comes back.  Connections already
        open are served meanwhile, and a connection that ends gives its descriptors back."""
        rest = self._rest_until - time.monotonic()
        return rest if rest > 0 else 0.0

    def _accept_failed(self, what: str, rest: bool) -> None:
        """One failed accept: rest the listeners if ``rest``.  Logged at once, then at most once
        a second, and less often while it goes on."""
        now = time.monotonic()
        if rest:
            self._rest_delay = min(max(self._rest_delay * 2, ACCEPT_REST_FIRST), ACCEPT_REST_MAX)
            self._rest_until = now + self._rest_delay
        self._accept_failures += 1
        since = self._accept_trouble_since
        if since is None:
            self._accept_trouble_since = now
            self._accept_log_interval = ACCEPT_LOG_INTERVAL
            if rest:
                log.warning("accept: %s: new connections wait in the listen backlog until "
                            "descriptors or memory come back; open ones are still served", what)
            else:
                log.warning("accept: %s", what)
        elif now >= self._accept_log_at:
            log.warning("accept: %s (%d failed accepts in %.0f s)", what, self._accept_failures,
                        now - since)
            self._accept_log_interval = min(self._accept_log_interval * 2,
                                            ACCEPT_LOG_INTERVAL_MAX)
        else:
            return
        self._accept_log_at = now + self._accept_log_interval

    def _accept_succeeded(self) -> None:
        since = self._accept_trouble_since
        if since is not None:
            if self._rest_delay:
                log.warning("accepting new connections again (after %.1f s)",
                            time.monotonic() - since)
            self._accept_trouble_since = None
            self._accept_failures = 0
            self._rest_delay = 0.0

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # e.g. EMFILE: keep serving the others
            self._accept_failed(e.strerror or str(e), e.errno in _ACCEPT_RESOURCES)
            return
        self._accept_succeeded()
        sock.setblocking(True)
        try:  # room for a whole large READ reply: one send, no waiting on the client
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            pass
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if not self._accepting:
                sock.close()
                return
            if self.max_connections and len(self._connections) >= self.max_connections:
                # Refused before the greeting: the client sees the connection close at once.
                self._refused += 1
                refused = self._refused
                sock.close()
                if refused == 1 or refused % 1000 == 0:
                    log.warning("--max-connections %d reached: refused a connection (%d so far)",
                                self.max_connections, refused)
                return
            self._next_id += 1
            try:
                conn = _Connection(self, sock, self._next_id)
            except MemoryError:
                sock.close()
                self._accept_failed("out of memory for a new connection", True)
                return
            thread = threading.Thread(target=conn.run, name=f"cow-conn{conn.id}", daemon=True)
            self._connections[conn.id] = (conn, thread)
        if self.verbose:
            log.info("connection %d: accepted", conn.id)
        try:
            thread.start()
        except (RuntimeError, MemoryError) as e:  # no thread to be had (memory, a limit)
            self._forget(conn)
            sock.close()
            self._accept_failed(f"cannot start a thread for a new connection: {e}", True)

    def reap_handshakes(self) -> None:
        """Hang up on clients still in the handshake past their deadline.  The per-recv
        timeouts catch most; this catches a client that drips one byte per timeout, and, at
        shutdown, one that sends nothing more."""
        now = time.monotonic()
        with self._lock:
            late = [conn for conn, _ in self._connections.values()
                    if conn.handshake_overdue(now)]
        for conn in late:
            _shutdown_socket(conn.sock, socket.SHUT_RDWR)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn.id, None)

    def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Tell every connection the server is stopping, let what is in flight finish, wait
        for the threads.

        From here on options are answered NBD_REP_ERR_SHUTDOWN and requests NBD_ESHUTDOWN,
        and requests in flight complete (_Connection.begin_shutdown).  A client still in the
        handshake is dropped SHUTDOWN_HANDSHAKE_WAIT seconds on unless it has gone by then.
        A client that does not read its replies could hold a thread in a send forever: after
        the grace period its connection is shut down both ways, which ends the send."""
        now = time.monotonic()
        with self._lock:
            self._accepting = False
            items = list(self._connections.values())
        for conn, _ in items:
            conn.begin_shutdown(now + SHUTDOWN_HANDSHAKE_WAIT)
        self.read_budget.wake()  # a reader waiting for the read budget gives up
        if self.verbose:
            log.info("shutting down: %d connection(s) open", len(items))
        deadline = now + grace
        for _, thread in items:
            while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
                thread.join(min(left, 0.25))
                self.reap_handshakes()
        late = [(conn, thread) for conn, thread in items if thread.is_alive()]
        for conn, _ in late:
            _shutdown_socket(conn.sock, socket.SHUT_RDWR)
        for _, thread in late:
            thread.join(10.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m cow.server``: the command line lives in cow/cli.py."""
    from cow.cli import main as cli_main

    return cli_main(argv)
