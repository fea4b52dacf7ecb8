# The overlay file: where written blocks live, and (for a persistent overlay) the durable bitmap.
# Included into cow/engine.pyx.  The on-disk format is cow/overlayfile.py's.
#
# Block N's data is at data_offset + N * block_size: data_offset is 0 for the temporary overlay
# (an unlinked file), and follows the header and the bitmap in a persistent one.  Every read,
# write and punch of block data goes through the functions below, which add it.
#
# The overlay is sparse and never sized up front (a file as large as the disk may exceed the file
# system's limit, or RLIMIT_FSIZE): what lies past its end was never written and reads as
# zeroes.  Blocks given back (trimmed) are punched out of it.

cdef struct overlay_t:
    int fd
    uint64_t data_offset        # where block 0 lives
    uint64_t bitmap_offset      # persistent: where the bitmap lives
    bint persistent             # the bitmap is saved at each flush (else: a temporary overlay)
    bint readonly               # opened to read only: nothing is ever written
    pthread_mutex_t flush_lock  # serializes flushes; held across their I/O, taken by nothing else


cdef int overlay_pread(const overlay_t *ov, uint8_t *buf, uint64_t count,
                       uint64_t offset) noexcept nogil:
    """Read count bytes of block data at offset; past the end of the file: zeroes."""
    cdef ssize_t r
    offset += ov.data_offset
    while count > 0:
        r = pread(ov.fd, buf, count, <off_t>offset)
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


