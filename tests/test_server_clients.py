"""python -m cow.server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio, and
nbdkit's nbd plugin, plus the qcow2 diff recipe from nbdkit's cow filter documentation."""

import json
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager

import nbd
import pytest

from conftest import run_nbdkit
from support_server import start_server

SIZE = 8 * 1024 * 1024


def sh(*cmd, timeout=120, check=True):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def disk(backing_factory):
    return backing_factory(SIZE)


@pytest.fixture
def served(disk, tmp_path):
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        yield uri, proc


def pattern_file(path, size, seed):
    data = bytes((i * seed + i // 997) & 0xFF for i in range(65536))
    with open(path, "wb") as f:
        for _ in range(size // len(data)):
            f.write(data)
    return path


# ---- nbdinfo -----------------------------------------------------------------------------------

def test_nbdinfo_plain_json_list(served, disk):
    uri, _ = served
    out = sh("nbdinfo", uri).stdout
    assert f"export-size: {SIZE}" in out and "can_multi_conn: true" in out
    assert "base:allocation" in out and "qemu:allocation-depth" in out
    info = json.loads(sh("nbdinfo", "--json", uri).stdout)
    [export] = info["exports"]
    assert export["export-size"] == SIZE and export["can_zero"] and export["can_fast_zero"]
    assert export["block_size_maximum"] >= 64 * 1024 * 1024
    assert export["description"] == "copy-on-write view"  # never the backing (issue 18)
    listing = json.loads(sh("nbdinfo", "--list", "--json", uri).stdout)
    assert [e["export-name"] for e in listing["exports"]] == [""]


def test_nbdinfo_map(served):
    uri, _ = served
    rows = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    assert sum(r["length"] for r in rows) == SIZE
    assert {r["type"] for r in rows} == {0, 3}
    assert rows[0] == {"offset": 0, "length": 131072, "type": 0, "description": "data"}
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"z" * 4096, 65536 * 2)  # into the first hole
    h.shutdown()
    rows = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    assert rows[0]["length"] >= 65536 * 3 and rows[0]["type"] == 0
    depth = json.loads(sh("nbdinfo", "--map=qemu:allocation-depth", "--json", uri).stdout)
    assert [(r["offset"], r["length"], r["type"]) for r in depth[:3]] == [
        (0, 131072, 2), (131072, 65536, 1), (196608, SIZE - 196608, 2)]


# ---- nbdcopy -----------------------------------------------------------------------------------

def test_nbdcopy_out_and_in(served, disk, tmp_path):
    uri, _ = served
    out = tmp_path / "out.img"
    sh("nbdcopy", uri, out)
    assert out.read_bytes() == disk.read_bytes()
    src = pattern_file(tmp_path / "src.img", SIZE, 13)
    sh("nbdcopy", "--connections=4", "--requests=16", src, uri)
    sh("nbdcopy", "--connections=4", uri, tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()


# ---- qemu-img and qemu-io ----------------------------------------------------------------------

def test_qemu_img_info_map_compare_convert(served, disk, tmp_path):
    uri, _ = served
    info = json.loads(sh("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == SIZE
    mapping = json.loads(sh("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    assert sum(m["length"] for m in mapping) == SIZE
    assert any(m["data"] for m in mapping) and any(not m["data"] for m in mapping)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, uri)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, tmp_path / "c.qcow2")
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", tmp_path / "c.qcow2", disk)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
       pattern_file(tmp_path / "p.img", SIZE, 5), uri)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "p.img", uri)
    r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, uri, check=False)
    assert r.returncode == 1  # differ now


def test_qemu_io_fua_write_zeroes_discard(served, disk):
    uri, _ = served
    sh("qemu-io", "-f", "raw", uri,
       "-c", "write -P 0x55 -f 0 64k",
       "-c", "write -P 0x66 100000 5000",
       "-c", "write -z 200000 70000",
       "-c", "write -z -u 262144 131072",
       "-c", "discard 524288 65536",
       "-c", "flush")
    r = sh("qemu-io", "-f", "raw", uri,
           "-c", "read -P 0x55 0 64k",
           "-c", "read -P 0x66 100000 5000",
           "-c", "read -P 0 200000 70000",
           "-c", "read -P 0 262144 131072")
    assert "Pattern verification failed" not in r.stdout + r.stderr
    with open(disk, "rb") as f:
        f.seek(65536)
        expect = f.read(100000 - 65536)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(len(expect), 65536) == expect
    h.shutdown()


# ---- fio ---------------------------------------------------------------------------------------

def test_fio_nbd_engine_with_verify(served):
    uri, _ = served
    r = sh("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
           f"--size={SIZE}", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
           "--output-format=json", timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == SIZE and job["read"]["io_bytes"] == SIZE


def test_fio_nbd_engine_four_jobs(served):
    uri, _ = served
    r = sh("fio", "--name=mixed", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
           "--size=2M", "--numjobs=4", "--iodepth=8", "--group_reporting", "--output-format=json",
           timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] + job["write"]["io_bytes"] == 4 * 2 << 20


# ---- nbdkit's nbd plugin as a client -----------------------------------------------------------

def test_nbdkit_nbd_plugin_as_client(served, disk, nbdkit, tmp_path):
    uri, proc = served
    front = nbdkit("nbd", f"socket={proc.sock_path}")
    out = tmp_path / "via-nbdkit.img"
    sh("nbdcopy", front, out)
    assert out.read_bytes() == disk.read_bytes()
    h = nbd.NBD()
    h.connect_uri(front)
    h.pwrite(b"through nbdkit", 4096)
    h.zero(8192, 65536)
    h.trim(65536, 65536 * 4)
    h.flush()
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(14, 4096) == b"through nbdkit"
    assert h.pread(8192, 65536) == bytes(8192)
    assert h.pread(65536, 65536 * 4) == bytes(65536)
    h.shutdown()


# ---- the diff recipe ---------------------------------------------------------------------------

def test_qcow2_diff_recipe(served, disk, tmp_path):
    """nbdkit-cow-filter(1): make changes through the overlay, then turn them into a qcow2 whose
    backing is the original image, holding exactly the changes."""
    uri, proc = served
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x11" * 65536, 1 << 20)
    h.pwrite(b"\x22" * 100, 3 * (1 << 20) + 7)
    h.flush()
    h.shutdown()
    diff = tmp_path / "diff.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"nbd:unix:{proc.sock_path}", "-F", "raw",
       diff)
    sh("qemu-img", "rebase", "-F", "raw", "-b", disk, "-f", "qcow2", diff)
    # The diff over the original equals the modified export...
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", diff, uri)
    # ...and holds data only where the changes were.
    mapping = json.loads(sh("qemu-img", "map", "--output=json", diff).stdout)
    top = [(m["start"], m["length"]) for m in mapping if m["depth"] == 0 and m["data"]]
    covered = sum(n for _, n in top)
    assert 0 < covered <= 4 * 65536, top
    assert any(s <= 1 << 20 < s + n for s, n in top)
    assert any(s <= 3 * (1 << 20) + 7 < s + n for s, n in top)
    assert os.path.getsize(diff) < 2 * 1024 * 1024


# ---- more requests in flight than the backing is given at once --------------------------------

class HeldBacking:
    """A real NBD backing whose requests can be held and let go: nbdkit's pattern plugin (each
    8 bytes hold their own offset, big-endian) behind its pause filter, with its log filter in
    front, so that every request the cow server sends it is logged when it arrives, held or
    not, and again when it returns.  What is in flight at the backing is read from that log:
    no timing is measured."""

    ENTRY = re.compile(r" connection=(\d+) (\w+) id=(\d+) .*\.\.\.$")
    RETURN = re.compile(r" connection=(\d+) \.\.\.(\w+) id=(\d+) return")

    def __init__(self, tmp_path, size="64M"):
        self.log = tmp_path / "held-backing.log"
        self.control = tmp_path / "held-backing.ctl"
        self.sock = tmp_path / "held-backing.sock"
        self.args = ["-t", "256", "--filter=log", "--filter=pause", "pattern", size,
                     f"logfile={self.log}", f"pause-control={self.control}"]
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def __enter__(self):
        self._cm = run_nbdkit(self.args, self.sock)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    def _control(self, command: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(self.control))
            s.sendall(command)
            assert s.recv(1) == command.upper()

    def hold(self):
        """Requests from now on wait at the backing (logged as they arrive)."""
        self._control(b"p")

    def release(self):
        self._control(b"r")

    @contextmanager
    def held(self):
        """Hold the backing's requests inside the block; let them go at its end, whatever
        happens in it (a server whose backing never answers cannot stop)."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def _lines(self):
        text = self.log.read_text() if self.log.exists() else ""
        lines = text.split("\n")
        return lines[:-1]           # the last one may be half written

    def in_flight(self) -> int:
        """Requests the backing has received and not answered."""
        now = set()
        for line in self._lines():
            if m := self.ENTRY.search(line):
                now.add(m.groups())
            elif m := self.RETURN.search(line):
                now.discard(m.groups())
        return len(now)

    def peak(self) -> int:
        """The most requests the backing had in flight at once, over its whole log."""
        now, peak = set(), 0
        for line in self._lines():
            if m := self.ENTRY.search(line):
                now.add(m.groups())
                peak = max(peak, len(now))
            elif m := self.RETURN.search(line):
                now.discard(m.groups())
        return peak

    def wait_in_flight(self, n: int, client=None, timeout=60.0, settle=1.0) -> None:
        """Wait until n requests are held at the backing, then a moment more, and assert no
        more came: the moment only makes a wrong cap likelier to show, it can never make a
        right one fail.  client: a libnbd handle with requests to send meanwhile (libnbd sends
        what did not fit in the socket only when polled)."""

        def wait(seconds):
            if client is None:
                time.sleep(seconds)
                return
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                client.poll(max(1, int(left * 1000)))

        deadline = time.monotonic() + timeout
        while (got := self.in_flight()) < n:
            assert time.monotonic() < deadline, f"only {got} of {n} requests reached the backing"
            wait(0.02)
        wait(settle)
        assert self.in_flight() == n, f"{self.in_flight()} requests at the backing, not {n}"


def pattern_bytes(offset, count):
    """What nbdkit's pattern plugin holds at offset (8-byte aligned)."""
    return b"".join((offset + i).to_bytes(8, "big") for i in range(0, count, 8))


def wait_all(h, cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)    # raises nbd.Error if the reply was an error


def test_200_reads_at_once_over_a_held_backing_64_reach_it(tmp_path):
    """README (over a remote backing): a client's whole queue depth, up to 64 requests a
    connection, is in flight at the backing at once.  A client that sends 200 READs at once,
    all of blocks the overlay does not hold, has exactly 64 of them at the backing while it
    holds them, and gets all 200 right once it answers."""
    with HeldBacking(tmp_path) as back, \
            start_server(back.uri, "--cow-block-size", "4K", tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        bufs = [(i * 65536 + 8 * i, nbd.Buffer(4096)) for i in range(200)]
        with back.held():
            cookies = [h.aio_pread(b, off) for off, b in bufs]
            back.wait_in_flight(64, h)
            assert h.aio_in_flight() == 200     # none answered while the backing holds them
        wait_all(h, cookies)
        for off, b in bufs:
            assert b.to_bytearray() == pattern_bytes(off, 4096), off
        assert back.peak() == 64
        assert h.pread(16, 5 * 65536) == pattern_bytes(5 * 65536, 16)    # and it goes on
        h.shutdown()


def test_200_mixed_requests_at_once_over_a_held_backing(tmp_path):
    """200 requests at once on one connection over a held NBD backing: 50 reads of the
    backing and 50 partial writes (each copies its block up) are all at the backing at once,
    while the 100 the overlay serves (reads of blocks written before, whole-block writes) are
    answered without waiting for them (README: requests the overlay can serve never wait
    behind these).  Once the backing answers, every reply is right."""
    with HeldBacking(tmp_path) as back, \
            start_server(back.uri, "--cow-block-size", "4K", tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        whole = {k: bytes([k % 251 + 1]) * 4096 for k in range(50)}
        for k, data in whole.items():
            h.pwrite(data, k * 4096)                 # in the overlay before the backing is held
        cookies, backing_reads, overlay_reads, written = [], [], [], {}
        with back.held():
            for i in range(200):
                kind = i % 4
                if kind == 0:                           # a read of the backing
                    off = (1000 + i) * 4096 + 24
                    b = nbd.Buffer(1000)
                    backing_reads.append((b, pattern_bytes(off - 24, 1024)[24:]))
                    cookies.append(h.aio_pread(b, off))
                elif kind == 1:                         # a partial write: a copy-up
                    off = (2000 + i) * 4096 + 512
                    written[off] = bytes([i % 250 + 3]) * 100
                    cookies.append(h.aio_pwrite(written[off], off))
                elif kind == 2:                         # a read of what the overlay holds
                    b = nbd.Buffer(4096)
                    overlay_reads.append((b, whole[i // 4]))
                    cookies.append(h.aio_pread(b, i // 4 * 4096))
                else:                                   # a whole-block write: no backing
                    off = (3000 + i) * 4096
                    written[off] = bytes([i % 250 + 3]) * 4096
                    cookies.append(h.aio_pwrite(written[off], off))
            back.wait_in_flight(100, h)
            deadline = time.monotonic() + 60
            while h.aio_in_flight() > 100:              # the overlay's hundred are answered
                assert time.monotonic() < deadline, h.aio_in_flight()
                h.poll(1000)
            for b, want in overlay_reads:
                assert b.to_bytearray() == want
            assert back.in_flight() == 100
        wait_all(h, cookies)
        for b, want in backing_reads:
            assert b.to_bytearray() == want
        for off, data in written.items():
            block = off // 4096 * 4096
            want = bytearray(pattern_bytes(block, 4096))
            want[off - block:off - block + len(data)] = data
            assert h.pread(4096, block) == want, off
        h.shutdown()


def test_200_requests_at_once_over_a_file(served, disk):
    """The same over a file backing: 200 requests sent before any reply is read, each on a
    range of its own (requests in flight may be served in any order): whole and partial
    writes, reads of the backing and of what was written before, zeroes, flushes."""
    uri, _ = served
    model = bytearray(disk.read_bytes())
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(2, 200, 10):                     # some reads below read what is written
        off = i * 40000
        model[off:off + 5000] = bytes([i % 250 + 1]) * 5000
        h.pwrite(bytes(model[off:off + 5000]), off)
    cookies, reads = [], []
    for i in range(200):
        off = i * 40000 + (i % 7) * 1000
        kind = i % 5
        if kind in (0, 1):
            data = bytes([i % 250 + 1]) * (4096 if kind == 0 else 300)
            cookies.append(h.aio_pwrite(data, off))
            model[off:off + len(data)] = data
        elif kind == 2:
            off = i * 40000
            b = nbd.Buffer(5000)
            reads.append((b, bytes(model[off:off + 5000])))
            cookies.append(h.aio_pread(b, off))
        elif kind == 3:
            cookies.append(h.aio_zero(2000, off))
            model[off:off + 2000] = bytes(2000)
        else:
            cookies.append(h.aio_flush())
    assert h.aio_in_flight() == 200           # all sent, no reply read yet
    wait_all(h, cookies)
    for b, want in reads:
        assert b.to_bytearray() == want
    assert h.pread(SIZE, 0) == model
    h.shutdown()
