"""Helpers for the reliability tests (faults, hostile clients, soak, fuzz, TLS).

* ``Server``: ``python -m cow.server`` started for a test on a Unix socket, with its PID for
  /proc checks and a clean stop that reports the exit status.
* ``RawClient``: an NBD client over a plain socket, written here with ``struct`` (not with
  cow/protocol.py, so that the server is checked against an independent reading of the spec),
  able to send anything, including what no real client would.
* ``start_nbdkit``: real nbdkit whose process the test may kill.
* /proc readers: open descriptors, RSS, threads.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import support_server

PYTHON = sys.executable

# --- wire constants (from the NBD spec, doc/proto.md) -----------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
ALL_COMMANDS = (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES,
                CMD_BLOCK_STATUS)

CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = 1, 2, 4, 8, 16

REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_FLAG_DONE = 1

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
NBD_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}


# --- /proc ------------------------------------------------------------------------------------

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def wait_until(predicate, timeout=20.0, interval=0.02, what="condition"):
    """Poll until predicate() is true (a wait for an event, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def wait_for_socket(path, proc=None, timeout=30.0):
    def ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        if not os.path.exists(path):
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    wait_until(ready, timeout, what=f"socket {path}")


# --- servers ----------------------------------------------------------------------------------

class Server:
    """A running ``python -m cow.server`` on a Unix socket."""

    def __init__(self, proc: subprocess.Popen, sock: Path, stderr_path: Path):
        self.proc = proc
        self.sock = sock
        self.stderr_path = stderr_path
        self.uri = f"nbd+unix:///?socket={sock}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def run_server(tmp_path: Path, backing, *args, name="cow", env=None, preexec_fn=None,
               check_exit=True):
    """Start the server on tmp_path/NAME.sock; stop it with SIGTERM afterwards and (unless
    check_exit is false) assert it exited 0 with no traceback on stderr."""
    sock = Path(tmp_path) / f"{name}.sock"
    err = Path(tmp_path) / f"{name}.stderr"
    cmd = [PYTHON, "-P", "-m", "cow.server", *([str(backing)] if backing is not None else []),
           "-U", str(sock), *map(str, args)]
    with open(err, "wb") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env,
                                preexec_fn=preexec_fn)
    server = Server(proc, sock, err)
    try:
        wait_for_socket(sock, proc)
        yield server
    finally:
        rc = server.stop()
    if check_exit:
        text = server.stderr()
        assert "Traceback" not in text, text
        assert rc == 0, f"server exited {rc}: {text}"
        assert not sock.exists(), "the server left its socket behind"


@contextmanager
def start_nbdkit(tmp_path: Path, *args, name="nbdkit"):
    """Real nbdkit on tmp_path/NAME.sock; yields (uri, proc) so that a test may kill it."""
    sock = Path(tmp_path) / f"{name}.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                             *map(str, args)], stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a raw client -----------------------------------------------------------------------------

# recv_exact raises EOFError when the server closes the connection.
Closed = EOFError


class RawClient(support_server.RawClient):
    """NBD over a plain socket, for tests that send what real clients never do: the server
    tests' raw client, plus a whole handshake and at_eof."""

    def __init__(self, path, timeout=30.0):
        super().__init__(path, timeout)
        self.size = None
        self.eflags = None

    def at_eof(self, timeout=30.0) -> bool:
        """True once the server has closed its end (reads return EOF or a reset)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # handshake
    def greeting(self):
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        assert hflags & FLAG_FIXED_NEWSTYLE
        return hflags

    def client_flags(self, flags=C_FIXED_NEWSTYLE | C_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def option(self, opt, data=b"", length=None):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length)
                  + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REP_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def option_replies(self, opt):
        """Replies to one option up to the final ACK or error."""
        out = []
        while True:
            o, rtype, data = self.option_reply()
            assert o == opt, (o, opt)
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & REP_ERR:
                return out

    @staticmethod
    def info_data(name=b"", requests=()):
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
                + b"".join(struct.pack(">H", r) for r in requests))

    @staticmethod
    def meta_data(name=b"", queries=()):
        out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q)) + q
        return out

    def handshake(self, structured=True, contexts=(b"base:allocation",), name=b""):
        """Fixed newstyle, optional structured replies and meta contexts, then GO."""
        self.greeting()
        self.client_flags()
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.option_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
            self.structured = True
            if contexts:
                self.option(OPT_SET_META_CONTEXT, self.meta_data(name, contexts))
                assert self.option_replies(OPT_SET_META_CONTEXT)[-1][0] == REP_ACK
        self.option(OPT_GO, self.info_data(name))
        for rtype, data in self.option_replies(OPT_GO):
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                _, self.size, self.eflags = struct.unpack(">HQH", data)
            assert not rtype & REP_ERR, (hex(rtype), data)
        return self

    # transmission
    def request(self, cmd, offset=0, count=0, flags=0, cookie=1, payload=b"",
                magic=REQUEST_MAGIC):
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, count) + payload)

    def reply(self, read_count=0):
        """One whole reply: (cookie, error, data, chunks).  For structured replies all chunks
        up to DONE are read; data is the READ data in offset order."""
        head = self.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_count) if (error == 0 and read_count) else b""
            return cookie, error, data, []
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks = []
        error = 0
        pieces = {}
        while True:
            if chunks:
                (magic,) = struct.unpack(">I", self.recv_exact(4))
                assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            chunks.append((flags, rtype, payload))
            if rtype & (1 << 15):
                error = struct.unpack(">I", payload[:4])[0]
            elif rtype == REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                pieces[off] = payload[8:]
            elif rtype == REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                pieces[off] = bytes(n)
            if flags & REPLY_FLAG_DONE:
                break
        data = b"".join(pieces[k] for k in sorted(pieces))
        return cookie, error, data, chunks

    def call(self, cmd, offset=0, count=0, flags=0, payload=b"", cookie=1):
        self.request(cmd, offset, count, flags, cookie, payload)
        got_cookie, error, data, chunks = self.reply(count if cmd == CMD_READ else 0)
        assert got_cookie == cookie, (got_cookie, cookie)
        return error, data, chunks

    def disconnect(self):
        try:
            self.request(CMD_DISC)
        except OSError:
            pass
        self.close()


@contextmanager
def run_tcp_server(tmp_path: Path, backing, *args, name="cowtcp", check_exit=True):
    """The server on 127.0.0.1 with a port the kernel picks; yields (Server, port)."""
    import re

    err = Path(tmp_path) / f"{name}.stderr"
    out = Path(tmp_path) / f"{name}.stdout"
    cmd = [PYTHON, "-P", "-m", "cow.server", str(backing), "-i", "127.0.0.1", "-p", "0",
           *map(str, args)]
    with open(err, "wb") as errf, open(out, "wb") as outf:
        proc = subprocess.Popen(cmd, stdout=outf, stderr=errf)
    server = Server(proc, Path("/nonexistent"), err)

    def port():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {err.read_text()}")
        m = re.search(r"nbds?://127\.0\.0\.1:(\d+)", out.read_text())
        return int(m.group(1)) if m else None

    try:
        p = wait_until(port, 30, what="the TCP server's start-up line")
        server.uri = f"nbd://127.0.0.1:{p}"
        yield server, p
    finally:
        rc = server.stop()
    if check_exit:
        text = server.stderr()
        assert "Traceback" not in text, text
        assert rc == 0, f"server exited {rc}: {text}"
