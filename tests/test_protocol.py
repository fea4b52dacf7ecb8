"""cow.protocol with bytes alone: handshake, options, request validation, reply encoding."""

import struct

import pytest

from cow import protocol as P
from cow.protocol import Action, Export, Phase, ServerConnection

SIZE = 1 << 20


def connect(export=None, client_flags=P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
    conn = ServerConnection(export or Export(size=SIZE, name="disk", description="a disk"))
    assert conn.phase is Phase.HANDSHAKE
    out = conn.receive(struct.pack(">I", client_flags))
    assert out.action is Action.CONTINUE and out.data == b""
    return conn


def send_option(conn, option, data=b"", *, length=None, magic=P.IHAVEOPT):
    """Feed one option the way a server loop would: header, then its data if any."""
    raw = P.pack_option(option, data, magic=magic, length=length)
    header, rest = raw[:16], raw[16:]
    assert conn.next_read_size() == 16
    out = conn.receive(header)
    if out.action is not Action.CONTINUE or not rest:
        return out
    assert conn.next_read_size() == len(rest)
    return conn.receive(rest)


def replies(out):
    return P.parse_option_replies(out.data)


def go(conn, name="", requests=()):
    return send_option(conn, P.NBD_OPT_GO, P.pack_info_go_data(name, requests))


# ---- handshake ---------------------------------------------------------------------------------

def test_greeting_is_fixed_newstyle_with_no_zeroes():
    conn = ServerConnection(Export(size=SIZE))
    magic, opt, flags = struct.unpack(">QQH", conn.greeting())
    assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054
    assert flags == P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES
    assert conn.next_read_size() == 4


def test_unknown_client_flag_closes():
    conn = ServerConnection(Export(size=SIZE))
    out = conn.receive(struct.pack(">I", 1 << 5 | 1))
    assert out.action is Action.CLOSE and conn.phase is Phase.CLOSED


def test_receive_insists_on_exact_sizes():
    conn = ServerConnection(Export(size=SIZE))
    with pytest.raises(ValueError):
        conn.receive(b"\0\0\0")


def test_bad_option_magic_closes():
    conn = connect()
    out = send_option(conn, P.NBD_OPT_GO, magic=0x1234)
    assert out.action is Action.CLOSE and conn.phase is Phase.CLOSED


def feed_long_option(conn, option, length):
    """An option with ``length`` bytes of data, fed the way the server loop does: the header,
    then next_read_size() bytes at a time.  Returns the last Output and the largest piece."""
    out = conn.receive(struct.pack(">QII", P.IHAVEOPT, option, length))
    largest = 0
    while out.action is Action.CONTINUE and not out.data and length:
        n = conn.next_read_size()
        assert 0 < n <= length
        largest = max(largest, n)
        out = conn.receive(bytes(n))
        length -= n
    return out, largest


@pytest.mark.parametrize("option, reply_type", [
    (12345, P.NBD_REP_ERR_UNSUP),                 # unknown: not supported, as ever
    (P.NBD_OPT_EXTENDED_HEADERS, P.NBD_REP_ERR_UNSUP),
    (P.NBD_OPT_GO, P.NBD_REP_ERR_TOO_BIG),        # known, but no valid GO is that long
    (P.NBD_OPT_LIST_META_CONTEXT, P.NBD_REP_ERR_TOO_BIG),
])
def test_long_option_data_is_skipped_then_answered(option, reply_type):
    """Option data over MAX_OPTION_LENGTH is dropped in pieces (never held whole), then the
    option is answered, as nbdkit does, and haggling goes on."""
    conn = connect()
    out, largest = feed_long_option(conn, option, 3 * P.MAX_OPTION_LENGTH + 5)
    assert largest <= P.MAX_OPTION_LENGTH
    [r] = replies(out)
    assert (r.option, r.reply_type, out.action) == (option, reply_type, Action.CONTINUE)
    assert go(conn, "disk").action is Action.TRANSMISSION


def test_long_option_data_up_to_the_cap_then_hang_up():
    conn = connect()
    out, _ = feed_long_option(conn, 99, P.MAX_OPTION_SKIP)
    assert replies(out)[0].reply_type == P.NBD_REP_ERR_UNSUP
    out = conn.receive(struct.pack(">QII", P.IHAVEOPT, 99, P.MAX_OPTION_SKIP + 1))
    assert out.action is Action.CLOSE and "too long" in out.reason


def test_long_export_name_closes_at_once():
    """EXPORT_NAME cannot be refused, and no name is that long: the connection closes without
    reading the data."""
    conn = connect()
    out = conn.receive(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME,
                                   P.MAX_OPTION_LENGTH + 1))
    assert out.action is Action.CLOSE


