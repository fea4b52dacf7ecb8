"""Receiving: a connection's receive buffer (_Receiver) and the time limit on a WRITE's
payload (_PayloadWait)."""

from __future__ import annotations

import contextlib
import socket

from cow.server.tuning import DEFAULT_PAYLOAD_TIMEOUT, RECV_BUFFER, RECV_CHUNK


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

