"""The socket calls every part of the server makes: shutdown(2) on the descriptor, and sendmsg
of many buffers."""

from __future__ import annotations

import socket
import ssl


def shutdown_socket(sock, how) -> None:
    """shutdown(2) on the descriptor.  Not SSLSocket.shutdown(), which also drops the TLS
    state: another thread still using the socket would then read and write in clear text."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def sendmsg_all(sock: socket.socket, buffers: list, flags: int = 0) -> None:
    """Send every buffer in order, whole, with as few sendmsg calls as the socket allows."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS: one record write each
        for b in buffers:
            sock.sendall(b)
        return
    bufs = buffers
    while bufs:
        sent = sock.sendmsg(bufs, (), flags)
        i = 0
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        bufs = bufs[i:]
        if bufs and sent:
            bufs[0] = memoryview(bufs[0])[sent:]
