# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The copy-on-write block engine.

A read-only backing (`cow/backing.pyx`: a file, a block device, an NBD export or a command
serving one) is overlaid by a sparse overlay file (`overlay.pxi`).  A packed bitmap (2 bits a
block, `bitmap.pxi`) says where each block lives:

    BLOCK_NOT_ALLOCATED  read from the backing
    BLOCK_ALLOCATED      read from the overlay
    BLOCK_TRIMMED        reads as zeroes (its overlay space has been punched out)

`blocks.pxi` (the BlockCore class) turns byte ranges into blocks and pieces of blocks and
implements the copy-up, trim, zero and `blk_*` operations without the GIL; this file sets an
engine up and wraps it all for Python (Engine), with the ReadQueue of reads that finish later.

Locking (no global lock on any path in the default "fine" mode):

* The bitmap mutex guards the bitmap, its counters and the table of claims.  It is taken only
  with the GIL released and held only for bitmap access, never across I/O.
* Claims (see bitmap.pxi) serialize whatever changes a block that is not allocated: a partial
  write's read-modify-write, a copy-up, a trim, a zero.  They cover exactly the blocks involved,
  so a copy-up waiting on a slow backing holds up nothing but requests for the same block, and
  each block is copied up once.  Writes into allocated blocks take a shared claim and go
  straight to the overlay; reads take none.
* lock_mode="global" instead holds one mutex around every block operation, I/O included, as
  nbdkit's filter did before "cow: Use more fine-grained locking" (kept for the benchmark).

Every core function is `noexcept nogil` and returns 0 or -errno; the Python wrappers check
arguments with the GIL held, release it for the whole call (backing reads included) and raise
on error.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.errno cimport errno, EIO, ENOSPC, ENOMEM, EINVAL, EOPNOTSUPP, EISDIR, EINTR, EAGAIN, \
    EPIPE, EROFS, ETIMEDOUT, ESHUTDOWN, ECONNRESET
from posix.time cimport timespec, clock_gettime, CLOCK_REALTIME
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, UINT64_MAX, INT64_MAX
from posix.mman cimport mmap, munmap, PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from posix.types cimport off_t
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE, RLIM_INFINITY
from posix.unistd cimport usleep

from cow.clib cimport *
from cow.backing cimport Backing, runs_t, runs_add, runs_full, runs_free, piece_t, T_DATA, \
    T_HOLE_ZERO, batch_t, batch_status

import os

from cow import overlayfile

include "bitmap.pxi"
include "overlay.pxi"
include "payload.pxi"


cdef uint8_t *zero_block_map(size_t n) noexcept nogil:
    """n bytes of zeroes that cost no memory: a read-only private anonymous mapping reads as the
    kernel's shared zero page.  (A calloc'd block comes from reused heap and is cleared, which
    touched a whole block of RSS per engine: 64 KiB for each open view of a server of views.)
    NULL if mmap fails."""
    cdef void *p = mmap(NULL, n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    return NULL if p == MAP_FAILED else <uint8_t *>p


cdef void zero_block_unmap(uint8_t *p, size_t n) noexcept nogil:
    if p != NULL:
        munmap(p, n)


cdef enum:
    C_DEPTH_OVERLAY = 1
    C_DEPTH_BACKING = 2
    C_CACHE_MODE_READ = 0
    C_CACHE_MODE_COW = 1
    MAX_RUNS = 65536            # extents: stop after this many runs (the client asks again)
    MAX_ASYNC_PIECES = 32       # pread_start: backing pieces of one read (more: pread instead)
    CACHE_CHUNK = 8 * 1024 * 1024   # cow-on-cache copies up at most this much at a time
    COR_OFF = 0
    COR_ON = 1
    COR_PATH = 2

# The block states, under the names nbdkit uses (the C enum is in engine.pxd; a module-level
# assignment to the same names would clash with it, hence the dict).
globals().update(BLOCK_NOT_ALLOCATED=<int>BLOCK_NOT_ALLOCATED, BLOCK_ALLOCATED=<int>BLOCK_ALLOCATED,
                 BLOCK_TRIMMED=<int>BLOCK_TRIMMED)

EXTENT_HOLE = 1
EXTENT_ZERO = 2
DEPTH_OVERLAY = C_DEPTH_OVERLAY
DEPTH_BACKING = C_DEPTH_BACKING
CACHE_MODE_READ = C_CACHE_MODE_READ
CACHE_MODE_COW = C_CACHE_MODE_COW

MIN_BLOCK_SIZE = 4096
DEFAULT_BLOCK_SIZE = 65536
# A partial write to a block not yet in the overlay copies the whole block: larger blocks make every
# copy-up cost more than it saves (overlayfile.MAX_BLOCK_SIZE says why 4 MiB; an overlay file with
# larger blocks is refused by the same limit).
MAX_BLOCK_SIZE = overlayfile.MAX_BLOCK_SIZE
# nbdkit's API takes sizes as int64_t; beyond this the block count would overflow.
MAX_DISK_SIZE = INT64_MAX

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
             "E": 1 << 60}


