# READs over an NBD backing that Engine.serve starts and answers itself, and the read budget.
# Included into cow/engine.pyx after serve.pxi.
#
# Over an NBD backing a READ of blocks not copied up waits milliseconds for the backing.  The
# reader (Engine.serve, without the GIL) starts it and goes on reading requests: the engine
# fills the reply's buffer as the backing answers (BlockCore.c_pread_start), the backing's
# dispatcher hands the finished read to the connection's queue (aread_done), and the
# connection's replier thread (Transmission.reply_reads, also without the GIL) sends every
# reply that finished together with one sendmsg.  So a client's whole queue depth becomes
# backing reads in flight with no thread each, and no Python on the way: the front end sees
# only reads that failed (it words their error replies) and the end.
#
# What bounds them, per connection (the Transmission): at most max_reads reads in flight
# (serve()'s and the front end's own pread_start reads share the slots), and the read budget
# (ReadBudget): bytes of READ replies held in memory, per connection and server-wide, shared
# with the front end's workers.  A reader at either waits, after sending the replies it holds
# back, so a client that never reads its replies holds its own budget and no more.

cdef enum:
    LEAVE_IT = -1                   # serve_backing_read: the front end's
    SEND_REPLIES = 32               # replies gathered into one sendmsg (SEND_IOV: two buffers each)


# ---------------------------------------------------------------------------------------------
# The read budget

cdef struct budget_t:
    pthread_mutex_t m
    pthread_cond_t cond             # room was given back, or a waiter should look again
    uint64_t per_connection
    uint64_t total
    uint64_t always                 # a connection holding nothing may always take this much
    uint64_t in_use
    int waiting


cdef bint budget_fits(budget_t *b, uint64_t mine, uint64_t count) noexcept nogil:
    if mine and mine + count > b.per_connection:
        return False
    return b.in_use == 0 or b.in_use + count <= b.total or (mine == 0 and count <= b.always)


cdef bint budget_try_take(budget_t *b, Transmission tx, uint64_t count) noexcept nogil:
    cdef bint ok
    pthread_mutex_lock(&b.m)
    ok = budget_fits(b, tx.read_in_use, count)
    if ok:
        tx.read_in_use += count
        b.in_use += count
    pthread_mutex_unlock(&b.m)
    return ok


cdef int budget_take(budget_t *b, Transmission tx, uint64_t count) noexcept nogil:
    """Charge count bytes to tx, waiting for room.  0, or -ESHUTDOWN once the server is
    shutting down, -ECONNRESET once the connection is broken, if still waiting."""
    cdef timespec ts
    cdef int r = 0
    pthread_mutex_lock(&b.m)
    if not budget_fits(b, tx.read_in_use, count):
        b.waiting += 1
        while True:
            if cow_sc_load(&tx.stopping):
                r = -ESHUTDOWN
                break
            if cow_atomic_load(&tx.broken):
                r = -ECONNRESET
                break
            clock_gettime(CLOCK_REALTIME, &ts)
            ts.tv_sec += 1                  # woken by give() and wake(); the timeout: a net
            pthread_cond_timedwait(&b.cond, &b.m, &ts)
            if budget_fits(b, tx.read_in_use, count):
                break
        b.waiting -= 1
    if r == 0:
        tx.read_in_use += count
        b.in_use += count
    pthread_mutex_unlock(&b.m)
    return r


cdef void budget_give(budget_t *b, Transmission tx, uint64_t count) noexcept nogil:
    pthread_mutex_lock(&b.m)
    tx.read_in_use -= count
    b.in_use -= count
    if b.waiting:
        pthread_cond_broadcast(&b.cond)
    pthread_mutex_unlock(&b.m)


