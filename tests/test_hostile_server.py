"""Hostile clients against the server's own limits (issue 18, items 6, 8 and 10): a server run
out of descriptors by connections, clients that send large READs over an NBD backing and never
read the replies, and what a client can learn of the server (export descriptions, error
messages).

Always: the server keeps serving the other clients, nothing fails that should not, no
traceback, and nothing a client receives names a server path or the backing's command line.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import struct
import subprocess
import time
from array import array
from pathlib import Path

import nbd
import pytest

from conftest import write_sample
from support_server import start_server
from support_reliability import (
    CMD_READ, CMD_WRITE, EINVAL, ENOSPC, ESHUTDOWN, OPT_GO, OPT_INFO, OPT_LIST, REP_ACK, REP_ERR,
    REP_INFO, REP_SERVER, RawClient, rss_kib, run_server, wait_until,
)

KiB = 1024
MiB = 1024 * KiB

# The server's read budgets (cow/server/tuning.py READ_BUDGET, SERVER_READ_BUDGET), restated so that
# the bounds below are the documented ones.
READ_BUDGET = 32 * MiB
SERVER_READ_BUDGET = 256 * MiB


def _log_lines(srv, pattern):
    return len(re.findall(pattern, srv.stderr()))


# ---------------------------------------------------------------- out of descriptors (item 6)


def _nofile(soft, hard):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return set_limit


def _connect(sock_path, greeting_timeout):
    """A raw client through the whole handshake, or (client, False) if the server does not
    greet it in time (it waits in the listen backlog)."""
    c = RawClient(sock_path)
    c.sock.settimeout(greeting_timeout)
    try:
        c.greeting()
    except socket.timeout:
        return c, False
    c.sock.settimeout(30)
    c.client_flags()
    c.option(OPT_GO, c.info_data())
    assert c.option_replies(OPT_GO)[-1][0] == REP_ACK
    return c, True


def test_out_of_descriptors_the_accept_loop_rests(backing_factory, tmp_path):
    """At `ulimit -n 64`, connections until accept fails with EMFILE: the server logs it once
    a second at most (it spun, 55,340 lines in 3 s), the connections it has keep reading and
    writing correctly, and once some close the client waiting in the backlog is served."""
    disk = backing_factory(4 * MiB)
    original = disk.read_bytes()
    with run_server(tmp_path, disk, preexec_fn=_nofile(64, 64)) as srv:
        clients = []
        waiting = None
        for _ in range(100):
            c, greeted = _connect(srv.sock, 5.0)
            if not greeted:
                waiting = c
                break
            clients.append(c)
        assert waiting is not None, "64 descriptors did not run out"
        assert len(clients) > 10
        wait_until(lambda: "Too many open files" in srv.stderr(), what="EMFILE in the log")
        before = _log_lines(srv, r"(?m)^.*accept")
        time.sleep(3)
        during = _log_lines(srv, r"(?m)^.*accept") - before
        assert during <= 6, f"{during} lines about accept in 3 s:\n{srv.stderr()[-2000:]}"
        assert srv.alive()
        # The connections already open are served, reads and writes alike.
        for i, c in enumerate(clients[:3]):
            data = bytes([65 + i]) * 4096
            err, _, _ = c.call(CMD_WRITE, 65536 * i, 4096, payload=data)
            assert err == 0
            err, got, _ = c.call(CMD_READ, 65536 * i, 4096)
            assert err == 0 and got == data
            err, got, _ = c.call(CMD_READ, MiB, 256 * KiB)          # a large one: sendfile
            assert err == 0 and got == original[MiB:MiB + 256 * KiB]
        # Descriptors come back: the client waiting in the backlog is served, and new ones.
        for c in clients[-5:]:
            c.disconnect()
        del clients[-5:]
        waiting.sock.settimeout(30)
        waiting.greeting()
        waiting.client_flags()
        waiting.option(OPT_GO, waiting.info_data())
        assert waiting.option_replies(OPT_GO)[-1][0] == REP_ACK
        err, got, _ = waiting.call(CMD_READ, 65536, 4096)
        assert err == 0 and got == b"B" * 4096
        waiting.disconnect()
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert h.pread(4096, 2 * MiB) == original[2 * MiB:2 * MiB + 4096]
        h.shutdown()
        for c in clients:
            c.disconnect()
        assert "accepting new connections again" in srv.stderr()


def _soft_nofile(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_the_soft_descriptor_limit_is_raised_but_not_for_the_backing_command(tmp_path):
    """Started with a soft limit of 64 under a hard one of 4096, the server raises its soft
    limit to 4096 (as qemu does); the backing command it started keeps the 64 it was given
    (a program may use select(), which breaks above 1024)."""
    pidfile = tmp_path / "backing.pid"
    with run_server(tmp_path, None, "--", "nbdkit", "-P", pidfile, "pattern", "1M",
                    preexec_fn=_nofile(64, 4096)) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert h.pread(8, 65536) == (65536).to_bytes(8, "big")
        h.shutdown()
        assert _soft_nofile(srv.pid) == 4096
        assert _soft_nofile(int(pidfile.read_text())) == 64


# ---------------------------------------------------------------- the read budget (item 8)


def _pattern(offset, count):
    """What nbdkit's pattern plugin serves: each 8 bytes, their offset, big-endian."""
    words = array("Q", range(offset, offset + count, 8))
    words.byteswap()
    return words


