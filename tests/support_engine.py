"""Helpers for the engine tests: what a backing really holds (read with the kernel's SEEK_DATA /
SEEK_HOLE or with libnbd, never with the engine), and checks of the engine's extent lists."""

import errno
import os
import random
import re

import nbd
import pytest

from cow import engine as E

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB

HOLE_ZERO = 3  # EXTENT_HOLE | EXTENT_ZERO, what a hole in the backing and a trimmed block report
DATA = 0


def randbytes(seed, n):
    return random.Random(seed).randbytes(n)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def file_map(path):
    """(start, end, type) runs of a file from SEEK_DATA / SEEK_HOLE: holes are hole|zero."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        runs = []
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = size
            data = min(data, size)
            if data > off:
                runs.append((off, data, HOLE_ZERO))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            runs.append((data, hole, DATA))
            off = hole
        return merge(runs)
    finally:
        os.close(fd)


def nbd_connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def nbd_map(uri):
    """(start, end, type) runs of an NBD export from its base:allocation context (via libnbd)."""
    h = nbd_connect(uri)
    try:
        size = h.get_size()
        runs = []
        off = 0
        while off < size:
            got = []

            def cb(metacontext, offset, entries, err):
                if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                    got.extend(entries)
                return 0

            h.block_status(min(size - off, 1 << 30), off, cb)
            assert got, "backing returned no extents"
            for i in range(0, len(got), 2):
                n = min(got[i], size - off)
                if n == 0:
                    break
                runs.append((off, off + n, got[i + 1] & 3))
                off += n
        return merge(runs)
    finally:
        h.shutdown()
        del h


def nbd_read(uri, count=None, offset=0):
    h = nbd_connect(uri)
    try:
        size = h.get_size()
        if count is None:
            count = size - offset
        maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
        chunk = min(maximum, 32 * MiB) if maximum > 0 else 32 * MiB
        out = bytearray()
        while count:
            n = min(count, chunk)
            out += h.pread(n, offset)
            offset += n
            count -= n
        return bytes(out)
    finally:
        h.shutdown()
        del h


def merge(runs):
    """Merge adjacent (start, end, value) runs of equal value."""
    out = []
    for start, end, value in runs:
        if end <= start:
            continue
        if out and out[-1][1] == start and out[-1][2] == value:
            out[-1] = (out[-1][0], end, value)
        else:
            out.append((start, end, value))
    return out


def clip(runs, start, end):
    out = []
    for s, e, v in runs:
        s, e = max(s, start), min(e, end)
        if s < e:
            out.append((s, e, v))
    return out


def collect(method, count, offset, req_one=False):
    """Call an extents-like method until [offset, offset+count) is covered, checking each reply
    against the contract (at least one run, positive lengths, nothing past the request).
    Returns merged (start, end, value) runs."""
    runs = []
    pos, end = offset, offset + count
    while pos < end:
        reply = method(end - pos, pos, req_one)
        assert isinstance(reply, list) and reply, f"no runs at {pos} (count {end - pos})"
        if req_one:
            assert len(reply) == 1, f"req_one gave {len(reply)} runs"
        for length, value in reply:
            assert length > 0, f"run of length {length} at {pos}"
            assert pos + length <= end, f"run past the request: {pos}+{length} > {end}"
            runs.append((pos, pos + length, value))
            pos += length
    return merge(runs)


def expected_extents(eng, backing_runs, offset, count):
    """What extents must say: data for allocated blocks, hole|zero for trimmed ones, the backing's
    own runs for blocks not allocated."""
    bs = eng.block_size
    end = offset + count
    runs = []
    for blk in range(offset // bs, (end + bs - 1) // bs):
        s, e = max(blk * bs, offset), min((blk + 1) * bs, end)
        st = eng.blk_status(blk)
        if st == E.BLOCK_ALLOCATED:
            runs.append((s, e, DATA))
        elif st == E.BLOCK_TRIMMED:
            runs.append((s, e, HOLE_ZERO))
        else:
            runs.extend(clip(backing_runs, s, e))
    return merge(runs)


def expected_depth(eng, offset, count):
    bs = eng.block_size
    end = offset + count
    runs = []
    for blk in range(offset // bs, (end + bs - 1) // bs):
        s, e = max(blk * bs, offset), min((blk + 1) * bs, end)
        st = eng.blk_status(blk)
        runs.append((s, e, E.DEPTH_BACKING if st == E.BLOCK_NOT_ALLOCATED else E.DEPTH_OVERLAY))
    return merge(runs)


def check_extents(eng, backing_runs, offset=0, count=None, content=None):
    """Extents and allocation depth of [offset, offset+count) match the block states and the
    backing; every byte reported as zero really reads as zero (in `content` if given)."""
    if count is None:
        count = eng.size - offset
    if count == 0:
        assert eng.extents(0, offset) == []
        return
    got = collect(eng.extents, count, offset)
    for s, e, t in got:
        assert t in (0, 1, 2, 3), f"extent type {t}"
        if t & E.EXTENT_ZERO and content is not None:
            assert content[s:e].count(0) == e - s, f"extent [{s},{e}) says zero but holds data"
    assert got == expected_extents(eng, backing_runs, offset, count)
    assert collect(eng.allocation_depth, count, offset) == expected_depth(eng, offset, count)
    # req_one: exactly one run, a prefix of the first run of the full answer.
    first = eng.extents(count, offset, True)
    assert len(first) == 1
    length, t = first[0]
    assert t == got[0][2] and 0 < length <= got[0][1] - offset


def read_all(eng):
    buf = bytearray(eng.size)
    eng.pread(buf, 0)
    return bytes(buf)


def states(eng):
    return [eng.blk_status(b) for b in range(eng.nr_blocks)]


def assert_same(got, want, what="content"):
    """Byte comparison that reports the first difference instead of two huge reprs."""
    if got == want:
        return
    n = min(len(got), len(want))
    first = next((i for i in range(n) if got[i] != want[i]), n)
    pytest.fail(
        f"{what} differs at byte {first} (lengths {len(got)}, {len(want)}): "
        f"got {bytes(got[first:first + 16]).hex()} want {bytes(want[first:first + 16]).hex()}"
    )


class Engines:
    """Make engines for one test (overlay in the test's tmp dir by default) and close them after."""

    def __init__(self, tmpdir):
        self.tmpdir = str(tmpdir)
        self.made = []

    def __call__(self, backing, **kw):
        kw.setdefault("tmpdir", self.tmpdir)
        if isinstance(backing, os.PathLike):
            backing = str(backing)
        eng = E.Engine(backing, **kw)
        self.made.append(eng)
        return eng

    def close(self):
        for eng in self.made:
            if not eng.closed:
                eng.close()


@pytest.fixture
def engines(tmp_path, nbdkit):
    """engines(backing, **options) -> Engine with its overlay in the test's tmp dir, closed after
    the test.  Depends on nbdkit so that engines close before the servers stop (nbdkit waits for
    its clients when it has more than one)."""
    made = Engines(tmp_path)
    yield made
    made.close()


# -- the overlay's system calls, from strace ------------------------------------------------

def overlay_write_calls(trace: str, overlay: str) -> list[list[tuple[int, int, int]]]:
    """The pwrite64 and splice calls into a file whose path holds ``overlay``, from the text of
    ``strace -f -y -qq -e trace=pwrite64,splice,write``, as (offset, count asked, result), in
    groups: a script writes "---\\n" to its stdout after each write it wants checked."""
    groups, calls = [], []
    for line in trace.splitlines():
        if re.search(r'write\(1<[^>]*>, "---\\n"', line):
            groups.append(calls)
            calls = []
            continue
        fds = [path for _, path in re.findall(r"(\d+)<([^>]*)>", line)]
        ret = re.search(r"\) = (-?\d+)", line)
        if ret is None:
            continue
        n = int(ret.group(1))
        # pwrite64(7</dir/vm.cow>, "..."..., 1000, 65536) = 1000
        m = re.search(r"pwrite64\(\d+<[^>]*>(?:\(deleted\))?, .*, (\d+), (\d+)\) = ", line)
        if m and overlay in fds[0]:
            calls.append((int(m.group(2)), int(m.group(1)), n))
        # splice(5<pipe:[1]>, NULL, 7</dir/vm.cow>, [66536], 64536, SPLICE_F_MOVE) = 64536
        m = re.search(r"splice\(\d+<[^>]*>, NULL, \d+<[^>]*>(?:\(deleted\))?, \[(\d+)\], "
                      r"(\d+), ", line)
        if m and len(fds) > 1 and overlay in fds[1]:
            calls.append((int(m.group(1)), int(m.group(2)), n))
    return groups
