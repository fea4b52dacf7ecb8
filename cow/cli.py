"""The command line of ``python -m cow.server``: argv, ``--help``, start-up and shutdown.

``main`` parses the options, opens the engine over the backing (or a built-in sample disk),
makes the listening sockets (Unix, TCP, or systemd socket activation), writes the pidfile,
runs the captive ``--run`` command, accepts connections until SIGINT/SIGTERM or the end of
that command, then shuts the server down and cleans up.  Connections themselves are the
cow/server package's: this module hands each accepted socket to cow.server.accept.Server.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from urllib.parse import quote

from cow import __version__
from cow import protocol as P

# The server's defaults that --help shows (cow.server.tuning needs no engine; the server itself
# imports the compiled engine, so it is imported only to serve, in _main: --help needs no engine,
# and a missing one is reported in one line).
from cow.server.tuning import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_PAYLOAD_TIMEOUT,
    LARGE_REQUEST,
    LARGE_WORKERS,
    MAX_QUEUED_PER_CONNECTION,
)

DEFAULT_BACKING_CONNECTIONS = 8  # cow.backing.DEFAULT_CONNECTIONS
DEFAULT_BACKING_CONNECTIONS_MULTI_CONN = 4  # cow.backing.DEFAULT_CONNECTIONS_MULTI_CONN
DEFAULT_BACKING_WAIT = 30.0  # cow.backing.DEFAULT_WAIT

log = logging.getLogger("cow.cli")

DEFAULT_PORT = 10809
DEFAULT_IPADDR = "127.0.0.1"
SAMPLE_DISK_SIZE = 64 * 1024 * 1024
LISTEN_BACKLOG = socket.SOMAXCONN  # the kernel caps it (net.core.somaxconn)
# A BACKING given as one of these URLs gets a hint naming the nbdkit plugin that serves it.
_URL_PLUGINS = {"http": "curl", "https": "curl", "ftp": "curl", "ftps": "curl"}
_VIEW_NAME_MAX = 128  # cow.views.MAX_NAME (cow.views imports the engine: --help must not)
_DEFAULT_MAX_EXPORTS = 128  # cow.views.DEFAULT_MAX_VIEWS (the same; tests check they agree)


EXAMPLES = """\
examples:
  python -m cow.server disk.img -U /tmp/disk.sock
        serve disk.img copy-on-write on a Unix socket: nbd+unix:///?socket=/tmp/disk.sock
  python -m cow.server disk.img -p 10809
        serve on TCP 127.0.0.1:10809: nbd://127.0.0.1:10809
  python -m cow.server
        serve a built-in 64 MiB sample disk (data and holes)
  python -m cow.server disk.img --run 'nbdcopy "$uri" out.img'
        captive mode: run the command against the server, then stop
  nbdinfo --map -- [ python -m cow.server disk.img ]
        systemd socket activation: the client starts the server
  python -m cow.server 'nbd+unix:///?socket=/tmp/remote.sock' -U /tmp/cow.sock
        copy-on-write over an NBD backing: many reads in flight, on up to 8 connections
        (--backing-connections); reconnected if it drops (reads wait: --backing-wait)
  python -m cow.server -U /tmp/cow.sock -- nbdkit curl https://example.com/disk.img
        the backing is a command serving NBD on socket activation (any nbdkit plugin,
        qemu-nbd...): started now, stopped with the server; [ CMD ARGS ] works too
  python -m cow.server -U /tmp/s --cow-block-size 4K --cow-on-read true -- nbdkit ssh ...
        a local cache of a remote base: each block is fetched once, then read locally
  python -m cow.server disk.img -U /tmp/s --cow-block-size 4K --cow-on-read true
  python -m cow.server disk.img -U /tmp/s --overlay-max-size 1G --tmpdir /var/tmp
  python -m cow.server disk.img -U /tmp/s --overlay vm.cow
        keep the changes in vm.cow: they survive the server (see python -m cow.overlay)
  python -m cow.server --overlay vm.cow -U /tmp/s
        serve vm.cow again, over the file or URI it records (a recorded command is
        run only when given again: --overlay vm.cow -- nbdkit curl ...)
  python -m cow.server golden.img -U /tmp/s --overlay-dir /var/lib/cow/views
        a writable view per export name, each kept in its own file:
        nbd+unix:///ci-42?socket=/tmp/s is /var/lib/cow/views/ci-42.cow
  python -m cow.server golden.img -U /tmp/s --temporary-views discard --max-exports 64
        a throw-away view per export name, gone when its last client leaves