cdef class ReadBudget:
    """Bytes of READ replies held in memory, per connection (its Transmission) and server-wide.

    A reply's buffer is charged from before it is allocated until the reply has left (or
    failed): reads started over an NBD backing, READs read by workers, and under TLS a READ
    larger than the batch buffer.  A connection over its per_connection budget, or the server
    over total, waits before the next such READ, and its reader stops reading requests
    meanwhile: a client that never reads its replies holds at most its own budget, never the
    server's.  A connection with nothing charged may always take one READ however large (a
    request above the budget is served alone), as long as the server has room, or holds
    nothing, or it is at most ``always``: so that however many clients hold their budgets,
    every other client can still have one READ of a usual size at a time.  The server holds
    at most total, plus ``always`` for each connection.  A waiter gives up with ESHUTDOWN once
    its connection is told the server is shutting down (Transmission.stop), ECONNRESET once
    the connection is broken (Transmission.mark_broken)."""

    cdef budget_t b

    def __cinit__(self, per_connection, total, always):
        pthread_mutex_init(&self.b.m, NULL)
        pthread_cond_init(&self.b.cond, NULL)
        self.b.per_connection = u64(per_connection, "per_connection")
        self.b.total = u64(total, "total")
        self.b.always = u64(always, "always")

    def __dealloc__(self):
        pthread_cond_destroy(&self.b.cond)
        pthread_mutex_destroy(&self.b.m)

    @property
    def in_use(self):
        return self.b.in_use

    def try_take(self, Transmission tx not None, count):
        cdef uint64_t n = u64(count, "count")
        cdef bint ok
        with nogil:
            ok = budget_try_take(&self.b, tx, n)
        return ok

    def take(self, Transmission tx not None, count):
        """Charge count bytes to tx, waiting for room.  OSError(ESHUTDOWN) once the server is
        shutting down, OSError(ECONNRESET) once the connection is broken, if still waiting."""
        cdef uint64_t n = u64(count, "count")
        cdef int r
        with nogil:
            r = budget_take(&self.b, tx, n)
        if r < 0:
            raise OSError(-r, "the server is shutting down" if r == -ESHUTDOWN
                          else os.strerror(-r))

    def give(self, Transmission tx not None, count):
        cdef uint64_t n = u64(count, "count")
        with nogil:
            budget_give(&self.b, tx, n)

    def wake(self):
        """Make every waiter look again (shutdown, a connection broken)."""
        with nogil:
            pthread_mutex_lock(&self.b.m)
            if self.b.waiting:
                pthread_cond_broadcast(&self.b.cond)
            pthread_mutex_unlock(&self.b.m)


# ---------------------------------------------------------------------------------------------
# Data buffers of the reads in flight, kept for reuse by size class (powers of two from 4 KiB),
# up to POOL_BUDGET idle bytes: a fresh buffer costs a page fault and a zeroed page for every
# 4 KiB the backing's data lands in, as much CPU here as the data's copies.  The buffers hold
# only data (the reply's header is the aread's own), so that a read of 256 KiB takes a buffer
# of 256 KiB.  Buffers over POOL_MAX are not kept.

cdef enum:
    POOL_MIN_SHIFT = 12             # classes 4 KiB ...
    POOL_CLASSES = 12               # ... to 8 MiB (POOL_MAX)
    POOL_BUDGET = 64 * 1024 * 1024

cdef pthread_mutex_t apool_m
pthread_mutex_init(&apool_m, NULL)
cdef void *apool_free[POOL_CLASSES]     # a list per class, linked through the buffers
cdef size_t apool_idle = 0


cdef int apool_class(size_t need, size_t *size) noexcept nogil:
    """The class of a buffer of at least need bytes (and its size), or -1: not kept."""
    cdef int c = 0
    cdef size_t s = <size_t>1 << POOL_MIN_SHIFT
    while s < need:
        s <<= 1
        c += 1
    size[0] = s
    return c if c < POOL_CLASSES else -1


cdef uint8_t *apool_get(size_t need, size_t *size) noexcept nogil:
    """A buffer of at least need bytes (*size: its size), or NULL."""
    global apool_idle
    cdef int c = apool_class(need, size)
    cdef void *p = NULL
    if c < 0:
        size[0] = need
        return <uint8_t *>malloc(need)
    pthread_mutex_lock(&apool_m)
    p = apool_free[c]
    if p != NULL:
        apool_free[c] = (<void **>p)[0]
        apool_idle -= size[0]
    pthread_mutex_unlock(&apool_m)
    if p == NULL:
        p = malloc(size[0])
    return <uint8_t *>p


cdef void apool_put(uint8_t *p, size_t size) noexcept nogil:
    global apool_idle
    cdef size_t s
    cdef int c = apool_class(size, &s)
    if c >= 0 and s == size:
        pthread_mutex_lock(&apool_m)
        if apool_idle + size <= POOL_BUDGET:
            (<void **>p)[0] = apool_free[c]
            apool_free[c] = p
            apool_idle += size
            p = NULL
        pthread_mutex_unlock(&apool_m)
    free(p)


# ---------------------------------------------------------------------------------------------
# Read slots: reads in flight on a connection

