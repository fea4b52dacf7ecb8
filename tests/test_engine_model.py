"""The engine against a pure-Python reference model.

The model is a bytearray (what the disk must read as) plus the state of every block.  Random
operations (aligned, unaligned, empty, at the end of the disk) go to both; after every step the
whole disk is compared byte for byte, every block's state must be one the model allows (most
steps allow exactly one), and extents / allocation depth must match the block states and the
backing's own map, with every byte reported as zero really zero."""

import errno
import random

import pytest

from cow import engine as E
from support_engine import (
    KiB,
    MiB,
    engines,  # noqa: F401 - a fixture
    assert_same,
    check_extents,
    file_map,
    nbd_map,
    read_file,
)

NA, AL, TR = 0, 1, 3
SEEDS = [11, 22, 33]


class Model:
    def __init__(self, backing, block_size, cow_on_read=False, cow_on_cache=False):
        self.data = bytearray(backing)
        self.size = len(backing)
        self.bs = block_size
        self.state = [NA] * (-(-self.size // block_size))
        self.cow_on_read = cow_on_read
        self.cow_on_cache = cow_on_cache

    def pieces(self, count, offset):
        """(blknum, kind) for each block the range touches: kind is 'whole', 'part', or 'end'
        (from the start of the partial last block to the end of the disk: whole or part)."""
        if count == 0:
            return []
        out = []
        end = offset + count
        for blk in range(offset // self.bs, (end - 1) // self.bs + 1):
            start, stop = blk * self.bs, (blk + 1) * self.bs
            covers_start = offset <= start
            if stop <= self.size:
                kind = "whole" if covers_start and end >= stop else "part"
            else:
                kind = "end" if covers_start and end == self.size else "part"
            out.append((blk, kind))
        return out

    def allowed_after_zero(self, count, offset, may_trim):
        allowed = {}
        for blk, kind in self.pieces(count, offset):
            s = self.state[blk]
            part = {AL} | ({TR} if s == TR else set())
            whole = {TR} if may_trim else {AL} | ({TR} if s == TR else set())
            allowed[blk] = {"whole": whole, "part": part, "end": whole | part}[kind]
        return allowed

    def fast_zero_outcome(self, count, offset):
        """'ok', 'enotsup', or 'either' (only for the partial last block)."""
        outcome = "ok"
        for blk, kind in self.pieces(count, offset):
            if self.state[blk] != NA:
                continue
            if kind == "part":
                return "enotsup"
            if kind == "end":
                outcome = "either"
        return outcome


def random_range(rng, size, bs):
    if size == 0:
        return 0, 0
    r = rng.random()
    nblocks = -(-size // bs)
    if r < 0.25:                                            # aligned, whole blocks
        off = rng.randrange(nblocks) * bs
        count = min(rng.randint(1, 3) * bs, size - off)
    elif r < 0.45:                                          # sector aligned, small
        off = rng.randrange(0, size, 512)
        count = min(rng.choice([512, 1024, 4096, 8192, 3 * 512]), size - off)
    elif r < 0.62:                                          # up to the end of the disk
        count = rng.randint(1, min(size, 2 * bs + 1000))
        off = size - count
    elif r < 0.67:                                          # empty
        off, count = rng.randint(0, size), 0
    elif r < 0.75:                                          # straddling a block boundary
        b = rng.randrange(1, nblocks) if nblocks > 1 else 0
        off = max(0, b * bs - rng.randint(1, 700))
        count = min(rng.randint(1, 1400), size - off)
    else:                                                   # anything
        off = rng.randrange(size)
        count = rng.randint(1, min(size - off, 2 * bs + 1000))
    return count, off


def run_model(eng, backing, backing_runs, seed, nops, cow_on_read=False, cow_on_cache=False,
              switch=None):
    """Drive eng and the model with nops random operations.

    cow_on_read=True: always on, so a check read would copy up every block; the whole disk is then
    compared every 20 steps and the blocks an operation touched after each step.  With `switch` (a
    pathlib.Path given to the engine as its cow-on-read path) cow-on-read is on during each
    operation and off while the whole disk is compared after it."""
    rng = random.Random(seed)
    cor = cow_on_read or switch is not None
    m = Model(backing, eng.block_size, cor, cow_on_cache)
    size, bs = m.size, m.bs
    history = []
    readbuf = bytearray(size)

    def fail(msg):
        pytest.fail(f"seed {seed}, step {len(history)}: {msg}\nlast operations:\n  "
                    + "\n  ".join(history[-15:]))

    def compare(offset, count):
        if count == size:
            got, want = readbuf, m.data   # bytearray == bytearray is a memcmp, no copies
        else:
            got, want = bytearray(count), m.data[offset:offset + count]
        eng.pread(got, offset)
        if got != want:
            try:
                assert_same(got, want, f"disk at {offset}")
            except BaseException as e:  # pytest's Failed: add the history
                fail(str(e))

    for step in range(nops):
        count, off = random_range(rng, size, bs)
        op = rng.choices(["pread", "pwrite", "zero", "trim", "cache", "flush", "blk"],
                         weights=[20, 32, 22, 14, 9, 1, 6])[0]
        if op == "blk" and not m.state:
            op = "flush"
        allowed = {}
        if switch is not None:
            switch.touch()
        if op == "pread":
            history.append(f"pread(count={count}, offset={off})")
            buf = bytearray(count)
            eng.pread(buf, off)
            if buf != m.data[off:off + count]:
                fail("pread returned wrong data")
            if cor:
                for blk, _ in m.pieces(count, off):
                    allowed[blk] = {AL} if m.state[blk] == NA else {m.state[blk]}
        elif op == "pwrite":
            data = bytes(count) if rng.random() < 0.1 else rng.randbytes(count)
            fua = rng.random() < 0.03
            history.append(f"pwrite(<{count} bytes>, offset={off}, fua={fua})")
            eng.pwrite(data, off, fua=fua)
            m.data[off:off + count] = data
            for blk, _ in m.pieces(count, off):
                allowed[blk] = {AL}
        elif op == "zero":
            may_trim = rng.random() < 0.5
            fast = rng.random() < 0.3
            history.append(f"zero(count={count}, offset={off}, may_trim={may_trim}, fast={fast})")
            expect = m.fast_zero_outcome(count, off) if fast else "ok"
            try:
                eng.zero(count, off, may_trim=may_trim, fast=fast)
            except OSError as e:
                if e.errno != errno.ENOTSUP or expect == "ok":
                    fail(f"zero raised {e!r}, expected {expect}")
            else:
                if expect == "enotsup":
                    fail("fast zero that needs a backing read did not fail with ENOTSUP")
                m.data[off:off + count] = bytes(count)
                allowed = m.allowed_after_zero(count, off, may_trim)
        elif op == "trim":
            history.append(f"trim(count={count}, offset={off})")
            eng.trim(count, off)
            m.data[off:off + count] = bytes(count)
            allowed = m.allowed_after_zero(count, off, True)
        elif op == "cache":
            history.append(f"cache(count={count}, offset={off})")
            eng.cache(count, off)
            for blk, _ in m.pieces(count, off):
                s = m.state[blk]
                if s != NA:
                    allowed[blk] = {s}
                elif cow_on_cache:
                    allowed[blk] = {AL}
                elif cor:
                    allowed[blk] = {NA, AL}
                else:
                    allowed[blk] = {NA}
        elif op == "blk":
            blk = rng.randrange(len(m.state))
            start = blk * bs
            n = min(bs, size - start)                   # bytes of the block inside the disk
            call = rng.choice(["blk_read", "blk_write", "blk_trim", "blk_cache_read", "blk_cache_cow"])
            history.append(f"{call}({blk})")
            if call == "blk_read":
                buf = bytearray(bs)
                eng.blk_read(blk, buf)
                if buf != m.data[start:start + n] + bytes(bs - n):
                    fail("blk_read returned wrong data")
                if cor and m.state[blk] == NA:
                    allowed[blk] = {AL}
            elif call == "blk_write":
                data = rng.randbytes(bs)
                eng.blk_write(blk, data)
                m.data[start:start + n] = data[:n]
                allowed[blk] = {AL}
            elif call == "blk_trim":
                eng.blk_trim(blk)
                m.data[start:start + n] = bytes(n)
                allowed[blk] = {TR}
            elif call == "blk_cache_read":
                eng.blk_cache(blk, E.CACHE_MODE_READ)
            else:
                eng.blk_cache(blk, E.CACHE_MODE_COW)
                allowed[blk] = {AL} if m.state[blk] == NA else {m.state[blk]}
        else:
            history.append("flush()")
            eng.flush()
        if switch is not None:
            switch.unlink()

        # Compare the disk byte for byte.
        if cow_on_read and step % 20 and count:
            first, last = off // bs * bs, min(size, ((off + count - 1) // bs + 1) * bs)
            compare(first, last - first)
            checked = range(first // bs, -(-last // bs))
        else:
            compare(0, size)
            checked = range(len(m.state))
        if cow_on_read:  # the check read itself copied up what it read
            for blk in checked:
                allowed[blk] = {AL if s == NA else s for s in allowed.get(blk, {m.state[blk]})}
        # Block states: each must be one the model allows; then the model learns which.
        for blk in range(len(m.state)):
            got = eng.blk_status(blk)
            want = allowed.get(blk, {m.state[blk]})
            if got not in want:
                fail(f"block {blk} is in state {got}, allowed {sorted(want)}")
            m.state[blk] = got
        stats = eng.stats()
        if (stats["allocated_blocks"], stats["trimmed_blocks"]) != (m.state.count(AL), m.state.count(TR)):
            fail(f"stats {stats} disagree with block states")
        try:
            check_extents(eng, backing_runs, content=m.data)
            if size and rng.random() < 0.2:
                c, o = random_range(rng, size, bs)
                check_extents(eng, backing_runs, o, c, content=m.data)
        except AssertionError as e:
            fail(f"extents: {e}")
    return m


# (id, block size, disk size, engine options, operations per seed).  cow_on_read="switch": an
# absolute path that exists only while each operation runs.
CONFIGS = [
    ("4K-fine", 4 * KiB, 200_003, {}, 1500),
    ("4K-global", 4 * KiB, 200_003, {"lock_mode": "global"}, 1500),
    ("4K-cow-on-read", 4 * KiB, 200_003, {"cow_on_read": True}, 1000),
    ("4K-cow-on-read-switch", 4 * KiB, 200_003, {"cow_on_read": "switch"}, 1000),
    ("4K-global-cow-on-read-switch", 4 * KiB, 130_000, {"lock_mode": "global", "cow_on_read": "switch"}, 1000),
    ("4K-cow-on-cache", 4 * KiB, 130_000, {"cow_on_cache": True}, 1000),
    ("64K-fine", 64 * KiB, 1_000_001, {}, 1000),
    ("64K-global-cow-on-read", 64 * KiB, 1_000_001, {"lock_mode": "global", "cow_on_read": True}, 800),
    ("64K-130000", 64 * KiB, 130_000, {}, 1500),
    ("4M", 4 * MiB, 9 * MiB + 123, {}, 150),
    ("4M-global-cow-on-read-switch", 4 * MiB, 5 * MiB + 7, {"lock_mode": "global", "cow_on_read": "switch"}, 100),
]




def start(engines, backing, tmp_path, options):
    options = dict(options)
    switch = None
    if options.get("cow_on_read") == "switch":
        switch = tmp_path / "cow-on-read-switch"
        options["cow_on_read"] = str(switch)
    eng = engines(backing, **options)
    return eng, dict(cow_on_read=options.get("cow_on_read") is True,
                     cow_on_cache=options.get("cow_on_cache", False), switch=switch)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, bs, size, options, nops", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_model_file_backing(engines, backing_factory, tmp_path, name, bs, size, options, nops, seed):
    path = backing_factory(size)
    eng, kw = start(engines, path, tmp_path, dict(options, block_size=bs))
    run_model(eng, read_file(path), file_map(path), seed, nops, **kw)


NBD_CONFIGS = [
    ("4K", 4 * KiB, 200_003, {}, 800),
    ("64K-global-cow-on-read-switch", 64 * KiB, 330_000, {"lock_mode": "global", "cow_on_read": "switch"}, 600),
]


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("name, bs, size, options, nops", NBD_CONFIGS, ids=[c[0] for c in NBD_CONFIGS])
def test_model_nbd_backing(engines, backing_factory, nbdkit, tmp_path, name, bs, size, options, nops, seed):
    path = backing_factory(size)
    uri = nbdkit("-r", "file", path)
    eng, kw = start(engines, uri, tmp_path, dict(options, block_size=bs))
    assert eng.backing_is_nbd
    backing_runs = nbd_map(uri)
    assert backing_runs == file_map(path)  # nbdkit passes the file's holes through
    run_model(eng, read_file(path), backing_runs, seed, nops, **kw)


def test_model_allows_only_what_the_contract_allows():
    """The model itself: the cases where it accepts more than one state are only the documented
    ambiguities (partial last block, zeroing what is already trimmed)."""
    m = Model(bytes(10000), 4096)
    assert m.pieces(4096, 0) == [(0, "whole")]
    assert m.pieces(1, 4095) == [(0, "part")]
    assert m.pieces(10000 - 8192, 8192) == [(2, "end")]
    assert m.pieces(100, 9900) == [(2, "part")]
    assert m.pieces(0, 5) == []
    assert m.allowed_after_zero(8192, 0, True) == {0: {TR}, 1: {TR}}
    assert m.allowed_after_zero(8192, 0, False) == {0: {AL}, 1: {AL}}
    assert m.allowed_after_zero(100, 5, True) == {0: {AL}}
    assert m.fast_zero_outcome(100, 5) == "enotsup"
    assert m.fast_zero_outcome(8192, 0) == "ok"
    assert m.fast_zero_outcome(1808, 8192) == "either"
    m.state[0] = AL
    assert m.fast_zero_outcome(100, 5) == "ok"
