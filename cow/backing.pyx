# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The read-only backing: how the engine reads it, asks where its holes are, and warms it.

Three kinds, one interface (`cow/backing.pxd`), none of which knows about blocks:

* a file or block device: pread, SEEK_DATA / SEEK_HOLE, posix_fadvise;
* an NBD export given by URI (nbd://, nbds://, nbd+unix://...), through libnbd;
* a command that serves NBD on systemd socket activation (any nbdkit plugin, qemu-nbd...),
  started here on a listening socket of its own and stopped when the backing closes.  A
  command that cannot be found, exits, or serves no NBD within a bound is a CommandError
  (one line) and leaves no process behind.

Over NBD, requests are asynchronous: every engine thread submits its own with nbd_aio_*
(any number in flight on one handle, each thread waiting only for its own), and one
dispatcher thread per handle, a plain pthread that never touches Python, polls the socket and
runs libnbd's state machine, which completes the requests.  Each request goes to the least busy
handle.  The backing is only read, so there is no cache to keep coherent between connections:
whether or not the server advertises multi-conn, extra handles are opened as load needs them (a
request finds every live handle busy and fewer than the limit open), up to a limit, by one more
thread of the backing (manage), never by an engine thread: many servers serve one request at a
time per connection (nbdkit's curl, ssh and vddk plugins), so parallelism needs connections.
An extra connection the server refuses, or does not greet within EXTRA_TIMEOUT_MS (qemu-nbd
without --shared accepts a second one and never greets it), ends the opening of more: the
backing goes on through those it has, and one line on stderr says so.

When a connection breaks, libnbd retires every request in flight on it with ENOTCONN (an error
reply from the server is another matter: it stays an error).  Reads are idempotent, so those
requests are parked, and the backing's thread connects again with backoff (BACKOFF_FIRST_MS
doubling to BACKOFF_MAX_MS; a command that exited is started again on its socket), checks that
it is the same disk (its size), and sends them again.  Meanwhile reads that need the backing
wait (parked, or their caller waiting), up to the backing's wait (Backing(wait=...)); past it they
fail with EIO, and later ones at once, until a connection is back (the attempts go on).  Reads
of what the overlay holds never come here, so they never wait.  Each change is one line on
stderr: lost (conn_broke, whichever thread finds out first), back, given up, another disk.

Every C-level method is `noexcept nogil` and returns 0 or -errno; a failed NBD request is EIO
(ENOMEM stays ENOMEM), whatever libnbd says about its own state.
"""

from libc.errno cimport errno, EIO, ENOMEM, ENXIO, EINTR, EINVAL, EAGAIN, ECHILD, EPROTO, \
    ETIMEDOUT, ENOENT, EACCES, ENOTCONN
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, UINT64_MAX
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memcpy, strncpy, strncmp, strerror
from posix.types cimport off_t
from posix.unistd cimport usleep
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME

from cow.clib cimport *

import os
import select
import shlex
import shutil
import signal
import socket
import tempfile
import time

cdef enum:
    NBD_CHUNK = 32 * 1024 * 1024    # largest read request we send
    MAX_CONNECTIONS = 64
    STATUS_MAX = 0x80000000         # largest block status request we send
    EXTRA_TIMEOUT_MS = 5000         # an extra connection's handshake must end within this
    RECONNECT_TIMEOUT_MS = 10000    # ... and a connection to a backing that was down
    BACKOFF_FIRST_MS = 100          # a backing that broke: tried again after this, then twice
    BACKOFF_MAX_MS = 2000           # as long each time, up to this


# Most connections to one NBD backing, unless Backing(connections=N) says otherwise (see the
# README's "Over a remote backing" for the measurements behind it): 8, for servers that serve a
# request at a time per connection and do not advertise multi-conn (curl, ssh, vddk); 4 where the
# backing advertises multi-conn, as servers that serve many requests on one connection at once
# do (nbdkit's file plugin, qemu-nbd --shared): there more connections only cost CPU (bench/,
# the remote section: 4 measured 1.1 to 1.3 times 8 on 2 cores).
DEFAULT_CONNECTIONS = 8
DEFAULT_CONNECTIONS_MULTI_CONN = 4

# Reads that need an NBD backing that is down wait this many seconds for it to come back, then
# fail with EIO (Backing(wait=...) overrides it).
DEFAULT_WAIT = 30.0

# A backing command must finish the NBD handshake within this many seconds of being started
# (nbdkit's plugins connect to their remote at the handshake: curl, ssh, vddk...), else it is
# stopped and the backing fails to open.  Backing(start_timeout=...) overrides it.
START_TIMEOUT = 60.0
# At close, a backing command gets SIGTERM, then SIGKILL if it has not exited after this long.
STOP_TIMEOUT = 10.0


class CommandError(OSError):
    """A backing command that could not be started, or that did not serve NBD: str() is one
    line for the user.  errno: ENOENT (not found), EACCES (not executable), ECHILD (it exited),
    ETIMEDOUT (no NBD within the bound), EPROTO (it answered, but not NBD)."""

    def __str__(self):
        return self.strerror


def is_nbd_uri(s):
    """An NBD URI, as libnbd takes it (nbd_connect_uri)."""
    return isinstance(s, str) and s.split(":", 1)[0] in (
        "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")


# ---------------------------------------------------------------------------------------------
# Runs of extents.

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


cdef bint runs_full(const runs_t *runs) noexcept nogil:
    return runs.n >= runs.limit or (runs.req_one and runs.n >= 1)


cdef void runs_free(runs_t *runs) noexcept nogil:
    free(runs.length)
    free(runs.kind)
    runs.length = NULL
    runs.kind = NULL
    runs.n = runs.cap = 0


# ---------------------------------------------------------------------------------------------
# Files.

cdef int full_pread(int fd, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
    """Read exactly count bytes; an unexpected end of file is EIO."""
    cdef ssize_t r
    while count > 0:
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


cdef int file_extents(int fd, runs_t *runs, uint64_t pos, uint64_t end) noexcept nogil:
    """The data and holes of [pos, end) of a file no shorter than end (its size when opened):
    -EIO if it is shorter now (it shrank while served: what it lost is not a hole)."""
    cdef off_t r
    cdef uint64_t data, hole
    cdef int rc
    while pos < end and not runs_full(runs):
        r = lseek(fd, <off_t>pos, SEEK_DATA)
        if r < 0:
            if errno == ENXIO:      # no data from here to the end of the file
                r = lseek(fd, 0, SEEK_END)
                if r >= 0 and <uint64_t>r < end:
                    return -EIO
                return runs_add(runs, end - pos, T_HOLE_ZERO)
            return runs_add(runs, end - pos, T_DATA)   # no SEEK_DATA here: all data
        data = <uint64_t>r
        if data > pos:
            rc = runs_add(runs, (data if data < end else end) - pos, T_HOLE_ZERO)
            if rc < 0:
                return rc
            pos = data
            continue
        r = lseek(fd, <off_t>pos, SEEK_HOLE)
        hole = end if r < 0 else <uint64_t>r
        if hole > end or hole <= pos:
            hole = end
        rc = runs_add(runs, hole - pos, T_DATA)
        if rc < 0:
            return rc
        pos = hole
    return 0


# ---------------------------------------------------------------------------------------------
# NBD: requests in flight, and the dispatcher that completes them.

# A batch: requests submitted together and finished together.  `pending` counts the requests
# not finished plus one held by the submitter until it has submitted them all, so that `done`
# runs exactly once, after the last of them, from whichever thread finishes it: the dispatcher
# (libnbd's completion callback), the backing's thread (a parked request failed), or the
# submitter (when libnbd refused a submission or the last reply came before the submitter let
# go).  A synchronous caller's batch lives on its stack and `done` wakes it; an asynchronous one
# is allocated and `done` hands it on.  Each request is a req_t: a read whose connection dies
# before its answer (libnbd retires it with ENOTCONN; an error reply from the server stays an
# error) is parked for the backing's thread, which sends it again once a connection is up, or
# fails it once the backing has been down longer than its wait.

cdef void batch_init(batch_t *w, batch_done_fn done, void *arg) noexcept nogil:
    w.pending = 1
    w.error = 0
    w.lost = 0
    w.done = done
    w.arg = arg
    w.finished = False


cdef int nbd_status(int err) noexcept nogil:
    """A failed backing request is the backing's fault: EIO, whatever libnbd's errno says about
    its own state (a dead connection gives ENOTCONN, then EINVAL for "invalid state")."""
    return -(ENOMEM if err == ENOMEM else EIO)


cdef inline int batch_status(batch_t *w) noexcept nogil:
    """0, or the status of the first request that failed."""
    cdef int err = cow_atomic_load(&w.error)
    return nbd_status(err) if err else 0


cdef void batch_end_one(batch_t *w, int err) noexcept nogil:
    if err:
        cow_atomic_cas(&w.error, 0, err)
    if cow_atomic_add(&w.pending, -1) == 0:
        w.done(w)


cdef void park(shared_t *s, req_t *r) noexcept nogil:
    """A read whose connection died: the backing's thread sends it again (or fails it); at
    close, it fails now."""
    cdef uint64_t one = 1
    pthread_mutex_lock(&s.m)
    if cow_atomic_load(&s.stop):
        pthread_mutex_unlock(&s.m)
        batch_end_one(r.w, ENOTCONN)
        return
    r.next = s.parked
    s.parked = r
    pthread_mutex_unlock(&s.m)
    write(s.wake, &one, 8)


cdef int on_complete(void *user_data, int *error) noexcept nogil:
    """libnbd's completion callback (dispatcher thread, handle lock held): count down, or park a
    read whose connection died."""
    cdef req_t *r = <req_t *>user_data
    cdef conn_t *c = r.conn
    cdef int err = error[0]
    if err == ENOTCONN:
        if r.retry:
            park(c.backing, r)
            cow_atomic_add(&c.in_flight, -1)
            return 1
        cow_atomic_store(&r.w.lost, 1)
    cow_atomic_add(&c.in_flight, -1)
    batch_end_one(r.w, err)
    return 1        # retire the command: nobody asks for it by cookie


cdef inline nbd_completion_callback completion_for(req_t *r) noexcept nogil:
    cdef nbd_completion_callback cb
    cb.callback = on_complete
    cb.user_data = r
    cb.free = NULL
    return cb


cdef void refused(req_t *r) noexcept nogil:
    """libnbd refused a submission (no callback will come): a read on a connection that died is
    parked, anything else fails."""
    cdef int e = nbd_get_errno()
    cdef conn_t *c = r.conn
    if handle_dead(c.h):
        if r.retry:
            park(c.backing, r)
            cow_atomic_add(&c.in_flight, -1)
            return
        cow_atomic_store(&r.w.lost, 1)
    cow_atomic_add(&c.in_flight, -1)
    batch_end_one(r.w, e if e else EIO)


cdef void submit_req(req_t *r, conn_t *c) noexcept nogil:
    """Send a read (already counted in its batch's pending) on c, held by the caller."""
    r.conn = c
    cow_atomic_add(&c.in_flight, 1)
    if nbd_aio_pread(c.h, r.buf, r.count, r.offset, completion_for(r), 0) == -1:
        refused(r)


# Synchronous callers: a mutex and a condition, on the caller's stack, beside the batch.
cdef struct waiter_t:
    batch_t w
    pthread_mutex_t m
    pthread_cond_t cond


cdef void waiter_done(batch_t *w) noexcept nogil:
    cdef waiter_t *t = <waiter_t *>w.arg
    pthread_mutex_lock(&t.m)
    w.finished = True
    pthread_cond_signal(&t.cond)
    pthread_mutex_unlock(&t.m)


cdef void waiter_init(waiter_t *t) noexcept nogil:
    pthread_mutex_init(&t.m, NULL)
    pthread_cond_init(&t.cond, NULL)
    batch_init(&t.w, waiter_done, t)


cdef int waiter_wait(waiter_t *t) noexcept nogil:
    """Let go of the submitter's hold, wait for every request of the batch; its status."""
    batch_end_one(&t.w, 0)
    pthread_mutex_lock(&t.m)
    while not t.w.finished:
        pthread_cond_wait(&t.cond, &t.m)
    pthread_mutex_unlock(&t.m)
    pthread_cond_destroy(&t.cond)
    pthread_mutex_destroy(&t.m)
    return batch_status(&t.w)


cdef void conn_broke(conn_t *c, const char *cause) noexcept nogil:
    """The connection c is dead (libnbd says so, or failed it).  Every path that finds a dead
    connection comes here: the dispatcher, a submission (a read started for the ReadQueue or
    waited for, block status, cache), whichever comes first.  The first of an outage writes
    what broke, starts its clock and prints the one line; every call marks c dead, wakes its
    dispatcher, which then stops, and the backing's thread, which connects again.  Nothing is
    said when close() ends the connection.

    cause: libnbd's message where the caller's own call failed, else NULL: then what our
    duplicate of the socket shows says it (the server closed it, a reset...)."""
    cdef shared_t *b = c.backing
    cdef uint64_t one = 1
    cdef char peeked
    cdef ssize_t r
    if cow_atomic_load(&c.stop):
        return
    if not cow_atomic_load(&b.stop) and cow_atomic_cas(&b.claimed, 0, 1):
        if cause == NULL:
            r = recv(c.fd, &peeked, 1, MSG_PEEK | MSG_DONTWAIT)
            if r == 0:
                cause = "the server closed the connection"
            elif r < 0 and errno != EAGAIN:
                cause = strerror(errno)
            else:
                cause = "libnbd found the connection unusable"
        strncpy(b.error, cause, 511)
        b.error[511] = 0
        b.down_since = now_ms()
        cow_atomic_store(&b.broken, 1)
        if b.wait_ms > 0:
            fprintf(stderr, b"cow: the backing connection broke (%s): %s; reconnecting, "
                            b"requests that need the backing wait up to %g s\n", b.what, b.error,
                    b.wait_ms / 1000.0)
        else:
            fprintf(stderr, b"cow: the backing connection broke (%s): %s; reconnecting, "
                            b"requests that need the backing fail with EIO until it is back\n",
                    b.what, b.error)
    cow_atomic_cas(&c.live, 1, 0)      # pick() no longer chooses it
    if cow_atomic_cas(&c.dead, 0, 1):
        # libnbd closed its own socket; ours ends the connection, and the dispatcher stops.
        shutdown(c.fd, SHUT_RDWR)
        write(c.wake, &one, 8)
        write(b.wake, &one, 8)


cdef inline bint handle_dead(nbd_handle *h) noexcept nogil:
    return nbd_aio_is_dead(h) or nbd_aio_is_closed(h)


cdef void kick(conn_t *c) noexcept nogil:
    """After submitting, whether libnbd took the requests or not: a connection that died
    meanwhile (our own send may have found the server gone) is reported; and if libnbd could
    not write a whole request without blocking, the dispatcher must watch the socket for
    writing too (it may be asleep watching for reading)."""
    cdef uint64_t one = 1
    if handle_dead(c.h):
        conn_broke(c, NULL)
    elif nbd_aio_get_direction(c.h) & LIBNBD_AIO_DIRECTION_WRITE:
        write(c.wake, &one, 8)


cdef inline void release(conn_t *c) noexcept nogil:
    """A submitter is done with the handle pick() gave it."""
    cow_atomic_add(&c.users, -1)


cdef void *dispatch(void *arg) noexcept nogil:
    """One handle's dispatcher: poll its socket and run libnbd's state machine until close()
    or until the connection breaks (then libnbd has already failed every request on it).
    It polls our own duplicate of the socket: libnbd closes its descriptor when the connection
    dies in another thread, and that number may name another file by the next poll."""
    cdef conn_t *c = <conn_t *>arg
    cdef pollfd fds[2]
    cdef unsigned direction
    cdef uint64_t junk
    cdef int r
    fds[1].fd = c.wake
    fds[1].events = POLLIN
    while not cow_atomic_load(&c.stop):
        if cow_atomic_load(&c.dead) or handle_dead(c.h):   # found dead by another thread
            conn_broke(c, NULL)
            break
        direction = nbd_aio_get_direction(c.h)
        fds[0].fd = c.fd
        fds[0].events = 0
        if direction & LIBNBD_AIO_DIRECTION_READ:
            fds[0].events |= POLLIN
        if direction & LIBNBD_AIO_DIRECTION_WRITE:
            fds[0].events |= POLLOUT
        fds[0].revents = fds[1].revents = 0
        r = poll(fds, 2, -1)
        if r < 0:
            if errno == EINTR:
                continue
            conn_broke(c, strerror(errno))    # cannot watch it: it serves nothing more
            break
        if fds[1].revents & POLLIN:
            read(c.wake, &junk, 8)
        if cow_atomic_load(&c.stop):
            break
        if handle_dead(c.h):
            continue        # killed by another thread's call: reported at the top
        r = 0
        if fds[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL):
            r = nbd_aio_notify_read(c.h)
        if r == 0 and fds[0].revents & POLLOUT:
            r = nbd_aio_notify_write(c.h)
        if r == -1 or handle_dead(c.h):
            # Our call's own message says what broke (a reset, a protocol error), unless the
            # connection died in another thread just before it (EINVAL: "invalid state").
            conn_broke(c, nbd_get_error() if r == -1 and nbd_get_errno() != EINVAL else NULL)
            break
    return NULL


# ---------------------------------------------------------------------------------------------
# NBD: opening connections, in the backing's own thread.

cdef int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef nbd_handle *new_handle() noexcept nogil:
    """A libnbd handle set up as every backing connection is (NULL: libnbd's error)."""
    cdef nbd_handle *h = nbd_create()
    if h == NULL:
        return NULL
    nbd_set_handle_name(h, b"cow-backing")
    # No zero-fill of every read buffer (12% of the server's CPU streaming from a slow
    # backing): a failed read is never used, and a successful one is whole unless the
    # server breaks the protocol, when the buffer's older bytes (data this process read
    # for the same disk) would show instead of zeroes.
    nbd_set_pread_initialize(h, False)
    nbd_add_meta_context(h, b"base:allocation")
    return h


cdef int connect_bounded(shared_t *s, nbd_handle *h, int64_t timeout_ms, char *why,
                         size_t why_len) noexcept nogil:
    """Connect h to the backing (its URI, or its command's socket) and finish the handshake within
    timeout_ms (polling, so that a server that accepts and never greets cannot hold it, nor
    close() wait for it): 0, or -1 with why filled in."""
    cdef int64_t deadline = now_ms() + timeout_ms, left
    cdef pollfd p
    cdef unsigned direction
    cdef int r
    if s.uri != NULL:
        r = nbd_aio_connect_uri(h, s.uri)
    else:
        r = nbd_aio_connect_unix(h, s.sock)
    while r != -1 and nbd_aio_is_connecting(h):
        left = deadline - now_ms()
        if left <= 0:
            snprintf(why, why_len, b"no NBD greeting within %d s", <int>(timeout_ms // 1000))
            return -1
        if cow_atomic_load(&s.stop):
            snprintf(why, why_len, b"closing")
            return -1
        direction = nbd_aio_get_direction(h)
        p.fd = nbd_aio_get_fd(h)
        p.events = 0
        if direction & LIBNBD_AIO_DIRECTION_READ:
            p.events |= POLLIN
        if direction & LIBNBD_AIO_DIRECTION_WRITE:
            p.events |= POLLOUT
        p.revents = 0
        if p.fd < 0:
            break
        r = poll(&p, 1, <int>(left if left < 100 else 100))
        if r <= 0:
            r = 0
            continue
        if p.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL):
            r = nbd_aio_notify_read(h)
        elif p.revents & POLLOUT:
            r = nbd_aio_notify_write(h)
    if r == -1 or not nbd_aio_is_ready(h):
        snprintf(why, why_len, b"%s", nbd_get_error() if nbd_get_error() != NULL
                 else <const char *>b"the connection closed during the handshake")
        return -1
    if <uint64_t>nbd_get_size(h) != s.size:
        snprintf(why, why_len, b"came back as another disk (size %lld, was %llu)",
                 <long long>nbd_get_size(h), <unsigned long long>s.size)
        return -1
    return 0


cdef int conn_prepare(conn_t *c) noexcept nogil:
    """The descriptors of a connected handle's dispatcher: 0 or -errno."""
    # Our own duplicate of libnbd's socket, for the dispatcher (see dispatch).
    c.fd = fcntl(nbd_aio_get_fd(c.h), F_DUPFD_CLOEXEC, 0)
    if c.fd < 0:
        return -(errno or EIO)
    c.wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if c.wake < 0:
        return -errno
    return 0


cdef int conn_start(conn_t *c) noexcept nogil:
    """Start the dispatcher of a prepared connection, then let pick() choose it."""
    cdef int rc = pthread_create(&c.thread, NULL, dispatch, c)
    if rc != 0:
        return -rc
    c.started = True
    cow_atomic_store(&c.live, 1)
    return 0


cdef void conn_close(conn_t *c, bint polite) noexcept nogil:
    """Stop a connection's dispatcher (if it runs in this process) and close its handle."""
    cdef uint64_t one = 1
    if c.started:
        cow_atomic_store(&c.stop, 1)
        write(c.wake, &one, 8)
        pthread_join(c.thread, NULL)
        c.started = False
    if c.h != NULL:
        if polite and not c.dead:
            nbd_aio_disconnect(c.h, 0)
        nbd_close(c.h)
        c.h = NULL
    if c.fd >= 0:
        close(c.fd)
        c.fd = -1
    if c.wake >= 0:
        close(c.wake)
        c.wake = -1


cdef int live_count(shared_t *s) noexcept nogil:
    cdef int i, live = 0
    for i in range(cow_atomic_load(&s.nr_conns)):
        if cow_atomic_load(&s.conns[i].live):
            live += 1
    return live


cdef conn_t *pick_conn(shared_t *s) noexcept nogil:
    """The least busy live handle, held for submitting until release(); NULL when none is live.
    When every live handle has requests in flight and fewer than the limit are open, asks the
    backing's thread for one more."""
    cdef conn_t *best
    cdef uint64_t one = 1
    cdef int i, n, live, load, best_load, tries
    for tries in range(8):
        best = NULL
        best_load = live = 0
        n = cow_atomic_load(&s.nr_conns)
        for i in range(n):
            if not cow_atomic_load(&s.conns[i].live):
                continue
            live += 1
            load = cow_atomic_load(&s.conns[i].in_flight)
            if best == NULL or load < best_load:
                best = &s.conns[i]
                best_load = load
        if best == NULL:
            return NULL
        if best_load > 0 and live < cow_atomic_load(&s.cap) and live < s.max_conns and \
                not cow_atomic_load(&s.broken) and cow_atomic_cas(&s.want, 0, 1):
            write(s.wake, &one, 8)
        # Held before it is checked again: the backing's thread closes a handle that broke only
        # once no submitter holds it (both sides are atomic read-modify-writes, so neither
        # misses the other).
        cow_atomic_add(&best.users, 1)
        if cow_atomic_load(&best.live):
            return best
        cow_atomic_add(&best.users, -1)
    return NULL


cdef bint wait_for_connection(shared_t *s) noexcept nogil:
    """A caller that needs the backing while no connection is live waits for one (or for the
    backing to give up, or close): True if one may be live now."""
    cdef timespec ts
    cdef bint ok
    if s.wait_ms <= 0:
        return False
    pthread_mutex_lock(&s.m)
    while not cow_atomic_load(&s.stop) and not cow_atomic_load(&s.gave_up) and \
            not cow_atomic_load(&s.no_wait) and live_count(s) == 0:
        clock_gettime(CLOCK_REALTIME, &ts)
        ts.tv_nsec += 200 * 1000000
        if ts.tv_nsec >= 1000000000:
            ts.tv_sec += 1
            ts.tv_nsec -= 1000000000
        pthread_cond_timedwait(&s.cond, &s.m, &ts)
    ok = live_count(s) > 0 or not (cow_atomic_load(&s.stop) or cow_atomic_load(&s.gave_up) or
                                   cow_atomic_load(&s.no_wait))
    pthread_mutex_unlock(&s.m)
    return ok


cdef void announce(shared_t *s) noexcept nogil:
    """Wake the callers waiting for a connection (one is up, or the backing gave up)."""
    pthread_mutex_lock(&s.m)
    pthread_cond_broadcast(&s.cond)
    pthread_mutex_unlock(&s.m)


cdef conn_t *free_slot(shared_t *s) noexcept nogil:
    """A slot for one more connection (one whose connection was closed, or a new one), or NULL."""
    cdef int i, n = cow_atomic_load(&s.nr_conns)
    for i in range(n):
        if s.conns[i].h == NULL:
            return &s.conns[i]
    if n < s.max_conns:
        return &s.conns[n]
    return NULL


cdef int install(shared_t *s, conn_t *c, nbd_handle *h) noexcept nogil:
    """Put a connected handle in slot c and start its dispatcher: 0, or -errno (h closed)."""
    cdef int rc, i = c - s.conns
    c.h = h
    c.backing = s
    c.fd = c.wake = -1
    c.stop = c.dead = 0         # (users and in_flight are 0: see reclaim)
    rc = conn_prepare(c)
    if rc == 0:
        rc = conn_start(c)
    if rc < 0:
        conn_close(c, True)
        return rc
    if i >= cow_atomic_load(&s.nr_conns):
        cow_atomic_store(&s.nr_conns, i + 1)
    return 0


cdef void reclaim(shared_t *s) noexcept nogil:
    """Close the connections that broke, once nothing is in flight on them and no submitter
    holds them: their slots take new connections."""
    cdef conn_t *c
    cdef int i
    for i in range(cow_atomic_load(&s.nr_conns)):
        c = &s.conns[i]
        if c.h != NULL and cow_atomic_load(&c.dead) and cow_atomic_load(&c.users) == 0 and \
                cow_atomic_load(&c.in_flight) == 0:
            conn_close(c, False)


cdef bint has_dead(shared_t *s) noexcept nogil:
    cdef int i
    for i in range(cow_atomic_load(&s.nr_conns)):
        if s.conns[i].h != NULL and cow_atomic_load(&s.conns[i].dead):
            return True
    return False


cdef void add_connection(shared_t *s) noexcept nogil:
    """One more connection, asked for by pick(): connected here with a bounded wait; one that the
    server refuses, or never greets, ends the opening of more (one line says so)."""
    cdef char why[256]
    cdef conn_t *c
    cdef nbd_handle *h
    cdef int n = live_count(s), rc
    if n >= cow_atomic_load(&s.cap) or n >= s.max_conns or cow_atomic_load(&s.broken):
        return
    c = free_slot(s)
    if c == NULL:
        return
    h = new_handle()
    if h == NULL:
        return
    why[0] = 0
    if connect_bounded(s, h, EXTRA_TIMEOUT_MS, why, sizeof(why)) == 0:
        rc = install(s, c, h)
        if rc == 0:
            return
        strncpy(why, strerror(-rc), sizeof(why) - 1)
    else:
        nbd_close(h)
    if cow_atomic_load(&s.stop) or cow_atomic_load(&s.broken):
        return
    cow_atomic_store(&s.cap, n)
    fprintf(stderr, b"cow: the backing %s took no extra connection (%s): serving through %d\n",
            s.what, why, n)


cdef int revive_command(shared_t *s) noexcept nogil:
    """A command backing that exited is started again on its socket: -1 (it could not be), 0 (it
    still runs), 1 (started again).  In Python: the Backing does it."""
    cdef int rc = -1
    with gil:
        if s.owner != NULL:
            try:
                rc = (<Backing>s.owner)._revive_command()
            except BaseException:       # noqa: BLE001 - in the backing's thread: try again later
                rc = -1
    return rc


cdef bint reconnect(shared_t *s, bint *other_disk) noexcept nogil:
    """One attempt to connect to a backing that is down: True if a connection is up."""
    cdef char why[256]
    cdef nbd_handle *h
    cdef conn_t *c
    cdef int64_t timeout = RECONNECT_TIMEOUT_MS
    cdef int rc
    c = free_slot(s)
    if c == NULL:
        return False
    if s.sock != NULL:
        rc = revive_command(s)
        if rc < 0:
            return False
        if rc == 1:
            with gil:
                timeout = <int64_t>((<Backing>s.owner).start_timeout * 1000) \
                    if s.owner != NULL else RECONNECT_TIMEOUT_MS
    h = new_handle()
    if h == NULL:
        return False
    why[0] = 0
    if connect_bounded(s, h, timeout, why, sizeof(why)) != 0:
        nbd_close(h)
        if strncmp(why, b"came back as another disk", 25) == 0 and not other_disk[0]:
            other_disk[0] = True
            fprintf(stderr, b"cow: the backing %s %s: refused; still reconnecting\n", s.what,
                    why)
        return False
    return install(s, c, h) == 0


cdef req_t *take_parked(shared_t *s) noexcept nogil:
    """The parked reads, taken off the list under the lock (the list is left empty)."""
    cdef req_t *r
    pthread_mutex_lock(&s.m)
    r = s.parked
    s.parked = NULL
    pthread_mutex_unlock(&s.m)
    return r


cdef void fail_parked(shared_t *s) noexcept nogil:
    cdef req_t *r = take_parked(s)
    cdef req_t *nxt
    while r != NULL:
        nxt = r.next
        batch_end_one(r.w, ENOTCONN)
        r = nxt


cdef void resubmit_parked(shared_t *s) noexcept nogil:
    """Send the parked reads again, on live connections (those left when none is: kept)."""
    cdef req_t *r = take_parked(s)
    cdef req_t *nxt
    cdef conn_t *c
    while r != NULL:
        nxt = r.next
        c = pick_conn(s)
        if c == NULL:           # r and those after it go back
            pthread_mutex_lock(&s.m)
            while r != NULL:
                nxt = r.next
                r.next = s.parked
                s.parked = r
                r = nxt
            pthread_mutex_unlock(&s.m)
            return
        submit_req(r, c)
        kick(c)
        release(c)
        r = nxt


cdef void *manage(void *arg) noexcept nogil:
    """The backing's own thread, until close(): opens the connections pick() asks for; after a
    connection broke, connects again with backoff (a command that exited is started again),
    sends the parked reads again once one is up, and gives up on them once the backing has been
    down longer than its wait (connecting goes on)."""
    cdef shared_t *s = <shared_t *>arg
    cdef pollfd p
    cdef uint64_t junk
    cdef int64_t now, next_try = 0, backoff = BACKOFF_FIRST_MS, timeout = -1, give_up_at
    cdef bint other_disk = False, down = False
    p.fd = s.wake
    p.events = POLLIN
    while not cow_atomic_load(&s.stop):
        p.revents = 0
        if poll(&p, 1, <int>timeout) < 0 and errno != EINTR:
            break
        read(s.wake, &junk, 8)
        if cow_atomic_load(&s.stop):
            break
        reclaim(s)
        timeout = -1
        now = now_ms()
        if cow_atomic_load(&s.broken):
            if not down:            # a new outage: first try soon
                down = True
                other_disk = False
                backoff = BACKOFF_FIRST_MS
                next_try = s.down_since + backoff
            if now >= next_try:
                if reconnect(s, &other_disk):
                    now = now_ms()
                    fprintf(stderr, b"cow: the backing %s is back, after %.1f s\n", s.what,
                            (now - s.down_since) / 1000.0)
                    down = False
                    cow_atomic_store(&s.gave_up, 0)
                    cow_atomic_store(&s.broken, 0)
                    cow_atomic_store(&s.claimed, 0)
                    announce(s)
                else:
                    now = now_ms()
                    next_try = now + backoff
                    backoff = backoff * 2 if backoff * 2 < BACKOFF_MAX_MS else BACKOFF_MAX_MS
            if down:
                give_up_at = s.down_since + s.wait_ms
                if not cow_atomic_load(&s.gave_up) and live_count(s) == 0 and \
                        (now >= give_up_at or cow_atomic_load(&s.no_wait)):
                    cow_atomic_store(&s.gave_up, 1)
                    if s.wait_ms > 0 and now >= give_up_at:
                        fprintf(stderr, b"cow: the backing %s has been down for %g s: requests "
                                        b"that need it fail with EIO until it is back\n",
                                s.what, s.wait_ms / 1000.0)
                    announce(s)
                timeout = next_try - now
                if not cow_atomic_load(&s.gave_up) and give_up_at - now < timeout:
                    timeout = give_up_at - now
                if timeout < 10:
                    timeout = 10
        if cow_atomic_load(&s.gave_up):
            fail_parked(s)
        elif s.parked != NULL:
            resubmit_parked(s)
            if s.parked != NULL and timeout < 0:
                timeout = 100
        if cow_atomic_load(&s.want):
            add_connection(s)
            cow_atomic_store(&s.want, 0)
        if timeout < 0 and has_dead(s):
            timeout = 100
    cow_atomic_store(&s.stop, 1)
    fail_parked(s)
    announce(s)
    return NULL


cdef struct extents_ctx:
    runs_t *runs
    uint64_t pos        # next byte not yet described
    uint64_t end


cdef int on_extent(void *user_data, const char *metacontext, uint64_t offset,
                   uint32_t *entries, size_t nr_entries, int *error) noexcept nogil:
    cdef extents_ctx *ctx = <extents_ctx *>user_data
    cdef size_t i, k = 0
    cdef uint64_t start = offset, length, lo, hi
    cdef const char *want = b"base:allocation"
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


# ---------------------------------------------------------------------------------------------

cdef class Backing:
    """The read-only backing: Backing(source, connections=None).

    source: a file or block device path, an NBD URI, or a command (a list: argv) that serves NBD
    on systemd socket activation.  connections: most libnbd handles to an NBD backing (one is
    opened at once, more as load needs them; None: DEFAULT_CONNECTIONS, or
    DEFAULT_CONNECTIONS_MULTI_CONN where the backing advertises multi-conn).  start_timeout: seconds a command has to finish
    the NBD handshake (default START_TIMEOUT).  wait: seconds reads wait for an NBD backing
    that broke to come back before they fail with EIO (default DEFAULT_WAIT; 0: at once)."""

    def __cinit__(self, *args, **kwargs):
        pthread_mutex_init(&self.start_lock, NULL)
        pthread_mutex_init(&self.shared.m, NULL)
        pthread_cond_init(&self.shared.cond, NULL)
        self.fd = -1
        self.conns = NULL
        self.shared.wake = -1
        self.min_block = 1
        self.max_request = UINT64_MAX

    def __init__(self, source, *, connections=None, start_timeout=None, wait=None):
        if self.description is not None:
            raise RuntimeError("Backing is already initialised")
        self.connections_given = connections is not None
        if connections is None:
            connections = DEFAULT_CONNECTIONS
        if not isinstance(connections, int) or connections < 1 or connections > MAX_CONNECTIONS:
            raise ValueError(f"invalid number of backing connections {connections}: expected 1 "
                             f"to {MAX_CONNECTIONS}")
        if isinstance(source, (list, tuple)):
            argv = tuple(os.fsdecode(a) for a in source)
            if not argv or not argv[0]:
                raise ValueError("cow: the backing command is empty")
            self.command = argv
            self.description = shlex.join(argv)
            self.is_nbd = True
        else:
            source = os.fsdecode(source)
            self.description = source
            self.is_nbd = is_nbd_uri(source)
        self.what_c = self.description.encode(errors="replace")
        self.shared.what = self.what_c
        self.start_timeout = START_TIMEOUT if start_timeout is None else start_timeout
        if self.start_timeout <= 0:
            raise ValueError(f"invalid start_timeout {start_timeout}: expected seconds > 0")
        wait = DEFAULT_WAIT if wait is None else float(wait)
        if not 0 <= wait < 1e9:
            raise ValueError(f"invalid wait {wait}: expected seconds >= 0")
        self.shared.wait_ms = <int64_t>(wait * 1000)
        self.shared.owner = <void *>self
        if self.command is not None:
            self._open_nbd(None, connections)
        elif self.is_nbd:
            self._open_nbd(source, connections)
        else:
            self._open_file(source)

    def _open_file(self, str path):
        cdef struct_stat st
        cdef uint64_t size = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"cow: cannot open backing {path}: {os.strerror(e.errno)}") \
                from None
        self.fd = fd
        if fstat(fd, &st) != 0:
            raise OSError(errno, f"cow: fstat {path}: {os.strerror(errno)}")
        if S_ISBLK(st.st_mode):
            if ioctl(fd, BLKGETSIZE64, &size) != 0:
                raise OSError(errno, f"cow: size of block device {path}: {os.strerror(errno)}")
            self.c_size = size
        elif S_ISREG(st.st_mode):
            self.c_size = st.st_size
        else:
            raise ValueError(f"cow: backing {path!r} is not a regular file or block device")

    def _open_nbd(self, uri, int nconn):
        """Connect the first handle (the others are opened as load needs them: see manage)."""
        cdef conn_t *c
        cdef int64_t size, maxreq, minblk
        cdef int rc
        self.conns = <conn_t *>calloc(nconn, sizeof(conn_t))
        if self.conns == NULL:
            raise MemoryError()
        self.shared.conns = self.conns
        self.shared.max_conns = nconn
        self.shared.cap = nconn
        for rc in range(nconn):
            self.conns[rc].fd = self.conns[rc].wake = -1
            self.conns[rc].backing = &self.shared
        self.shared.wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.shared.wake < 0:
            raise OSError(errno, f"cow: eventfd: {os.strerror(errno)}")
        if uri is not None:
            self.uri_c = uri.encode()
            self.shared.uri = self.uri_c
        c = &self.conns[0]
        c.h = new_handle()
        if c.h == NULL:
            raise OSError(nbd_get_errno() or EIO, f"cow: libnbd: {_nbd_message()}")
        self.shared.nr_conns = 1
        rc = self._connect(c.h, uri)
        if rc == -1:
            raise OSError(nbd_get_errno() or EIO,
                          f"cow: cannot connect to backing {self.description}: "
                          f"{_nbd_message()}")
        size = nbd_get_size(c.h)
        if size < 0:
            raise OSError(nbd_get_errno() or EIO,
                          f"cow: size of backing {self.description}: {_nbd_message()}")
        self.c_size = self.shared.size = size
        self.base_allocation = nbd_can_meta_context(c.h, b"base:allocation") == 1
        self.nbd_cache = nbd_can_cache(c.h) == 1
        minblk = nbd_get_block_size(c.h, LIBNBD_SIZE_MINIMUM)
        self.min_block = minblk if minblk > 1 and (minblk & (minblk - 1)) == 0 else 1
        maxreq = nbd_get_block_size(c.h, LIBNBD_SIZE_MAXIMUM)
        self.max_request = maxreq if 0 < maxreq < NBD_CHUNK else NBD_CHUNK
        if not self.connections_given and nbd_can_multi_conn(c.h) == 1 and \
                nconn > DEFAULT_CONNECTIONS_MULTI_CONN:
            self.shared.max_conns = self.shared.cap = DEFAULT_CONNECTIONS_MULTI_CONN
        rc = conn_prepare(c)
        if rc < 0:
            raise OSError(-rc, f"cow: libnbd socket: {os.strerror(-rc)}")

    cdef int _connect(self, nbd_handle *h, uri) except? -2:
        cdef bytes buri
        cdef const char *curi
        cdef int rc
        if uri is None:
            self._connect_command(h, self.start_timeout)
            return 0
        buri = uri.encode()
        curi = buri
        with nogil:
            rc = nbd_connect_uri(h, curi)
        return rc

    cdef _connect_command(self, nbd_handle *h, double timeout):
        """Start the command on a listening socket of its own, as systemd socket activation
        passes one (descriptor 3, LISTEN_FDS=1, LISTEN_PID its pid), and connect h to it within
        timeout seconds; or raise CommandError, leaving no process behind.  The command runs in
        this process group (Ctrl-C at a terminal reaches it, and it may prompt there)."""
        cdef int fd, r, events
        cdef unsigned direction
        what = self.description
        problem = command_problem(self.command[0])
        if problem is not None:
            name = f"{shlex.quote(self.command[0])}: " if len(self.command) > 1 else ""
            raise CommandError(problem[0], f"the backing command {what}: {name}{problem[1]}")
        tmpdir = tempfile.mkdtemp(prefix="cow-backing-")
        self.sock_dir = tmpdir      # kept while the command runs: more connections go there
        try:
            path = os.path.join(tmpdir, "nbd.sock")
            self.sock_c = os.fsencode(path)
            self.shared.sock = self.sock_c
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(path)
                listener.listen(16)
                self.proc_pid = spawn_activated(self.command, listener.fileno())
                self.proc_owner = getpid()
            # The command holds the listening socket alone now: if it exits, connecting fails.
            deadline = time.monotonic() + timeout
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(path)
            except OSError as e:
                client.close()
                self._command_failed(e.strerror)
            fd = client.detach()
            if nbd_aio_connect_socket(h, fd) == -1:
                self._command_failed(_nbd_message())
            message = None
            poller = select.poll()
            while nbd_aio_is_connecting(h):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop_command()
                    raise CommandError(ETIMEDOUT, f"the backing command {what} did not serve "
                                                  f"NBD within {timeout:g} s; it was stopped")
                if self.command_status() is not None:
                    self._command_failed(None)
                direction = nbd_aio_get_direction(h)
                events = (select.POLLIN if direction & LIBNBD_AIO_DIRECTION_READ else 0) | \
                    (select.POLLOUT if direction & LIBNBD_AIO_DIRECTION_WRITE else 0)
                fd = nbd_aio_get_fd(h)
                if fd < 0:
                    break
                poller.register(fd, events)
                ready = poller.poll(min(left, 0.1) * 1000)
                poller.unregister(fd)
                if not ready:
                    continue
                r = 0
                if ready[0][1] & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    r = nbd_aio_notify_read(h)
                elif ready[0][1] & select.POLLOUT:
                    r = nbd_aio_notify_write(h)
                if r == -1:
                    message = _nbd_message()
            if not nbd_aio_is_ready(h):
                self._command_failed(message or _nbd_message())
        except BaseException:
            self.stop_command()     # also on Ctrl-C: nothing is left running
            self._remove_sock_dir()
            raise

    def _revive_command(self):
        """In the backing's thread, the backing down: -1, the command cannot be started again
        (closing); 0, it still runs (connect to its socket again); 1, it had exited and was
        started again on a new listening socket at the same path."""
        if self.closing or self.sock_c is None or self.proc_owner != getpid():
            return -1
        if self.proc_pid is not None and self.command_status() is None:
            return 0
        path = os.fsdecode(self.sock_c)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(16)
            self.proc_pid = spawn_activated(self.command, listener.fileno())
            self.proc_owner = getpid()
        return 1

    def _remove_sock_dir(self):
        if self.sock_dir is not None and self.proc_owner == getpid():
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        self.sock_dir = None

    def _command_failed(self, message):
        """The command closed its socket, exited, or spoke no NBD: say which, as CommandError
        (it is stopped if still running)."""
        what = self.description
        deadline = time.monotonic() + 5.0       # closing its socket, it is on its way out
        status = self.command_status()
        while status is None and time.monotonic() < deadline:
            time.sleep(0.01)
            status = self.command_status()
        if status is None:
            self.stop_command()
            raise CommandError(EPROTO, f"the backing command {what} did not serve NBD "
                                       f"({message}); it was stopped")
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            raise CommandError(ECHILD, f"the backing command {what} was killed by {name} "
                                       f"before serving NBD")
        raise CommandError(ECHILD, f"the backing command {what} exited with status {status} "
                                   f"before serving NBD")

    def command_status(self):
        """The command's exit code if it has exited (negative: the signal that killed it),
        reaping it; None while it runs (or when there is none)."""
        if self.proc_pid is None or self.proc_owner != getpid():
            return None
        pid, status = os.waitpid(self.proc_pid, os.WNOHANG)
        if pid == 0:
            return None
        self.proc_pid = None
        return os.waitstatus_to_exitcode(status)

    def stop_command(self):
        """Stop the backing command (SIGTERM, then SIGKILL after STOP_TIMEOUT s) and reap it.
        Only in the process that started it (not in a copy made by fork)."""
        if self.proc_pid is None or self.proc_owner != getpid():
            return
        pid = self.proc_pid
        try:
            if self.command_status() is not None:
                return
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.command_status() is None:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
        except ChildProcessError:   # reaped by someone else
            pass
        self.proc_pid = None

    cdef int start_dispatchers(self) noexcept nogil:
        """Start the threads in this process, at its first request: the dispatchers of the
        connections open, and the thread that opens more.  Not at open: nbdkit forks after
        loading a plugin (to daemonize, or for --run), and threads do not survive a fork; the
        process that serves starts its own."""
        cdef int i, rc = 0, pid = getpid()
        if cow_atomic_load(&self.dispatch_pid) == pid:
            return 0
        pthread_mutex_lock(&self.start_lock)
        if self.dispatch_pid != pid:
            for i in range(self.shared.nr_conns):
                if self.conns[i].h != NULL and not self.conns[i].dead:
                    rc = conn_start(&self.conns[i])
                    if rc != 0:
                        break
            if rc == 0:
                rc = pthread_create(&self.shared.thread, NULL, manage, &self.shared)
                if rc == 0:
                    self.shared.started = True
                    cow_atomic_store(&self.dispatch_pid, pid)
        pthread_mutex_unlock(&self.start_lock)
        return -rc

    cdef void _release(self) noexcept:
        cdef uint64_t one = 1
        cdef conn_t *c
        cdef int i
        cdef bint ours
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.conns == NULL:
            return
        ours = self.dispatch_pid == getpid()
        self.shared.owner = NULL        # the thread no longer calls into this object
        cow_atomic_store(&self.shared.stop, 1)
        if self.shared.started and ours:
            write(self.shared.wake, &one, 8)
            with nogil:
                pthread_join(self.shared.thread, NULL)
            self.shared.started = False
        for i in range(self.shared.nr_conns):
            c = &self.conns[i]
            if not ours:
                c.started = False       # threads of another process (this one's parent)
            # Say goodbye, unless the connection is dead or served by another process
            # (a copy of this one made by fork).
            with nogil:
                conn_close(c, self.dispatch_pid in (0, getpid()))
        if self.shared.wake >= 0:
            close(self.shared.wake)
            self.shared.wake = -1
        free(self.conns)
        self.conns = NULL
        self.shared.conns = NULL
        self.shared.nr_conns = 0
        try:
            self.stop_command()     # a command backing: stopped once its connection is closed
        except Exception as e:      # noqa: BLE001 - at close: say it, go on closing
            fprintf(stderr, b"cow: stopping the backing command: %s\n",
                    str(e).encode(errors="replace"))
        self._remove_sock_dir()

    def __dealloc__(self):
        self._release()
        pthread_mutex_destroy(&self.start_lock)
        pthread_cond_destroy(&self.shared.cond)
        pthread_mutex_destroy(&self.shared.m)

    def close(self):
        """Close the backing (a command's server stops); waits for calls still running."""
        cdef uint64_t one = 1
        if self.closing:
            return
        self.closing = True
        if self.conns != NULL:
            # Callers waiting for a connection give up; parked reads fail.
            cow_atomic_store(&self.shared.stop, 1)
            if self.shared.wake >= 0:
                write(self.shared.wake, &one, 8)
            with nogil:
                announce(&self.shared)
        while cow_atomic_load(&self.calls):
            with nogil:
                usleep(1000)
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def size(self):
        return self.c_size

    @property
    def connections(self):
        """libnbd handles open and working (0 for a file)."""
        return self.nr_live() if self.conns != NULL else 0

    @property
    def max_connections(self):
        """Most libnbd handles this backing opens (0 for a file)."""
        return self.shared.max_conns if self.conns != NULL else 0

    def give_up_waiting(self):
        """The server is stopping: reads waiting for the backing to come back fail now (EIO), and
        later ones do not wait."""
        cdef uint64_t one = 1
        if self.conns == NULL or self.closing:
            return
        cow_atomic_store(&self.shared.no_wait, 1)
        if self.shared.wake >= 0:
            write(self.shared.wake, &one, 8)
        with nogil:
            announce(&self.shared)

    @property
    def wait(self):
        """Seconds reads wait for an NBD backing that broke to come back."""
        return self.shared.wait_ms / 1000.0

    @property
    def error(self):
        """What broke the NBD backing's connection, while it is down; None while it works."""
        if cow_atomic_load(&self.shared.broken):
            return self.shared.error.decode(errors="replace")
        return None

    @property
    def closed(self):
        return self.closing

    def fstat(self):
        """os.stat_result of the open file or block device (what identifies it: its kind, size and
        modification time); None for an NBD backing."""
        if self.fd < 0:
            return None
        return os.fstat(self.fd)

    def pread(self, buf, offset):
        """Fill buf from offset (past the end: zeroes); for tools and tests."""
        cdef uint8_t[::1] view = buf
        cdef uint64_t off = offset
        cdef int r
        if self.closing:
            raise ValueError("cow: the backing is closed")
        with nogil:
            r = self.read(<uint8_t *>&view[0] if view.shape[0] else NULL, view.shape[0], off)
        if r < 0:
            raise OSError(-r, f"cow: backing read offset={off} count={view.shape[0]}: "
                              f"{os.strerror(-r)}")

    def __repr__(self):
        return f"<cow.backing.Backing {self.description!r} size={self.c_size}>"

    # -- the C interface ---------------------------------------------------------------------

    cdef conn_t *pick(self) noexcept nogil:
        """The least busy live handle, held for submitting until release(); NULL when none is
        live (or no thread could start).  See pick_conn."""
        if self.start_dispatchers() < 0:
            return NULL
        return pick_conn(&self.shared)

    cdef bint fails_at_once(self) noexcept nogil:
        """The backing has been down longer than its wait (or it waits for nothing): reads that
        need it fail at once, until it is back."""
        return cow_atomic_load(&self.shared.gave_up) or cow_atomic_load(&self.shared.stop) or \
            ((self.shared.wait_ms <= 0 or cow_atomic_load(&self.shared.no_wait)) and
             cow_atomic_load(&self.shared.broken) and live_count(&self.shared) == 0)

    cdef int nr_live(self) noexcept nogil:
        cdef int i, live = 0
        for i in range(cow_atomic_load(&self.shared.nr_conns)):
            if self.conns[i].h != NULL and not cow_atomic_load(&self.conns[i].dead):
                live += 1
        return live

    cdef int read(self, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil:
        """Read count bytes at offset; bytes past the end of the backing read as zeroes."""
        cdef piece_t p
        p.buf = buf
        p.count = count
        p.offset = offset
        return self.read_pieces(&p, 1)

    cdef int read_pieces(self, piece_t *pieces, int n) noexcept nogil:
        """Read several pieces; over NBD all of them are in flight at once.  With the backing
        down, waits for it (up to its wait), its reads parked for the backing's thread."""
        cdef waiter_t t
        cdef uint8_t **bounce
        cdef req_t *reqs
        cdef uint64_t k, mask = self.min_block - 1
        cdef int i, nreq, r = 0
        cow_atomic_add(&self.calls, 1)
        if self.fd >= 0:
            for i in range(n):
                k = self.clip(&pieces[i])
                if k:
                    r = full_pread(self.fd, pieces[i].buf, k, pieces[i].offset)
                    if r < 0:
                        break
            cow_atomic_add(&self.calls, -1)
            return r
        nreq = self.nr_reqs(pieces, n)
        if nreq == 0:
            for i in range(n):
                self.clip(&pieces[i])
            cow_atomic_add(&self.calls, -1)
            return 0
        if self.fails_at_once():
            cow_atomic_add(&self.calls, -1)
            return -EIO
        bounce = <uint8_t **>calloc(n, sizeof(uint8_t *))
        reqs = <req_t *>malloc(nreq * sizeof(req_t))
        if bounce == NULL or reqs == NULL:
            free(bounce)
            free(reqs)
            cow_atomic_add(&self.calls, -1)
            return -ENOMEM
        waiter_init(&t)
        nreq = self.fill_reqs(&t.w, reqs, pieces, n, bounce)
        if nreq >= 0:
            self.start_reqs(&t.w, reqs, nreq)
            r = waiter_wait(&t)
        else:
            r = nreq
            pthread_cond_destroy(&t.cond)
            pthread_mutex_destroy(&t.m)
        for i in range(n):
            if bounce[i] != NULL:
                if r == 0:
                    memcpy(pieces[i].buf, bounce[i] + (pieces[i].offset & mask),
                           self.clip(&pieces[i]))
                free(bounce[i])
        free(bounce)
        free(reqs)
        cow_atomic_add(&self.calls, -1)
        return r

    cdef int read_async(self, piece_t *pieces, int n, batch_done_fn done,
                        void *arg) noexcept nogil:
        """Start reading pieces and return at once.  0: started; done(batch) runs once, when
        all have arrived (or failed: batch_status() says), from the dispatcher thread, the
        backing's thread or this one; it must be quick, and must free(batch).  Otherwise done
        never runs: 1, there was nothing to read (past the backing's end: zeroes); -EAGAIN,
        this backing cannot (a file, or a piece unaligned for a server with a minimum block
        size): read synchronously instead; -EIO, the backing has been down longer than its
        wait.  With the backing down (within its wait), the reads are parked for the backing's
        thread, which sends them once it is back: this never blocks."""
        cdef batch_t *w
        cdef req_t *reqs
        cdef uint64_t k, mask = self.min_block - 1
        cdef size_t head
        cdef int i, nreq
        if self.fd >= 0:
            return -EAGAIN
        for i in range(n):
            k = 0
            if pieces[i].offset < self.c_size:
                k = min(pieces[i].count, self.c_size - pieces[i].offset)
            if (pieces[i].offset | k) & mask:
                return -EAGAIN
        nreq = self.nr_reqs(pieces, n)
        if nreq == 0:
            for i in range(n):
                self.clip(&pieces[i])
            return 1
        if self.fails_at_once():
            return -EIO
        head = (sizeof(batch_t) + 15) & ~(<size_t>15)
        w = <batch_t *>malloc(head + nreq * sizeof(req_t))
        if w == NULL:
            return -ENOMEM
        reqs = <req_t *>(<char *>w + head)     # freed with the batch
        batch_init(w, done, arg)
        nreq = self.fill_reqs(w, reqs, pieces, n, NULL)
        self.start_reqs(w, reqs, nreq)
        batch_end_one(w, 0)     # the submitter's hold: done may run now, here
        return 0

    cdef int nr_reqs(self, piece_t *pieces, int n) noexcept nogil:
        """How many requests reading pieces takes (the parts past the backing's end are none)."""
        cdef uint64_t k, start, end, mask = self.min_block - 1
        cdef int i, nreq = 0
        for i in range(n):
            if pieces[i].offset >= self.c_size:
                continue
            k = min(pieces[i].count, self.c_size - pieces[i].offset)
            if k == 0:
                continue
            start = pieces[i].offset
            end = start + k
            if (start | k) & mask:
                start &= ~mask
                end = (end + mask) & ~mask
                if end > self.c_size:
                    end = self.c_size
            nreq += <int>((end - start + self.max_request - 1) // self.max_request)
        return nreq

    cdef int fill_reqs(self, batch_t *w, req_t *reqs, piece_t *pieces, int n,
                       uint8_t **bounce) noexcept nogil:
        """The requests (nr_reqs of them) that read pieces, in requests of at most max_request
        bytes; past the backing's end, the pieces are zeroed here.  A piece unaligned for a
        server with a minimum block size is read whole into a bounce buffer (bounce[i], copied
        out by the caller).  Their number, or -ENOMEM."""
        cdef uint64_t k, start, end, chunk, mask = self.min_block - 1
        cdef uint8_t *buf
        cdef int i, j = 0
        for i in range(n):
            k = self.clip(&pieces[i])
            if k == 0:
                continue
            buf = pieces[i].buf
            start = pieces[i].offset
            end = start + k
            if (start | k) & mask:
                start &= ~mask
                end = (end + mask) & ~mask
                if end > self.c_size:
                    end = self.c_size   # a size not a multiple of the minimum: a short last piece
                bounce[i] = <uint8_t *>malloc(end - start)
                if bounce[i] == NULL:
                    return -ENOMEM
                buf = bounce[i]
            while start < end:
                chunk = end - start
                if chunk > self.max_request:
                    chunk = self.max_request
                reqs[j].w = w
                reqs[j].conn = NULL
                reqs[j].buf = buf
                reqs[j].count = chunk
                reqs[j].offset = start
                reqs[j].retry = True
                reqs[j].next = NULL
                j += 1
                buf += chunk
                start += chunk
        return j

    cdef void start_reqs(self, batch_t *w, req_t *reqs, int nreq) noexcept nogil:
        """Send the requests of a batch, all in flight at once on the least busy connection; with
        none live, park them for the backing's thread."""
        cdef conn_t *c
        cdef int i
        cow_atomic_add(&w.pending, nreq)
        c = self.pick()
        if c == NULL:
            for i in range(nreq):
                if self.start_dispatchers() < 0:
                    batch_end_one(w, EIO)           # no thread to send it: fail now
                else:
                    park(&self.shared, &reqs[i])
            return
        for i in range(nreq):
            submit_req(&reqs[i], c)
        kick(c)
        release(c)

    cdef uint64_t clip(self, piece_t *p) noexcept nogil:
        """Zero what lies past the end of the backing; the bytes left to read."""
        cdef uint64_t k = 0
        if p.offset < self.c_size:
            k = self.c_size - p.offset
            if k > p.count:
                k = p.count
        if k < p.count:
            memset(p.buf + k, 0, p.count - k)
        return k

    cdef int extents(self, runs_t *runs, uint64_t offset, uint64_t count) noexcept nogil:
        """Describe [offset, offset+count): holes pass through as hole|zero; past the end of the
        backing (a grown disk) is all hole|zero."""
        cdef uint64_t end = offset + count
        cdef int rc
        if end > self.c_size:
            if offset >= self.c_size:
                return runs_add(runs, count, T_HOLE_ZERO)
            rc = self.extents(runs, offset, self.c_size - offset)
            if rc < 0 or runs_full(runs):
                return rc
            return runs_add(runs, end - self.c_size, T_HOLE_ZERO)
        if self.fd >= 0:
            return file_extents(self.fd, runs, offset, end)
        if not self.base_allocation:
            return runs_add(runs, count, T_DATA)
        cow_atomic_add(&self.calls, 1)
        rc = self.nbd_extents(runs, offset, end)
        cow_atomic_add(&self.calls, -1)
        return rc

    cdef int nbd_extents(self, runs_t *runs, uint64_t pos, uint64_t end) noexcept nogil:
        cdef extents_ctx ctx
        cdef nbd_extent_callback cb
        cdef waiter_t t
        cdef req_t req
        cdef conn_t *c
        cdef uint64_t ask, start, mask = self.min_block - 1
        cdef int rc
        while pos < end and not runs_full(runs):
            if self.fails_at_once():
                return -EIO
            c = self.pick()
            if c == NULL:       # the backing is down: wait for it (up to its wait)
                if self.start_dispatchers() < 0 or not wait_for_connection(&self.shared):
                    return -EIO
                continue
            ctx.runs = runs
            ctx.pos = pos
            ctx.end = end
            cb.callback = on_extent
            cb.user_data = &ctx
            cb.free = NULL
            ask = end - pos
            if ask > STATUS_MAX:
                ask = STATUS_MAX
            start = pos & ~mask       # the server may insist on aligned requests
            ask = ((pos + ask + mask) & ~mask) - start
            if start + ask > self.c_size:
                ask = self.c_size - start
            waiter_init(&t)
            req.w = &t.w
            req.conn = c
            req.retry = False
            cow_atomic_add(&t.w.pending, 1)
            cow_atomic_add(&c.in_flight, 1)
            if nbd_aio_block_status(c.h, ask, start, cb, completion_for(&req),
                                    LIBNBD_CMD_FLAG_REQ_ONE if runs.req_one else 0) == -1:
                refused(&req)
            kick(c)
            release(c)
            rc = waiter_wait(&t)
            if rc < 0:
                if cow_atomic_load(&t.w.lost):     # its connection died: ask again
                    if ctx.pos > pos:
                        pos = ctx.pos
                    continue
                return rc
            if ctx.pos <= pos:      # the server said nothing usable: call it data
                return runs_add(runs, end - pos, T_DATA)
            pos = ctx.pos
        return 0

    cdef void cache(self, uint64_t count, uint64_t offset) noexcept nogil:
        """A hint that the range will be read soon; errors are ignored (it is only advice), and
        a backing that is down is not waited for."""
        cdef waiter_t t
        cdef req_t req
        cdef conn_t *c
        if offset >= self.c_size:
            return
        if count > self.c_size - offset:
            count = self.c_size - offset
        if self.fd >= 0:
            posix_fadvise(self.fd, <off_t>offset, <off_t>count, POSIX_FADV_WILLNEED)
            return
        if not self.nbd_cache:
            return
        c = self.pick()
        if c == NULL:
            return
        cow_atomic_add(&self.calls, 1)
        waiter_init(&t)
        req.w = &t.w
        req.conn = c
        req.retry = False
        cow_atomic_add(&t.w.pending, 1)
        cow_atomic_add(&c.in_flight, 1)
        if nbd_aio_cache(c.h, count if count < self.max_request else self.max_request, offset,
                         completion_for(&req), 0) == -1:
            refused(&req)
        kick(c)
        release(c)
        waiter_wait(&t)
        cow_atomic_add(&self.calls, -1)


def command_problem(name):
    """Why `name` cannot start as a command, as (errno, words), or None: it is looked up as
    execvp and the shell would (a name with a slash is a path, else it is searched in PATH)."""
    if "/" not in name:
        if shutil.which(name) is None:
            return ENOENT, "command not found"
        return None
    if not os.path.exists(name):
        return ENOENT, "command not found (no such file)"
    if os.path.isdir(name):
        return EACCES, "is a directory, not a command"
    if not os.access(name, os.X_OK):
        return EACCES, "is a file that is not executable, not a command"
    return None


def spawn_activated(argv, int fd):
    """Start argv with fd as its descriptor 3, on systemd socket activation (LISTEN_FDS=1 and
    LISTEN_PID, which must be its own pid: a shell sets it, then becomes the command); its pid.
    The signals this process ignores (SIGPIPE, SIGXFSZ) are the default again in the command."""
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDNAMES")}
    env["LISTEN_FDS"] = "1"
    if fd == 3:     # dup2(3, 3) would leave it close-on-exec
        os.set_inheritable(fd, True)
    return os.posix_spawn("/bin/sh", ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; '
                                                  'exec "$@"', "sh", *argv], env,
                          file_actions=[(os.POSIX_SPAWN_DUP2, fd, 3)],
                          setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


def _nbd_message():
    cdef const char *m = nbd_get_error()
    return m.decode(errors="replace") if m != NULL else "unknown libnbd error"
