"""The NBD protocol, sans I/O: bytes in, decisions and bytes out.

This module knows the wire format of the NBD protocol (NetworkBlockDevice/nbd
``doc/proto.md``) as nbdkit and qemu-nbd speak it, and nothing about sockets,
threads or the copy-on-write engine.  The ``cow/server`` package moves the bytes;
this module decides what they mean.

One :class:`ServerConnection` follows one client through the phases of a
connection::

    HANDSHAKE --client flags--> OPTIONS --GO / EXPORT_NAME--> TRANSMISSION --DISC--> CLOSED
                                   \\--ABORT, bad input---------------------------------/

During the handshake and the option haggling the caller reads exactly
:meth:`ServerConnection.next_read_size` bytes, hands them to
:meth:`ServerConnection.receive` and sends the bytes of the :class:`Output` it
gets back; the output's ``action`` says whether to go on, close, or start
transmission.  In transmission the caller decodes each 28-byte request header
with :meth:`ServerConnection.decode_request`, validates it with
:meth:`ServerConnection.check_request` (range, flags, read-only, negotiated
features: the NBD error to reply with, or 0), does the work, and encodes the
reply with the ``*_reply`` methods.

What the server offers is an :class:`Exports` catalog, asked by name: one :class:`Export`
(:class:`SingleExport`, the export under its name and as the default ""), or many (a view per
export name, cow/views.py).  NBD_OPT_INFO and the meta context options only look a name up;
NBD_OPT_GO and NBD_OPT_EXPORT_NAME acquire it, and the handle the catalog gives is the
caller's to release when the connection ends; a name the catalog refuses gets the error
reply it chose (EXPORT_NAME, which cannot be refused, hangs up).

Wire constants keep the spelling of the NBD specification.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

# --- magic numbers ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9  # option replies
NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers (not negotiated by this server)
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server) and client flags ---------------------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags ----------------------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# --- options ---------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4  # withdrawn
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# --- option replies --------------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# --- NBD_REP_INFO types ----------------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands and command flags --------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8  # not supported: EINVAL like any unknown command

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5  # extended headers only

# --- structured replies ----------------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --- errors ----------------------------------------------------------------------------------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- base:allocation states ------------------------------------------------------------------
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# --- metadata contexts offered by this server, with the ids they get when selected -----------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
META_CONTEXT_IDS = {CONTEXT_BASE_ALLOCATION: 1, CONTEXT_QEMU_ALLOCATION_DEPTH: 2}

# --- limits ----------------------------------------------------------------------------------
MAX_STRING = 4096  # longest export name, query or message the spec allows
MAX_OPTION_LENGTH = 65536  # option data read whole; longer data is skipped in pieces, then
                           # the option is refused (NBD_REP_ERR_UNSUP or NBD_REP_ERR_TOO_BIG)
MAX_OPTION_SKIP = 64 * 1024 * 1024  # longer option data ends the connection at once (as in
                                    # nbdkit, whose cap is its 64 MiB request limit)
MAX_OPTIONS = 256  # options per connection before we stop listening
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024  # largest READ or WRITE we accept (advertised)
REQUEST_SIZE = 28  # bytes of a (compact) request header
READ_REPLY_PREFIX = 32  # room before read data for either reply header (see read_reply_into)

CMD_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "EXPORT_NAME",
    NBD_OPT_ABORT: "ABORT",
    NBD_OPT_LIST: "LIST",
    NBD_OPT_PEEK_EXPORT: "PEEK_EXPORT",
    NBD_OPT_STARTTLS: "STARTTLS",
    NBD_OPT_INFO: "INFO",
    NBD_OPT_GO: "GO",
    NBD_OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# Which flags each command accepts (FUA is allowed on every command when SEND_FUA was
# advertised, as the spec says; the rest only where they mean something).
_CMD_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_DISC: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}
_WRITE_LIKE = (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)

# --- packers ---------------------------------------------------------------------------------
_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_READ_CHUNK = struct.Struct(">IHHQIQ")  # chunk header + offset of an OFFSET_DATA chunk
_HOLE_CHUNK = struct.Struct(">IHHQIQI")  # a whole OFFSET_HOLE chunk: header, offset, length
_ERROR_PAYLOAD = struct.Struct(">IH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U32PAIR = struct.Struct(">II")

_SIMPLE_AT = READ_REPLY_PREFIX - _SIMPLE_REPLY.size  # 16
_READ_CHUNK_AT = READ_REPLY_PREFIX - _READ_CHUNK.size  # 4


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # greeting sent, waiting for the client flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"  # requests and replies
    CLOSED = "closed"  # nothing more may be read or sent


class Action(enum.Enum):
    """What the caller does after sending an :class:`Output`'s bytes."""

    CONTINUE = "continue"  # read the next next_read_size() bytes
    CLOSE = "close"  # close the connection (phase is CLOSED)
    TRANSMISSION = "transmission"  # the export is chosen: serve requests
    STARTTLS = "starttls"  # upgrade the socket to TLS, call tls_started(), then continue


