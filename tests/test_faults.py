"""Faults injected for real: backing read errors (nbdkit's error filter), a backing nbdkit killed
mid-run, an overlay cap, a file-size limit (RLIMIT_FSIZE) and a full tmpfs under the overlay.

The rule checked everywhere: an operation that fails says so (EIO for the backing, ENOSPC/EFBIG
for the overlay); everything else goes on; and the bitmap never says a block is in the overlay
unless its whole content got there (nothing half-copied is marked allocated).
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import subprocess
import textwrap
import threading

import nbd
import pytest

from conftest import write_sample
from cow import engine as E
from support_reliability import PYTHON, run_server, start_nbdkit, wait_until

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB
NA, AL, TR = E.BLOCK_NOT_ALLOCATED, E.BLOCK_ALLOCATED, E.BLOCK_TRIMMED
# A backing NBD server that is gone is a backing I/O error, whatever libnbd's errno says about
# its own state (ENOTCONN, then EINVAL for a dead handle): EIO.
LOST_BACKING = {errno.EIO}


def states(eng):
    return [eng.blk_status(b) for b in range(eng.nr_blocks)]


class Model:
    """What the disk must read as, and checks of the engine's bitmap against it."""

    def __init__(self, backing: bytes, bs: int):
        self.backing = backing
        self.want = bytearray(backing)
        self.bs = bs

    def check(self, eng, read_all=True):
        """With the backing readable again: every byte as expected, and every block that is not
        in the overlay holds exactly the backing's data (so no change was lost in a block
        whose write failed, and no half-copied block claims to be in the overlay)."""
        size = len(self.want)
        if read_all:
            got = bytearray(size)
            eng.pread(got, 0)
            assert got == self.want
        for blk in range(eng.nr_blocks):
            s, e = blk * self.bs, min((blk + 1) * self.bs, size)
            st = eng.blk_status(blk)
            if st == NA:
                assert self.want[s:e] == self.backing[s:e], f"block {blk} changed but not allocated"
            elif st == TR:
                assert self.want[s:e].count(0) == e - s, f"trimmed block {blk} holds data"
            else:
                assert st == AL, st


# ---------------------------------------------------------------- backing read errors


@pytest.fixture
def error_backing(tmp_path):
    """A 4 MiB sample served by nbdkit's error filter: reads and block status fail (EIO) with
    the given rate while the trigger file exists."""

    made = []

    def make(rate="100%", size=4 * MiB):
        path = write_sample(tmp_path / f"disk{len(made)}.img", size)
        trigger = tmp_path / f"errors-on{len(made)}"
        cm = start_nbdkit(tmp_path, "--filter=error", "file", path, "error-pread=EIO",
                          f"error-pread-rate={rate}", f"error-pread-file={trigger}",
                          "error-extents=EIO", f"error-extents-rate={rate}",
                          f"error-extents-file={trigger}", name=f"nbdkit{len(made)}")
        uri, proc = cm.__enter__()
        made.append(cm)
        return uri, trigger, path.read_bytes()

    yield make
    for cm in reversed(made):
        cm.__exit__(None, None, None)


def _expect_errno(fn, allowed):
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno in allowed, ei.value
    return ei.value


