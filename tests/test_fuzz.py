"""Fuzzing with hypothesis: the sans-IO protocol decoder (bytes only) and a live server fed
arbitrary byte streams.  Bounded budgets here (a few hundred examples each); a longer run is
``COW_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py``.

Properties:
* the decoder never raises on client input except the documented ProtocolError, never asks
  for more than a bounded number of bytes (no allocation driven by a client's length field),
  and everything it sends back is a well-formed option reply to the option asked;
* request validation answers 0 only for requests that are really in range and allowed, and
  otherwise one of the NBD errors the spec names;
* a live server given any byte stream answers with NBD replies or closes that connection,
  never hangs, never prints a traceback, keeps serving other clients, and gives back its
  file descriptors and memory.
"""

from __future__ import annotations

import os
import socket
import struct

import nbd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import write_sample
from cow import protocol as P
from support_reliability import (
    CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_FUA, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    IHAVEOPT, NBD_ERRORS, REQUEST_MAGIC, RawClient, fd_count, rss_kib, run_server, wait_until,
)

EXAMPLES = int(os.environ.get("COW_FUZZ_EXAMPLES", "300"))
SERVER_EXAMPLES = int(os.environ.get("COW_FUZZ_SERVER_EXAMPLES", str(max(EXAMPLES // 2, 150))))
SIZE = 1024 * 1024 + 512  # not a multiple of anything convenient

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
edgy64 = st.one_of(u64, st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 2**31, 2**32 - 1,
                                         2**32, 2**63, 2**64 - 1, 2**64 - SIZE]))
edgy32 = st.one_of(u32, st.sampled_from([0, 1, 511, 512, 4096, 2**25, 2**26, 2**26 + 1,
                                         2**31, 2**32 - 1]))


def _export(readonly=False):
    return P.Export(size=SIZE, name="fuzz", description="fuzz target", readonly=readonly)


def _parse_replies(data: bytes):
    """Option replies, parsed independently of cow.protocol."""
    out = []
    pos = 0
    while pos < len(data):
        assert pos + 20 <= len(data), "truncated option reply"
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == 0x0003E889045565A9, hex(magic)
        pos += 20
        assert pos + length <= len(data), "option reply runs past its data"
        out.append((opt, rtype, data[pos:pos + length]))
        pos += length
    return out


# ---- option streams -------------------------------------------------------------------------

known_options = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0xFFFFFFFF])


@st.composite
def option(draw):
    """One option: often well-formed, sometimes with a lying length or a bad magic."""
    opt = draw(st.one_of(known_options, u32))
    kind = draw(st.sampled_from(["info", "meta", "raw", "empty"]))
    if kind == "info":
        name = draw(st.sampled_from([b"", b"fuzz", b"nope", b"\0", b"\xff\xfe"]))
        reqs = draw(st.lists(u16, max_size=5))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(
            struct.pack(">H", r) for r in reqs)
    elif kind == "meta":
        name = draw(st.sampled_from([b"", b"fuzz", b"x"]))
        qs = draw(st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:",
                                            b"qemu:allocation-depth", b"", b"a" * 300]),
                           max_size=4))
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs)) + b"".join(
            struct.pack(">I", len(q)) + q for q in qs)
    elif kind == "raw":
        data = draw(st.binary(max_size=64))
    else:
        data = b""
    if draw(st.integers(0, 9)) == 0:       # corrupt a byte
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    length = len(data)
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.one_of(u32, st.sampled_from([len(data) + 1, 65536, 65537, 2**32 - 1])))
    magic = IHAVEOPT if draw(st.integers(0, 19)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack(">QII", magic, opt, length) + data


@st.composite
def handshake_stream(draw):
    flags = draw(st.one_of(st.sampled_from([1, 3]), u32))
    parts = [struct.pack(">I", flags)] + draw(st.lists(option(), max_size=8))
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=64)))
    return b"".join(parts)


