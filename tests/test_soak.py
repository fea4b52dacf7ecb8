"""Load: 256 connections at once doing mixed reads, writes, trims, zeroes and block status
against one server, checked against a model at the end; the server's memory and descriptors
are flat from one round to the next.  And SIGTERM under full load.

The model: connection k owns the 4 KiB chunks whose index is k modulo 256, so that many
connections write pieces of the same 64 KiB overlay block at once (the copy-up races the
engine must get right) while each can predict exactly what its own chunks hold.

A longer soak: ``COW_SOAK_ROUNDS=40 COW_SOAK_OPS=200 .venv/bin/pytest tests/test_soak.py``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading

import nbd
import pytest

from support_reliability import (
    CMD_READ, CMD_WRITE, ESHUTDOWN, REPLY_FLAG_DONE, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, RawClient, fd_count, rss_kib, run_server, thread_count, wait_until,
)

KiB = 1024
MiB = 1024 * KiB
CHUNK = 4 * KiB
CONNECTIONS = int(os.environ.get("COW_SOAK_CONNECTIONS", "256"))
ROUNDS = int(os.environ.get("COW_SOAK_ROUNDS", "3"))
OPS = int(os.environ.get("COW_SOAK_OPS", "24"))
SIZE = CONNECTIONS * CHUNK * 16  # 16 MiB with 256 connections: 16 chunks each


def _zero_ranges(h, offset, count):
    """Byte ranges [s, e) that base:allocation reports as reading zero."""
    out = []

    def cb(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for i in range(0, len(entries), 2):
                if entries[i + 1] & nbd.STATE_ZERO:
                    out.append((pos, pos + entries[i]))
                pos += entries[i]
        return 0

    h.block_status(count, offset, cb)
    return out


def _client(uri, k, ops, model, rng, failures, stats):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    chunks = list(range(k, SIZE // CHUNK, CONNECTIONS))
    try:
        for _ in range(ops):
            c = rng.choice(chunks)
            base = c * CHUNK
            start = rng.randrange(CHUNK)
            n = rng.randrange(1, CHUNK - start + 1)
            off = base + start
            op = rng.choice("rrwwwtzZb")
            if op == "r":
                got = h.pread(n, off)
                if got != bytes(model[off:off + n]):
                    failures.append(f"conn {k}: read {off}+{n} differs from the model")
            elif op == "w":
                data = rng.randbytes(n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                model[off:off + n] = data
            elif op == "t":
                h.trim(n, off)
                model[off:off + n] = bytes(n)
            elif op in "zZ":
                h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if op == "Z" else 0)
                model[off:off + n] = bytes(n)
            else:
                for s, e in _zero_ranges(h, base, CHUNK):
                    s, e = max(s, base), min(e, base + CHUNK)
                    if any(model[s:e]):
                        failures.append(f"conn {k}: block status says [{s},{e}) reads zero")
            stats[op] = stats.get(op, 0) + 1
        if rng.random() < 0.2:
            h.flush()
    finally:
        h.shutdown()


def _round(uri, model, seed, ops):
    failures: list[str] = []
    errors: list[BaseException] = []
    stats: dict[str, int] = {}
    barrier = threading.Barrier(CONNECTIONS)

    def run(k):
        try:
            barrier.wait()
            _client(uri, k, ops, model, random.Random(seed * 100003 + k), failures, stats)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(CONNECTIONS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    assert not failures, failures[:5]
    return stats


def test_soak_256_connections(backing_factory, tmp_path):
    path = backing_factory(SIZE)
    model = bytearray(path.read_bytes())
    with run_server(tmp_path, path, "--cow-block-size", "64K") as srv:
        threads0 = thread_count(srv.pid)
        _round(srv.uri, model, 0, OPS)                     # warm-up round: pools, caches
        wait_until(lambda: thread_count(srv.pid) <= threads0, what="connection threads to end")
        fds1, rss1 = fd_count(srv.pid), rss_kib(srv.pid)
        total = {}
        for r in range(1, ROUNDS + 1):
            for op, n in _round(srv.uri, model, r, OPS).items():
                total[op] = total.get(op, 0) + n
        wait_until(lambda: thread_count(srv.pid) <= threads0, what="connection threads to end")
        wait_until(lambda: fd_count(srv.pid) <= fds1, what=f"fds back to {fds1}")
        rss2 = rss_kib(srv.pid)
        print(f"soak: {ROUNDS} rounds x {CONNECTIONS} connections x {OPS} ops {total}; "
              f"fds {fds1} -> {fd_count(srv.pid)}; RSS {rss1} -> {rss2} KiB")
        # Flat: no per-connection or per-request leak (256 connections x rounds would show).
        assert rss2 - rss1 < 16 * 1024, (rss1, rss2)
        # The whole disk, read by a fresh client, is the model.
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        got = bytearray()
        for off in range(0, SIZE, 4 * MiB):
            got += h.pread(min(4 * MiB, SIZE - off), off)
        h.shutdown()
        assert got == model, "the disk differs from the model"
        assert "Traceback" not in srv.stderr()


# ---------------------------------------------------------------- SIGTERM under load


def _hammer(sock_path, k, stop, results):
    """Pipeline READ and WRITE requests on a raw connection until the server closes it, then
    check the stream ended on a reply boundary with every reply well-formed."""
    c = RawClient(sock_path, timeout=60)
    structured = k % 2 == 0
    try:
        c.handshake(structured=structured, contexts=())
    except Exception as e:  # noqa: BLE001 - SIGTERM may come during the handshake
        results.append(("handshake", k, repr(e)))
        c.close()
        return
    sent = {}
    lock = threading.Lock()
    done = threading.Event()

    def sender():
        # Never holds the lock while sending: the receiver must always be free to drain
        # replies, or client and server would both block in send.
        rng = random.Random(k)
        cookie = 0
        try:
            while not stop.is_set() and not done.is_set():
                with lock:
                    busy = len(sent) >= 16
                    if not busy:
                        cookie += 1
                        off = rng.randrange(0, 4 * MiB - 65536)
                        if rng.random() < 0.5:
                            sent[cookie] = (CMD_READ, 65536)
                            req = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, off,
                                              65536)
                        else:
                            sent[cookie] = (CMD_WRITE, 0)
                            req = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie, off,
                                              8192) + bytes([k & 0xFF]) * 8192
                if busy:
                    threading.Event().wait(0.001)
                else:
                    c.sock.sendall(req)
        except OSError:
            pass

    t = threading.Thread(target=sender)
    t.start()
    replies = 0
    outcome = "eof"
    buf = b""
    try:
        while True:
            try:
                chunk = c.sock.recv(1 << 20)
            except ConnectionResetError:
                outcome = "reset"
                break
            if not chunk:
                break
            buf += chunk
            # Parse whole replies off the front.
            while True:
                if len(buf) < 4:
                    break
                (magic,) = struct.unpack_from(">I", buf)
                if magic == SIMPLE_REPLY_MAGIC:
                    if len(buf) < 16:
                        break
                    err, cookie = struct.unpack_from(">IQ", buf, 4)
                    with lock:
                        cmd, n = sent.get(cookie, (None, 0))
                    need = 16 + (n if (cmd == CMD_READ and err == 0) else 0)
                    if len(buf) < need:
                        break
                    assert cmd is not None, f"reply to unknown cookie {cookie}"
                    assert err in (0, ESHUTDOWN), err
                    buf = buf[need:]
                    with lock:
                        del sent[cookie]
                    replies += 1
                elif magic == STRUCTURED_REPLY_MAGIC:
                    if len(buf) < 20:
                        break
                    flags, rtype, cookie, length = struct.unpack_from(">HHQI", buf, 4)
                    if len(buf) < 20 + length:
                        break
                    with lock:
                        assert cookie in sent, f"reply to unknown cookie {cookie}"
                    if rtype & (1 << 15):
                        assert struct.unpack_from(">I", buf, 20)[0] == ESHUTDOWN
                    buf = buf[20 + length:]
                    if flags & REPLY_FLAG_DONE:
                        with lock:
                            del sent[cookie]
                        replies += 1
                else:
                    raise AssertionError(f"garbage in the reply stream: {buf[:16].hex()}")
    finally:
        done.set()
        t.join()
        c.close()
    results.append(("ok", k, replies, len(buf), outcome))


def test_sigterm_under_full_load(backing_factory, tmp_path):
    path = backing_factory(4 * MiB)
    with run_server(tmp_path, path) as srv:
        stop = threading.Event()
        results = []
        ts = [threading.Thread(target=_hammer, args=(srv.sock, k, stop, results))
              for k in range(24)]
        for t in ts:
            t.start()
        # Let every connection get going (each has replies coming back), then SIGTERM.
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        for _ in range(50):
            h.pread(65536, 0)
        h.shutdown()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(60)
        stop.set()
        for t in ts:
            t.join(60)
        assert rc == 0, srv.stderr()
        assert not srv.sock.exists(), "socket left behind"
        oks = [r for r in results if r[0] == "ok"]
        assert len(results) == 24 and oks, results
        for _, k, replies, leftover, outcome in oks:
            # Every reply was whole: nothing half-sent before the connection closed.
            assert leftover == 0, f"connection {k}: {leftover} bytes of a partial reply"
        assert sum(r[2] for r in oks) > 0
        with pytest.raises(OSError):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(srv.sock))
            finally:
                s.close()
        assert "Traceback" not in srv.stderr()
