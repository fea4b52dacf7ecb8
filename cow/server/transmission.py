"""Transmission: the reader loop (decode, validate, then serve inline or hand over), WRITEs spliced
from the socket, the payload buffers, and serving one request with the engine (a part of
cow/server/connection.py's _Connection).

Concurrency.  Each connection has one thread that reads requests and serves them itself, inline: on
this 2-core machine a hand-off per request to another thread costs more than a small request (4 fio
jobs x depth 8, 4 KiB random reads: ~110k/s inline against ~45k/s through 4 workers per
connection).  Requests on other connections run in parallel because the engine releases the GIL.
Overlap within a connection is used only where it pays: large READ/WRITE (from 128 KiB), whose
transfer then overlaps with the next request's, and, when the backing is an NBD server (a request
may wait milliseconds for it), every request that will read the backing (the engine says which).  A
READ of blocks not yet copied up is started by Engine.serve itself, which goes on reading requests:
the engine fills the reply's buffer as the backing answers, and the connection's served replier
sends finished replies, all that finished together in one sendmsg, both without the GIL
(cow/areads.pxi; under --verbose, the same with pread_start and a replier in Python, in
cow/server/workers.py).  So a client's whole queue depth becomes backing reads in flight with no
thread each (a thread per request measured 2.6x the context switches and 1.8x the CPU).  The rest (a READ with cow-on-read, a CACHE or BLOCK_STATUS there, a
WRITE, ZERO or TRIM whose partial head or tail block needs a copy-up) goes to worker threads of the
connection, started as they are needed, up to one per request in flight (``-t`` caps them).
Replies then leave out of order, each written whole under the connection's send lock.

Data path.  Requests are received with ``recv_into`` into a reusable buffer (several small requests
per system call when the client pipelines); small WRITE payloads are handed to the engine as views
of that buffer.  WRITE payloads from ZERO_COPY_WRITE (64 KiB) never enter this process: the reader
hands the socket to the engine (Engine.pwrite_from), which receives the payload whole into pipes
with splice and splices it on into the overlay, and the next few requests are read without reading
ahead, so that the next large payload is still in the socket.  Under TLS, over an NBD backing for
partial blocks not copied up, and over the maximum size, large payloads are received straight into
one of a few reusable payload buffers of the connection and written by a worker.  READs from
ZERO_COPY_READ (64 KiB) are not read at all: the engine says where their bytes are
(Engine.read_plan: pieces of the overlay, of a file backing, or zeroes) and the reply leaves with
sendfile from those files, header first, whole, under the send lock (ReadPlan.send, one call with
the GIL released).  With structured replies, the zero pieces (trimmed blocks, the backing's holes)
go out as NBD_REPLY_TYPE_OFFSET_HOLE chunks, unless the client set NBD_CMD_FLAG_DF.  Under TLS,
over an NBD backing for blocks not copied up, and below that size, the engine reads READ data into
a reusable buffer just behind the reply header, so that header and data leave together.  Replies
served inline are held back while the next request is already in the receive buffer, then leave
with one ``sendmsg`` (never delaying a reply while the reader would wait for input); the socket's
send buffer is raised so that a large reply leaves in one call.
"""

from __future__ import annotations

import errno
import logging
import os
import traceback