cdef int slot_take(Transmission tx) noexcept nogil:
    """Wait for a read slot.  0, or -ESHUTDOWN / -ECONNRESET while waiting."""
    cdef int r = 0
    pthread_mutex_lock(&tx.rq.m)
    while tx.reads >= tx.max_reads:
        if cow_sc_load(&tx.stopping):
            r = -ESHUTDOWN
            break
        if cow_atomic_load(&tx.broken):
            r = -ECONNRESET
            break
        pthread_cond_wait(&tx.slot_cond, &tx.rq.m)
    if r == 0:
        cow_sc_store(&tx.reads, tx.reads + 1)
    pthread_mutex_unlock(&tx.rq.m)
    return r


cdef void slot_give(Transmission tx, int n) noexcept nogil:
    pthread_mutex_lock(&tx.rq.m)
    cow_sc_store(&tx.reads, tx.reads - n)
    pthread_cond_broadcast(&tx.slot_cond)
    pthread_mutex_unlock(&tx.rq.m)


# ---------------------------------------------------------------------------------------------
# Starting a read (the reader, in serve_loop) and answering it (the replier)

cdef void aread_release(Engine e, Transmission tx, aread_t *r) noexcept nogil:
    """What a read started by serve() held, given back (its slot is given by the caller)."""
    if r.cor != NULL:
        cor_free(r.cor)
        free(r.cor)
    apool_put(r.mem, r.memsize)
    budget_give(tx.budget, tx, r.count)
    free(r)


cdef void aread_drop(Transmission tx, aread_t *r) noexcept nogil:
    """A failed read's buffers given back; r itself is kept (the front end answers it)."""
    if r.cor != NULL:
        cor_free(r.cor)
        free(r.cor)
        r.cor = NULL
    apool_put(r.mem, r.memsize)
    r.mem = NULL
    budget_give(tx.budget, tx, r.count)


cdef int serve_backing_read(Engine e, Transmission tx, uint64_t cookie, uint16_t flags,
                            uint64_t offset, uint32_t count, failure_t *fail) noexcept nogil:
    """Start a READ that needs the NBD backing.  0: started (the replier answers it) or
    answered; LEAVE_IT: the engine cannot start it so (cow-on-read over blocks partly
    allocated...): the front end serves it, nothing was taken; ST_FAILED (its error reply is
    the front end's) or ST_BROKEN."""
    cdef size_t head = DATA_CHUNK_BYTES if tx.structured else SIMPLE_BYTES
    cdef aread_t *r
    cdef iovec iov[2]
    cdef int rc
    fail.op = "pread"
    if tx.reads >= tx.max_reads or not budget_try_take(tx.budget, tx, count):
        # At a bound: what is held back leaves first (the client may wait for it before
        # reading on), then wait.
        rc = tx_flush(tx)
        if rc < 0:
            fail.err = -rc
            return ST_BROKEN
        rc = slot_take(tx)
        if rc == 0:
            rc = budget_take(tx.budget, tx, count)
            if rc < 0:
                slot_give(tx, 1)
        if rc < 0:
            fail.err = -rc
            return ST_FAILED
    else:
        rc = slot_take(tx)          # a slot is free: no wait
    r = <aread_t *>calloc(1, sizeof(aread_t))
    if r != NULL:
        r.mem = apool_get(count, &r.memsize)
    if r == NULL or r.mem == NULL:
        free(r)
        budget_give(tx.budget, tx, count)
        slot_give(tx, 1)
        fail.err = ENOMEM
        return ST_FAILED
    r.queue = &tx.rq
    r.cookie = cookie
    r.offset = offset
    r.count = count
    r.flags = flags
    pthread_mutex_lock(&tx.rq.m)
    tx.rq.pending += 1
    pthread_mutex_unlock(&tx.rq.m)
    cow_atomic_add(&e.served_reads, 1)
    rc = e.c_pread_start(r.mem, count, offset, r)
    if rc == 1:
        return 0                    # the replier answers it
    pthread_mutex_lock(&tx.rq.m)
    tx.rq.pending -= 1
    pthread_mutex_unlock(&tx.rq.m)
    if rc == 0:                     # done at once (copied up meanwhile): answer it now
        rc = tx_flush(tx)
        if rc == 0:
            put_reply_head(tx, r)
            iov[0].iov_base = r.head
            iov[0].iov_len = head
            iov[1].iov_base = r.mem
            iov[1].iov_len = count
            pthread_mutex_lock(&tx.send_mutex)
            rc = send_iov(tx.sock, iov, 2, 0)
            pthread_mutex_unlock(&tx.send_mutex)
        if rc < 0:
            fail.err = -rc
            rc = ST_BROKEN
    elif rc == 2:
        rc = LEAVE_IT
    else:
        fail.err = -rc
        rc = ST_FAILED
    aread_release(e, tx, r)
    slot_give(tx, 1)
    cow_atomic_add(&e.served_reads, -1)
    return rc


