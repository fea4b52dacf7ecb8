# WRITE payloads moved from a socket into the overlay without passing through this process
# (Engine.pwrite_from).  Included into cow/engine.pyx.
#
# The payload is first received whole, with splice, from the socket into pipes (the kernel hands
# the socket's pages over, no copy), before any block is claimed or written: so a claim never
# waits for the network, and a payload cut short (the client went away) writes nothing.  Then
# each piece of the write takes its data from the pipes in order: a run of whole blocks, or a
# piece of an allocated block, is spliced from the pipes into the overlay; a piece of a block
# that must be read, modified and written (not allocated, partly written) is read out of the
# pipes into the block's buffer.  A payload the pipes cannot hold (a pipe takes about 1 MiB,
# and a process only so many pipe pages) is received into memory instead.
#
# The pipes come from a pool kept by the engine (making one and sizing it costs 4 system calls),
# emptied when the engine closes.  Anything unusual while receiving (splice refused, no pipe to
# be had, a pipe that takes nothing) sends the rest of the payload the ordinary way, into memory
# with recv, whose errors are then the socket's own.
#
# The pipe budget.  Every pipe costs two descriptors, and a payload that stops arriving would
# hold its pipes (up to MAX_PAYLOAD_PIPES) for as long as it waits.  So the process as a whole
# has at most pipe_budget_c() pipes open for payloads, idle ones in the engines' pools included:
# an eighth of RLIMIT_NOFILE's soft limit (pipes then take at most a quarter of the
# descriptors), and at most PIPE_BUDGET_MAX.  Descriptors are the process's, not an engine's,
# hence one count for all the engines (views) of the process.  A payload that finds the budget
# spent is not refused and does not wait: it goes on into memory (psrc_to_memory), as one the
# pipes cannot hold does, and gives its pipes back at once.
#
# Waiting.  A payload that stops arriving ends with -ETIMEDOUT after wait_t.timeout_ms without
# a byte (the connection cannot go on: nothing of the payload is written).  The limit is on
# silence, not on the whole payload, so a slow client on a slow link is never cut off while it
# makes progress.  Before each wait, wait_t.before runs (Engine.serve: send the replies held
# back, which the client may be waiting for before it sends the rest).

cdef enum:
    PIPE_BYTES = 1024 * 1024        # asked for with F_SETPIPE_SZ (the usual pipe-max-size)
    MAX_PAYLOAD_PIPES = 64          # pipes for one payload; more: received into memory
    PIPE_BUDGET_MAX = 128           # pipes the process may have open for payloads (at most)
    DRAIN_BYTES = 256 * 1024        # the scratch buffer of drain()
    KEEP_PIPES = 4                  # idle pipes the pool keeps (2 descriptors each)
    SECTOR_BYTES = 512              # psrc_write never leaves one half written


cdef extern from *:
    """
    static int cow_pipes_open;      /* pipes of every engine in this process, idle ones included */
    static int cow_pipe_budget;     /* 0 until the first pipe is asked for */
    """
    int cow_pipes_open
    int cow_pipe_budget


cdef struct wait_t:                 # how a payload's receiver waits for the socket
    int sock
    int timeout_ms                  # nothing received for this long: -ETIMEDOUT (< 0: no limit)
    int (*before)(void *arg) noexcept nogil    # runs before each wait (NULL: nothing)
    void *arg


cdef struct pipes_t:                # the engine's pool of idle pipes
    pthread_mutex_t lock
    int *rfd
    int *wfd
    int n
    int cap


cdef struct psrc_t:                 # a payload: first bytes in memory, the rest in pipes
    const uint8_t *mem              # received with the request's header (the receive buffer)
    uint64_t mem_left
    int rfd[MAX_PAYLOAD_PIPES]
    int wfd[MAX_PAYLOAD_PIPES]
    uint64_t fill[MAX_PAYLOAD_PIPES]    # bytes in each pipe not yet taken
    int n                           # pipes in use
    int cur                         # the pipe data is taken from now


cdef void pipes_init(pipes_t *pool) noexcept nogil:
    memset(pool, 0, sizeof(pipes_t))
    pthread_mutex_init(&pool.lock, NULL)


