# The block core: byte ranges to whole blocks and pieces, copy-up, trim and zero, the blk_*
# operations, and reads that finish later (Engine.pread_start).  Included into cow/engine.pyx;
# every method is `noexcept nogil` and returns 0 or -errno (the Python API, with the GIL, is
# the Engine subclass in engine.pyx).

# Reads that finish later (Engine.pread_start): each is an aread_t; when its backing pieces are
# in, the dispatcher thread appends it to its ReadQueue, whose owner collects it with the GIL.

cdef struct cor_t:             # a cow-on-read in progress (BlockCore.cor_plan)
    uint8_t *buf
    uint64_t offset
    uint64_t count
    uint64_t first              # its first and last blocks
    uint64_t last
    uint64_t mid_start          # whole blocks read straight into buf
    uint64_t mid_end
    uint8_t *head               # partial first and last blocks, read whole
    uint8_t *tail
    piece_t pieces[3]
    int n


cdef inline void cor_free(cor_t *p) noexcept nogil:
    free(p.head)
    free(p.tail)
    p.head = p.tail = NULL


cdef struct aread_t:
    Py_buffer view              # the caller's buffer, held until collected
    cor_t *cor                  # with cow-on-read: the copy-up to finish when collected
    PyObject *token             # the caller's, handed back
    PyObject *engine            # the Engine (its call ends when collected)
    PyObject *queue_obj         # the ReadQueue (alive while reads are pending on it)
    rq_t *queue
    int status
    aread_t *next
    # A read started by Engine.serve (areads.pxi): no Python object; the reply's own buffer
    uint8_t head[32]            # the reply's header (28 bytes at most)
    uint8_t *mem                # the data
    size_t memsize
    uint64_t cookie
    uint64_t offset
    uint32_t count
    uint16_t flags


cdef struct rq_t:
    pthread_mutex_t m
    pthread_cond_t cond
    aread_t *head               # finished, not yet collected
    aread_t *tail
    int pending                 # started, not yet collected
    bint closed


cdef void aread_done(batch_t *w) noexcept nogil:
    """The backing pieces of a read are in (or failed): hand it to its queue."""
    cdef aread_t *r = <aread_t *>w.arg
    cdef rq_t *q = r.queue
    r.status = batch_status(w)
    free(w)
    pthread_mutex_lock(&q.m)
    if q.tail == NULL:
        q.head = r
    else:
        q.tail.next = r
    q.tail = r
    pthread_cond_signal(&q.cond)
    pthread_mutex_unlock(&q.m)


cdef aread_t *rq_take(rq_t *q, int *n) noexcept nogil:
    """Wait for finished reads and take them all off q (*n: how many); NULL once q is closed
    and nothing is pending."""
    cdef aread_t *r
    cdef aread_t *nxt
    pthread_mutex_lock(&q.m)
    while q.head == NULL and not (q.closed and q.pending == 0):
        pthread_cond_wait(&q.cond, &q.m)
    r = q.head
    q.head = q.tail = NULL
    n[0] = 0
    nxt = r
    while nxt != NULL:
        n[0] += 1
        nxt = nxt.next
    q.pending -= n[0]
    pthread_mutex_unlock(&q.m)
    return r


# The pieces of a read that a front end sends itself (Engine.read_plan): each is count bytes of
# a file at pos (the overlay or a file backing), or count zero bytes (fd -1).

cdef struct rpiece_t:
    int fd                      # the overlay's or the backing's descriptor, or -1: zeroes
    uint64_t pos                # where in that file
    uint64_t count


cdef struct rplan_t:
    rpiece_t *p
    size_t n
    size_t cap
    bint backing                # a piece reads the backing's descriptor


cdef int rplan_add(rplan_t *plan, int fd, uint64_t pos, uint64_t count) noexcept nogil:
    """Append a piece, merged into the previous one where they continue each other."""
    cdef rpiece_t *last
    cdef void *p
    cdef size_t cap
    if count == 0:
        return 0
    if plan.n:
        last = &plan.p[plan.n - 1]
        if last.fd == fd and (fd < 0 or last.pos + last.count == pos):
            last.count += count
            return 0
    if plan.n == plan.cap:
        cap = plan.cap * 2 if plan.cap else 8
        p = realloc(plan.p, cap * sizeof(rpiece_t))
        if p == NULL:
            return -ENOMEM
        plan.p = <rpiece_t *>p
        plan.cap = cap
    plan.p[plan.n].fd = fd
    plan.p[plan.n].pos = pos if fd >= 0 else 0
    plan.p[plan.n].count = count
    plan.n += 1
    return 0


