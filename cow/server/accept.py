"""The server: accepts connections on the listening sockets (resting when out of descriptors),
limits them, and shuts them all down; and OneEngine, one engine behind one export.

When accept fails for want of descriptors or memory, the listeners rest (Server.accept_rest)
instead of being polled in a loop; the client waits in the listen backlog, the connections already
open are served, and the log says so once a second at most.

Shutdown.  At SIGTERM requests in flight finish; requests that arrive after shutdown began are
answered NBD_ESHUTDOWN and options NBD_REP_ERR_SHUTDOWN (the spec's SHOULDs), so that clients learn
why the connection ends.  A connection in transmission ends once nothing is in flight; one still in
the handshake gets a few seconds to hear why; after a grace period clients that do not read their
replies are cut off.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

from cow import protocol as P
from cow.engine import ReadBudget
from cow.server.connection import _Connection
from cow.server.replies import _BufferPool
from cow.server.sockets import shutdown_socket
from cow.server.tuning import (
    ACCEPT_LOG_INTERVAL,
    ACCEPT_LOG_INTERVAL_MAX,
    ACCEPT_REST_FIRST,
    ACCEPT_REST_MAX,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_PAYLOAD_TIMEOUT,
    LARGE_WORKERS,
    MAX_QUEUED_PER_CONNECTION,
    READ_ALWAYS,
    READ_BUDGET,
    SERVER_READ_BUDGET,
    SHUTDOWN_GRACE,
    SHUTDOWN_HANDSHAKE_WAIT,
    SOCKET_BUFFER,
)

log = logging.getLogger("cow.server")

# accept(2) failures that mean "not now": a descriptor or memory comes back when a connection
# ends, and the client waits in the listen backlog meanwhile
_ACCEPT_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


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
        self.read_budget = ReadBudget(READ_BUDGET, SERVER_READ_BUDGET, READ_ALWAYS)
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
            shutdown_socket(conn.sock, socket.SHUT_RDWR)

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
            shutdown_socket(conn.sock, socket.SHUT_RDWR)
        for _, thread in late:
            thread.join(10.0)
