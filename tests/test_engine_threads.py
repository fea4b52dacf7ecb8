"""The engine under threads: concurrent sub-block writes lose nothing, neighbouring blocks that share
a bitmap byte keep their states, cow-on-read / cow-on-cache racing writes never bring back old
data, and the GIL is released while a backing read is held (real nbdkit with its pause filter)."""

import random
import threading
import time

import pytest

from support_engine import (
    KiB,
    engines,  # noqa: F401 - a fixture
    assert_same,
    randbytes,
    read_all,
    read_file,
    states,
)
from support_hold import held  # noqa: F401 - a fixture

NA, AL, TR = 0, 1, 3
LOCK_MODES = ["fine", "global"]




def run_threads(targets):
    """Start one thread per callable at once (a barrier), join them, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- sub-block writes


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
@pytest.mark.parametrize("bs, nblocks, rounds", [(4 * KiB, 32, 4), (64 * KiB, 8, 1)], ids=["4K", "64K"])
def test_concurrent_sector_writes_into_the_same_blocks(engines, backing_factory, lock_mode, bs,
                                                       nblocks, rounds):
    """Eight threads write interleaved 512-byte sectors of the same not-yet-allocated blocks (the
    first write of each block copies it up from the backing).  Nothing may be lost."""
    nthreads = 8
    sectors = nblocks * bs // 512
    for r in range(rounds):
        path = backing_factory(nblocks * bs + 1000, name=f"b{r}.img")
        eng = engines(path, block_size=bs, lock_mode=lock_mode)
        want = bytearray(read_file(path))
        plans = []
        for t in range(nthreads):
            mine = [s for s in range(sectors) if s % nthreads == t]
            random.Random(r * 100 + t).shuffle(mine)
            data = randbytes(f"{r}-{t}", len(mine) * 512)
            plan = [(s, data[i * 512:(i + 1) * 512]) for i, s in enumerate(mine)]
            for s, chunk in plan:
                want[s * 512:(s + 1) * 512] = chunk
            plans.append(plan)

        def writer(plan):
            def run():
                for s, chunk in plan:
                    eng.pwrite(chunk, s * 512)
            return run

        run_threads([writer(p) for p in plans])
        assert_same(read_all(eng), want, f"round {r}")
        assert states(eng) == [AL] * nblocks + [NA]


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
def test_neighbouring_blocks_sharing_a_bitmap_byte(engines, backing_factory, lock_mode):
    """Four blocks share a bitmap byte.  Thread t owns block t of every group of four and keeps
    writing, trimming and zeroing whole blocks: every block ends in the state of its last
    operation, with its data."""
    bs, nblocks, nthreads, nops = 4096, 64, 4, 400
    path = backing_factory(nblocks * bs)
    eng = engines(path, block_size=bs, lock_mode=lock_mode)
    want = bytearray(read_file(path))
    final = {}
    plans = []
    for t in range(nthreads):
        rng = random.Random(t)
        plan = []
        for i in range(nops):
            blk = rng.randrange(t, nblocks, nthreads)
            kind = rng.choice(["write", "write", "trim", "zero", "zero-keep"])
            data = rng.randbytes(bs) if kind == "write" else None
            plan.append((blk, kind, data))
        for blk, kind, data in plan:
            final[blk] = (kind, data)
        plans.append(plan)

    def worker(plan):
        def run():
            for blk, kind, data in plan:
                if kind == "write":
                    eng.pwrite(data, blk * bs)
                elif kind == "trim":
                    eng.trim(bs, blk * bs)
                elif kind == "zero":
                    eng.zero(bs, blk * bs, may_trim=True)
                else:
                    eng.zero(bs, blk * bs, may_trim=False)
        return run

    run_threads([worker(p) for p in plans])
    want_states = []
    for blk in range(nblocks):
        if blk not in final:
            want_states.append(NA)
            continue
        kind, data = final[blk]
        want[blk * bs:(blk + 1) * bs] = data if kind == "write" else bytes(bs)
        want_states.append(AL if kind in ("write", "zero-keep") else TR)
    assert states(eng) == want_states
    assert_same(read_all(eng), want)


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
def test_threads_with_own_sectors_random_ops(engines, backing_factory, lock_mode):
    """Threads own interleaved sectors and do random writes, zeroes, trims and reads of them (all
    sub-block, so every one is a read-modify-write or a write into an allocated block); each
    keeps a model of its own sectors, checked at the end and by its own reads."""
    bs, nblocks, nthreads, nops = 4096, 16, 4, 600
    size = nblocks * bs
    path = backing_factory(size)
    backing = read_file(path)
    eng = engines(path, block_size=bs, lock_mode=lock_mode, cow_on_read=True)
    sectors = size // 512
    models = [{} for _ in range(nthreads)]

    def worker(t):
        def run():
            rng = random.Random(1000 + t)
            mine = [s for s in range(sectors) if s % nthreads == t]
            model = models[t]
            for _ in range(nops):
                s = rng.choice(mine)
                op = rng.choice(["write", "write", "zero", "trim", "read"])
                if op == "write":
                    data = rng.randbytes(512)
                    eng.pwrite(data, s * 512)
                    model[s] = data
                elif op == "zero":
                    eng.zero(512, s * 512, may_trim=rng.random() < 0.5)
                    model[s] = bytes(512)
                elif op == "trim":
                    eng.trim(512, s * 512)
                    model[s] = bytes(512)
                else:
                    buf = bytearray(512)
                    eng.pread(buf, s * 512)
                    assert buf == model.get(s, backing[s * 512:(s + 1) * 512]), f"sector {s}"
        return run

    run_threads([worker(t) for t in range(nthreads)])
    want = bytearray(backing)
    for model in models:
        for s, data in model.items():
            want[s * 512:(s + 1) * 512] = data
    assert_same(read_all(eng), want)


# ---------------------------------------------------------------- cow-on-read / cow-on-cache races


def _race_copy_up_against_writes(eng, size, bs, backing, copy_up, nwriters=2, nreaders=2, rounds=3):
    """Writers write fresh patterns (whole blocks and sectors) into disjoint blocks while readers
    keep copying the same blocks up; afterwards every byte reads back as last written."""
    nblocks = size // bs
    want = bytearray(backing)
    plans = []
    for w in range(nwriters):
        rng = random.Random(w)
        plan = []
        for r in range(rounds):
            for blk in range(w, nblocks, nwriters):
                if rng.random() < 0.5:
                    plan.append((blk * bs, rng.randbytes(bs)))
                else:
                    s = rng.randrange(bs // 512)
                    plan.append((blk * bs + s * 512, rng.randbytes(512)))
        for off, data in plan:
            want[off:off + len(data)] = data
        plans.append(plan)
    done = threading.Event()

    def writer(plan):
        def run():
            for off, data in plan:
                eng.pwrite(data, off)
        return run

    def reader(k):
        def run():
            while not done.is_set():
                for blk in range(k, nblocks, nreaders):
                    copy_up(blk)
        return run

    def writers():
        try:
            run_threads([writer(p) for p in plans])
        finally:
            done.set()

    run_threads([writers] + [reader(k) for k in range(nreaders)])
    assert_same(read_all(eng), want, "after racing copy-ups against writes")


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
@pytest.mark.parametrize("how", ["cow-on-read", "cow-on-cache"])
def test_copy_up_racing_writes_file_backing(engines, backing_factory, lock_mode, how):
    bs, nblocks = 4096, 64
    size = nblocks * bs
    for r in range(3):  # fresh engines: every block starts not allocated
        path = backing_factory(size, name=f"r{r}.img", pattern=0x21 + r, holes=False)
        eng = engines(path, block_size=bs, lock_mode=lock_mode,
                      cow_on_read=(how == "cow-on-read"), cow_on_cache=(how == "cow-on-cache"))
        if how == "cow-on-read":
            def copy_up(blk, eng=eng):
                eng.pread(bytearray(bs), blk * bs)
        else:
            def copy_up(blk, eng=eng):
                eng.cache(bs, blk * bs)
        _race_copy_up_against_writes(eng, size, bs, read_file(path), copy_up)


@pytest.mark.parametrize("how", ["cow-on-read", "cow-on-cache"])
def test_copy_up_racing_writes_held_nbd_backing(held, engines, backing_factory, how):
    """Every copy-up is held at the backing (nbdkit's pause filter) while a whole-block write
    of its block (which needs no backing read) lands; only then is the backing released: the
    copy-up must leave the block alone.  Four copy-ups at a time, over four connections."""
    bs, nblocks = 4096, 24
    size = nblocks * bs
    path = backing_factory(size, pattern=0x5A, holes=False)
    back = held("file", path)
    eng = engines(back.uri, block_size=bs, nbd_connections=4,
                  cow_on_read=(how == "cow-on-read"), cow_on_cache=(how == "cow-on-cache"))
    fresh = {blk: randbytes(f"fresh-{blk}", bs) for blk in range(nblocks)}

    def copy_up(blk):
        if how == "cow-on-read":
            eng.pread(bytearray(bs), blk * bs)
        else:
            eng.cache(bs, blk * bs)

    try:
        for first in range(0, nblocks, 4):
            blocks = range(first, first + 4)
            back.hold()
            copiers = [threading.Thread(target=copy_up, args=(blk,)) for blk in blocks]
            for t in copiers:
                t.start()
            for blk in blocks:            # each copy-up is at the backing, and held there
                back.wait_for(rf" Read id=\d+ offset={hex(blk * bs)} ")
            writer = threading.Thread(target=lambda: [eng.pwrite(fresh[blk], blk * bs)
                                                      for blk in blocks])
            writer.start()
            writer.join(60)
            assert not writer.is_alive(), "a whole-block write waited for a copy-up"
            assert len(back.pending()) == 4, back.pending()
            back.release()
            for t in copiers:
                t.join(60)
                assert not t.is_alive(), "a copy-up hung"
    finally:
        back.release()
    want = b"".join(fresh[blk] for blk in range(nblocks))
    assert_same(read_all(eng), want, "a copy-up brought back old data")
    assert states(eng) == [AL] * nblocks


# ---------------------------------------------------------------- the GIL is released


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
@pytest.mark.parametrize("op", ["pread", "pwrite-rmw", "zero-rmw", "cow-on-cache"])
def test_gil_released_during_slow_backing_read(held, engines, lock_mode, op):
    """While the engine waits for a backing read (held at the backing until this thread
    releases it), this thread runs Python code: it can only do so if the engine released the
    GIL.  Were the GIL held, this thread would run again only once the call got its data (a
    separate process releases the backing after 30 s), when the backing's log already shows
    the read answered."""
    back = held("memory", "64M")
    eng = engines(back.uri, lock_mode=lock_mode, cow_on_cache=True)
    buf = bytearray(65536)
    calls = {
        "pread": lambda: eng.pread(buf, 0),
        "pwrite-rmw": lambda: eng.pwrite(b"p" * 512, 512),       # sub-block: copies the block up
        "zero-rmw": lambda: eng.zero(512, 1024, may_trim=False),
        "cow-on-cache": lambda: eng.cache(65536, 0),
    }
    back.hold()
    back.release_after(30)                 # the way out if this thread never runs again
    t = threading.Thread(target=calls[op])
    try:
        t.start()
        back.wait_for(r" Read id=\d+ offset=0x0 ")  # the call waits for the backing
        # Python code in this thread, while the read is (or was) held:
        still_held = bool(back.pending()) and t.is_alive()
    finally:
        back.release()
    t.join(60)
    assert not t.is_alive()
    assert still_held, "this thread ran only after the backing answered: the GIL was held"


@pytest.mark.parametrize("lock_mode", LOCK_MODES)
def test_overlay_work_during_a_slow_backing_read(held, engines, lock_mode):
    """Fine mode: while one thread's backing read is held at the backing, other threads read
    and write blocks in the overlay and start their own backing reads.  Global mode (the seed's
    "before" behaviour, for the benchmark): one lock around every block operation, so they wait
    for it."""
    back = held("memory", "64M")
    eng = engines(back.uri, lock_mode=lock_mode, nbd_connections=4)
    bs = eng.block_size
    eng.pwrite(randbytes(5, bs), 5 * bs)                     # block 5 lives in the overlay
    a = threading.Thread(target=lambda: eng.pread(bytearray(bs), 0))
    buf = bytearray(bs)

    def overlay_work():
        eng.pwrite(b"x" * 512, 5 * bs + 512)
        eng.pread(buf, 5 * bs)

    overlay = threading.Thread(target=overlay_work)
    b = threading.Thread(target=lambda: eng.pread(bytearray(bs), 7 * bs))
    back.hold()
    try:
        a.start()
        back.wait_for(r" Read id=\d+ offset=0x0 ")           # held at the backing
        overlay.start()
        if lock_mode == "fine":
            overlay.join(60)
            assert not overlay.is_alive(), \
                "overlay reads and writes waited for another thread's backing read"
            b.start()                                         # another block's backing read
            back.wait_for(rf" Read id=\d+ offset={hex(7 * bs)} ")
            assert len(back.pending()) == 2, "the second backing read waited for the first"
        else:
            overlay.join(1.0)            # it cannot finish while the held read has the lock
            assert overlay.is_alive(), "global lock mode did not serialize block operations"
    finally:
        back.release()
    for t in (a, overlay, b):
        if t.ident is not None:
            t.join(60)
            assert not t.is_alive()
    want = bytearray(randbytes(5, bs))
    want[512:1024] = b"x" * 512
    assert buf == want


def test_close_waits_for_a_call_in_flight(held, engines):
    """close() from another thread while a backing read is in flight (held at the backing): the
    read completes with the right data, close() returns only after it, and later calls raise
    instead of crashing."""
    back = held("pattern", "1M")
    eng = engines(back.uri, block_size=4096)
    buf = bytearray(4096)
    result = []

    def reader():
        try:
            eng.pread(buf, 8192)
            result.append("ok")
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=reader)
    closer = threading.Thread(target=eng.close)
    back.hold()
    try:
        t.start()
        back.wait_for(r" Read id=\d+ offset=0x2000 ")
        closer.start()
        closer.join(1.0)                  # it cannot return while the read is held
        assert closer.is_alive(), "close() returned while a call was in flight"
        assert result == []
    finally:
        back.release()
    t.join(30)
    closer.join(30)
    assert not closer.is_alive()
    assert result == ["ok"]
    assert buf[:16] == (8192).to_bytes(8, "big") + (8200).to_bytes(8, "big")
    assert eng.closed
    with pytest.raises(ValueError):
        eng.pread(bytearray(10), 0)


# ---------------------------------------------------------------- writes racing trims


@pytest.mark.parametrize("how", ["whole", "partial"])
def test_writes_racing_trims_keep_space_and_states_agreeing(engines, backing_factory, how):
    """Writes into allocated blocks race trims of the same blocks, more threads than cores.
    Whatever order wins, a block that ends up trimmed holds no overlay space (a write landing
    after the hole punch would leave space that reads as zeroes, is not counted against the cap
    and is never given back)."""
    bs, nblocks, nthreads = 64 * KiB, 4, 6
    eng = engines(backing_factory(nblocks * bs), block_size=bs)
    data = b"w" * bs if how == "whole" else b"p" * 4096
    at = 0 if how == "whole" else 8192
    leaks = []
    deadline = time.monotonic() + 3
    rnd = 0
    while time.monotonic() < deadline and not leaks:
        rnd += 1
        eng.pwrite(b"a" * (nblocks * bs), 0)
        rng = random.Random(rnd)
        orders = [rng.sample(range(nblocks), nblocks) for _ in range(2 * nthreads)]
        jobs = [lambda o=o: [eng.pwrite(data, i * bs + at) for i in o] for o in orders[:nthreads]]
        jobs += [lambda o=o: [eng.trim(bs, i * bs) for i in o] for o in orders[nthreads:]]
        run_threads(jobs)
        st = eng.stats()
        if st["overlay_bytes"] > st["allocated_blocks"] * bs:
            leaks.append((rnd, states(eng), st["overlay_bytes"]))
    assert not leaks, f"trimmed blocks kept overlay space after {rnd} rounds: {leaks}"
