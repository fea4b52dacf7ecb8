"""What a client is told of an error: the NBD error for an errno, and a message that names
nothing of this server.

Nothing sent to a client names a path of this server or the backing's command line: error replies
carry what the errno means (client_message), the log keeps the detail.
"""

from __future__ import annotations

import errno
import os

from cow import protocol as P


def nbd_error_from_errno(err: int | None) -> int:
    """Map an OSError errno from the engine to the NBD error a client is sent."""
    if err in (errno.EPERM, errno.EROFS):
        return P.NBD_EPERM
    if err == errno.ENOMEM:
        return P.NBD_ENOMEM
    if err == errno.EINVAL:
        return P.NBD_EINVAL
    if err in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return P.NBD_ENOSPC
    if err == errno.EOVERFLOW:
        return P.NBD_EOVERFLOW
    if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return P.NBD_ENOTSUP
    if err == errno.ESHUTDOWN:
        return P.NBD_ESHUTDOWN
    return P.NBD_EIO


def client_message(e: Exception) -> str:
    """The text an error reply carries for an engine error: what its errno means, nothing
    more.  The engine's own text (e.strerror, str(e)) may name a path of this server (the
    overlay's folder, the backing's path, URI or command line); with -v the log keeps it."""
    err = getattr(e, "errno", None)
    if err == errno.ESHUTDOWN:
        return "the server is shutting down"
    if isinstance(e, OSError):
        return os.strerror(err) if err else "input/output error"
    return "invalid request"  # a ValueError: the request does not fit the disk or the engine

