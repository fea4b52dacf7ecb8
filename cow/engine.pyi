"""Type stubs for the compiled copy-on-write engine (cow/engine.pyx)."""

import os
from collections.abc import Buffer, Sequence
from typing import Literal

from cow.backing import Backing
from cow.overlayfile import OverlayFile

BLOCK_NOT_ALLOCATED: int  # 0: data comes from the backing
BLOCK_ALLOCATED: int      # 1: data is in the overlay
BLOCK_TRIMMED: int        # 3: reads as zeroes

EXTENT_HOLE: int          # 1, the same value as NBD_STATE_HOLE
EXTENT_ZERO: int          # 2, the same value as NBD_STATE_ZERO

DEPTH_OVERLAY: int        # 1 (qemu:allocation-depth of a block held in the overlay)
DEPTH_BACKING: int        # 2 (qemu:allocation-depth of a block read from the backing)

CACHE_MODE_READ: int      # blk_cache: read the block from the backing (warm its cache)
CACHE_MODE_COW: int       # blk_cache: copy the block up into the overlay

MIN_BLOCK_SIZE: int       # 4096
DEFAULT_BLOCK_SIZE: int   # 65536

# Why Engine.serve returned
SERVE_FRONT_END: int      # the request at rx[start:] is the caller's to serve (header whole)
SERVE_STOP: int           # Transmission.stop() was called
SERVE_EOF: int            # the stream ended (or failed) between requests
SERVE_TRUNCATED: int      # the stream ended inside a WRITE payload, or it stalled (info:
                          # ETIMEDOUT, after the payload timeout; else 0): nothing written
SERVE_BROKEN: int         # a reply could not be sent (info: its errno)
SERVE_FAILED: int         # a request failed (info: cookie, command, flags, offset, count, OSError)
# What serve_replies returns
REPLIED_END: int          # the reads are closed and none is pending: the replier ends
REPLIED_FAILED: int       # info: [(cookie, flags, offset, count, errno)] for the caller to answer
REPLIED_BROKEN: int       # a reply could not be sent (info: its errno); the rest are dropped
REPLIED_IDLE: int         # the last read in flight was answered while the server shuts down

def pipe_budget() -> int:
    """The most pipes the process keeps open for WRITE payloads (Engine.pwrite_from,
    Engine.serve), idle ones included: an eighth of RLIMIT_NOFILE's soft limit, at most 128."""

def parse_block_size(value: str | int) -> int:
    """Parse a block size such as 65536, "64K", "4M"; ValueError says what is allowed."""

def parse_size(value: str | int) -> int:
    """Parse a byte size with an optional K/M/G/T/P suffix (powers of 1024)."""

class ReadQueue:
    """Where reads started with Engine.pread_start() come out when they finish."""

    @property
    def pending(self) -> int: ...  # started, not yet collected
    def wait(self) -> list[tuple[object, int]]:
        """Block (GIL released) until reads finish: [(token, status)]; [] once closed and
        nothing is pending."""
    def close(self) -> None: ...

class ReadPlan:
    """The pieces of one read (Engine.read_plan), held until released: while held, the engine
    and its backing stay open, so each piece's fd stays valid."""

    pieces: list[tuple[int, int, int]]  # (fd, pos, count) in order; fd -1: count zero bytes
    sparse: bool                        # a piece is zeroes
    def send(self, sock: int, items: list, before: Sequence[Buffer] = ...) -> None:
        """Send on the blocking socket fd sock the buffers in before, then items: buffers and
        this plan's pieces (protocol.read_reply_items), file pieces with sendfile, in one call
        with the GIL released.  OSError: the reply may be cut short."""
    def release(self) -> None: ...
    def __enter__(self) -> ReadPlan: ...
    def __exit__(self, *exc: object) -> None: ...