def parse_size(value):
    """Parse a byte count: an integer, or digits with a K/M/G/T/P/E suffix (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    s = str(value).strip().upper()
    if s.endswith("IB"):
        s = s[:len(s) - 2]
    elif len(s) > 1 and s.endswith("B") and not s[:len(s) - 1].isdigit():
        s = s[:len(s) - 1]
    suffix = s[len(s) - 1:] if s and s[len(s) - 1].isalpha() else ""
    digits = s[:len(s) - len(suffix)]
    if not digits.isdigit() or suffix not in _SUFFIXES:
        raise ValueError(f"invalid size {value!r}: expected a number with an optional "
                         f"K, M, G, T, P or E suffix, such as 65536 or 64K")
    return int(digits) * _SUFFIXES[suffix]


def parse_block_size(value):
    """Parse and check a COW block size: a power of two from 4K to 4M."""
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if n < MIN_BLOCK_SIZE or n > MAX_BLOCK_SIZE or n & (n - 1):
        raise ValueError(f"invalid cow block size {value!r}: it must be a power of two from 4K "
                         f"(4096) to 4M, such as 4K, 64K (the default) or 1M")
    return n


include "blocks.pxi"


# ---------------------------------------------------------------------------------------------
# Where reads started with Engine.pread_start come out.

cdef void aread_free(aread_t *r) noexcept:
    """Release what a read held (GIL held); its engine call ends."""
    if r.cor != NULL:
        cor_free(r.cor)
        free(r.cor)
    PyBuffer_Release(&r.view)
    if r.engine != NULL:
        (<BlockCore>r.engine).leave()
        Py_DECREF(<object>r.engine)
        Py_DECREF(<object>r.token)
        Py_DECREF(<object>r.queue_obj)
    free(r)


cdef class ReadQueue:
    """Where reads started with Engine.pread_start() come out when they finish, so that one
    thread can have many reads waiting on a slow backing and collect them as they complete."""

    cdef rq_t q

    def __cinit__(self):
        pthread_mutex_init(&self.q.m, NULL)
        pthread_cond_init(&self.q.cond, NULL)

    def __dealloc__(self):
        # Pending reads hold a reference to the queue, so none is left by now.
        pthread_cond_destroy(&self.q.cond)
        pthread_mutex_destroy(&self.q.m)

    @property
    def pending(self):
        """Reads started and not yet collected."""
        return self.q.pending

    def close(self):
        """wait() returns [] once nothing is pending any more (instead of waiting)."""
        with nogil:
            pthread_mutex_lock(&self.q.m)
            self.q.closed = True
            pthread_cond_broadcast(&self.q.cond)
            pthread_mutex_unlock(&self.q.m)

    def wait(self):
        """Wait for finished reads; [(token, status)], status 0 or -errno.  [] when the queue
        is closed and nothing is pending."""
        cdef aread_t *r
        cdef aread_t *nxt
        cdef int n = 0
        with nogil:
            r = rq_take(&self.q, &n)
        done = []
        while r != NULL:
            nxt = r.next
            if r.cor != NULL and r.status == 0:    # cow-on-read: copy up what was read
                with nogil:
                    (<BlockCore>r.engine).cor_finish(r.cor)
            done.append((<object>r.token, r.status))
            aread_free(r)
            r = nxt
        return done


# ---------------------------------------------------------------------------------------------
# The pieces of a read, for a front end that sends them itself (Engine.read_plan).

cdef extern from *:
    """
    static const unsigned char cow_zeroes[65536];
    """
    const unsigned char cow_zeroes[65536]

cdef enum:
    SEND_IOV = 64               # buffers gathered into one sendmsg


cdef struct seg_t:              # one part of a reply to send (ReadPlan.send)
    const uint8_t *buf          # bytes to send, or NULL: count bytes of fd at pos (fd -1: zeroes)
    int fd
    uint64_t pos
    uint64_t count
    bint whole                  # fd must hold every byte (a file backing): else -EIO


cdef int send_iov(int sock, iovec *iov, int n, int flags) noexcept nogil:
    """sendmsg until every buffer has left; 0 or -errno."""
    cdef msghdr m
    cdef ssize_t r
    memset(&m, 0, sizeof(m))
    while n > 0:
        m.msg_iov = iov
        m.msg_iovlen = n
        r = sendmsg(sock, &m, flags | MSG_NOSIGNAL)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        while n > 0 and <size_t>r >= iov[0].iov_len:
            r -= iov[0].iov_len
            iov += 1
            n -= 1
        if n > 0 and r > 0:
            iov[0].iov_base = <uint8_t *>iov[0].iov_base + r
            iov[0].iov_len -= r
    return 0


cdef int send_segs(int sock, seg_t *segs, size_t nsegs) noexcept nogil:
    """Send segs in order: buffers and zeroes gathered with sendmsg (MSG_MORE while more
    follows), pieces of files with sendfile (the page cache's pages go to the socket, no copy);
    a file that ends before its piece does gives zeroes for the rest (the overlay: what lies
    past its end was never written), unless the piece is ``whole`` (a file backing is as long
    as it was when opened, unless it shrank while served: its missing bytes are not zeroes),
    then -EIO with the reply cut short.  0 or -errno (the reply may be cut short then)."""
    cdef iovec iov[SEND_IOV]
    cdef int n = 0, r
    cdef size_t i
    cdef uint64_t left, k
    cdef off_t pos
    cdef ssize_t sent
    for i in range(nsegs):
        left = segs[i].count
        if segs[i].buf == NULL and segs[i].fd >= 0:
            if n:
                r = send_iov(sock, iov, n, MSG_MORE)
                if r < 0:
                    return r
                n = 0
            pos = <off_t>segs[i].pos
            while left:
                sent = sendfile(sock, segs[i].fd, &pos, left if left < 0x40000000 else 0x40000000)
                if sent < 0:
                    if errno == EINTR:
                        continue
                    return -errno
                if sent == 0:
                    if segs[i].whole:
                        return -EIO
                    break       # the end of the overlay: zeroes
                left -= sent
        while left:
            if n == SEND_IOV:
                r = send_iov(sock, iov, n, MSG_MORE)
                if r < 0:
                    return r
                n = 0
            if segs[i].buf != NULL:
                iov[n].iov_base = <void *>segs[i].buf
                k = left
            else:
                iov[n].iov_base = <void *>cow_zeroes
                k = min(left, sizeof(cow_zeroes))
            iov[n].iov_len = k
            n += 1
            left -= k
    if n:
        return send_iov(sock, iov, n, 0)
    return 0


cdef class ReadPlan:
    """The pieces of one read: ``pieces`` is a list of (fd, pos, count), count bytes of the
    open file fd at pos, or count zero bytes where fd is -1.  While the plan is held (until
    release(), or the end of a with block) the engine and its backing stay open, so every fd
    stays valid; release it as soon as the pieces are sent."""

    cdef BlockCore engine
    cdef Backing backing        # holds a call on the backing while a piece reads its fd
    cdef readonly list pieces
    cdef readonly bint sparse   # a piece is zeroes

    def send(self, int sock, items, before=()):
        """Send on the socket sock (a blocking one) the buffers in ``before``, then ``items``
        in order: buffers (reply headers) and pieces of this plan as (fd, pos, count) tuples,
        sent with sendfile, zeroes for fd -1 (protocol.read_reply_items lays a reply out so).
        One call with the GIL released; OSError if a send fails, or a file backing ends before
        a piece of it (it shrank while served: EIO); the reply may be cut short then, and the
        connection cannot go on."""
        cdef size_t n = len(before) + len(items), i = 0, nviews = 0
        cdef seg_t *segs
        cdef Py_buffer *views
        cdef int r = 0, backing_fd = -1 if self.backing is None else self.backing.fd
        if self.engine is None:
            raise ValueError("cow: the read plan was released")
        segs = <seg_t *>calloc(n if n else 1, sizeof(seg_t))
        views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
        if segs == NULL or views == NULL:
            free(segs)
            free(views)
            raise MemoryError()
        try:
            for seq in (before, items):
                for item in seq:
                    if type(item) is tuple:
                        segs[i].fd, segs[i].pos, segs[i].count = item
                        segs[i].whole = segs[i].fd >= 0 and segs[i].fd == backing_fd
                    else:
                        PyObject_GetBuffer(item, &views[nviews], PyBUF_SIMPLE)
                        nviews += 1
                        segs[i].buf = <const uint8_t *>views[nviews - 1].buf
                        segs[i].count = views[nviews - 1].len
                    i += 1
            with nogil:
                r = send_segs(sock, segs, i)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            free(views)
            free(segs)
        if r == -EIO:
            raise OSError(EIO, "cow: a READ reply cut short: reading its data failed (the "
                               "backing file shorter than when it was opened?)")
        if r < 0:
            raise OSError(-r, f"cow: sending a READ reply: {os.strerror(-r)}")

    def release(self):
        if self.backing is not None:
            cow_atomic_add(&self.backing.calls, -1)
            self.backing = None
        if self.engine is not None:
            self.engine.leave()
            self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __dealloc__(self):
        if self.backing is not None:
            cow_atomic_add(&self.backing.calls, -1)
        if self.engine is not None:
            self.engine.leave()


# ---------------------------------------------------------------------------------------------

cdef class Engine(BlockCore):
    """A copy-on-write view of a read-only backing (see cow/engine.pyi for the API)."""

    def __cinit__(self, *args, **kwargs):
        self.ov.fd = -1
        self.backing_lock_fd = -1
        self.zero_block = NULL
        self.bm_ready = False
        pthread_mutex_init(&self.ov.flush_lock, NULL)
        pipes_init(&self.pipes)

    def __init__(self, backing, *, block_size=None, cow_on_read=False,
                 bint cow_on_cache=False, str lock_mode="fine", tmpdir=None,
                 overlay_max_size=None, nbd_connections=None, overlay=None,
                 bint readonly=False, str backing_changed="refuse", backing_wait=None):
        if self.bm_ready:
            raise RuntimeError("Engine is already initialised")
        requested = None if block_size is None else parse_block_size(block_size)
        if lock_mode not in ("fine", "global"):
            raise ValueError(f"invalid lock mode {lock_mode!r}: expected 'fine' or 'global'")
        self.lock_mode = lock_mode
        self.global_mode = lock_mode == "global"
        self.cor_mode, self.cor_path = _parse_cow_on_read(cow_on_read)
        self.cor_path_c = NULL
        if self.cor_path is not None:
            self.cor_path_c = self.cor_path
        self.cow_on_read = (False, True, cow_on_read)[self.cor_mode]
        self.c_cow_on_cache = cow_on_cache
        self.cow_on_cache = cow_on_cache
        self.readonly = readonly
        if readonly and (self.cor_mode != COR_OFF or cow_on_cache):
            raise ValueError("cow: a read-only engine cannot copy on read or on cache (both write "
                             "to the overlay)")
        if backing_changed not in overlayfile.BACKING_CHANGED_CHOICES:
            raise ValueError(f"invalid backing_changed {backing_changed!r}: expected 'refuse' or "
                             f"'accept'")
        if nbd_connections is not None and (not isinstance(nbd_connections, int)
                                            or not 1 <= nbd_connections <= 64):
            raise ValueError(f"invalid nbd_connections {nbd_connections}: expected 1 to 64")
        cap = None
        if overlay_max_size is not None:
            cap = parse_size(overlay_max_size)

        bitmap_init(&self.bm)
        pthread_mutex_init(&self.global_lock, NULL)
        self.bm_ready = True

        if isinstance(backing, Backing):
            self.b = backing        # shared: its owner closes it
            if self.b.closed:
                raise ValueError("cow: the backing is closed")
        else:
            self.b = Backing(backing, connections=nbd_connections, wait=backing_wait)
            self.owns_backing = True
        self.backing = self.b.description
        self.backing_is_nbd = self.b.is_nbd
        fd = overlayfile.hold_backing(self.b)
        self.backing_lock_fd = -1 if fd is None else fd
        if overlay is None:
            self.blksize = requested or DEFAULT_BLOCK_SIZE
            self.ov.fd = _open_temporary_overlay(tmpdir)
        else:
            if isinstance(overlay, overlayfile.OverlayFile):
                # Opened (and checked against this backing) by the caller, e.g. cow.views
                # relative to its folder: the engine owns it from here.
                if overlay.readonly != readonly or overlay.fd < 0:
                    raise ValueError("cow: an open overlay must be open (and read-only as the "
                                     "engine is)")
                if requested is not None and requested != overlay.header.block_size:
                    raise ValueError(f"cow: the overlay's block size is "
                                     f"{overlay.header.block_size}, not {requested}")
                self.ovfile = overlay
            else:
                self.ovfile = overlayfile.open_for_engine(
                    overlay, self.b, block_size=requested, readonly=readonly,
                    backing_changed=backing_changed)
            self.overlay = self.ovfile.path
            self.ov.fd = self.ovfile.fd
            self.ov.data_offset = self.ovfile.header.data_offset
            self.ov.bitmap_offset = self.ovfile.header.bitmap_offset
            self.ov.persistent = True
            self.ov.readonly = readonly
            self.blksize = self.ovfile.header.block_size
        try:
            self._set_up(cap)
        except BaseException:
            if self.ovfile is not None:
                self.ovfile.abandon()       # closes the overlay; removes it if made here
                self.ov.fd = -1
            raise
        if self.ovfile is not None:
            self.ovfile.finish_open()

    cdef _set_up(self, cap):
        """With the overlay open: the block size is known; size the bitmap, load a persistent
        one."""
        cdef int r
        cdef int64_t bad
        self.blkshift = (self.blksize - 1).bit_length()
        if cap is not None:
            if cap < self.blksize:
                raise ValueError(f"overlay_max_size {cap!r} is smaller than one block "
                                 f"({self.blksize} bytes)")
            self.bm.max_blocks = cap // self.blksize
        self.zero_block = zero_block_map(self.blksize)
        if self.zero_block == NULL:
            raise MemoryError()
        self.blk_set_size(self.b.c_size)
        if self.ovfile is None or self.ovfile.created:
            return
        with nogil:
            r = overlay_load_bitmap(&self.ov, &self.bm)
            if r == 0:
                pthread_mutex_lock(&self.bm.lock)
                bad = bitmap_recount(&self.bm)
                memset(self.bm.dirty, 0, self.bm.dirty_nbytes)
                pthread_mutex_unlock(&self.bm.lock)
        if r == -EIO:
            raise overlayfile.OverlayError(f"{self.overlay}: truncated cow overlay (its bitmap is "
                                           f"cut short)")
        if r < 0:
            raise OSError(-r, f"cow: reading the bitmap of {self.overlay}: {os.strerror(-r)}")
        if bad >= 0:
            raise overlayfile.OverlayError(f"{self.overlay}: corrupt overlay bitmap (invalid state "
                                           f"at block {bad})")

    def __dealloc__(self):
        self._release(True)
        pthread_mutex_destroy(&self.ov.flush_lock)
        pipes_destroy(&self.pipes)

    cdef void _release(self, bint flush) noexcept:
        if flush and self.ov.fd >= 0 and self.ov.persistent and not self.ov.readonly:
            with nogil:     # never closed: keep the writes all the same, as close() does
                overlay_flush(&self.ov, &self.bm)
        if self.ov.fd >= 0:
            close(self.ov.fd)       # drops the overlay's lock
            self.ov.fd = -1
        if self.backing_lock_fd >= 0:
            close(self.backing_lock_fd)
            self.backing_lock_fd = -1
        if self.b is not None and self.owns_backing:
            self.b.close()
        zero_block_unmap(self.zero_block, self.blksize)
        self.zero_block = NULL
        pipes_drain(&self.pipes)
        if self.bm_ready:
            bitmap_destroy(&self.bm)
            pthread_mutex_destroy(&self.global_lock)
            self.bm_ready = False

    def close(self):
        """Close the overlay (a persistent one is flushed first) and (unless shared) the backing;
        waits for calls still running in other threads.  Raises OSError if the final flush
        fails (the engine is closed all the same)."""
        cdef int r = 0
        if self.closing:
            return
        self.closing = True
        if self.owns_backing and self.b is not None and self.b.is_nbd:
            self.b.give_up_waiting()    # reads waiting for a backing that is down: EIO now
        while self.active or cow_atomic_load(&self.served_reads):
            with nogil:
                usleep(1000)
        if self.ov.fd >= 0 and self.ov.persistent and not self.ov.readonly:
            with nogil:
                r = overlay_flush(&self.ov, &self.bm)
        self._release(False)
        if r < 0:
            raise_errno(-r, "flush at close", 0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- Python API --------------------------------------------------------------------------
    cdef int check_writable(self, str op) except -1:
        if self.readonly:
            raise OSError(EROFS, f"cow: {op}: the engine is read-only")
        return 0

    cdef int check_range(self, str op, uint64_t count, uint64_t offset) except -1:
        if offset > self.c_size or count > self.c_size - offset:
            raise ValueError(f"cow: {op}: range offset={offset} count={count} is beyond the end "
                             f"of the disk (size {self.c_size})")
        return 0

    @property
    def size(self):
        return self.c_size

    @property
    def block_size(self):
        return self.blksize

    @property
    def nr_blocks(self):
        return self.bm.nrblocks

    @property
    def closed(self):
        return self.closing or self.ov.fd < 0

    def give_up_waiting(self):
        """The server is stopping: reads waiting for an NBD backing that is down fail now (see
        Backing.give_up_waiting)."""
        if self.b is not None and self.b.is_nbd:
            self.b.give_up_waiting()

    @property
    def backing_error(self):
        """What broke the connection to an NBD backing while it is down (reconnecting), or None
        while it works."""
        return self.b.error if self.b is not None else None

    def pread(self, buf, offset):
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self.enter()
            try:
                self.check_range("pread", view.len, offset_u)
                with nogil:
                    r = self.c_pread(<uint8_t *>view.buf, view.len, offset_u)
            finally:
                self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "pread", view.len, offset_u)

    def read_plan(self, count, offset, bint holes=False):
        """The pieces of a read of count bytes at offset, for a front end that sends them
        itself (sendfile): a ReadPlan, or None where the engine must read (global lock mode, an
        NBD backing under blocks not allocated, cow-on-read): use pread() then.  holes: find
        the backing's holes too (SEEK_DATA), so that they come out as zero pieces.

        Each piece holds what pread() would read from the same place at this moment.  Data
        sent later from an fd is whatever that place holds then: for blocks written or trimmed
        meanwhile, the new data or zeroes, as for any request that overlaps the read; block N
        only ever lives at its own place in the overlay, so a piece never shows another
        block's data."""
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef rplan_t plan
        cdef ReadPlan out
        cdef size_t i
        cdef int r
        memset(&plan, 0, sizeof(plan))
        self.enter()
        try:
            self.check_range("read_plan", count_u, offset_u)
            with nogil:
                r = self.c_read_plan(&plan, count_u, offset_u, holes) if count_u else 0
            if r < 0:
                raise_errno(-r, "read_plan", count_u, offset_u)
            if r == 2:
                return None
            out = ReadPlan.__new__(ReadPlan)
            out.pieces = [(plan.p[i].fd, plan.p[i].pos, plan.p[i].count) for i in range(plan.n)]
            out.sparse = False
            for i in range(plan.n):
                if plan.p[i].fd < 0:
                    out.sparse = True
            if plan.backing:
                cow_atomic_add(&self.b.calls, 1)
                out.backing = self.b
            self.active += 1        # the plan's own hold, given back by release()
            out.engine = self
            return out
        finally:
            free(plan.p)
            self.leave()

    def pread_start(self, buf, offset, ReadQueue queue not None, token):
        """Start filling buf from offset without waiting for the backing.  True: done (buf is
        filled).  False: started; (token, status) comes out of queue.wait() when buf is
        filled (status 0) or the read failed (-errno); buf must stay alive and untouched
        until then.  None: this read cannot be started so (global lock mode, a file backing,
        cow-on-read over blocks partly allocated): call pread() instead.  With cow-on-read the
        copy-up happens in queue.wait(), before the read comes out.  Errors found at once raise
        as pread()'s."""
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef aread_t *r = <aread_t *>calloc(1, sizeof(aread_t))
        cdef uint64_t count = 0
        cdef int rc
        if r == NULL:
            raise MemoryError()
        try:
            PyObject_GetBuffer(buf, &r.view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        except BaseException:
            free(r)
            raise
        try:
            self.enter()
        except BaseException:
            PyBuffer_Release(&r.view)
            free(r)
            raise
        # Everything the completion needs is in r before the read starts: it may finish, and
        # another thread collect it from the queue, before this call returns.
        r.queue = &queue.q
        r.token = <PyObject *>token
        r.engine = <PyObject *>self
        r.queue_obj = <PyObject *>queue
        Py_INCREF(token)
        Py_INCREF(self)
        Py_INCREF(queue)
        rc = -EINVAL
        try:
            count = r.view.len
            self.check_range("pread", count, offset_u)
            with nogil:
                pthread_mutex_lock(&queue.q.m)
                queue.q.pending += 1
                pthread_mutex_unlock(&queue.q.m)
                rc = self.c_pread_start(<uint8_t *>r.view.buf, r.view.len, offset_u, r)
                if rc != 1:
                    pthread_mutex_lock(&queue.q.m)
                    queue.q.pending -= 1
                    pthread_mutex_unlock(&queue.q.m)
        finally:
            if rc != 1:
                aread_free(r)
        if rc == 1:
            return False
        if rc < 0:
            raise_errno(-rc, "pread", count, offset_u)
        return True if rc == 0 else None

    def pwrite(self, buf, offset, bint fua=False):
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self.enter()
            try:
                self.check_writable("pwrite")
                self.check_range("pwrite", view.len, offset_u)
                with nogil:
                    r = self.c_pwrite(<const uint8_t *>view.buf, view.len, offset_u)
                    if r == 0 and fua:
                        r = overlay_flush(&self.ov, &self.bm)
            finally:
                self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "pwrite", view.len, offset_u)

    def pwrite_from(self, int sock, count, offset, prefix=b"", bint fua=False, timeout=None):
        """Write count bytes at offset: the payload of a WRITE, whose first len(prefix) bytes
        are prefix and the rest still to be received from the socket sock.  The payload is
        received whole before anything is written (with splice into pipes, or into memory where
        pipes cannot hold it or the process's pipe budget is spent), then moved into the overlay
        with splice where whole blocks or allocated blocks are written, and read out into memory
        where a block is read, modified and written.

        The payload is always consumed, whatever the outcome.  EOFError: the stream ended or
        failed inside it, and nothing was written (the connection cannot go on).  TimeoutError:
        nothing arrived for timeout seconds (None or 0: no limit) inside it, and nothing was
        written (the connection cannot go on either).  Otherwise errors are pwrite's (OSError,
        ValueError), raised after the payload was received and dropped.  ValueError at once,
        before any byte is received: a prefix longer than count."""
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef Py_buffer view
        cdef psrc_t *src = NULL
        cdef uint8_t *buf = NULL
        cdef int r = 0, got = 0
        cdef object refused = None
        cdef wait_t w
        memset(&w, 0, sizeof(w))
        w.sock = sock
        w.timeout_ms = timeout_ms(timeout)
        PyObject_GetBuffer(prefix, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len > count_u:
                raise ValueError(f"cow: pwrite_from: {view.len} bytes of prefix for a write of "
                                 f"{count_u}")
            try:
                self.enter()
            except BaseException:           # closed: drop the payload, then say so
                with nogil:
                    got = drain(&w, count_u - view.len)
                if got == 0:
                    raise
            else:
                try:
                    try:
                        self.check_writable("pwrite")
                        self.check_range("pwrite", count_u, offset_u)
                    except (OSError, ValueError) as e:
                        refused = e
                    if refused is not None:
                        with nogil:
                            got = drain(&w, count_u - view.len)
                    else:
                        src = <psrc_t *>calloc(1, sizeof(psrc_t))
                        if src == NULL:
                            with nogil:
                                got = drain(&w, count_u - view.len)
                            r = -ENOMEM
                        else:
                            src.mem = <const uint8_t *>view.buf
                            src.mem_left = view.len
                            with nogil:
                                r = self.c_pwrite_from(src, &w, count_u, offset_u, fua, &got)
                finally:
                    self.leave()
        finally:
            free(src)
            PyBuffer_Release(&view)
        if got == -EPIPE:
            raise EOFError(f"cow: pwrite_from: the stream ended inside a payload of {count_u} "
                           f"bytes: nothing written")
        if got == -ETIMEDOUT:
            raise TimeoutError(ETIMEDOUT, f"cow: pwrite_from: nothing received for {timeout:g} s "
                                          f"inside a payload of {count_u} bytes: nothing written")
        if got < 0:
            raise EOFError(f"cow: pwrite_from: receiving a payload of {count_u} bytes: "
                           f"{os.strerror(-got)}: nothing written")
        if refused is not None:
            raise refused
        if r < 0:
            raise_errno(-r, "pwrite", count_u, offset_u)

    def drop_idle_pipes(self):
        """Close the pipes pwrite_from keeps for the next payloads (a client went away); the
        pipes of payloads in progress are not touched."""
        with nogil:
            pipes_drain(&self.pipes)

    def serve(self, Transmission tx not None, rx, size_t start, size_t end):
        """Serve the requests of a connection in transmission, reading them from tx's socket,
        for as long as they are READ, WRITE or FLUSH that are valid and wait for no slow
        backing (see serve.pxi): one call with the GIL released.  rx is the front end's receive
        buffer, holding bytes already read in rx[start:end]; so does it on return.

        Returns (start, end, status, info), status one of SERVE_FRONT_END (the request at
        rx[start:] is the caller's to serve: its header is whole there), SERVE_STOP (tx.stop()
        was called), SERVE_EOF, SERVE_TRUNCATED (inside a WRITE payload; nothing written of
        it; info: 0 for the end of the stream, ETIMEDOUT for a payload that stopped arriving
        for the transmission's payload timeout, else the errno of the receive), SERVE_BROKEN
        (info: the errno of the send that failed) or SERVE_FAILED (info: a
        request that failed, consumed, its reply not sent: (cookie, command, flags, offset,
        count, OSError)).  Every reply of what was served has been sent."""
        cdef Py_buffer view
        cdef failure_t fail
        cdef size_t s = start, e = end
        cdef int status
        memset(&fail, 0, sizeof(fail))
        PyObject_GetBuffer(rx, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if e > <size_t>view.len or s > e or tx.arena == NULL:
                raise ValueError("cow: serve: bad receive buffer bounds, or tx not configured")
            try:
                self.enter()
            except ValueError:                  # closed: the front end says so
                return start, end, ST_FRONT_END, None
            try:
                with nogil:
                    status = serve_loop(self, tx, <uint8_t *>view.buf, view.len, &s, &e, &fail)
            finally:
                self.leave()
        finally:
            PyBuffer_Release(&view)
        info = None
        if status == ST_FAILED:
            info = (fail.cookie, fail.cmd, fail.flags, fail.offset, fail.count,
                    OSError(fail.err, f"cow: {fail.op.decode()} offset={fail.offset} "
                                      f"count={fail.count}: {os.strerror(fail.err)}"))
        elif status == ST_BROKEN or status == ST_TRUNCATED:
            info = fail.err
        return s, e, status, info

    cdef int c_pwrite_from(self, psrc_t *src, wait_t *w, uint64_t count, uint64_t offset,
                           bint fua, int *got) noexcept nogil:
        """pwrite_from's work, the GIL released: receive (*got: 0, or how receiving failed,
        and then nothing is written), write, flush for FUA.  0 or -errno of the write."""
        cdef uint8_t *buf
        cdef int r = 0
        got[0] = psrc_receive(&self.pipes, src, w, count - src.mem_left)
        if got[0] == 1:                     # too much for the pipes, or no splice: into memory
            buf = <uint8_t *>malloc(count)
            if buf == NULL:
                got[0] = drain_rest(src, w, count)
                psrc_release(&self.pipes, src)
                return -ENOMEM
            got[0] = psrc_to_memory(src, w, buf, count)
            psrc_release(&self.pipes, src)
            if got[0] == 0:
                r = self.c_pwrite(buf, count, offset)
            free(buf)
        elif got[0] == 0:
            r = self.c_pwrite(NULL, count, offset, src)
            psrc_release(&self.pipes, src)
        else:
            psrc_release(&self.pipes, src)
        if got[0] == 0 and r == 0 and fua:
            r = overlay_flush(&self.ov, &self.bm)
        return r

    def zero(self, count, offset, bint may_trim=True, bint fast=False):
        self.range_op("zero", count, offset, may_trim, fast, False)

    def trim(self, count, offset):
        self.range_op("trim", count, offset, True, False, False)

    def cache(self, count, offset):
        self.range_op("cache", count, offset, False, False, True)

    cdef range_op(self, str op, count, offset, bint may_trim, bint fast, bint cache):
        """zero, trim and cache: check the range, then one nogil engine call (cache: c_cache)."""
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef int r = 0
        self.enter()
        try:
            if not cache:
                self.check_writable(op)
            self.check_range(op, count_u, offset_u)
            if count_u == 0:
                return
            with nogil:
                if cache:
                    r = self.c_cache(count_u, offset_u)
                else:
                    r = self.c_zero(count_u, offset_u, may_trim, fast)
        finally:
            self.leave()
        if r < 0:
            raise_errno(-r, op, count_u, offset_u)

    def flush(self):
        cdef int r = 0
        self.enter()
        try:
            with nogil:
                r = overlay_flush(&self.ov, &self.bm)
        finally:
            self.leave()
        if r < 0:
            raise_errno(-r, "flush", 0, 0)

    def extents(self, count, offset, bint req_one=False):
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        return self._runs("extents", count_u, offset_u, req_one, False)

    def allocation_depth(self, count, offset, bint req_one=False):
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        return self._runs("allocation_depth", count_u, offset_u, req_one, True)

    cdef list _runs(self, str op, uint64_t count, uint64_t offset, bint req_one, bint depth):
        cdef runs_t runs
        cdef int r
        cdef size_t i
        memset(&runs, 0, sizeof(runs))
        runs.limit = MAX_RUNS
        runs.req_one = req_one
        self.enter()
        try:
            self.check_range(op, count, offset)
            if count == 0:
                return []
            with nogil:
                r = self.c_extents(&runs, count, offset, depth)
            if r < 0:
                raise_errno(-r, op, count, offset)
            return [(runs.length[i], runs.kind[i]) for i in range(runs.n)]
        finally:
            runs_free(&runs)
            self.leave()

    def needs_backing(self, count, offset, bint partial_only=False):
        """Would a request on this range read the backing?  True if a block of it is not
        allocated (partial_only: only its unaligned head or tail block counts, as for a write,
        which copies up nothing but those).  A hint for a front end whose backing is slow: such
        requests are worth handing to another thread."""
        cdef uint64_t count_u = u64(count, "count")
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef uint64_t first, end, mask = self.blksize - 1
        cdef bint r = False
        self.enter()
        try:
            self.check_range("needs_backing", count_u, offset_u)
            if count_u == 0:
                return False
            first = offset_u >> self.blkshift
            end = ((offset_u + count_u - 1) >> self.blkshift) + 1
            with nogil:
                pthread_mutex_lock(&self.bm.lock)
                if not partial_only:
                    r = self.any_not_allocated(first, end)
                else:
                    r = ((offset_u & mask) != 0 and
                         bitmap_get_blk(&self.bm, first) == BLOCK_NOT_ALLOCATED) or \
                        ((offset_u + count_u) & mask != 0 and offset_u + count_u != self.c_size
                         and bitmap_get_blk(&self.bm, end - 1) == BLOCK_NOT_ALLOCATED)
                pthread_mutex_unlock(&self.bm.lock)
        finally:
            self.leave()
        return r

    def stats(self):
        cdef struct_stat st
        cdef uint64_t used = 0, alloc, trimmed
        self.enter()
        try:
            if fstat(self.ov.fd, &st) == 0:
                used = <uint64_t>st.st_blocks * 512
            with nogil:         # copy under the lock, build Python objects after
                pthread_mutex_lock(&self.bm.lock)
                alloc = self.bm.nr_allocated
                trimmed = self.bm.nr_trimmed
                pthread_mutex_unlock(&self.bm.lock)
        finally:
            self.leave()
        return {"allocated_blocks": alloc, "trimmed_blocks": trimmed, "overlay_bytes": used,
                "block_size": self.blksize, "nr_blocks": self.bm.nrblocks,
                "data_offset": self.ov.data_offset}

    # -- block API ---------------------------------------------------------------------------

    def blk_set_size(self, new_size):
        """Size the bitmap and the overlay for new_size bytes.  Refused (EBUSY) while other calls
        are in flight, and above MAX_DISK_SIZE (the block count would overflow).  A persistent
        overlay keeps the disk size it was made for (EOPNOTSUPP)."""
        cdef uint64_t new_size_u = u64(new_size, "new_size")
        cdef uint64_t nblocks
        cdef struct_stat st
        cdef int r
        if new_size_u > <uint64_t>INT64_MAX:
            raise ValueError(f"cow: blk_set_size: size {new_size_u} is too large (at most "
                             f"2**63-1 bytes)")
        nblocks = (new_size_u + self.blksize - 1) >> self.blkshift
        self.enter()
        try:
            if self.active > 1:
                raise OSError(EBUSY, f"cow: blk_set_size: {self.active - 1} other call(s) in "
                                     f"flight; resize only while the engine is idle")
            if self.ov.persistent and self.bm.bits != NULL and new_size_u != self.c_size:
                raise OSError(EOPNOTSUPP, f"cow: blk_set_size: the overlay {self.overlay} is for "
                                          f"a disk of {self.c_size} bytes")
            with nogil:
                r = bitmap_resize(&self.bm, nblocks)
            if r < 0:
                raise MemoryError(f"cow: no memory for a bitmap of {(nblocks + 3) // 4} bytes")
            self.c_size = new_size_u
            # The overlay grows as blocks are written; a shrunk disk gives back what lies past
            # its end.
            if not self.ov.persistent and fstat(self.ov.fd, &st) == 0 and \
                    <uint64_t>st.st_size > (nblocks << self.blkshift):
                if ftruncate(self.ov.fd, <off_t>(nblocks << self.blkshift)) != 0:
                    raise OSError(errno, f"cow: cannot shrink the overlay: {os.strerror(errno)}")
        finally:
            self.leave()

    def blk_status(self, blknum):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int s
        self.enter()
        try:
            self.check_blknum(blknum_u)
            with nogil:
                s = self.get_state(blknum_u)
        finally:
            self.leave()
        return s

    cdef int check_blknum(self, uint64_t blknum) except -1:
        if blknum >= self.bm.nrblocks:
            raise ValueError(f"cow: block {blknum} is beyond the last block "
                             f"({self.bm.nrblocks} blocks)")
        return 0

    cdef int check_block_buffer(self, Py_buffer *view) except -1:
        if <uint64_t>view.len != self.blksize:
            raise ValueError(f"cow: block buffer has {view.len} bytes, expected the block size "
                             f"{self.blksize}")
        return 0

    def blk_read(self, blknum, buf):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self.enter()
            try:
                self.check_blknum(blknum_u)
                self.check_block_buffer(&view)
                with nogil:
                    r = self.c_blk_read(blknum_u, <uint8_t *>view.buf)
            finally:
                self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "blk_read", self.blksize, blknum_u << self.blkshift)

    def blk_write(self, blknum, buf):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self.enter()
            try:
                self.check_writable("blk_write")
                self.check_blknum(blknum_u)
                self.check_block_buffer(&view)
                with nogil:
                    r = self.write_blocks(blknum_u, 1, <const uint8_t *>view.buf)
            finally:
                self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "blk_write", self.blksize, blknum_u << self.blkshift)

    def blk_trim(self, blknum):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int r
        self.enter()
        try:
            self.check_writable("blk_trim")
            self.check_blknum(blknum_u)
            with nogil:
                r = self.zero_blocks(blknum_u, 1, True)
        finally:
            self.leave()
        if r < 0:
            raise_errno(-r, "blk_trim", self.blksize, blknum_u << self.blkshift)

    def blk_cache(self, blknum, int mode=CACHE_MODE_COW):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int r
        if mode not in (CACHE_MODE_READ, CACHE_MODE_COW):
            raise ValueError(f"cow: invalid cache mode {mode}: expected CACHE_MODE_READ or "
                             f"CACHE_MODE_COW")
        self.enter()
        try:
            self.check_blknum(blknum_u)
            with nogil:
                r = self.c_blk_cache(blknum_u, mode)
        finally:
            self.leave()
        if r < 0:
            raise_errno(-r, "blk_cache", self.blksize, blknum_u << self.blkshift)

    def __repr__(self):
        return (f"<cow.engine.Engine backing={self.backing!r} size={self.c_size} "
                f"block_size={self.blksize} lock_mode={self.lock_mode!r}>")


cdef uint64_t u64(object value, str what) except? 0xFFFFFFFFFFFFFFFF:
    """A byte offset, count or block number from Python: a ValueError, not an OverflowError."""
    if not isinstance(value, int) or value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"cow: invalid {what} {value!r}: expected an integer from 0 to 2**64-1")
    return value