def test_absurd_option_length_closes_before_reading_it():
    conn = connect()
    out = conn.receive(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, 0xFFFFFFFF))
    assert out.action is Action.CLOSE and "too long" in out.reason
    assert conn.next_read_size() == 0


def test_too_many_options_close():
    conn = ServerConnection(Export(size=SIZE), max_options=3)
    conn.receive(struct.pack(">I", 1))
    for _ in range(3):
        assert send_option(conn, 999).action is Action.CONTINUE
    assert send_option(conn, 999).action is Action.CLOSE


def test_export_name_enters_transmission_without_zeroes():
    conn = connect()
    out = send_option(conn, P.NBD_OPT_EXPORT_NAME, b"disk")
    assert out.action is Action.TRANSMISSION and conn.phase is Phase.TRANSMISSION
    size, flags = struct.unpack(">QH", out.data)
    assert size == SIZE and len(out.data) == 10
    assert flags & P.NBD_FLAG_HAS_FLAGS and not flags & P.NBD_FLAG_SEND_DF


def test_export_name_with_zeroes_when_client_did_not_ask_otherwise():
    conn = connect(client_flags=P.NBD_FLAG_C_FIXED_NEWSTYLE)
    out = send_option(conn, P.NBD_OPT_EXPORT_NAME, b"")
    assert out.action is Action.TRANSMISSION and len(out.data) == 10 + 124
    assert out.data[10:] == bytes(124)


def test_export_name_unknown_closes():
    conn = connect()
    out = send_option(conn, P.NBD_OPT_EXPORT_NAME, b"other")
    assert out.action is Action.CLOSE and out.data == b""


def test_plain_newstyle_client_gets_only_export_name():
    conn = connect(client_flags=0)
    assert send_option(conn, P.NBD_OPT_LIST).action is Action.CLOSE


def test_abort_acks_and_closes():
    conn = connect()
    out = send_option(conn, P.NBD_OPT_ABORT)
    assert out.action is Action.CLOSE
    [r] = replies(out)
    assert (r.option, r.reply_type) == (P.NBD_OPT_ABORT, P.NBD_REP_ACK)


@pytest.mark.parametrize("option", [P.NBD_OPT_EXTENDED_HEADERS, P.NBD_OPT_PEEK_EXPORT, 12345])
def test_unsupported_options_get_err_unsup_and_haggling_goes_on(option):
    conn = connect()
    out = send_option(conn, option, b"xyz")
    assert out.action is Action.CONTINUE
    [r] = replies(out)
    assert r.option == option and r.reply_type == P.NBD_REP_ERR_UNSUP
    assert go(conn).action is Action.TRANSMISSION


def test_starttls_refused_with_policy():
    conn = connect()
    [r] = replies(send_option(conn, P.NBD_OPT_STARTTLS))
    assert r.reply_type == P.NBD_REP_ERR_POLICY
    [r] = replies(send_option(conn, P.NBD_OPT_STARTTLS, b"x"))
    assert r.reply_type == P.NBD_REP_ERR_INVALID


def test_list():
    conn = connect()
    server, ack = replies(send_option(conn, P.NBD_OPT_LIST))
    assert server.reply_type == P.NBD_REP_SERVER and ack.reply_type == P.NBD_REP_ACK
    (n,) = struct.unpack_from(">I", server.data)
    assert server.data[4:4 + n] == b"disk" and server.data[4 + n:] == b"a disk"
    [r] = replies(send_option(conn, P.NBD_OPT_LIST, b"junk"))
    assert r.reply_type == P.NBD_REP_ERR_INVALID


def test_structured_reply_option():
    conn = connect()
    [r] = replies(send_option(conn, P.NBD_OPT_STRUCTURED_REPLY))
    assert r.reply_type == P.NBD_REP_ACK and conn.structured_replies
    [r] = replies(send_option(conn, P.NBD_OPT_STRUCTURED_REPLY, b"x"))
    assert r.reply_type == P.NBD_REP_ERR_INVALID


