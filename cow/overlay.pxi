# The overlay file: where written blocks live, at the same offsets as on the disk.
# Included into cow/engine.pyx.
#
# The overlay is sparse and never sized up front (a file as large as the disk may exceed the file
# system's limit, or RLIMIT_FSIZE): what lies past its end was never written and reads as
# zeroes.  Blocks given back (trimmed) are punched out of it.

cdef int overlay_pread(int fd, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Read count bytes at offset; past the end of the file: zeroes."""
    cdef ssize_t r
    while count > 0:
        r = pread(fd, buf, count, <off_t>offset)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            memset(buf, 0, count)
            return 0
        buf += r
        count -= r
        offset += r
    return 0


cdef int overlay_pwrite(int fd, const uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
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


cdef int overlay_write_zeroes(int fd, const uint8_t *zero_block, uint64_t blksize,
                              uint64_t count, uint64_t offset) noexcept nogil:
    cdef uint64_t n
    cdef int r
    while count > 0:
        n = count if count < blksize else blksize
        r = overlay_pwrite(fd, zero_block, n, offset)
        if r < 0:
            return r
        offset += n
        count -= n
    return 0


cdef inline bint overlay_punch(int fd, uint64_t count, uint64_t offset) noexcept nogil:
    """Give the space of [offset, offset+count) back; it reads as zeroes.  False if the file
    system cannot."""
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, <off_t>offset,
                     <off_t>count) == 0


cdef inline int overlay_sync(int fd) noexcept nogil:
    if fdatasync(fd) != 0:
        return -errno
    return 0


def _open_temporary_overlay(tmpdir):
    """An unlinked overlay file in tmpdir (default $TMPDIR, else /var/tmp): O_TMPFILE where the
    file system has it, else a file unlinked at once; mode 0600, close-on-exec."""
    if tmpdir is None:
        tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
    try:
        return os.open(tmpdir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC | os.O_EXCL, 0o600)
    except OSError as e:
        if e.errno not in (EOPNOTSUPP, EISDIR, EINVAL):
            raise OSError(e.errno, f"cow: cannot create the overlay in {tmpdir}: "
                                   f"{os.strerror(e.errno)}") from None
    import tempfile
    fd, name = tempfile.mkstemp(prefix="cow-overlay-", dir=tmpdir)
    os.unlink(name)
    os.set_inheritable(fd, False)
    return fd