cdef int timeout_ms(object seconds) except? -2:
    """A payload timeout from Python (seconds; None or 0: no limit) for poll: -1 for none."""
    if seconds is None or seconds == 0:
        return -1
    if not seconds > 0:
        raise ValueError(f"cow: invalid payload timeout {seconds!r}: expected seconds > 0, or None")
    return <int>max(1.0, min(seconds * 1000.0, 2147483647.0))


def pipe_budget():
    """The most pipes this process keeps open for WRITE payloads, idle ones included (two
    descriptors each): an eighth of RLIMIT_NOFILE's soft limit, at most PIPE_BUDGET_MAX.  A
    payload that finds it spent is received into memory instead."""
    return pipe_budget_c()


cdef object raise_errno(int err, str op, uint64_t count, uint64_t offset):
    """The one place a negative status becomes an exception."""
    raise OSError(err, f"cow: {op} offset={offset} count={count}: {os.strerror(err)}")


def _parse_cow_on_read(value):
    if value is None or value is False:
        return COR_OFF, None
    if value is True:
        return COR_ON, None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("false", "off", "no", "0", ""):
            return COR_OFF, None
        if v in ("true", "on", "yes", "1"):
            return COR_ON, None
        if value.startswith("/"):
            return COR_PATH, os.fsencode(value)
    raise ValueError(f"invalid cow-on-read {value!r}: expected false, true, or an absolute path "
                     f"(copy-on-read is on while that path exists)")


include "serve.pxi"
include "areads.pxi"