def test_backing_read_errors_fail_only_what_needs_the_backing(error_backing, tmp_path):
    uri, trigger, backing = error_backing()
    with E.Engine(uri, block_size=BS, tmpdir=str(tmp_path)) as eng:
        m = Model(backing, BS)
        eng.pwrite(b"A" * 100, BS + 10)              # block 1 copied up while reads work
        m.want[BS + 10:BS + 110] = b"A" * 100
        trigger.touch()                               # from now on every backing read fails
        buf = bytearray(BS)
        _expect_errno(lambda: eng.pread(buf, 0), {errno.EIO})
        _expect_errno(lambda: eng.pread(bytearray(3 * BS), 0), {errno.EIO})  # spans block 1
        eng.pread(buf, BS)                            # the overlay is still readable
        assert buf == m.want[BS:2 * BS]
        eng.pwrite(b"B" * BS, 2 * BS)                 # whole block: no backing read needed
        m.want[2 * BS:3 * BS] = b"B" * BS
        eng.pwrite(b"b" * 5, 2 * BS + 7)              # into an allocated block
        m.want[2 * BS + 7:2 * BS + 12] = b"b" * 5
        _expect_errno(lambda: eng.pwrite(b"C" * 100, 3 * BS + 5), {errno.EIO})
        _expect_errno(lambda: eng.zero(100, 4 * BS + 5, may_trim=False), {errno.EIO})
        _expect_errno(lambda: eng.trim(100, 5 * BS + 5), {errno.EIO})
        eng.zero(BS, 6 * BS)                          # whole blocks: trimmed, no read
        eng.zero(BS, 7 * BS, may_trim=False)
        m.want[6 * BS:8 * BS] = bytes(2 * BS)
        eng.trim(BS, 8 * BS)
        m.want[8 * BS:9 * BS] = bytes(BS)
        eng.cache(BS, 9 * BS)                         # advisory: no error, no change
        assert states(eng)[:10] == [NA, AL, AL, NA, NA, NA, TR, AL, TR, NA]
        assert eng.stats()["allocated_blocks"] == 3
        # A write that would straddle a failing head and a whole block stops at the head:
        # the whole block after it is not written either.
        _expect_errno(lambda: eng.pwrite(b"D" * (BS + 100), 10 * BS - 100), {errno.EIO})
        assert eng.blk_status(10) == NA and eng.blk_status(9) == NA
        trigger.unlink()                              # the backing recovers
        m.check(eng)


