# The backing's C-level interface (cow/backing.pyx implements it; cow/engine.pyx uses it).
# Declarations only.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

from cow.clib cimport nbd_handle, pthread_t, pthread_mutex_t, pthread_cond_t

cdef struct req_t
cdef struct batch_t


# Extent kinds, as NBD's base:allocation flags: 0 data, NBD_STATE_HOLE | NBD_STATE_ZERO.
cdef enum:
    T_DATA = 0
    T_HOLE_ZERO = 3


# A growing list of (length, kind) runs, built without the GIL.
cdef struct runs_t:
    uint64_t *length
    uint32_t *kind
    size_t n
    size_t cap
    size_t limit        # stop adding new runs past this many
    bint req_one        # ... or past the first

cdef int runs_add(runs_t *runs, uint64_t length, uint32_t kind) noexcept nogil
cdef bint runs_full(const runs_t *runs) noexcept nogil
cdef void runs_free(runs_t *runs) noexcept nogil


# One piece of a vectored read: count bytes at offset into buf.
cdef struct piece_t:
    uint8_t *buf
    uint64_t count
    uint64_t offset


# What the connections of one NBD backing share (they all go to one server), with the thread that
# opens them (backing.pyx: manage): extra connections as load needs them, up to a limit, and a
# connection that broke again, with backoff, each connected in that thread with a bounded wait
# for its handshake, never on an engine thread.
cdef struct shared_t:
    conn_t *conns           # max_conns slots; [0, nr_conns) have been used
    int max_conns           # the limit (Backing(connections=N))
    int nr_conns            # atomic: slots in use
    int cap                 # atomic: most connections to have (max_conns, until the server took
                            # no more: then those it took)
    int want                # atomic: a submitter asked for one more connection
    const char *uri         # connect here: an NBD URI, or NULL ...
    const char *sock        # ... a command's listening socket
    uint64_t size           # the backing's size at open: every connection must show it
    int wake                # eventfd: wakes the thread
    int stop                # atomic: close() asks the thread to return
    bint started
    pthread_t thread
    void *owner             # the Backing (borrowed; NULL once it closes): restarts a command
    # An outage: from a connection breaking (backing.pyx: conn_broke, whichever thread found out
    # first says so, once) until the thread connects again.  Meanwhile reads that need the
    # backing wait (their requests parked, or their caller waiting) up to wait_ms; past it they
    # fail with EIO, and later ones at once, until it is back.
    int claimed             # atomic: taken by the first thread to report; it writes error
    int broken              # atomic: error is written: the backing is down
    int gave_up             # atomic: down for longer than wait_ms: reads fail at once
    int no_wait             # atomic: the server is stopping: reads no longer wait
    int64_t down_since      # when it broke (monotonic ms), written before broken
    int64_t wait_ms         # how long reads wait for it to come back
    const char *what        # the backing's description, for the log lines
    char error[512]         # what broke it
    pthread_mutex_t m       # guards parked; with cond, callers waiting for a connection
    pthread_cond_t cond
    req_t *parked           # reads whose connection died, to submit again

# One libnbd handle and the thread that drives it: engine threads submit requests with
# nbd_aio_* from any thread; the dispatcher polls the socket and runs libnbd's state machine,
# which calls each request's completion callback.
cdef struct conn_t:
    nbd_handle *h
    int fd                  # our own duplicate of the handle's socket (libnbd closes its own
                            # when the connection dies; a closed number may be reused at once)
    int wake                # eventfd: a submitter needs the socket watched for writing, or
                            # found the connection dead
    pthread_t thread
    bint started
    int stop                # atomic: close() asks the dispatcher to return
    int live                # atomic: connected, its dispatcher running: pick() may choose it
    int dead                # atomic: this connection broke
    int users               # atomic: submitters between pick() and release()
    int in_flight           # atomic: requests submitted and not completed (for balancing)
    shared_t *backing       # the backing's state, shared by its connections