@dataclass(frozen=True)
class Output:
    data: bytes = b""
    action: Action = Action.CONTINUE
    reason: str = ""  # why the connection closes, for the log


class ProtocolError(Exception):
    """The client broke the framing: its connection cannot go on."""


@dataclass(frozen=True)
class Export:
    """What a server offers: one export, under its name and as the default export ""."""

    size: int
    name: str = ""
    description: str = ""
    readonly: bool = False
    preferred_block_size: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    contexts: tuple[str, ...] = (CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH)

    def matches(self, name: str) -> bool:
        return name == "" or name == self.name

    def transmission_flags(self, structured_replies: bool) -> int:
        flags = (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE
                 | NBD_FLAG_CAN_MULTI_CONN)
        if self.readonly:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= (NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
                      | NBD_FLAG_SEND_FAST_ZERO)
        if structured_replies:
            flags |= NBD_FLAG_SEND_DF
        return flags

    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) for NBD_INFO_BLOCK_SIZE."""
        preferred = max(512, min(self.preferred_block_size, 32 * 1024 * 1024, self.max_payload))
        return 1, preferred, self.max_payload


class Refused(Exception):
    """An export name the server will not serve now: the option's error reply type
    (NBD_REP_ERR_UNKNOWN, _INVALID, _POLICY...) and a message for the client."""

    def __init__(self, reply_type: int, message: str):
        super().__init__(message)
        self.reply_type = reply_type


class Exports:
    """What a server offers, by export name: the interface ServerConnection asks.

    ``lookup(name)``: the Export a client would get for name (NBD_OPT_INFO, the meta context
    options), without opening or creating anything.  ``acquire(name)``: the Export and a handle
    for transmission (NBD_OPT_GO, NBD_OPT_EXPORT_NAME); it may open or create what serves the
    name, and the caller gives the handle back with ``release(handle)`` when the connection ends.
    ``listing()``: (name, description) pairs for NBD_OPT_LIST.  lookup and acquire raise
    :class:`Refused` for a name they will not serve."""

    def lookup(self, name: str) -> Export:
        raise NotImplementedError

    def acquire(self, name: str) -> tuple[Export, object]:
        raise NotImplementedError

    def release(self, handle: object) -> None:
        pass

    def listing(self) -> list[tuple[str, str]]:
        return []


class SingleExport(Exports):
    """One export, under its name and as the default export "" (``handle``: what acquire gives
    every connection)."""

    def __init__(self, export: Export, handle: object = None):
        self.export = export
        self.handle = handle

    def lookup(self, name: str) -> Export:
        if not self.export.matches(name):
            raise Refused(NBD_REP_ERR_UNKNOWN, f"unknown export {name!r}")
        return self.export

    def acquire(self, name: str) -> tuple[Export, object]:
        return self.lookup(name), self.handle

    def listing(self) -> list[tuple[str, str]]:
        return [(self.export.name, self.export.description)]


class _Malformed(Exception):
    """Option data that does not parse: NBD_REP_ERR_INVALID."""


class _Cursor:
    """Reads big-endian fields off option data, raising _Malformed when it runs short."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise _Malformed("option data too short")
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise _Malformed("option data too short")
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def string(self, length: int) -> str:
        if length > MAX_STRING:
            raise _Malformed(f"string of {length} bytes is longer than {MAX_STRING}")
        if self.pos + length > len(self.data):
            raise _Malformed("string runs past the end of the option data")
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        if b"\0" in raw:
            raise _Malformed("string contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Malformed(f"{len(self.data) - self.pos} unexpected bytes at the end")


def wire_string(text: str, limit: int = MAX_STRING) -> bytes:
    """text as the spec's string: UTF-8, at most ``limit`` bytes, cut where a character ends.
    Characters UTF-8 cannot encode (surrogate escapes of undecodable bytes, as in a path from
    argv) become "?"."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    cut = limit
    while cut and raw[cut] & 0xC0 == 0x80:  # raw[cut] continues a character: back off
        cut -= 1
    return raw[:cut]


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return _OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(data)) + data


def nbd_error_name(error: int) -> str:
    return {NBD_EPERM: "EPERM", NBD_EIO: "EIO", NBD_ENOMEM: "ENOMEM", NBD_EINVAL: "EINVAL",
            NBD_ENOSPC: "ENOSPC", NBD_EOVERFLOW: "EOVERFLOW", NBD_ENOTSUP: "ENOTSUP",
            NBD_ESHUTDOWN: "ESHUTDOWN", 0: "OK"}.get(error, str(error))


TLS_MODES = ("off", "on", "require")


class ServerConnection:
    """The server side of one NBD connection, as a state machine over bytes.

    Handshake and options: send :meth:`greeting`, then loop reading exactly
    :meth:`next_read_size` bytes and passing them to :meth:`receive`.  Option handling
    is a table (``self.option_handlers``, option number -> method taking the option data
    and returning an :class:`Output`).

    TLS (``tls``: "off", "on" or "require", as nbdkit's ``--tls``): NBD_OPT_STARTTLS is
    answered with an ACK and :attr:`Action.STARTTLS`; the caller then runs the TLS handshake
    on the socket and calls :meth:`tls_started`, which forgets what was negotiated in plain
    text, as the spec requires.  With "require", before TLS every option but STARTTLS and
    ABORT gets NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be refused, closes).
    """

    def __init__(self, exports: Export | Exports, *, max_options: int = MAX_OPTIONS,
                 tls: str = "off"):
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        if isinstance(exports, Export):
            exports = SingleExport(exports)
        self.exports = exports
        # The export chosen by GO or EXPORT_NAME, and the handle its acquire gave (the caller
        # releases it when the connection ends).  Until then: the single export, if that is
        # what the server offers (its size and limits), else None.
        self.export: Export | None = getattr(exports, "export", None)
        self.handle: object = None
        self.tls_mode = tls
        self.tls_active = False  # the TLS handshake has completed on this connection
        self.phase = Phase.HANDSHAKE
        self.max_options = max_options
        self.options_seen = 0
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}  # selected contexts: id -> name
        self.transmission_flags = 0
        self.size = 0
        self.readonly = False
        self.max_payload = DEFAULT_MAX_PAYLOAD
        if self.export is not None:
            self._take(self.export)
        self._pending_option: tuple[int, int] | None = None  # (option, length) awaiting data
        self._skip_left = 0  # bytes of the pending option's data still to drop (too long)
        self.shutting_down = False  # see begin_shutdown
        self.export_name: str | None = None  # the name the client chose (GO or EXPORT_NAME)
        self.option_handlers = {
            NBD_OPT_ABORT: self._opt_abort,
            NBD_OPT_LIST: self._opt_list,
            NBD_OPT_STARTTLS: self._opt_starttls,
            NBD_OPT_INFO: self._opt_info_go,
            NBD_OPT_GO: self._opt_info_go,
            NBD_OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            NBD_OPT_LIST_META_CONTEXT: self._opt_meta_context,
            NBD_OPT_SET_META_CONTEXT: self._opt_meta_context,
        }

    # ---- handshake and options -------------------------------------------------------------

    def greeting(self) -> bytes:
        """The first bytes the server sends: NBDMAGIC, IHAVEOPT, handshake flags."""
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    def next_read_size(self) -> int:
        """How many bytes :meth:`receive` wants next (0 once transmission has begun)."""
        if self.phase is Phase.HANDSHAKE:
            return _CLIENT_FLAGS.size
        if self.phase is Phase.OPTIONS:
            if self._skip_left:
                return min(self._skip_left, MAX_OPTION_LENGTH)
            if self._pending_option is not None:
                return self._pending_option[1]
            return _OPTION_HEADER.size
        return 0

    def receive(self, data: bytes) -> Output:
        """Take exactly next_read_size() bytes of the handshake; say what to send and do."""
        if len(data) != self.next_read_size():
            raise ValueError(f"expected {self.next_read_size()} bytes, got {len(data)}")
        if self.phase is Phase.HANDSHAKE:
            return self._client_flags(data)
        if self.phase is not Phase.OPTIONS:
            raise ValueError(f"receive() in phase {self.phase.value}")
        if self._pending_option is None:
            magic, option, length = _OPTION_HEADER.unpack(data)
            if magic != IHAVEOPT:
                return self._close(f"bad option magic 0x{magic:016x}")
            self.options_seen += 1
            if self.options_seen > self.max_options:
                return self._close(f"more than {self.max_options} options")
            if length > MAX_OPTION_LENGTH and (length > MAX_OPTION_SKIP
                                               or option == NBD_OPT_EXPORT_NAME
                                               or not self.fixed_newstyle):
                # Past the cap (denial of service), or an option that cannot be refused:
                # hang up without reading the data.
                return self._close(f"option {option} data length {length} is too long")
            self._pending_option = (option, length)
            if length > MAX_OPTION_LENGTH:
                self._skip_left = length  # dropped in pieces, never held whole
            if length:
                return Output()
            data = b""
        option, length = self._pending_option
        if self._skip_left:
            self._skip_left -= len(data)
            if self._skip_left:
                return Output()
            self._pending_option = None
            return self._option(option, None, length)
        self._pending_option = None
        return self._option(option, bytes(data), length)

    def _close(self, reason: str, data: bytes = b"") -> Output:
        self.phase = Phase.CLOSED
        return Output(data, Action.CLOSE, reason)

    def _client_flags(self, data: bytes) -> Output:
        (flags,) = _CLIENT_FLAGS.unpack(data)
        if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            return self._close(f"unknown client flags 0x{flags:08x}")
        self.fixed_newstyle = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return Output()

    def _option(self, option: int, data: bytes | None, length: int) -> Output:
        """Answer one option.  ``data`` is None when its ``length`` bytes were over
        MAX_OPTION_LENGTH and were skipped unread."""
        if option == NBD_OPT_SET_META_CONTEXT:
            # The spec: it replaces the selection "including when this command fails".
            self.meta_contexts = {}
        if self.shutting_down and option != NBD_OPT_ABORT:
            if option == NBD_OPT_EXPORT_NAME or not self.fixed_newstyle:  # cannot be refused
                return self._close(f"option {option} while the server is shutting down")
            return Output(self._error(option, NBD_REP_ERR_SHUTDOWN,
                                      "the server is shutting down"))
        if (self.tls_mode == "require" and not self.tls_active
                and option not in (NBD_OPT_STARTTLS, NBD_OPT_ABORT)):
            if option == NBD_OPT_EXPORT_NAME:  # no way to refuse it but to hang up
                return self._close("EXPORT_NAME before STARTTLS on a server that requires TLS")
            if not self.fixed_newstyle:
                return self._close(f"option {option} before STARTTLS (TLS is required)")
            return Output(self._error(option, NBD_REP_ERR_TLS_REQD,
                                      "TLS is required: send NBD_OPT_STARTTLS first"))
        if option == NBD_OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if not self.fixed_newstyle:
            # Plain newstyle knows only EXPORT_NAME and has no way to refuse an option.
            return self._close(f"option {option} from a client without fixed newstyle")
        handler = self.option_handlers.get(option)
        name = OPT_NAMES.get(option, str(option))
        if handler is None:
            return Output(self._error(option, NBD_REP_ERR_UNSUP, f"option {name} not supported"))
        if data is None:
            if option == NBD_OPT_ABORT:  # its data means nothing: abort all the same
                return handler(option, b"")
            return Output(self._error(option, NBD_REP_ERR_TOO_BIG,
                                      f"option {name} data of {length} bytes is longer than "
                                      f"{MAX_OPTION_LENGTH}"))
        try:
            return handler(option, data)
        except _Malformed as e:
            return Output(self._error(option, NBD_REP_ERR_INVALID, str(e)))

    @staticmethod
    def _error(option: int, reply_type: int, message: str) -> bytes:
        return option_reply(option, reply_type, wire_string(message))

    def _take(self, export: Export) -> None:
        self.export = export
        self.size = export.size
        self.readonly = export.readonly
        self.max_payload = export.max_payload

    def _enter_transmission(self, name: str, export: Export, handle: object) -> None:
        self._take(export)
        self.handle = handle
        self.phase = Phase.TRANSMISSION
        self.export_name = name
        self.transmission_flags = export.transmission_flags(self.structured_replies)

    def _opt_export_name(self, data: bytes) -> Output:
        try:
            cur = _Cursor(data)
            name = cur.string(len(data))
        except _Malformed as e:
            return self._close(f"EXPORT_NAME: {e}")
        try:
            export, handle = self.exports.acquire(name)
        except Refused as e:    # EXPORT_NAME cannot be refused: hang up
            return self._close(f"EXPORT_NAME {name!r}: {e}")
        self._enter_transmission(name, export, handle)
        reply = _EXPORT_NAME_REPLY.pack(self.size, self.transmission_flags)
        if not self.no_zeroes:
            reply += bytes(124)
        return Output(reply, Action.TRANSMISSION)

    def _opt_abort(self, option: int, data: bytes) -> Output:
        return self._close("client sent ABORT", option_reply(option, NBD_REP_ACK))

    def _opt_list(self, option: int, data: bytes) -> Output:
        if data:
            raise _Malformed("LIST takes no data")
        out = []
        for name, description in self.exports.listing():
            raw = name.encode()
            out.append(option_reply(option, NBD_REP_SERVER,
                                    _U32.pack(len(raw)) + raw + wire_string(description)))
        out.append(option_reply(option, NBD_REP_ACK))
        return Output(b"".join(out))

    def _opt_starttls(self, option: int, data: bytes) -> Output:
        if data:
            raise _Malformed("STARTTLS takes no data")
        if self.tls_mode == "off":
            return Output(self._error(option, NBD_REP_ERR_POLICY,
                                      "TLS is not enabled on this server"))
        if self.tls_active:
            raise _Malformed("TLS is already active on this connection")
        return Output(option_reply(option, NBD_REP_ACK), Action.STARTTLS)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: option state negotiated in plain
        text is forgotten (the spec: a man in the middle could have chosen it)."""
        if self.phase is not Phase.OPTIONS or self._pending_option is not None:
            raise ValueError("tls_started() outside option haggling")
        self.tls_active = True
        self.structured_replies = False
        self.meta_contexts = {}

    def _opt_structured_reply(self, option: int, data: bytes) -> Output:
        if data:
            raise _Malformed("STRUCTURED_REPLY takes no data")
        self.structured_replies = True
        return Output(option_reply(option, NBD_REP_ACK))

    def _opt_info_go(self, option: int, data: bytes) -> Output:
        cur = _Cursor(data)
        name = cur.string(cur.u32())
        requests = [cur.u16() for _ in range(cur.u16())]
        cur.end()
        handle = None
        try:
            if option == NBD_OPT_GO:
                export, handle = self.exports.acquire(name)
            else:
                export = self.exports.lookup(name)
        except Refused as e:
            return Output(self._error(option, e.reply_type, str(e)))
        flags = export.transmission_flags(self.structured_replies)
        out = [option_reply(option, NBD_REP_INFO,
                            _INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size, flags))]
        if NBD_INFO_NAME in requests:
            out.append(option_reply(option, NBD_REP_INFO,
                                    _U16.pack(NBD_INFO_NAME) + export.name.encode()))
        if NBD_INFO_DESCRIPTION in requests:
            out.append(option_reply(option, NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION)
                                    + wire_string(export.description)))
        # Sent whether asked for or not (as nbdkit does): clients that did not ask ignore it.
        block_size = _INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, *export.block_size())
        out.append(option_reply(option, NBD_REP_INFO, block_size))
        out.append(option_reply(option, NBD_REP_ACK))
        if option == NBD_OPT_GO:
            self._enter_transmission(name, export, handle)
            return Output(b"".join(out), Action.TRANSMISSION)
        return Output(b"".join(out))

    def _opt_meta_context(self, option: int, data: bytes) -> Output:
        cur = _Cursor(data)
        name = cur.string(cur.u32())
        queries = [cur.string(cur.u32()) for _ in range(cur.u32())]
        cur.end()
        if not self.structured_replies:
            return Output(self._error(option, NBD_REP_ERR_INVALID,
                                      "meta contexts need structured replies first"))
        try:
            export = self.exports.lookup(name)
        except Refused as e:
            return Output(self._error(option, e.reply_type, str(e)))
        out = []
        if option == NBD_OPT_LIST_META_CONTEXT:
            for ctx in export.contexts:
                if not queries or any(q == ctx or (q.endswith(":") and ctx.startswith(q))
                                      for q in queries):
                    out.append(option_reply(option, NBD_REP_META_CONTEXT,
                                            _U32.pack(0) + ctx.encode()))
        else:  # SET: the selection was cleared in _option
            for ctx in export.contexts:
                if ctx in queries:
                    cid = META_CONTEXT_IDS[ctx]
                    self.meta_contexts[cid] = ctx
                    out.append(option_reply(option, NBD_REP_META_CONTEXT,
                                            _U32.pack(cid) + ctx.encode()))
        out.append(option_reply(option, NBD_REP_ACK))
        return Output(b"".join(out))

    def begin_shutdown(self) -> None:
        """The server is shutting down (the spec's wording: "in the process of being shut
        down").  From now on every option but ABORT is answered NBD_REP_ERR_SHUTDOWN (an
        EXPORT_NAME, which cannot be refused, closes), and :meth:`check_request` answers every
        request NBD_ESHUTDOWN.  Requests already validated are not affected."""
        self.shutting_down = True

    # ---- transmission ----------------------------------------------------------------------

    def decode_request(self, buf, pos: int = 0) -> tuple[int, int, int, int, int]:
        """(flags, command, cookie, offset, count) of the request header at buf[pos:pos+28].

        A bad magic means the stream is out of step: ProtocolError, phase CLOSED.
        """
        magic, flags, cmd, cookie, offset, count = _REQUEST.unpack_from(buf, pos)
        if magic != NBD_REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        return flags, cmd, cookie, offset, count

    def check_request(self, cmd: int, flags: int, offset: int, count: int) -> int:
        """Validate a decoded request: 0 if it may be served, else the NBD error to reply."""
        if self.shutting_down:
            return NBD_ESHUTDOWN
        allowed = _CMD_FLAGS.get(cmd)
        if allowed is None:
            return NBD_EINVAL  # unknown command
        if flags & ~allowed:
            return NBD_EINVAL  # unknown flag, or one not documented for this command
        eflags = self.transmission_flags
        if flags & NBD_CMD_FLAG_FUA and not eflags & NBD_FLAG_SEND_FUA:
            return NBD_EINVAL
        if flags & NBD_CMD_FLAG_DF and not self.structured_replies:
            return NBD_EINVAL
        if cmd == NBD_CMD_FLUSH or cmd == NBD_CMD_DISC:
            return NBD_EINVAL if offset or count else 0
        if self.readonly and cmd in _WRITE_LIKE:
            return NBD_EPERM
        if cmd == NBD_CMD_BLOCK_STATUS and not self.meta_contexts:
            return NBD_EINVAL  # no context selected (this also needs structured replies)
        if count == 0:
            return NBD_EINVAL
        if count > self.max_payload and (cmd == NBD_CMD_READ or cmd == NBD_CMD_WRITE):
            return NBD_EINVAL
        if offset > self.size or count > self.size - offset:
            return NBD_ENOSPC if cmd == NBD_CMD_WRITE or cmd == NBD_CMD_WRITE_ZEROES else NBD_EINVAL
        return 0

    def disconnect(self) -> None:
        """NBD_CMD_DISC was received (or the stream ended): nothing more to read."""
        self.phase = Phase.CLOSED

    def ok_reply(self, cookie: int) -> bytes:
        """Success without data (every command but READ and BLOCK_STATUS)."""
        return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie)

    def error_reply(self, cookie: int, cmd: int, error: int, message: str = "") -> bytes:
        """An error reply: a structured ERROR chunk once structured replies were negotiated
        (with the message for a human), else a simple reply."""
        if not self.structured_replies:
            return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)
        msg = wire_string(message)
        return (_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                            cookie, _ERROR_PAYLOAD.size + len(msg))
                + _ERROR_PAYLOAD.pack(error, len(msg)) + msg)

    def read_reply_into(self, buf, cookie: int, offset: int, count: int, base: int = 0) -> int:
        """Write a successful READ reply header into buf so that it ends where the data begins.

        The caller reads ``count`` bytes into ``buf[base+READ_REPLY_PREFIX:][:count]`` and sends
        ``buf[start:base+READ_REPLY_PREFIX+count]``, header and data in one piece; the return
        value is ``start``.
        """
        if self.structured_replies:
            _READ_CHUNK.pack_into(buf, base + _READ_CHUNK_AT, NBD_STRUCTURED_REPLY_MAGIC,
                                  NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookie,
                                  count + 8, offset)
            return base + _READ_CHUNK_AT
        _SIMPLE_REPLY.pack_into(buf, base + _SIMPLE_AT, NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
        return base + _SIMPLE_AT

    def read_reply_items(self, cookie: int, offset: int, count: int, pieces, df: bool = False
                         ) -> list:
        """A successful READ reply whose data the caller sends from files: the reply as a list
        of items to send in order, each either bytes (headers) or a piece from ``pieces``.

        ``pieces`` (Engine.read_plan) are (fd, pos, length) tuples that make up the ``count``
        bytes at ``offset`` in order; fd -1 means zeroes.  The caller sends a piece's length
        bytes of fd from pos, or that many zero bytes.  With structured replies and without
        NBD_CMD_FLAG_DF, zero pieces become NBD_REPLY_TYPE_OFFSET_HOLE chunks (nothing of
        them is sent but the chunk) and each run of other pieces one OFFSET_DATA chunk; the
        last chunk carries NBD_REPLY_FLAG_DONE.  Otherwise the reply is one header and the
        pieces, zeroes included (a simple reply, or one OFFSET_DATA chunk)."""
        if not self.structured_replies:
            return [_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie), *pieces]
        if df or all(p[0] >= 0 for p in pieces):
            return [_READ_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                     NBD_REPLY_TYPE_OFFSET_DATA, cookie, count + 8, offset),
                    *pieces]
        # Chunks: (at, length, data pieces) for a run of data, (at, length, None) for a hole.
        chunks: list = []
        at = offset
        for piece in pieces:
            n = piece[2]
            if piece[0] < 0:
                chunks.append((at, n, None))
            elif chunks and chunks[-1][2] is not None:
                start, length, run = chunks[-1]
                run.append(piece)
                chunks[-1] = (start, length + n, run)
            else:
                chunks.append((at, n, [piece]))
            at += n
        if at != offset + count:
            raise ValueError(f"read pieces cover {at - offset} bytes, not {count}")
        out: list = []
        last = len(chunks) - 1
        for i, (start, length, run) in enumerate(chunks):
            flags = NBD_REPLY_FLAG_DONE if i == last else 0
            if run is None:
                out.append(_HOLE_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags,
                                            NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, start, length))
            else:
                out.append(_READ_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags,
                                            NBD_REPLY_TYPE_OFFSET_DATA, cookie, length + 8, start))
                out.extend(run)
        return out

    def block_status_reply(self, cookie: int, count: int, req_one: bool,
                           results: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
        """The reply to BLOCK_STATUS: one chunk per (context id, [(length, flags), ...]),
        the last one flagged DONE.  Runs are clipped to ``count`` bytes in all (and to one run
        with REQ_ONE); a run past 2**32-1 bytes is clipped too."""
        out = []
        for i, (cid, runs) in enumerate(results):
            descriptors = []
            left = count
            for length, status in runs:
                length = min(length, left, 0xFFFFFFFF)
                if length <= 0:
                    break
                descriptors.append(_U32PAIR.pack(length, status))
                left -= length
                if req_one or left == 0:
                    break
            if not descriptors:
                raise ValueError("block status with no extent")
            payload = _U32.pack(cid) + b"".join(descriptors)
            flags = NBD_REPLY_FLAG_DONE if i == len(results) - 1 else 0
            out.append(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_BLOCK_STATUS,
                                   cookie, len(payload)))
            out.append(payload)
        return b"".join(out)