cdef int full_pwrite(int fd, const uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Write exactly count bytes.  A short write that stops inside a 512-byte sector after
    passing a sector boundary goes on from that boundary (those bytes are written again), so
    that the next call starts on a sector boundary (see psrc_write).  One stopped inside the
    sector it started in goes on from where it stopped (starting that sector again would ask
    the same and stop there again: a file-size limit, where the next call fails)."""
    cdef ssize_t r, head
    while count > 0:
        r = pwrite(fd, buf, count, <off_t>offset)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return -EIO
        head = <ssize_t>((offset + <uint64_t>r) & 511)
        if <uint64_t>r < count and r > head:
            r -= head
        buf += r
        count -= r
        offset += r
    return 0


cdef inline int overlay_pwrite(const overlay_t *ov, const uint8_t *buf, uint64_t count,
                               uint64_t offset) noexcept nogil:
    return full_pwrite(ov.fd, buf, count, ov.data_offset + offset)


cdef int overlay_write_zeroes(const overlay_t *ov, const uint8_t *zero_block, uint64_t blksize,
                              uint64_t count, uint64_t offset) noexcept nogil:
    cdef uint64_t n
    cdef int r
    while count > 0:
        n = count if count < blksize else blksize
        r = overlay_pwrite(ov, zero_block, n, offset)
        if r < 0:
            return r
        offset += n
        count -= n
    return 0


cdef inline bint overlay_punch(const overlay_t *ov, uint64_t count, uint64_t offset) noexcept nogil:
    """Give the space of [offset, offset+count) back; it reads as zeroes.  False if the file
    system cannot."""
    return fallocate(ov.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     <off_t>(ov.data_offset + offset), <off_t>count) == 0


cdef inline int overlay_sync(const overlay_t *ov) noexcept nogil:
    if fdatasync(ov.fd) != 0:
        return -errno
    return 0


# -- the durable bitmap ----------------------------------------------------------------------
#
# The bitmap reaches the file only at a flush (FLUSH, FUA, clean close), never per write: the
# write path pays nothing for persistence.  A flush round:
#
#   1. takes the set of bitmap pages changed since the last round (and clears it), then copies
#      each of those pages under the bitmap mutex: the snapshot;
#   2. fdatasync: the block data is durable;
#   3. writes the snapshot's pages into the bitmap area;
#   4. fdatasync: the bitmap is durable.  The FLUSH is acknowledged after this.
#
# Why a crash at any moment never makes a block read bytes that were never written to it:
#
# * The engine writes a block's data before it marks the block allocated (mark() after the
#   pwrite), so every bit that reads "allocated" in the snapshot of step 1 was set after its
#   block's data was written; step 2 makes that data durable before step 3 writes any bit that
#   points at it.  The snapshot is taken BEFORE the sync for exactly this reason: a bit set
#   after the sync could point at data still in flight.
# * The data area at block N only ever holds bytes written to block N (offsets are fixed), or a
#   hole punched by a trim or zero of block N (zeroes, which that trim or zero wrote).  So an
#   "allocated" bit, old or new, reads data some write to that block put there.
# * A torn write in step 3 leaves each bitmap byte (four blocks) old or new, and either is
#   safe: the old state was the previous round's snapshot, for which the argument above already
#   held, and later writes to those blocks only replaced their data by newer data of the same
#   block, or punched it (a trim: zeroes, a later write).  A block whose on-disk state is "not
#   allocated" reads the backing, as it did before its first write; "trimmed" reads zeroes.
# * Unflushed writes may be lost, as on a real disk: a block first written after the last
#   round reads the backing again.  Writes to blocks already allocated on disk reach the data in
#   place, so such a block reads its last flushed data or some later write's.
# * Nothing but a flush writes the bitmap area, and rounds run one at a time (flush_lock), so
#   an older snapshot never overwrites a newer one.  Concurrent FLUSH requests share rounds: a
#   FLUSH is covered by any round that began after it arrived and completed (group commit).
# * Whatever makes blocks not allocated again in the file (reset, commit: cow/overlay.py) writes
#   the bitmap first and syncs it, and only then punches or truncates the data.

cdef int overlay_flush(overlay_t *ov, bitmap_t *bm) noexcept nogil:
    """Make every write completed before this call durable (see above).  0 or -errno; on
    failure the pages taken are marked dirty again, so a later flush writes them."""
    cdef uint64_t ticket, round_no, npages = 0, i, j, k, run, page
    cdef uint64_t nbytes, nmap
    cdef uint8_t *pages = NULL
    cdef uint8_t *snap = NULL
    cdef uint64_t *index = NULL
    cdef int r = 0
    if not ov.persistent:
        return overlay_sync(ov)
    if ov.readonly:
        return 0
    pthread_mutex_lock(&bm.lock)
    ticket = bm.flush_begun
    nmap = bm.dirty_nbytes
    pthread_mutex_unlock(&bm.lock)
    pages = <uint8_t *>malloc(nmap + 1)
    if pages == NULL:
        return -ENOMEM
    pthread_mutex_lock(&ov.flush_lock)
    # Step 1: which pages, then each page's bytes.
    pthread_mutex_lock(&bm.lock)
    if bm.flush_done > ticket:
        # A round that began after this FLUSH arrived has completed: it covered this FLUSH.
        pthread_mutex_unlock(&bm.lock)
        pthread_mutex_unlock(&ov.flush_lock)
        free(pages)
        return 0
    bm.flush_begun += 1
    round_no = bm.flush_begun
    nbytes = bm.nbytes
    memcpy(pages, bm.dirty, nmap)
    memset(bm.dirty, 0, nmap)
    pthread_mutex_unlock(&bm.lock)
    for i in range(nmap):
        npages += __builtin_popcountll(pages[i])
    if npages:
        snap = <uint8_t *>malloc(npages * BITMAP_PAGE)
        index = <uint64_t *>malloc(npages * sizeof(uint64_t))
        if snap == NULL or index == NULL:
            r = -ENOMEM
    if r == 0:
        j = 0
        for page in range(nmap * 8):
            if not (pages[page >> 3] >> (page & 7)) & 1:
                continue
            k = nbytes - page * BITMAP_PAGE
            if k > BITMAP_PAGE:
                k = BITMAP_PAGE
            pthread_mutex_lock(&bm.lock)
            memcpy(snap + j * BITMAP_PAGE, bm.bits + page * BITMAP_PAGE, k)
            pthread_mutex_unlock(&bm.lock)
            memset(snap + j * BITMAP_PAGE + k, 0, BITMAP_PAGE - k)
            index[j] = page
            j += 1
        # Step 2: the data the snapshot points at is durable ...
        r = overlay_sync(ov)
        # ... step 3: then the snapshot, a run of consecutive pages per write ...
        i = 0
        while r == 0 and i < npages:
            run = 1
            while i + run < npages and index[i + run] == index[i] + run:
                run += 1
            r = full_pwrite(ov.fd, snap + i * BITMAP_PAGE, run * BITMAP_PAGE,
                            ov.bitmap_offset + index[i] * BITMAP_PAGE)
            i += run
        # ... step 4: and durable too.
        if r == 0 and npages:
            r = overlay_sync(ov)
    pthread_mutex_lock(&bm.lock)
    if r == 0:
        bm.flush_done = round_no
    else:
        for i in range(nmap):
            bm.dirty[i] |= pages[i]
    pthread_mutex_unlock(&bm.lock)
    pthread_mutex_unlock(&ov.flush_lock)
    free(pages)
    free(snap)
    free(index)
    return r


cdef int overlay_load_bitmap(const overlay_t *ov, bitmap_t *bm) noexcept nogil:
    """Read a persistent overlay's bitmap into bm (sized already, idle).  0 or -errno."""
    cdef ssize_t r
    cdef uint64_t done = 0
    while done < bm.nbytes:
        r = pread(ov.fd, bm.bits + done, bm.nbytes - done, <off_t>(ov.bitmap_offset + done))
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return -EIO
        done += r
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