def _same_as_pattern(data, offset):
    words = array("Q")
    words.frombytes(data)
    return words == _pattern(offset, len(data))


def _send_reads(c, count, n, first_cookie=1, base=0):
    c.send(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, first_cookie + i,
                                base + i * count, count) for i in range(n)))


def _peak_rss_growth(srv, base_kib, seconds):
    """Largest RSS growth (bytes) seen over a few seconds."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(srv.pid) - base_kib)
        time.sleep(0.05)
    return peak * KiB


@pytest.fixture
def slow_backing(nbdkit):
    """A remote disk: nbdkit's pattern plugin behind the delay filter."""
    return nbdkit("--filter=delay", "pattern", "2G", "rdelay=100ms")


def _warm(srv):
    """One whole connection with a few reads, so that the baseline RSS is the idle server's."""
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for off in range(0, 8 * MiB, MiB):
        assert _same_as_pattern(h.pread(MiB, 1536 * MiB + off), 1536 * MiB + off)
    h.shutdown()


@pytest.mark.parametrize("options, n", [((), 16), (("--cow-on-read", "true"), 8)],
                         ids=["started-reads", "workers"])
def test_a_client_that_never_reads_holds_only_its_read_budget(slow_backing, tmp_path,
                                                               options, n):
    """READs of 32 MiB over an NBD backing, replies never read: the server holds about one
    connection's read budget (it took 1.57 GB with 64 in flight), whether the reads are
    started and collected by the replier or (with cow-on-read) read by workers; another
    client is served meanwhile, and when the first client reads, every reply arrives whole
    and correct."""
    count = 32 * MiB
    with run_server(tmp_path, slow_backing, *options) as srv:
        _warm(srv)
        base = rss_kib(srv.pid)
        hostile = RawClient(srv.sock, timeout=60).handshake(structured=False)
        _send_reads(hostile, count, n)
        growth = _peak_rss_growth(srv, base, 4)
        assert growth < READ_BUDGET + count + 48 * MiB, \
            f"RSS grew by {growth >> 20} MiB with the replies of {n} x 32 MiB READs unread"
        # Another client is served meanwhile, from the backing and from the overlay.
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert _same_as_pattern(h.pread(MiB, 1024 * MiB), 1024 * MiB)
        h.pwrite(b"w" * 4096, 1100 * MiB)
        assert h.pread(4096, 1100 * MiB) == b"w" * 4096
        h.shutdown()
        # The first client reads at last: every reply, whole and correct.
        seen = set()
        for _ in range(n):
            cookie, error, data, _ = hostile.reply(count)
            assert error == 0 and 1 <= cookie <= n and cookie not in seen
            seen.add(cookie)
            assert _same_as_pattern(data, (cookie - 1) * count), f"READ {cookie} is wrong"
        hostile.disconnect()
        assert srv.alive()


def test_clients_that_never_read_hold_only_the_servers_read_budget(slow_backing, tmp_path):
    """Ten clients with 32 MiB READs whose replies they never read: the server holds about its
    read budget, not ten connections' worth; a client with a small READ is still served, and a
    reader still waiting for the budget at SIGTERM answers ESHUTDOWN, so that shutdown does
    not wait for it."""
    count = 32 * MiB
    hostile = []
    with run_server(tmp_path, slow_backing) as srv:
        _warm(srv)
        base = rss_kib(srv.pid)
        for k in range(10):
            c = RawClient(srv.sock, timeout=60).handshake(structured=False)
            _send_reads(c, count, 4, base=k * 4 * count)
            hostile.append(c)
        growth = _peak_rss_growth(srv, base, 4)
        assert growth < SERVER_READ_BUDGET + 2 * count + 48 * MiB, \
            f"RSS grew by {growth >> 20} MiB with 10 clients' 32 MiB READs unread"
        # A client with small requests is served, budget or not.
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert _same_as_pattern(h.pread(MiB, 1800 * MiB), 1800 * MiB)
        h.shutdown()
        # At SIGTERM the clients still waiting for the budget hear ESHUTDOWN for the READ
        # they waited with, without waiting for the others' replies to leave (nobody reads
        # them: those connections are cut off only when the shutdown grace runs out).
        srv.proc.send_signal(signal.SIGTERM)
        first = []
        for c in hostile:
            c.sock.settimeout(10)
            magic, error, _ = struct.unpack(">IIQ", c.recv_exact(16))  # its first reply
            assert magic == 0x67446698
            first.append(error)
        assert sorted(first) == [0] * 8 + [ESHUTDOWN] * 2, first
        for c in hostile:
            c.close()
        assert srv.proc.wait(60) == 0