class Transmission:
    """A connection in transmission as Engine.serve needs it, and the lock every reply on the
    connection is sent under (``with tx:``)."""
    def configure(self, sock: int, *, structured: bool, fua: bool, readonly: bool, size: int,
                  max_payload: int, slow_backing: bool, large_request: int,
                  zero_copy_read: int, zero_copy_write: int, recv_ahead: int,
                  exact_reads: int, payload_timeout: float | None = None) -> None:
        """Set before serve() is first called.  payload_timeout: seconds without a byte inside
        a WRITE payload before serve() gives the connection up (None or 0: no limit)."""
    def stop(self) -> None:
        """The server is shutting down: serve() returns SERVE_STOP instead of waiting."""
    @property
    def waiting(self) -> bool:
        """serve() is waiting for the next request."""
    def configure_reads(self, budget: ReadBudget, max_reads: int, *, serve: bool) -> None:
        """The connection's read budget and read slots (at most max_reads reads in flight over
        an NBD backing).  serve: Engine.serve starts and answers such READs itself (someone
        must then run serve_replies); else it leaves them to the caller."""
    @property
    def read_in_use(self) -> int:
        """Bytes of READ replies this connection holds (charged to its ReadBudget)."""
    @property
    def reads_in_flight(self) -> int:
        """Reads over an NBD backing in flight (serve()'s and the caller's)."""
    def take_read_slot(self) -> None:
        """Wait for a read slot; OSError(ESHUTDOWN) once stopped, OSError(ECONNRESET) once
        broken, if still waiting."""
    def give_read_slot(self) -> None: ...
    def mark_broken(self) -> None:
        """The client is gone: waiters give up, replies are dropped."""
    def close_reads(self) -> None:
        """serve_replies returns REPLIED_END once nothing is pending any more."""
    def wake_waiters(self) -> None: ...
    def __enter__(self) -> Transmission: ...
    def __exit__(self, *exc: object) -> None: ...


class ReadBudget:
    """Bytes of READ replies held in memory, per connection (its Transmission) and server-wide
    (see cow/areads.pxi)."""
    def __init__(self, per_connection: int, total: int, always: int) -> None: ...
    @property
    def in_use(self) -> int: ...
    def try_take(self, tx: Transmission, count: int) -> bool: ...
    def take(self, tx: Transmission, count: int) -> None:
        """Charge count bytes to tx, waiting for room; OSError(ESHUTDOWN) once the server is
        shutting down, OSError(ECONNRESET) once the connection is broken, if still waiting."""
    def give(self, tx: Transmission, count: int) -> None: ...
    def wake(self) -> None:
        """Make every waiter look again."""


def serve_replies(engine: Engine, tx: Transmission) -> tuple[int, object]:
    """Send the replies of the READs Engine.serve started on tx as they finish, without the
    GIL; returns (REPLIED_..., info) when the caller has something to do."""


