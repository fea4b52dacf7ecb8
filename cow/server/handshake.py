"""The handshake: greeting, option haggling and the TLS upgrade, all within --handshake-timeout (a
part of cow/server/connection.py's _Connection).

Hostile clients and TLS.  The whole handshake (TLS included) must finish within
``--handshake-timeout`` seconds, so a client that connects and sends nothing, or drips bytes, is
dropped and its thread freed; ``--max-connections`` closes connections beyond the limit at once,
before the greeting.  TLS (``cow/tls.py`` builds the context) starts on NBD_OPT_STARTTLS; under TLS
a connection is served entirely on its own thread, without workers (an OpenSSL connection must not
be read and written from two threads at once), and its TLS session is shut down (close_notify)
before the socket is closed.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import time

from cow import protocol as P

log = logging.getLogger("cow.server")


class _Handshake:
    """_Connection's handshake, up to transmission or the hang-up."""

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
