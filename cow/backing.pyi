"""Type stubs for the compiled backing module (cow/backing.pyx)."""

import os
from collections.abc import Buffer, Sequence

START_TIMEOUT: float  # seconds a backing command has to finish the NBD handshake
DEFAULT_CONNECTIONS: int  # most connections to an NBD backing ...
DEFAULT_CONNECTIONS_MULTI_CONN: int  # ... or to one that advertises multi-conn
DEFAULT_WAIT: float  # seconds reads wait for a backing that is down
STOP_TIMEOUT: float  # seconds between SIGTERM and SIGKILL when a backing command is stopped

def is_nbd_uri(s: object) -> bool:
    """An NBD URI as libnbd takes it (nbd://, nbds://, nbd+unix://, nbd+vsock://...)."""

class CommandError(OSError):
    """A backing command that could not start or serve NBD; str() is one line.  errno: ENOENT
    (not found), EACCES (not executable), ECHILD (exited), ETIMEDOUT, EPROTO (not NBD)."""

def command_problem(name: str) -> tuple[int, str] | None:
    """Why name cannot start as a command (errno, words), or None."""

class Backing:
    """The read-only backing under one or more engines.

    source: a file or block device path, an NBD URI, or a command (a sequence: argv) that serves
    NBD on systemd socket activation (started here, stopped at close).  connections: most
    libnbd handles, one at open and more as load needs them, multi-conn or not (None:
    DEFAULT_CONNECTIONS, or DEFAULT_CONNECTIONS_MULTI_CONN where the backing advertises
    multi-conn).  start_timeout: seconds a command has to finish the NBD handshake
    (START_TIMEOUT).  wait: seconds reads wait for a backing whose connection broke to come back
    (DEFAULT_WAIT; 0: fail at once).  Over NBD any number of requests are in flight on each
    handle.
    """

    def __init__(self, source: str | Sequence[str], *, connections: int | None = None,
                 start_timeout: float | None = None, wait: float | None = None) -> None: ...
    def command_status(self) -> int | None: ...  # a command's exit code once it has exited
    def stop_command(self) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def description(self) -> str: ...  # the path, URI or command line
    @property
    def is_nbd(self) -> bool: ...
    @property
    def command(self) -> tuple[str, ...] | None: ...
    @property
    def connections(self) -> int: ...  # libnbd handles open now (0 for a file)
    @property
    def max_connections(self) -> int: ...  # most it may open (0 for a file)
    @property
    def wait(self) -> float: ...  # seconds reads wait for a backing that is down
    def give_up_waiting(self) -> None: ...  # reads waiting for it fail at once (shutdown)
    @property
    def error(self) -> str | None: ...  # what broke the NBD connection, if it broke
    @property
    def closed(self) -> bool: ...
    def fstat(self) -> os.stat_result | None:
        """The open file's or block device's stat (None for NBD): what identifies it."""
    def pread(self, buf: Buffer, offset: int) -> None:
        """Fill buf from offset (zeroes past the end)."""
    def close(self) -> None: ...
    def __enter__(self) -> Backing: ...
    def __exit__(self, *exc: object) -> None: ...
