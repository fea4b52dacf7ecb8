"""The engine over a file backing: block states and their transitions, the byte-range and block
APIs, sizes that are not a multiple of the block size, extents, fast zero, the overlay cap, the
overlay file itself, and every argument check.  Backings come from `backing_factory`, which also
asserts that each one is byte-identical after the test."""

import array
import errno
import fcntl
import gc
import mmap
import os
import re
import subprocess
import threading
import time

import pytest

from conftest import PYTHON
from cow import engine as E
from support_engine import (
    DATA,
    HOLE_ZERO,
    KiB,
    MiB,
    TiB,
    engines,  # noqa: F401 - a fixture
    assert_same,
    check_extents,
    collect,
    file_map,
    randbytes,
    read_all,
    read_file,
    states,
)
from support_hold import held  # noqa: F401 - a fixture

NA, AL, TR = 0, 1, 3
BLOCK_SIZES = [4 * KiB, 64 * KiB, 4 * MiB]
BS_IDS = ["4K", "64K", "4M"]




@pytest.fixture(params=BLOCK_SIZES, ids=BS_IDS)
def bs(request):
    return request.param


class Disk:
    """An engine over a sample backing plus a bytearray of what it must read as."""

    def __init__(self, engines, backing_factory, size, **kw):
        self.path = backing_factory(size)
        self.eng = engines(self.path, **kw)
        self.want = bytearray(read_file(self.path))
        self.backing_runs = file_map(self.path)

    def pwrite(self, data, offset):
        self.eng.pwrite(data, offset)
        self.want[offset:offset + len(data)] = data

    def zero(self, count, offset, **kw):
        self.eng.zero(count, offset, **kw)
        self.want[offset:offset + count] = bytes(count)

    def trim(self, count, offset):
        self.eng.trim(count, offset)
        self.want[offset:offset + count] = bytes(count)

    def check(self):
        assert_same(read_all(self.eng), self.want)
        check_extents(self.eng, self.backing_runs, content=self.want)
        st = states(self.eng)
        stats = self.eng.stats()
        assert stats["allocated_blocks"] == st.count(AL)
        assert stats["trimmed_blocks"] == st.count(TR)


@pytest.fixture
def disk(engines, backing_factory):
    def make(size, **kw):
        return Disk(engines, backing_factory, size, **kw)

    return make


# ---------------------------------------------------------------- constants and parsers


def test_constants():
    assert (E.BLOCK_NOT_ALLOCATED, E.BLOCK_ALLOCATED, E.BLOCK_TRIMMED) == (0, 1, 3)
    assert (E.EXTENT_HOLE, E.EXTENT_ZERO) == (1, 2)
    assert (E.DEPTH_OVERLAY, E.DEPTH_BACKING) == (1, 2)
    assert E.MIN_BLOCK_SIZE == 4096
    assert E.DEFAULT_BLOCK_SIZE == 65536
    assert E.CACHE_MODE_READ != E.CACHE_MODE_COW


@pytest.mark.parametrize(
    "value, want",
    [(4096, 4096), ("4096", 4096), ("4K", 4096), ("4k", 4096), ("64K", 65536), (65536, 65536),
     ("1M", MiB), ("4M", 4 * MiB)],
)
def test_parse_block_size(value, want):
    assert E.parse_block_size(value) == want


ALLOWED = re.compile(r"power of (two|2)", re.I)
MINIMUM = re.compile(r"4096|4 ?K", re.I)


@pytest.mark.parametrize("value", [0, 1, 512, 2048, 4095, 4097, 12288, 65535, -4096, "3K", "abc",
                                   "", "64X", "-64K"])
def test_parse_block_size_refuses(value):
    with pytest.raises(ValueError) as ei:
        E.parse_block_size(value)
    msg = str(ei.value)
    assert ALLOWED.search(msg) and MINIMUM.search(msg), f"message does not say what is allowed: {msg!r}"


@pytest.mark.parametrize(
    "value, want",
    [(0, 0), (123, 123), ("123", 123), ("1K", 1024), ("1k", 1024), ("3M", 3 * MiB), ("2G", 2 << 30),
     ("1T", TiB), ("1P", 1 << 50), ("16T", 16 * TiB)],
)
def test_parse_size(value, want):
    assert E.parse_size(value) == want


@pytest.mark.parametrize("value", ["", "abc", "1X", "-1", -1, "K"])
def test_parse_size_refuses(value):
    with pytest.raises(ValueError):
        E.parse_size(value)


# ---------------------------------------------------------------- construction, properties


def test_defaults_and_properties(engines, backing_factory):
    path = backing_factory(130000)
    eng = engines(path)
    assert eng.size == 130000
    assert eng.block_size == E.DEFAULT_BLOCK_SIZE == 65536
    assert eng.nr_blocks == 2
    assert eng.backing == str(path)
    assert eng.backing_is_nbd is False
    assert eng.lock_mode == "fine"
    assert eng.closed is False
    assert states(eng) == [NA, NA]
    assert eng.stats()["allocated_blocks"] == 0
    assert eng.stats()["trimmed_blocks"] == 0