# ---- client-side helpers (tests and tools build requests with these) ------------------------

def pack_request(cmd: int, offset: int = 0, count: int = 0, *, flags: int = 0, cookie: int = 0,
                 magic: int = NBD_REQUEST_MAGIC) -> bytes:
    """A request header as a client sends it (the WRITE payload follows separately)."""
    return _REQUEST.pack(magic, flags, cmd, cookie, offset, count)


def pack_option(option: int, data: bytes = b"", *, magic: int = IHAVEOPT,
                length: int | None = None) -> bytes:
    """An option as a client sends it; ``length`` overrides the real data length (tests)."""
    return _OPTION_HEADER.pack(magic, option, len(data) if length is None else length) + data


def pack_info_go_data(name: str = "", requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (_U32.pack(len(raw)) + raw + _U16.pack(len(requests))
            + b"".join(_U16.pack(r) for r in requests))


def pack_meta_context_data(name: str = "", queries: tuple[str, ...] = ()) -> bytes:
    raw = name.encode()
    out = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        out += [_U32.pack(len(q.encode())), q.encode()]
    return b"".join(out)


@dataclass
class OptionReply:
    option: int
    reply_type: int
    data: bytes = field(repr=False, default=b"")


def parse_option_replies(data: bytes) -> list[OptionReply]:
    """Split a run of option replies (tests); ValueError on a bad magic or truncation."""
    out = []
    pos = 0
    while pos < len(data):
        if pos + _OPTION_REPLY.size > len(data):
            raise ValueError("truncated option reply header")
        magic, option, reply_type, length = _OPTION_REPLY.unpack_from(data, pos)
        if magic != NBD_REP_MAGIC:
            raise ValueError(f"bad option reply magic 0x{magic:x}")
        pos += _OPTION_REPLY.size
        if pos + length > len(data):
            raise ValueError("truncated option reply data")
        out.append(OptionReply(option, reply_type, bytes(data[pos:pos + length])))
        pos += length
    return out
