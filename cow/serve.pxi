# The transmission phase's common requests served without the GIL (Engine.serve).  Included
# into cow/engine.pyx.
#
# A front end in Python pays for every request it touches: decoding the header, and above all
# taking the GIL back after each system call (a futex hand-off between the connections'
# threads, and often a context switch, whenever another thread holds it).  With several busy
# connections that costs more than the I/O itself.  So the reader thread of a connection calls
# Engine.serve(), which reads requests from the socket, serves and answers them in one loop
# with the GIL released, for as long as they are READ, WRITE or FLUSH requests that are valid
# and need no slow backing: it waits for the next request itself, and returns only for a
# request it leaves to the front end (other commands, anything invalid, requests that would
# wait for an NBD backing), a failed request, the end of the stream or the server's shutdown.
#
# It works on the front end's own receive buffer (the bytes it read ahead stay there for it),
# sends its replies under the connection's send lock (the Transmission, which every thread that
# sends on the connection holds), and gathers the replies of requests that arrived together
# into one sendmsg, as the front end does: they leave before the loop could block, a large
# WRITE's payload included (the client may send it only once it has those replies).  Large
# READs go out with sendfile (the read plan, as ReadPlan.send), large WRITE payloads are
# spliced into the overlay (c_pwrite_from), exactly as through the Python calls.  A payload,
# small or large, that stops arriving for the payload timeout ends the connection
# (ST_TRUNCATED, ETIMEDOUT); the wait for the next request has no limit.

cdef extern from *:
    """
    #include <endian.h>
    #include <string.h>
    static inline uint16_t cow_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
    static inline uint32_t cow_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
    static inline uint64_t cow_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
    static inline void cow_put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
    static inline void cow_put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
    static inline void cow_put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
    /* Sequentially consistent: the reader's "waiting" and the main thread's "stopping" are
       each stored, then the other one loaded (see Transmission). */
    static inline void cow_sc_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int cow_sc_load(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    """
    uint16_t cow_get16(const uint8_t *p) noexcept nogil
    uint32_t cow_get32(const uint8_t *p) noexcept nogil
    uint64_t cow_get64(const uint8_t *p) noexcept nogil
    void cow_put16(uint8_t *p, uint16_t v) noexcept nogil
    void cow_put32(uint8_t *p, uint32_t v) noexcept nogil
    void cow_put64(uint8_t *p, uint64_t v) noexcept nogil
    void cow_sc_store(int *p, int v) noexcept nogil
    int cow_sc_load(int *p) noexcept nogil
    void *memmove(void *dst, const void *src, size_t n) nogil


cdef enum:
    # The protocol's numbers (NetworkBlockDevice/nbd doc/proto.md; cow/protocol.py has them all)
    REQUEST_BYTES = 28
    REQUEST_MAGIC = 0x25609513
    SIMPLE_MAGIC = 0x67446698
    STRUCTURED_MAGIC = 0x668e33ef
    SIMPLE_BYTES = 16               # magic, error, cookie
    CHUNK_BYTES = 20                # magic, flags, type, cookie, length
    DATA_CHUNK_BYTES = 28           # ... and the offset of an OFFSET_DATA chunk
    HOLE_CHUNK_BYTES = 32           # ... and the offset and length of an OFFSET_HOLE chunk
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_FLUSH = 3
    CMD_FLAG_FUA = 1
    CMD_FLAG_DF = 4
    REPLY_FLAG_DONE = 1
    REPLY_TYPE_OFFSET_DATA = 1
    REPLY_TYPE_OFFSET_HOLE = 2

    # Why serve() returned
    ST_FRONT_END = 0             # the request at the buffer's start is the front end's
    ST_STOP = 1                  # the server is shutting down (nothing read of a request)
    ST_EOF = 2                   # the stream ended (or failed) between requests
    ST_TRUNCATED = 3             # the stream ended, or stalled, inside a WRITE payload:
                                 # nothing written (failure_t.err: 0, or ETIMEDOUT...)
    ST_BROKEN = 4                # sending a reply failed: the connection cannot go on
    ST_FAILED = 5                # a request failed: the front end sends its error reply

    REPLY_ARENA = 512 * 1024        # replies held back while more requests are buffered


cdef struct failure_t:              # what serve() hands back with ST_FAILED / ST_BROKEN
    uint64_t cookie
    uint64_t offset
    uint32_t count
    uint16_t cmd
    uint16_t flags
    int err
    const char *op


