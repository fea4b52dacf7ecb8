"""The order of a flush's system calls, read from strace (issue 21): a cheap second to the power
cuts of tests/test_powercut*.py for a FLUSH or FUA that never syncs, or syncs in the wrong order.

`cow.server --overlay FILE` runs under `strace -f`; a hand-driven client writes fresh blocks
(small writes, served inline, and large ones, which arrive through splice), then FLUSH; writes
with FUA; zeroes and trims with FUA.  For each FLUSH and each FUA request, the trace must show
what cow/overlay.pxi argues (overlay_flush):

    the data written to FILE (pwrite, splice, a punched hole) since the previous checked reply
      ... then an fdatasync/fsync of FILE that begins after the last of them returned
      ... then the bitmap written (FILE between the bitmap offset and the data offset)
      ... then an fdatasync/fsync of FILE that begins after the bitmap write returned
      ... and only then the reply to the client (a sendmsg/send/write carrying its cookie).

strace -f prints a call that another thread's waits on only after that call returned (the
thread is stopped until strace has seen it), so the order of its lines is the order of the calls:
a call that blocks is split into "<unfinished ...>" (its start) and "<... resumed>" (its end)."""

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess

import pytest

from cow import overlayfile as F
from cow import protocol as P
from support_server import RawClient, server_command, wait_for_socket

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4 * KiB
COOKIE = 0x5EC5_F1C0_0000_0000       # every request's cookie: easy to find in the trace

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

SYSCALLS = ("pwrite64,pwritev,pwritev2,write,writev,splice,fallocate,copy_file_range,"
            "fdatasync,fsync,sendmsg,sendto")


class Call:
    def __init__(self, pid, name, args, start):
        self.pid, self.name, self.args, self.start = pid, name, args, start
        self.end = None
        self.result = None

    def __repr__(self):
        return f"{self.name}({self.args[:80]}) [{self.start}-{self.end}] = {self.result}"


def parse(trace: str) -> list[Call]:
    """The calls of an `strace -f -y -qq -xx` trace, with the line of their start and end."""
    calls, pending = [], {}
    for i, line in enumerate(trace.splitlines()):
        m = re.match(r"(\d+) +<\.\.\. (\w+) resumed>(.*)\) += (-?\d+)", line)
        if m:
            c = pending.pop(m.group(1), None)
            if c is not None:
                c.args += m.group(3)
                c.end, c.result = i, int(m.group(4))
            continue
        m = re.match(r"(\d+) +(\w+)\((.*?)(?: <unfinished \.\.\.>$|\) += (-?\d+).*$)", line)
        if not m:
            continue
        c = Call(m.group(1), m.group(2), m.group(3), i)
        if m.group(4) is None:
            pending[m.group(1)] = c
        else:
            c.end, c.result = i, int(m.group(4))
        calls.append(c)
    return [c for c in calls if c.end is not None]


def fd_paths(args):
    """The paths strace -y shows for the descriptors in args (-xx prints them in hex too)."""
    return [re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), p)
            for p in re.findall(r"\d+<([^>]*)>", args)]


def overlay_write(c: Call, ov: str):
    """(offset, count) of a write of c into the overlay file, or None."""
    paths = fd_paths(c.args)
    if c.name in ("pwrite64", "pwritev", "pwritev2", "fallocate") and paths and \
            paths[0].startswith(ov):
        nums = re.findall(r", (\d+)", c.args)
        if c.name == "fallocate":
            return int(nums[-2]), int(nums[-1])
        if c.name == "pwrite64":
            return int(nums[-1]), int(nums[-2])
        return int(nums[-1]), c.result
    if c.name == "splice" and len(paths) > 1 and paths[1].startswith(ov):
        m = re.search(r", NULL, \d+<[^>]*>, \[(\d+)\], (\d+),", c.args)
        return int(m.group(1)), int(m.group(2))
    if c.name == "copy_file_range" and len(paths) > 1 and paths[1].startswith(ov):
        raise AssertionError(f"unexpected copy_file_range into the overlay: {c}")
    return None


def is_sync(c: Call, ov: str):
    paths = fd_paths(c.args)
    return c.name in ("fdatasync", "fsync") and paths and paths[0].startswith(ov) \
        and c.result == 0


def reply_hex(cookie):
    """A simple reply's first 16 bytes, success, as strace -xx prints them."""
    return "".join(f"\\x{b:02x}" for b in struct.pack(">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, 0,
                                                       cookie))