# Requests submitted together and finished together (see backing.pyx): `done` runs once, after
# the last of them.
ctypedef void (*batch_done_fn)(batch_t *w) noexcept nogil

cdef struct batch_t:
    int pending             # atomic: requests not finished, plus the submitter's hold
    int error               # atomic: the first failure's errno
    int lost                # atomic: a request not retried failed as its connection died
    batch_done_fn done
    void *arg
    bint finished           # for a synchronous waiter

# One request of a batch, as sent to the server: a read is kept until it has its answer, and sent
# again on another connection if its connection dies first (reads are idempotent).
cdef struct req_t:
    batch_t *w
    conn_t *conn            # where it is in flight
    uint8_t *buf
    uint64_t count
    uint64_t offset
    bint retry              # a read: parked and sent again when its connection dies
    req_t *next             # in shared_t.parked

cdef int batch_status(batch_t *w) noexcept nogil


cdef class Backing:
    cdef int fd                         # a file or block device, else -1
    cdef conn_t *conns                  # NBD: shared.max_conns slots
    cdef int calls                      # atomic: calls in progress (close waits for them)
    cdef pthread_mutex_t start_lock
    cdef int dispatch_pid               # atomic: the process whose dispatchers run
    cdef bint closing
    cdef uint64_t c_size
    cdef uint64_t max_request           # NBD: largest request the server takes
    cdef uint64_t min_block             # NBD: requests aligned to this (1: no constraint)
    cdef bint base_allocation           # NBD: the server describes holes
    cdef bint nbd_cache                 # NBD: the server takes NBD_CMD_CACHE
    cdef bytes what_c                   # description, kept alive for shared_t.what
    cdef bytes uri_c                    # ... the URI, for shared_t.uri
    cdef bytes sock_c                   # ... a command's socket path, for shared_t.sock
    cdef object sock_dir                # a command: the folder of its socket (removed at close)
    cdef shared_t shared                # shared by the connections
    cdef object proc_pid                # a command: its pid while it runs, else None
    cdef int proc_owner                 # ... the process that started it (and stops it)
    cdef double start_timeout           # a command: seconds to serve NBD after its start
    cdef bint connections_given         # Backing(connections=N): N, whatever the backing says

    cdef readonly str description       # the path, URI or command, for messages
    cdef readonly bint is_nbd           # an NBD export (a URI or a command)
    cdef readonly object command        # the command's argv (a tuple), else None

    cdef int _connect(self, nbd_handle *h, uri) except? -2
    cdef _connect_command(self, nbd_handle *h, double timeout)
    cdef int start_dispatchers(self) noexcept nogil
    cdef void _release(self) noexcept
    cdef conn_t *pick(self) noexcept nogil
    cdef int nr_live(self) noexcept nogil
    cdef uint64_t clip(self, piece_t *p) noexcept nogil
    cdef int nr_reqs(self, piece_t *pieces, int n) noexcept nogil
    cdef int fill_reqs(self, batch_t *w, req_t *reqs, piece_t *pieces, int n,
                       uint8_t **bounce) noexcept nogil
    cdef void start_reqs(self, batch_t *w, req_t *reqs, int nreq) noexcept nogil
    cdef bint fails_at_once(self) noexcept nogil
    cdef int nbd_extents(self, runs_t *runs, uint64_t pos, uint64_t end) noexcept nogil

    # The interface the engine uses.
    cdef int read(self, uint8_t *buf, uint64_t count, uint64_t offset) noexcept nogil
    cdef int read_pieces(self, piece_t *pieces, int n) noexcept nogil
    cdef int read_async(self, piece_t *pieces, int n, batch_done_fn done,
                        void *arg) noexcept nogil
    cdef int extents(self, runs_t *runs, uint64_t offset, uint64_t count) noexcept nogil
    cdef void cache(self, uint64_t count, uint64_t offset) noexcept nogil
