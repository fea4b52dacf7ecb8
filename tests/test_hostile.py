"""Hostile clients against a live server: clients that vanish mid-handshake, mid-request and
mid-reply; idle clients (the handshake timeout frees them); connection floods beyond
--max-connections; edge-of-range and overflowing requests and unknown flags on every command.

Always: a spec error reply or a closed connection for that client only, never a traceback; the
server stays up, keeps serving others, and gives back its descriptors.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading

import nbd
import pytest

from support_reliability import (
    ALL_COMMANDS, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, OPT_GO, Closed, RawClient, fd_count, run_server,
    thread_count, wait_until,
)

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB + 4096  # not a multiple of the 64 KiB block
MAX_PAYLOAD = 64 * MiB


@pytest.fixture
def disk(backing_factory):
    path = backing_factory(SIZE)
    return path, path.read_bytes()


@pytest.fixture
def server(disk, tmp_path):
    with run_server(tmp_path, disk[0], "--handshake-timeout", "2") as srv:
        yield srv


def _baseline(srv):
    """Descriptors and threads of the idle server, after one full connection (warm-up)."""
    threads = thread_count(srv.pid)
    with RawClient(srv.sock) as c:
        c.handshake()
        c.disconnect()
    wait_until(lambda: thread_count(srv.pid) <= threads, what="the warm-up connection to end")
    return fd_count(srv.pid), threads


def _settles(srv, fds, threads):
    wait_until(lambda: fd_count(srv.pid) <= fds and thread_count(srv.pid) <= threads,
               timeout=30, what=f"fds <= {fds} and threads <= {threads}")


def _still_serves(srv, backing, offset=8192):
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    try:
        return h.pread(4096, offset) == backing[offset:offset + 4096]
    finally:
        h.shutdown()


# ---------------------------------------------------------------- vanishing clients


def test_clients_vanish_mid_handshake(server, disk):
    fds, threads = _baseline(server)
    cuts = [
        b"",                                                  # connects, reads nothing, goes
        b"\x00\x00",                                          # half the client flags
        struct.pack(">I", 3) + b"IHAVEO",                     # half an option header
        struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, OPT_GO, 100) + b"x" * 10,
    ]
    for i in range(5):
        for cut in cuts:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(server.sock))
            if i % 2:
                s.recv(18)
            s.sendall(cut)
            if i == 4:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.close()
    _settles(server, fds, threads)
    assert _still_serves(server, disk[1])


def test_clients_vanish_mid_request(server, disk):
    path, backing = disk
    fds, threads = _baseline(server)
    for structured in (False, True):
        for cut in (10, 27):                                   # inside the header
            c = RawClient(server.sock).handshake(structured=structured)
            c.send(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, 4096)[:cut])
            c.close()
        c = RawClient(server.sock).handshake(structured=structured)  # inside a WRITE payload
        c.request(CMD_WRITE, 65536, 65536, payload=b"W" * 30000)
        c.close()
    _settles(server, fds, threads)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.pread(65536, 65536) == backing[65536:131072], "a truncated WRITE reached the disk"
    h.shutdown()


def test_clients_vanish_mid_reply(server, disk):
    """Large READs asked for and never read: the server's sends fail or block until the client
    is gone; that connection ends, the others go on."""
    fds, threads = _baseline(server)
    for structured in (False, True):
        for n in (1, 8):
            c = RawClient(server.sock).handshake(structured=structured)
            for i in range(n):
                c.request(CMD_READ, 0, 4 * MiB, cookie=i)
            c.recv_exact(100)                                 # some of the first reply
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
    other = RawClient(server.sock).handshake()
    err, data, _ = other.call(CMD_READ, 8192, 4096)
    assert err == 0 and data == disk[1][8192:12288]
    other.disconnect()
    _settles(server, fds, threads)


def test_idle_client_is_dropped_by_the_handshake_timeout(server, disk):
    fds, threads = _baseline(server)
    idle = [socket.socket(socket.AF_UNIX) for _ in range(5)]
    for s in idle:
        s.connect(str(server.sock))
    # While they wait, real clients are served.
    assert _still_serves(server, disk[1])
    for s in idle:
        s.settimeout(60)
        assert s.recv(18)[:8] == b"NBDMAGIC"
        assert s.recv(100) == b"", "the idle client was not dropped"
        s.close()
    _settles(server, fds, threads)
    assert "Traceback" not in server.stderr()


def test_dripping_client_is_dropped_by_the_handshake_deadline(server, disk):
    """A slow drip does not reset the clock: a long option's data sent one byte every 0.3 s
    (every recv gets data well within the 2 s timeout; only the overall deadline ends it)."""
    fds, threads = _baseline(server)
    drip = RawClient(server.sock)
    drip.greeting()
    drip.client_flags()
    drip.send(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 60000))
    dropped = False
    for _ in range(200):                    # 60 s at most; the deadline is 2 s
        try:
            drip.send(b"\x00")
        except OSError:
            dropped = True                  # EPIPE / ECONNRESET: the server has closed
            break
        if drip.at_eof(timeout=0.3):
            dropped = True
            break
    assert dropped, "a client dripping bytes was never dropped"
    drip.close()
    _settles(server, fds, threads)
    assert _still_serves(server, disk[1])


def test_transmission_idle_is_not_a_handshake_timeout(server, disk):
    """Once in transmission a client may be quiet for as long as it likes."""
    c = RawClient(server.sock).handshake()
    assert not c.at_eof(timeout=4)                # twice the handshake timeout
    err, data, _ = c.call(CMD_READ, 0, 512)
    assert err == 0 and data == disk[1][:512]
    c.disconnect()


# ---------------------------------------------------------------- floods


def test_connection_flood_beyond_max_connections(disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--max-connections", "8") as srv:
        fds, threads = _baseline(srv)
        held = [RawClient(srv.sock).handshake() for _ in range(8)]
        refused = 0
        extra = []
        for _ in range(40):
            c = RawClient(srv.sock, timeout=30)
            try:
                c.greeting()
                extra.append(c)                 # should not happen: counted below
            except (Closed, ConnectionResetError):
                refused += 1
                c.close()
        assert refused == 40 and not extra, (refused, len(extra))
        # The eight admitted connections are all served, and in parallel.
        for i, c in enumerate(held):
            c.request(CMD_READ, i * 4096, 4096, cookie=i)
        for i, c in enumerate(held):
            cookie, err, data, _ = c.reply(4096)
            assert (cookie, err) == (i, 0) and data == backing[i * 4096:(i + 1) * 4096]
        # A place frees up: the next client gets in.
        held.pop().disconnect()
        wait_until(lambda: _try_connect(srv), timeout=30, what="a freed connection slot")
        for c in held:
            c.disconnect()
        _settles(srv, fds, threads)
        assert "Traceback" not in srv.stderr()


def _try_connect(srv):
    c = RawClient(srv.sock)
    try:
        c.handshake()
        c.disconnect()
        return True
    except (Closed, ConnectionResetError, BrokenPipeError):
        c.close()
        return False


def test_flood_of_parallel_connects(disk, tmp_path):
    """200 clients at once against --max-connections 32: every one either completes a READ
    or is refused cleanly (closed before the greeting); at least 32 get in over time."""
    path, backing = disk
    with run_server(tmp_path, path, "--max-connections", "32") as srv:
        fds, threads = _baseline(srv)
        results = []
        lock = threading.Lock()
        go = threading.Event()

        def client(k):
            go.wait()
            try:
                c = RawClient(srv.sock)
                try:
                    c.handshake()
                    err, data, _ = c.call(CMD_READ, k * 512, 512, cookie=k)
                    ok = err == 0 and data == backing[k * 512:(k + 1) * 512]
                    c.disconnect()
                    r = "served" if ok else "wrong"
                except (Closed, ConnectionResetError, BrokenPipeError):
                    r = "refused"
                finally:
                    c.close()
            except OSError as e:                      # connect() itself: backlog full
                r = f"connect {e.errno}"
            with lock:
                results.append(r)

        ts = [threading.Thread(target=client, args=(k,)) for k in range(200)]
        for t in ts:
            t.start()
        go.set()
        for t in ts:
            t.join()
        assert "wrong" not in results
        assert all(r in ("served", "refused") or r.startswith("connect") for r in results)
        assert results.count("served") >= 32, {r: results.count(r) for r in set(results)}
        _settles(srv, fds, threads)
        assert _still_serves(srv, backing)


# ---------------------------------------------------------------- edge values and flags


EDGE_OFFSETS = [0, SIZE - 1, SIZE, SIZE + 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
                2**64 - 4096]
EDGE_COUNTS = [0, 1, 4096, 2**31, 2**32 - 1]


def _expected(cmd, offset, count, flags=0):
    """The error the spec (and this server) gives, or 0."""
    if cmd in (CMD_FLUSH,):
        return 0 if offset == 0 and count == 0 else EINVAL
    if count == 0:
        return EINVAL
    if cmd in (CMD_READ, CMD_WRITE) and count > MAX_PAYLOAD:
        return EINVAL
    if offset > SIZE or count > SIZE - offset:
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    return 0


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_edge_offsets_and_counts_on_every_command(server, disk, structured):
    path, backing = disk
    c = RawClient(server.sock).handshake(structured=structured)
    cookie = 0
    for cmd in ALL_COMMANDS:
        if cmd == CMD_BLOCK_STATUS and not structured:
            continue
        for offset in EDGE_OFFSETS:
            for count in EDGE_COUNTS:
                cookie += 1
                payload = b""
                if cmd == CMD_WRITE:
                    if count > 65536:
                        continue                 # payload sizes for WRITE are tested below
                    payload = b"\xee" * count
                want = _expected(cmd, offset, count)
                c.request(cmd, offset, count, cookie=cookie, payload=payload)
                got_cookie, err, data, chunks = c.reply(count if cmd == CMD_READ else 0)
                assert got_cookie == cookie
                assert err == want, (cmd, offset, count, err, want)
    c.disconnect()
    assert server.alive()
    assert "Traceback" not in server.stderr()


def test_writes_near_the_length_limits(server, disk):
    """A WRITE over the advertised maximum is refused after its payload is skipped (the stream
    stays in step); one claiming ~4 GiB and then going away costs the server nothing."""
    c = RawClient(server.sock).handshake()
    c.request(CMD_WRITE, 0, MAX_PAYLOAD + 1, cookie=7, payload=bytes(MAX_PAYLOAD + 1))
    cookie, err, _, _ = c.reply()
    assert (cookie, err) == (7, EINVAL)
    err, data, _ = c.call(CMD_READ, 0, 16, cookie=8)
    assert err == 0 and data == disk[1][:16]
    c.disconnect()
    fds, threads = _baseline(server)
    for count in (2**32 - 1, 2**31):
        c = RawClient(server.sock).handshake()
        c.request(CMD_WRITE, 0, count, payload=b"x" * 100000)
        c.close()
    _settles(server, fds, threads)
    assert _still_serves(server, disk[1], 0)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_unknown_flags_and_commands(server, disk, structured):
    c = RawClient(server.sock).handshake(structured=structured)
    cookie = 0
    for cmd in ALL_COMMANDS:
        for bit in range(16):
            flag = 1 << bit
            known = {CMD_READ: 1 | 4, CMD_WRITE: 1, CMD_FLUSH: 1, CMD_TRIM: 1, CMD_CACHE: 1,
                     CMD_WRITE_ZEROES: 1 | 2 | 16, CMD_BLOCK_STATUS: 1 | 8}[cmd]
            if flag & known:
                continue
            cookie += 1
            offset, count = (0, 0) if cmd == CMD_FLUSH else (4096, 512)
            payload = b"u" * 512 if cmd == CMD_WRITE else b""
            c.request(cmd, offset, count, flags=flag, cookie=cookie, payload=payload)
            got, err, _, _ = c.reply()
            assert (got, err) == (cookie, EINVAL), (cmd, flag)
    for cmd in (8, 9, 12, 255, 0x7FFF, 0xFFFF):
        cookie += 1
        c.request(cmd, 0, 512, cookie=cookie)
        got, err, _, _ = c.reply()
        assert (got, err) == (cookie, EINVAL), cmd
    err, data, _ = c.call(CMD_READ, 4096, 512, cookie=cookie + 1)
    assert err == 0 and data == disk[1][4096:4608], "an unknown-flag WRITE reached the disk"
    c.disconnect()
    assert "Traceback" not in server.stderr()


def test_read_only_refuses_every_write_like_command(disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "-r") as srv:
        c = RawClient(srv.sock).handshake()
        assert c.eflags & 2                       # NBD_FLAG_READ_ONLY
        # (FUA is not advertised on a read-only export: WRITE+FUA is EINVAL, as in nbdkit.)
        for i, (cmd, flags) in enumerate([(CMD_WRITE, 0), (CMD_TRIM, 0), (CMD_WRITE_ZEROES, 0),
                                          (CMD_WRITE_ZEROES, 2)]):
            payload = b"r" * 4096 if cmd == CMD_WRITE else b""
            c.request(cmd, 0, 4096, flags=flags, cookie=i, payload=payload)
            got, err, _, _ = c.reply()
            assert (got, err) == (i, EPERM), (cmd, flags, err)
        err, data, _ = c.call(CMD_READ, 0, 4096, cookie=99)
        assert err == 0 and data == backing[:4096]
        c.disconnect()


# ---------------------------------------------------------------- files the server makes


def test_unix_socket_is_0600_and_overlay_is_private(disk, tmp_path):
    path, _ = disk
    overlay_dir = tmp_path / "ovl"
    overlay_dir.mkdir()
    with run_server(tmp_path, path, "--tmpdir", overlay_dir) as srv:
        assert stat.S_IMODE(os.stat(srv.sock).st_mode) == 0o600
        assert os.listdir(overlay_dir) == [], "the overlay has a name in its directory"
        overlays = []
        for fd in os.listdir(f"/proc/{srv.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{srv.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(overlay_dir)):
                overlays.append((target, os.stat(f"/proc/{srv.pid}/fd/{fd}")))
        assert len(overlays) == 1, overlays
        target, st = overlays[0]
        assert target.endswith("(deleted)"), target
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 0
        # The backing is open in the server, and only read-only (a check that finds no
        # descriptor of the backing would prove nothing: at least one must match).
        backing = os.path.realpath(path)
        modes = []
        for fd in os.listdir(f"/proc/{srv.pid}/fd"):
            try:
                if os.readlink(f"/proc/{srv.pid}/fd/{fd}") != backing:
                    continue
                with open(f"/proc/{srv.pid}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
            except FileNotFoundError:
                continue            # a descriptor closed meanwhile
            modes.append(flags & os.O_ACCMODE)
        assert modes, f"no descriptor of {backing} in the server"
        assert set(modes) == {os.O_RDONLY}, [oct(m) for m in modes]


@pytest.mark.parametrize("mode", ["0666", "0660"])
def test_socket_mode_option(disk, tmp_path, mode):
    with run_server(tmp_path, disk[0], "--socket-mode", mode) as srv:
        assert stat.S_IMODE(os.stat(srv.sock).st_mode) == int(mode, 8)
        assert _still_serves(srv, disk[1])