cdef class Transmission:
    """One connection's transmission, as Engine.serve needs it: the socket, what was
    negotiated, the replies held back.  It is also the lock that every reply on the connection
    is sent under (``with tx:``), by any thread: serve() takes it without the GIL."""

    cdef pthread_mutex_t send_mutex
    cdef int sock
    cdef bint structured            # structured replies were negotiated
    cdef bint fua                   # NBD_FLAG_SEND_FUA was advertised
    cdef bint readonly
    cdef bint slow_backing          # requests that would read the backing are the front end's
    cdef uint64_t size
    cdef uint64_t max_payload
    cdef uint64_t large_request     # READs from this size are the front end's (its workers)
    cdef uint64_t zero_copy_read    # READs from this size are sent with sendfile
    cdef uint64_t zero_copy_write   # WRITE payloads from this size are spliced
    cdef uint64_t recv_ahead        # most a recv asks for beyond the request being read
    cdef int exact_reads            # requests read without reading ahead after a spliced WRITE
    cdef int exact
    cdef int stopping
    cdef int waiting
    cdef uint8_t *arena             # replies held back: arena[:pos]
    cdef size_t pos
    cdef psrc_t src
    cdef wait_t wait                # how a payload is waited for (sends the replies held back)
    # Reads over an NBD backing (areads.pxi)
    cdef rq_t rq                    # serve()'s reads come out here; rq.m also guards reads
    cdef pthread_cond_t slot_cond   # a read slot was given back
    cdef int reads                  # reads in flight, serve()'s and the front end's
    cdef int max_reads
    cdef int broken                 # the client is gone: replies are dropped (atomic)
    cdef uint64_t read_in_use       # bytes of READ replies held (the budget's, under its lock)
    cdef budget_t *budget           # NULL: serve() leaves reads over the backing to the front end
    cdef object budget_obj

    def __cinit__(self):
        pthread_mutex_init(&self.send_mutex, NULL)
        pthread_mutex_init(&self.rq.m, NULL)
        pthread_cond_init(&self.rq.cond, NULL)
        pthread_cond_init(&self.slot_cond, NULL)
        self.sock = -1
        self.max_reads = 1

    def __dealloc__(self):
        free(self.arena)
        pthread_cond_destroy(&self.slot_cond)
        pthread_cond_destroy(&self.rq.cond)
        pthread_mutex_destroy(&self.rq.m)
        pthread_mutex_destroy(&self.send_mutex)

    def configure_reads(self, ReadBudget budget not None, int max_reads, *, bint serve):
        """The connection's read budget and read slots (at most max_reads reads in flight over
        an NBD backing).  serve: Engine.serve starts and answers such reads itself (someone
        must then run serve_replies); else it leaves them to the front end."""
        self.budget_obj = budget
        self.budget = &budget.b if serve else NULL
        self.max_reads = max(1, max_reads)

    @property
    def read_in_use(self):
        """Bytes of READ replies this connection holds (charged to its ReadBudget)."""
        return self.read_in_use

    @property
    def reads_in_flight(self):
        """Reads over an NBD backing in flight (serve()'s and the front end's)."""
        return cow_sc_load(&self.reads)

    def take_read_slot(self):
        """Wait for a read slot (the front end's own reads over the backing share them).
        OSError(ESHUTDOWN) once the server is shutting down, OSError(ECONNRESET) once the
        connection is broken, if still waiting."""
        cdef int r
        with nogil:
            r = slot_take(self)
        if r < 0:
            raise OSError(-r, "the server is shutting down" if r == -ESHUTDOWN
                          else os.strerror(-r))

    def give_read_slot(self):
        with nogil:
            slot_give(self, 1)

    def mark_broken(self):
        """The client is gone: waiters for a slot or the budget give up, replies are dropped."""
        cow_atomic_store(&self.broken, 1)
        self.wake_waiters()

    def close_reads(self):
        """serve_replies returns REPLIED_END once nothing is pending any more."""
        with nogil:
            pthread_mutex_lock(&self.rq.m)
            self.rq.closed = True
            pthread_cond_broadcast(&self.rq.cond)
            pthread_mutex_unlock(&self.rq.m)

    def wake_waiters(self):
        with nogil:
            pthread_mutex_lock(&self.rq.m)
            pthread_cond_broadcast(&self.slot_cond)
            pthread_mutex_unlock(&self.rq.m)

    def configure(self, int sock, *, bint structured, bint fua, bint readonly, size,
                  max_payload, bint slow_backing, large_request, zero_copy_read,
                  zero_copy_write, recv_ahead, int exact_reads, payload_timeout=None):
        """Set at the start of transmission, before serve() is first called.  payload_timeout:
        seconds without a byte inside a WRITE payload before the connection is given up (None
        or 0: no limit)."""
        self.wait.timeout_ms = timeout_ms(payload_timeout)
        self.wait.sock = sock
        self.wait.before = tx_flush_held
        self.wait.arg = <void *>self
        self.sock = sock
        self.structured = structured
        self.fua = fua
        self.readonly = readonly
        self.size = u64(size, "size")
        self.max_payload = u64(max_payload, "max_payload")
        self.slow_backing = slow_backing
        self.large_request = u64(large_request, "large_request")
        self.zero_copy_read = u64(zero_copy_read, "zero_copy_read")
        self.zero_copy_write = u64(zero_copy_write, "zero_copy_write")
        self.recv_ahead = u64(recv_ahead, "recv_ahead")
        self.exact_reads = exact_reads
        if self.large_request > REPLY_ARENA - DATA_CHUNK_BYTES:
            raise ValueError(f"cow: large_request {large_request}: READs served in memory must "
                             f"fit the {REPLY_ARENA} bytes held back for replies")
        if self.arena == NULL:
            self.arena = <uint8_t *>malloc(REPLY_ARENA)
            if self.arena == NULL:
                raise MemoryError()

    def stop(self):
        """The server is shutting down: serve() returns ST_STOP instead of waiting for the
        next request.  Stored before ``waiting`` is looked at (the reader does the converse),
        so that either serve() sees it or the caller sees serve() waiting (and wakes it by
        shutting the socket for reading)."""
        cow_sc_store(&self.stopping, 1)
        self.wake_waiters()

    @property
    def waiting(self):
        """serve() is waiting for the next request."""
        return bool(cow_sc_load(&self.waiting))

    def __enter__(self):
        if pthread_mutex_trylock(&self.send_mutex) != 0:
            with nogil:
                pthread_mutex_lock(&self.send_mutex)
        return self

    def __exit__(self, *exc):
        pthread_mutex_unlock(&self.send_mutex)


