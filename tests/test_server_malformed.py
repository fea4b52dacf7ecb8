"""Malformed input over raw sockets: a client that breaks the framing loses only its own
connection; the server, and every other connection, go on; no partial write lands."""

import socket
import struct
import threading

import nbd
import pytest

from cow import protocol as P
from support_reliability import run_tcp_server
from support_server import RawClient, start_server

SIZE = 4 * 1024 * 1024


@pytest.fixture
def disk(backing_factory):
    return backing_factory(SIZE)


@pytest.fixture
def served(disk, tmp_path):
    """(socket path, a healthy libnbd handle opened before the misbehaviour, backing path)."""
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        h = nbd.NBD()
        h.connect_uri(uri)
        yield proc.sock_path, h, disk, proc
        # The healthy connection still works after whatever the test did.
        assert len(h.pread(4096, 0)) == 4096
        h.shutdown()


def backing_bytes(path, offset, count):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


# ---- handshake ---------------------------------------------------------------------------------

def test_garbage_instead_of_client_flags(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting(client_flags=None)
        c.send(b"\xde\xad\xbe\xef")  # unknown client flag bits
        assert c.is_closed()


def test_garbage_instead_of_an_option(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting()
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.is_closed()


def test_absurd_option_length_closes_at_once(served):
    sock, h, _, proc = served
    before = vm_hwm_kib(proc.pid)
    with RawClient(sock) as c:
        c.greeting()
        c.send(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, 0xFFFFFFF0))
        assert c.is_closed()
    assert vm_hwm_kib(proc.pid) - before < 32 * 1024


def test_long_unknown_option_is_skipped_and_answered(served):
    """An unknown option with 1 MiB of data gets NBD_REP_ERR_UNSUP, a GO with 100 KiB
    NBD_REP_ERR_TOO_BIG, and one with data up to the 64 MiB cap is skipped without holding
    it; then the haggling goes on to transmission."""
    sock, h, disk, proc = served
    before = vm_hwm_kib(proc.pid)
    with RawClient(sock, timeout=60) as c:
        c.greeting()
        assert c.option(99, b"\x01" * (1 << 20)) == [
            (P.NBD_REP_ERR_UNSUP, b"option 99 not supported")]
        [(rtype, _)] = c.option(P.NBD_OPT_GO, bytes(100 * 1024))
        assert rtype == P.NBD_REP_ERR_TOO_BIG
        assert c.option(1000, bytes(P.MAX_OPTION_SKIP))[0][0] == P.NBD_REP_ERR_UNSUP
        assert c.option(P.NBD_OPT_GO, P.pack_info_go_data(""))[-1][0] == P.NBD_REP_ACK
        c.request(P.NBD_CMD_READ, 0, 16, cookie=1)
        assert c.reply(16) == (1, 0, backing_bytes(disk, 0, 16))
    assert vm_hwm_kib(proc.pid) - before < 32 * 1024


def test_option_data_over_the_cap_hangs_up_at_once(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting()
        c.send(struct.pack(">QII", P.IHAVEOPT, 99, P.MAX_OPTION_SKIP + 1))
        assert c.is_closed()


def test_client_vanishes_mid_handshake_and_mid_option(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting(client_flags=None)
        c.send(b"\0\0")  # half of the client flags
    with RawClient(sock) as c:
        c.greeting()
        c.send(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, 100) + b"only part")


def test_unknown_and_malformed_options_are_answered_and_haggling_goes_on(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting()
        assert c.option(77, b"whatever") == [(P.NBD_REP_ERR_UNSUP, b"option 77 not supported")]
        assert c.option(P.NBD_OPT_EXTENDED_HEADERS)[0][0] == P.NBD_REP_ERR_UNSUP
        assert c.option(P.NBD_OPT_STARTTLS)[0][0] == P.NBD_REP_ERR_POLICY
        assert c.option(P.NBD_OPT_GO, b"\0\0\0\x09abc")[0][0] == P.NBD_REP_ERR_INVALID
        assert c.option(P.NBD_OPT_LIST, b"x")[0][0] == P.NBD_REP_ERR_INVALID
        assert c.option(P.NBD_OPT_INFO, P.pack_info_go_data("nope"))[0][0] == P.NBD_REP_ERR_UNKNOWN
        replies = c.option(P.NBD_OPT_GO, P.pack_info_go_data(""))
        assert replies[-1][0] == P.NBD_REP_ACK
        c.request(P.NBD_CMD_READ, 0, 16, cookie=5)
        assert c.reply(16)[:2] == (5, 0)



def test_failed_set_meta_context_leaves_no_context_selected(served):
    """A good SET_META_CONTEXT, then one on an unknown export: the failure clears the selection
    (the spec: "including when this command fails"), so BLOCK_STATUS is refused."""
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting()
        assert c.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
        c.structured = True
        replies = c.option(P.NBD_OPT_SET_META_CONTEXT,
                           P.pack_meta_context_data("", ("base:allocation",)))
        assert [t for t, _ in replies] == [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]
        replies = c.option(P.NBD_OPT_SET_META_CONTEXT,
                           P.pack_meta_context_data("nope", ("base:allocation",)))
        assert [t for t, _ in replies] == [P.NBD_REP_ERR_UNKNOWN]
        assert c.option(P.NBD_OPT_GO, P.pack_info_go_data(""))[-1][0] == P.NBD_REP_ACK
        c.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096, cookie=1)
        assert c.reply()[:2] == (1, P.NBD_EINVAL)
        c.request(P.NBD_CMD_READ, 0, 16, cookie=2)
        assert c.reply(16)[:2] == (2, 0)


def test_error_message_echoing_a_long_name_is_whole_utf8(served):
    """INFO on an unknown export whose name is 4095 bytes of 3-byte characters (after one
    ASCII byte): the error message echoes it, cut to 4096 bytes where a character ends."""
    sock, h, _, _ = served
    name = "x" + "€" * 1365
    with RawClient(sock) as c:
        c.greeting()
        [(rtype, message)] = c.option(P.NBD_OPT_INFO, P.pack_info_go_data(name))
        assert rtype == P.NBD_REP_ERR_UNKNOWN
        assert P.MAX_STRING - 3 < len(message) <= P.MAX_STRING
        assert "unknown export" in message.decode("utf-8")

def test_abort(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.greeting()
        assert c.option(P.NBD_OPT_ABORT) == [(P.NBD_REP_ACK, b"")]
        assert c.is_closed()


def test_export_name_old_style(served):
    sock, h, disk, _ = served
    with RawClient(sock) as c:
        c.greeting(client_flags=P.NBD_FLAG_C_FIXED_NEWSTYLE)
        c.send(P.pack_option(P.NBD_OPT_EXPORT_NAME, b""))
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert size == SIZE and flags & P.NBD_FLAG_HAS_FLAGS
        assert c.recv_exact(124) == bytes(124)
        c.request(P.NBD_CMD_READ, 100, 50, cookie=1)
        assert c.reply(50) == (1, 0, backing_bytes(disk, 100, 50))
        c.request(P.NBD_CMD_DISC)
        assert c.is_closed()
    with RawClient(sock) as c:
        c.greeting()
        c.send(P.pack_option(P.NBD_OPT_EXPORT_NAME, b"no such export"))
        assert c.is_closed()


# ---- transmission ------------------------------------------------------------------------------

def test_bad_request_magic_closes_only_that_connection(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.negotiate()
        c.send(P.pack_request(P.NBD_CMD_READ, 0, 512, magic=0x12345678))
        assert c.is_closed()


def _end_inside_the_payload(c):
    """End the stream where it is (inside a WRITE payload) and wait until the server has closed
    the connection: only then has it finished with that WRITE.  No reply comes for it."""
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_to_eof() == b"", "a reply to a WRITE whose payload never came"


def test_truncated_write_payload_writes_nothing(served):
    sock, h, disk, _ = served
    with RawClient(sock) as c:
        c.negotiate()
        c.request(P.NBD_CMD_WRITE, 65536, 8192, cookie=1, payload=b"\xee" * 8000)
        _end_inside_the_payload(c)
    # The connection is gone; nothing of the 8000 bytes reached the overlay.
    assert h.pread(8192, 65536) == backing_bytes(disk, 65536, 8192)


def test_truncated_large_write_payload_writes_nothing(served):
    sock, h, disk, _ = served
    with RawClient(sock) as c:
        c.negotiate()
        c.request(P.NBD_CMD_WRITE, 0, 2 << 20, cookie=1, payload=b"\xee" * (1 << 20))
        _end_inside_the_payload(c)
    assert h.pread(2 << 20, 0) == backing_bytes(disk, 0, 2 << 20)


def test_eof_without_disc(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.negotiate()
        c.request(P.NBD_CMD_READ, 0, 512, cookie=1)
        assert c.reply(512)[1] == 0
    with RawClient(sock) as c:
        c.negotiate()
        c.send(P.pack_request(P.NBD_CMD_READ, 0, 512)[:10])  # half a header


@pytest.mark.parametrize("structured", [False, True])
def test_oversize_write_is_refused_without_allocating_and_the_connection_goes_on(served,
                                                                                 structured):
    sock, h, disk, proc = served
    count = 64 * 1024 * 1024 + 4096
    before = vm_hwm_kib(proc.pid)
    with RawClient(sock, timeout=60) as c:
        c.negotiate(structured=structured)
        c.request(P.NBD_CMD_WRITE, 0, count, cookie=7)
        chunk = b"\x77" * (1 << 20)
        sent = 0
        while sent < count:
            n = min(len(chunk), count - sent)
            c.send(chunk[:n])
            sent += n
        assert c.reply()[:2] == (7, P.NBD_EINVAL)
        c.request(P.NBD_CMD_READ, 0, 4096, cookie=8)
        assert c.reply(4096) == (8, 0, backing_bytes(disk, 0, 4096))
    assert vm_hwm_kib(proc.pid) - before < 32 * 1024
    assert h.pread(4096, 0) == backing_bytes(disk, 0, 4096)


@pytest.mark.parametrize("structured", [False, True])
def test_oversize_read_is_refused(served, structured):
    sock, h, _, proc = served
    before = vm_hwm_kib(proc.pid)
    with RawClient(sock) as c:
        c.negotiate(structured=structured)
        c.request(P.NBD_CMD_READ, 0, 0xFFFFFFFF, cookie=3)
        assert c.reply() == (3, P.NBD_EINVAL, b"")
        c.request(P.NBD_CMD_READ, 0, 100, cookie=4)
        assert c.reply(100)[:2] == (4, 0)
    assert vm_hwm_kib(proc.pid) - before < 32 * 1024


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("cmd, flags, offset, count, error", [
    (42, 0, 0, 512, P.NBD_EINVAL),                                   # unknown command
    (P.NBD_CMD_RESIZE, 0, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_READ, 1 << 12, 0, 512, P.NBD_EINVAL),                 # unknown flag
    (P.NBD_CMD_TRIM, P.NBD_CMD_FLAG_DF, 0, 512, P.NBD_EINVAL),       # flag not for TRIM
    (P.NBD_CMD_READ, 0, 0, 0, P.NBD_EINVAL),                         # zero length
    (P.NBD_CMD_READ, 0, 2**64 - 512, 1024, P.NBD_EINVAL),            # offset + count wraps
    (P.NBD_CMD_WRITE_ZEROES, 0, 2**64 - 512, 1024, P.NBD_ENOSPC),
    (P.NBD_CMD_CACHE, 0, SIZE, 1, P.NBD_EINVAL),
    (P.NBD_CMD_FLUSH, 0, 4096, 0, P.NBD_EINVAL),
])
def test_bad_requests_get_errors_and_the_stream_stays_in_step(served, structured, cmd, flags,
                                                               offset, count, error):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.negotiate(structured=structured)
        c.request(cmd, offset, count, flags=flags, cookie=11)
        assert c.reply() == (11, error, b"")
        c.request(P.NBD_CMD_READ, 0, 100, cookie=12)
        assert c.reply(100)[:2] == (12, 0)


def test_write_with_bad_flags_consumes_its_payload(served):
    sock, h, disk, _ = served
    with RawClient(sock) as c:
        c.negotiate()
        c.request(P.NBD_CMD_WRITE, 0, 4096, flags=P.NBD_CMD_FLAG_REQ_ONE, cookie=1,
                  payload=b"\x99" * 4096)
        assert c.reply()[:2] == (1, P.NBD_EINVAL)
        c.request(P.NBD_CMD_WRITE, SIZE, 4096, cookie=2, payload=b"\x99" * 4096)
        assert c.reply()[:2] == (2, P.NBD_ENOSPC)
        c.request(P.NBD_CMD_READ, 0, 4096, cookie=3)
        assert c.reply(4096) == (3, 0, backing_bytes(disk, 0, 4096))


def test_structured_read_error_uses_an_error_chunk(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.negotiate(structured=True)
        c.request(P.NBD_CMD_READ, SIZE, 512, cookie=9)
        (magic,) = struct.unpack(">I", c.recv_exact(4))
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
        flags, rtype, cookie, length = struct.unpack(">HHQI", c.recv_exact(16))
        assert (flags, rtype, cookie) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 9)
        error, msg_len = struct.unpack(">IH", c.recv_exact(6))
        assert error == P.NBD_EINVAL and length == 6 + msg_len
        c.recv_exact(msg_len)


def test_block_status_raw(served):
    sock, h, _, _ = served
    with RawClient(sock) as c:
        c.negotiate(structured=True, contexts=("base:allocation",))
        c.request(P.NBD_CMD_BLOCK_STATUS, 0, 65536 * 3, cookie=4)
        cookie, error, data = c.reply()
        assert (cookie, error) == (4, 0)
        (cid,) = struct.unpack_from(">I", data)
        assert cid == P.META_CONTEXT_IDS["base:allocation"]
        runs = [struct.unpack_from(">II", data, 4 + 8 * i) for i in range((len(data) - 4) // 8)]
        assert sum(n for n, _ in runs) == 65536 * 3


def test_replies_are_not_held_back_while_the_server_waits_for_input(served):
    """Inline replies are batched only while more requests are already buffered: a READ
    answered before the rest of a WRITE payload arrives is not stuck behind it."""
    sock, h, disk, _ = served
    with RawClient(sock) as c:
        c.negotiate(structured=False)
        c.send(P.pack_request(P.NBD_CMD_READ, 0, 512, cookie=1)
               + P.pack_request(P.NBD_CMD_WRITE, 8192, 4096, cookie=2) + b"\x5a" * 1000)
        assert c.reply(512) == (1, 0, backing_bytes(disk, 0, 512))  # before the payload ends
        c.send(b"\x5a" * 3096)
        assert c.reply() == (2, 0, b"")
        c.request(P.NBD_CMD_READ, 8192, 4096, cookie=3)
        assert c.reply(4096) == (3, 0, b"\x5a" * 4096)



def reply_to_any(c, read_counts):
    """One reply whose cookie is not known in advance: (cookie, error, data).  read_counts maps
    the cookie of each READ to its length (a simple reply does not say how much data follows)."""
    if c.structured:
        return c.reply()
    magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
    assert magic == P.NBD_SIMPLE_REPLY_MAGIC, hex(magic)
    n = read_counts.get(cookie, 0)
    return cookie, error, c.recv_exact(n) if n and not error else b""


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("large", [False, True], ids=["inline", "workers"])
def test_requests_before_a_bad_magic_are_all_answered(served, structured, large):
    """WRITE, READ and FLUSH, then a request with a bad magic, in one burst: the server executes
    the three and sends their replies (inline ones and workers' alike) before it hangs up."""
    sock, h, disk, _ = served
    n = 512 * 1024 if large else 4096  # a large WRITE goes to the connection's workers
    with RawClient(sock) as c:
        c.negotiate(structured=structured)
        c.send(P.pack_request(P.NBD_CMD_WRITE, 65536, n, cookie=1) + b"\x6b" * n
               + P.pack_request(P.NBD_CMD_READ, 0, 512, cookie=2)
               + P.pack_request(P.NBD_CMD_FLUSH, cookie=3)
               + P.pack_request(P.NBD_CMD_READ, 0, 512, cookie=4, magic=0x12345678))
        got = {}
        for _ in range(3):
            cookie, error, data = reply_to_any(c, {2: 512})
            got[cookie] = (error, data)
        assert got == {1: (0, b""), 2: (0, backing_bytes(disk, 0, 512)), 3: (0, b"")}
        assert c.is_closed()
    assert h.pread(n, 65536) == b"\x6b" * n


def test_large_reply_before_a_bad_magic_arrives_whole_over_tcp(disk, tmp_path):
    """Over TCP a reply can still sit in the server's send buffer when it hangs up, and closing
    a socket with input not yet read makes the kernel send a reset, which throws that data
    away.  A 4 MiB READ, a bad magic, then more bytes: the READ's reply must arrive whole,
    then the end of the stream."""
    with run_tcp_server(tmp_path, disk) as (srv, port):
        with RawClient(("127.0.0.1", port)) as c:
            c.negotiate(structured=False)
            burst = (P.pack_request(P.NBD_CMD_READ, 0, SIZE, cookie=1)
                     + P.pack_request(P.NBD_CMD_FLUSH, cookie=2, magic=0x12345678)
                     + b"junk after the bad request" * 40000)

            def send():
                try:
                    c.send(burst)
                except OSError:
                    pass  # the server hung up before taking it all: allowed

            sender = threading.Thread(target=send)
            sender.start()
            try:
                cookie, error, data = reply_to_any(c, {1: SIZE})
                assert (cookie, error) == (1, 0) and data == backing_bytes(disk, 0, SIZE)
                assert c.is_closed()
            finally:
                sender.join(30)