@pytest.mark.parametrize("value, want", [("4K", 4096), ("64k", 65536), (4 * MiB, 4 * MiB), ("4096", 4096)])
def test_block_size_option(engines, backing_factory, value, want):
    eng = engines(backing_factory(130000), block_size=value)
    assert eng.block_size == want
    assert eng.nr_blocks == -(-130000 // want)


@pytest.mark.parametrize("value", [0, 1000, 2048, 4095, 4097, 3 * 4096, 65535, -65536, "5K", "big"])
def test_bad_block_size_is_refused_with_what_is_allowed(engines, backing_factory, value):
    path = backing_factory(4096)
    with pytest.raises(ValueError) as ei:
        engines(path, block_size=value)
    msg = str(ei.value)
    assert ALLOWED.search(msg) and MINIMUM.search(msg), f"message does not say what is allowed: {msg!r}"


@pytest.mark.parametrize("mode", ["fine", "global"])
def test_lock_mode_option(engines, backing_factory, mode):
    eng = engines(backing_factory(4096), lock_mode=mode)
    assert eng.lock_mode == mode


@pytest.mark.parametrize("mode", ["", "none", "coarse", None, 1])
def test_bad_lock_mode(engines, backing_factory, mode):
    path = backing_factory(4096)
    with pytest.raises((ValueError, TypeError)) as ei:
        engines(path, lock_mode=mode)
    if isinstance(mode, str):
        assert ei.type is ValueError
        assert "fine" in str(ei.value) and "global" in str(ei.value), str(ei.value)


def test_missing_backing_file(engines, tmp_path):
    path = tmp_path / "no-such-disk.img"
    with pytest.raises(OSError) as ei:
        engines(path)
    assert ei.value.errno == errno.ENOENT
    assert str(path) in str(ei.value), f"message does not name the backing: {ei.value}"


def test_missing_tmpdir(engines, backing_factory, tmp_path):
    path = backing_factory(4096)
    with pytest.raises(OSError) as ei:
        engines(path, tmpdir=str(tmp_path / "no-such-dir"))
    assert ei.value.errno == errno.ENOENT


def test_relative_cow_on_read_path_is_refused(engines, backing_factory):
    path = backing_factory(4096)
    with pytest.raises(ValueError) as ei:
        engines(path, cow_on_read="relative/switch")
    assert "absolute" in str(ei.value).lower()


@pytest.mark.parametrize("kw", [{"overlay_max_size": -1}, {"nbd_connections": 0},
                                {"nbd_connections": -2}])
def test_bad_numeric_options(engines, backing_factory, kw):
    path = backing_factory(4096)
    with pytest.raises(ValueError):
        engines(path, **kw)


# ---------------------------------------------------------------- the overlay file


def _fds():
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def _open_flags(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_overlay_is_unlinked_cloexec_in_tmpdir_and_backing_is_read_only(backing_factory, tmp_path):
    path = backing_factory(3 * 65536)
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    before = _fds()
    eng = E.Engine(str(path), tmpdir=str(ovl))
    try:
        new = {fd: target for fd, target in _fds().items() if fd not in before}
        overlay = [fd for fd, t in new.items() if t.startswith(str(ovl) + "/")]
        assert len(overlay) == 1, new
        fd = overlay[0]
        assert new[fd].endswith(" (deleted)"), new[fd]
        assert os.listdir(ovl) == [], "overlay file was not unlinked"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        backing = [fd for fd, t in new.items() if t == str(path)]
        assert backing, new
        for bfd in backing:
            assert _open_flags(bfd) & os.O_ACCMODE == os.O_RDONLY, "backing not opened read-only"
            assert fcntl.fcntl(bfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        eng.pwrite(b"x" * 65536, 0)
    finally:
        eng.close()
    assert eng.closed
    assert not (set(_fds()) - set(before)), "close() left file descriptors open"


def test_overlay_goes_to_TMPDIR(backing_factory, tmp_path, monkeypatch):
    path = backing_factory(65536)
    d = tmp_path / "envtmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    before = _fds()
    with E.Engine(str(path)) as eng:
        targets = [t for fd, t in _fds().items() if fd not in before]
        assert any(t.startswith(str(d) + "/") for t in targets), targets
        eng.pwrite(b"y" * 100, 0)
    assert eng.closed


def test_overlay_default_is_var_tmp(backing_factory, monkeypatch):
    path = backing_factory(65536)
    monkeypatch.delenv("TMPDIR", raising=False)
    before = _fds()
    with E.Engine(str(path)):
        targets = [t for fd, t in _fds().items() if fd not in before]
        assert any(t.startswith("/var/tmp/") and t.endswith(" (deleted)") for t in targets), targets


def test_engines_are_independent_and_freed(engines, backing_factory):
    path = backing_factory(130000)
    a, b = engines(path), engines(path, block_size=4096)
    a.pwrite(b"A" * 1000, 5000)
    assert read_all(b) == read_file(path)
    assert states(b) == [NA] * b.nr_blocks
    gc.collect()
    before = len(_fds())
    for _ in range(100):
        e = E.Engine(str(path), tmpdir=engines.tmpdir)
        e.pwrite(b"z" * 10, 0)
        del e
    gc.collect()
    assert len(_fds()) == before, "dropped engines leak file descriptors"


def test_close_and_context_manager(engines, backing_factory):
    path = backing_factory(65536)
    with E.Engine(str(path), tmpdir=engines.tmpdir) as eng:
        assert not eng.closed
        eng.pwrite(b"q" * 10, 0)
    assert eng.closed
    eng.close()  # a second close is harmless


AFTER_CLOSE = ["e.pread(bytearray(10), 0)", "e.pwrite(b'x', 0)", "e.zero(1, 0)", "e.trim(1, 0)",
               "e.cache(1, 0)", "e.flush()", "e.extents(1, 0)", "e.allocation_depth(1, 0)",
               "e.blk_status(0)", "e.blk_read(0, bytearray(65536))", "e.blk_write(0, bytes(65536))",
               "e.blk_trim(0)", "e.blk_cache(0)", "e.blk_set_size(100)"]


@pytest.mark.parametrize("call", AFTER_CLOSE)
def test_calls_after_close_raise(backing_factory, tmp_path, call):
    """In a child process, so that a crash fails this test only."""
    path = backing_factory(4 * 65536)
    script = (f"import cow.engine as E\ne = E.Engine({str(path)!r}, tmpdir={str(tmp_path)!r})\n"
              f"e.close()\ntry:\n    {call}\nexcept (ValueError, OSError) as x:\n    print('raised', x)\n"
              f"else:\n    print('accepted')\n")
    r = subprocess.run([PYTHON, "-P", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{call} after close(): exit status {r.returncode} {r.stderr[-500:]}"
    assert r.stdout.startswith("raised"), f"{call} after close(): {r.stdout}"


# ---------------------------------------------------------------- block state transitions


def test_fresh_engine_reads_the_backing(disk, bs):
    d = disk(3 * bs + 1000, block_size=bs)
    assert d.eng.nr_blocks == 4
    assert states(d.eng) == [NA] * 4
    d.check()


def test_write_allocates_and_copies_up_the_rest_of_the_block(disk, bs):
    d = disk(3 * bs + 1000, block_size=bs)
    d.pwrite(randbytes(1, bs), 0)                # whole block
    d.pwrite(randbytes(2, 512), bs + 100)        # piece of a block: rest comes from the backing
    d.pwrite(randbytes(3, 300), 3 * bs + 600)    # piece of the partial last block
    assert states(d.eng) == [AL, AL, NA, AL]
    d.check()
    d.pwrite(randbytes(4, 7), bs + 50)           # into an allocated block
    assert states(d.eng) == [AL, AL, NA, AL]
    d.check()


def test_trim_whole_blocks(disk, bs):
    d = disk(3 * bs + 1000, block_size=bs)
    d.pwrite(randbytes(1, bs), 0)
    d.trim(bs, 0)                                # allocated -> trimmed
    d.trim(bs, bs)                               # not allocated -> trimmed
    assert states(d.eng) == [TR, TR, NA, NA]
    d.check()
    d.trim(bs, 0)                                # trimmed -> trimmed
    assert states(d.eng)[0] == TR
    d.check()


def test_trim_unaligned_head_and_tail(disk, bs):
    d = disk(4 * bs + 1000, block_size=bs)
    d.trim(2 * bs, bs // 2)                      # half of 0, all of 1, half of 2
    assert states(d.eng) == [AL, TR, AL, NA, NA]
    d.trim(100, 3 * bs + 10)                     # a piece inside a block
    assert states(d.eng) == [AL, TR, AL, AL, NA]
    d.check()


@pytest.mark.parametrize("may_trim", [True, False])
def test_zero(disk, bs, may_trim):
    d = disk(4 * bs + 1000, block_size=bs)
    d.pwrite(randbytes(5, bs), 3 * bs)
    d.zero(2 * bs, bs // 2, may_trim=may_trim)
    whole = TR if may_trim else AL
    assert states(d.eng) == [AL, whole, AL, AL, NA]
    d.zero(bs, 3 * bs, may_trim=may_trim)        # allocated whole block
    assert states(d.eng)[3] == whole
    d.check()


def test_trimmed_block_takes_writes_and_stays_zero_around_them(disk, bs):
    d = disk(3 * bs + 1000, block_size=bs)
    d.trim(bs, bs)
    d.pwrite(randbytes(6, 512), bs + bs // 4)    # the rest must stay zero, not backing data
    assert states(d.eng)[1] == AL
    d.check()
    d.trim(bs, 0)
    d.pwrite(randbytes(7, bs), 0)                # whole block into a trimmed one
    assert states(d.eng)[0] == AL
    d.check()


def test_cow_on_read_copies_up(disk, bs):
    d = disk(3 * bs + 1000, block_size=bs, cow_on_read=True)
    d.trim(bs, 2 * bs)
    buf = bytearray(100)
    d.eng.pread(buf, bs + 5)
    assert buf == d.want[bs + 5:bs + 105]
    assert states(d.eng) == [NA, AL, TR, NA]     # copied up; trimmed stays trimmed
    d.check()                                    # reads everything: now every block is in the overlay
    assert states(d.eng) == [AL, AL, TR, AL]
    d.check()


def test_cow_on_read_of_a_backing_hole_becomes_data(disk):
    # With 4 KiB blocks the sample backing has a hole at 128 KiB..192 KiB.
    d = disk(256 * KiB, block_size=4096, cow_on_read=True)
    assert collect(d.eng.extents, 4096, 130 * KiB) == [(130 * KiB, 134 * KiB, HOLE_ZERO)]
    buf = bytearray(4096)
    d.eng.pread(buf, 130 * KiB)
    assert buf == bytes(4096)
    assert d.eng.blk_status(130 // 4) == AL
    assert collect(d.eng.extents, 4096, 130 * KiB) == [(130 * KiB, 134 * KiB, DATA)]


def test_cow_on_read_path_switch(disk, tmp_path):
    switch = tmp_path / "cow-on-read-switch"
    d = disk(4 * 65536, cow_on_read=str(switch))
    buf = bytearray(10)
    d.eng.pread(buf, 0)
    assert d.eng.blk_status(0) == NA
    switch.touch()
    d.eng.pread(buf, 65536)
    assert d.eng.blk_status(1) == AL
    switch.unlink()
    d.eng.pread(buf, 2 * 65536)
    assert d.eng.blk_status(2) == NA
    d.check()


@pytest.mark.parametrize("cow_on_cache", [False, True])
def test_cache(disk, bs, cow_on_cache):
    d = disk(3 * bs + 1000, block_size=bs, cow_on_cache=cow_on_cache)
    d.pwrite(randbytes(8, 100), 10)
    d.trim(bs, bs)
    d.eng.cache(d.eng.size, 0)
    want = [AL, TR, AL, AL] if cow_on_cache else [AL, TR, NA, NA]
    assert states(d.eng) == want
    d.check()
    d.eng.cache(0, 0)
    d.eng.cache(1, d.eng.size - 1)


def test_blk_api(engines, backing_factory, bs):
    size = 3 * bs + 1000
    path = backing_factory(size)
    data = read_file(path)
    eng = engines(path, block_size=bs)
    buf = bytearray(bs)

    eng.blk_read(1, buf)
    assert buf == data[bs:2 * bs]
    eng.blk_read(3, buf)                                   # partial last block: padded with zeroes
    assert buf == data[3 * bs:] + bytes(bs - 1000)
    assert eng.blk_status(1) == NA

    new = randbytes(9, bs)
    eng.blk_write(1, new)
    assert eng.blk_status(1) == AL
    eng.blk_read(1, buf)
    assert buf == new

    eng.blk_write(3, new)                                  # last block: only 1000 bytes are on the disk
    out = bytearray(1000)
    eng.pread(out, 3 * bs)
    assert out == new[:1000]

    eng.blk_trim(1)
    assert eng.blk_status(1) == TR
    eng.blk_read(1, buf)
    assert buf == bytes(bs)

    eng.blk_cache(0, E.CACHE_MODE_READ)
    assert eng.blk_status(0) == NA
    eng.blk_cache(0, E.CACHE_MODE_COW)
    assert eng.blk_status(0) == AL
    eng.blk_read(0, buf)
    assert buf == data[:bs]
    eng.blk_cache(1, E.CACHE_MODE_COW)                     # trimmed stays trimmed
    assert eng.blk_status(1) == TR
    eng.blk_cache(2)                                       # default mode works
    assert eng.blk_status(2) in (NA, AL)
    assert eng.stats()["allocated_blocks"] == states(eng).count(AL)
    assert eng.stats()["trimmed_blocks"] == 1


def test_blk_api_checks(engines, backing_factory):
    eng = engines(backing_factory(3 * 4096 + 10), block_size=4096)
    n = eng.nr_blocks
    assert n == 4
    for bad in (n, n + 1, -1, 1 << 62):
        with pytest.raises(ValueError):
            eng.blk_status(bad)
        with pytest.raises(ValueError):
            eng.blk_read(bad, bytearray(4096))
        with pytest.raises(ValueError):
            eng.blk_write(bad, bytes(4096))
        with pytest.raises(ValueError):
            eng.blk_trim(bad)
        with pytest.raises(ValueError):
            eng.blk_cache(bad, E.CACHE_MODE_COW)
    for size in (0, 1, 4095, 4097, 8192):
        with pytest.raises(ValueError):
            eng.blk_read(0, bytearray(size))
        with pytest.raises(ValueError):
            eng.blk_write(0, bytes(size))
    with pytest.raises((TypeError, ValueError, BufferError)):
        eng.blk_read(0, bytes(4096))                       # read-only buffer
    with pytest.raises(ValueError):
        eng.blk_cache(0, 12345)
    assert states(eng) == [NA] * 4
    assert eng.stats()["allocated_blocks"] == 0


def test_blk_set_size(engines, backing_factory):
    path = backing_factory(130000)
    data = read_file(path)
    eng = engines(path)
    eng.pwrite(b"w" * 10, 100)

    eng.blk_set_size(300000)                               # grow past the backing's end
    assert eng.size == 300000 and eng.nr_blocks == 5
    assert states(eng) == [AL, NA, NA, NA, NA]
    got = read_all(eng)
    assert got[:100] == data[:100] and got[100:110] == b"w" * 10
    assert got[110:130000] == data[110:]
    assert got[130000:] == bytes(170000), "past the end of the backing must read as zeroes"
    eng.pwrite(b"e" * 1000, 299000)
    out = bytearray(1000)
    eng.pread(out, 299000)
    assert out == b"e" * 1000

    eng.blk_set_size(70000)                                # shrink: the range checks follow
    assert eng.size == 70000 and eng.nr_blocks == 2
    with pytest.raises(ValueError):
        eng.pread(bytearray(1), 70000)
    out = bytearray(70000)
    eng.pread(out, 0)
    assert out[100:110] == b"w" * 10 and out[110:] == data[110:70000]
    with pytest.raises(ValueError):
        eng.blk_set_size(-1)


@pytest.mark.parametrize("size", [2**64 - 1, 2**63, 2**63 - 1])
def test_blk_set_size_too_large_is_refused(engines, backing_factory, size):
    """A size whose block count overflows (above INT64_MAX) is refused; INT64_MAX itself needs a
    bitmap of 2**49 bytes at 4K blocks: MemoryError.  Either way nothing changes, and a write far
    out is refused, not a crash."""
    eng = engines(backing_factory(130000), block_size="4K")
    with pytest.raises(ValueError if size > 2**63 - 1 else MemoryError):
        eng.blk_set_size(size)
    assert eng.size == 130000 and eng.nr_blocks == 32
    with pytest.raises(ValueError):
        eng.pwrite(b"x", 2**62)
    eng.pwrite(b"x" * 10, 100)
    assert states(eng)[0] == AL


def test_blk_set_size_refused_during_io(held, engines, tmp_path):
    """Resizing while another call is in flight (its backing read held at the backing) is
    refused with EBUSY (the bitmap would move under it); once idle, it works."""
    import threading

    back = held("memory", "1M")
    eng = engines(back.uri)
    reader = threading.Thread(target=eng.pread, args=(bytearray(4096), 0))
    back.hold()
    try:
        reader.start()
        back.wait_for(r" Read id=\d+ ")
        with pytest.raises(OSError) as ei:
            eng.blk_set_size(2 << 20)
        assert ei.value.errno == errno.EBUSY
    finally:
        back.release()
    reader.join(30)
    eng.blk_set_size(2 << 20)
    assert eng.size == 2 << 20


def test_flush_and_fua(disk):
    d = disk(130000)
    d.eng.flush()
    d.eng.pwrite(b"f" * 4096, 8192, fua=True)
    d.want[8192:12288] = b"f" * 4096
    d.eng.flush()
    d.check()


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 65537, 130000, 3 * 65536 + 1, 4 * MiB + 12345])
def test_sizes(disk, bs, size):
    d = disk(size, block_size=bs)
    assert d.eng.size == size
    assert d.eng.nr_blocks == -(-size // bs)
    d.check()
    with pytest.raises(ValueError):
        d.eng.pread(bytearray(1), size)
    d.eng.pread(bytearray(0), size)                        # empty request at the end is fine
    if size == 0:
        assert d.eng.extents(0, 0) == []
        assert d.eng.allocation_depth(0, 0) == []
        d.eng.zero(0, 0)
        d.eng.trim(0, 0)
        d.eng.pwrite(b"", 0)
        return
    d.pwrite(randbytes(size, min(size, 5000)), size - min(size, 5000))   # up to the last byte
    d.check()
    n = min(size, 3000)
    d.zero(n, size - n - min(size - n, 7), may_trim=False)
    d.trim(min(size, 1234), size - min(size, 1234))
    d.check()
    d.trim(size, 0)
    assert read_all(d.eng) == bytes(size)
    d.check()


@pytest.mark.parametrize("count, offset", [(100000, 0), (99999, 1), (50000, 50000), (1, 99999),
                                           (100000 - 4096, 4096)])
@pytest.mark.parametrize("op", ["trim", "zero-may-trim", "zero"])
def test_unaligned_tail_reads_zero(engines, backing_factory, bs, op, count, offset):
    """nbdkit once lost the unaligned tail of trim and zero: the whole range must read zero."""
    path = backing_factory(100000, pattern=0x21, holes=False)
    eng = engines(path, block_size=bs)
    if op == "trim":
        eng.trim(count, offset)
    else:
        eng.zero(count, offset, may_trim=(op == "zero-may-trim"))
    want = bytearray(b"\x21" * 100000)
    want[offset:offset + count] = bytes(count)
    assert_same(read_all(eng), want)


# ---------------------------------------------------------------- argument checks before any I/O


def test_range_checks(engines, backing_factory):
    path = backing_factory(130000)
    eng = engines(path, cow_on_read=True, cow_on_cache=True)
    size = eng.size
    # (count, offset) pairs that reach past the end, are negative, or wrap around 2**64
    bad = [(10, size - 5), (1, size), (0, size + 1), (-1, 0), (1, -1), (size + 1, 0),
           (20, (1 << 64) - 10), (1, 1 << 63), (1 << 64, 0), (1 << 64, 1)]
    for count, offset in bad:
        calls = {
            "zero": lambda: eng.zero(count, offset),
            "zero-fast": lambda: eng.zero(count, offset, fast=True),
            "zero-no-trim": lambda: eng.zero(count, offset, may_trim=False),
            "trim": lambda: eng.trim(count, offset),
            "cache": lambda: eng.cache(count, offset),
            "extents": lambda: eng.extents(count, offset),
            "extents-req-one": lambda: eng.extents(count, offset, True),
            "allocation_depth": lambda: eng.allocation_depth(count, offset),
        }
        if 0 <= count < 1 << 20:  # a buffer of that length exists
            calls["pread"] = lambda: eng.pread(bytearray(count), offset)
            calls["pwrite"] = lambda: eng.pwrite(b"x" * count, offset)
        for name, call in calls.items():
            with pytest.raises(ValueError, match=r".+"):
                call()
                pytest.fail(f"{name}(count={count}, offset={offset}) was accepted")
    # nothing happened: no copy-up, no write, no trim
    assert states(eng) == [NA, NA]
    assert read_all(eng) == read_file(path)
    assert states(eng) == [AL, AL]  # cow-on-read is on: the checks above really did no I/O


def test_pread_pwrite_buffer_types(engines, backing_factory):
    path = backing_factory(130000)
    data = read_file(path)
    eng = engines(path)
    big = bytearray(b"\xee" * 3000)
    eng.pread(memoryview(big)[1000:2000], 70000)           # a slice: only it is filled
    assert big[:1000] == b"\xee" * 1000 and big[2000:] == b"\xee" * 1000
    assert big[1000:2000] == data[70000:71000]
    arr = array.array("B", bytes(500))
    eng.pread(arr, 10)
    assert arr.tobytes() == data[10:510]
    m = mmap.mmap(-1, 8192)
    eng.pread(m, 4096)
    assert m[:] == data[4096:12288]

    eng.pwrite(memoryview(b"0123456789abcdef")[4:8], 100)  # a slice of a read-only buffer
    eng.pwrite(array.array("B", b"xyz"), 200)
    eng.pwrite(bytearray(b"BA"), 300)
    m[:4] = b"MMAP"
    eng.pwrite(memoryview(m)[:4], 400)
    out = bytearray(400)
    eng.pread(out, 100)
    assert out[:4] == b"4567" and out[100:103] == b"xyz" and out[200:202] == b"BA"
    assert out[300:304] == b"MMAP"
    m.close()

    with pytest.raises((TypeError, ValueError, BufferError)):
        eng.pread(b"\x00" * 10, 0)                         # read-only
    with pytest.raises((TypeError, ValueError, BufferError)):
        eng.pread(memoryview(bytearray(20))[::2], 0)       # not contiguous
    with pytest.raises((TypeError, ValueError, BufferError)):
        eng.pwrite(memoryview(bytearray(20))[::2], 0)
    with pytest.raises(TypeError):
        eng.pwrite("text", 0)


# ---------------------------------------------------------------- extents and allocation depth


def test_extents_pass_the_backing_holes_through(disk, bs):
    d = disk(max(2 * MiB, 3 * bs) + 5000, block_size=bs)
    assert any(t == HOLE_ZERO for _, _, t in d.backing_runs)
    d.check()  # fresh: extents equal the file's own map
    d.pwrite(randbytes(10, 100), 130 * KiB)  # into a hole of the backing: its block becomes data
    d.trim(bs, 0)
    d.zero(bs, 2 * bs, may_trim=False)
    d.check()
    for offset, count in [(1, 1), (4095, 2), (130 * KiB, 1), (d.eng.size - 1, 1), (bs - 1, bs + 2),
                          (12345, 1 * MiB)]:
        check_extents(d.eng, d.backing_runs, offset, count, content=d.want)


def test_extents_types_of_each_state(disk):
    bs = 65536
    d = disk(6 * bs)  # blocks 2 and 5 are holes in the sample backing
    assert d.backing_runs == [(0, 2 * bs, DATA), (2 * bs, 3 * bs, HOLE_ZERO), (3 * bs, 5 * bs, DATA),
                              (5 * bs, 6 * bs, HOLE_ZERO)]
    d.pwrite(b"\x00" * bs, 2 * bs)  # allocated, even with zeroes in it: data
    d.trim(bs, 3 * bs)
    assert collect(d.eng.extents, 6 * bs, 0) == [(0, 3 * bs, DATA), (3 * bs, 4 * bs, HOLE_ZERO),
                                                 (4 * bs, 5 * bs, DATA), (5 * bs, 6 * bs, HOLE_ZERO)]
    assert collect(d.eng.allocation_depth, 6 * bs, 0) == [
        (0, 2 * bs, E.DEPTH_BACKING), (2 * bs, 4 * bs, E.DEPTH_OVERLAY), (4 * bs, 6 * bs, E.DEPTH_BACKING)]
    [(length, t)] = d.eng.extents(6 * bs, 0, True)
    assert t == DATA and 0 < length <= 3 * bs
    assert d.eng.allocation_depth(3 * bs, 3 * bs, True) == [(bs, E.DEPTH_OVERLAY)]
    d.check()


# ---------------------------------------------------------------- fast zero


def test_fast_zero(disk, bs):
    d = disk(4 * bs + 1000, block_size=bs)
    before = read_all(d.eng)
    for count, offset in [(512, bs + 512), (bs, bs // 2), (2 * bs + 512, bs), (1, 4 * bs + 10)]:
        with pytest.raises(OSError) as ei:
            d.eng.zero(count, offset, fast=True)
        assert ei.value.errno == errno.ENOTSUP
        assert states(d.eng) == [NA] * 5, "a refused fast zero changed the disk"
        assert read_all(d.eng) == before
    # whole blocks never need the backing
    d.eng.zero(2 * bs, bs, fast=True)
    d.want[bs:3 * bs] = bytes(2 * bs)
    d.eng.zero(bs, 3 * bs, fast=True, may_trim=False)
    d.want[3 * bs:4 * bs] = bytes(bs)
    assert states(d.eng)[1:4] == [TR, TR, AL]
    d.check()
    # pieces of blocks that are allocated or trimmed do not either
    d.pwrite(randbytes(11, 10), 0)
    d.eng.zero(512, 1024, fast=True)
    d.want[1024:1536] = bytes(512)
    d.eng.zero(512, bs + 1024, fast=True)
    d.eng.zero(bs - 100, 3 * bs + 50, fast=True, may_trim=False)
    d.want[3 * bs + 50:4 * bs - 50] = bytes(bs - 100)
    d.check()


# ---------------------------------------------------------------- overlay cap and space


def test_overlay_max_size(disk):
    bs = 65536
    d = disk(8 * bs, overlay_max_size=4 * bs)
    for blk in range(4):
        d.pwrite(randbytes(blk, bs), blk * bs)
    for count, offset in [(bs, 4 * bs), (512, 4 * bs + 512), (1, 8 * bs - 1)]:
        with pytest.raises(OSError) as ei:
            d.eng.pwrite(b"\xab" * count, offset)
        assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as ei:
        d.eng.zero(512, 5 * bs, may_trim=False)
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as ei:
        d.eng.zero(bs, 5 * bs, may_trim=False)  # whole block kept allocated: needs room too
    assert ei.value.errno == errno.ENOSPC
    assert states(d.eng) == [AL] * 4 + [NA] * 4
    d.check()                                   # earlier data still reads back, the rest is the backing
    d.pwrite(randbytes(99, 1000), 2 * bs + 7)   # rewriting an allocated block needs no more space
    d.zero(bs, 6 * bs)                          # trimming needs none
    assert states(d.eng) == [AL] * 4 + [NA, NA, TR, NA]
    d.check()
    d.trim(bs, 0)                               # a trimmed block gives its room back
    d.pwrite(randbytes(98, 700), 5 * bs + 3)
    assert states(d.eng) == [TR, AL, AL, AL, NA, AL, TR, NA]
    d.check()


def test_overlay_max_size_with_cow_on_read_and_cache(disk):
    """A full overlay does not make reads or cache requests fail: they just do not copy up."""
    bs = 65536
    d = disk(6 * bs, overlay_max_size=2 * bs, cow_on_read=True, cow_on_cache=True)
    d.check()                                   # reads everything: only two blocks fit
    assert states(d.eng).count(AL) == 2
    d.eng.cache(6 * bs, 0)
    assert states(d.eng).count(AL) == 2
    with pytest.raises(OSError) as ei:
        d.eng.pwrite(b"n" * 10, [b for b, s in enumerate(states(d.eng)) if s == NA][0] * bs)
    assert ei.value.errno == errno.ENOSPC
    d.check()


def test_trimmed_blocks_give_space_back(disk):
    bs = 65536
    d = disk(80 * bs)
    d.pwrite(randbytes(12, 64 * bs), 0)
    d.eng.flush()
    full = d.eng.stats()["overlay_bytes"]
    assert full >= 64 * bs
    d.trim(64 * bs, 0)
    d.eng.flush()
    st = d.eng.stats()
    assert st["trimmed_blocks"] == 64 and st["allocated_blocks"] == 0
    assert st["overlay_bytes"] <= full - 60 * bs, (full, st)
    d.check()


# ---------------------------------------------------------------- a 16 TiB sparse backing


def _big_sparse(path):
    """A sparse file of 16 TiB, or of the largest size the file system allows below that."""
    for size in (16 * TiB, 16 * TiB - 4096):
        try:
            with open(path, "wb") as f:
                f.truncate(size)
            return size
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise
    raise AssertionError("cannot make a large sparse file")


def test_16_TiB_sparse_file(engines, tmp_path):
    path = tmp_path / "huge.img"
    size = _big_sparse(path)
    eng = engines(path, block_size="64K")
    assert eng.size == size and eng.nr_blocks == -(-size // 65536)
    buf = bytearray(65536)
    eng.pread(buf, size - 65536)
    assert buf == bytes(65536)
    ext = eng.extents(size, 0)
    assert ext and all(t == HOLE_ZERO for _, t in ext) and sum(n for n, _ in ext) <= size
    assert collect(eng.extents, 1 * MiB, size - MiB) == [(size - MiB, size, HOLE_ZERO)]
    assert collect(eng.allocation_depth, 1 * MiB, size - MiB) == [(size - MiB, size, E.DEPTH_BACKING)]
    eng.pwrite(b"head", 0)
    eng.trim(65536, 8 * TiB)
    assert eng.blk_status(8 * TiB // 65536) == TR
    assert eng.stats()["allocated_blocks"] == 1


def test_16_TiB_sparse_file_last_block_is_writable(engines, tmp_path):
    path = tmp_path / "huge.img"
    size = _big_sparse(path)
    eng = engines(path, block_size="64K")
    eng.pwrite(b"tail" * 1024, size - 4096)
    buf = bytearray(8192)
    eng.pread(buf, size - 8192)
    assert buf == bytes(4096) + b"tail" * 1024
    assert os.path.getsize(path) == size


# ---------------------------------------------------------------- a backing that misbehaves


def test_backing_shrunk_under_the_engine_gives_eio(engines, tmp_path):
    """Short reads loop; an unexpected end of file is EIO, and nothing is copied up."""
    path = tmp_path / "shrinking.img"
    path.write_bytes(b"a" * MiB)
    eng = engines(path, cow_on_read=True)
    os.truncate(path, 65536 + 100)
    for call in (lambda: eng.pread(bytearray(1000), 512 * KiB),
                 lambda: eng.pread(bytearray(1000), 65536 + 50),  # straddles the new end
                 lambda: eng.pwrite(b"x" * 10, 300000),             # needs a copy-up
                 lambda: eng.zero(10, 300000, may_trim=False)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EIO
    assert states(eng) == [NA] * eng.nr_blocks
    buf = bytearray(100)
    eng.pread(buf, 0)                                               # still inside the file
    assert buf == b"a" * 100
    eng.pwrite(b"w" * 65536, 3 * 65536)                             # whole blocks need no backing
    eng.pread(buf, 3 * 65536)
    assert buf == b"w" * 100


def test_grown_disk_extents_past_the_backing(engines, backing_factory):
    path = backing_factory(130000)
    eng = engines(path, block_size=4096)
    eng.blk_set_size(300000)
    runs = collect(eng.extents, 300000 - 100000, 100000)
    assert runs[-1] == (130000, 300000, HOLE_ZERO), runs
    assert read_all(eng)[130000:] == bytes(170000)


def test_more_runs_than_one_reply_holds(engines, tmp_path):
    """140000 alternating runs: each reply may stop early, but asking again from where it stopped
    must describe everything, and the runs must alternate exactly."""
    nblocks = 140000
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(nblocks * 4096)
    eng = engines(path, block_size=4096)
    for blk in range(0, nblocks, 2):
        eng.blk_trim(blk)
    first = eng.allocation_depth(nblocks * 4096, 0)
    assert 0 < sum(n for n, _ in first) <= nblocks * 4096
    runs = collect(eng.allocation_depth, nblocks * 4096, 0)
    assert len(runs) == nblocks
    assert all(e - s == 4096 and d == (E.DEPTH_OVERLAY if i % 2 == 0 else E.DEPTH_BACKING)
               for i, (s, e, d) in enumerate(runs))
    assert collect(eng.extents, nblocks * 4096, 0) == [(0, nblocks * 4096, HOLE_ZERO)]
    assert eng.stats()["trimmed_blocks"] == nblocks // 2
    assert os.stat(path).st_blocks == 0


def test_overlay_is_sparse(engines, tmp_path):
    path = tmp_path / "big-sparse.img"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    eng = engines(path)
    assert eng.stats()["overlay_bytes"] < 65536
    eng.pwrite(randbytes(13, 65536), 900 * MiB)
    eng.pwrite(b"tail", (1 << 30) - 4)
    eng.flush()
    assert 65536 <= eng.stats()["overlay_bytes"] < 1 * MiB
    assert eng.stats()["allocated_blocks"] == 2


# ---------------------------------------------------------------- read plans (sendfile)


def assemble(pieces):
    """What a front end sends for a plan's pieces: each file piece read from its fd (zeroes
    past the end of the file), zeroes for fd -1."""
    out = bytearray()
    for fd, pos, n in pieces:
        assert n > 0
        data = os.pread(fd, n, pos) if fd >= 0 else b""
        out += data + bytes(n - len(data))
    return out


@pytest.mark.parametrize("overlay", [False, True], ids=["temporary", "persistent"])
@pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB, MiB], ids=["4K", "64K", "1M"])
def test_read_plan_pieces_hold_what_pread_reads(disk, bs, overlay, tmp_path):
    kw = {"overlay": tmp_path / "vm.cow"} if overlay else {}
    size = max(24 * bs, 2 * MiB) + 12345        # a last block cut short
    d = disk(size, block_size=bs, **kw)
    e = d.eng
    d.pwrite(randbytes(1, 3 * bs), bs)
    d.pwrite(randbytes(2, 5000), 7 * bs - 1000)
    d.trim(2 * bs, 12 * bs)
    d.zero(2 * bs, 20 * bs, may_trim=False)     # allocated, punched
    d.pwrite(b"x" * 10, size - 10)
    cuts = [0, bs - 1, bs, 3 * bs + 17, 7 * bs - 1000, 12 * bs, 20 * bs + 5, size - bs - 3,
            size - 10, size]
    for holes in (False, True):
        for a in cuts:
            for b in cuts:
                if b <= a:
                    continue
                plan = e.read_plan(b - a, a, holes)
                assert assemble(plan.pieces) == d.want[a:b], (holes, a, b)
                assert sum(n for _, _, n in plan.pieces) == b - a
                assert plan.sparse == any(fd < 0 for fd, _, _ in plan.pieces)
                plan.release()
                plan.release()                  # twice: nothing more
    # Trimmed blocks are zero pieces; with holes, so are the backing's holes (every third
    # 64 KiB piece of the sample), and without, those come from the backing's file.
    with e.read_plan(2 * bs, 12 * bs) as plan:
        assert plan.pieces == [(-1, 0, 2 * bs)]
    piece = -(-22 * bs // (64 * KiB))           # untouched: data, then a hole
    while piece % 3 != 1:
        piece += 1
    with e.read_plan(128 * KiB, piece * 64 * KiB, True) as plan:
        assert [fd < 0 for fd, _, _ in plan.pieces] == [False, True]
    with e.read_plan(128 * KiB, piece * 64 * KiB) as plan:
        assert len(plan.pieces) == 1 and plan.pieces[0][0] >= 0
    # A persistent overlay's block data starts at its data offset.
    with e.read_plan(bs, bs) as plan:
        [(fd, pos, n)] = plan.pieces
        assert pos == e.stats()["data_offset"] + bs and n == bs
    assert e.read_plan(0, 0).pieces == []
    with pytest.raises(ValueError):
        e.read_plan(2, size - 1)


def test_read_plan_where_the_engine_must_read_itself(engines, backing_factory, nbdkit):
    path = backing_factory(MiB)
    e = engines(path, lock_mode="global")
    assert e.read_plan(65536, 0) is None
    e = engines(path, cow_on_read=True)
    assert e.read_plan(65536, 0) is None        # it would copy up
    e.pread(bytearray(65536), 0)                # ... now it is in the overlay
    with e.read_plan(65536, 0) as plan:
        assert assemble(plan.pieces) == read_file(path)[:65536]
    e = engines(nbdkit("file", path, "--filter=nozero"))
    assert e.read_plan(65536, 0) is None        # the backing is an NBD export
    e.pwrite(b"y" * 65536, 65536)
    e.trim(65536, 0)
    with e.read_plan(131072, 0) as plan:        # all in the overlay: no backing read
        assert assemble(plan.pieces) == bytes(65536) + b"y" * 65536


def test_a_held_read_plan_keeps_its_files_open(engines, backing_factory):
    path = backing_factory(MiB)
    e = engines(path)
    e.pwrite(b"z" * 65536, 0)
    plan = e.read_plan(MiB, 0)
    closer = threading.Thread(target=e.close)
    closer.start()
    while not e.closed:                         # close() has begun ...
        time.sleep(0.001)
    # ... and waits for the plan: its files are still open and read what they held.
    assert assemble(plan.pieces) == b"z" * 65536 + read_file(path)[65536:]
    assert closer.is_alive()
    plan.release()
    closer.join()
    assert e.closed
    with pytest.raises(ValueError):
        plan.send(0, [])
