# The bitmap (2 bits a block) and the claims on blocks, under the one mutex that guards both.
# Included into cow/engine.pyx.
#
# A claim covers a range of blocks while an engine call works on them:
#
# * exclusive: whatever changes a block that is not (or will not stay) allocated: the
#   read-modify-write of a partial write, a write of whole blocks not all allocated yet, a
#   copy-up by cow-on-read or cow-on-cache, a trim, a zero.  One at a time on a block.
# * shared: a write straight into blocks that are all allocated.  Any number at once, but never
#   beside an exclusive claim, so a trim waits for the writes already going into its blocks
#   and the bitmap always agrees with the overlay's space.
#
# For a persistent overlay the bitmap also remembers which of its 4 KiB pages changed since the
# last flush took them (one bit a page in `dirty`): a flush writes only those (overlay.pxi).
#
# A claim waits only while it holds none, and each call holds at most one claim at a time, so
# claims cannot deadlock.  Claims live on the claimant's stack; the table holds pointers.
# Reads take no claim.  Everything here runs with bm.lock held unless it says otherwise.

cdef struct claim_t:
    uint64_t first
    uint64_t end
    bint exclusive


cdef struct bitmap_t:
    pthread_mutex_t lock
    pthread_cond_t released     # a claim ended (signalled only when someone waits)
    uint8_t *bits
    uint64_t nbytes
    uint64_t nrblocks
    uint64_t nr_allocated
    uint64_t nr_trimmed
    uint64_t nr_reserved        # blocks about to become allocated (see reserve)
    uint64_t max_blocks         # overlay_max_size in blocks (UINT64_MAX: no cap)
    uint8_t *dirty              # a bit per BITMAP_PAGE bytes of bits changed since a flush took it
    uint64_t dirty_nbytes
    uint64_t flush_begun        # flush rounds begun and completed (overlay_flush)
    uint64_t flush_done
    claim_t **claims
    size_t nr_claims
    size_t cap_claims
    int waiting


cdef enum:
    BITMAP_PAGE = 4096          # bytes of bits written at a time: 16384 blocks
    BLOCKS_PER_PAGE_SHIFT = 14  # blknum >> 14 is its page


cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil


cdef inline int bitmap_get_blk(const bitmap_t *bm, uint64_t blknum) noexcept nogil:
    return (bm.bits[blknum >> 2] >> ((blknum & 3) * 2)) & 3


cdef inline void bitmap_set_blk(bitmap_t *bm, uint64_t blknum, int state) noexcept nogil:
    cdef int old = bitmap_get_blk(bm, blknum)
    cdef uint8_t shift = (blknum & 3) * 2
    if old == state:
        return
    if old == BLOCK_ALLOCATED:
        bm.nr_allocated -= 1
    elif old == BLOCK_TRIMMED:
        bm.nr_trimmed -= 1
    if state == BLOCK_ALLOCATED:
        bm.nr_allocated += 1
    elif state == BLOCK_TRIMMED:
        bm.nr_trimmed += 1
    bm.bits[blknum >> 2] = (bm.bits[blknum >> 2] & ~(3 << shift)) | (state << shift)
    bm.dirty[blknum >> (BLOCKS_PER_PAGE_SHIFT + 3)] |= <uint8_t>(
        1 << ((blknum >> BLOCKS_PER_PAGE_SHIFT) & 7))


cdef uint64_t bitmap_run_end(const bitmap_t *bm, uint64_t blknum, uint64_t limit) noexcept nogil:
    """First block in (blknum, limit) whose state differs from blknum's, else limit."""
    cdef int state = bitmap_get_blk(bm, blknum)
    cdef uint8_t byte_pattern = <uint8_t>(state * 0x55)
    cdef uint64_t word_pattern = byte_pattern * <uint64_t>0x0101010101010101
    cdef uint64_t b = blknum + 1
    cdef uint64_t word
    while b < limit:
        if (b & 31) == 0 and b + 32 <= limit:
            memcpy(&word, &bm.bits[b >> 2], 8)
            if word == word_pattern:
                b += 32
                continue
        if (b & 3) == 0 and b + 4 <= limit:
            if bm.bits[b >> 2] == byte_pattern:
                b += 4
                continue
        if bitmap_get_blk(bm, b) != state:
            return b
        b += 1
    return limit