The backing is opened read-only and never written: all writes go to an overlay
file. By default it is temporary (unlinked at once) and disappears when the server
exits; with --overlay FILE it is kept in FILE, and every change acknowledged by a
FLUSH (or a FUA write) survives a crash of the server.
"""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, not a usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bool_word(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def _cow_on_read(value: str):
    if value.startswith("/"):
        return value
    try:
        return _bool_word(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected true, false or an absolute path, not {value!r}") from None


def _nonnegative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {value!r}")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not n >= 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {value!r}")
    return n


def _backing_connections(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 64, not {value!r}")
    return n


def _socket_mode(value: str) -> int:
    v = value.strip().lower()
    v = v[2:] if v.startswith("0o") else v
    try:
        mode = int(v, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal file mode such as 0660, not {value!r}")
    return mode


def _export_name(value: str) -> str:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 (surrogate escapes)
        raise argparse.ArgumentTypeError("an export name must be UTF-8") from None
    if len(raw) > P.MAX_STRING:
        raise argparse.ArgumentTypeError(
            f"an export name is at most {P.MAX_STRING} bytes (the NBD spec), not {len(raw)}")
    return value


def _port(value: str) -> int:
    n = _nonnegative_int(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m cow.server",
        description="Serve a copy-on-write view of BACKING over NBD: clients read the backing "
                    "and write to a private overlay.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.usage = ("%(prog)s [options] [BACKING]\n"
               "       %(prog)s [options] -- CMD [ARGS...]")
    p.add_argument("backing", nargs="?", metavar="BACKING",
                   help="backing image: a file or block device path, or an NBD URI such as "
                        "nbd://host:10809/name or 'nbd+unix:///?socket=/tmp/s' "
                        "(default: a built-in sample disk).  Or, after --, a command that "
                        "serves NBD on systemd socket activation, e.g. -- nbdkit curl URL "
                        "(as nbdinfo's [ CMD ARGS ], which is accepted too)")
    # One function an option group, in --help's order.
    _listen_options(p)
    _tls_options(p)
    _export_options(p)
    _backing_options(p)
    _cow_options(p)
    _view_options(p)
    _running_options(p)
    return p


def _listen_options(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("where to listen (default: TCP on 127.0.0.1:10809)")
    net.add_argument("-U", "--unix", metavar="PATH",
                     help="listen on a Unix socket, e.g. -U /tmp/disk.sock ('-' = a private "
                          "temporary path, handy with --run)")
    net.add_argument("-p", "--port", type=_port, metavar="PORT",
                     help=f"TCP port, e.g. -p 10809 (default {DEFAULT_PORT}; 0 picks a free one)")
    net.add_argument("-i", "--ipaddr", metavar="ADDR", default=DEFAULT_IPADDR,
                     help=f"TCP address to listen on, e.g. -i 0.0.0.0 (default {DEFAULT_IPADDR}: "
                          "loopback only)")
    net.add_argument("--socket-mode", type=_socket_mode, metavar="MODE",
                     help="file mode of the Unix socket, e.g. --socket-mode 0660 to let the "
                          "group connect (default 0600: only this user)")
    net.add_argument("--max-connections", type=_nonnegative_int, default=0, metavar="N",
                     help="serve at most N connections at once; more are closed at once, "
                          "before the greeting, e.g. --max-connections 64 (default 0: no limit)")
    net.add_argument("--handshake-timeout", type=_seconds, default=DEFAULT_HANDSHAKE_TIMEOUT,
                     metavar="SECONDS",
                     help="drop a client that has not finished the NBD handshake (TLS included) "
                          "this many seconds after connecting, e.g. --handshake-timeout 5 "
                          f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g}; 0: wait forever)")
    net.add_argument("--payload-timeout", type=_seconds, default=DEFAULT_PAYLOAD_TIMEOUT,
                     metavar="SECONDS",
                     help="drop a client whose WRITE payload stops arriving: nothing of it "
                          "received for this many seconds (nothing of it is written), e.g. "
                          f"--payload-timeout 20 (default {DEFAULT_PAYLOAD_TIMEOUT:g}; 0: wait "
                          "forever)")


def _tls_options(p: argparse.ArgumentParser) -> None:
    sec = p.add_argument_group("TLS (as nbdkit: see nbdkit-tls(1))")
    sec.add_argument("--tls", choices=("off", "on", "require"),
                     help="off: refuse STARTTLS; on: the client chooses; require: nothing but "
                          "STARTTLS or ABORT before TLS, e.g. --tls=require (default: on when "
                          "--tls-certificates or --tls-psk is given, else off)")
    sec.add_argument("--tls-certificates", metavar="DIR",
                     help="directory holding ca-cert.pem, server-cert.pem, server-key.pem (and "
                          "optionally ca-crl.pem), e.g. --tls-certificates /etc/pki/cow")
    sec.add_argument("--tls-verify-peer", action="store_true",
                     help="require a client certificate signed by DIR/ca-cert.pem")
    sec.add_argument("--tls-psk", metavar="FILE",
                     help="pre-shared keys instead of certificates: a psktool file of "
                          "username:hexkey lines, e.g. --tls-psk /etc/cow/keys.psk (needs Python "
                          "3.13+)")


def _export_options(p: argparse.ArgumentParser) -> None:
    exp = p.add_argument_group("export")
    exp.add_argument("-e", "--exportname", type=_export_name, metavar="NAME", default="",
                     help="export name, e.g. -e disk (the default export \"\" works too). With "
                          "--overlay-dir or --temporary-views: the view a client asking for the "
                          "default export \"\" gets (without -e, \"\" is refused: every "
                          "client names its view)")
    exp.add_argument("-r", "--readonly", action="store_true",
                     help="read-only export: writes, trims and zeroes fail with EPERM, e.g. "
                          "python -m cow.server disk.img -r -U /tmp/s. With --overlay-dir: "
                          "every view read-only, and no new view is made")
    exp.add_argument("-t", "--threads", type=_nonnegative_int, default=0, metavar="N",
                     help="most worker threads per connection, e.g. -t 16.  Small requests are "
                          "served inline; large READ/WRITE (from "
                          f"{LARGE_REQUEST // 1024} KiB) and, over an NBD backing, requests "
                          "that must wait for it go to workers, started as needed (default: "
                          f"{MAX_QUEUED_PER_CONNECTION} over an NBD backing, one per request in "
                          f"flight; {LARGE_WORKERS} over a file)")


def _backing_options(p: argparse.ArgumentParser) -> None:
    remote = p.add_argument_group("an NBD backing (a URI, or a command after --)")
    remote.add_argument("--backing-connections", type=_backing_connections, metavar="N",
                        default=None,
                        help="most connections to the backing, 1 to 64: one is opened at start, "
                             "more while every open one has requests in flight, whether or not "
                             "the backing advertises multi-conn (it is only read). A backing "
                             "that refuses one more, or does not greet it within 5 s, is served "
                             "through those it took. e.g. --backing-connections 1 for a server "
                             f"that must see one client (default {DEFAULT_BACKING_CONNECTIONS}, or "
                             f"{DEFAULT_BACKING_CONNECTIONS_MULTI_CONN} where the backing "
                             "advertises multi-conn: such servers serve many requests on one "
                             "connection)")
    remote.add_argument("--backing-wait", type=_seconds, metavar="SECONDS",
                        default=DEFAULT_BACKING_WAIT,
                        help="when the backing's connection breaks, it is connected again with "
                             "backoff (a command that exited is started again), and reads that "
                             "need it wait up to SECONDS for it, then fail with EIO, as later "
                             "ones do at once until it is back; reads the overlay serves never "
                             "wait. e.g. --backing-wait 120 to ride out a server's reboot, "
                             f"--backing-wait 0 to fail at once (default {DEFAULT_BACKING_WAIT:g})")


def _cow_options(p: argparse.ArgumentParser) -> None:
    cow = p.add_argument_group("copy-on-write (the names of nbdkit's cow filter)")
    cow.add_argument("--cow-block-size", metavar="SIZE",
                     help="overlay block size, a power of two from 4K to 4M, e.g. "
                          "--cow-block-size 4K (default 64K, or the block size of an existing "
                          "--overlay FILE). A partial write to a block not yet copied copies the "
                          "whole block, so an overlay file with larger blocks is refused too")
    cow.add_argument("--cow-on-read", type=_cow_on_read, default=False, metavar="BOOL|PATH",
                     help="copy blocks into the overlay when they are read: true, false, or an "
                          "absolute path, on while that path exists (default false)")
    cow.add_argument("--cow-on-cache", type=_bool_word, default=False, metavar="BOOL",
                     help="NBD_CMD_CACHE copies blocks into the overlay, e.g. --cow-on-cache "
                          "true (default false: it only reads the backing)")
    cow.add_argument("--lock-mode", choices=("fine", "global"), default="fine",
                     help="engine locking: fine (default) or global, one lock around every "
                          "block operation as nbdkit's filter had (for benchmarks)")
    cow.add_argument("--overlay-max-size", metavar="SIZE",
                     help="cap on overlay space, e.g. --overlay-max-size 1G; writes needing more "
                          "fail with ENOSPC (default: no cap)")
    cow.add_argument("--tmpdir", metavar="DIR",
                     help="directory for the temporary overlay file, e.g. --tmpdir /var/tmp "
                          "(default $TMPDIR, else /var/tmp)")
    cow.add_argument("--overlay", metavar="FILE",
                     help="keep the overlay in FILE instead of a temporary file: created (mode "
                          "0600) if missing, reopened with its changes if it exists, locked "
                          "while served. e.g. --overlay vm.cow. BACKING may then be omitted: "
                          "FILE records it, and the file or URI it records is served if FILE "
                          "is this user's and nobody else may write it; a recorded command "
                          "runs only when given again after --. See python -m cow.overlay "
                          "--help for its tools")
    cow.add_argument("--overlay-backing-changed", choices=("refuse", "accept"), default="refuse",
                     help="when the file backing's size or modification time differs from what "
                          "--overlay FILE recorded: refuse (default), or accept it and record "
                          "the new one, e.g. --overlay-backing-changed=accept when you know the "
                          "overlay's changes still fit the backing")


def _view_options(p: argparse.ArgumentParser) -> None:
    views = p.add_argument_group(
        "many views of one backing: a view per export name (nbd+unix:///NAME?socket=...)")
    views.add_argument("--overlay-dir", metavar="DIR",
                       help="every export name is its own view, kept in DIR/NAME.cow (the "
                            "format of --overlay; see python -m cow.overlay): made on first use, "
                            "opened when its first client connects, flushed and closed when its "
                            "last one leaves, e.g. --overlay-dir /var/lib/cow/views. DIR is "
                            "created (0700) if missing. A name is 1 to "
                            f"{_VIEW_NAME_MAX} of A-Z a-z 0-9 . _ - and starts with a letter or "
                            "digit; others are refused. Only a regular file owned by this user, "
                            "with one link, is served as a view: a symbolic link, FIFO, device, "
                            "folder, another user's or a hard-linked file at a view's name is "
                            "refused (NBD_REP_ERR_UNKNOWN) and logged")
    views.add_argument("--temporary-views", choices=("keep", "discard"), metavar="MODE",
                       help="every export name is its own view with a temporary overlay: keep "
                            "(its changes last until the server exits, as nbdkit's cow filter "
                            "since 1.44) or discard (they go when its last client leaves), e.g. "
                            "--temporary-views keep")
    views.add_argument("--max-exports", type=_nonnegative_int, default=None, metavar="N",
                       help="with --overlay-dir or --temporary-views: at most N views exist "
                            "(files in DIR, or temporary views), e.g. --max-exports 500; a new "
                            "name beyond that is refused (NBD_REP_ERR_POLICY), existing views "
                            f"are still served. Default {_DEFAULT_MAX_EXPORTS}: an open or kept "
                            "temporary view holds 2 descriptors and its bitmap (disk size / "
                            "block size / 4 bytes), and any view may grow to the disk's size "
                            "on disk, so a client making new names must stop somewhere. "
                            "--max-exports 0: no cap")
    views.add_argument("--list-views", action="store_true",
                       help="NBD_OPT_LIST (nbdinfo --list) lists every view, with its clients "
                            "and changes. By default it lists none but the default view of -e: "
                            "a view's name is all a client needs to read and write it, so one "
                            "client must not learn the others' names")


def _running_options(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("running")
    run.add_argument("-P", "--pidfile", metavar="FILE",
                     help="write the server's PID to FILE once it is listening (removed on "
                          "exit), e.g. -P /run/cow.pid")
    run.add_argument("--run", metavar="CMD",
                     help="captive mode: run CMD under /bin/sh with $uri, $unixsocket, $port and "
                          "$exportname set, then stop and exit with its status, e.g. "
                          "--run 'nbdinfo \"$uri\"'")
    run.add_argument("-f", "--foreground", action="store_true",
                     help="accepted for nbdkit's and qemu-nbd's users: the server always stays "
                          "in the foreground (run it under systemd or with & to detach)")
    run.add_argument("-V", "--version", action="version", version=f"cow.server {__version__}",
                     help="print the version and exit")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="log connections and every request to stderr, e.g. "
                          "'READ offset=0 count=4096 flags=0x0 -> OK'")


def _fail(message: str, status: int = 1) -> int:
    print(f"python -m cow.server: error: {message}", file=sys.stderr, flush=True)
    return status


class _StartupError(Exception):
    pass


def make_sample_disk(path: str, size: int = SAMPLE_DISK_SIZE) -> None:
    """A sparse sample image: text-stamped 512-byte sectors in the first MiB of every 4 MiB,
    holes in between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for piece in range(0, size, 4 * 1024 * 1024):
            f.seek(piece)
            sectors = []
            for sector in range(piece // 512, (piece + min(1 << 20, size - piece)) // 512):
                line = f"cow sample disk, sector {sector}, offset {sector * 512}\n".encode()
                sectors.append((line * (512 // len(line) + 1))[:512])
            f.write(b"".join(sectors))


def _uri(export_name: str, *, unix: str | None = None, host: str | None = None,
         port: int | None = None, tls: bool = False) -> str:
    """The URI clients use (nbds when TLS is required, as nbdkit prints it)."""
    name = quote(export_name, safe="")
    scheme = "nbds" if tls else "nbd"
    if unix is not None:
        return f"{scheme}+unix:///{name}?socket={quote(unix, safe='/')}"
    if host is not None and ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}" if name else f"{scheme}://{host}:{port}"


def _systemd_listeners() -> list[socket.socket] | None:
    """Sockets passed by systemd-style socket activation (LISTEN_PID/LISTEN_FDS), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    if n < 1:
        return None
    socks = []
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _stale_socket(path: str) -> bool:
    """Is path a Unix socket that nobody listens on (left by a server that was killed)?"""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def _listen_unix(path: str, mode: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is 0600: only this user may connect
    try:
        try:
            sock.bind(path)
        except OSError as e:
            # As qemu-nbd does: a socket left by a killed server is replaced; a live one, or
            # anything that is not a socket, is not.
            if e.errno != errno.EADDRINUSE or not _stale_socket(path):
                raise
            os.unlink(path)
            sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as e:
        sock.close()
        raise _StartupError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _listen_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise _StartupError(f"cannot resolve {host}: {e.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise _StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


def _check_views_options(args) -> None:
    """Refuse what does not go with --overlay-dir / --temporary-views, or needs them."""
    if args.overlay_dir is not None and args.temporary_views is not None:
        raise _StartupError("--overlay-dir keeps every view; --temporary-views keeps none: "
                            "give one of them")
    views = args.overlay_dir is not None or args.temporary_views is not None
    what = "--overlay-dir" if args.overlay_dir is not None else "--temporary-views"
    if not views:
        if args.max_exports is not None:
            raise _StartupError("--max-exports caps the views of --overlay-dir or "
                                "--temporary-views; this server has one export")
        if args.list_views:
            raise _StartupError("--list-views lists the views of --overlay-dir or "
                                "--temporary-views; this server has one export")
        return
    if args.max_exports is None:
        args.max_exports = _DEFAULT_MAX_EXPORTS
    if args.overlay is not None:
        raise _StartupError(f"--overlay FILE serves one view; {what} a view per export name: "
                            "give one of them")
    if args.exportname:
        from cow.views import name_problem
        why = name_problem(args.exportname)
        if why:
            raise _StartupError(f"-e {args.exportname!r}: with {what}, -e names the default "
                                f"view, and {why}")
    if args.overlay_dir is not None:
        if args.tmpdir is not None:
            raise _StartupError("--tmpdir is for temporary overlays; with --overlay-dir every "
                                "view is kept in DIR")
        if args.readonly and (args.cow_on_read or args.cow_on_cache):
            raise _StartupError("--readonly with --overlay-dir opens every view read-only: "
                                "--cow-on-read and --cow-on-cache would write to them")
    elif args.readonly:
        raise _StartupError("--readonly with --temporary-views: every view would be the backing "
                            "itself; serve the backing with -r alone")


def _engine_kwargs(args) -> dict:
    from cow.engine import parse_block_size, parse_size
    kw = dict(cow_on_read=args.cow_on_read, cow_on_cache=args.cow_on_cache,
              lock_mode=args.lock_mode, tmpdir=args.tmpdir,
              nbd_connections=args.backing_connections, backing_wait=args.backing_wait)
    if args.cow_block_size is not None:
        try:
            kw["block_size"] = parse_block_size(args.cow_block_size)
        except ValueError as e:
            raise _StartupError(f"--cow-block-size: {e}") from None
    if args.overlay is not None:
        if args.tmpdir is not None:
            raise _StartupError("--tmpdir is for the temporary overlay; with --overlay FILE the "
                                "overlay is FILE")
        if args.readonly and (args.cow_on_read or args.cow_on_cache):
            raise _StartupError("--readonly with --overlay opens FILE read-only: --cow-on-read "
                                "and --cow-on-cache would write to it")
        kw.update(overlay=args.overlay, readonly=args.readonly,
                  backing_changed=args.overlay_backing_changed)
    if args.overlay_max_size is not None:
        try:
            kw["overlay_max_size"] = parse_size(args.overlay_max_size)
        except ValueError as e:
            raise _StartupError(f"--overlay-max-size: {e}") from None
    if args.tmpdir is not None and not os.path.isdir(args.tmpdir):
        raise _StartupError(f"--tmpdir {args.tmpdir}: not a directory")
    return kw


def _tune_malloc() -> None:
    """Keep the server's memory flat over many short connections.

    Every connection is a thread with buffers of 256 KiB and more.  glibc raises its mmap
    threshold each time such a buffer is freed and gives each thread an arena of its own, so
    later buffers come from arenas that are not given back: RSS grew from 24 MiB to 108 MiB
    over 40,000 fuzzed connections.  A fixed threshold (large buffers always mmap'd and
    returned) and few arenas keep it flat (measured: 24 MiB -> 24 MiB over 10,000)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-8, 4)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _raise_nofile_limit(verbose: bool) -> None:
    """Raise the soft limit on open descriptors to the hard limit, as qemu does at start-up
    (os_setup_limits): each connection costs one or more, an open view two.  Done once the
    backing command and the --run command have started, so that they keep the limit they
    were given (a program using select() breaks above 1024); this process uses no select()."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    want = hard
    if want == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            return
    if soft != resource.RLIM_INFINITY and soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as e:
        log.info("cannot raise the open file limit from %d to %d: %s", soft, want, e)
        return
    if verbose:
        log.info("open file limit raised from %d to %d", soft, want)


def _values_like_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with `--opt -4K` written `--opt=-4K`: argparse takes a value that starts with '-'
    for an option and says only "expected one argument"; joined, the option's own check says
    what is wrong with the value."""
    takes_value = {s for a in parser._actions if isinstance(a, argparse._StoreAction)
                   for s in a.option_strings}
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and \
                len(argv[i + 1]) > 1 and argv[i + 1].split("=")[0] not in parser._option_string_actions:
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _option_words(message: str) -> str:
    """An engine's ValueError names its Python arguments; the user typed options."""
    for word, option in (("overlay_max_size", "--overlay-max-size"),):
        message = message.replace(word, option)
    return message


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(options, backing command): the command follows a `--`, or stands in `[ ... ]` as
    nbdinfo and nbdcopy write it; None when there is none."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    if "[" in argv:
        i = argv.index("[")
        if "]" in argv[i:]:
            j = len(argv) - 1 - argv[::-1].index("]")
            return argv[:i] + argv[j + 1:], argv[i + 1:j]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    # A file-size limit (RLIMIT_FSIZE) on the overlay must fail the write with EFBIG, which
    # the client sees as ENOSPC, instead of killing the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _tune_malloc()
    argv, command = _split_command(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(_values_like_options(parser, argv))
    args.command = command
    logging.basicConfig(format="python -m cow.server: %(message)s", stream=sys.stderr,
                        level=logging.INFO if args.verbose else logging.WARNING)
    cleanup: list = []
    try:
        return _main(args, cleanup)
    except _StartupError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except OSError:
                pass


def _engine_missing(exc: ImportError) -> str:
    """One line that names why cow.engine cannot be imported."""
    import cow
    package = os.path.dirname(os.path.abspath(cow.__file__))
    if getattr(exc, "__notes__", None):  # an editable install's rebuild on import failed
        return (f"rebuilding the cow engine failed ({exc}); the compiler's output is in "
                f"{os.path.dirname(package)}/build/meson-logs/meson-python-build-log.txt")
    if not isinstance(exc, ModuleNotFoundError):  # there, but it cannot be loaded
        needs = " (it needs libnbd: Debian's libnbd0)" if "libnbd" in str(exc) else ""
        return f"cannot load the cow engine of {package}: {exc}{needs}"
    if os.path.exists(os.path.join(package, "engine.pyx")):  # the source folder, not built
        return (f"{sys.executable} imports cow from the source folder {package}, which has no "
                f"compiled engine, and this Python has no install of the package: run ./dev "
                f"setup in {os.path.dirname(package)}, then use its .venv/bin/python")
    return f"the cow engine is not installed in {package} ({exc}); run ./dev setup"


def _open_views(args, backing, kwargs: dict, what: str, cleanup: list):
    """--overlay-dir / --temporary-views: the backing opened once and shared by a ViewSet.
    Returns (exports, size, block size, slow backing, backing's description, start-up note, the
    shared backing)."""
    from cow import overlayfile
    from cow.backing import Backing, CommandError
    from cow.views import SETTLE_TIMEOUT, ViewExports, ViewSet, directory_problem

    directory = args.overlay_dir
    if directory is not None:
        why = directory_problem(directory, create=not args.readonly)
        if why:
            raise _StartupError(f"--overlay-dir {directory}: {why}")
    try:
        shared = Backing(backing, connections=kwargs.pop("nbd_connections", None),
                         wait=kwargs.pop("backing_wait", None))
    except CommandError as e:
        raise _StartupError(_command_error(e, backing)) from None
    except OSError as e:
        raise _StartupError(f"cannot serve {what}: {e.strerror or e}") from None
    except ValueError as e:
        raise _StartupError(str(e)) from None
    cleanup.append(shared.close)
    # The server holds the backing's lock while it runs, views open or not: a commit of one
    # view into the golden image would change every other view under it.
    try:
        lock_fd = overlayfile.hold_backing(shared)
    except overlayfile.OverlayError as e:
        raise _StartupError(str(e)) from None
    if lock_fd is not None:
        cleanup.append(lambda: os.close(lock_fd))
    engine_kwargs = {k: v for k, v in kwargs.items()
                     if k not in ("overlay", "readonly") and v is not None}
    if directory is not None:
        engine_kwargs.pop("tmpdir", None)
        engine_kwargs["backing_changed"] = args.overlay_backing_changed
    try:
        # A client waits for a view another is opening or closing no longer than for its
        # handshake.
        views = ViewSet(shared, directory=directory, temporary=args.temporary_views,
                        readonly=args.readonly, max_views=args.max_exports,
                        default=args.exportname or None, engine_kwargs=engine_kwargs,
                        settle_timeout=args.handshake_timeout or SETTLE_TIMEOUT)
        # Every option checked once now (block size, cow-on-read...), not at each client:
        # one temporary engine over the backing, closed at once.
        probe_kwargs = {k: v for k, v in engine_kwargs.items() if k != "backing_changed"}
        if directory is not None and not args.readonly:
            probe_kwargs["tmpdir"] = directory     # an unnamed file, gone at once
        from cow.engine import Engine
        Engine(shared, **probe_kwargs).close()
    except OSError as e:
        raise _StartupError(f"cannot serve {what}: {e.strerror or e}") from None
    except ValueError as e:
        raise _StartupError(_option_words(str(e))) from None

    def close_views():
        for name, e in views.close_all():
            _fail(f"closing view {name}: {e.strerror or e}; its changes since the last flush "
                  f"may be lost")

    cleanup.append(close_views)
    block_size = engine_kwargs.get("block_size", 65536)
    template = P.Export(size=shared.size, readonly=args.readonly,
                        preferred_block_size=block_size)
    if directory is not None:
        n = views.count()
        note = f", a view per export name in {directory} ({n} exist"
    else:
        note = f", a temporary view per export name ({args.temporary_views} when idle"
    note += f", at most {args.max_exports})" if args.max_exports else ", no cap)"
    if args.list_views:
        note += ", listed"
    if args.exportname:
        note += f", default view {args.exportname}"
    if args.readonly:
        note += ", read-only"
    return (ViewExports(views, template, list_all=args.list_views), shared.size, block_size,
            shared.is_nbd, shared.description, note, shared.give_up_waiting)


def _recorded_backing(overlay: str) -> str:
    """--overlay FILE with no BACKING: the file or URI FILE records.  An overlay file is data
    that someone else may have written, so it chooses a backing only when this server's user
    owns it and nobody else may write it, and it never chooses a command: a recorded command
    runs only when the operator gives it again after --."""
    from cow import overlayfile
    try:
        rec = overlayfile.recorded_backing(overlay)
    except overlayfile.OverlayError as e:
        raise _StartupError(str(e)) from None
    except FileNotFoundError:
        raise _StartupError(f"--overlay {overlay} does not exist yet: give the BACKING "
                            f"to make it over") from None
    except OSError as e:
        raise _StartupError(f"--overlay {overlay}: {e.strerror}") from None
    quoted = overlayfile.shown(shlex.quote(overlay))
    shown = overlayfile.shown(rec.backing)
    if rec.command:
        raise _StartupError(f"--overlay {quoted} records a command as its backing ({shown}), "
                            f"which runs only when you give it: python -m cow.server --overlay "
                            f"{quoted} [OPTIONS] -- {shown}")
    if rec.untrusted:
        raise _StartupError(f"--overlay {quoted}: {rec.untrusted}, so the backing it records "
                            f"({shown}) is used only when you name it: python -m cow.server "
                            f"BACKING --overlay {quoted}")
    return rec.backing


def _command_error(e, command: list[str]) -> str:
    """One line for a backing command that could not start or serve (cow.backing.CommandError).
    A file named after -- was probably meant as the BACKING: say where it goes."""
    message = str(e)
    if e.errno in (errno.ENOENT, errno.EACCES) and os.path.isfile(command[0]):
        message += (f" (after -- comes a command that serves NBD; to serve the file "
                    f"{command[0]}, put it before --: python -m cow.server "
                    f"{shlex.quote(command[0])} [OPTIONS])")
    return message


def _main(args, cleanup: list) -> int:
    try:  # the compiled modules (imported here so that a missing one is one line)
        import cow.backing  # noqa: F401
        import cow.engine  # noqa: F401
        from cow.server.accept import Server
    except ImportError as e:
        raise _StartupError(_engine_missing(e)) from None
    from cow.tls import TLSConfigError, server_settings
    try:
        tls = server_settings(args.tls, args.tls_certificates, args.tls_psk, args.tls_verify_peer)
    except TLSConfigError as e:
        raise _StartupError(str(e)) from None

    _check_views_options(args)
    if args.unix is not None and args.port is not None:
        raise _StartupError("-U and -p both say where to listen: give one of them (as nbdkit)")

    exports, size, block_size, slow, backing, note, give_up_waiting, sample_note = \
        _open_exports(args, cleanup)
    server = Server(exports, slow_backing=slow, workers=args.threads, verbose=args.verbose,
                    tls=tls, max_connections=args.max_connections,
                    handshake_timeout=args.handshake_timeout,
                    payload_timeout=args.payload_timeout)
    listeners, activated, uri, env_uri, where = _listen(args, tls, cleanup)
    if args.pidfile:
        try:
            with open(args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise _StartupError(f"cannot write pidfile {args.pidfile}: {e.strerror}") from None
        pidfile = args.pidfile
        cleanup.append(lambda: os.unlink(pidfile))

    # The start-up line goes to stdout, except where stdout belongs to a client program
    # (captive mode, socket activation).
    # Under socket activation the client started the server and stderr is the client's
    # terminal: a line there at every connection is noise (nbdkit prints none), unless -v.
    out = sys.stderr if (args.run is not None or activated) else sys.stdout
    if not activated or args.verbose:
        if sample_note:
            print(f"python -m cow.server: {sample_note}", file=sys.stderr, flush=True)
        tls_note = f", TLS {tls.mode} ({tls.kind})" if tls.enabled else ""
        print(f"python -m cow.server: serving {backing} ({size} bytes, copy-on-write, block "
              f"size {block_size}{note}{tls_note}) at {where}", file=out, flush=True)

    status = _run(args, server, listeners, uri, env_uri, give_up_waiting, cleanup)
    if args.verbose:
        log.info("stopped")
    return status


# -- the engine over the backing, or the views ------------------------------------------------

def _open_exports(args, cleanup: list):
    """What the server offers: one engine over the backing, or a view per export name.
    (exports, size, block_size, slow, backing, note, give_up_waiting, sample_note)."""
    from cow.backing import is_nbd_uri

    backing, recorded, sample_note = _choose_backing(args, cleanup)
    file_size = None            # a file or block device backing's size, known before opening
    if sample_note is None and isinstance(backing, str) and not is_nbd_uri(backing):
        file_size = _backing_file_size(args, backing, recorded)
    kwargs = _engine_kwargs(args)
    if file_size is not None and kwargs.get("block_size", 0) > max(file_size, 4096):
        # Legal, but every partial write would copy a block larger than the disk itself.
        raise _StartupError(f"--cow-block-size {args.cow_block_size}: larger than the disk "
                            f"({file_size} bytes); choose a smaller one")
    what = repr(backing) if isinstance(backing, str) else shlex.join(backing)
    if args.overlay_dir is not None or args.temporary_views is not None:
        opened = _open_views(args, backing, kwargs, what, cleanup)
    else:
        opened = _open_engine(args, backing, kwargs, what, sample_note, cleanup)
    return (*opened, sample_note)


def _choose_backing(args, cleanup: list):
    """(backing, recorded, sample_note): BACKING, the command after --, the one --overlay FILE
    records (recorded), or a built-in sample disk made here (sample_note says so)."""
    backing = args.backing
    recorded = False            # the backing is the one --overlay FILE records
    if args.command is not None:
        if backing is not None:
            raise _StartupError(f"give the backing either as BACKING ({backing!r}) or as a "
                                "command after --, not both")
        if not args.command:
            raise _StartupError("the backing command after -- is empty (e.g. -- nbdkit "
                                "curl https://example.com/disk.img)")
        backing = args.command
    elif backing is None and args.overlay is not None:
        backing = _recorded_backing(args.overlay)
        recorded = True
    if backing is None and args.overlay_dir is not None:
        raise _StartupError("--overlay-dir needs the BACKING every view is a view of (the "
                            "golden image), e.g. python -m cow.server golden.img --overlay-dir "
                            f"{args.overlay_dir}")
    if backing is not None:
        return backing, recorded, None
    sample_dir = tempfile.mkdtemp(prefix="cow-sample-")
    cleanup.append(lambda: shutil.rmtree(sample_dir, ignore_errors=True))
    backing = os.path.join(sample_dir, "sample.img")
    make_sample_disk(backing)
    return backing, False, (f"no BACKING given: serving a built-in {SAMPLE_DISK_SIZE >> 20} MiB "
                            "sample disk (data and holes)")


def _backing_file_size(args, backing: str, recorded: bool) -> int:
    """The size of a backing named by path, which must be a regular file or a block device
    (a URL gets the nbdkit plugin that serves it)."""
    scheme = backing.split("://", 1)[0].lower() if "://" in backing else None
    if scheme in _URL_PLUGINS:
        raise _StartupError(f"{backing!r} is a URL, and cow.server reads NBD URIs and "
                            f"files itself: put nbdkit in front of it, e.g. python -m "
                            f"cow.server -U SOCK -- nbdkit {_URL_PLUGINS[scheme]} "
                            f"{shlex.quote(backing)}")
    file_size = None
    try:
        # O_NONBLOCK: a FIFO (or a terminal) would otherwise hang the start-up here.
        fd = os.open(backing, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
                file_size = os.lseek(fd, 0, os.SEEK_END)   # a block device's too
        finally:
            os.close(fd)
    except OSError as e:
        if recorded:
            raise _StartupError(
                f"cannot open the backing {backing!r} that --overlay {args.overlay} records: "
                f"{e.strerror}; if it moved, name it: python -m cow.server NEW-PATH "
                f"--overlay {args.overlay} (the same file, moved, is accepted)") from None
        raise _StartupError(f"cannot open backing {backing!r}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise _StartupError(f"cannot open backing {backing!r}: Is a directory")
    if file_size is None:
        raise _StartupError(f"cannot serve backing {backing!r}: not a regular file or block "
                            f"device (for a stream, copy it to a file first)")
    return file_size


def _open_engine(args, backing, kwargs: dict, what: str, sample_note, cleanup: list):
    """One engine behind one export: (exports, size, block_size, slow, backing, note,
    give_up_waiting), as _open_views gives."""
    from cow.backing import CommandError
    from cow.engine import Engine
    from cow.server.accept import OneEngine

    try:
        engine = Engine(backing, **kwargs)
    except CommandError as e:
        raise _StartupError(_command_error(e, backing)) from None
    except OSError as e:
        raise _StartupError(f"cannot serve {what}: {e.strerror or e}") from None
    except ValueError as e:
        raise _StartupError(_option_words(str(e))) from None

    def close_engine():
        try:
            engine.close()      # a persistent overlay is flushed first
        except OSError as e:
            _fail(f"closing the overlay: {e.strerror or e}; changes since the last flush "
                  f"may be lost")

    cleanup.append(close_engine)
    # Every client may read the description: it never names the backing (a path, a URI,
    # a command line with its secrets).  The start-up line tells the operator.
    description = "built-in sample disk" if sample_note else "copy-on-write view"
    export = P.Export(size=engine.size, name=args.exportname, description=description,
                      readonly=args.readonly, preferred_block_size=engine.block_size)
    note = ", read-only" if args.readonly else ""
    if engine.overlay is not None:
        st = engine.stats()
        note += (f", overlay {engine.overlay}: {st['allocated_blocks']} blocks allocated, "
                 f"{st['trimmed_blocks']} trimmed")
    # engine.backing: the path, URI or command line
    return (OneEngine(engine, export), engine.size, engine.block_size, engine.backing_is_nbd,
            engine.backing, note, engine.give_up_waiting)


# -- where to listen, and serving until told to stop -------------------------------------------

def _listen(args, tls, cleanup: list):
    """The listening sockets (socket activation's, a Unix socket, or TCP), non-blocking:
    (listeners, activated, uri, env_uri, where)."""
    captive = args.run is not None
    unix_path = args.unix
    listeners = _systemd_listeners()
    activated = listeners is not None
    env_uri = {"unixsocket": "", "port": "", "exportname": args.exportname}
    if activated:
        where = f"socket activation ({len(listeners)} socket{'s' if len(listeners) > 1 else ''})"
        uri = None
    else:
        if unix_path == "-" or (captive and unix_path is None and args.port is None):
            tmp = tempfile.mkdtemp(prefix="cow-server-")
            cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
            unix_path = os.path.join(tmp, "nbd.sock")
        if unix_path is not None:
            listeners = [_listen_unix(unix_path, args.socket_mode)]
            path = unix_path
            cleanup.append(lambda: os.unlink(path))
            uri = _uri(args.exportname, unix=unix_path, tls=tls.required)
            env_uri["unixsocket"] = unix_path
        else:
            port = DEFAULT_PORT if args.port is None else args.port
            listeners = [_listen_tcp(args.ipaddr, port)]
            port = listeners[0].getsockname()[1]
            uri = _uri(args.exportname, host=args.ipaddr, port=port, tls=tls.required)
            env_uri["port"] = str(port)
        where = uri
    for sock in listeners:
        sock.setblocking(False)
        cleanup.append(sock.close)
    return listeners, activated, uri, env_uri, where


def _run(args, server, listeners, uri, env_uri, give_up_waiting, cleanup: list) -> int:
    """Serve until SIGINT/SIGTERM or the end of the --run command, then shut the server down;
    the exit status (the command's, under --run)."""
    # -- wake-ups: signals and the end of the captive command
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    cleanup.append(lambda: os.close(wake_r))
    cleanup.append(lambda: os.close(wake_w))
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    status = [0]
    if args.run is not None:
        env = dict(os.environ, uri=uri, **env_uri)
        child = subprocess.Popen(["/bin/sh", "-c", args.run], env=env)

        def wait_child():
            rc = child.wait()
            status[0] = rc if rc >= 0 else 128 - rc
            stop.set()
            try:
                os.write(wake_w, b"r")
            except OSError:
                pass

        threading.Thread(target=wait_child, name="cow-run", daemon=True).start()

    _raise_nofile_limit(args.verbose)
    try:
        _accept_until(stop, server, listeners, wake_r)
    finally:
        signal.set_wakeup_fd(-1)
        for sock in listeners:
            sock.close()  # stop accepting (and the Unix socket file goes in cleanup)
        give_up_waiting()  # reads waiting for a backing that is down fail now
        server.shutdown()
    return status[0]


def _accept_until(stop: threading.Event, server, listeners, wake_r: int) -> None:
    """Accept connections until stop is set (wake_r is readable at each wake-up)."""
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ)
    polled = False  # the listeners are registered (not while they rest: Server.accept_rest)
    try:
        while not stop.is_set():
            rest = server.accept_rest()
            if polled == bool(rest):
                for sock in listeners:
                    if rest:
                        sel.unregister(sock)
                    else:
                        sel.register(sock, selectors.EVENT_READ)
                polled = not rest
            timeout = 1.0 if server.handshake_timeout else None
            if rest:
                timeout = rest if timeout is None else min(timeout, rest)
            events = sel.select(timeout)
            server.reap_handshakes()
            for key, _ in events:
                if key.fileobj == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif not stop.is_set() and not server.accept_rest():
                    server.accept(key.fileobj)
    finally:
        sel.close()