def info_by_type(reps):
    out = {}
    for r in reps:
        if r.reply_type == P.NBD_REP_INFO:
            (t,) = struct.unpack_from(">H", r.data)
            out[t] = r.data[2:]
    return out


def test_info_then_go_with_block_size_name_description():
    export = Export(size=SIZE, name="disk", description="a disk", preferred_block_size=65536)
    conn = connect(export)
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    out = send_option(conn, P.NBD_OPT_INFO, P.pack_info_go_data(
        "disk", (P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE)))
    assert out.action is Action.CONTINUE and conn.phase is Phase.OPTIONS
    reps = replies(out)
    assert reps[-1].reply_type == P.NBD_REP_ACK
    info = info_by_type(reps)
    size, flags = struct.unpack(">QH", info[P.NBD_INFO_EXPORT])
    assert size == SIZE
    want = (P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA
            | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO
            | P.NBD_FLAG_SEND_DF | P.NBD_FLAG_SEND_CACHE | P.NBD_FLAG_CAN_MULTI_CONN)
    assert flags == want
    assert info[P.NBD_INFO_NAME] == b"disk"
    assert info[P.NBD_INFO_DESCRIPTION] == b"a disk"
    assert struct.unpack(">III", info[P.NBD_INFO_BLOCK_SIZE]) == (1, 65536, 64 * 1024 * 1024)
    out = go(conn, "disk")
    assert out.action is Action.TRANSMISSION and conn.transmission_flags == want


def test_go_read_only_flags():
    conn = connect(Export(size=SIZE, readonly=True))
    out = go(conn)
    info = info_by_type(replies(out))
    _, flags = struct.unpack(">QH", info[P.NBD_INFO_EXPORT])
    assert flags & P.NBD_FLAG_READ_ONLY
    assert not flags & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FUA)


def test_go_unknown_export_is_err_unknown_and_haggling_goes_on():
    conn = connect()
    [r] = replies(go(conn, "nope"))
    assert r.reply_type == P.NBD_REP_ERR_UNKNOWN
    assert go(conn, "disk").action is Action.TRANSMISSION


@pytest.mark.parametrize("data", [
    b"",                                           # no name length
    struct.pack(">I", 10) + b"abc",                # name runs past the end
    struct.pack(">I", 0),                          # no request count
    struct.pack(">IH", 0, 2) + struct.pack(">H", 3),  # fewer requests than counted
    struct.pack(">IH", 0, 0) + b"extra",           # trailing bytes
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0),  # name over 4096 bytes
])
def test_malformed_go_is_err_invalid(data):
    conn = connect()
    out = send_option(conn, P.NBD_OPT_GO, data)
    [r] = replies(out)
    assert r.reply_type == P.NBD_REP_ERR_INVALID and out.action is Action.CONTINUE
    assert conn.phase is Phase.OPTIONS


def meta(conn, option, queries, name="disk"):
    return replies(send_option(conn, option, P.pack_meta_context_data(name, queries)))


def test_meta_context_needs_structured_replies():
    conn = connect()
    [r] = meta(conn, P.NBD_OPT_SET_META_CONTEXT, ("base:allocation",))
    assert r.reply_type == P.NBD_REP_ERR_INVALID
    [r] = meta(conn, P.NBD_OPT_LIST_META_CONTEXT, ())
    assert r.reply_type == P.NBD_REP_ERR_INVALID


def test_list_meta_context_queries():
    conn = connect()
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)

    def names(queries):
        reps = meta(conn, P.NBD_OPT_LIST_META_CONTEXT, queries)
        assert reps[-1].reply_type == P.NBD_REP_ACK
        return [r.data[4:].decode() for r in reps[:-1]]

    assert names(()) == ["base:allocation", "qemu:allocation-depth"]
    assert names(("base:",)) == ["base:allocation"]
    assert names(("qemu:",)) == ["qemu:allocation-depth"]
    assert names(("qemu:allocation-depth",)) == ["qemu:allocation-depth"]
    assert names(("qemu:dirty-bitmap:x", "nope:")) == []


