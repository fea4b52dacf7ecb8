"""Type stubs for the compiled backing module (cow/backing.pyx)."""

import os
from collections.abc import Buffer, Sequence

def is_nbd_uri(s: object) -> bool:
    """An NBD URI as libnbd takes it (nbd://, nbds://, nbd+unix://, nbd+vsock://...)."""

class Backing:
    """The read-only backing under one or more engines.

    source: a file or block device path, an NBD URI, or a command (a sequence: argv) that serves
    NBD on systemd socket activation (libnbd starts it, and stops it at close).  connections:
    most libnbd handles for an export that advertises multi-conn (else one).  Over NBD any number
    of requests are in flight on each handle.
    """

    def __init__(self, source: str | Sequence[str], *, connections: int = 4) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def description(self) -> str: ...  # the path, URI or command line
    @property
    def is_nbd(self) -> bool: ...
    @property
    def command(self) -> tuple[str, ...] | None: ...
    @property
    def connections(self) -> int: ...  # libnbd handles (0 for a file)
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