cdef int tx_flush(Transmission tx) noexcept nogil:
    """Send the replies held back.  0 or -errno."""
    cdef iovec iov
    cdef int r
    if tx.pos == 0:
        return 0
    iov.iov_base = tx.arena
    iov.iov_len = tx.pos
    pthread_mutex_lock(&tx.send_mutex)
    r = send_iov(tx.sock, &iov, 1, 0)
    pthread_mutex_unlock(&tx.send_mutex)
    tx.pos = 0
    return r


cdef int tx_flush_held(void *tx) noexcept nogil:
    """wait_t.before of a payload received by serve(): the replies held back leave first."""
    return tx_flush(<Transmission>tx)


cdef int rx_fill(Transmission tx, uint8_t *rx, size_t cap, size_t *start, size_t *end,
                 size_t need, bint between, failure_t *fail) noexcept nogil:
    """Have need bytes from start in the receive buffer (need <= cap), receiving more, waiting
    for them if the socket has none yet (after sending the replies held back).  between: this
    is the next request's header, and the server's shutdown may end the wait; else a payload,
    and a wait longer than the payload timeout ends it.  0, or an ST_ status: ST_EOF (the
    stream ended or failed, or a payload stalled: fail.err ETIMEDOUT; for a payload the caller
    says TRUNCATED), ST_STOP, ST_BROKEN (a reply could not be sent)."""
    cdef size_t have = end[0] - start[0], want
    cdef ssize_t n
    cdef pollfd p
    cdef int r
    if have >= need:
        return 0
    if start[0] + need > cap:           # make room: the partial message to the front
        memmove(rx, rx + start[0], have)
        start[0] = 0
        end[0] = have
    while end[0] - start[0] < need:
        want = need - (end[0] - start[0])
        if tx.exact == 0 and want < tx.recv_ahead:
            want = tx.recv_ahead
        if want > cap - end[0]:
            want = cap - end[0]
        n = recv(tx.sock, rx + end[0], want, MSG_DONTWAIT)
        if n > 0:
            end[0] += n
            continue
        if n == 0:
            return ST_EOF
        if errno == EINTR:
            continue
        if errno != EAGAIN:                 # (EWOULDBLOCK on Linux)
            return ST_EOF
        r = tx_flush(tx)                # nothing more yet: what was answered leaves first
        if r < 0:
            fail.err = -r
            return ST_BROKEN
        if between:
            cow_sc_store(&tx.waiting, 1)
            if cow_sc_load(&tx.stopping):
                cow_sc_store(&tx.waiting, 0)
                return ST_STOP
        p.fd = tx.sock
        p.events = POLLIN
        while True:
            r = poll(&p, 1, -1 if between else tx.wait.timeout_ms)
            if r >= 0 or errno != EINTR:
                break
        if between:
            cow_sc_store(&tx.waiting, 0)
        elif r == 0:
            fail.err = ETIMEDOUT
            return ST_EOF
    return 0