def _drive(conn: P.ServerConnection, stream: bytes):
    """Feed a byte stream the way cow/server/handshake.py does; return the replies sent and the
    end state."""
    sent = [conn.greeting()]
    pos = 0
    steps = 0
    while conn.phase in (P.Phase.HANDSHAKE, P.Phase.OPTIONS):
        n = conn.next_read_size()
        assert 0 < n <= P.MAX_OPTION_LENGTH, f"asks for {n} bytes"
        if pos + n > len(stream):
            return sent, "eof"
        out = conn.receive(stream[pos:pos + n])
        pos += n
        steps += 1
        assert steps <= 2 * P.MAX_OPTIONS + 4
        assert isinstance(out, P.Output)
        sent.append(out.data)
        if out.action is P.Action.CLOSE:
            assert conn.phase is P.Phase.CLOSED
            return sent, "close"
        if out.action is P.Action.TRANSMISSION:
            assert conn.phase is P.Phase.TRANSMISSION
            return sent, "transmission"
        if out.action is P.Action.STARTTLS:
            return sent, "starttls"
        assert out.action is P.Action.CONTINUE
    return sent, conn.phase.value


@FUZZ
@given(handshake_stream(), st.booleans())
def test_handshake_decoder_on_any_option_stream(stream, readonly):
    conn = P.ServerConnection(_export(readonly))
    sent, end = _drive(conn, stream)
    greeting = sent[0]
    assert len(greeting) == 18
    for data in sent[1:]:
        if end == "transmission" and data is sent[-1] and not data.startswith(
                struct.pack(">Q", 0x0003E889045565A9)):
            # EXPORT_NAME: size, flags (and 124 zeroes without NO_ZEROES)
            assert len(data) in (10, 134)
            size, eflags = struct.unpack_from(">QH", data)
            assert size == SIZE and eflags & 1
            continue
        for opt, rtype, payload in _parse_replies(data):
            assert rtype in (1, 2, 3, 4) or rtype & (1 << 31), hex(rtype)
            assert len(payload) <= P.MAX_STRING + 64
    if end == "transmission":
        assert conn.transmission_flags & P.NBD_FLAG_HAS_FLAGS
        assert bool(conn.transmission_flags & P.NBD_FLAG_READ_ONLY) == readonly


@FUZZ
@given(st.binary(max_size=600))
def test_handshake_decoder_on_random_bytes(stream):
    conn = P.ServerConnection(_export())
    sent, end = _drive(conn, stream)
    for data in sent[1:]:
        if end == "transmission" and data is sent[-1]:
            continue
        _parse_replies(data)


@FUZZ
@given(st.lists(option(), min_size=1, max_size=6))
def test_every_option_gets_one_final_reply(options):
    """Under fixed newstyle each option but EXPORT_NAME gets replies ending in exactly one ACK
    or error, about that option; or the connection closes."""
    conn = P.ServerConnection(_export())
    conn.receive(struct.pack(">I", 3))
    for raw in options:
        magic, opt, length = struct.unpack_from(">QII", raw)
        out = conn.receive(raw[:16])
        if out.action is P.Action.CLOSE:
            assert (magic != IHAVEOPT or length > P.MAX_OPTION_SKIP
                    or (length > P.MAX_OPTION_LENGTH and opt == P.NBD_OPT_EXPORT_NAME)
                    or (length == 0 and opt in (P.NBD_OPT_EXPORT_NAME, P.NBD_OPT_ABORT))), \
                (hex(magic), opt, length)
            return
        data = raw[16:]
        if length > len(data):
            data = data + bytes(length - len(data))
        pos = 0
        while pos < length:  # in the pieces the server would read (long data: several)
            n = conn.next_read_size()
            assert 0 < n <= min(length - pos, P.MAX_OPTION_LENGTH)
            out = conn.receive(data[pos:pos + n])
            pos += n
            assert pos == length or (out.action is P.Action.CONTINUE and not out.data)
        if out.action is P.Action.CLOSE:
            assert opt in (P.NBD_OPT_EXPORT_NAME, P.NBD_OPT_ABORT), opt
            return
        if out.action is not P.Action.CONTINUE:
            return
        replies = _parse_replies(out.data)
        assert replies, f"option {opt} got no reply"
        assert all(o == opt for o, _, _ in replies)
        finals = [r for _, r, _ in replies if r == P.NBD_REP_ACK or r & P.NBD_REP_FLAG_ERROR]
        assert len(finals) == 1 and replies[-1][1] == finals[0]