@pytest.mark.parametrize("cow_on_read", [False, True])
def test_backing_read_errors_at_random_leave_a_consistent_overlay(error_backing, tmp_path,
                                                                  cow_on_read):
    """Half of the backing reads fail: each operation either succeeds with the right data or
    fails with EIO; after a failed write each block of its range holds either the old or the
    new data, never a mix; at the end the whole disk matches the model."""
    uri, trigger, backing = error_backing(rate="50%", size=8 * MiB)
    size = len(backing)
    rng = random.Random(1234 + cow_on_read)
    failures = successes = 0
    with E.Engine(uri, block_size=BS, cow_on_read=cow_on_read, cow_on_cache=True,
                  tmpdir=str(tmp_path)) as eng:
        m = Model(backing, BS)
        trigger.touch()
        for i in range(400):
            op = rng.choice("rrwwwztc")
            off = rng.randrange(size)
            count = rng.randrange(1, min(size - off, 3 * BS) + 1)
            if op == "w":
                new = rng.randbytes(count)
            elif op in "zt":
                new = bytes(count)
            try:
                if op == "r":
                    buf = bytearray(count)
                    eng.pread(buf, off)
                    assert buf == m.want[off:off + count]
                elif op == "w":
                    eng.pwrite(new, off)
                elif op == "z":
                    eng.zero(count, off, may_trim=rng.random() < 0.5)
                elif op == "t":
                    eng.trim(count, off)
                else:
                    eng.cache(count, off)
                successes += 1
                if op in "wzt":
                    m.want[off:off + count] = new
            except OSError as e:
                assert e.errno == errno.EIO, e
                failures += 1
                if op in "wzt":
                    # Look with errors off: per block piece, all old or all new.
                    trigger.unlink()
                    got = bytearray(count)
                    eng.pread(got, off)
                    pos = off
                    while pos < off + count:
                        end = min((pos // BS + 1) * BS, off + count)
                        piece = got[pos - off:end - off]
                        old = m.want[pos:end]
                        assert piece in (old, new[pos - off:end - off]), \
                            f"op {i} {op}: block {pos // BS} holds a mix after a failed write"
                        pos = end
                    m.want[off:off + count] = got
                    trigger.touch()
            if i % 50 == 49:
                m.check(eng, read_all=False)
        assert failures >= 5 and successes >= 100, (failures, successes)
        trigger.unlink()
        m.check(eng)


def test_backing_killed_mid_run(tmp_path):
    """Four threads work on their own block ranges while the backing nbdkit is killed (SIGKILL).
    Afterwards what needs the backing fails; what does not (whole-block writes, reads of the
    overlay, trims) keeps working; and every allocated block holds exactly what was written."""
    size = 16 * MiB
    path = write_sample(tmp_path / "disk.img", size)
    backing = path.read_bytes()
    nblocks = size // BS
    with start_nbdkit(tmp_path, "file", path) as (uri, proc):
        eng = E.Engine(uri, block_size=BS, tmpdir=str(tmp_path))
        m = Model(backing, BS)
        lock = threading.Lock()
        killed = threading.Event()
        stop = threading.Event()
        errors: list[BaseException] = []
        counts = {"before": 0, "after_ok": 0, "after_err": 0}

        def worker(k):
            rng = random.Random(k)
            mine = range(k * nblocks // 4, (k + 1) * nblocks // 4)
            try:
                while not stop.is_set():
                    blk = rng.choice(mine)
                    op = rng.choice("rwWt")
                    was_killed = killed.is_set()
                    if op == "W":              # a whole block
                        off, count = blk * BS, BS
                    else:
                        off = blk * BS + rng.randrange(BS - 512)
                        count = rng.randrange(1, 512)
                    new = rng.randbytes(count) if op in "wW" else bytes(count)
                    try:
                        if op == "r":
                            buf = bytearray(count)
                            eng.pread(buf, off)
                            with lock:
                                assert buf == m.want[off:off + count]
                        elif op in "wW":
                            eng.pwrite(new, off)
                        else:
                            eng.trim(count, off)
                        if op != "r":
                            with lock:
                                m.want[off:off + count] = new
                        counts["after_ok" if was_killed else "before"] += 1
                    except OSError as e:
                        # Only once the backing is gone, and only for work that needs it.
                        assert killed.is_set(), e
                        assert e.errno in LOST_BACKING, e
                        assert op != "W", "a whole-block write needed the backing"
                        assert eng.blk_status(blk) != AL or op == "r", \
                            f"block {blk} allocated by a failed {op}"
                        counts["after_err"] += 1
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            while counts["before"] < 100 and not errors:
                threading.Event().wait(0.01)
            killed.set()                     # first: the errors may come at once
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            while counts["after_ok"] + counts["after_err"] < 400 and not errors:
                threading.Event().wait(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[0]
        assert counts["after_err"] > 0 and counts["after_ok"] > 0, counts
        # The backing is gone: allocated blocks read from the overlay, the rest must still be
        # the backing's data (checked against the file itself).
        buf = bytearray(BS)
        for blk in range(nblocks):
            s = blk * BS
            st = eng.blk_status(blk)
            if st == NA:
                assert m.want[s:s + BS] == backing[s:s + BS], f"block {blk} lost a change"
                _expect_errno(lambda: eng.pread(buf, s), LOST_BACKING)
            else:
                eng.pread(buf, s)
                assert buf == m.want[s:s + BS], f"block {blk}"
        eng.close()


# ---------------------------------------------------------------- overlay write errors


def test_overlay_max_size_gives_enospc_and_keeps_earlier_data(tmp_path):
    size = 2 * MiB
    path = write_sample(tmp_path / "disk.img", size)
    backing = path.read_bytes()
    with E.Engine(str(path), block_size=BS, overlay_max_size=8 * BS, tmpdir=str(tmp_path)) as eng:
        m = Model(backing, BS)
        rng = random.Random(7)
        for blk in range(0, 16, 2):                    # 8 blocks: the cap
            data = rng.randbytes(1000)
            eng.pwrite(data, blk * BS + 3)
            m.want[blk * BS + 3:blk * BS + 1003] = data
        for call in (lambda: eng.pwrite(b"x" * BS, BS),
                     lambda: eng.pwrite(b"x" * 10, 3 * BS + 1),
                     lambda: eng.pwrite(b"x" * (3 * BS), 16 * BS),
                     lambda: eng.zero(BS, 5 * BS, may_trim=False),
                     lambda: eng.zero(100, 7 * BS + 1),
                     lambda: eng.pwrite(b"x" * (2 * BS), 14 * BS)):   # 14 allocated, 15 not
            _expect_errno(call, {errno.ENOSPC})
        assert [b for b in range(eng.nr_blocks) if eng.blk_status(b) == AL] == list(range(0, 16, 2))
        m.check(eng)
        eng.pwrite(b"y" * 50, 4 * BS)                  # rewriting allocated blocks still works
        m.want[4 * BS:4 * BS + 50] = b"y" * 50
        eng.trim(BS, 0)                                # a trim gives a block back ...
        m.want[0:BS] = bytes(BS)
        eng.pwrite(b"z" * BS, BS)                      # ... and the cap lets one more in
        m.want[BS:2 * BS] = b"z" * BS
        m.check(eng)


_FSIZE_CHILD = textwrap.dedent("""
    import errno, json, os, random, resource, signal, sys
    from cow import engine as E
    backing, tmpdir, limit, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    eng = E.Engine(backing, block_size=bs, tmpdir=tmpdir)
    rng = random.Random(5)
    size = eng.size
    want = bytearray(open(backing, "rb").read())
    results = []
    for i in range(300):
        off = rng.randrange(size)
        count = rng.randrange(1, min(size - off, 3 * bs) + 1)
        before = [eng.blk_status(b) for b in range(off // bs, (off + count - 1) // bs + 1)]
        data = rng.randbytes(count)
        try:
            if rng.random() < 0.8:
                eng.pwrite(data, off)
            else:
                data = bytes(count)
                eng.zero(count, off, may_trim=False)
            want[off:off + count] = data
            results.append(["ok", off, count])
        except OSError as e:
            after = [eng.blk_status(b) for b in range(off // bs, (off + count - 1) // bs + 1)]
            results.append(["err", off, count, e.errno, before, after])
            # Per block: old or new content, never a mix; and a block that was not allocated
            # before the failed write is not allocated after it unless it holds the new data.
            got = bytearray(count)
            eng.pread(got, off)
            pos = off
            while pos < off + count:
                end = min((pos // bs + 1) * bs, off + count)
                piece = got[pos - off:end - off]
                if piece != want[pos:end] and piece != data[pos - off:end - off]:
                    results.append(["mix", pos // bs])
                pos = end
            want[off:off + count] = got
    full = bytearray(size)
    eng.pread(full, 0)
    st = [eng.blk_status(b) for b in range(eng.nr_blocks)]
    orig = open(backing, "rb").read()
    bad = [b for b in range(eng.nr_blocks)
           if st[b] == E.BLOCK_NOT_ALLOCATED and want[b*bs:(b+1)*bs] != orig[b*bs:(b+1)*bs]]
    past = [b for b in range(limit // bs, eng.nr_blocks)
            if st[b] == E.BLOCK_ALLOCATED and any(full[b*bs:(b+1)*bs])]
    print(json.dumps({"results": results, "match": full == want, "states": st,
                      "unallocated_but_changed": bad, "allocated_past_limit_with_data": past}))
""")


def test_rlimit_fsize_gives_efbig_and_the_bitmap_stays_true(tmp_path):
    """The engine in a child process whose file-size limit (RLIMIT_FSIZE) lets the overlay reach
    only 1 MiB of a 4 MiB disk: writes past it fail with EFBIG (SIGXFSZ ignored) and nothing
    that failed is marked allocated."""
    size, limit = 4 * MiB, 1 * MiB
    path = write_sample(tmp_path / "disk.img", size)
    overlay_dir = tmp_path / "overlay"
    overlay_dir.mkdir()
    r = subprocess.run([PYTHON, "-P", "-c", _FSIZE_CHILD, str(path), str(overlay_dir), str(limit),
                        str(BS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    errs = [x for x in out["results"] if x[0] == "err"]
    oks = [x for x in out["results"] if x[0] == "ok"]
    assert errs and oks
    for _, off, count, err, before, after in errs:
        assert err in (errno.EFBIG, errno.ENOSPC), err
        assert off + count > limit or any(s == NA for s in before)
    assert not [x for x in out["results"] if x[0] == "mix"], "a block holds a mix after a failure"
    assert out["match"], "the disk does not read back as the model"
    assert out["unallocated_but_changed"] == []
    # No data could be written at or past the limit: blocks there can be in the overlay only
    # as punched zeroes (zero with may_trim=False punches a hole, which needs no space).
    st = out["states"]
    assert out["allocated_past_limit_with_data"] == [], out["allocated_past_limit_with_data"]
    assert any(s == AL for s in st[:limit // BS]), st
    assert path.read_bytes() == write_sample(tmp_path / "again.img", size).read_bytes()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, if this machine lets us mount one (root in a privileged container)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: the tmpfs variant needs it (RLIMIT_FSIZE covers ENOSPC)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the RLIMIT_FSIZE test covers a full overlay")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_tmpfs_gives_enospc(tmp_path, small_tmpfs):
    size = 4 * MiB
    path = write_sample(tmp_path / "disk.img", size, holes=False)
    backing = path.read_bytes()
    with E.Engine(str(path), block_size=BS, tmpdir=str(small_tmpfs)) as eng:
        m = Model(backing, BS)
        rng = random.Random(3)
        failed_at = None
        for blk in range(size // BS):
            data = rng.randbytes(BS - 100)
            try:
                eng.pwrite(data, blk * BS + 50)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                failed_at = blk
                break
            m.want[blk * BS + 50:(blk + 1) * BS - 50] = data
        assert failed_at is not None and 4 <= failed_at <= 16, failed_at
        assert eng.blk_status(failed_at) == NA
        m.check(eng)                                   # earlier writes all read back
        # A trim frees overlay space (the engine punches it), and writes go on.
        eng.trim(4 * BS, 0)
        m.want[0:4 * BS] = bytes(4 * BS)
        eng.pwrite(b"after" * 100, failed_at * BS + 7)
        m.want[failed_at * BS + 7:failed_at * BS + 507] = b"after" * 100
        m.check(eng)


# ---------------------------------------------------------------- through the server


def _nbd(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def test_server_backing_errors_reach_the_client_as_eio(error_backing, tmp_path):
    uri, trigger, backing = error_backing()
    with run_server(tmp_path, uri, "--cow-block-size", "64K") as srv:
        a, b = _nbd(srv.uri), _nbd(srv.uri)
        a.pwrite(b"Q" * BS, 0)
        trigger.touch()
        with pytest.raises(nbd.Error) as ei:
            b.pread(BS, 2 * BS)
        assert ei.value.errnum == errno.EIO
        with pytest.raises(nbd.Error) as ei:
            a.pwrite(b"w" * 10, 3 * BS + 1)
        assert ei.value.errnum == errno.EIO
        with pytest.raises(nbd.Error) as ei:              # extents of the backing fail too
            b.block_status(BS, 5 * BS, lambda *a: 0)
        assert ei.value.errnum == errno.EIO
        seen = []
        a.block_status(BS, 0, lambda ctx, off, entries, err: seen.extend(entries) or 0)
        assert seen[:2] == [BS, 0]                        # an allocated block needs no backing
        assert b.pread(BS, 0) == b"Q" * BS                # other blocks, other connection
        b.pwrite(b"R" * BS, 4 * BS)
        assert a.pread(10, 4 * BS) == b"R" * 10
        trigger.unlink()
        assert a.pread(BS, 2 * BS) == backing[2 * BS:3 * BS]
        assert a.pread(BS, 3 * BS) == backing[3 * BS:4 * BS]   # the failed write left nothing
        for h in (a, b):
            h.shutdown()
        assert srv.alive()


def test_server_backing_killed_clients_get_eio_and_server_stays_up(tmp_path):
    path = write_sample(tmp_path / "disk.img", 2 * MiB)
    with start_nbdkit(tmp_path, "file", path) as (uri, proc):
        # --backing-wait 0: reads fail at once while the backing is down (test_backing_reconnect.py
        # has the wait).
        with run_server(tmp_path, uri, "--backing-wait", "0") as srv:
            h = _nbd(srv.uri)
            h.pwrite(b"K" * BS, 0)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for i in range(8):      # every try, not only the first one on each backing handle
                with pytest.raises(nbd.Error) as ei:
                    h.pread(4096, (8 + i) * BS)
                assert ei.value.errnum == errno.EIO, ei.value
            assert h.pread(BS, 0) == b"K" * BS
            h.pwrite(b"L" * BS, 6 * BS)
            assert h.pread(BS, 6 * BS) == b"L" * BS
            h2 = _nbd(srv.uri)                            # new connections are served too
            assert h2.pread(4, 6 * BS) == b"LLLL"
            for x in (h, h2):
                x.shutdown()


@pytest.mark.parametrize("when", ["at-start", "later"])
def test_server_under_rlimit_fsize_gives_enospc(tmp_path, when):
    """RLIMIT_FSIZE on the server, from its start or set later on the running process
    (prlimit): writes whose overlay offset is past the limit fail with ENOSPC at the client
    (EFBIG inside; SIGXFSZ must not kill the server); earlier data stays readable; the server
    stays up and exits 0."""
    import resource

    size, limit = 4 * MiB, 1 * MiB
    path = write_sample(tmp_path / "disk.img", size)
    backing = path.read_bytes()
    overlay = tmp_path / "overlay"
    overlay.mkdir()

    def limit_fsize():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with run_server(tmp_path, path, "--tmpdir", overlay,
                    preexec_fn=limit_fsize if when == "at-start" else None) as srv:
        h = _nbd(srv.uri)
        h.pwrite(b"1" * BS, 0)
        if when == "later":
            resource.prlimit(srv.pid, resource.RLIMIT_FSIZE, (limit, limit))
        for call in (lambda: h.pwrite(b"2" * BS, 2 * MiB),
                     lambda: h.pwrite(b"3" * 10, 3 * MiB + BS + 1),
                     lambda: h.zero(100, 3 * MiB + 5),              # merge: a block write
                     lambda: h.pwrite(b"4" * (2 * BS), limit - BS)):   # straddles the limit
            with pytest.raises(nbd.Error) as ei:
                call()
            assert ei.value.errnum == errno.ENOSPC, ei.value
        h.pwrite(b"5" * 100, BS + 1)                       # below the limit: fine
        assert h.pread(BS, 0) == b"1" * BS
        assert h.pread(100, BS + 1) == b"5" * 100
        for off in (2 * MiB, 3 * MiB, limit - BS, limit):   # nothing of the failures is visible
            assert h.pread(BS, off) == backing[off:off + BS]
        h.shutdown()
        assert srv.alive()


# ---------------------------------------------------------------- a backing lost: one log line

BROKE = "cow: the backing connection broke ("
# What each kind of request costs the backing, and the line the log filter writes for it.
KILL_KINDS = {
    "read-small": "Read",       # started, collected by the connection's ReadQueue
    "read-large": "Read",       # a worker's synchronous read
    "block-status": "Extents",
    "cache": "Cache",
    "partial-write": "Read",    # the copy-up of its block
}


def _start_request(h, kind, i):
    """Start one request of `kind` that needs the backing (block 8 + i, not in the overlay)."""
    off = (8 + 4 * i) * BS
    if kind == "read-small":
        return h.aio_pread(nbd.Buffer(4096), off)
    if kind == "read-large":
        return h.aio_pread(nbd.Buffer(4 * BS), off)
    if kind == "block-status":
        return h.aio_block_status(BS, off, lambda *a: 0)
    if kind == "cache":
        return h.aio_cache(BS, off)
    return h.aio_pwrite(b"w" * 100, off + 7)


def _finish(h, cookies):
    """Wait for every request; the errno of each (0: it succeeded)."""
    while h.aio_in_flight() > 0:
        h.poll(-1)
    out = []
    for c in cookies:
        try:
            h.aio_command_completed(c)
            out.append(0)
        except nbd.Error as e:
            out.append(e.errnum)
    return out


@pytest.mark.parametrize("when", ["in-flight", "idle"])
@pytest.mark.parametrize("kind", list(KILL_KINDS))
def test_backing_killed_logs_what_broke_once(tmp_path, kind, when):
    """The backing nbdkit (on a Unix socket) is killed with SIGKILL while requests of one kind
    wait for it, or while nothing does and requests come after.  Every time (--backing-wait 0:
    no waiting for it to come back): the clients get EIO, the server keeps serving the overlay
    and new clients, and its log (no -v) says once that the backing connection broke.  Rounds: one backing connection or several (the backing
    advertises multi-conn: they all break, one line still); idle, with the backing not yet
    read (no dispatcher thread runs yet) or already read."""
    rounds = [(False, False), (True, False), (False, True), (True, True)]
    for rnd, (multi_conn, used) in enumerate(rounds):
        d = tmp_path / f"round{rnd}"
        d.mkdir()
        log = d / "backing.log"
        filters, params = ["--filter=log"], [f"logfile={log}"]
        if not multi_conn:
            filters.append("--filter=multi-conn")
            params.append("multi-conn-mode=disable")
        if when == "in-flight":
            filters.append("--filter=delay")
            params += ["delay-read=30", "delay-extents=30", "delay-cache=30"]
        with start_nbdkit(d, "-t", "16", *filters, "memory", "16M", *params) as (uri, proc):
            with run_server(d, uri, "--backing-wait", "0") as srv:
                h = _nbd(srv.uri)
                h.pwrite(b"K" * BS, 0)                     # the overlay holds block 0
                if when == "idle" and used:
                    assert _finish(h, [_start_request(h, kind, 9)]) == [0]
                cookies = []
                if when == "in-flight":
                    cookies = [_start_request(h, kind, i) for i in range(3)]
                    wait_until(lambda: log.read_text().count(f" {KILL_KINDS[kind]} id=") >= 3,
                               what="the requests at the backing")
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if when == "idle":
                    cookies = [_start_request(h, kind, i) for i in range(3)]
                errs = _finish(h, cookies)
                if kind == "cache":            # advice: no error for it; a read fails
                    assert set(errs) <= {0, errno.EIO}, errs
                else:
                    assert errs == [errno.EIO] * 3, errs
                with pytest.raises(nbd.Error) as ei:
                    h.pread(4096, 200 * BS)
                assert ei.value.errnum == errno.EIO
                assert h.pread(BS, 0) == b"K" * BS          # the overlay is still served
                h2 = _nbd(srv.uri)                          # and new clients are
                assert h2.pread(4, 0) == b"KKKK"
                for x in (h, h2):
                    x.shutdown()
                wait_until(lambda: BROKE in srv.stderr(), timeout=10,
                           what=f"the log line (round {rnd})")
            text = srv.stderr()                             # the server has stopped
            assert text.count(BROKE) == 1, (rnd, text)
            line = next(l for l in text.splitlines() if BROKE in l)
            assert uri in line and line.endswith(
                "; reconnecting, requests that need the backing fail with EIO until it is back"), \
                line
