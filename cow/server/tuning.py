"""The server's numbers: buffer sizes, thresholds, budgets and timeouts (no engine needed:
cow/cli.py shows some of them in --help)."""

MAX_QUEUED_PER_CONNECTION = 64  # requests handed to workers and not yet answered (and the
                                # most workers a connection starts over an NBD backing)
RECV_BUFFER = 256 * 1024  # per connection: request headers and small WRITE payloads
RECV_CHUNK = 64 * 1024  # most a recv asks for beyond what the current message needs
LARGE_REQUEST = 128 * 1024  # READ/WRITE from this size go to the connection's workers
LARGE_WORKERS = 8  # most workers of a connection over a file backing, where only large
                   # requests go to them (a client's usual queue depth)
PAYLOAD_BUDGET = 32 * 1024 * 1024  # bytes of large WRITE payloads received and not yet
                                   # written, per connection (one request may exceed it)
KEEP_PAYLOAD_BUFFERS = 8  # idle payload buffers a connection keeps for reuse
BATCH_BUFFER = 512 * 1024  # inline replies held back while more requests are buffered
MAX_BATCH_REPLIES = 256  # ... and at most this many of them (well under IOV_MAX)
KEEP_BUFFER = 4 * 1024 * 1024  # larger one-off buffers are not kept between requests
READ_POOL_BUDGET = 64 * 1024 * 1024  # idle read reply buffers the server keeps for reuse
READ_BUDGET = 32 * 1024 * 1024  # bytes of READ replies a connection may hold in memory at once
                                # (reads in flight to an NBD backing, READs read by workers):
                                # a client at it is not read from until replies leave (one
                                # request may exceed it)
SERVER_READ_BUDGET = 256 * 1024 * 1024  # ... and every connection together
READ_ALWAYS = 2 * 1024 * 1024  # a connection holding no READ reply may take one this large
                               # whatever the server holds: clients that never read their
                               # replies, however many, cannot stop the others' (usual) READs
SOCKET_BUFFER = 4 * 1024 * 1024  # SO_SNDBUF asked for (the kernel caps it at wmem_max)
ZERO_COPY_READ = 64 * 1024  # READs from this size are sent from the files (sendfile), and with
                            # structured replies their holes as OFFSET_HOLE chunks
ZERO_COPY_WRITE = 64 * 1024  # WRITE payloads from this size go from the socket to the overlay
                             # with splice (Engine.pwrite_from): sequential 1 MiB writes 1.7x
                             # the copying path and half its CPU, random 64 KiB rw 1.1x
EXACT_READS = 16  # requests read without reading ahead after such a WRITE
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to transmission (qemu-nbd's default)
DEFAULT_PAYLOAD_TIMEOUT = 60.0  # seconds a WRITE payload may stop arriving (see _Receiver)
SHUTDOWN_GRACE = 20.0  # seconds for in-flight requests at SIGTERM before sends are cut off
SHUTDOWN_HANDSHAKE_WAIT = 5.0  # seconds a client still haggling at SIGTERM may go on (its
                               # options are answered NBD_REP_ERR_SHUTDOWN) before it is dropped
LINGER = 2.0  # seconds a closing connection waits for the client (see _Connection._close)
ACCEPT_REST_FIRST = 0.05  # seconds the listeners rest after accept runs out of descriptors or
ACCEPT_REST_MAX = 1.0     # memory, doubled while it goes on, up to this
ACCEPT_LOG_INTERVAL = 1.0  # at most one line this often about failing accepts, and twice
ACCEPT_LOG_INTERVAL_MAX = 60.0  # that after each while it goes on, up to this