@FUZZ
@given(handshake_stream())
def test_require_tls_gives_nothing_away_before_starttls(stream):
    """With TLS required, any option stream before STARTTLS gets only TLS_REQD (or an error
    for malformed input, or ABORT's ACK), never export data, never transmission; STARTTLS
    is the one way on."""
    conn = P.ServerConnection(_export(), tls="require")
    sent, end = _drive(conn, stream)
    assert end != "transmission"
    for data in sent[1:]:
        for opt, rtype, payload in _parse_replies(data):
            if rtype == P.NBD_REP_ACK:
                assert opt in (P.NBD_OPT_STARTTLS, P.NBD_OPT_ABORT), opt
            else:
                assert rtype & P.NBD_REP_FLAG_ERROR, (opt, hex(rtype))
    if end == "starttls":
        assert not conn.tls_active
        conn.tls_started()
        assert conn.tls_active and not conn.structured_replies and not conn.meta_contexts


# ---- requests -------------------------------------------------------------------------------

def _transmission(structured=True, contexts=True, readonly=False):
    conn = P.ServerConnection(_export(readonly))
    conn.receive(struct.pack(">I", 3))
    if structured:
        conn.receive(struct.pack(">QII", IHAVEOPT, P.NBD_OPT_STRUCTURED_REPLY, 0))
    if contexts and structured:
        q = b"base:allocation"
        data = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q
        conn.receive(struct.pack(">QII", IHAVEOPT, P.NBD_OPT_SET_META_CONTEXT, len(data)))
        conn.receive(data)
    data = struct.pack(">IH", 0, 0)
    conn.receive(struct.pack(">QII", IHAVEOPT, P.NBD_OPT_GO, len(data)))
    out = conn.receive(data)
    assert out.action is P.Action.TRANSMISSION
    return conn


@FUZZ
@given(st.binary(min_size=28, max_size=28))
def test_decode_request_any_header(header):
    conn = _transmission()
    try:
        flags, cmd, cookie, offset, count = conn.decode_request(header)
    except P.ProtocolError:
        assert struct.unpack(">I", header[:4])[0] != REQUEST_MAGIC
        assert conn.phase is P.Phase.CLOSED
        return
    assert struct.pack(">HHQQI", flags, cmd, cookie, offset, count) == header[4:]


@FUZZ
@given(u16, st.one_of(st.integers(0, 12), u16), edgy64, edgy32, st.booleans(), st.booleans(),
       st.booleans())
def test_check_request_is_sound(flags, cmd, offset, count, structured, contexts, readonly):
    conn = _transmission(structured, contexts, readonly)
    err = conn.check_request(cmd, flags, offset, count)
    assert err == 0 or err in NBD_ERRORS, err
    if err:
        return
    assert cmd in (0, 1, 2, 3, 4, 5, 6, 7), cmd
    assert flags & ~0x1F == 0
    if cmd in (P.NBD_CMD_FLUSH, P.NBD_CMD_DISC):
        assert offset == 0 and count == 0
        return
    assert 0 < count and offset + count <= SIZE
    if cmd in (CMD_READ, CMD_WRITE):
        assert count <= conn.max_payload
    if readonly:
        assert cmd not in (P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES)
    if cmd == CMD_BLOCK_STATUS:
        assert structured and contexts
    if flags & P.NBD_CMD_FLAG_DF:
        assert structured


@FUZZ
@given(st.lists(st.tuples(st.integers(-5, 2**40), st.integers(0, 3)), min_size=1, max_size=20),
       st.integers(1, 2**32 - 1), st.booleans(), u64)