cdef int pipe_budget_c() noexcept nogil:
    """The most pipes the process may have open for payloads (see the top of this file)."""
    cdef rlimit lim
    cdef int budget = cow_atomic_load(&cow_pipe_budget)
    cdef uint64_t n = PIPE_BUDGET_MAX
    if budget == 0:
        if getrlimit(RLIMIT_NOFILE, &lim) == 0 and lim.rlim_cur != RLIM_INFINITY:
            n = min(n, <uint64_t>lim.rlim_cur // 8)
        budget = <int>n if n > 0 else -1        # -1: no pipes at all
        cow_atomic_store(&cow_pipe_budget, budget)
    return budget if budget > 0 else 0


cdef void pipe_close(int rfd, int wfd) noexcept nogil:
    close(rfd)
    close(wfd)
    cow_atomic_add(&cow_pipes_open, -1)


cdef void pipes_drain(pipes_t *pool) noexcept nogil:
    """Close the idle pipes (the engine is closing)."""
    cdef int i
    pthread_mutex_lock(&pool.lock)
    for i in range(pool.n):
        pipe_close(pool.rfd[i], pool.wfd[i])
    free(pool.rfd)
    free(pool.wfd)
    pool.rfd = pool.wfd = NULL
    pool.n = pool.cap = 0
    pthread_mutex_unlock(&pool.lock)


cdef void pipes_destroy(pipes_t *pool) noexcept nogil:
    pipes_drain(pool)
    pthread_mutex_destroy(&pool.lock)


cdef int pipe_get(pipes_t *pool, int *rfd, int *wfd) noexcept nogil:
    """An empty pipe from the pool, or a new one (as large as the system allows, up to
    PIPE_BYTES).  0, -EAGAIN (the process's pipe budget is spent) or -errno."""
    cdef int fds[2]
    pthread_mutex_lock(&pool.lock)
    if pool.n:
        pool.n -= 1
        rfd[0] = pool.rfd[pool.n]
        wfd[0] = pool.wfd[pool.n]
        pthread_mutex_unlock(&pool.lock)
        return 0
    pthread_mutex_unlock(&pool.lock)
    if cow_atomic_add(&cow_pipes_open, 1) > pipe_budget_c():
        cow_atomic_add(&cow_pipes_open, -1)
        return -EAGAIN
    if pipe2(fds, O_CLOEXEC) != 0:
        cow_atomic_add(&cow_pipes_open, -1)
        return -errno
    fcntl(fds[1], F_SETPIPE_SZ, <int>PIPE_BYTES)   # else the default size: less per pipe
    rfd[0] = fds[0]
    wfd[0] = fds[1]
    return 0


cdef void pipe_put(pipes_t *pool, int rfd, int wfd, bint empty) noexcept nogil:
    """Give a pipe back: kept if it is empty and the pool has room, else closed."""
    cdef void *p
    cdef int cap
    if empty:
        pthread_mutex_lock(&pool.lock)
        if pool.n < KEEP_PIPES:
            if pool.n == pool.cap:
                cap = pool.cap * 2 if pool.cap else 8
                p = realloc(pool.rfd, cap * sizeof(int))
                if p != NULL:
                    pool.rfd = <int *>p
                    p = realloc(pool.wfd, cap * sizeof(int))
                    if p != NULL:
                        pool.wfd = <int *>p
                        pool.cap = cap
            if pool.n < pool.cap:
                pool.rfd[pool.n] = rfd
                pool.wfd[pool.n] = wfd
                pool.n += 1
                pthread_mutex_unlock(&pool.lock)
                return
        pthread_mutex_unlock(&pool.lock)
    pipe_close(rfd, wfd)


cdef void psrc_release(pipes_t *pool, psrc_t *src) noexcept nogil:
    """Give the payload's pipes back (those with data left are closed)."""
    cdef int i
    for i in range(src.n):
        pipe_put(pool, src.rfd[i], src.wfd[i], src.fill[i] == 0)
    src.n = 0


cdef int wait_readable(wait_t *w) noexcept nogil:
    """Wait until the socket has data (or its end, or an error), after w.before.  0, -ETIMEDOUT
    (nothing for w.timeout_ms) or -errno."""
    cdef pollfd p
    cdef int r
    if w.before != NULL:
        r = w.before(w.arg)
        if r < 0:
            return r
    p.fd = w.sock
    p.events = POLLIN
    while True:
        r = poll(&p, 1, w.timeout_ms)
        if r > 0:
            return 0
        if r == 0:
            return -ETIMEDOUT
        if errno != EINTR:
            return -errno


cdef bint readable_now(int sock) noexcept nogil:
    cdef pollfd p
    p.fd = sock
    p.events = POLLIN
    p.revents = 0
    return poll(&p, 1, 0) > 0


cdef int psrc_receive(pipes_t *pool, psrc_t *src, wait_t *w, uint64_t count) noexcept nogil:
    """Receive count bytes from w.sock into pipes.  0: all in; 1: go on with psrc_to_memory
    (the pipes cannot hold them, the pipe budget is spent, or splice does not work here: what
    the pipes hold stays); -EPIPE: the stream ended first; -ETIMEDOUT; -errno (poll failed)."""
    cdef ssize_t r
    cdef int rc, tries = 0, sock = w.sock
    while count:
        if src.cur == src.n:
            if src.n == MAX_PAYLOAD_PIPES:
                return 1
            rc = pipe_get(pool, &src.rfd[src.n], &src.wfd[src.n])
            if rc < 0:
                return 1
            src.fill[src.n] = 0
            src.n += 1
        r = splice(sock, NULL, src.wfd[src.cur], NULL, count, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if r > 0:
            src.fill[src.cur] += r
            count -= r
            continue
        if r == 0:
            return -EPIPE
        if errno == EINTR:
            continue
        if errno != EAGAIN:
            return 1                # recv will say what is wrong, if anything
        # Either the socket has nothing yet, or this pipe is full: then go on with the next.
        if readable_now(sock):
            if src.fill[src.cur] == 0:
                tries += 1
                if tries > 2:
                    return 1        # an empty pipe that takes nothing: no splice here
                continue
            src.cur += 1
        else:
            rc = wait_readable(w)
            if rc < 0:
                return rc
    src.cur = 0
    return 0


cdef int psrc_read(psrc_t *src, uint8_t *buf, uint64_t n) noexcept nogil:
    """Take the payload's next n bytes into buf.  0 or -errno."""
    cdef uint64_t k
    cdef ssize_t r
    k = min(n, src.mem_left)
    if k:
        memcpy(buf, src.mem, k)
        src.mem += k
        src.mem_left -= k
        buf += k
        n -= k
    while n:
        if src.cur >= src.n:
            return -EIO
        if src.fill[src.cur] == 0:
            src.cur += 1
            continue
        r = read(src.rfd[src.cur], buf, min(n, src.fill[src.cur]))
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            return -EIO
        src.fill[src.cur] -= r
        buf += r
        n -= r
    return 0


cdef int psrc_write(psrc_t *src, int fd, uint64_t n, uint64_t offset) noexcept nogil:
    """Write the payload's next n bytes at offset of fd: the bytes in memory with pwrite, the
    rest spliced out of the pipes.  0 or -errno.

    Every system call but the last ends on a sector (SECTOR_BYTES) boundary of the file: a
    process killed between two of them leaves each sector whole, old or new, as a disk does
    (the kernel stops a write killed midway between pages, never inside one).  So where the
    memory or a pipe ends inside a sector, that sector is taken out into memory, from both
    sides, and written with one pwrite.

    A splice asked for whole sectors may still come back short (a file-size limit, a full
    disk: the file system stops at a page boundary, but a limit may stop it anywhere).  Where
    it stopped inside a sector it started at or before (never before this write's start: those
    bytes are another write's), the next call starts again at that sector's boundary: the bytes
    just written there are read back and written again with the sector's next bytes from the
    payload, one pwrite (full_pwrite does the same from memory)."""
    cdef uint8_t sector[SECTOR_BYTES]
    cdef uint64_t avail, k, head
    cdef int r
    cdef ssize_t s
    cdef off_t off
    while n:
        if src.mem_left:
            avail = src.mem_left
        else:
            while src.cur < src.n and src.fill[src.cur] == 0:
                src.cur += 1
            if src.cur >= src.n:
                return -EIO
            avail = src.fill[src.cur]
        if avail >= n:
            k = n
        else:                               # up to the last sector boundary in this source
            k = (offset + avail) & ~(<uint64_t>SECTOR_BYTES - 1)
            k = k - offset if k > offset else 0
        if k == 0:                          # this source ends inside the sector at offset
            k = min(n, SECTOR_BYTES - (offset & (SECTOR_BYTES - 1)))
            r = psrc_read(src, sector, k)
            if r == 0:
                r = full_pwrite(fd, sector, k, offset)
            if r < 0:
                return r
        elif src.mem_left:
            r = full_pwrite(fd, src.mem, k, offset)
            if r < 0:
                return r
            src.mem += k
            src.mem_left -= k
        else:
            off = <off_t>offset
            s = splice(src.rfd[src.cur], NULL, fd, &off, k, SPLICE_F_MOVE)
            if s < 0:
                if errno == EINTR:
                    continue
                return -errno
            if s == 0:
                return -EIO
            src.fill[src.cur] -= s
            k = s
            head = (offset + k) & (SECTOR_BYTES - 1)
            if k < n and head != 0 and k >= head:   # short, inside a sector: see above
                k -= head
                r = read_back(fd, sector, head, offset + k)
                if r < 0:
                    return r
                s = <ssize_t>min(n - k - head, SECTOR_BYTES - head)
                r = psrc_read(src, sector + head, s)
                if r == 0:
                    r = full_pwrite(fd, sector, head + s, offset + k)
                if r < 0:
                    return r
                k += head + s
        offset += k
        n -= k
    return 0


cdef int read_back(int fd, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Read count bytes just written at offset of fd.  0 or -errno (the file ends first: EIO)."""
    cdef ssize_t r
    while count:
        r = pread(fd, buf, count, <off_t>offset)
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


cdef int psrc_to_memory(psrc_t *src, wait_t *w, uint8_t *buf, uint64_t count) noexcept nogil:
    """The pipes could not hold the payload: take what they and the memory hold into buf (count
    bytes in all), then receive the rest from w.sock.  0, -EPIPE (the stream ended),
    -ETIMEDOUT or -errno."""
    cdef uint64_t have = src.mem_left, k
    cdef ssize_t r
    cdef int i
    src.cur = 0
    for i in range(src.n):
        have += src.fill[i]
    r = psrc_read(src, buf, have)
    if r < 0:
        return r
    k = have
    while k < count:
        r = recv(w.sock, buf + k, count - k, MSG_DONTWAIT)
        if r > 0:
            k += r
        elif r == 0:
            return -EPIPE
        elif errno == EAGAIN:
            r = wait_readable(w)
            if r < 0:
                return r
        elif errno != EINTR:
            return -errno
    return 0


cdef int drain(wait_t *w, uint64_t count) noexcept nogil:
    """Receive count bytes from w.sock and drop them (a payload that will not be written).  0,
    -EPIPE (the stream ended first), -ETIMEDOUT or -errno."""
    cdef uint8_t *scratch = <uint8_t *>malloc(DRAIN_BYTES)
    cdef ssize_t r
    cdef int rc = 0
    if scratch == NULL:
        return -ENOMEM
    while count and rc == 0:
        r = recv(w.sock, scratch, min(count, <uint64_t>DRAIN_BYTES), MSG_DONTWAIT)
        if r > 0:
            count -= r
        elif r == 0:
            rc = -EPIPE
        elif errno == EAGAIN:
            rc = wait_readable(w)
        elif errno != EINTR:
            rc = -errno
    free(scratch)
    return rc


cdef int drain_rest(psrc_t *src, wait_t *w, uint64_t count) noexcept nogil:
    """Drop the rest of a payload of count bytes whose start is in memory and pipes.  0,
    -EPIPE, -ETIMEDOUT or -errno."""
    cdef uint64_t have = src.mem_left
    cdef int i
    for i in range(src.n):
        have += src.fill[i]
    return drain(w, count - have)