cdef uint8_t *tx_room(Transmission tx, size_t n, int *err) noexcept nogil:
    """n bytes at the end of the replies held back (sending them first if there is no room).
    NULL: sending failed (*err)."""
    cdef int r
    if tx.pos + n > REPLY_ARENA:
        r = tx_flush(tx)
        if r < 0:
            err[0] = -r
            return NULL
    return tx.arena + tx.pos


cdef void put_simple(uint8_t *p, uint64_t cookie) noexcept nogil:
    cow_put32(p, SIMPLE_MAGIC)
    cow_put32(p + 4, 0)
    cow_put64(p + 8, cookie)


cdef void put_chunk(uint8_t *p, uint16_t flags, uint16_t kind, uint64_t cookie, uint32_t length,
                    uint64_t offset) noexcept nogil:
    cow_put32(p, STRUCTURED_MAGIC)
    cow_put16(p + 4, flags)
    cow_put16(p + 6, kind)
    cow_put64(p + 8, cookie)
    cow_put32(p + 16, length)
    cow_put64(p + 20, offset)


cdef int serve_planned(Engine e, Transmission tx, rplan_t *plan, uint64_t cookie, uint16_t flags,
                       uint64_t offset, uint64_t count, failure_t *fail) noexcept nogil:
    """Send a READ reply from the files of plan (ReadPlan.send's way), after the replies held
    back: structured replies without DF describe zero pieces as OFFSET_HOLE chunks, as
    protocol.read_reply_items lays them out.  0 or ST_BROKEN."""
    cdef bint holes = tx.structured and not (flags & CMD_FLAG_DF)
    cdef seg_t *segs = <seg_t *>calloc(2 * plan.n + 2, sizeof(seg_t))
    cdef uint8_t *heads = <uint8_t *>malloc(HOLE_CHUNK_BYTES * (plan.n + 1))
    cdef size_t i, j, n = 0, nh = 0, last_head = 0
    cdef uint64_t at = offset, run
    cdef uint8_t *h
    cdef bint sparse = False
    cdef int r
    if segs == NULL or heads == NULL:
        free(segs)
        free(heads)
        fail.err = ENOMEM
        fail.op = "read_plan"
        return ST_FAILED
    if tx.pos:
        segs[n].buf = tx.arena
        segs[n].count = tx.pos
        n += 1
    for i in range(plan.n):
        if plan.p[i].fd < 0:
            sparse = True
    if not tx.structured:
        put_simple(heads, cookie)
        segs[n].buf = heads
        segs[n].count = SIMPLE_BYTES
        n += 1
    elif not holes or not sparse:
        put_chunk(heads, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, count + 8, offset)
        segs[n].buf = heads
        segs[n].count = DATA_CHUNK_BYTES
        n += 1
    if not tx.structured or not holes or not sparse:
        for i in range(plan.n):
            segs[n].fd = plan.p[i].fd
            segs[n].pos = plan.p[i].pos
            segs[n].count = plan.p[i].count
            segs[n].whole = plan.p[i].fd >= 0 and plan.p[i].fd == e.b.fd
            n += 1
    else:
        i = 0
        while i < plan.n:           # a chunk per hole piece, one per run of data pieces
            h = heads + nh * HOLE_CHUNK_BYTES
            last_head = n
            if plan.p[i].fd < 0:
                put_chunk(h, 0, REPLY_TYPE_OFFSET_HOLE, cookie, 12, at)
                cow_put32(h + DATA_CHUNK_BYTES, <uint32_t>plan.p[i].count)
                segs[n].buf = h
                segs[n].count = HOLE_CHUNK_BYTES
                n += 1
                at += plan.p[i].count
                i += 1
            else:
                run = 0
                j = i
                while j < plan.n and plan.p[j].fd >= 0:
                    run += plan.p[j].count
                    j += 1
                put_chunk(h, 0, REPLY_TYPE_OFFSET_DATA, cookie, <uint32_t>(run + 8), at)
                segs[n].buf = h
                segs[n].count = DATA_CHUNK_BYTES
                n += 1
                while i < j:
                    segs[n].fd = plan.p[i].fd
                    segs[n].pos = plan.p[i].pos
                    segs[n].count = plan.p[i].count
                    segs[n].whole = plan.p[i].fd == e.b.fd
                    n += 1
                    i += 1
                at += run
            nh += 1
        cow_put16(<uint8_t *>segs[last_head].buf + 4, REPLY_FLAG_DONE)
    if plan.backing:
        cow_atomic_add(&e.b.calls, 1)
    pthread_mutex_lock(&tx.send_mutex)
    r = send_segs(tx.sock, segs, n)
    pthread_mutex_unlock(&tx.send_mutex)
    if plan.backing:
        cow_atomic_add(&e.b.calls, -1)
    tx.pos = 0
    free(segs)
    free(heads)
    if r < 0:
        fail.err = -r
        return ST_BROKEN
    return 0


