# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The copy-on-write block engine.

A read-only backing (a file, a block device or an NBD export) is overlaid by a sparse, unlinked
temporary file.  A packed bitmap (2 bits a block) says where each block lives:

    BLOCK_NOT_ALLOCATED  read from the backing
    BLOCK_ALLOCATED      read from the overlay
    BLOCK_TRIMMED        reads as zeroes (its overlay space has been punched out)

Locking (no global lock on any path in the default "fine" mode):

* `self.lock` guards the bitmap and the block counters.  It is taken only with the GIL released and
  held only for bitmap access, never across I/O.
* A table of striped mutexes, keyed by block number, serializes whatever changes one block's overlay
  contents from a state other than allocated: the read-modify-write of a partial write, a copy-up by
  cow-on-read / cow-on-cache, trim and zero.  Several stripes are always taken in ascending order.
  Writes into blocks that are already allocated take no stripe at all.
* lock_mode="global" instead holds one mutex around every block operation, I/O included, as nbdkit's
  filter did before "cow: Use more fine-grained locking" (kept for the benchmark).

Every core function is `noexcept nogil` and returns 0 or -errno; the Python wrappers check arguments
with the GIL held, release it for the whole call (backing reads included) and raise on error.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.errno cimport errno, EIO, ENOSPC, ENOMEM, EINVAL, ENXIO, EOPNOTSUPP, EISDIR, EINTR
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memcpy, strerror
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, UINT64_MAX
from posix.types cimport off_t
from posix.unistd cimport usleep

import os

cdef extern from *:
    """
    static inline unsigned int cow_atomic_next(unsigned int *p) {
        return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
    }
    """
    unsigned int cow_atomic_next(unsigned int *p) noexcept nogil


cdef enum:
    C_DEPTH_OVERLAY = 1
    C_DEPTH_BACKING = 2
    C_CACHE_MODE_READ = 0
    C_CACHE_MODE_COW = 1

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
# Larger blocks make every copy-up cost more than it saves; nbdkit accepts up to 4 GiB but 1 GiB is
# already absurd for a COW granule.
MAX_BLOCK_SIZE = 1 << 30

cdef enum:
    NR_STRIPES = 1024
    MAX_RUNS = 65536            # extents: stop after this many runs (the client asks again)
    NBD_CHUNK = 32 * 1024 * 1024
    COR_OFF = 0
    COR_ON = 1
    COR_PATH = 2

cdef uint32_t T_DATA = 0
cdef uint32_t T_HOLE_ZERO = 3

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
        s = s[:-2]
    elif len(s) > 1 and s.endswith("B") and not s[:-1].isdigit():
        s = s[:-1]
    suffix = s[-1:] if s[-1:].isalpha() else ""
    digits = s[:len(s) - len(suffix)]
    if not digits.isdigit() or suffix not in _SUFFIXES:
        raise ValueError(f"invalid size {value!r}: expected a number with an optional "
                         f"K, M, G, T, P or E suffix, such as 65536 or 64K")
    return int(digits) * _SUFFIXES[suffix]


def parse_block_size(value):
    """Parse and check a COW block size: a power of two from 4K to 1G."""
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if n < MIN_BLOCK_SIZE or n > MAX_BLOCK_SIZE or n & (n - 1):
        raise ValueError(f"invalid cow block size {value!r}: it must be a power of two from 4K "
                         f"(4096) to 1G, such as 4K, 64K (the default) or 4M")
    return n


cdef int is_nbd_uri(str s):
    return s.startswith(("nbd:", "nbds:", "nbd+", "nbds+"))


# ---------------------------------------------------------------------------------------------
# Plain I/O helpers (no engine state).

cdef int pread_upto(int fd, uint8_t *buf, uint64_t count, uint64_t offset,
                    uint64_t *got) noexcept nogil:
    """Read until count bytes or end of file; *got says how many were read."""
    cdef ssize_t r
    got[0] = 0
    while count > 0:
        r = pread(fd, buf, count, <off_t>offset)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return 0
        buf += r
        count -= r
        offset += r
        got[0] += r
    return 0


