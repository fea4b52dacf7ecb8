"""One connection, from accept to close: its state, its life (handshake, then transmission),
shutdown and close.  Its parts are classes it inherits, each in its own file: the handshake
(cow/server/handshake.py), the request loop (cow/server/transmission.py) and what runs off the
reader thread (cow/server/workers.py).

Views.  What a client gets is chosen by export name from a catalog (cow.protocol.Exports): one
engine for every name the server answers to, or, with --overlay-dir / --temporary-views, a view per
name (cow/views.py), opened at NBD_OPT_GO and given back when the connection ends, after its last
request; the last client of a view flushes and closes it.  A connection serves every request with
the engine of its own view, reads started over an NBD backing included.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
import traceback
from typing import TYPE_CHECKING

from cow import protocol as P
from cow.engine import Transmission
from cow.server.handshake import _Handshake
from cow.server.receive import _Receiver
from cow.server.replies import _PlannedReply
from cow.server.sockets import shutdown_socket
from cow.server.transmission import _RequestLoop
from cow.server.tuning import LINGER, MAX_QUEUED_PER_CONNECTION
from cow.server.workers import _OffTheReader, _Workers

if TYPE_CHECKING:
    from cow.server.accept import Server

log = logging.getLogger("cow.server")


class _Connection(_Handshake, _RequestLoop, _OffTheReader):
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
        # Reads waiting for a slow backing, without a thread each: those Engine.serve starts
        # (their replier: served_replier) and the front end's own (see _start_read).  They
        # share the connection's read slots (the Transmission's) and the read budget.
        self.tx.configure_reads(server.read_budget, MAX_QUEUED_PER_CONNECTION, serve=False)
        self.served_replier: threading.Thread | None = None
        self.reads = None  # the engine's ReadQueue, made at the first such read
        self.replier: threading.Thread | None = None
        self._read_buffers = server.read_buffers
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
            if self.served_replier is not None:
                self.tx.close_reads()  # the same for the reads Engine.serve started
                self.served_replier.join()
            if self.tx.read_in_use:  # nothing of ours runs any more: whatever is left is free
                self.server.read_budget.give(self.tx, self.tx.read_in_use)
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
                shutdown_socket(sock, socket.SHUT_WR)
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
        if (self.waiting or self.tx.waiting) and self._idle():
            shutdown_socket(self.sock, socket.SHUT_RD)

    def _idle(self) -> bool:
        """Nothing in flight: no request with a worker, no read waiting for the backing."""
        return not self.in_workers and not self.tx.reads_in_flight

    def _client_gone(self, why) -> None:
        """A reply could not be sent: the client is gone.  Every thread of the connection
        stops: the reader, blocked or not, sees the stream end."""
        log.info("connection %d: closing: %s", self.id, why)
        self.broken = True
        self.tx.mark_broken()
        self.server.read_budget.wake()  # its reader may be waiting for the budget
        shutdown_socket(self.sock, socket.SHUT_RDWR)

    def _worker_done(self) -> None:
        """A worker answered a request: at shutdown, the last one wakes a waiting reader."""
        with self._in_workers_lock:
            self.in_workers -= 1
        self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        """At shutdown, the last request in flight to finish wakes a waiting reader."""
        if self.stopping and (self.waiting or self.tx.waiting) and self._idle():
            shutdown_socket(self.sock, socket.SHUT_RD)

    def handshake_overdue(self, now: float) -> bool:
        deadline = self.handshake_deadline
        return deadline is not None and now > min(deadline + 1, self.stop_deadline)

    def _error_reply(self, cookie, cmd, flags, offset, count, error, message,
                     cause: Exception | None = None) -> bytes:
        """An error reply carrying message (which must name no path: see client_message); the
        verbose log tells the cause in full."""
        if self.verbose:
            log.info("connection %d: %s offset=%d count=%d flags=0x%x -> %s (%s)", self.id,
                     P.CMD_NAMES.get(cmd, cmd), offset, count, flags, P.nbd_error_name(error),
                     message if cause is None else cause)
        return self.proto.error_reply(cookie, cmd, error, message)