cdef int serve_read(Engine e, Transmission tx, uint64_t cookie, uint16_t flags, uint64_t offset,
                    uint32_t count, failure_t *fail) noexcept nogil:
    """A READ: from the files with sendfile from zero_copy_read bytes, else read after the
    replies held back.  0, ST_FAILED or ST_BROKEN."""
    cdef rplan_t plan
    cdef size_t head = DATA_CHUNK_BYTES if tx.structured else SIMPLE_BYTES
    cdef uint8_t *p
    cdef int r
    if count >= tx.zero_copy_read:
        memset(&plan, 0, sizeof(plan))
        r = e.c_read_plan(&plan, count, offset, tx.structured and not (flags & CMD_FLAG_DF))
        if r == 0:
            r = serve_planned(e, tx, &plan, cookie, flags, offset, count, fail)
        free(plan.p)
        if r < 0:
            fail.err = -r
            fail.op = "read_plan"
            return ST_FAILED
        if r != 2:
            return r
    p = tx_room(tx, head + count, &fail.err)
    if p == NULL:
        return ST_BROKEN
    r = e.c_pread(p + head, count, offset)
    if r < 0:
        fail.err = -r
        fail.op = "pread"
        return ST_FAILED
    if tx.structured:
        put_chunk(p, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, count + 8, offset)
    else:
        put_simple(p, cookie)
    tx.pos += head + count
    return 0


cdef int serve_ok(Transmission tx, uint64_t cookie, failure_t *fail) noexcept nogil:
    cdef uint8_t *p = tx_room(tx, SIMPLE_BYTES, &fail.err)
    if p == NULL:
        return ST_BROKEN
    put_simple(p, cookie)
    tx.pos += SIMPLE_BYTES
    return 0


cdef enum:                          # front_ends()
    SERVED_HERE = 0
    FRONT_END = 1
    BACKING_READ = 2                # a READ that waits for the NBD backing (areads.pxi)


cdef int front_ends(Engine e, Transmission tx, uint16_t cmd, uint16_t flags, uint64_t offset,
                    uint32_t count) noexcept nogil:
    """Is this request the front end's (FRONT_END): not READ, WRITE or FLUSH, not valid (the
    front end says why), or one that waits for a slow backing (the front end overlaps those),
    except a READ that serve() starts itself (BACKING_READ)?"""
    cdef uint64_t first, last, mask = e.blksize - 1
    cdef bint r
    cdef uint16_t allowed = CMD_FLAG_FUA if tx.fua else 0
    if cmd == CMD_FLUSH:
        return FRONT_END if (flags & ~allowed) != 0 or offset != 0 or count != 0 else SERVED_HERE
    if cmd == CMD_READ:
        if tx.structured:
            allowed |= CMD_FLAG_DF
    elif cmd != CMD_WRITE or tx.readonly:
        return FRONT_END
    if (flags & ~allowed) or count == 0 or count > tx.max_payload or offset > tx.size or \
            count > tx.size - offset:
        return FRONT_END
    if cmd == CMD_READ and count >= tx.large_request and not (tx.slow_backing and tx.budget):
        return FRONT_END
    if not tx.slow_backing:
        return SERVED_HERE
    first = offset >> e.blkshift
    last = (offset + count - 1) >> e.blkshift
    pthread_mutex_lock(&e.bm.lock)
    if cmd == CMD_READ:
        r = e.any_not_allocated(first, last + 1)
    else:                               # a WRITE reads only its partial head and tail blocks
        r = ((offset & mask) != 0 and bitmap_get_blk(&e.bm, first) == BLOCK_NOT_ALLOCATED) or \
            ((offset + count) & mask != 0 and offset + count != e.c_size and
             bitmap_get_blk(&e.bm, last) == BLOCK_NOT_ALLOCATED)
    pthread_mutex_unlock(&e.bm.lock)
    if not r:
        return FRONT_END if cmd == CMD_READ and count >= tx.large_request else SERVED_HERE
    return BACKING_READ if cmd == CMD_READ and tx.budget != NULL else FRONT_END