# ---------------------------------------------------------------- what a client learns (item 10)


class _Recording(RawClient):
    """A raw client that keeps every byte the server sent it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = bytearray()

    def recv_exact(self, n):
        data = super().recv_exact(n)
        self.received += data
        return data


NBD_INFO_NAME, NBD_INFO_DESCRIPTION = 1, 2


def _ask_everything(sock_path):
    """INFO with name and description, LIST, INFO and GO for names that do not exist, then
    requests that fail: every byte the server sent."""
    c = _Recording(sock_path)
    c.greeting()
    c.client_flags()
    for opt, data in ((OPT_INFO, c.info_data(b"", (NBD_INFO_NAME, NBD_INFO_DESCRIPTION))),
                      (OPT_LIST, b""),
                      (OPT_INFO, c.info_data(b"no-such", (NBD_INFO_DESCRIPTION,))),
                      (OPT_GO, c.info_data(b"../../etc/passwd"))):
        c.option(opt, data)
        replies = c.option_replies(opt)
        assert replies[-1][0] in (REP_ACK, REP_ERR | 6, REP_ERR | 3), replies
    c.option(8)  # STRUCTURED_REPLY: error replies carry a message
    assert c.option_replies(8)[-1][0] == REP_ACK
    c.structured = True
    c.option(OPT_GO, c.info_data(b"", (NBD_INFO_DESCRIPTION,)))
    assert c.option_replies(OPT_GO)[-1][0] == REP_ACK
    size = 4 * MiB
    errors = []
    for cmd, offset, length, payload in ((CMD_READ, size - 4096, 8192, b""),
                                         (CMD_WRITE, 0, 4096, b"x" * 4096),
                                         (CMD_WRITE, MiB, 4096, b"x" * 4096),  # over the cap
                                         (CMD_WRITE, 0, 2 * 65536, b"x" * 2 * 65536),
                                         (CMD_WRITE, size, 4096, b"y" * 4096),
                                         (CMD_READ, 0, 65 * MiB, b"")):
        err, _, chunks = c.call(cmd, offset, length, payload=payload)
        errors.append(err)
    assert errors == [EINVAL, 0, ENOSPC, ENOSPC, ENOSPC, EINVAL], errors
    c.disconnect()
    return bytes(c.received)


def test_descriptions_and_errors_name_no_path_and_no_command_line(tmp_path, nbdkit):
    """A file backing in a distinctive folder, and a command backing with a secret in its
    command line: neither the path nor the secret reaches a client (nbdinfo --json, nbdsh's
    get_export_description, NBD_OPT_LIST, a raw client's INFO and its error replies), and
    the server's own output still names the backing for the operator."""
    secret = "hunter2-s3cr3t-token"
    folder = tmp_path / "golden-images-Zq7xK"
    folder.mkdir()
    disk = folder / "golden.img"
    write_sample(disk, 4 * MiB)
    cases = [((disk,), ("golden-images-Zq7xK", str(folder))),
             ((None, "--", "env", f"COW_TEST_TOKEN={secret}", "nbdkit", "pattern", "4M"),
              (secret, "COW_TEST_TOKEN", "nbdkit"))]
    for args, hidden in cases:
        with start_server(args[0], "--overlay-max-size", "64K", *args[1:],
                          tmp_path=tmp_path) as (uri, proc):
            seen = [json.dumps(json.loads(subprocess.run(
                        ["nbdinfo", "--json", uri], check=True, capture_output=True,
                        text=True).stdout)),
                    subprocess.run(["nbdinfo", "--list", "--json", uri], check=True,
                                   capture_output=True, text=True).stdout]
            h = nbd.NBD()
            h.set_full_info(True)
            h.connect_uri(uri)
            seen.append(h.get_export_description())
            h.shutdown()
            raw = _ask_everything(proc.sock_path)
            assert b"copy-on-write view" in raw
            for text in seen:
                assert "copy-on-write view" in text
                for word in hidden:
                    assert word not in text, f"{word!r} reached a client: {text}"
            for word in hidden:
                assert word.encode() not in raw, f"{word!r} reached a raw client: {raw!r}"
            # The operator's start-up line still names the backing.
            assert hidden[0] in proc.log_path.read_text()
