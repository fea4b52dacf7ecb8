"""Helpers for tests that need a running ``python -m cow.server``.

    from support_server import start_server

    def test_something(backing_factory, tmp_path):
        disk = backing_factory(4 << 20)
        with start_server(disk, "--cow-block-size", "4K", tmp_path=tmp_path) as (uri, proc):
            h = nbd.NBD(); h.connect_uri(uri) ...

``start_server`` starts the real server as a subprocess (``python -P -m cow.server``, so the
installed package is imported, not the source folder) on a Unix socket in ``tmp_path``, waits
until it accepts connections and yields ``(uri, proc)``.  ``proc.sock_path`` and
``proc.log_path`` (the server's stdout and stderr) are set on the Popen object.  On leaving
the block it sends SIGTERM and waits; with ``check_exit=True`` (the default) it asserts the
server exited 0 and removed its socket, and shows the server's log if not.

``RawClient`` speaks NBD byte by byte over a plain socket, for tests that must send what no
well-behaved client would.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import wait_for_socket  # noqa: F401  (re-exported for other test modules)
from cow import protocol as P

PYTHON = sys.executable
_counter = itertools.count()


def server_command(backing, *options):
    cmd = [PYTHON, "-P", "-m", "cow.server"]
    if backing is not None:
        cmd.append(str(backing))
    return cmd + [str(o) for o in options]


@contextmanager
def start_server(backing, *options, tmp_path, env=None, check_exit=True, timeout=30.0,
                 preexec_fn=None):
    """Run ``python -P -m cow.server BACKING -U SOCK OPTIONS...``; yield ``(uri, proc)``.

    backing: a path or NBD URI, or None for the built-in sample disk.
    options: extra command-line options (str() is applied), e.g. "-r", "-e", "disk".
    env, preexec_fn: passed to subprocess.Popen (e.g. a preexec_fn that sets an rlimit).
    """
    n = next(_counter)
    sock = Path(tmp_path) / f"cow{n}.sock"
    log_path = Path(tmp_path) / f"cow{n}.log"
    cmd = server_command(backing, "-U", sock, *options)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec_fn)
    proc.sock_path = sock
    proc.log_path = log_path
    try:
        try:
            wait_for_socket(sock, proc, timeout)
        except Exception as e:
            raise RuntimeError(f"{e}; server log:\n{log_path.read_text()}") from None
        deadline = time.monotonic() + timeout
        while not (m := re.search(r" at (nbd\S+)\n", log_path.read_text())):
            assert time.monotonic() < deadline and proc.poll() is None, \
                f"no start-up line with the URI; server log:\n{log_path.read_text()}"
            time.sleep(0.01)
        yield m.group(1), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM; log:\n{log_path.read_text()}")
    if check_exit:
        assert rc == 0, f"server exited {rc}; log:\n{log_path.read_text()}"
        assert not sock.exists(), "server left its socket behind"


class RawClient:
    """A hand-driven NBD client over a plain socket (for malformed input).  ``address`` is a
    Unix socket path, or a (host, port) pair for TCP."""

    def __init__(self, address, timeout=20.0):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(str(address))
        self.structured = False
        self.chunks = []            # the last structured reply's (flags, type, payload)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def is_closed(self, timeout=10.0):
        """True if the server closes the connection (EOF) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def read_to_eof(self, timeout=20.0):
        """Everything the server still sends, up to its close of the connection (EOF or a
        reset), by which time it has finished with the connection; AssertionError if it does
        not close within timeout."""
        self.sock.settimeout(timeout)
        out = bytearray()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return bytes(out)
                out += data
        except (ConnectionResetError, BrokenPipeError):
            return bytes(out)
        except socket.timeout:
            raise AssertionError(f"the server did not close the connection within {timeout} s "
                                 f"({len(out)} bytes received)") from None

    # -- handshake
    def greeting(self, client_flags=P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        if client_flags is not None:
            self.send(struct.pack(">I", client_flags))
        return flags

    def option(self, option, data=b""):
        """Send an option; return its replies up to the final one as (type, data) pairs."""
        self.send(P.pack_option(option, data))
        out = []
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == P.NBD_REP_MAGIC and opt == option
            out.append((rtype, self.recv_exact(length)))
            if rtype in (P.NBD_REP_SERVER, P.NBD_REP_INFO, P.NBD_REP_META_CONTEXT):
                continue
            return out

    def negotiate(self, structured=True, contexts=(), name=""):
        """Full handshake with GO; return the transmission flags."""
        self.greeting()
        if structured:
            assert self.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
            self.structured = True
            if contexts:
                self.option(P.NBD_OPT_SET_META_CONTEXT, P.pack_meta_context_data(name, contexts))
        replies = self.option(P.NBD_OPT_GO, P.pack_info_go_data(name))
        assert replies[-1][0] == P.NBD_REP_ACK, replies
        for rtype, data in replies:
            if rtype == P.NBD_REP_INFO and struct.unpack_from(">H", data)[0] == P.NBD_INFO_EXPORT:
                self.size, flags = struct.unpack_from(">QH", data, 2)
                return flags
        raise AssertionError("no NBD_INFO_EXPORT")

    # -- transmission
    def request(self, cmd, offset=0, count=0, *, flags=0, cookie=1, payload=b""):
        self.send(P.pack_request(cmd, offset, count, flags=flags, cookie=cookie) + payload)

    def reply(self, read_count=0, read_offset=None):
        """Read one whole reply; return (cookie, error, data).

        Simple reply: data is the READ payload (read_count bytes, if no error).  Structured
        reply: every chunk up to NBD_REPLY_FLAG_DONE, each parsed as doc/proto.md lays it out
        (also kept in ``self.chunks`` as (flags, type, payload)): OFFSET_DATA is an offset and
        data, OFFSET_HOLE an offset and a length of zeroes (no data), ERROR and ERROR_OFFSET an
        error, a message and (ERROR_OFFSET) an offset, BLOCK_STATUS's payload is passed on
        as it is.  The read data is put together by offset: the pieces must neither overlap
        nor leave a gap, and (no error) cover read_count bytes from read_offset (if given)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        self.chunks = []
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_count) if read_count and not error else b""
            return cookie, error, data
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        error, pieces, other = 0, [], b""
        cookies = set()
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            self.chunks.append((flags, rtype, payload))
            cookies.add(cookie)
            if rtype in (P.NBD_REPLY_TYPE_ERROR, P.NBD_REPLY_TYPE_ERROR_OFFSET):
                extra = 8 if rtype == P.NBD_REPLY_TYPE_ERROR_OFFSET else 0
                assert length >= 6 + extra, f"error chunk of {length} bytes"
                error, msglen = struct.unpack_from(">IH", payload)
                assert error != 0 and length == 6 + msglen + extra, (error, msglen, length)
            elif rtype & 0x8000:
                raise AssertionError(f"unknown error chunk type {rtype:#x}")
            elif rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
                assert length > 8, f"OFFSET_DATA chunk of {length} bytes"
                (off,) = struct.unpack_from(">Q", payload)
                pieces.append((off, payload[8:]))
            elif rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                assert length == 12, f"OFFSET_HOLE chunk of {length} bytes"
                off, hole = struct.unpack(">QI", payload)
                assert hole > 0, "empty hole"
                pieces.append((off, bytes(hole)))
            elif rtype == P.NBD_REPLY_TYPE_BLOCK_STATUS:
                other += payload
            elif rtype == P.NBD_REPLY_TYPE_NONE:
                assert length == 0 and flags & P.NBD_REPLY_FLAG_DONE, (flags, length)
            else:
                raise AssertionError(f"unknown chunk type {rtype}")
            if flags & P.NBD_REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        assert len(cookies) == 1, f"chunks of one reply with cookies {cookies}"
        pieces.sort(key=lambda p: p[0])
        for (a, da), (b, _) in zip(pieces, pieces[1:]):
            assert a + len(da) == b, f"read chunks overlap or leave a gap at {a + len(da)}..{b}"
        data = b"".join(d for _, d in pieces)
        if pieces and read_offset is not None:
            assert pieces[0][0] == read_offset, (pieces[0][0], read_offset)
        if read_count and not error:
            assert len(data) == read_count, f"read chunks cover {len(data)} of {read_count} bytes"
        return cookie, error, data + other