class Engine:
    """A copy-on-write view of a read-only backing.

    backing: a file or block device path, an NBD URI (nbd://, nbds://, nbd+unix://...), a command
    serving NBD on socket activation (a sequence: argv), or a Backing shared with other engines
    (the engine does not close a Backing it was given).
    overlay: None for a temporary overlay (unlinked, gone with the engine), or the path of a
    persistent one (cow/overlayfile.py): created if missing, else reopened and checked against
    the backing and block_size (cow.overlayfile.OverlayError, a ValueError, with one line if it
    does not fit; OverlayBusy if another engine holds it); or an OverlayFile already opened,
    locked and checked for this backing (overlayfile.open_in_dir, as cow.views opens a view),
    which the engine then owns.  Its bitmap is saved at flush(), at a FUA write and at close().
    Every method that does I/O releases the GIL for the whole call, backing reads included.
    Errors from I/O raise OSError (errno set, message naming the operation); bad arguments
    raise ValueError before any I/O.
    """

    def __init__(
        self,
        backing: str | Sequence[str] | Backing,
        *,
        block_size: int | str | None = None,  # None: 64K, or a persistent overlay's own
        cow_on_read: bool | str = False,  # False, True, or an absolute path: on while it exists
        cow_on_cache: bool = False,
        lock_mode: Literal["fine", "global"] = "fine",
        tmpdir: str | None = None,  # default $TMPDIR, else /var/tmp
        overlay_max_size: int | None = None,  # bytes; writes needing more fail with ENOSPC
        nbd_connections: int | None = None,  # most libnbd handles (None: 8, or 4 with multi-conn)
        overlay: str | os.PathLike[str] | OverlayFile | None = None,
        readonly: bool = False,  # writes fail with EROFS; a persistent overlay is opened shared
        backing_changed: Literal["refuse", "accept"] = "refuse",  # a file backing modified since
    ) -> None: ...

    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def nr_blocks(self) -> int: ...
    @property
    def backing(self) -> str: ...
    @property
    def backing_is_nbd(self) -> bool: ...  # an NBD URI or a command
    @property
    def backing_error(self) -> str | None: ...  # what broke the NBD backing's connection
    @property
    def lock_mode(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def overlay(self) -> str | None: ...  # the persistent overlay's path
    @property
    def readonly(self) -> bool: ...

    # Byte-range API: one call per NBD request.
    def pread(self, buf: Buffer, offset: int) -> None:
        """Fill the writable buffer buf (len(buf) bytes) from offset."""
    def pread_start(self, buf: Buffer, offset: int, queue: ReadQueue, token: object) -> bool | None:
        """Start filling buf without waiting for the backing.  True: done now.  False: started;
        (token, status) comes out of queue.wait() once buf is filled (status 0) or the read
        failed (-errno); keep buf alive and untouched until then.  None: cannot be started so
        (cow-on-read, global lock mode, a file backing): use pread()."""
    def read_plan(self, count: int, offset: int, holes: bool = False) -> ReadPlan | None:
        """Where the bytes of a read are (the overlay, a file backing, or zeroes), for a front
        end that sends them itself; holes: the backing's holes become zero pieces too.  None
        where the engine must read itself (global lock mode, an NBD backing under blocks not
        allocated, cow-on-read): use pread()."""
    def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None: ...
    def pwrite_from(self, sock: int, count: int, offset: int, prefix: Buffer = b"",
                    fua: bool = False, timeout: float | None = None) -> None:
        """Write count bytes at offset: prefix, then the rest received from the socket fd
        sock (a WRITE's payload), moved with splice where it can be (within the process's
        pipe_budget(); beyond it, into memory).  The payload is always consumed; EOFError if
        the stream ended or failed inside it, TimeoutError if nothing of it came for timeout
        seconds (None or 0: no limit), both with nothing written and the stream out of step;
        else pwrite()'s errors, raised once the payload is received and dropped."""
    def serve(self, tx: Transmission, rx: bytearray, start: int, end: int
              ) -> tuple[int, int, int, object]:
        """Read, serve and answer the requests of a connection without the GIL, for as long
        as they are valid READ, WRITE or FLUSH that wait for no slow backing; rx[start:end]
        holds bytes read ahead, before and after.  (start, end, status, info): see the
        SERVE_ constants."""
    def drop_idle_pipes(self) -> None:
        """Close the idle pipes pwrite_from keeps for the next payloads."""
    def zero(self, count: int, offset: int, may_trim: bool = True, fast: bool = False) -> None:
        """Make the range read as zeroes. fast=True fails at once with OSError(ENOTSUP)
        when that would need a backing read (an unaligned piece of a block not yet copied up)."""
    def trim(self, count: int, offset: int) -> None: ...
    def cache(self, count: int, offset: int) -> None: ...
    def flush(self) -> None:
        """Make every completed write durable; for a persistent overlay, the bitmap too."""
    def extents(self, count: int, offset: int, req_one: bool = False) -> list[tuple[int, int]]:
        """(length, type) runs from offset, type a mask of EXTENT_HOLE | EXTENT_ZERO.
        May cover less than count (at least one run, unless count is 0); never past the size."""
    def allocation_depth(self, count: int, offset: int, req_one: bool = False) -> list[tuple[int, int]]:
        """(length, depth) runs: DEPTH_OVERLAY for allocated or trimmed blocks, DEPTH_BACKING else."""
    def needs_backing(self, count: int, offset: int, partial_only: bool = False) -> bool:
        """Would a request on this range read the backing (partial_only: only through its
        unaligned head or tail block, as a write)?  A hint for front ends over a slow backing."""
    def stats(self) -> dict[str, int]:
        """allocated_blocks, trimmed_blocks, overlay_bytes (space the overlay file uses),
        block_size, nr_blocks, data_offset (where block 0 lives in the overlay file)."""
    def close(self) -> None:
        """Flush a persistent overlay, then close; OSError if that last flush fails."""

    # Block API (nbdkit blk.h vocabulary); blknum counts blocks, buffers are block_size bytes.
    def blk_set_size(self, new_size: int) -> None:
        """Resize (at most 2**63-1 bytes); OSError(EBUSY) while other calls are in flight,
        OSError(EOPNOTSUPP) for a persistent overlay (its disk size is fixed)."""
    def blk_status(self, blknum: int) -> int: ...
    def blk_read(self, blknum: int, buf: Buffer) -> None: ...
    def blk_write(self, blknum: int, buf: Buffer) -> None: ...
    def blk_trim(self, blknum: int) -> None: ...
    def blk_cache(self, blknum: int, mode: int = ...) -> None: ...

    def __enter__(self) -> Engine: ...
    def __exit__(self, *exc: object) -> None: ...