from cow import protocol as P
from cow.engine import (
    SERVE_BROKEN,
    SERVE_EOF,
    SERVE_FAILED,
    SERVE_FRONT_END,
    SERVE_STOP,
    SERVE_TRUNCATED,
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
from cow.server.errors import client_message, nbd_error_from_errno
from cow.server.replies import _PlannedReply, _ReplyBatch
from cow.server.tuning import (
    EXACT_READS,
    KEEP_BUFFER,
    KEEP_PAYLOAD_BUFFERS,
    LARGE_REQUEST,
    MAX_QUEUED_PER_CONNECTION,
    PAYLOAD_BUDGET,
    RECV_BUFFER,
    RECV_CHUNK,
    ZERO_COPY_READ,
    ZERO_COPY_WRITE,
)

log = logging.getLogger("cow.server")

# Over a slow backing, what may read it (the engine says whether it will) goes to workers.
_READS_BACKING = frozenset((NBD_CMD_READ, NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS))
_WRITES_PARTIAL = frozenset((NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM))
_SERVED_BY_ENGINE = frozenset((NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH))  # (Engine.serve)


def _refusal_message(error: int) -> str:
    return "the server is shutting down" if error == P.NBD_ESHUTDOWN else "invalid request"


def _flush_quietly(batch: _ReplyBatch) -> None:
    """Send what batch holds, if the client is still there."""
    try:
        batch.flush()
    except OSError:
        pass


class _RequestLoop:
    """_Connection's transmission phase, on the reader thread."""

    def _transmission(self) -> None:
        """The transmission phase: the request loop, then the hang-up, however the loop ends."""
        batch = _ReplyBatch(self)
        try:
            self._request_loop(batch)
        except TimeoutError as e:  # a WRITE payload stopped arriving (_Receiver): we end here
            log.warning("connection %d: %s", self.id, e)
            _flush_quietly(batch)
        except Exception:
            # A bad magic (the stream is out of step) or our own bug: nothing more is read,
            # but every request executed so far still gets its reply before the hang-up
            # (workers' replies are sent before run() closes the socket).
            _flush_quietly(batch)
            raise
        finally:
            self.proto.disconnect()
        batch.flush()

    def _request_loop(self, batch: _ReplyBatch) -> None:
        """The reader loop: decode, validate, then serve inline or hand to a worker.

        Inline replies wait in ``batch`` for as long as the next request is already in the
        receive buffer, and leave together before the reader could block."""
        proto, rx = self.proto, self.rx
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
            self._configure_serve()
        while not self.broken:
            # A run of requests that are ours (BLOCK_STATUS, TRIM...) already buffered is
            # served here, its replies batched, without a call into the engine between.
            if serve is not None and not (
                    rx.end - rx.start >= REQUEST_SIZE and rx_buf[rx.start + 6] == 0 and
                    rx_buf[rx.start + 7] not in _SERVED_BY_ENGINE):
                batch.flush()
                rx.start, rx.end, status, info = serve(tx, rx_buf, rx.start, rx.end)
                if status == SERVE_FAILED:
                    batch.add(self._serve_failed_reply(info))
                    continue
                if status != SERVE_FRONT_END and status != SERVE_STOP:
                    self._serve_ended(status, info)
                    break
                # a whole header is buffered (SERVE_FRONT_END), or SERVE_STOP: on below
            if rx.end - rx.start < REQUEST_SIZE:
                batch.flush()
                # The reader may now block for the next request.  At shutdown, once
                # nothing is in flight, the connection ends here (see begin_shutdown).
                self.waiting = True
                if self.stopping and self._idle():
                    self.waiting = False
                    log.info("connection %d: closing: the server is shutting down", self.id)
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
                    if not self._refuse_payload(cookie, flags, offset, count, P.NBD_EINVAL,
                                                f"write of {count} bytes is over the maximum "
                                                f"{max_payload}", batch):
                        break
                    continue
                payload, owned = self._receive_payload(count, batch)
                if payload is None:
                    break
            elif cmd == NBD_CMD_DISC:
                if self.verbose:
                    log.info("connection %d: DISC", self.id)
                break
            error = check(cmd, flags, offset, count)
            if error:
                if owned is not None:
                    self._give_back_payload_buffer(owned, count)
                batch.add(self._refusal(cookie, cmd, flags, offset, count, error))
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

    def _receive_payload(self, count: int, batch) -> tuple:
        """(payload, owned): a WRITE's payload, a view of the receive buffer or, when large, in
        a payload buffer of its own (owned) that a worker can keep; (None, None) if the stream
        ends inside it."""
        rx = self.rx
        if rx.end - rx.start < count:
            batch.flush()
        owned = None
        if count >= LARGE_REQUEST or count > RECV_BUFFER:  # own buffer, for a worker
            owned = self._take_payload_buffer(count)
            payload = memoryview(owned)[:count]
            ok = rx.read_into(payload)
        else:
            payload = rx.read(count, True)
            ok = payload is not None
        if not ok:
            log.info("connection %d: truncated WRITE payload: nothing written", self.id)
            if owned is not None:
                self._give_back_payload_buffer(owned, count)
            return None, None
        return payload, owned

    def _configure_serve(self) -> None:
        """Tell the engine what Engine.serve needs of this connection (its Transmission).
        Over an NBD backing Engine.serve starts and answers READs of blocks not copied up itself
        (cow/areads.pxi), with the connection's served replier."""
        proto = self.proto
        if self.server.slow_backing:
            self.tx.configure_reads(self.server.read_budget, MAX_QUEUED_PER_CONNECTION,
                                    serve=True)
            self._start_served_replier()
        self.tx.configure(self.sock.fileno(), structured=proto.structured_replies,
                          fua=bool(proto.transmission_flags & P.NBD_FLAG_SEND_FUA),
                          readonly=proto.readonly, size=proto.size,
                          max_payload=proto.max_payload,
                          slow_backing=self.server.slow_backing, large_request=LARGE_REQUEST,
                          zero_copy_read=ZERO_COPY_READ, zero_copy_write=ZERO_COPY_WRITE,
                          recv_ahead=RECV_CHUNK, exact_reads=EXACT_READS,
                          payload_timeout=self.rx.payload_timeout)

    def _serve_failed_reply(self, info) -> bytes:
        """The error reply to a request Engine.serve failed (SERVE_FAILED)."""
        cookie, cmd, flags, offset, count, e = info
        return self._error_reply(cookie, cmd, flags, offset, count,
                                 nbd_error_from_errno(e.errno), client_message(e), e)

    def _serve_ended(self, status: int, info) -> None:
        """Engine.serve ended the stream (SERVE_EOF, SERVE_TRUNCATED, SERVE_BROKEN): say why."""
        if status == SERVE_EOF:
            self._log_end_of_stream()
        elif status == SERVE_TRUNCATED:
            if info == errno.ETIMEDOUT:
                log.warning("connection %d: %s", self.id, self.rx.stalled())
            else:
                log.info("connection %d: truncated WRITE payload: nothing written", self.id)
        elif status == SERVE_BROKEN:
            self._client_gone(os.strerror(info))

    def _refusal(self, cookie, cmd, flags, offset, count, error: int) -> bytes:
        """The error reply to a request check_request refused."""
        return self._error_reply(cookie, cmd, flags, offset, count, error,
                                 _refusal_message(error))

    def _refuse_payload(self, cookie, flags, offset, count, error: int, message: str,
                        batch) -> bool:
        """Refuse a WRITE without taking its payload: it is dropped in pieces, then the error
        reply is added to batch.  False: the stream ended inside the payload."""
        batch.flush()
        if not self.rx.skip(count):
            log.info("connection %d: truncated WRITE payload", self.id)
            return False
        batch.add(self._error_reply(cookie, NBD_CMD_WRITE, flags, offset, count, error, message))
        return True

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
            return self._refuse_payload(cookie, flags, offset, count, error,
                                        _refusal_message(error), batch)
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