cdef int full_pread(int fd, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Read exactly count bytes; an unexpected end of file is EIO."""
    cdef uint64_t got = 0
    cdef int r = pread_upto(fd, buf, count, offset, &got)
    if r == 0 and got < count:
        return -EIO
    return r


cdef int overlay_pread(int fd, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Like full_pread, for the sparse overlay: it is never sized up front (a file as large as the
    disk may exceed the file system's limit, or RLIMIT_FSIZE), so what lies past its end was never
    written and reads as zeroes."""
    cdef uint64_t got = 0
    cdef int r = pread_upto(fd, buf, count, offset, &got)
    if r == 0 and got < count:
        memset(buf + got, 0, count - got)
    return r


cdef int full_pwrite(int fd, const uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    cdef ssize_t r
    while count > 0:
        r = pwrite(fd, buf, count, <off_t>offset)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return -EIO
        buf += r
        count -= r
        offset += r
    return 0


cdef int runs_add(runs_t *runs, uint64_t length, uint32_t kind) noexcept nogil:
    """Append a run, merging it into the previous one of the same kind."""
    cdef size_t cap
    cdef void *p
    if length == 0:
        return 0
    if runs.n > 0 and runs.kind[runs.n - 1] == kind:
        runs.length[runs.n - 1] += length
        return 0
    if runs.n == runs.cap:
        cap = runs.cap * 2 if runs.cap else 16
        p = realloc(runs.length, cap * sizeof(uint64_t))
        if p == NULL:
            return -ENOMEM
        runs.length = <uint64_t *>p
        p = realloc(runs.kind, cap * sizeof(uint32_t))
        if p == NULL:
            return -ENOMEM
        runs.kind = <uint32_t *>p
        runs.cap = cap
    runs.length[runs.n] = length
    runs.kind[runs.n] = kind
    runs.n += 1
    return 0


cdef inline bint runs_full(runs_t *runs) noexcept nogil:
    return runs.n >= runs.limit or (runs.req_one and runs.n >= 1)


cdef void runs_free(runs_t *runs) noexcept nogil:
    free(runs.length)
    free(runs.kind)
    runs.length = NULL
    runs.kind = NULL
    runs.n = runs.cap = 0


# ---------------------------------------------------------------------------------------------
# The backing: reads, extents and cache hints, from a file or over NBD.

cdef nbd_handle *backing_get_handle(backing_t *b, int *index) noexcept nogil:
    """Take a free libnbd handle (one request at a time on each), waiting for one if all are busy."""
    cdef int start = cow_atomic_next(&b.next_handle) % b.nr_handles
    cdef int i, k
    for k in range(b.nr_handles):
        i = (start + k) % b.nr_handles
        if pthread_mutex_trylock(&b.handle_locks[i]) == 0:
            index[0] = i
            return b.handles[i]
    pthread_mutex_lock(&b.handle_locks[start])
    index[0] = start
    return b.handles[start]


cdef inline void backing_put_handle(backing_t *b, int index) noexcept nogil:
    pthread_mutex_unlock(&b.handle_locks[index])


cdef int nbd_error() noexcept nogil:
    """A failed backing request is the backing's fault: EIO to the client, whatever libnbd's errno
    says about its own state (a dead connection gives ENOTCONN, then EINVAL for "invalid state")."""
    cdef int e = nbd_get_errno()
    return -(ENOMEM if e == ENOMEM else EIO)


cdef int backing_read(backing_t *b, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Read count bytes at offset; bytes past the end of the backing read as zeroes."""
    cdef uint64_t n = 0
    if offset < b.size:
        n = b.size - offset
        if n > count:
            n = count
    if n < count:
        memset(buf + n, 0, count - n)
    if n == 0:
        return 0
    if b.fd >= 0:
        return full_pread(b.fd, buf, n, offset)
    if (offset | n) & (b.min_block - 1):
        return backing_read_aligned(b, buf, n, offset)
    return backing_nbd_pread(b, buf, n, offset)


cdef int backing_nbd_pread(backing_t *b, uint8_t *buf, uint64_t n, uint64_t offset) noexcept nogil:
    cdef uint64_t chunk
    cdef int r = 0, idx
    cdef nbd_handle *h = backing_get_handle(b, &idx)
    while n > 0:
        chunk = n if n < b.max_request else b.max_request
        if nbd_pread(h, buf, chunk, offset, 0) == -1:
            r = nbd_error()
            break
        buf += chunk
        offset += chunk
        n -= chunk
    backing_put_handle(b, idx)
    return r


cdef int backing_read_aligned(backing_t *b, uint8_t *buf, uint64_t count,
                              uint64_t offset) noexcept nogil:
    """An NBD server with a minimum block size refuses unaligned requests: read the aligned range
    around [offset, offset+count) (count > 0, inside the backing) into a bounce buffer."""
    cdef uint64_t mask = b.min_block - 1
    cdef uint64_t start = offset & ~mask
    cdef uint64_t end = (offset + count + mask) & ~mask
    cdef uint8_t *bounce
    cdef int r
    if end > b.size:
        end = b.size    # a size that is not a multiple of the minimum: the last piece is short
    bounce = <uint8_t *>malloc(end - start)
    if bounce == NULL:
        return -ENOMEM
    r = backing_nbd_pread(b, bounce, end - start, start)
    if r == 0:
        memcpy(buf, bounce + (offset - start), count)
    free(bounce)
    return r


cdef struct nbd_extents_ctx:
    runs_t *runs
    uint64_t pos        # next byte not yet described
    uint64_t end


cdef int nbd_extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                       uint32_t *entries, size_t nr_entries, int *error) noexcept nogil:
    cdef nbd_extents_ctx *ctx = <nbd_extents_ctx *>user_data
    cdef size_t i
    cdef uint64_t start = offset, length, lo, hi
    cdef const char *want = b"base:allocation"
    cdef size_t k = 0
    while want[k] != 0 and metacontext[k] == want[k]:
        k += 1
    if want[k] != 0 or metacontext[k] != 0:
        return 0
    for i in range(0, nr_entries - nr_entries % 2, 2):
        length = entries[i]
        lo = start if start > ctx.pos else ctx.pos
        hi = start + length
        if hi > ctx.end:
            hi = ctx.end
        if hi > lo and not runs_full(ctx.runs):
            if runs_add(ctx.runs, hi - lo, entries[i + 1] & 3) < 0:
                error[0] = ENOMEM
                return -1
            ctx.pos = hi
        start += length
    return 0


cdef int backing_extents(backing_t *b, runs_t *runs, uint64_t offset, uint64_t count) noexcept nogil:
    """Describe [offset, offset+count) of the backing: its holes pass through as hole|zero."""
    cdef uint64_t end = offset + count
    cdef uint64_t pos = offset, data, hole, ask, start
    cdef off_t r
    cdef int idx, rc
    cdef nbd_handle *h
    cdef nbd_extents_ctx ctx
    cdef nbd_extent_callback cb
    if end > b.size:        # past the backing's end (a grown disk): zeroes
        if offset >= b.size:
            return runs_add(runs, count, T_HOLE_ZERO)
        rc = backing_extents(b, runs, offset, b.size - offset)
        if rc < 0 or runs_full(runs):
            return rc
        return runs_add(runs, end - b.size, T_HOLE_ZERO)
    if b.fd >= 0:
        while pos < end and not runs_full(runs):
            r = lseek(b.fd, <off_t>pos, SEEK_DATA)
            if r < 0:
                if errno == ENXIO:      # no data from here to the end of the file
                    return runs_add(runs, end - pos, T_HOLE_ZERO)
                return runs_add(runs, end - pos, T_DATA)   # no SEEK_DATA here: all data
            data = <uint64_t>r
            if data > pos:
                rc = runs_add(runs, (data if data < end else end) - pos, T_HOLE_ZERO)
                if rc < 0:
                    return rc
                pos = data
                continue
            r = lseek(b.fd, <off_t>pos, SEEK_HOLE)
            hole = end if r < 0 else <uint64_t>r
            if hole > end:
                hole = end
            if hole <= pos:
                hole = end
            rc = runs_add(runs, hole - pos, T_DATA)
            if rc < 0:
                return rc
            pos = hole
        return 0
    if not b.base_allocation:
        return runs_add(runs, count, T_DATA)
    while pos < end and not runs_full(runs):
        ctx.runs = runs
        ctx.pos = pos
        ctx.end = end
        cb.callback = nbd_extent_cb
        cb.user_data = &ctx
        cb.free = NULL
        ask = end - pos
        if ask > <uint64_t>0x80000000:
            ask = <uint64_t>0x80000000
        start = pos & ~(b.min_block - 1)       # the server may insist on aligned requests
        ask = ((pos + ask + b.min_block - 1) & ~(b.min_block - 1)) - start
        if start + ask > b.size:
            ask = b.size - start
        h = backing_get_handle(b, &idx)
        rc = nbd_block_status(h, ask, start, cb, LIBNBD_CMD_FLAG_REQ_ONE if runs.req_one else 0)
        if rc == -1:
            rc = nbd_error()
        backing_put_handle(b, idx)
        if rc < 0:
            return rc
        if ctx.pos <= pos:      # the server said nothing usable: call it data
            return runs_add(runs, end - pos, T_DATA)
        pos = ctx.pos
    return 0


cdef void backing_cache(backing_t *b, uint64_t count, uint64_t offset) noexcept nogil:
    """A hint that the range will be read soon; errors are ignored (it is only advice)."""
    cdef int idx
    cdef nbd_handle *h
    if offset >= b.size:
        return
    if count > b.size - offset:
        count = b.size - offset
    if b.fd >= 0:
        posix_fadvise(b.fd, <off_t>offset, <off_t>count, POSIX_FADV_WILLNEED)
    elif b.can_cache:
        h = backing_get_handle(b, &idx)
        nbd_cache(h, count if count < b.max_request else b.max_request, offset, 0)
        backing_put_handle(b, idx)


# ---------------------------------------------------------------------------------------------

cdef class Engine:
    """A copy-on-write view of a read-only backing (see cow/engine.pyi for the API)."""

    cdef pthread_mutex_t lock           # the bitmap and the counters below
    cdef pthread_mutex_t global_lock    # lock_mode="global" only
    cdef pthread_mutex_t *stripes       # per-block serialization, NR_STRIPES of them
    cdef bint locks_ready
    cdef bint global_mode

    cdef uint8_t *bitmap
    cdef uint64_t bitmap_len
    cdef uint64_t c_size
    cdef uint64_t nrblocks
    cdef uint32_t blksize
    cdef uint32_t blkshift
    cdef uint64_t nr_allocated
    cdef uint64_t nr_trimmed
    cdef uint64_t nr_reserved
    cdef uint64_t max_blocks            # overlay_max_size in blocks (UINT64_MAX: no cap)

    cdef int fd                         # the overlay
    cdef backing_t b
    cdef uint8_t *zero_block            # blksize zero bytes, never written

    cdef int cor_mode                   # COR_OFF / COR_ON / COR_PATH
    cdef bytes cor_path
    cdef const char *cor_path_c
    cdef bint c_cow_on_cache
    cdef bint installs                  # can a copy-up (cow-on-read/cache) happen at all?

    cdef int active                     # calls in progress (changed with the GIL held)
    cdef bint closing

    cdef readonly str backing
    cdef readonly bint backing_is_nbd
    cdef readonly str lock_mode
    cdef readonly object cow_on_read
    cdef readonly bint cow_on_cache

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.b.fd = -1
        self.b.handles = NULL
        self.b.handle_locks = NULL
        self.b.nr_handles = 0
        self.b.min_block = 1
        self.bitmap = NULL
        self.stripes = NULL
        self.zero_block = NULL
        self.locks_ready = False
        self.max_blocks = UINT64_MAX

    def __init__(self, backing, *, block_size=DEFAULT_BLOCK_SIZE, cow_on_read=False,
                 bint cow_on_cache=False, str lock_mode="fine", tmpdir=None,
                 overlay_max_size=None, int nbd_connections=4):
        cdef int i
        if self.locks_ready:
            raise RuntimeError("Engine is already initialised")
        self.blksize = parse_block_size(block_size)
        self.blkshift = (self.blksize - 1).bit_length()
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
        self.installs = self.cor_mode != COR_OFF or cow_on_cache
        if nbd_connections < 1 or nbd_connections > 64:
            raise ValueError(f"invalid nbd_connections {nbd_connections}: expected 1 to 64")
        if overlay_max_size is not None:
            cap = parse_size(overlay_max_size)
            if cap < self.blksize:
                raise ValueError(f"overlay_max_size {overlay_max_size!r} is smaller than one "
                                 f"block ({self.blksize} bytes)")
            self.max_blocks = cap // self.blksize

        self.stripes = <pthread_mutex_t *>calloc(NR_STRIPES, sizeof(pthread_mutex_t))
        self.zero_block = <uint8_t *>calloc(1, self.blksize)
        if self.stripes == NULL or self.zero_block == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.lock, NULL)
        pthread_mutex_init(&self.global_lock, NULL)
        for i in range(NR_STRIPES):
            pthread_mutex_init(&self.stripes[i], NULL)
        self.locks_ready = True

        backing = os.fsdecode(backing)
        self.backing = backing
        self.backing_is_nbd = is_nbd_uri(backing)
        if self.backing_is_nbd:
            self._open_nbd(backing, nbd_connections)
        else:
            self._open_file(backing)
        self._open_overlay(tmpdir)
        self.blk_set_size(self.b.size)

    # -- set-up -----------------------------------------------------------------------------

    def _open_file(self, str path):
        cdef struct_stat st
        cdef uint64_t size = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"cow: cannot open backing {path}: {os.strerror(e.errno)}") \
                from None
        self.b.fd = fd
        if fstat(fd, &st) != 0:
            raise OSError(errno, f"cow: fstat {path}: {os.strerror(errno)}")
        if S_ISBLK(st.st_mode):
            if ioctl(fd, BLKGETSIZE64, &size) != 0:
                raise OSError(errno, f"cow: size of block device {path}: {os.strerror(errno)}")
            self.b.size = size
        elif S_ISREG(st.st_mode):
            self.b.size = st.st_size
        else:
            raise ValueError(f"cow: backing {path!r} is not a regular file or block device")
        self.b.max_request = UINT64_MAX
        self.b.min_block = 1

    def _open_nbd(self, str uri, int nconn):
        cdef nbd_handle *h
        cdef int64_t size, maxreq, minblk
        cdef bytes buri = uri.encode()
        cdef const char *curi = buri
        cdef int rc, i
        self.b.handles = <nbd_handle **>calloc(nconn, sizeof(nbd_handle *))
        self.b.handle_locks = <pthread_mutex_t *>calloc(nconn, sizeof(pthread_mutex_t))
        if self.b.handles == NULL or self.b.handle_locks == NULL:
            raise MemoryError()
        for i in range(nconn):
            h = nbd_create()
            if h == NULL:
                raise OSError(nbd_get_errno() or EIO, f"cow: libnbd: {_nbd_message()}")
            self.b.handles[i] = h
            pthread_mutex_init(&self.b.handle_locks[i], NULL)
            self.b.nr_handles = i + 1
            nbd_set_handle_name(h, b"cow-backing")
            nbd_add_meta_context(h, b"base:allocation")
            with nogil:
                rc = nbd_connect_uri(h, curi)
            if rc == -1:
                if i == 0:
                    raise OSError(nbd_get_errno() or EIO,
                                  f"cow: cannot connect to backing {uri}: {_nbd_message()}")
                # A server that takes fewer connections still serves us through the ones we have.
                nbd_close(h)
                self.b.handles[i] = NULL
                self.b.nr_handles = i
                break
            if i == 0:
                size = nbd_get_size(h)
                if size < 0:
                    raise OSError(nbd_get_errno() or EIO,
                                  f"cow: size of backing {uri}: {_nbd_message()}")
                self.b.size = size
                self.b.base_allocation = nbd_can_meta_context(h, b"base:allocation") == 1
                self.b.can_cache = nbd_can_cache(h) == 1
                minblk = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM)
                self.b.min_block = minblk if minblk > 1 and (minblk & (minblk - 1)) == 0 else 1
                maxreq = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM)
                self.b.max_request = maxreq if 0 < maxreq < NBD_CHUNK else NBD_CHUNK
                # Extra connections only where the server says they see the same data.
                if nbd_can_multi_conn(h) != 1:
                    break

    def _open_overlay(self, tmpdir):
        if tmpdir is None:
            tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
        try:
            fd = os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC | os.O_EXCL, 0o600)
        except OSError as e:
            if e.errno not in (EOPNOTSUPP, EISDIR, EINVAL):
                raise OSError(e.errno, f"cow: cannot create the overlay in {tmpdir}: "
                                       f"{os.strerror(e.errno)}") from None
            import tempfile
            fd, name = tempfile.mkstemp(prefix="cow-overlay-", dir=tmpdir)
            os.unlink(name)
            os.set_inheritable(fd, False)
        self.fd = fd

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        cdef int i
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.b.fd >= 0:
            close(self.b.fd)
            self.b.fd = -1
        if self.b.handles != NULL:
            for i in range(self.b.nr_handles):
                if self.b.handles[i] != NULL:
                    nbd_shutdown(self.b.handles[i], 0)
                    nbd_close(self.b.handles[i])
                    pthread_mutex_destroy(&self.b.handle_locks[i])
            free(self.b.handles)
            free(self.b.handle_locks)
            self.b.handles = NULL
            self.b.handle_locks = NULL
            self.b.nr_handles = 0
        free(self.bitmap)
        self.bitmap = NULL
        free(self.zero_block)
        self.zero_block = NULL
        if self.locks_ready:
            for i in range(NR_STRIPES):
                pthread_mutex_destroy(&self.stripes[i])
            pthread_mutex_destroy(&self.lock)
            pthread_mutex_destroy(&self.global_lock)
            self.locks_ready = False
        free(self.stripes)
        self.stripes = NULL

    def close(self):
        """Close the overlay and the backing; waits for calls still running in other threads."""
        if self.closing:
            return
        self.closing = True
        while self.active:
            with nogil:
                usleep(1000)
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- bitmap (caller holds self.lock) -----------------------------------------------------

    cdef inline int bitmap_get_blk(self, uint64_t blknum) noexcept nogil:
        return (self.bitmap[blknum >> 2] >> ((blknum & 3) * 2)) & 3

    cdef inline void bitmap_set_blk(self, uint64_t blknum, int state) noexcept nogil:
        cdef int old = self.bitmap_get_blk(blknum)
        cdef uint8_t shift = (blknum & 3) * 2
        if old == state:
            return
        if old == BLOCK_ALLOCATED:
            self.nr_allocated -= 1
        elif old == BLOCK_TRIMMED:
            self.nr_trimmed -= 1
        if state == BLOCK_ALLOCATED:
            self.nr_allocated += 1
        elif state == BLOCK_TRIMMED:
            self.nr_trimmed += 1
        self.bitmap[blknum >> 2] = (self.bitmap[blknum >> 2] & ~(3 << shift)) | (state << shift)

    cdef uint64_t bitmap_run_end(self, uint64_t blknum, uint64_t limit) noexcept nogil:
        """First block in (blknum, limit) whose state differs from blknum's, else limit."""
        cdef int state = self.bitmap_get_blk(blknum)
        cdef uint8_t byte_pattern = <uint8_t>(state * 0x55)
        cdef uint64_t word_pattern = byte_pattern * <uint64_t>0x0101010101010101
        cdef uint64_t b = blknum + 1
        cdef uint64_t word
        while b < limit:
            if (b & 31) == 0 and b + 32 <= limit:
                memcpy(&word, &self.bitmap[b >> 2], 8)
                if word == word_pattern:
                    b += 32
                    continue
            if (b & 3) == 0 and b + 4 <= limit:
                if self.bitmap[b >> 2] == byte_pattern:
                    b += 4
                    continue
            if self.bitmap_get_blk(b) != state:
                return b
            b += 1
        return limit

    cdef inline int get_state(self, uint64_t blknum) noexcept nogil:
        cdef int s
        pthread_mutex_lock(&self.lock)
        s = self.bitmap_get_blk(blknum)
        pthread_mutex_unlock(&self.lock)
        return s

    cdef int reserve(self, uint64_t nblocks) noexcept nogil:
        """Claim overlay room for nblocks blocks about to become allocated (caller holds lock)."""
        if self.max_blocks == UINT64_MAX:
            return 0
        if self.nr_allocated + self.nr_reserved + nblocks > self.max_blocks:
            return -ENOSPC
        self.nr_reserved += nblocks
        return 0

    cdef inline void unreserve(self, uint64_t nblocks) noexcept nogil:
        if self.max_blocks != UINT64_MAX:
            self.nr_reserved -= nblocks

    # -- stripes -----------------------------------------------------------------------------

    cdef void stripes_lock(self, uint64_t first, uint64_t nblocks) noexcept nogil:
        """Lock the stripes of blocks [first, first+nblocks), always in ascending order."""
        cdef uint64_t a, z, i
        if self.global_mode:
            pthread_mutex_lock(&self.global_lock)
            return
        if nblocks >= NR_STRIPES:
            for i in range(NR_STRIPES):
                pthread_mutex_lock(&self.stripes[i])
            return
        a = first % NR_STRIPES
        z = (first + nblocks - 1) % NR_STRIPES
        if a <= z:
            for i in range(a, z + 1):
                pthread_mutex_lock(&self.stripes[i])
        else:
            for i in range(0, z + 1):
                pthread_mutex_lock(&self.stripes[i])
            for i in range(a, NR_STRIPES):
                pthread_mutex_lock(&self.stripes[i])

    cdef void stripes_unlock(self, uint64_t first, uint64_t nblocks) noexcept nogil:
        cdef uint64_t i
        if self.global_mode:
            pthread_mutex_unlock(&self.global_lock)
            return
        if nblocks >= NR_STRIPES:
            for i in range(NR_STRIPES):
                pthread_mutex_unlock(&self.stripes[i])
            return
        for i in range(nblocks):
            pthread_mutex_unlock(&self.stripes[(first + i) % NR_STRIPES])

    # -- block core --------------------------------------------------------------------------

    cdef inline uint64_t blk_bytes(self, uint64_t blknum) noexcept nogil:
        """Bytes of block blknum inside the disk (less than blksize only for the last block)."""
        cdef uint64_t start = blknum << self.blkshift
        cdef uint64_t n = self.c_size - start
        return n if n < self.blksize else self.blksize

    cdef bint cow_on_read_active(self) noexcept nogil:
        if self.cor_mode == COR_ON:
            return True
        if self.cor_mode == COR_PATH:
            return access(self.cor_path_c, F_OK) == 0
        return False

    cdef int install(self, uint64_t blknum, const uint8_t *block) noexcept nogil:
        """Copy backing data up into a block, but only if it is still not allocated: a write or
        trim that completed meanwhile must win.  Failing to install is not an error (the data
        read is right either way), so this returns 0 unless the bitmap says otherwise."""
        cdef int state, r
        self.stripes_lock(blknum, 1)
        pthread_mutex_lock(&self.lock)
        state = self.bitmap_get_blk(blknum)
        r = self.reserve(1) if state == BLOCK_NOT_ALLOCATED else -1
        pthread_mutex_unlock(&self.lock)
        if r == 0:
            r = full_pwrite(self.fd, block, self.blk_bytes(blknum), blknum << self.blkshift)
            pthread_mutex_lock(&self.lock)
            if r == 0:
                self.bitmap_set_blk(blknum, BLOCK_ALLOCATED)
            self.unreserve(1)
            pthread_mutex_unlock(&self.lock)
        self.stripes_unlock(blknum, 1)
        return 0

    cdef int c_blk_read(self, uint64_t blknum, uint8_t *block) noexcept nogil:
        """Read one whole block (blksize bytes; past the end of the disk: zeroes)."""
        cdef int state = self.get_state(blknum)
        cdef uint64_t n = self.blk_bytes(blknum)
        cdef int r = 0
        if self.global_mode:
            pthread_mutex_lock(&self.global_lock)
            state = self.get_state(blknum)
        if state == BLOCK_ALLOCATED:
            r = overlay_pread(self.fd, block, n, blknum << self.blkshift)
            if n < self.blksize:
                memset(block + n, 0, self.blksize - n)
        elif state == BLOCK_TRIMMED:
            memset(block, 0, self.blksize)
        else:
            r = backing_read(&self.b, block, self.blksize, blknum << self.blkshift)
        if self.global_mode:
            pthread_mutex_unlock(&self.global_lock)
        if r == 0 and state == BLOCK_NOT_ALLOCATED and self.cow_on_read_active():
            self.install(blknum, block)
        return r

    cdef int c_blk_cache(self, uint64_t blknum, int mode) noexcept nogil:
        cdef uint8_t *block
        cdef int r
        if self.get_state(blknum) != BLOCK_NOT_ALLOCATED:
            return 0
        if mode != C_CACHE_MODE_COW:
            backing_cache(&self.b, self.blksize, blknum << self.blkshift)
            return 0
        block = <uint8_t *>malloc(self.blksize)
        if block == NULL:
            return -ENOMEM
        r = backing_read(&self.b, block, self.blksize, blknum << self.blkshift)
        if r == 0:
            self.install(blknum, block)
        free(block)
        return r

    cdef int write_blocks(self, uint64_t first, uint64_t nblocks, const uint8_t *buf) noexcept nogil:
        """Write whole blocks (the last may end at the end of the disk) with one pwrite."""
        cdef uint64_t i, fresh = 0, offset = first << self.blkshift
        cdef uint64_t count = (nblocks - 1) * <uint64_t>self.blksize + self.blk_bytes(first + nblocks - 1)
        cdef int r
        cdef bint all_allocated
        if not self.global_mode:
            pthread_mutex_lock(&self.lock)
            all_allocated = self.bitmap_run_end(first, first + nblocks) == first + nblocks \
                and self.bitmap_get_blk(first) == BLOCK_ALLOCATED
            pthread_mutex_unlock(&self.lock)
            if all_allocated:     # nothing can copy up over these: no stripe needed
                return full_pwrite(self.fd, buf, count, offset)
        self.stripes_lock(first, nblocks)
        pthread_mutex_lock(&self.lock)
        for i in range(first, first + nblocks):
            if self.bitmap_get_blk(i) != BLOCK_ALLOCATED:
                fresh += 1
        r = self.reserve(fresh)
        pthread_mutex_unlock(&self.lock)
        if r == 0:
            r = full_pwrite(self.fd, buf, count, offset)
            pthread_mutex_lock(&self.lock)
            if r == 0:     # data first, then the bitmap
                for i in range(first, first + nblocks):
                    self.bitmap_set_blk(i, BLOCK_ALLOCATED)
            self.unreserve(fresh)
            pthread_mutex_unlock(&self.lock)
        self.stripes_unlock(first, nblocks)
        return r

    cdef int write_partial(self, uint64_t blknum, uint64_t blkoffs, uint64_t n,
                           const uint8_t *src) noexcept nogil:
        """Write n bytes at blkoffs inside one block (src NULL: zeroes).  An allocated block is
        written in place; otherwise the block is built (from the backing, or zeroes if trimmed),
        merged and written whole, under the block's stripe."""
        cdef uint64_t offset = (blknum << self.blkshift) + blkoffs
        cdef const uint8_t *data = src if src != NULL else self.zero_block
        cdef uint8_t *block
        cdef int state, r
        if not self.global_mode and self.get_state(blknum) == BLOCK_ALLOCATED:
            return full_pwrite(self.fd, data, n, offset)
        self.stripes_lock(blknum, 1)
        state = self.get_state(blknum)       # again, now that the block is ours
        if state == BLOCK_ALLOCATED:
            r = full_pwrite(self.fd, data, n, offset)
        elif state == BLOCK_TRIMMED and src == NULL:
            r = 0                            # zeroing what already reads as zeroes
        else:
            block = <uint8_t *>malloc(self.blksize)
            if block == NULL:
                r = -ENOMEM
            else:
                if state == BLOCK_TRIMMED:
                    memset(block, 0, self.blksize)
                    r = 0
                else:
                    r = backing_read(&self.b, block, self.blksize, blknum << self.blkshift)
                if r == 0:
                    memcpy(block + blkoffs, data, n)
                    pthread_mutex_lock(&self.lock)
                    r = self.reserve(1)
                    pthread_mutex_unlock(&self.lock)
                if r == 0:
                    r = full_pwrite(self.fd, block, self.blk_bytes(blknum), blknum << self.blkshift)
                    pthread_mutex_lock(&self.lock)
                    if r == 0:
                        self.bitmap_set_blk(blknum, BLOCK_ALLOCATED)
                    self.unreserve(1)
                    pthread_mutex_unlock(&self.lock)
                free(block)
        self.stripes_unlock(blknum, 1)
        return r

    cdef int zero_blocks(self, uint64_t first, uint64_t nblocks, bint may_trim) noexcept nogil:
        """Whole blocks read as zeroes: trimmed (space given back), or, if the client wants them
        kept allocated, allocated with their overlay space punched (which also reads as zeroes)."""
        cdef uint64_t i, fresh = 0, punched = 0
        cdef uint64_t offset = first << self.blkshift, count = nblocks << self.blkshift
        cdef int r = 0
        self.stripes_lock(first, nblocks)
        pthread_mutex_lock(&self.lock)
        for i in range(first, first + nblocks):
            if self.bitmap_get_blk(i) == BLOCK_ALLOCATED:
                punched += 1
            else:
                fresh += 1
            if may_trim:
                self.bitmap_set_blk(i, BLOCK_TRIMMED)
        if not may_trim:
            r = self.reserve(fresh)
        pthread_mutex_unlock(&self.lock)
        if r == 0 and (punched or not may_trim):
            if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) != 0:
                if may_trim:
                    r = 0       # trimmed blocks read as zeroes whatever the overlay holds
                else:
                    r = self.write_zeroes(offset, count)
            if not may_trim:
                pthread_mutex_lock(&self.lock)
                if r == 0:
                    for i in range(first, first + nblocks):
                        self.bitmap_set_blk(i, BLOCK_ALLOCATED)
                self.unreserve(fresh)
                pthread_mutex_unlock(&self.lock)
        self.stripes_unlock(first, nblocks)
        return r

    cdef int write_zeroes(self, uint64_t offset, uint64_t count) noexcept nogil:
        cdef uint64_t n
        cdef int r
        while count > 0:
            n = count if count < self.blksize else self.blksize
            r = full_pwrite(self.fd, self.zero_block, n, offset)
            if r < 0:
                return r
            offset += n
            count -= n
        return 0

    # -- byte ranges -------------------------------------------------------------------------
    #
    # One helper splits a byte range into pieces: a partial block (the unaligned head or tail)
    # or a run of whole blocks.  The last block of a disk whose size is not a multiple of the
    # block size counts as whole when the piece reaches the end of the disk.

    cdef inline void next_piece(self, uint64_t offset, uint64_t count, uint64_t *blknum,
                                uint64_t *blkoffs, uint64_t *n, uint64_t *nblocks) noexcept nogil:
        cdef uint64_t end = offset + count
        cdef uint64_t mask = self.blksize - 1
        cdef uint64_t full_end
        blknum[0] = offset >> self.blkshift
        blkoffs[0] = offset & mask
        if blkoffs[0] == 0:
            full_end = end & ~mask
            if end == self.c_size:
                full_end = end
            if full_end > offset:
                nblocks[0] = ((full_end - offset) + mask) >> self.blkshift
                n[0] = full_end - offset
                return
        nblocks[0] = 0
        n[0] = self.blksize - blkoffs[0]
        if n[0] > count:
            n[0] = count

    cdef int c_pread(self, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
        cdef uint64_t end = offset + count, blknum, run_end, n, off_in, limit
        cdef int state, r = 0
        cdef bint cor
        cdef uint8_t *block = NULL
        while count > 0:
            blknum = offset >> self.blkshift
            limit = ((end - 1) >> self.blkshift) + 1
            if self.global_mode:
                limit = blknum + 1          # the seed's "before": one block at a time
                pthread_mutex_lock(&self.global_lock)
            pthread_mutex_lock(&self.lock)
            state = self.bitmap_get_blk(blknum)
            run_end = self.bitmap_run_end(blknum, limit) << self.blkshift
            pthread_mutex_unlock(&self.lock)
            n = (run_end if run_end < end else end) - offset
            cor = False
            if state == BLOCK_ALLOCATED:
                r = overlay_pread(self.fd, buf, n, offset)
            elif state == BLOCK_TRIMMED:
                memset(buf, 0, n)
            else:
                r = backing_read(&self.b, buf, n, offset)
                cor = r == 0 and self.cow_on_read_active()
            if self.global_mode:
                pthread_mutex_unlock(&self.global_lock)
            if r < 0:
                break
            if cor:
                # Copy every block this run touched up into the overlay (whole blocks).
                off_in = offset
                while off_in < offset + n:
                    blknum = off_in >> self.blkshift
                    if (off_in & (self.blksize - 1)) == 0 and \
                            off_in + self.blk_bytes(blknum) <= offset + n:
                        self.install(blknum, buf + (off_in - offset))
                    else:
                        if block == NULL:
                            block = <uint8_t *>malloc(self.blksize)
                            if block == NULL:
                                r = -ENOMEM
                                break
                        r = backing_read(&self.b, block, self.blksize, blknum << self.blkshift)
                        if r < 0:
                            break
                        self.install(blknum, block)
                    off_in = (blknum + 1) << self.blkshift
                if r < 0:
                    break
            buf += n
            offset += n
            count -= n
        free(block)
        return r

    cdef int c_pwrite(self, const uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
        cdef uint64_t blknum, blkoffs, n, nblocks
        cdef int r = 0
        while count > 0 and r == 0:
            self.next_piece(offset, count, &blknum, &blkoffs, &n, &nblocks)
            if nblocks == 0:
                r = self.write_partial(blknum, blkoffs, n, buf)
            elif self.global_mode:
                n = self.blk_bytes(blknum)     # one block at a time under the global lock
                r = self.write_blocks(blknum, 1, buf)
            else:
                r = self.write_blocks(blknum, nblocks, buf)
            buf += n
            offset += n
            count -= n
        return r

    cdef int c_zero(self, uint64_t count, uint64_t offset, bint may_trim, bint fast) noexcept nogil:
        cdef uint64_t blknum, blkoffs, n, nblocks, end = offset + count
        cdef int r = 0, s
        if fast:
            # Fast only if no partial block needs a backing read: check head and tail first.
            self.next_piece(offset, count, &blknum, &blkoffs, &n, &nblocks)
            if nblocks == 0 and self.get_state(blknum) == BLOCK_NOT_ALLOCATED:
                return -ENOTSUP
            blknum = (end - 1) >> self.blkshift
            if (end & (self.blksize - 1)) != 0 and end != self.c_size and \
                    self.get_state(blknum) == BLOCK_NOT_ALLOCATED:
                return -ENOTSUP
        while count > 0 and r == 0:
            self.next_piece(offset, count, &blknum, &blkoffs, &n, &nblocks)
            if nblocks == 0:
                r = self.write_partial(blknum, blkoffs, n, NULL)
            else:
                r = self.zero_blocks(blknum, nblocks, may_trim)
            offset += n
            count -= n
        return r

    cdef int c_cache(self, uint64_t count, uint64_t offset) noexcept nogil:
        cdef uint64_t blknum, last
        cdef int r
        if not self.c_cow_on_cache:
            backing_cache(&self.b, count, offset)
            return 0
        last = (offset + count - 1) >> self.blkshift
        for blknum in range(offset >> self.blkshift, last + 1):
            r = self.c_blk_cache(blknum, C_CACHE_MODE_COW)
            if r < 0:
                return r
        return 0

    cdef int c_extents(self, runs_t *runs, uint64_t count, uint64_t offset,
                       bint depth) noexcept nogil:
        """Runs of (length, type) from offset; depth=True: qemu:allocation-depth instead."""
        cdef uint64_t end = offset + count, blknum, run_end, n, limit
        cdef int state, r = 0
        limit = ((end - 1) >> self.blkshift) + 1
        while offset < end and not runs_full(runs):
            blknum = offset >> self.blkshift
            pthread_mutex_lock(&self.lock)
            state = self.bitmap_get_blk(blknum)
            run_end = self.bitmap_run_end(blknum, limit)
            if depth and state != BLOCK_NOT_ALLOCATED:
                # Allocated and trimmed blocks are both in the overlay: one run.
                while run_end < limit and self.bitmap_get_blk(run_end) != BLOCK_NOT_ALLOCATED:
                    run_end = self.bitmap_run_end(run_end, limit)
            pthread_mutex_unlock(&self.lock)
            run_end <<= self.blkshift
            n = (run_end if run_end < end else end) - offset
            if depth:
                r = runs_add(runs, n, C_DEPTH_BACKING if state == BLOCK_NOT_ALLOCATED else C_DEPTH_OVERLAY)
            elif state == BLOCK_ALLOCATED:
                r = runs_add(runs, n, T_DATA)
            elif state == BLOCK_TRIMMED:
                r = runs_add(runs, n, T_HOLE_ZERO)
            else:
                r = backing_extents(&self.b, runs, offset, n)
            if r < 0:
                return r
            offset += n
        return 0

    # -- Python API --------------------------------------------------------------------------

    cdef int enter(self) except -1:
        if self.closing or self.fd < 0:
            raise ValueError("cow: the engine is closed")
        self.active += 1
        return 0

    cdef inline void leave(self) noexcept:
        self.active -= 1

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
        return self.nrblocks

    @property
    def closed(self):
        return self.closing or self.fd < 0

    def pread(self, buf, offset):
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self.check_range("pread", view.len, offset_u)
            self.enter()
            with nogil:
                r = self.c_pread(<uint8_t *>view.buf, view.len, offset_u)
            self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "pread", view.len, offset_u)

    def pwrite(self, buf, offset, bint fua=False):
        cdef uint64_t offset_u = u64(offset, "offset")
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self.check_range("pwrite", view.len, offset_u)
            self.enter()
            with nogil:
                r = self.c_pwrite(<const uint8_t *>view.buf, view.len, offset_u)
                if r == 0 and fua and fdatasync(self.fd) != 0:
                    r = -errno
            self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "pwrite", view.len, offset_u)

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
        self.check_range(op, count_u, offset_u)
        if count_u == 0:
            return
        self.enter()
        with nogil:
            if cache:
                r = self.c_cache(count_u, offset_u)
            else:
                r = self.c_zero(count_u, offset_u, may_trim, fast)
        self.leave()
        if r < 0:
            raise_errno(-r, op, count_u, offset_u)

    def flush(self):
        cdef int r = 0
        self.enter()
        with nogil:
            if fdatasync(self.fd) != 0:
                r = -errno
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
        self.check_range(op, count, offset)
        if count == 0:
            return []
        memset(&runs, 0, sizeof(runs))
        runs.limit = MAX_RUNS
        runs.req_one = req_one
        self.enter()
        with nogil:
            r = self.c_extents(&runs, count, offset, depth)
        self.leave()
        try:
            if r < 0:
                raise_errno(-r, op, count, offset)
            return [(runs.length[i], runs.kind[i]) for i in range(runs.n)]
        finally:
            runs_free(&runs)

    def stats(self):
        cdef struct_stat st
        cdef uint64_t used = 0
        self.enter()
        if self.fd >= 0 and fstat(self.fd, &st) == 0:
            used = <uint64_t>st.st_blocks * 512
        with nogil:
            pthread_mutex_lock(&self.lock)
        alloc, trimmed = self.nr_allocated, self.nr_trimmed
        pthread_mutex_unlock(&self.lock)
        self.leave()
        return {"allocated_blocks": alloc, "trimmed_blocks": trimmed, "overlay_bytes": used,
                "block_size": self.blksize, "nr_blocks": self.nrblocks}

    # -- block API ---------------------------------------------------------------------------

    def blk_set_size(self, new_size):
        """Size the bitmap and the overlay for new_size bytes (call with no I/O in flight)."""
        cdef uint64_t new_size_u = u64(new_size, "new_size")
        cdef uint64_t nblocks = (new_size_u + self.blksize - 1) >> self.blkshift
        cdef uint64_t nbytes = (nblocks + 3) >> 2
        cdef uint8_t *p
        cdef struct_stat st
        self.enter()
        try:
            self._set_size(new_size_u, nblocks, nbytes)
        finally:
            self.leave()

    cdef _set_size(self, uint64_t new_size_u, uint64_t nblocks, uint64_t nbytes):
        cdef uint8_t *p
        cdef struct_stat st
        with nogil:
            pthread_mutex_lock(&self.lock)
            # Blocks past a shrunk end forget their state (and their counts).
            while self.nrblocks > nblocks:
                self.nrblocks -= 1
                self.bitmap_set_blk(self.nrblocks, BLOCK_NOT_ALLOCATED)
            pthread_mutex_unlock(&self.lock)
        p = <uint8_t *>realloc(self.bitmap, nbytes + 8)
        if p == NULL:
            raise MemoryError(f"cow: no memory for a bitmap of {nbytes} bytes")
        if nbytes > self.bitmap_len:
            memset(p + self.bitmap_len, 0, nbytes - self.bitmap_len)
        memset(p + nbytes, 0, 8)
        with nogil:
            pthread_mutex_lock(&self.lock)
        self.bitmap = p
        self.bitmap_len = nbytes
        self.nrblocks = nblocks
        self.c_size = new_size_u
        # Clear bits past the last block in its byte, so word scans see a clean pattern.
        if nblocks & 3:
            p[nblocks >> 2] &= (1 << ((nblocks & 3) * 2)) - 1
        pthread_mutex_unlock(&self.lock)
        # The overlay grows as blocks are written; a shrunk disk gives back what lies past its end.
        if fstat(self.fd, &st) == 0 and <uint64_t>st.st_size > (nblocks << self.blkshift):
            if ftruncate(self.fd, <off_t>(nblocks << self.blkshift)) != 0:
                raise OSError(errno, f"cow: cannot shrink the overlay: {os.strerror(errno)}")

    def blk_status(self, blknum):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int s
        self.check_blknum(blknum_u)
        self.enter()
        with nogil:
            s = self.get_state(blknum_u)
        self.leave()
        return s

    cdef int check_blknum(self, uint64_t blknum) except -1:
        if blknum >= self.nrblocks:
            raise ValueError(f"cow: block {blknum} is beyond the last block ({self.nrblocks} blocks)")
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
        self.check_blknum(blknum_u)
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self.check_block_buffer(&view)
            self.enter()
            with nogil:
                r = self.c_blk_read(blknum_u, <uint8_t *>view.buf)
            self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "blk_read", self.blksize, blknum_u << self.blkshift)

    def blk_write(self, blknum, buf):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef Py_buffer view
        cdef int r
        self.check_blknum(blknum_u)
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self.check_block_buffer(&view)
            self.enter()
            with nogil:
                r = self.write_blocks(blknum_u, 1, <const uint8_t *>view.buf)
            self.leave()
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise_errno(-r, "blk_write", self.blksize, blknum_u << self.blkshift)

    def blk_trim(self, blknum):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int r
        self.check_blknum(blknum_u)
        self.enter()
        with nogil:
            r = self.zero_blocks(blknum_u, 1, True)
        self.leave()
        if r < 0:
            raise_errno(-r, "blk_trim", self.blksize, blknum_u << self.blkshift)

    def blk_cache(self, blknum, int mode=CACHE_MODE_COW):
        cdef uint64_t blknum_u = u64(blknum, "blknum")
        cdef int r
        self.check_blknum(blknum_u)
        if mode not in (CACHE_MODE_READ, CACHE_MODE_COW):
            raise ValueError(f"cow: invalid cache mode {mode}: expected CACHE_MODE_READ or "
                             f"CACHE_MODE_COW")
        self.enter()
        with nogil:
            r = self.c_blk_cache(blknum_u, mode)
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


def _nbd_message():
    cdef const char *m = nbd_get_error()
    return m.decode(errors="replace") if m != NULL else "unknown libnbd error"