cdef inline bint bitmap_all(const bitmap_t *bm, uint64_t first, uint64_t end,
                            int state) noexcept nogil:
    return bitmap_get_blk(bm, first) == state and bitmap_run_end(bm, first, end) == end


cdef int reserve(bitmap_t *bm, uint64_t nblocks) noexcept nogil:
    """Claim overlay room for nblocks blocks about to become allocated."""
    if bm.max_blocks == UINT64_MAX:
        return 0
    if bm.nr_allocated + bm.nr_reserved + nblocks > bm.max_blocks:
        return -ENOSPC
    bm.nr_reserved += nblocks
    return 0


cdef uint64_t reserve_upto(bitmap_t *bm, uint64_t nblocks) noexcept nogil:
    """Claim room for as many of nblocks blocks as fit; how many."""
    cdef uint64_t used
    if bm.max_blocks != UINT64_MAX:
        used = bm.nr_allocated + bm.nr_reserved
        if used >= bm.max_blocks:
            return 0
        if nblocks > bm.max_blocks - used:
            nblocks = bm.max_blocks - used
        bm.nr_reserved += nblocks
    return nblocks


cdef inline void unreserve(bitmap_t *bm, uint64_t nblocks) noexcept nogil:
    if bm.max_blocks != UINT64_MAX:
        bm.nr_reserved -= nblocks


cdef bint claims_conflict(const bitmap_t *bm, uint64_t first, uint64_t end,
                          bint exclusive) noexcept nogil:
    """Does a claim in the table stand in the way of this one?"""
    cdef size_t i
    cdef const claim_t *c
    for i in range(bm.nr_claims):
        c = bm.claims[i]
        if c.first < end and first < c.end and (exclusive or c.exclusive):
            return True
    return False


cdef int claims_add(bitmap_t *bm, claim_t *c, uint64_t first, uint64_t end,
                    bint exclusive) noexcept nogil:
    cdef size_t cap
    cdef void *p
    if bm.nr_claims == bm.cap_claims:
        cap = bm.cap_claims * 2 if bm.cap_claims else 64
        p = realloc(bm.claims, cap * sizeof(claim_t *))
        if p == NULL:
            return -ENOMEM
        bm.claims = <claim_t **>p
        bm.cap_claims = cap
    c.first = first
    c.end = end
    c.exclusive = exclusive
    bm.claims[bm.nr_claims] = c
    bm.nr_claims += 1
    return 0


cdef int claims_wait_add(bitmap_t *bm, claim_t *c, uint64_t first, uint64_t end) noexcept nogil:
    """Wait until no claim overlaps [first, end), then claim it exclusively."""
    while claims_conflict(bm, first, end, True):
        bm.waiting += 1
        pthread_cond_wait(&bm.released, &bm.lock)
        bm.waiting -= 1
    return claims_add(bm, c, first, end, True)


cdef void claims_remove(bitmap_t *bm, claim_t *c) noexcept nogil:
    cdef size_t i
    for i in range(bm.nr_claims):
        if bm.claims[i] == c:
            bm.nr_claims -= 1
            bm.claims[i] = bm.claims[bm.nr_claims]
            break
    if bm.waiting:
        pthread_cond_broadcast(&bm.released)


cdef int bitmap_init(bitmap_t *bm) noexcept nogil:
    memset(bm, 0, sizeof(bitmap_t))
    bm.max_blocks = UINT64_MAX
    pthread_mutex_init(&bm.lock, NULL)
    pthread_cond_init(&bm.released, NULL)
    return 0


cdef void bitmap_destroy(bitmap_t *bm) noexcept nogil:
    free(bm.bits)
    free(bm.claims)
    free(bm.dirty)
    bm.bits = NULL
    bm.dirty = NULL
    bm.claims = NULL
    pthread_cond_destroy(&bm.released)
    pthread_mutex_destroy(&bm.lock)