def test_set_meta_context_selects_and_replaces():
    conn = connect()
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    reps = meta(conn, P.NBD_OPT_SET_META_CONTEXT,
                ("base:allocation", "qemu:allocation-depth", "x:y"))
    assert [r.reply_type for r in reps] == [P.NBD_REP_META_CONTEXT] * 2 + [P.NBD_REP_ACK]
    ids = {r.data[4:].decode(): struct.unpack_from(">I", r.data)[0] for r in reps[:-1]}
    assert len(set(ids.values())) == 2
    assert conn.meta_contexts == {v: k for k, v in ids.items()}
    reps = meta(conn, P.NBD_OPT_SET_META_CONTEXT, ("qemu:allocation-depth",))
    assert list(conn.meta_contexts.values()) == ["qemu:allocation-depth"]
    [r] = meta(conn, P.NBD_OPT_SET_META_CONTEXT, ("base:allocation",), name="other")
    assert r.reply_type == P.NBD_REP_ERR_UNKNOWN
    [r] = replies(send_option(conn, P.NBD_OPT_SET_META_CONTEXT, struct.pack(">I", 0)))
    assert r.reply_type == P.NBD_REP_ERR_INVALID



@pytest.mark.parametrize("data", [
    P.pack_meta_context_data("other", ("base:allocation",)),    # unknown export
    P.pack_meta_context_data("disk", ("base:allocation",))[:-3],  # runs short
    struct.pack(">I", 1) + b"\xff" + struct.pack(">I", 0),       # name not UTF-8
], ids=["unknown-export", "truncated", "not-utf8"])
def test_failed_set_meta_context_clears_the_selection(data):
    """The spec: SET_META_CONTEXT replaces the selection "including when this command fails"."""
    conn = connect()
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    meta(conn, P.NBD_OPT_SET_META_CONTEXT, ("base:allocation", "qemu:allocation-depth"))
    assert len(conn.meta_contexts) == 2
    [r] = replies(send_option(conn, P.NBD_OPT_SET_META_CONTEXT, data))
    assert r.reply_type & P.NBD_REP_FLAG_ERROR
    assert conn.meta_contexts == {}
    assert go(conn, "disk").action is Action.TRANSMISSION
    assert conn.check_request(P.NBD_CMD_BLOCK_STATUS, 0, 0, 4096) == P.NBD_EINVAL


def test_options_at_shutdown_get_err_shutdown():
    """The spec: a server being shut down SHOULD error further options (but ABORT) with
    NBD_REP_ERR_SHUTDOWN; EXPORT_NAME cannot be refused, so the connection closes."""
    conn = connect()
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    conn.begin_shutdown()
    for option, data in [(P.NBD_OPT_LIST, b""), (P.NBD_OPT_GO, P.pack_info_go_data("disk")),
                         (P.NBD_OPT_INFO, P.pack_info_go_data("disk")), (P.NBD_OPT_STARTTLS, b""),
                         (P.NBD_OPT_SET_META_CONTEXT, P.pack_meta_context_data("disk", ())),
                         (777, b"x")]:
        out = send_option(conn, option, data)
        [r] = replies(out)
        assert (r.option, r.reply_type, out.action) == (option, P.NBD_REP_ERR_SHUTDOWN,
                                                         Action.CONTINUE)
    out = send_option(conn, P.NBD_OPT_ABORT)
    assert out.action is Action.CLOSE and replies(out)[0].reply_type == P.NBD_REP_ACK
    conn = connect()
    conn.begin_shutdown()
    out = send_option(conn, P.NBD_OPT_EXPORT_NAME, b"disk")
    assert out.action is Action.CLOSE and out.data == b""