cdef int serve_loop(Engine e, Transmission tx, uint8_t *rx, size_t cap, size_t *start,
                    size_t *end, failure_t *fail) noexcept nogil:
    """Engine.serve's loop.  Returns an ST_ status (after sending the replies held back)."""
    cdef const uint8_t *h
    cdef uint16_t flags, cmd
    cdef uint32_t count
    cdef uint64_t cookie, offset, take
    cdef int r, got, where
    while True:
        r = rx_fill(tx, rx, cap, start, end, REQUEST_BYTES, True, fail)
        if r:
            break
        h = rx + start[0]
        flags = cow_get16(h + 4)
        cmd = cow_get16(h + 6)
        cookie = cow_get64(h + 8)
        offset = cow_get64(h + 16)
        count = cow_get32(h + 24)
        if cow_get32(h) != REQUEST_MAGIC or cow_sc_load(&tx.stopping):
            r = ST_FRONT_END
            break
        where = front_ends(e, tx, cmd, flags, offset, count)
        if where == FRONT_END:
            r = ST_FRONT_END
            break
        fail.cookie = cookie
        fail.cmd = cmd
        fail.flags = flags
        fail.offset = offset
        fail.count = count
        if cmd == CMD_WRITE and count >= tx.zero_copy_write:
            start[0] += REQUEST_BYTES
            take = min(<uint64_t>(end[0] - start[0]), <uint64_t>count)
            memset(&tx.src, 0, sizeof(psrc_t))
            tx.src.mem = rx + start[0]
            tx.src.mem_left = take
            start[0] += take
            if start[0] == end[0]:
                start[0] = end[0] = 0
            tx.exact = tx.exact_reads
            got = 0
            r = e.c_pwrite_from(&tx.src, &tx.wait, count, offset, flags & CMD_FLAG_FUA, &got)
            if got != 0:
                fail.err = -got if got != -EPIPE else 0
                r = ST_TRUNCATED
                break
        else:
            if tx.exact:
                tx.exact -= 1
            if cmd == CMD_WRITE:
                if REQUEST_BYTES + <size_t>count > cap:
                    r = ST_FRONT_END
                    break
                r = rx_fill(tx, rx, cap, start, end, REQUEST_BYTES + count, False, fail)
                if r:
                    if r == ST_EOF:
                        r = ST_TRUNCATED
                    break
                r = e.c_pwrite(rx + start[0] + REQUEST_BYTES, count, offset)
                start[0] += REQUEST_BYTES + count
                if r == 0 and flags & CMD_FLAG_FUA:
                    r = overlay_flush(&e.ov, &e.bm)
            elif cmd == CMD_READ and where == BACKING_READ:
                r = serve_backing_read(e, tx, cookie, flags, offset, count, fail)
                if r == LEAVE_IT:
                    r = ST_FRONT_END
                    break                   # its header stays: the front end's
                start[0] += REQUEST_BYTES
                if r:
                    break
                continue
            elif cmd == CMD_READ:
                start[0] += REQUEST_BYTES
                r = serve_read(e, tx, cookie, flags, offset, count, fail)
                if r:
                    break
                continue
            else:
                start[0] += REQUEST_BYTES
                r = overlay_flush(&e.ov, &e.bm)
            if start[0] == end[0]:
                start[0] = end[0] = 0
        if r < 0:
            fail.err = -r
            fail.op = "flush" if cmd == CMD_FLUSH else "pwrite"
            r = ST_FAILED
            break
        r = serve_ok(tx, cookie, fail)
        if r:
            break
    got = tx_flush(tx)
    if got < 0 and r != ST_BROKEN:
        fail.err = -got
        r = ST_BROKEN
    return r


# What Engine.serve returned, for the front end
SERVE_FRONT_END = ST_FRONT_END
SERVE_STOP = ST_STOP
SERVE_EOF = ST_EOF
SERVE_TRUNCATED = ST_TRUNCATED
SERVE_BROKEN = ST_BROKEN
SERVE_FAILED = ST_FAILED