cdef int bitmap_resize(bitmap_t *bm, uint64_t nblocks) noexcept nogil:
    """Size the bitmap for nblocks blocks (called with no claims and no I/O in flight, lock not
    held).  Blocks past a shrunk end forget their state and their counts."""
    cdef uint64_t nbytes = (nblocks + 3) >> 2
    cdef uint64_t npages = (nbytes + BITMAP_PAGE - 1) // BITMAP_PAGE
    cdef uint64_t dirty_nbytes = (npages + 7) >> 3
    cdef uint8_t *p
    pthread_mutex_lock(&bm.lock)
    while bm.nrblocks > nblocks:
        bm.nrblocks -= 1
        bitmap_set_blk(bm, bm.nrblocks, BLOCK_NOT_ALLOCATED)
    # The bits first: an absurd size fails here, before the dirty-page map (a 2**15th of it)
    # is grown and cleared, which overcommitted memory would allow.
    # 8 spare bytes: bitmap_run_end reads whole words.
    p = <uint8_t *>realloc(bm.bits, nbytes + 8)
    if p == NULL:
        pthread_mutex_unlock(&bm.lock)
        return -ENOMEM
    bm.bits = p         # larger or not, nbytes still says what is valid
    p = <uint8_t *>realloc(bm.dirty, dirty_nbytes + 1)
    if p == NULL:
        pthread_mutex_unlock(&bm.lock)
        return -ENOMEM
    if dirty_nbytes > bm.dirty_nbytes:
        memset(p + bm.dirty_nbytes, 0, dirty_nbytes - bm.dirty_nbytes)
    if npages & 7:                      # no page past the end is ever dirty
        p[npages >> 3] &= (1 << (npages & 7)) - 1
    p[dirty_nbytes] = 0
    bm.dirty = p
    bm.dirty_nbytes = dirty_nbytes
    p = bm.bits
    if nbytes > bm.nbytes:
        memset(p + bm.nbytes, 0, nbytes - bm.nbytes)
    memset(p + nbytes, 0, 8)
    # Clear the bits past the last block in its byte, so word scans see a clean pattern.
    if nblocks & 3:
        p[nblocks >> 2] &= (1 << ((nblocks & 3) * 2)) - 1
    bm.bits = p
    bm.nbytes = nbytes
    bm.nrblocks = nblocks
    pthread_mutex_unlock(&bm.lock)
    return 0


cdef int64_t bitmap_recount(bitmap_t *bm) noexcept nogil:
    """After the bits were loaded from a file: count allocated and trimmed blocks.  Returns -1,
    or the first block whose state is invalid (2, which the engine never writes) or that lies
    past the end of the disk with a state other than not allocated."""
    cdef uint64_t i, w, lo, hi, alloc = 0, trimmed = 0
    cdef uint64_t m = 0x5555555555555555ULL
    cdef uint64_t nwords = bm.nbytes >> 3
    cdef uint8_t tail
    for i in range(nwords):
        memcpy(&w, &bm.bits[i << 3], 8)
        lo = w & m
        hi = (w >> 1) & m
        if hi & ~lo:
            return <int64_t>((i << 5) + (__builtin_ctzll(hi & ~lo) >> 1))
        trimmed += __builtin_popcountll(lo & hi)
        alloc += __builtin_popcountll(lo & ~hi)
    for i in range(nwords << 3, bm.nbytes):
        w = bm.bits[i]
        lo = w & m
        hi = (w >> 1) & m
        if hi & ~lo:
            return <int64_t>((i << 2) + (__builtin_ctzll(hi & ~lo) >> 1))
        trimmed += __builtin_popcountll(lo & hi)
        alloc += __builtin_popcountll(lo & ~hi)
    if bm.nrblocks & 3:
        tail = bm.bits[bm.nrblocks >> 2] >> ((bm.nrblocks & 3) * 2)
        if tail:
            return <int64_t>bm.nrblocks
    bm.nr_allocated = alloc
    bm.nr_trimmed = trimmed
    return -1