def test_block_status_reply_never_overshoots(runs, count, req_one, cookie):
    conn = _transmission()
    assume(runs[0][0] > 0)
    data = conn.block_status_reply(cookie, count, req_one, [(1, runs)])
    magic, flags, rtype, got_cookie, length = struct.unpack_from(">IHHQI", data)
    assert (magic, rtype, got_cookie) == (0x668E33EF, 5, cookie) and flags & 1
    assert len(data) == 20 + length and (length - 4) % 8 == 0
    descs = [struct.unpack_from(">II", data, 24 + 8 * i) for i in range((length - 4) // 8)]
    assert descs and all(n > 0 for n, _ in descs)
    assert sum(n for n, _ in descs) <= count
    if req_one:
        assert len(descs) == 1


@FUZZ
@given(u64, st.sampled_from(sorted(NBD_ERRORS)), st.text(max_size=5000), st.booleans())
def test_error_reply_well_formed(cookie, error, message, structured):
    conn = _transmission(structured)
    data = conn.error_reply(cookie, P.NBD_CMD_READ, error, message)
    if not structured:
        assert data == struct.pack(">IIQ", 0x67446698, error, cookie)
        return
    magic, flags, rtype, got, length = struct.unpack_from(">IHHQI", data)
    assert (magic, flags & 1, rtype, got) == (0x668E33EF, 1, P.NBD_REPLY_TYPE_ERROR, cookie)
    err, msglen = struct.unpack_from(">IH", data, 20)
    assert err == error and length == 6 + msglen and len(data) == 20 + length
    assert msglen <= P.MAX_STRING


# ---- a live server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzsrv")
    path = write_sample(tmp / "disk.img", SIZE)
    with run_server(tmp, path, "--cow-block-size", "4K") as srv:
        yield srv, path.read_bytes()


def _valid_prefix(draw):
    """A handshake that reaches transmission (structured or not), as a real client sends it."""
    structured = draw(st.booleans())
    out = struct.pack(">I", 3)
    if structured:
        out += struct.pack(">QII", IHAVEOPT, 8, 0)
        q = draw(st.sampled_from([b"base:allocation", b"qemu:allocation-depth"]))
        data = RawClient.meta_data(b"", (q,))
        out += struct.pack(">QII", IHAVEOPT, 10, len(data)) + data
    data = RawClient.info_data()
    return out + struct.pack(">QII", IHAVEOPT, 7, len(data)) + data


@st.composite
def request_stream(draw):
    """Requests, arbitrary or (one in three) well-formed writes, zeroes and trims inside the
    disk, so that the data check below has writes to check."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 2)) == 0:
            cmd = draw(st.sampled_from([CMD_WRITE, CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM]))
            flags = draw(st.sampled_from([0, CMD_FLAG_FUA]))
            offset = draw(st.integers(0, SIZE - 1))
            count = draw(st.integers(1, min(8192, SIZE - offset)))
            magic = REQUEST_MAGIC
        else:
            cmd = draw(st.one_of(st.integers(0, 8), u16))
            flags = draw(st.one_of(st.integers(0, 31), u16))
            offset = draw(edgy64)
            count = draw(st.one_of(st.integers(0, 8192), edgy32))
            magic = REQUEST_MAGIC if draw(st.integers(0, 15)) else draw(u32)
        cookie = (draw(u64) & ~0xFF) | len(parts)      # arbitrary, and no two alike
        parts.append(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, count))
        if cmd == CMD_WRITE:
            # the payload, or only part of it (the stream then ends mid-payload)
            n = count if count <= 8192 else draw(st.integers(0, 8192))
            parts.append(draw(st.binary(min_size=min(n, 64), max_size=min(n, 64)))
                         + bytes(max(n - 64, 0)))
    return b"".join(parts)


@st.composite
def server_stream(draw):
    """(stream, where transmission starts in it, or None: a stream meant to stay in the
    handshake; its odds of reaching transmission and then holding a request magic are 2**-32
    or less)."""
    kind = draw(st.sampled_from(["random", "handshake", "requests", "requests", "garbage-after"]))
    if kind == "random":
        return draw(st.binary(max_size=512)), None
    if kind == "handshake":
        return draw(handshake_stream()), None
    prefix = _valid_prefix(draw)
    if kind == "requests":
        return prefix + draw(request_stream()), len(prefix)
    return prefix + draw(st.binary(max_size=512)), len(prefix)


def writes_in(stream: bytes, at):
    """What the requests of a stream (from `at`, where transmission starts) may write, framed
    as the server frames them: [(start, end, bytes or None for zeroes, sure)] clipped to the
    disk; sure: a WRITE that no server may refuse (flags 0 or FUA, 1 to 8192 bytes inside the
    disk).  The stream is cut where the server stops reading it: a bad magic, NBD_CMD_DISC, a
    WRITE whose payload does not all come (nothing of it may be written)."""
    out = []
    if at is None:
        return out
    pos = at
    while pos + 28 <= len(stream):
        magic, flags, cmd, cookie, offset, count = struct.unpack_from(">IHHQQI", stream, pos)
        pos += 28
        if magic != REQUEST_MAGIC or cmd == CMD_DISC:
            break
        payload = None
        if cmd == CMD_WRITE:
            if pos + count > len(stream):
                break
            payload = stream[pos:pos + count]
            pos += count
        if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM) and offset < SIZE:
            end = min(offset + count, SIZE)
            sure = (cmd == CMD_WRITE and flags in (0, CMD_FLAG_FUA) and 0 < count <= 8192
                    and offset + count <= SIZE)
            out.append((offset, end, payload[:end - offset] if payload is not None else None,
                        sure))
    return out


def check_disk(got: bytes, before: bytes, writes) -> None:
    """Every byte reads what it held before or what a request of the stream put there (a
    WRITE's payload; zeroes for WRITE_ZEROES and TRIM): nothing else, anywhere.  And a sure
    WRITE (see writes_in) that no other request of the stream overlaps (NBD orders nothing
    between requests in flight) reads back whole."""
    assert len(got) == len(before)
    for k, (start, end, data, sure) in enumerate(writes):
        if sure and not any(s < end and start < e for j, (s, e, _, _) in enumerate(writes)
                            if j != k):
            assert got[start:end] == data, \
                f"a WRITE no server may refuse ({end - start} bytes at {start}) did not land"
    if got == before:
        return
    step = 4096
    for c in range(0, len(got), step):
        if got[c:c + step] == before[c:c + step]:
            continue
        for i in range(c, min(c + step, len(got))):
            if got[i] == before[i]:
                continue
            assert any(start <= i < end and (0 if data is None else data[i - start]) == got[i]
                       for start, end, data, _ in writes), (
                f"byte {i} reads {got[i]:#x}, held {before[i]:#x}, and no request of the "
                f"stream wrote that there: {[(s, e, d is not None) for s, e, d, _ in writes]}")


def _exchange(path, stream: bytes) -> bytes:
    """Send a stream, close our sending side, read until the server closes (or 30 s pass)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    got = bytearray()
    try:
        try:
            s.sendall(stream)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already closed on us: allowed
        while True:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    return bytes(got)


def test_live_server_survives_arbitrary_streams(live_server):
    """... and the disk's data stays whole: after each stream, every byte reads what it held
    before or what one of the stream's requests wrote there (read through a client connected
    all along); that is then the baseline for the next stream."""
    srv, backing = live_server
    # Warm up (first connections allocate lasting things: threads' stacks, buffers).
    for _ in range(3):
        _exchange(srv.sock, b"")
    reader = nbd.NBD()
    reader.connect_uri(srv.uri)
    disk = {"now": reader.pread(SIZE, 0)}
    assert disk["now"] == backing
    fds_before = fd_count(srv.pid)
    rss_before = rss_kib(srv.pid)
    seen = {"examples": 0, "changed": 0}

    @settings(max_examples=SERVER_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(server_stream())
    def one(case):
        stream, at = case
        seen["examples"] += 1
        reply = _exchange(srv.sock, stream)  # a hang would raise socket.timeout here
        assert reply.startswith(struct.pack(">QQ", 0x4E42444D41474943, IHAVEOPT))
        assert srv.alive(), srv.stderr()
        got = reader.pread(SIZE, 0)     # the server has closed that connection: all done
        before, disk["now"] = disk["now"], got      # (the next example starts from here)
        seen["changed"] += got != before
        check_disk(got, before, writes_in(stream, at))

    one()
    print(f"live fuzz: {seen['examples']} streams, {seen['changed']} changed the disk; "
          f"fds {fds_before} -> {fd_count(srv.pid)}; RSS {rss_before} -> {rss_kib(srv.pid)} KiB")
    reader.shutdown()
    assert seen["examples"] >= min(SERVER_EXAMPLES, 50)
    assert seen["changed"], "no stream changed the disk: the data check checked nothing"
    # Everything given back once the connections are gone.
    wait_until(lambda: fd_count(srv.pid) <= fds_before, what="server fds back to the baseline")
    assert rss_kib(srv.pid) - rss_before < 64 * 1024, (rss_before, rss_kib(srv.pid))
    assert "Traceback" not in srv.stderr(), srv.stderr()
    # And it still serves a real client (the fuzzer may have written anywhere: write first).
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    assert h.get_size() == SIZE
    h.pwrite(b"still here" * 100, 4000)
    assert h.pread(1000, 4000) == b"still here" * 100
    h.shutdown()