cdef class BlockCore:
    """The engine's state and its nogil core; Engine (engine.pyx) sets it up and wraps it."""

    cdef bitmap_t bm                    # the bitmap, its counters and the claims (bitmap.pxi)
    cdef bint bm_ready
    cdef pthread_mutex_t global_lock    # lock_mode="global" only
    cdef bint global_mode

    cdef uint64_t c_size
    cdef uint32_t blksize
    cdef uint32_t blkshift

    cdef overlay_t ov                   # the overlay file (overlay.pxi)
    cdef object ovfile                  # persistent: the cow.overlayfile.OverlayFile, else None
    cdef int backing_lock_fd            # a file backing: holds overlayfile.hold_backing's lock
    cdef Backing b
    cdef bint owns_backing              # made here (closed here), else shared with others
    cdef uint8_t *zero_block            # blksize zero bytes, never written
    cdef pipes_t pipes                  # idle pipes for payloads (payload.pxi)

    cdef int cor_mode                   # COR_OFF / COR_ON / COR_PATH
    cdef bytes cor_path
    cdef const char *cor_path_c
    cdef bint c_cow_on_cache

    cdef int active                     # calls in progress (changed with the GIL held)
    cdef int served_reads               # reads started by serve() not yet answered (atomic)
    cdef bint closing

    cdef readonly str backing
    cdef readonly bint backing_is_nbd
    cdef readonly str lock_mode
    cdef readonly object cow_on_read
    cdef readonly bint cow_on_cache
    cdef readonly object overlay        # the persistent overlay's path, else None
    cdef readonly bint readonly         # writes fail with EROFS; nothing is written to the overlay

    # -- claims and states (bitmap.pxi holds the table) ----------------------------------------

    cdef inline int get_state(self, uint64_t blknum) noexcept nogil:
        cdef int s
        pthread_mutex_lock(&self.bm.lock)
        s = bitmap_get_blk(&self.bm, blknum)
        pthread_mutex_unlock(&self.bm.lock)
        return s

    cdef int claim(self, claim_t *c, uint64_t first, uint64_t nblocks) noexcept nogil:
        """Claim blocks [first, first+nblocks) exclusively, waiting for others' claims on them
        (global mode: the global lock)."""
        cdef int r
        if self.global_mode:
            pthread_mutex_lock(&self.global_lock)
            return 0
        pthread_mutex_lock(&self.bm.lock)
        r = claims_wait_add(&self.bm, c, first, first + nblocks)
        pthread_mutex_unlock(&self.bm.lock)
        return r

    cdef int claim_allocated(self, claim_t *c, uint64_t first, uint64_t nblocks) noexcept nogil:
        """If blocks [first, first+nblocks) are all allocated and nobody claims them exclusively,
        claim them shared and return 1: a write may go straight to the overlay.  Else 0."""
        cdef int r = 0
        cdef uint64_t end = first + nblocks
        pthread_mutex_lock(&self.bm.lock)
        if bitmap_all(&self.bm, first, end, BLOCK_ALLOCATED) and \
                not claims_conflict(&self.bm, first, end, False):
            r = claims_add(&self.bm, c, first, end, False)
            if r == 0:
                r = 1
        pthread_mutex_unlock(&self.bm.lock)
        return r

    cdef void release(self, claim_t *c) noexcept nogil:
        if self.global_mode:
            pthread_mutex_unlock(&self.global_lock)
            return
        pthread_mutex_lock(&self.bm.lock)
        claims_remove(&self.bm, c)
        pthread_mutex_unlock(&self.bm.lock)

    cdef void mark(self, uint64_t first, uint64_t end, int state, uint64_t reserved) noexcept nogil:
        """After the data is in the overlay: blocks [first, end) take state, and the room
        reserved for them is released (now counted as allocated)."""
        cdef uint64_t i
        pthread_mutex_lock(&self.bm.lock)
        for i in range(first, end):
            bitmap_set_blk(&self.bm, i, state)
        unreserve(&self.bm, reserved)
        pthread_mutex_unlock(&self.bm.lock)

    # -- block core --------------------------------------------------------------------------

    cdef inline uint64_t blk_bytes(self, uint64_t blknum) noexcept nogil:
        """Bytes of block blknum inside the disk (less than blksize only for the last block)."""
        cdef uint64_t start = blknum << self.blkshift
        cdef uint64_t n = self.c_size - start
        return n if n < self.blksize else self.blksize

    cdef inline uint64_t run_bytes(self, uint64_t first, uint64_t end) noexcept nogil:
        """Bytes of blocks [first, end) inside the disk."""
        return ((end - first - 1) << self.blkshift) + self.blk_bytes(end - 1)

    cdef bint cow_on_read_active(self) noexcept nogil:
        if self.cor_mode == COR_ON:
            return True
        if self.cor_mode == COR_PATH:
            return access(self.cor_path_c, F_OK) == 0
        return False

    cdef int install(self, uint64_t first, uint64_t nblocks, const uint8_t *data) noexcept nogil:
        """Copy backing data (whole blocks) up into those of blocks [first, first+nblocks) that
        are still not allocated: a write or trim that completed meanwhile wins.  Failing to
        install is not an error (the data read is right either way)."""
        cdef claim_t c
        cdef uint64_t b = first, e, end = first + nblocks, k
        cdef int r = 0
        if self.claim(&c, first, nblocks) < 0:
            return 0
        while b < end and r == 0:
            pthread_mutex_lock(&self.bm.lock)
            e = bitmap_run_end(&self.bm, b, end)
            k = 0
            if bitmap_get_blk(&self.bm, b) == BLOCK_NOT_ALLOCATED:
                k = reserve_upto(&self.bm, e - b)      # a full overlay takes what fits
                e = b + k
            pthread_mutex_unlock(&self.bm.lock)
            if e == b:
                break           # the overlay is full
            if k:
                r = overlay_pwrite(&self.ov, data + ((b - first) << self.blkshift),
                                   self.run_bytes(b, e), b << self.blkshift)
                self.mark(b, e if r == 0 else b, BLOCK_ALLOCATED, k)
            b = e
        self.release(&c)
        return 0

    cdef inline int put(self, const uint8_t *buf, psrc_t *src, uint64_t count,
                        uint64_t offset) noexcept nogil:
        """Write count bytes of block data at offset: from buf, or (src not NULL) the
        payload's next count bytes, spliced out of its pipes."""
        if src != NULL:
            return psrc_write(src, self.ov.fd, count, self.ov.data_offset + offset)
        return overlay_pwrite(&self.ov, buf, count, offset)

    cdef int write_blocks(self, uint64_t first, uint64_t nblocks, const uint8_t *buf,
                          psrc_t *src=NULL) noexcept nogil:
        """Write whole blocks (the last may end at the end of the disk) with one pwrite (or
        splice: see put)."""
        cdef claim_t c
        cdef uint64_t i, fresh = 0, end = first + nblocks
        cdef uint64_t offset = first << self.blkshift, count = self.run_bytes(first, end)
        cdef int r
        if not self.global_mode:
            r = self.claim_allocated(&c, first, nblocks)
            if r != 0:
                if r == 1:
                    r = self.put(buf, src, count, offset)
                    self.release(&c)
                return r
        if self.claim(&c, first, nblocks) < 0:
            return -ENOMEM
        pthread_mutex_lock(&self.bm.lock)
        for i in range(first, end):
            if bitmap_get_blk(&self.bm, i) != BLOCK_ALLOCATED:
                fresh += 1
        r = reserve(&self.bm, fresh)
        pthread_mutex_unlock(&self.bm.lock)
        if r == 0:
            r = self.put(buf, src, count, offset)
            self.mark(first, end if r == 0 else first, BLOCK_ALLOCATED, fresh)   # data first
        self.release(&c)
        return r

    cdef int write_partial(self, uint64_t blknum, uint64_t blkoffs, uint64_t n,
                           const uint8_t *src, psrc_t *psrc=NULL) noexcept nogil:
        """Write n bytes at blkoffs inside one block (src NULL: zeroes; psrc not NULL: the
        payload's next n bytes).  An allocated block is written in place; otherwise the block is
        built (from the backing, or zeroes if trimmed), merged and written whole, under an
        exclusive claim on that block alone."""
        cdef claim_t c
        cdef uint64_t offset = (blknum << self.blkshift) + blkoffs
        cdef const uint8_t *data = src if src != NULL else self.zero_block
        cdef uint8_t *block
        cdef int state, r
        if not self.global_mode:
            r = self.claim_allocated(&c, blknum, 1)
            if r != 0:
                if r == 1:
                    r = self.put(data, psrc, n, offset)
                    self.release(&c)
                return r
        if self.claim(&c, blknum, 1) < 0:
            return -ENOMEM
        state = self.get_state(blknum)       # stable now: the block is ours
        if state == BLOCK_ALLOCATED:
            r = self.put(data, psrc, n, offset)
        elif state == BLOCK_TRIMMED and src == NULL and psrc == NULL:
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
                    r = self.b.read(block, self.blksize, blknum << self.blkshift)
                if r == 0 and psrc != NULL:
                    r = psrc_read(psrc, block + blkoffs, n)
                elif r == 0:
                    memcpy(block + blkoffs, data, n)
                if r == 0:
                    pthread_mutex_lock(&self.bm.lock)
                    r = reserve(&self.bm, 1)
                    pthread_mutex_unlock(&self.bm.lock)
                if r == 0:
                    r = overlay_pwrite(&self.ov, block, self.blk_bytes(blknum),
                                       blknum << self.blkshift)
                    self.mark(blknum, blknum + (r == 0), BLOCK_ALLOCATED, 1)
                free(block)
        self.release(&c)
        return r

    cdef int zero_blocks(self, uint64_t first, uint64_t nblocks, bint may_trim) noexcept nogil:
        """Whole blocks read as zeroes: trimmed (space given back), or, if the client wants them
        kept allocated, allocated with their overlay space punched (which also reads as zeroes)."""
        cdef claim_t c
        cdef uint64_t i, fresh = 0, punched = 0, end = first + nblocks
        cdef uint64_t offset = first << self.blkshift, count = nblocks << self.blkshift
        cdef int r = 0
        if self.claim(&c, first, nblocks) < 0:
            return -ENOMEM
        pthread_mutex_lock(&self.bm.lock)
        for i in range(first, end):
            if bitmap_get_blk(&self.bm, i) == BLOCK_ALLOCATED:
                punched += 1
            else:
                fresh += 1
            if may_trim:
                bitmap_set_blk(&self.bm, i, BLOCK_TRIMMED)
        if not may_trim:
            r = reserve(&self.bm, fresh)
        pthread_mutex_unlock(&self.bm.lock)
        if r == 0 and (punched or not may_trim):
            if not overlay_punch(&self.ov, count, offset):
                if may_trim:
                    r = 0       # trimmed blocks read as zeroes whatever the overlay holds
                else:
                    r = overlay_write_zeroes(&self.ov, self.zero_block, self.blksize, count, offset)
            if not may_trim:
                self.mark(first, end if r == 0 else first, BLOCK_ALLOCATED, fresh)
        self.release(&c)
        return r

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
        cdef uint64_t end = offset + count, blknum, run_end, n, limit
        cdef int state, r = 0
        while count > 0 and r == 0:
            blknum = offset >> self.blkshift
            limit = ((end - 1) >> self.blkshift) + 1
            if self.global_mode:
                limit = blknum + 1          # the seed's "before": one block at a time
                pthread_mutex_lock(&self.global_lock)
            pthread_mutex_lock(&self.bm.lock)
            state = bitmap_get_blk(&self.bm, blknum)
            run_end = bitmap_run_end(&self.bm, blknum, limit) << self.blkshift
            pthread_mutex_unlock(&self.bm.lock)
            n = (run_end if run_end < end else end) - offset
            if state == BLOCK_ALLOCATED:
                r = overlay_pread(&self.ov, buf, n, offset)
            elif state == BLOCK_TRIMMED:
                memset(buf, 0, n)
            elif not self.cow_on_read_active():
                r = self.b.read(buf, n, offset)
            else:
                if self.global_mode:        # the copy-up takes the lock again
                    pthread_mutex_unlock(&self.global_lock)
                r = self.read_copy_up(buf, n, offset)
                if self.global_mode:
                    pthread_mutex_lock(&self.global_lock)
            if self.global_mode:
                pthread_mutex_unlock(&self.global_lock)
            buf += n
            offset += n
            count -= n
        return r

    cdef int read_copy_up(self, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
        """cow-on-read: read [offset, offset+count) (blocks not allocated) from the backing and
        copy the blocks it touches up into the overlay (see cor_plan)."""
        cdef cor_t p
        cdef int r = self.cor_plan(&p, buf, count, offset)
        if r < 0:
            return r
        if self.global_mode:
            pthread_mutex_lock(&self.global_lock)
        r = self.b.read_pieces(p.pieces, p.n)
        if self.global_mode:
            pthread_mutex_unlock(&self.global_lock)
        if r == 0:
            self.cor_finish(&p)
        cor_free(&p)
        return r

    cdef int cor_plan(self, cor_t *p, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
        """The backing reads of a cow-on-read of [offset, offset+count): each block is read
        once, whole: whole blocks straight into buf, a partial head or tail block into a block
        buffer, all in flight together; cor_finish then copies and installs them."""
        cdef uint64_t mask = self.blksize - 1, end = offset + count
        cdef uint64_t first = offset >> self.blkshift, last = (end - 1) >> self.blkshift
        cdef bint tail_partial = (end & mask) != 0 and end != self.c_size
        cdef bint head_partial = (offset & mask) != 0 or (first == last and tail_partial)
        memset(p, 0, sizeof(cor_t))
        p.buf, p.offset, p.count, p.first, p.last = buf, offset, count, first, last
        p.mid_start = ((first + 1) << self.blkshift) if head_partial else offset
        if first == last and head_partial:
            tail_partial = False            # one block, read whole as the head
        p.mid_end = (last << self.blkshift) if tail_partial else end
        if p.mid_end < p.mid_start:
            p.mid_end = p.mid_start
        if head_partial:
            p.head = <uint8_t *>malloc(self.blksize)
            if p.head == NULL:
                return -ENOMEM
            p.pieces[p.n].buf = p.head
            p.pieces[p.n].count = self.blksize
            p.pieces[p.n].offset = first << self.blkshift
            p.n += 1
        if tail_partial:
            p.tail = <uint8_t *>malloc(self.blksize)
            if p.tail == NULL:
                cor_free(p)
                return -ENOMEM
            p.pieces[p.n].buf = p.tail
            p.pieces[p.n].count = self.blksize
            p.pieces[p.n].offset = last << self.blkshift
            p.n += 1
        if p.mid_end > p.mid_start:
            p.pieces[p.n].buf = buf + (p.mid_start - offset)
            p.pieces[p.n].count = p.mid_end - p.mid_start
            p.pieces[p.n].offset = p.mid_start
            p.n += 1
        return 0

    cdef void cor_finish(self, cor_t *p) noexcept nogil:
        """The backing reads of a cor_plan are in: fill buf from the block buffers, and install
        every block read (those still not allocated)."""
        cdef uint64_t mask = self.blksize - 1, end = p.offset + p.count
        if p.head != NULL:
            memcpy(p.buf, p.head + (p.offset & mask),
                   min(end, (p.first + 1) << self.blkshift) - p.offset)
            self.install(p.first, 1, p.head)
        if p.mid_end > p.mid_start:
            self.install(p.mid_start >> self.blkshift,
                         (p.mid_end - p.mid_start + mask) >> self.blkshift,
                         p.buf + (p.mid_start - p.offset))
        if p.tail != NULL:
            memcpy(p.buf + ((p.last << self.blkshift) - p.offset), p.tail,
                   end - (p.last << self.blkshift))
            self.install(p.last, 1, p.tail)

    cdef int c_pread_start(self, uint8_t *buf, uint64_t count, uint64_t offset,
                           aread_t *r) noexcept nogil:
        """pread_start's core: read what the overlay holds now, start reading the rest from the
        backing.  0: done, buf filled; 1: started (r goes to its queue when the data is in);
        2: not here (global lock mode, a backing that cannot, cow-on-read over blocks partly
        allocated): use c_pread; <0: error."""
        cdef uint64_t end = offset + count, blknum, run_end, n, limit
        cdef piece_t pieces[MAX_ASYNC_PIECES]
        cdef int state, npieces = 0, rc = 0
        if self.global_mode:
            return 2
        limit = ((end - 1) >> self.blkshift) + 1
        if self.cor_mode != COR_OFF and self.cow_on_read_active():
            pthread_mutex_lock(&self.bm.lock)
            blknum = self.any_not_allocated(offset >> self.blkshift, limit)
            pthread_mutex_unlock(&self.bm.lock)
            if blknum:      # else all in the overlay: read it below
                return self.cor_start(buf, count, offset, r, limit)
        while count > 0 and rc == 0:
            blknum = offset >> self.blkshift
            pthread_mutex_lock(&self.bm.lock)
            state = bitmap_get_blk(&self.bm, blknum)
            run_end = bitmap_run_end(&self.bm, blknum, limit) << self.blkshift
            pthread_mutex_unlock(&self.bm.lock)
            n = (run_end if run_end < end else end) - offset
            if state == BLOCK_ALLOCATED:
                rc = overlay_pread(&self.ov, buf, n, offset)
            elif state == BLOCK_TRIMMED:
                memset(buf, 0, n)
            elif npieces == MAX_ASYNC_PIECES:
                return 2
            else:
                pieces[npieces].buf = buf
                pieces[npieces].count = n
                pieces[npieces].offset = offset
                npieces += 1
            buf += n
            offset += n
            count -= n
        if rc < 0 or npieces == 0:
            return rc
        rc = self.b.read_async(pieces, npieces, aread_done, r)
        if rc == -EAGAIN:
            return 2
        if rc == 1:
            return 0            # nothing to wait for after all
        return 1 if rc == 0 else rc

    cdef int c_read_plan(self, rplan_t *plan, uint64_t count, uint64_t offset,
                         bint holes) noexcept nogil:
        """Engine.read_plan's core: the pieces that make up [offset, offset+count), each from
        the overlay, from a file backing, or zeroes (trimmed blocks; with holes, also the
        backing's holes, found with SEEK_DATA).  0, or 2: not here (global lock mode, a piece
        that needs an NBD backing, cow-on-read over blocks not allocated): use c_pread; <0:
        error.  Each piece holds what c_pread would read from the same place at this moment."""
        cdef uint64_t end = offset + count, blknum, run_end, n, k, limit, pos
        cdef runs_t runs
        cdef size_t i
        cdef int state, r = 0
        if self.global_mode:
            return 2
        limit = ((end - 1) >> self.blkshift) + 1
        while count > 0 and r == 0:
            blknum = offset >> self.blkshift
            pthread_mutex_lock(&self.bm.lock)
            state = bitmap_get_blk(&self.bm, blknum)
            run_end = bitmap_run_end(&self.bm, blknum, limit) << self.blkshift
            pthread_mutex_unlock(&self.bm.lock)
            n = (run_end if run_end < end else end) - offset
            if state == BLOCK_ALLOCATED:
                r = rplan_add(plan, self.ov.fd, self.ov.data_offset + offset, n)
            elif state == BLOCK_TRIMMED:
                r = rplan_add(plan, -1, 0, n)
            elif self.b.fd < 0 or self.cow_on_read_active():
                return 2
            else:
                plan.backing = True
                k = 0                   # bytes of the backing; past its end: zeroes
                if offset < self.b.c_size:
                    k = min(n, self.b.c_size - offset)
                if k and holes:
                    memset(&runs, 0, sizeof(runs))
                    runs.limit = <size_t>-1
                    r = self.b.extents(&runs, offset, k)
                    pos = offset
                    i = 0
                    while r == 0 and i < runs.n:
                        r = rplan_add(plan, -1 if runs.kind[i] & T_HOLE_ZERO else self.b.fd,
                                      pos, runs.length[i])
                        pos += runs.length[i]
                        i += 1
                    runs_free(&runs)
                    if r == 0 and pos != offset + k:
                        r = -EIO
                elif k:
                    r = rplan_add(plan, self.b.fd, offset, k)
                if r == 0:
                    r = rplan_add(plan, -1, 0, n - k)
            offset += n
            count -= n
        return r

    cdef int cor_start(self, uint8_t *buf, uint64_t count, uint64_t offset, aread_t *r,
                       uint64_t limit) noexcept nogil:
        """pread_start with cow-on-read, for a read of blocks none of which is allocated (the
        common case: a first pass over the disk; else 2, use c_pread): the backing reads start
        now, the copy-up happens when the read is collected (ReadQueue.wait)."""
        cdef uint64_t first = offset >> self.blkshift
        cdef bint fresh
        cdef int rc
        pthread_mutex_lock(&self.bm.lock)
        fresh = bitmap_get_blk(&self.bm, first) == BLOCK_NOT_ALLOCATED and \
            bitmap_run_end(&self.bm, first, limit) == limit
        pthread_mutex_unlock(&self.bm.lock)
        if not fresh:
            return 2
        r.cor = <cor_t *>malloc(sizeof(cor_t))
        if r.cor == NULL:
            return -ENOMEM
        rc = self.cor_plan(r.cor, buf, count, offset)
        if rc == 0:
            rc = self.b.read_async(r.cor.pieces, r.cor.n, aread_done, r)
            if rc == 0:
                return 1
            if rc == 1:         # nothing was read: past the backing's end, zeroes
                self.cor_finish(r.cor)
                rc = 0
            elif rc == -EAGAIN:
                rc = 2
            cor_free(r.cor)
        free(r.cor)
        r.cor = NULL
        return rc

    cdef int c_pwrite(self, const uint8_t *buf, uint64_t count, uint64_t offset,
                      psrc_t *src=NULL) noexcept nogil:
        """Write count bytes at offset from buf, or (src not NULL, buf NULL) from a payload
        received into pipes, taken piece by piece in order."""
        cdef uint64_t blknum, blkoffs, n, nblocks
        cdef int r = 0
        while count > 0 and r == 0:
            self.next_piece(offset, count, &blknum, &blkoffs, &n, &nblocks)
            if nblocks == 0:
                r = self.write_partial(blknum, blkoffs, n, buf, src)
            elif self.global_mode:
                n = self.blk_bytes(blknum)     # one block at a time under the global lock
                r = self.write_blocks(blknum, 1, buf, src)
            else:
                r = self.write_blocks(blknum, nblocks, buf, src)
            if buf != NULL:
                buf += n
            offset += n
            count -= n
        return r

    cdef int c_zero(self, uint64_t count, uint64_t offset, bint may_trim, bint fast) noexcept nogil:
        cdef uint64_t blknum, blkoffs, n, nblocks, end = offset + count
        cdef int r = 0
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
        """NBD_CMD_CACHE: a hint passed to the backing, or with cow-on-cache a copy-up of every
        block of the range not yet allocated (runs of them at a time)."""
        cdef uint64_t blknum, end, run_end, chunk_blocks
        cdef uint8_t *buf
        cdef int r = 0
        if not self.c_cow_on_cache:
            self.b.cache(count, offset)
            return 0
        blknum = offset >> self.blkshift
        end = ((offset + count - 1) >> self.blkshift) + 1
        chunk_blocks = CACHE_CHUNK >> self.blkshift
        if chunk_blocks == 0:
            chunk_blocks = 1
        buf = <uint8_t *>malloc(min(end - blknum, chunk_blocks) << self.blkshift)
        if buf == NULL:
            return -ENOMEM
        while blknum < end and r == 0:
            pthread_mutex_lock(&self.bm.lock)
            run_end = bitmap_run_end(&self.bm, blknum, min(end, blknum + chunk_blocks))
            if bitmap_get_blk(&self.bm, blknum) != BLOCK_NOT_ALLOCATED:
                blknum = run_end
                pthread_mutex_unlock(&self.bm.lock)
                continue
            pthread_mutex_unlock(&self.bm.lock)
            r = self.b.read(buf, (run_end - blknum) << self.blkshift, blknum << self.blkshift)
            if r == 0:
                self.install(blknum, run_end - blknum, buf)
            blknum = run_end
        free(buf)
        return r

    cdef int c_extents(self, runs_t *runs, uint64_t count, uint64_t offset,
                       bint depth) noexcept nogil:
        """Runs of (length, type) from offset; depth=True: qemu:allocation-depth instead."""
        cdef uint64_t end = offset + count, blknum, run_end, n, limit
        cdef int state, r = 0
        limit = ((end - 1) >> self.blkshift) + 1
        while offset < end and not runs_full(runs):
            blknum = offset >> self.blkshift
            pthread_mutex_lock(&self.bm.lock)
            state = bitmap_get_blk(&self.bm, blknum)
            run_end = bitmap_run_end(&self.bm, blknum, limit)
            if depth and state != BLOCK_NOT_ALLOCATED:
                # Allocated and trimmed blocks are both in the overlay: one run.
                while run_end < limit and bitmap_get_blk(&self.bm, run_end) != BLOCK_NOT_ALLOCATED:
                    run_end = bitmap_run_end(&self.bm, run_end, limit)
            pthread_mutex_unlock(&self.bm.lock)
            run_end <<= self.blkshift
            n = (run_end if run_end < end else end) - offset
            if depth:
                r = runs_add(runs, n, C_DEPTH_BACKING if state == BLOCK_NOT_ALLOCATED
                             else C_DEPTH_OVERLAY)
            elif state == BLOCK_ALLOCATED:
                r = runs_add(runs, n, T_DATA)
            elif state == BLOCK_TRIMMED:
                r = runs_add(runs, n, T_HOLE_ZERO)
            else:
                r = self.b.extents(runs, offset, n)
            if r < 0:
                return r
            offset += n
        return 0

    cdef int c_blk_read(self, uint64_t blknum, uint8_t *block) noexcept nogil:
        """Read one whole block (blksize bytes; past the end of the disk: zeroes)."""
        cdef uint64_t n = self.blk_bytes(blknum)
        cdef int state, r = 0
        if self.global_mode:
            pthread_mutex_lock(&self.global_lock)
        state = self.get_state(blknum)
        if state == BLOCK_ALLOCATED:
            r = overlay_pread(&self.ov, block, n, blknum << self.blkshift)
            memset(block + n, 0, self.blksize - n)
        elif state == BLOCK_TRIMMED:
            memset(block, 0, self.blksize)
        else:
            r = self.b.read(block, self.blksize, blknum << self.blkshift)
        if self.global_mode:
            pthread_mutex_unlock(&self.global_lock)
        if r == 0 and state == BLOCK_NOT_ALLOCATED and self.cow_on_read_active():
            self.install(blknum, 1, block)
        return r

    cdef int c_blk_cache(self, uint64_t blknum, int mode) noexcept nogil:
        cdef uint8_t *block
        cdef int r
        if self.get_state(blknum) != BLOCK_NOT_ALLOCATED:
            return 0
        if mode != C_CACHE_MODE_COW:
            self.b.cache(self.blksize, blknum << self.blkshift)
            return 0
        block = <uint8_t *>malloc(self.blksize)
        if block == NULL:
            return -ENOMEM
        r = self.b.read(block, self.blksize, blknum << self.blkshift)
        if r == 0:
            self.install(blknum, 1, block)
        free(block)
        return r

    # -- calls in progress (close waits for them) ------------------------------------------

    cdef int enter(self) except -1:
        """Count a call in (close waits for it); call first, before checking arguments."""
        if self.closing or self.ov.fd < 0:
            raise ValueError("cow: the engine is closed")
        self.active += 1
        return 0

    cdef inline void leave(self) noexcept:
        self.active -= 1

    cdef bint any_not_allocated(self, uint64_t first, uint64_t end) noexcept nogil:
        """Is a block of [first, end) not allocated? (bitmap lock held)"""
        while first < end:
            if bitmap_get_blk(&self.bm, first) == BLOCK_NOT_ALLOCATED:
                return True
            first = bitmap_run_end(&self.bm, first, end)
        return False
