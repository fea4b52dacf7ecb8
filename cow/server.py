"""python -m cow.server: serve the copy-on-write view of a backing image over NBD.

This module owns the sockets and the threads; the NBD wire format lives in
``cow/protocol.py`` and the copy-on-write in the compiled ``cow.engine``.  Per
request: recv -> decode -> validate -> one engine call (GIL released) -> encode
-> send.

Concurrency.  Each connection has one thread that reads requests and serves
them itself, inline: on this 2-core machine a hand-off per request to another
thread costs more than a small request (4 fio jobs x depth 8, 4 KiB random
reads: ~110k/s inline against ~45k/s through 4 workers per connection).
Requests on other connections run in parallel because the engine releases the
GIL.  Overlap within a connection is used only where it pays: large READ/WRITE
(from 128 KiB), whose transfer then overlaps with the next request's, and, when
the backing is itself an NBD server and a read may wait milliseconds for it,
every READ and CACHE.  Those go to worker threads of the connection (``-t``);
replies then leave out of order, each written whole under the connection's
send lock.

Data path.  Requests are received with ``recv_into`` into a reusable buffer
(several small requests per system call when the client pipelines); small WRITE
payloads are handed to the engine as views of that buffer, large ones are
received straight into one of a few reusable payload buffers of the connection.
READ data is read by the engine into a reusable buffer just behind the reply
header, so that header and data leave together.  Replies served inline are held
back while the next request is already in the receive buffer, then leave with
one ``sendmsg`` (never delaying a reply while the reader would wait for input);
the socket's send buffer is raised so that a large reply leaves in one call.

Hostile clients and TLS.  The whole handshake (TLS included) must finish within
``--handshake-timeout`` seconds, so a client that connects and sends nothing, or
drips bytes, is dropped and its thread freed; ``--max-connections`` closes
connections beyond the limit at once, before the greeting.  TLS (``cow/tls.py``
builds the context) starts on NBD_OPT_STARTTLS; under TLS a connection is served
entirely on its own thread, without workers (an OpenSSL connection must not be
read and written from two threads at once).  At SIGTERM the server stops reading
requests, lets those in flight finish, and after a grace period cuts off clients
that do not read their replies.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import queue
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from urllib.parse import quote

from cow import protocol as P
from cow.protocol import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
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

DEFAULT_PORT = 10809
DEFAULT_IPADDR = "127.0.0.1"
DEFAULT_NBD_THREADS = 4  # per-connection READ/CACHE workers when the backing is NBD
MAX_QUEUED_PER_CONNECTION = 64  # requests handed to workers and not yet answered
RECV_BUFFER = 256 * 1024  # per connection: request headers and small WRITE payloads
RECV_CHUNK = 64 * 1024  # most a recv asks for beyond what the current message needs
LARGE_REQUEST = 128 * 1024  # READ/WRITE from this size go to the connection's workers
LARGE_WORKERS = 8  # workers started by a connection's first large request (as many as a
                   # client's usual queue depth, so large writes never wait for one)
PAYLOAD_BUDGET = 32 * 1024 * 1024  # bytes of large WRITE payloads received and not yet
                                   # written, per connection (one request may exceed it)
KEEP_PAYLOAD_BUFFERS = 8  # idle payload buffers a connection keeps for reuse
BATCH_BUFFER = 512 * 1024  # inline replies held back while more requests are buffered
MAX_BATCH_REPLIES = 256  # ... and at most this many of them (well under IOV_MAX)
KEEP_BUFFER = 4 * 1024 * 1024  # larger one-off buffers are not kept between requests
SOCKET_BUFFER = 4 * 1024 * 1024  # SO_SNDBUF asked for (the kernel caps it at wmem_max)
SAMPLE_DISK_SIZE = 64 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to transmission (qemu-nbd's default)
LISTEN_BACKLOG = socket.SOMAXCONN  # the kernel caps it (net.core.somaxconn)
SHUTDOWN_GRACE = 20.0  # seconds for in-flight requests at SIGTERM before sends are cut off


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


# ---- receiving -------------------------------------------------------------------------------

class _Receiver:
    """Buffered exact reads from a blocking socket, without per-request allocation.

    ``read(n)`` (n up to the capacity) returns a memoryview that stays valid until the next
    call: the caller uses it (decodes a header, hands a payload to the engine) before reading
    again.  ``read_into(dst)`` fills a buffer the caller owns (large payloads land there
    directly).  Each recv asks for at most RECV_CHUNK bytes, so that a large payload behind a
    header is mostly received straight into its own buffer rather than copied.
    """

    def __init__(self, sock: socket.socket, capacity: int = RECV_BUFFER):
        self.sock = sock
        self.capacity = capacity
        self.buf = bytearray(capacity)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def read(self, n: int) -> memoryview | None:
        """n bytes (n <= capacity), or None if the stream ends first."""
        start = self.start
        if self.end - start >= n:
            self.start = start + n
            return self.mv[start:start + n]
        if start + n > self.capacity:  # make room: move the partial message to the front
            have = self.end - start
            self.mv[:have] = self.mv[start:self.end]
            self.start, self.end = 0, have
        recv_into, mv = self.sock.recv_into, self.mv
        while self.end - self.start < n:
            got = recv_into(mv[self.end:self.end + max(RECV_CHUNK, n - (self.end - self.start))])
            if not got:
                return None
            self.end += got
        start = self.start
        self.start = start + n
        if self.start == self.end:
            self.start = self.end = 0
        return mv[start:start + n]

    def read_into(self, dst: memoryview) -> bool:
        """Fill dst completely; False if the stream ends first."""
        n = len(dst)
        have = min(self.end - self.start, n)
        if have:
            dst[:have] = self.mv[self.start:self.start + have]
            self.start += have
            if self.start == self.end:
                self.start = self.end = 0
        recv_into = self.sock.recv_into
        while have < n:
            got = recv_into(dst[have:])
            if not got:
                return False
            have += got
        return True

    def skip(self, n: int) -> bool:
        """Consume and drop n bytes using bounded memory; False if the stream ends first."""
        have = min(self.end - self.start, n)
        self.start += have
        if self.start == self.end:
            self.start = self.end = 0
        n -= have
        scratch = memoryview(bytearray(min(n, 65536)))
        while n > 0:
            got = self.sock.recv_into(scratch[:min(n, len(scratch))])
            if not got:
                return False
            n -= got
        return True


class _ReplyBuffer:
    """Room for one READ reply at a time (a worker's): header, then data; reused, and grown
    up to KEEP_BUFFER."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = bytearray(READ_REPLY_PREFIX + 256 * 1024)

    def get(self, count: int) -> tuple[bytearray, int]:
        """(buffer, base): the reply header ends and the data begins at base+READ_REPLY_PREFIX."""
        buf = self.buf
        if count > len(buf) - READ_REPLY_PREFIX:
            buf = bytearray(READ_REPLY_PREFIX + count)
            if count <= KEEP_BUFFER:
                self.buf = buf
        return buf, 0


class _ReplyBatch:
    """The reader thread's replies, held back while more requests are already buffered and
    then sent together with one sendmsg.  Small READ replies are laid out one after another
    in one buffer, header just before data, so that nothing is copied to batch them."""

    __slots__ = ("conn", "buf", "pos", "replies", "nbytes")

    def __init__(self, conn: _Connection):
        self.conn = conn
        self.buf = bytearray(BATCH_BUFFER)
        self.pos = 0
        self.replies: list = []
        self.nbytes = 0

    def get(self, count: int) -> tuple[bytearray, int]:
        need = READ_REPLY_PREFIX + count
        if need > len(self.buf):
            return bytearray(need), 0
        if self.pos + need > len(self.buf):
            self.flush()
        base = self.pos
        self.pos = base + need
        return self.buf, base

    def add(self, reply) -> None:
        self.replies.append(reply)
        self.nbytes += len(reply)
        if self.nbytes >= BATCH_BUFFER or len(self.replies) >= MAX_BATCH_REPLIES:
            self.flush()

    def flush(self) -> None:
        replies = self.replies
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


def _sendmsg_all(sock: socket.socket, buffers: list) -> None:
    """Send every buffer in order, whole, with as few sendmsg calls as the socket allows."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS: one record write each
        for b in buffers:
            sock.sendall(b)
        return
    bufs = buffers
    while bufs:
        sent = sock.sendmsg(bufs)
        i = 0
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        bufs = bufs[i:]
        if bufs and sent:
            bufs[0] = memoryview(bufs[0])[sent:]


# ---- one connection --------------------------------------------------------------------------

class _Connection:
    def __init__(self, server: Server, sock: socket.socket, conn_id: int):
        self.server = server
        self.engine = server.engine
        self.sock = sock
        self.id = conn_id
        self.rx = _Receiver(sock)
        self.proto = P.ServerConnection(server.export, tls=server.tls.mode)
        self.send_lock = threading.Lock()
        self.verbose = server.verbose
        self.broken = False
        self.workers: _Workers | None = None
        self.handshake_deadline: float | None = None  # while in the handshake (see reap)
        self._payload_free: list[bytearray] = []
        self._payload_in_use = 0
        self._payload_cond = threading.Condition()

    # -- plumbing
    def _send(self, data) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def run(self) -> None:
        try:
            if self._handshake():
                self._transmission()
        except P.ProtocolError as e:
            log.info("connection %d: closing: %s", self.id, e)
        except OSError as e:
            log.info("connection %d: closing: %s", self.id, e)
        except Exception:  # our bug: this connection ends, the server goes on
            log.error("connection %d: internal error:\n%s", self.id, traceback.format_exc())
        finally:
            if self.workers is not None:
                self.workers.close()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server._forget(self)

    def _handshake(self) -> bool:
        """Greeting and option haggling, all within the handshake timeout (a client that
        connects and sends nothing, or drips bytes, is dropped and its thread freed)."""
        timeout = self.server.handshake_timeout
        deadline = time.monotonic() + timeout if timeout else None
        self.handshake_deadline = deadline
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
                if self.verbose:
                    log.info("connection %d: transmission (structured replies %s, contexts %s)",
                             self.id, proto.structured_replies,
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
        reads_to_workers = self.server.threads_for_reads > 0
        # Under TLS everything stays on this thread: an OpenSSL connection must not be read
        # and written from two threads at once.
        inline_only = proto.tls_active
        decode, check, handle = proto.decode_request, proto.check_request, self._handle
        max_payload = proto.max_payload
        try:
            while not self.broken:
                if rx.end - rx.start < REQUEST_SIZE:
                    batch.flush()
                header = rx.read(REQUEST_SIZE)
                if header is None:
                    log.info("connection %d: client closed the connection without "
                             "NBD_CMD_DISC", self.id)
                    break
                flags, cmd, cookie, offset, count = decode(header)
                payload = owned = None
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
                        payload = rx.read(count)
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
                    batch.add(self._error_reply(cookie, cmd, flags, offset, count, error,
                                                "invalid request"))
                    continue
                if inline_only:
                    try:
                        batch.add(handle(cmd, flags, cookie, offset, count, payload, batch))
                    finally:
                        if owned is not None:
                            self._give_back_payload_buffer(owned, count)
                elif owned is not None or (
                        (cmd == NBD_CMD_READ or cmd == NBD_CMD_CACHE)
                        and (reads_to_workers or (count >= LARGE_REQUEST and cmd == NBD_CMD_READ))):
                    # Overlap where it pays: a slow (NBD) backing, or a large transfer.
                    batch.flush()
                    workers = self.workers or self._start_workers()
                    workers.submit((cmd, flags, cookie, offset, count, payload, owned))
                else:
                    batch.add(handle(cmd, flags, cookie, offset, count, payload, batch))
        finally:
            proto.disconnect()
        batch.flush()

    def _start_workers(self) -> _Workers:
        self.workers = _Workers(self, self.server.threads_for_reads or LARGE_WORKERS)
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

    def _error_reply(self, cookie, cmd, flags, offset, count, error, message) -> bytes:
        if self.verbose:
            log.info("connection %d: %s offset=%d count=%d flags=0x%x -> %s (%s)", self.id,
                     P.CMD_NAMES.get(cmd, cmd), offset, count, flags, P.nbd_error_name(error),
                     message)
        return self.proto.error_reply(cookie, cmd, error, message)

    def _handle(self, cmd, flags, cookie, offset, count, payload, space):
        """Serve one validated request; return its reply, whole (the caller sends it).

        ``space.get(count)`` gives the (buffer, base) where a READ reply is laid out."""
        engine = self.engine
        try:
            if cmd == NBD_CMD_READ:
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
                                     nbd_error_from_errno(e.errno), e.strerror or str(e))
        except ValueError as e:
            return self._error_reply(cookie, cmd, flags, offset, count, P.NBD_EINVAL, str(e))
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
    """A connection's workers: READ/CACHE when a backing read may wait on the network, and
    large READ/WRITE, whose transfer then overlaps with the next request's."""

    def __init__(self, conn: _Connection, n: int):
        self.conn = conn
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = threading.BoundedSemaphore(MAX_QUEUED_PER_CONNECTION)
        self.threads = [threading.Thread(target=self._work, name=f"cow-conn{conn.id}-worker{i}",
                                         daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, job) -> None:
        self.slots.acquire()  # a client that never reads its replies stops being read
        self.jobs.put(job)

    def _work(self) -> None:
        conn = self.conn
        reply_buffer = _ReplyBuffer()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            cmd, flags, cookie, offset, count, payload, owned = job
            try:
                if not conn.broken:
                    conn._send(conn._handle(cmd, flags, cookie, offset, count, payload,
                                            reply_buffer))
            except OSError as e:  # the client is gone: make the reader stop too
                log.info("connection %d: closing: %s", conn.id, e)
                conn.broken = True
                _shutdown_socket(conn.sock, socket.SHUT_RDWR)
            finally:
                if owned is not None:
                    conn._give_back_payload_buffer(owned, count)
                self.slots.release()

    def close(self) -> None:
        """Finish every queued request, then stop the threads."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


# ---- the server ------------------------------------------------------------------------------

class Server:
    """Accepts connections on one or more listening sockets and serves each in a thread."""

    def __init__(self, engine, export: P.Export, *, threads_for_reads: int = 0,
                 verbose: bool = False, tls=None, max_connections: int = 0,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT):
        from cow.tls import TLSSettings

        self.engine = engine
        self.export = export
        self.threads_for_reads = threads_for_reads
        self.verbose = verbose
        self.tls = tls if tls is not None else TLSSettings()
        self.max_connections = max_connections  # 0: no limit
        self.handshake_timeout = handshake_timeout  # 0: none
        self._refused = 0
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[_Connection, threading.Thread]] = {}
        self._next_id = 0
        self._accepting = True

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # e.g. EMFILE: keep serving the others
            log.warning("accept: %s", e)
            return
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
            conn = _Connection(self, sock, self._next_id)
            thread = threading.Thread(target=conn.run, name=f"cow-conn{conn.id}", daemon=True)
            self._connections[conn.id] = (conn, thread)
        if self.verbose:
            log.info("connection %d: accepted", conn.id)
        thread.start()

    def reap_handshakes(self) -> None:
        """Hang up on clients still in the handshake past their deadline.  The per-recv
        timeouts catch most; this catches a client that drips one byte per timeout."""
        now = time.monotonic()
        with self._lock:
            late = [conn for conn, _ in self._connections.values()
                    if conn.handshake_deadline is not None and now > conn.handshake_deadline + 1]
        for conn in late:
            _shutdown_socket(conn.sock, socket.SHUT_RDWR)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn.id, None)

    def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop reading new requests, let the ones in flight finish, wait for the threads.

        A client that does not read its replies could hold a thread in a send forever: after
        the grace period its connection is shut down both ways, which ends the send."""
        with self._lock:
            self._accepting = False
            items = list(self._connections.values())
        for conn, _ in items:
            _shutdown_socket(conn.sock, socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for _, thread in items:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [(conn, thread) for conn, thread in items if thread.is_alive()]
        for conn, _ in late:
            _shutdown_socket(conn.sock, socket.SHUT_RDWR)
        for _, thread in late:
            thread.join(10.0)


# ---- command line ----------------------------------------------------------------------------

EXAMPLES = """\
examples:
  python -m cow.server disk.img -U /tmp/disk.sock
        serve disk.img copy-on-write on a Unix socket: nbd+unix:///?socket=/tmp/disk.sock
  python -m cow.server disk.img -p 10809
        serve on TCP 127.0.0.1:10809: nbd://127.0.0.1:10809
  python -m cow.server
        serve a built-in 64 MiB sample disk (data and holes)
  python -m cow.server disk.img --run 'nbdcopy "$uri" out.img'
        captive mode: run the command against the server, then stop
  nbdinfo --map -- [ python -m cow.server disk.img ]
        systemd socket activation: the client starts the server
  python -m cow.server 'nbd+unix:///?socket=/tmp/remote.sock' -U /tmp/cow.sock -t 8
        copy-on-write over an NBD backing, 8 read threads per connection
  python -m cow.server disk.img -U /tmp/s --cow-block-size 4K --cow-on-read true
  python -m cow.server disk.img -U /tmp/s --overlay-max-size 1G --tmpdir /var/tmp

The backing is opened read-only and never written: all writes go to a temporary
overlay file (unlinked at once) that disappears when the server exits.
"""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, not a usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bool_word(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def _cow_on_read(value: str):
    if value.startswith("/"):
        return value
    try:
        return _bool_word(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected true, false or an absolute path, not {value!r}") from None


def _nonnegative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {value!r}")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not n >= 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {value!r}")
    return n


def _socket_mode(value: str) -> int:
    v = value.strip().lower()
    v = v[2:] if v.startswith("0o") else v
    try:
        mode = int(v, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal file mode such as 0660, not {value!r}")
    return mode


def _port(value: str) -> int:
    n = _nonnegative_int(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m cow.server",
        description="Serve a copy-on-write view of BACKING over NBD: clients read the backing "
                    "and write to a private overlay.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("backing", nargs="?", metavar="BACKING",
                   help="backing image: a file or block device path, or an NBD URI such as "
                        "nbd://host:10809/name or 'nbd+unix:///?socket=/tmp/s' "
                        "(default: a built-in sample disk)")
    net = p.add_argument_group("where to listen (default: TCP on 127.0.0.1:10809)")
    net.add_argument("-U", "--unix", metavar="PATH",
                     help="listen on a Unix socket, e.g. -U /tmp/disk.sock ('-' = a private "
                          "temporary path, handy with --run)")
    net.add_argument("-p", "--port", type=_port, metavar="PORT",
                     help=f"TCP port, e.g. -p 10809 (default {DEFAULT_PORT}; 0 picks a free one)")
    net.add_argument("-i", "--ipaddr", metavar="ADDR", default=DEFAULT_IPADDR,
                     help=f"TCP address to listen on, e.g. -i 0.0.0.0 (default {DEFAULT_IPADDR}: "
                          "loopback only)")
    net.add_argument("--socket-mode", type=_socket_mode, metavar="MODE",
                     help="file mode of the Unix socket, e.g. --socket-mode 0660 to let the "
                          "group connect (default 0600: only this user)")
    net.add_argument("--max-connections", type=_nonnegative_int, default=0, metavar="N",
                     help="serve at most N connections at once; more are closed at once, "
                          "before the greeting, e.g. --max-connections 64 (default 0: no limit)")
    net.add_argument("--handshake-timeout", type=_seconds, default=DEFAULT_HANDSHAKE_TIMEOUT,
                     metavar="SECONDS",
                     help="drop a client that has not finished the NBD handshake (TLS included) "
                          "this many seconds after connecting, e.g. --handshake-timeout 5 "
                          f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g}; 0: wait forever)")
    sec = p.add_argument_group("TLS (as nbdkit: see nbdkit-tls(1))")
    sec.add_argument("--tls", choices=("off", "on", "require"),
                     help="off: refuse STARTTLS; on: the client chooses; require: nothing but "
                          "STARTTLS or ABORT before TLS, e.g. --tls=require (default: on when "
                          "--tls-certificates or --tls-psk is given, else off)")
    sec.add_argument("--tls-certificates", metavar="DIR",
                     help="directory holding ca-cert.pem, server-cert.pem, server-key.pem (and "
                          "optionally ca-crl.pem), e.g. --tls-certificates /etc/pki/cow")
    sec.add_argument("--tls-verify-peer", action="store_true",
                     help="require a client certificate signed by DIR/ca-cert.pem")
    sec.add_argument("--tls-psk", metavar="FILE",
                     help="pre-shared keys instead of certificates: a psktool file of "
                          "username:hexkey lines, e.g. --tls-psk /etc/cow/keys.psk (needs Python "
                          "3.13+)")
    exp = p.add_argument_group("export")
    exp.add_argument("-e", "--exportname", metavar="NAME", default="",
                     help="export name, e.g. -e disk (the default export \"\" works too)")
    exp.add_argument("-r", "--readonly", action="store_true",
                     help="read-only export: writes, trims and zeroes fail with EPERM, e.g. "
                          "python -m cow.server disk.img -r -U /tmp/s")
    exp.add_argument("-t", "--threads", type=_nonnegative_int, metavar="N",
                     help="worker threads per connection that serve every READ and CACHE, e.g. "
                          "-t 4 (default: 0 for a local backing, whose small requests are "
                          f"served inline; {DEFAULT_NBD_THREADS} for an NBD backing). Large "
                          f"READ/WRITE (from {LARGE_REQUEST // 1024} KiB) always go to workers: "
                          f"N of them, or {LARGE_WORKERS} with -t 0")
    cow = p.add_argument_group("copy-on-write (the names of nbdkit's cow filter)")
    cow.add_argument("--cow-block-size", metavar="SIZE", default="64K",
                     help="overlay block size, a power of two from 4K, e.g. --cow-block-size 4K "
                          "(default 64K)")
    cow.add_argument("--cow-on-read", type=_cow_on_read, default=False, metavar="BOOL|PATH",
                     help="copy blocks into the overlay when they are read: true, false, or an "
                          "absolute path, on while that path exists (default false)")
    cow.add_argument("--cow-on-cache", type=_bool_word, default=False, metavar="BOOL",
                     help="NBD_CMD_CACHE copies blocks into the overlay, e.g. --cow-on-cache "
                          "true (default false: it only reads the backing)")
    cow.add_argument("--lock-mode", choices=("fine", "global"), default="fine",
                     help="engine locking: fine (default) or global, one lock around every "
                          "block operation as nbdkit's filter had (for benchmarks)")
    cow.add_argument("--overlay-max-size", metavar="SIZE",
                     help="cap on overlay space, e.g. --overlay-max-size 1G; writes needing more "
                          "fail with ENOSPC (default: no cap)")
    cow.add_argument("--tmpdir", metavar="DIR",
                     help="directory for the overlay file, e.g. --tmpdir /var/tmp "
                          "(default $TMPDIR, else /var/tmp)")
    run = p.add_argument_group("running")
    run.add_argument("-P", "--pidfile", metavar="FILE",
                     help="write the server's PID to FILE once it is listening (removed on "
                          "exit), e.g. -P /run/cow.pid")
    run.add_argument("--run", metavar="CMD",
                     help="captive mode: run CMD under /bin/sh with $uri, $unixsocket, $port and "
                          "$exportname set, then stop and exit with its status, e.g. "
                          "--run 'nbdinfo \"$uri\"'")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="log connections and every request to stderr, e.g. "
                          "'READ offset=0 count=4096 flags=0x0 -> OK'")
    return p


def _fail(message: str, status: int = 1) -> int:
    print(f"python -m cow.server: error: {message}", file=sys.stderr, flush=True)
    return status


class _StartupError(Exception):
    pass


def make_sample_disk(path: str, size: int = SAMPLE_DISK_SIZE) -> None:
    """A sparse sample image: text-stamped 512-byte sectors in the first MiB of every 4 MiB,
    holes in between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for piece in range(0, size, 4 * 1024 * 1024):
            f.seek(piece)
            sectors = []
            for sector in range(piece // 512, (piece + min(1 << 20, size - piece)) // 512):
                line = f"cow sample disk, sector {sector}, offset {sector * 512}\n".encode()
                sectors.append((line * (512 // len(line) + 1))[:512])
            f.write(b"".join(sectors))


def _uri(export_name: str, *, unix: str | None = None, host: str | None = None,
         port: int | None = None, tls: bool = False) -> str:
    """The URI clients use (nbds when TLS is required, as nbdkit prints it)."""
    name = quote(export_name, safe="")
    scheme = "nbds" if tls else "nbd"
    if unix is not None:
        return f"{scheme}+unix:///{name}?socket={quote(unix, safe='/')}"
    if host is not None and ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}" if name else f"{scheme}://{host}:{port}"


def _systemd_listeners() -> list[socket.socket] | None:
    """Sockets passed by systemd-style socket activation (LISTEN_PID/LISTEN_FDS), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    if n < 1:
        return None
    socks = []
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _listen_unix(path: str, mode: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is 0600: only this user may connect
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as e:
        sock.close()
        raise _StartupError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _listen_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise _StartupError(f"cannot resolve {host}: {e.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise _StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


def _engine_kwargs(args) -> dict:
    from cow.engine import parse_block_size, parse_size
    try:
        kw = dict(block_size=parse_block_size(args.cow_block_size), cow_on_read=args.cow_on_read,
                  cow_on_cache=args.cow_on_cache, lock_mode=args.lock_mode, tmpdir=args.tmpdir)
    except ValueError as e:
        raise _StartupError(f"--cow-block-size: {e}") from None
    if args.overlay_max_size is not None:
        try:
            kw["overlay_max_size"] = parse_size(args.overlay_max_size)
        except ValueError as e:
            raise _StartupError(f"--overlay-max-size: {e}") from None
    if args.tmpdir is not None and not os.path.isdir(args.tmpdir):
        raise _StartupError(f"--tmpdir {args.tmpdir}: not a directory")
    return kw


def _is_nbd_uri(s: str) -> bool:
    return s.split(":", 1)[0] in ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")


def _tune_malloc() -> None:
    """Keep the server's memory flat over many short connections.

    Every connection is a thread with buffers of 256 KiB and more.  glibc raises its mmap
    threshold each time such a buffer is freed and gives each thread an arena of its own, so
    later buffers come from arenas that are not given back: RSS grew from 24 MiB to 108 MiB
    over 40,000 fuzzed connections.  A fixed threshold (large buffers always mmap'd and
    returned) and few arenas keep it flat (measured: 24 MiB -> 24 MiB over 10,000)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-8, 4)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> int:
    # A file-size limit (RLIMIT_FSIZE) on the overlay must fail the write with EFBIG, which
    # the client sees as ENOSPC, instead of killing the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _tune_malloc()
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="python -m cow.server: %(message)s", stream=sys.stderr,
                        level=logging.INFO if args.verbose else logging.WARNING)
    cleanup: list = []
    try:
        return _main(args, cleanup)
    except _StartupError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except OSError:
                pass


def _main(args, cleanup: list) -> int:
    try:
        from cow.engine import Engine
    except ImportError as e:
        raise _StartupError(f"the cow engine is not installed ({e}); run ./dev setup") from None
    from cow.tls import TLSConfigError, server_settings
    try:
        tls = server_settings(args.tls, args.tls_certificates, args.tls_psk, args.tls_verify_peer)
    except TLSConfigError as e:
        raise _StartupError(str(e)) from None

    # -- the engine over the backing
    backing = args.backing
    sample_note = None
    if backing is None:
        sample_dir = tempfile.mkdtemp(prefix="cow-sample-")
        cleanup.append(lambda: shutil.rmtree(sample_dir, ignore_errors=True))
        backing = os.path.join(sample_dir, "sample.img")
        make_sample_disk(backing)
        sample_note = (f"no BACKING given: serving a built-in {SAMPLE_DISK_SIZE >> 20} MiB sample "
                       "disk (data and holes)")
    elif not _is_nbd_uri(backing):
        try:
            with open(backing, "rb"):
                pass
        except OSError as e:
            raise _StartupError(f"cannot open backing {backing!r}: {e.strerror}") from None
    kwargs = _engine_kwargs(args)
    is_nbd = _is_nbd_uri(backing)
    threads = args.threads
    if threads is None:
        threads = DEFAULT_NBD_THREADS if is_nbd else 0
    if is_nbd:
        # Each libnbd handle carries one backing read at a time: enough handles for the
        # workers of a few connections to overlap their reads.
        kwargs["nbd_connections"] = min(64, max(4, 4 * threads))
    try:
        engine = Engine(backing, **kwargs)
    except OSError as e:
        raise _StartupError(f"cannot serve {backing!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise _StartupError(str(e)) from None
    cleanup.append(engine.close)

    description = "built-in sample disk" if sample_note else f"copy-on-write view of {backing}"
    export = P.Export(size=engine.size, name=args.exportname, description=description,
                      readonly=args.readonly, preferred_block_size=engine.block_size)
    server = Server(engine, export, threads_for_reads=threads, verbose=args.verbose, tls=tls,
                    max_connections=args.max_connections,
                    handshake_timeout=args.handshake_timeout)

    # -- where to listen
    captive = args.run is not None
    unix_path = args.unix
    listeners = _systemd_listeners()
    activated = listeners is not None
    env_uri = {"unixsocket": "", "port": "", "exportname": args.exportname}
    if activated:
        where = f"socket activation ({len(listeners)} socket{'s' if len(listeners) > 1 else ''})"
        uri = None
    else:
        if unix_path == "-" or (captive and unix_path is None and args.port is None):
            tmp = tempfile.mkdtemp(prefix="cow-server-")
            cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
            unix_path = os.path.join(tmp, "nbd.sock")
        if unix_path is not None:
            listeners = [_listen_unix(unix_path, args.socket_mode)]
            path = unix_path
            cleanup.append(lambda: os.unlink(path))
            uri = _uri(args.exportname, unix=unix_path, tls=tls.required)
            env_uri["unixsocket"] = unix_path
        else:
            port = DEFAULT_PORT if args.port is None else args.port
            listeners = [_listen_tcp(args.ipaddr, port)]
            port = listeners[0].getsockname()[1]
            uri = _uri(args.exportname, host=args.ipaddr, port=port, tls=tls.required)
            env_uri["port"] = str(port)
        where = uri
    for sock in listeners:
        sock.setblocking(False)
        cleanup.append(sock.close)

    if args.pidfile:
        try:
            with open(args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise _StartupError(f"cannot write pidfile {args.pidfile}: {e.strerror}") from None
        pidfile = args.pidfile
        cleanup.append(lambda: os.unlink(pidfile))

    # The start-up line goes to stdout, except where stdout belongs to a client program
    # (captive mode, socket activation).
    out = sys.stderr if (captive or activated) else sys.stdout
    if sample_note:
        print(f"python -m cow.server: {sample_note}", file=sys.stderr, flush=True)
    ro = ", read-only" if args.readonly else ""
    tls_note = f", TLS {tls.mode} ({tls.kind})" if tls.enabled else ""
    print(f"python -m cow.server: serving {backing} ({engine.size} bytes, copy-on-write, block "
          f"size {engine.block_size}{ro}{tls_note}) at {where}", file=out, flush=True)

    # -- wake-ups: signals and the end of the captive command
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    cleanup.append(lambda: os.close(wake_r))
    cleanup.append(lambda: os.close(wake_w))
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    status = [0]
    if captive:
        env = dict(os.environ, uri=uri, **env_uri)
        child = subprocess.Popen(["/bin/sh", "-c", args.run], env=env)

        def wait_child():
            rc = child.wait()
            status[0] = rc if rc >= 0 else 128 - rc
            stop.set()
            try:
                os.write(wake_w, b"r")
            except OSError:
                pass

        threading.Thread(target=wait_child, name="cow-run", daemon=True).start()

    # -- accept until told to stop
    sel = selectors.DefaultSelector()
    for sock in listeners:
        sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    try:
        while not stop.is_set():
            events = sel.select(1.0 if server.handshake_timeout else None)
            server.reap_handshakes()
            for key, _ in events:
                if key.fileobj == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif not stop.is_set():
                    server.accept(key.fileobj)
    finally:
        signal.set_wakeup_fd(-1)
        sel.close()
        for sock in listeners:
            sock.close()  # stop accepting (and the Unix socket file goes in cleanup)
        server.shutdown()
    if args.verbose:
        log.info("stopped")
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