cdef void put_reply_head(Transmission tx, aread_t *r) noexcept nogil:
    if tx.structured:
        put_chunk(r.head, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, r.count + 8, r.offset)
    else:
        put_simple(r.head, r.cookie)


cdef int reply_batch(Engine e, Transmission tx, aread_t *r, aread_t **failed) noexcept nogil:
    """Send the replies of the finished reads r (a list) with sendmsg, and give back what they
    held; the failed ones are moved to *failed (their buffers freed) for the front end to
    answer.  0 or -errno of the send (the client is gone: the rest are dropped)."""
    cdef iovec iov[SEND_IOV]
    cdef aread_t *batch[SEND_REPLIES]
    cdef aread_t *nxt
    cdef int n = 0, i, err = 0
    cdef size_t head = DATA_CHUNK_BYTES if tx.structured else SIMPLE_BYTES
    while r != NULL or n:
        if r != NULL and n < SEND_REPLIES:
            nxt = r.next
            if r.status == 0 and r.cor != NULL:     # cow-on-read: copy up what was read
                e.cor_finish(r.cor)
            if r.status != 0:
                aread_drop(tx, r)
                r.next = failed[0]
                failed[0] = r
            else:
                put_reply_head(tx, r)
                iov[2 * n].iov_base = r.head
                iov[2 * n].iov_len = head
                iov[2 * n + 1].iov_base = r.mem
                iov[2 * n + 1].iov_len = r.count
                batch[n] = r
                n += 1
            r = nxt
            continue
        if err == 0 and not cow_atomic_load(&tx.broken):
            pthread_mutex_lock(&tx.send_mutex)
            err = send_iov(tx.sock, iov, 2 * n, 0)
            pthread_mutex_unlock(&tx.send_mutex)
            if err < 0:
                cow_atomic_store(&tx.broken, 1)
        for i in range(n):
            aread_release(e, tx, batch[i])
        n = 0
    return err


cdef enum:                          # why serve_replies returned
    RP_END = 0          # the queue is closed and nothing is pending: the replier ends
    RP_FAILED = 1       # info: [(cookie, flags, offset, count, errno)] to answer
    RP_BROKEN = 2       # info: the errno of the send that failed
    RP_IDLE = 3         # the last read in flight was answered while the server shuts down

# ... for the front end
REPLIED_END = RP_END
REPLIED_FAILED = RP_FAILED
REPLIED_BROKEN = RP_BROKEN
REPLIED_IDLE = RP_IDLE


def serve_replies(Engine e not None, Transmission tx not None):
    """The replier of the reads Engine.serve started on tx (see above): send their replies as
    they finish, all that finished together in one sendmsg, without the GIL.  Returns
    (status, info) only when the front end has something to do: RP_END, RP_FAILED,
    RP_BROKEN or RP_IDLE (see there); call again after anything but RP_END."""
    cdef aread_t *r
    cdef aread_t *nxt
    cdef aread_t *failed = NULL
    cdef int n, err = 0, status
    with nogil:
        while True:
            r = rq_take(&tx.rq, &n)
            if r == NULL:
                status = RP_END
                break
            err = reply_batch(e, tx, r, &failed)
            slot_give(tx, n)
            cow_atomic_add(&e.served_reads, -n)
            if failed != NULL:
                status = RP_FAILED
                break
            if err < 0:
                status = RP_BROKEN
                break
            if cow_sc_load(&tx.reads) == 0 and cow_sc_load(&tx.stopping):
                status = RP_IDLE
                break
    if status == RP_BROKEN:
        return status, -err
    if status != RP_FAILED:
        return status, None
    info = []
    while failed != NULL:
        nxt = failed.next
        info.append((failed.cookie, failed.flags, failed.offset, failed.count, -failed.status))
        free(failed)
        failed = nxt
    info.reverse()
    return status, info