@pytest.mark.parametrize("char", ["é", "€", "😀"], ids=["2-byte", "3-byte", "4-byte"])
@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_long_strings_are_cut_on_a_character_boundary(char, shift):
    """Strings the server sends are at most 4096 bytes (the spec's MUST), cut where a UTF-8
    character ends: an error message echoing a long export name, a long description."""
    conn = connect(Export(size=SIZE, name="disk", description="x" * shift + char * 4096))
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    name = "y" * shift + char * ((4096 - shift) // len(char.encode()))  # up to 4096 bytes
    for option, data in [(P.NBD_OPT_INFO, P.pack_info_go_data(name)),
                         (P.NBD_OPT_SET_META_CONTEXT, P.pack_meta_context_data(name, ())),
                         (P.NBD_OPT_LIST, b""),
                         (P.NBD_OPT_INFO, P.pack_info_go_data("disk", (P.NBD_INFO_DESCRIPTION,)))]:
        out = send_option(conn, option, data)
        for r in replies(out):
            if r.reply_type == P.NBD_REP_SERVER:
                text = r.data[4 + struct.unpack_from(">I", r.data)[0]:]
            elif r.reply_type == P.NBD_REP_INFO:
                if struct.unpack_from(">H", r.data)[0] != P.NBD_INFO_DESCRIPTION:
                    continue
                text = r.data[2:]
            elif r.reply_type & P.NBD_REP_FLAG_ERROR:
                text = r.data
            else:
                continue
            assert len(text) <= P.MAX_STRING
            assert len(text) > P.MAX_STRING - 4  # cut, not dropped
            text.decode("utf-8")  # raises if a character was split


def test_description_that_is_not_utf8_is_still_sent():
    """A backing path that is not UTF-8 reaches the description as surrogate escapes (Python's
    reading of argv): it is sent with replacement characters, not an internal error."""
    conn = connect(Export(size=SIZE, name="disk", description="view of /tmp/\udcff.img"))
    [server, ack] = replies(send_option(conn, P.NBD_OPT_LIST))
    assert server.data.endswith("view of /tmp/?.img".encode()) and ack.reply_type == P.NBD_REP_ACK

# ---- transmission ------------------------------------------------------------------------------

def transmission(structured=True, contexts=("base:allocation",), readonly=False, size=SIZE,
                 max_payload=P.DEFAULT_MAX_PAYLOAD):
    conn = connect(Export(size=size, readonly=readonly, max_payload=max_payload))
    if structured:
        send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
        if contexts:
            meta(conn, P.NBD_OPT_SET_META_CONTEXT, contexts, name="")
    assert go(conn).action is Action.TRANSMISSION
    return conn


def test_decode_request_and_bad_magic():
    conn = transmission()
    raw = P.pack_request(P.NBD_CMD_READ, 4096, 512, flags=P.NBD_CMD_FLAG_DF, cookie=0xABCDEF)
    assert len(raw) == P.REQUEST_SIZE
    assert conn.decode_request(b"xx" + raw, 2) == (P.NBD_CMD_FLAG_DF, P.NBD_CMD_READ, 0xABCDEF,
                                                    4096, 512)
    with pytest.raises(P.ProtocolError):
        conn.decode_request(P.pack_request(P.NBD_CMD_READ, magic=0x12345678))
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("cmd, flags, offset, count, error", [
    (P.NBD_CMD_READ, 0, 0, 512, 0),
    (P.NBD_CMD_READ, 0, SIZE - 1, 1, 0),
    (P.NBD_CMD_READ, 0, SIZE - 1, 2, P.NBD_EINVAL),           # past the end
    (P.NBD_CMD_READ, 0, 2**64 - 1, 2, P.NBD_EINVAL),          # offset + count overflows
    (P.NBD_CMD_WRITE, 0, SIZE, 1, P.NBD_ENOSPC),
    (P.NBD_CMD_WRITE_ZEROES, 0, SIZE - 10, 11, P.NBD_ENOSPC),
    (P.NBD_CMD_TRIM, 0, SIZE, 1, P.NBD_EINVAL),
    (P.NBD_CMD_CACHE, 0, SIZE, 1, P.NBD_EINVAL),
    (P.NBD_CMD_BLOCK_STATUS, 0, SIZE, 1, P.NBD_EINVAL),
    (P.NBD_CMD_READ, 0, 0, 0, P.NBD_EINVAL),                  # zero length
    (P.NBD_CMD_FLUSH, 0, 0, 0, 0),
    (P.NBD_CMD_FLUSH, 0, 1, 0, P.NBD_EINVAL),
    (P.NBD_CMD_FLUSH, P.NBD_CMD_FLAG_FUA, 0, 0, 0),           # FUA is valid on every command
    (9, 0, 0, 512, P.NBD_EINVAL),                             # unknown command
    (P.NBD_CMD_RESIZE, 0, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_READ, 1 << 9, 0, 512, P.NBD_EINVAL),           # unknown flag
    (P.NBD_CMD_READ, P.NBD_CMD_FLAG_NO_HOLE, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_DF, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_READ, P.NBD_CMD_FLAG_REQ_ONE, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FAST_ZERO, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_READ, P.NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512, P.NBD_EINVAL),
    (P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO, 0, 512, 0),
    (P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_FLAG_REQ_ONE, 0, SIZE, 0),
    (P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 512, 0),
])
def test_check_request(cmd, flags, offset, count, error):
    assert transmission().check_request(cmd, flags, offset, count) == error


def test_check_request_sizes_over_the_maximum():
    conn = transmission(size=1 << 40, max_payload=1 << 20)
    assert conn.check_request(P.NBD_CMD_READ, 0, 0, 1 << 20) == 0
    assert conn.check_request(P.NBD_CMD_READ, 0, 0, (1 << 20) + 1) == P.NBD_EINVAL
    assert conn.check_request(P.NBD_CMD_WRITE, 0, 0, (1 << 20) + 1) == P.NBD_EINVAL
    # Commands without a payload may be larger than the maximum payload.
    assert conn.check_request(P.NBD_CMD_TRIM, 0, 0, 2**32 - 1) == 0
    assert conn.check_request(P.NBD_CMD_BLOCK_STATUS, 0, 0, 2**32 - 1) == 0


def test_check_request_read_only():
    conn = transmission(readonly=True)
    for cmd in (P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES):
        assert conn.check_request(cmd, 0, 0, 512) == P.NBD_EPERM
    assert conn.check_request(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 0, 512) == P.NBD_EINVAL
    assert conn.check_request(P.NBD_CMD_READ, 0, 0, 512) == 0


def test_check_request_without_structured_replies_or_contexts():
    conn = transmission(structured=False)
    assert conn.check_request(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 512) == P.NBD_EINVAL
    assert conn.check_request(P.NBD_CMD_BLOCK_STATUS, 0, 0, 512) == P.NBD_EINVAL
    conn = transmission(structured=True, contexts=())
    assert conn.check_request(P.NBD_CMD_BLOCK_STATUS, 0, 0, 512) == P.NBD_EINVAL


def test_simple_replies():
    conn = transmission(structured=False)
    assert conn.ok_reply(7) == struct.pack(">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, 0, 7)
    assert conn.error_reply(7, P.NBD_CMD_READ, P.NBD_EINVAL, "bad") == struct.pack(
        ">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, P.NBD_EINVAL, 7)
    buf = bytearray(P.READ_REPLY_PREFIX + 4)
    buf[P.READ_REPLY_PREFIX:] = b"data"
    start = conn.read_reply_into(buf, 9, 0, 4)
    assert bytes(buf[start:]) == struct.pack(">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, 0, 9) + b"data"


def test_read_reply_items_lay_out_replies_sent_from_files():
    """Pieces (fd, pos, length), fd -1 for zeroes: a simple reply or a DF read is one header and
    every piece; a structured reply makes each run of data one OFFSET_DATA chunk and each zero
    piece an OFFSET_HOLE chunk, DONE on the last."""
    pieces = [(5, 100, 4096), (6, 0, 512), (-1, 0, 8192), (5, 20000, 100), (-1, 0, 4)]
    count = sum(p[2] for p in pieces)
    simple = transmission(structured=False)
    assert simple.read_reply_items(3, 1000, count, pieces) == [
        struct.pack(">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, 0, 3), *pieces]
    conn = transmission()
    data = ">IHHQIQ"
    assert conn.read_reply_items(3, 1000, count, pieces, df=True) == [
        struct.pack(data, P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                    P.NBD_REPLY_TYPE_OFFSET_DATA, 3, count + 8, 1000), *pieces]
    hole = ">IHHQIQI"
    assert conn.read_reply_items(3, 1000, count, pieces) == [
        struct.pack(data, P.NBD_STRUCTURED_REPLY_MAGIC, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, 3,
                    4608 + 8, 1000), pieces[0], pieces[1],
        struct.pack(hole, P.NBD_STRUCTURED_REPLY_MAGIC, 0, P.NBD_REPLY_TYPE_OFFSET_HOLE, 3, 12,
                    5608, 8192),
        struct.pack(data, P.NBD_STRUCTURED_REPLY_MAGIC, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, 3,
                    108, 13800), pieces[3],
        struct.pack(hole, P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                    P.NBD_REPLY_TYPE_OFFSET_HOLE, 3, 12, 13900, 4)]
    # No zero piece: one data chunk.  All zeroes: one hole chunk.
    assert conn.read_reply_items(4, 0, 4096, [(5, 0, 4096)]) == [
        struct.pack(data, P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                    P.NBD_REPLY_TYPE_OFFSET_DATA, 4, 4104, 0), (5, 0, 4096)]
    assert conn.read_reply_items(4, 0, 4096, [(-1, 0, 4096)]) == [
        struct.pack(hole, P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                    P.NBD_REPLY_TYPE_OFFSET_HOLE, 4, 12, 0, 4096)]
    with pytest.raises(ValueError):
        conn.read_reply_items(4, 0, 8192, [(-1, 0, 4096)])


def test_structured_replies():
    conn = transmission()
    buf = bytearray(P.READ_REPLY_PREFIX + 4)
    buf[P.READ_REPLY_PREFIX:] = b"data"
    start = conn.read_reply_into(buf, 9, 4096, 4)
    assert bytes(buf[start:]) == struct.pack(
        ">IHHQIQ", P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_OFFSET_DATA, 9, 12, 4096) + b"data"
    err = conn.error_reply(5, P.NBD_CMD_READ, P.NBD_EIO, "oops")
    assert err == struct.pack(">IHHQIIH", P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                              P.NBD_REPLY_TYPE_ERROR, 5, 10, P.NBD_EIO, 4) + b"oops"
    # Other successes may stay simple replies.
    assert conn.ok_reply(5)[:4] == struct.pack(">I", P.NBD_SIMPLE_REPLY_MAGIC)


def parse_chunks(data):
    chunks = []
    pos = 0
    while pos < len(data):
        magic, flags, typ, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
        pos += 20
        chunks.append((flags, typ, cookie, data[pos:pos + length]))
        pos += length
    return chunks


def test_block_status_reply_clips_and_flags_the_last_chunk():
    conn = transmission(contexts=("base:allocation", "qemu:allocation-depth"))
    data = conn.block_status_reply(3, 1000, False, [
        (1, [(600, 0), (600, 3), (5, 0)]),
        (2, [(1 << 33, 2)]),
    ])
    (f1, t1, c1, p1), (f2, t2, c2, p2) = parse_chunks(data)
    assert (f1, t1, c1) == (0, P.NBD_REPLY_TYPE_BLOCK_STATUS, 3)
    assert (f2, t2, c2) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, 3)
    assert struct.unpack(">IIIII", p1) == (1, 600, 0, 400, 3)
    assert struct.unpack(">III", p2) == (2, 1000, 2)
    [(_, _, _, p)] = parse_chunks(conn.block_status_reply(3, 1000, True, [(1, [(10, 1), (10, 0)])]))
    assert struct.unpack(">III", p) == (1, 10, 1)
    with pytest.raises(ValueError):
        conn.block_status_reply(3, 1000, False, [(1, [])])


def test_read_reply_at_an_offset_in_a_shared_buffer():
    conn = transmission()
    buf = bytearray(100 + P.READ_REPLY_PREFIX + 3)
    buf[100 + P.READ_REPLY_PREFIX:] = b"abc"
    start = conn.read_reply_into(buf, 1, 512, 3, base=100)
    assert start == 100 + P.READ_REPLY_PREFIX - 28
    assert bytes(buf[:100]) == bytes(100)
    assert bytes(buf[start:]) == struct.pack(
        ">IHHQIQ", P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_OFFSET_DATA, 1, 11, 512) + b"abc"


def test_requests_at_shutdown_get_eshutdown():
    conn = transmission()
    assert conn.check_request(P.NBD_CMD_READ, 0, 0, 512) == 0
    conn.begin_shutdown()
    for cmd, count in [(P.NBD_CMD_READ, 512), (P.NBD_CMD_WRITE, 512), (P.NBD_CMD_FLUSH, 0),
                       (P.NBD_CMD_BLOCK_STATUS, 512), (P.NBD_CMD_READ, 0)]:
        assert conn.check_request(cmd, 0, 0, count) == P.NBD_ESHUTDOWN


@pytest.mark.parametrize("shift", [0, 1])
def test_error_chunk_message_is_cut_on_a_character_boundary(shift):
    conn = transmission()
    data = conn.error_reply(7, P.NBD_CMD_READ, P.NBD_EIO, "x" * shift + "€" * 2000)
    err, msglen = struct.unpack_from(">IH", data, 20)
    assert P.MAX_STRING - 3 < msglen <= P.MAX_STRING
    data[26:26 + msglen].decode("utf-8")


# ---- export catalogs: a server that offers many exports by name ---------------------------------

class Catalog(P.Exports):
    """Exports "a" and "b" with sizes of their own; acquire and release are counted."""

    def __init__(self):
        self.acquired = []
        self.looked_up = []

    def _export(self, name):
        if name not in ("a", "b"):
            raise P.Refused(P.NBD_REP_ERR_UNKNOWN if name != "../x" else P.NBD_REP_ERR_INVALID,
                            f"no export {name!r}")
        return Export(size=SIZE * (2 if name == "b" else 1), name=name, description=f"view {name}",
                      readonly=name == "b")

    def lookup(self, name):
        self.looked_up.append(name)
        return self._export(name)

    def acquire(self, name):
        export = self._export(name)
        self.acquired.append(name)
        return export, f"handle-{name}"

    def listing(self):
        return [(n, f"view {n}") for n in ("a", "b")] + [(f"v{i}", "") for i in range(500)]


def test_catalog_info_looks_up_without_acquiring():
    cat = Catalog()
    conn = connect(cat)
    assert conn.export is None
    reps = replies(send_option(conn, P.NBD_OPT_INFO, P.pack_info_go_data(
        "b", (P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION))))
    info = info_by_type(reps)
    assert struct.unpack(">QH", info[P.NBD_INFO_EXPORT])[0] == 2 * SIZE
    assert info[P.NBD_INFO_DESCRIPTION] == b"view b"
    assert cat.looked_up == ["b"] and cat.acquired == [] and conn.handle is None


def test_catalog_go_acquires_and_takes_the_exports_size_and_flags():
    cat = Catalog()
    conn = connect(cat)
    out = go(conn, "b")
    assert out.action is Action.TRANSMISSION
    assert cat.acquired == ["b"] and conn.handle == "handle-b"
    assert conn.export.name == "b" and conn.size == 2 * SIZE and conn.readonly
    assert conn.transmission_flags & P.NBD_FLAG_READ_ONLY
    assert conn.check_request(P.NBD_CMD_READ, 0, 2 * SIZE - 512, 512) == 0
    assert conn.check_request(P.NBD_CMD_WRITE, 0, 0, 512) == P.NBD_EPERM


@pytest.mark.parametrize("name, reply", [("zz", P.NBD_REP_ERR_UNKNOWN),
                                         ("../x", P.NBD_REP_ERR_INVALID)])
def test_catalog_refusals_keep_the_client_haggling(name, reply):
    cat = Catalog()
    conn = connect(cat)
    send_option(conn, P.NBD_OPT_STRUCTURED_REPLY)
    for option, data in [(P.NBD_OPT_GO, P.pack_info_go_data(name)),
                         (P.NBD_OPT_INFO, P.pack_info_go_data(name)),
                         (P.NBD_OPT_SET_META_CONTEXT, P.pack_meta_context_data(
                             name, ("base:allocation",))),
                         (P.NBD_OPT_LIST_META_CONTEXT, P.pack_meta_context_data(name))]:
        [r] = replies(send_option(conn, option, data))
        assert r.reply_type == reply and name.encode() in r.data
        assert conn.phase is Phase.OPTIONS
    assert cat.acquired == [] and conn.handle is None
    assert go(conn, "a").action is Action.TRANSMISSION and conn.handle == "handle-a"


def test_catalog_export_name_refused_hangs_up():
    conn = connect(Catalog())
    out = send_option(conn, P.NBD_OPT_EXPORT_NAME, b"zz")
    assert out.action is Action.CLOSE and "zz" in out.reason and conn.handle is None


def test_catalog_list_sends_every_export():
    conn = connect(Catalog())
    reps = replies(send_option(conn, P.NBD_OPT_LIST))
    assert reps[-1].reply_type == P.NBD_REP_ACK
    names = []
    for r in reps[:-1]:
        assert r.reply_type == P.NBD_REP_SERVER
        (n,) = struct.unpack_from(">I", r.data)
        names.append((r.data[4:4 + n].decode(), r.data[4 + n:].decode()))
    assert names[:2] == [("a", "view a"), ("b", "view b")] and len(names) == 502