def check_order(calls, ov, h, checked):
    """For each (cookie, what) in checked, in order: data, sync, bitmap, sync, reply."""
    prev = -1
    report = []
    for cookie, what, expect_data in checked:
        pattern = reply_hex(cookie)
        replies = [c for c in calls if c.name in ("sendmsg", "sendto", "write", "writev")
                   and pattern in c.args and c.start > prev]
        assert replies, f"{what}: no reply with its cookie in the trace"
        r = replies[0]
        window = [c for c in calls if prev < c.start < r.start]
        data, bitmap, syncs = [], [], []
        for c in window:
            w = overlay_write(c, ov)
            if w is not None:
                off, n = w
                if off >= h.data_offset:
                    data.append(c)
                elif off + n > h.bitmap_offset:
                    assert off >= h.bitmap_offset and off + n <= h.data_offset, c
                    bitmap.append(c)
            elif is_sync(c, ov):
                syncs.append(c)
        assert bitmap, f"{what}: fresh blocks, and no bitmap write before the reply: {window}"
        if expect_data:
            assert data, f"{what}: no data written to the overlay before the reply"
        first_bitmap = min(c.start for c in bitmap)
        last_bitmap = max(c.end for c in bitmap)
        if data:
            last_data = max(c.end for c in data)
            assert any(s.start > last_data and s.end < first_bitmap for s in syncs), (
                f"{what}: the bitmap was written (line {first_bitmap}) without a sync of the data "
                f"(written until line {last_data}) in between; syncs: {syncs}")
        assert any(s.start > last_bitmap and s.end < r.start for s in syncs), (
            f"{what}: the reply (line {r.start}) was sent without a sync after the bitmap write "
            f"(line {last_bitmap}); syncs: {syncs}")
        report.append((what, len(data), len(bitmap), len(syncs)))
        prev = r.end
    return report


@pytest.mark.timeout(300)
def test_flush_and_fua_reply_only_after_the_data_then_the_bitmap_are_synced(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 * MiB))
    ov = tmp_path / "vm.cow"
    sock = tmp_path / "s.sock"
    trace = tmp_path / "trace"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        ["strace", "-f", "-y", "-qq", "-xx", "-s", "4096", "-e", f"trace={SYSCALLS}", "-o",
         str(trace), *server_command(disk, "-U", sock, "--overlay", ov, "--cow-block-size",
                                     "4K")],
        stdout=log, stderr=subprocess.STDOUT)
    checked = []
    try:
        wait_for_socket(sock, proc, 60)
        with RawClient(str(sock), timeout=60) as c:
            c.negotiate(structured=False)
            n = 0

            def req(cmd, offset, count=0, flags=0, payload=b""):
                nonlocal n
                n += 1
                c.request(cmd, offset, count or len(payload), flags=flags, cookie=COOKIE + n,
                          payload=payload)
                cookie, error, _ = c.reply()
                assert (cookie, error) == (COOKIE + n, 0)
                return COOKIE + n

            W, FUA = P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA
            # Writes, then FLUSH: small ones (inline) ...
            for i in range(4):
                req(W, (8 * i + 1) * BLOCK + 100, payload=os.urandom(3000))
            checked.append((req(P.NBD_CMD_FLUSH, 0), "FLUSH after small writes", True))
            # ... and large ones (through splice).
            for i in range(2):
                req(W, (4 + i) * MiB, payload=os.urandom(512 * KiB))
            checked.append((req(P.NBD_CMD_FLUSH, 0), "FLUSH after large writes", True))
            # Writes with FUA, small and large.
            checked.append((req(W, 2 * MiB + BLOCK, flags=FUA, payload=os.urandom(BLOCK)),
                            "small WRITE with FUA", True))
            checked.append((req(W, 8 * MiB, flags=FUA, payload=os.urandom(1 * MiB)),
                            "large WRITE with FUA", True))
            # Zeroes and a trim with FUA, of fresh blocks and of written ones.
            checked.append((req(P.NBD_CMD_WRITE_ZEROES, 3 * MiB, 8 * BLOCK, flags=FUA),
                            "WRITE_ZEROES with FUA", False))
            checked.append((req(P.NBD_CMD_TRIM, 4 * MiB, 64 * BLOCK, flags=FUA),
                            "TRIM with FUA", False))
            c.request(P.NBD_CMD_DISC, cookie=COOKIE)
    finally:
        # The server is strace's child: stopped by SIGTERM, it exits, then strace does.
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            servers = [int(pid) for pid in f.read().split()]
        for pid in servers:
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                for pid in servers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
            log.close()
    fd = os.open(ov, os.O_RDONLY)
    try:
        h = F.read_header(fd, str(ov))
    finally:
        os.close(fd)
    text = trace.read_text()
    report = check_order(parse(text), str(ov), h, checked)
    print("what, data writes, bitmap writes, syncs before the reply:", report)
