"""The persistent overlay at the engine level: the file's format, reopening, what a flush writes
and when, every refusal (with the file left untouched), the lock, read-only opens, and the
crash-safety argument of overlay.pxi checked against torn bitmaps.  The tools and the server
have their own tests (test_overlay_tools.py, test_overlay_server.py, test_overlay_crash.py)."""

import errno
import hashlib
import os
import random
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

from cow import engine as E
from cow import overlayfile as F
from support_engine import KiB, MiB, read_all, read_file, states

NA, AL, TR = 0, 1, 3


def digest(path):
    return hashlib.sha256(read_file(path)).hexdigest(), os.stat(path).st_mtime_ns


def header(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return F.read_header(fd, str(path))
    finally:
        os.close(fd)


def disk_bitmap(path):
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h.bitmap_offset)
        return f.read(h.bitmap_len)


def decode(bits, nr_blocks):
    return [(bits[b >> 2] >> (2 * (b & 3))) & 3 for b in range(nr_blocks)]


def one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


class Model:
    """An engine over a persistent overlay, and what each block must read as."""

    def __init__(self, eng, backing):
        self.eng = eng
        self.want = bytearray(read_file(backing))
        self.bs = eng.block_size
        self.rng = random.Random(7)

    def op(self):
        rng, size, bs = self.rng, len(self.want), self.bs
        kind = rng.choice("wwwwpptz")
        if kind == "w":
            blk = rng.randrange(self.eng.nr_blocks)
            off, n = blk * bs, min(bs, size - blk * bs) * rng.randint(1, 2)
            n = min(n, size - off)
            data = rng.randbytes(n)
            self.eng.pwrite(data, off)
            self.want[off:off + n] = data
        elif kind == "p":
            off = rng.randrange(size - 1)
            n = rng.randint(1, min(3 * bs, size - off))
            data = rng.randbytes(n)
            self.eng.pwrite(data, off)
            self.want[off:off + n] = data
        else:
            off = rng.randrange(size - 1)
            n = rng.randint(1, min(4 * bs, size - off))
            if kind == "t":
                self.eng.trim(n, off)       # whole blocks trimmed, partial ends zeroed
            else:
                self.eng.zero(n, off, may_trim=rng.random() < 0.5)
            self.want[off:off + n] = bytes(n)


@pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB, 1 * MiB])
def test_reopen_serves_every_change_again(backing_factory, tmp_path, bs):
    size = 5 * MiB + 12345          # not a multiple of any block size
    disk = backing_factory(size)
    ov = tmp_path / "vm.cow"
    eng = E.Engine(str(disk), overlay=str(ov), block_size=bs)
    assert stat.S_IMODE(os.stat(ov).st_mode) == 0o600
    m = Model(eng, disk)
    for _ in range(300):
        m.op()
    want_states = states(eng)
    eng.close()

    h = header(ov)
    assert (h.version, h.block_size, h.disk_size, h.backing_kind) == (2, bs, size, F.KIND_FILE)
    assert (h.backing_dev, h.backing_ino) == (os.stat(disk).st_dev, os.stat(disk).st_ino)
    assert h.backing == str(disk) and h.backing_size == size
    assert h.backing_mtime_ns == os.stat(disk).st_mtime_ns
    assert h.bitmap_offset == 4096 and h.data_offset % bs == 0
    assert h.data_offset >= 4096 + h.bitmap_len
    assert decode(disk_bitmap(ov), eng.nr_blocks) == want_states

    eng = E.Engine(str(disk), overlay=str(ov))     # the block size comes from the file
    try:
        assert eng.block_size == bs and states(eng) == want_states
        assert read_all(eng) == bytes(m.want)
        st = eng.stats()
        assert st["allocated_blocks"] == want_states.count(AL)
        assert st["trimmed_blocks"] == want_states.count(TR)
        assert st["data_offset"] == h.data_offset
    finally:
        eng.close()


def test_block_n_lives_at_data_offset_plus_n_blocks(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with E.Engine(str(disk), overlay=str(ov), block_size="4K") as eng:
        eng.pwrite(b"A" * 4096, 7 * 4096)
        eng.pwrite(b"xyz", 9 * 4096 + 100)
    h = header(ov)
    raw = read_file(ov)
    assert raw[h.data_offset + 7 * 4096:h.data_offset + 8 * 4096] == b"A" * 4096
    blk9 = raw[h.data_offset + 9 * 4096:h.data_offset + 10 * 4096]
    assert blk9[100:103] == b"xyz" and blk9[:100] == read_file(disk)[9 * 4096:9 * 4096 + 100]


def test_bitmap_reaches_the_file_only_at_flush(backing_factory, tmp_path):
    disk = backing_factory(2 * MiB)
    ov = tmp_path / "vm.cow"
    eng = E.Engine(str(disk), overlay=str(ov), block_size="4K")
    try:
        for blk in range(0, 512, 3):
            eng.pwrite(b"w" * 4096, blk * 4096)
        eng.trim(4096 * 4, 4096 * 100)
        assert disk_bitmap(ov).count(0) == len(disk_bitmap(ov)), "bitmap written per write"
        eng.flush()
        assert decode(disk_bitmap(ov), eng.nr_blocks) == states(eng)
        eng.pwrite(b"f" * 4096, 4096, fua=True)      # FUA persists the bitmap too
        assert decode(disk_bitmap(ov), eng.nr_blocks)[1] == AL
    finally:
        eng.close()


def test_flush_writes_only_the_pages_that_changed(backing_factory, tmp_path):
    # 4 KiB blocks: a bitmap page holds 16384 blocks (64 MiB of disk).
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(160 * MiB)
    ov = tmp_path / "vm.cow"
    eng = E.Engine(str(disk), overlay=str(ov), block_size="4K")
    try:
        eng.pwrite(b"a" * 4096, 0)                   # page 0
        eng.pwrite(b"b" * 4096, 20000 * 4096)        # page 1
        eng.flush()
        h = header(ov)
        with open(ov, "r+b") as f:                   # wipe page 1 on disk behind the engine
            f.seek(h.bitmap_offset + 4096)
            f.write(bytes(4096))
        eng.pwrite(b"c" * 4096, 8 * 4096)            # page 0 only
        eng.flush()
        on_disk = decode(disk_bitmap(ov), eng.nr_blocks)
        assert on_disk[8] == AL and on_disk[20000] == NA, "a clean page was written again"
        eng.pwrite(b"d" * 4096, 20001 * 4096)        # page 1 again: written whole
        eng.flush()
        on_disk = decode(disk_bitmap(ov), eng.nr_blocks)
        assert on_disk[20000] == AL and on_disk[20001] == AL
    finally:
        eng.close()


def test_close_flushes_and_gc_without_close_keeps_writes(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    for name, close in (("closed.cow", True), ("dropped.cow", False)):
        ov = tmp_path / name
        eng = E.Engine(str(disk), overlay=str(ov), block_size="4K")
        eng.pwrite(b"k" * 5000, 4000)
        if close:
            eng.close()
        del eng
        with E.Engine(str(disk), overlay=str(ov)) as eng:
            buf = bytearray(5000)
            eng.pread(buf, 4000)
            assert buf == b"k" * 5000, name


def test_trim_punches_and_the_cap_counts_what_was_loaded(backing_factory, tmp_path):
    disk = backing_factory(4 * MiB)
    ov = tmp_path / "vm.cow"
    with E.Engine(str(disk), overlay=str(ov), block_size="64K") as eng:
        eng.pwrite(os.urandom(2 * MiB), 0)
        eng.flush()
        used = eng.stats()["overlay_bytes"]
        eng.trim(2 * MiB, 0)
        eng.flush()
        assert eng.stats()["overlay_bytes"] <= used - 2 * MiB + 64 * KiB
    with E.Engine(str(disk), overlay=str(ov), overlay_max_size="1M") as eng:
        eng.pwrite(os.urandom(1 * MiB), 0)
    # 16 blocks allocated: a cap of 16 blocks refuses a 17th, after a reopen too.
    with E.Engine(str(disk), overlay=str(ov), overlay_max_size="1M") as eng:
        assert eng.stats()["allocated_blocks"] == 16
        eng.pwrite(b"x" * 100, 0)                    # an allocated block: fine
        with pytest.raises(OSError) as e:
            eng.pwrite(b"x" * 100, 3 * MiB)
        assert e.value.errno == errno.ENOSPC


def test_cow_on_read_copies_up_into_the_file(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with E.Engine(str(disk), overlay=str(ov), block_size="4K", cow_on_read=True) as eng:
        eng.pread(bytearray(8192), 0)
    with E.Engine(str(disk), overlay=str(ov)) as eng:
        assert eng.blk_status(0) == AL and eng.blk_status(1) == AL and eng.blk_status(2) == NA
        assert read_all(eng) == read_file(disk)


def test_empty_file_becomes_a_new_overlay(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "mktemp.cow"
    ov.write_bytes(b"")
    with E.Engine(str(disk), overlay=str(ov)) as eng:
        eng.pwrite(b"z", 0)
    assert header(ov).block_size == E.DEFAULT_BLOCK_SIZE


def test_new_overlay_appears_whole_or_not_at_all(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    with E.Engine(str(disk), overlay=str(tmp_path / "a.cow")):
        pass
    # Nothing but the overlay is left in the folder (the temporary name is gone).
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.cow", disk.name])


# -- refusals -------------------------------------------------------------------------------

@pytest.fixture
def made(backing_factory, tmp_path):
    """A 1 MiB backing and an overlay over it with a few changes; returns (disk, ov)."""
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with E.Engine(str(disk), overlay=str(ov), block_size="4K") as eng:
        eng.pwrite(b"changed" * 100, 5000)
        eng.trim(8192, 65536)
    return disk, ov


def refused(disk, ov, *words, **kw):
    before = digest(ov)
    with pytest.raises(F.OverlayError) as e:
        E.Engine(str(disk), overlay=str(ov), **kw)
    one_line(e, str(ov), *words)
    assert digest(ov) == before, "a refusal changed the file"
    return e


def test_refuses_another_disk_size(made, backing_factory):
    disk, ov = made
    other = backing_factory(2 * MiB, name="other.img")
    refused(other, ov, "2097152 bytes", "1048576 bytes")


def test_refuses_a_changed_backing_unless_accepted(made, tmp_path):
    disk, ov = made
    # Another file of the same size (another inode, another modification time).
    copy = tmp_path / "copy.img"
    copy.write_bytes(read_file(disk))
    refused(copy, ov, "differs", "another file", "--overlay-backing-changed=accept")
    # The same file, modified since.
    os.utime(disk, ns=(5, 5))
    refused(disk, ov, "changed", "modified", "--overlay-backing-changed=accept")
    with E.Engine(str(copy), overlay=str(ov), backing_changed="accept") as eng:
        assert eng.blk_status(1) == AL
    h = header(ov)
    assert h.backing == str(copy) and h.backing_mtime_ns == os.stat(copy).st_mtime_ns
    with E.Engine(str(copy), overlay=str(ov)):      # recorded: no refusal now
        pass


def test_a_moved_backing_is_followed(made, tmp_path):
    disk, ov = made
    link = tmp_path / "moved.img"
    os.link(disk, link)                             # same file, another name
    with E.Engine(str(link), overlay=str(ov)) as eng:
        assert eng.blk_status(1) == AL
    assert header(ov).backing == str(link)


def test_a_copy_with_the_same_size_and_time_is_not_the_same_file(made, tmp_path):
    """cp -p keeps size and modification time, not the inode: refused as another file."""
    import shutil
    disk, ov = made
    copy = tmp_path / "copy.img"
    shutil.copy2(disk, copy)
    assert os.stat(copy).st_mtime_ns == os.stat(disk).st_mtime_ns
    refused(copy, ov, "another file", "inode", "--overlay-backing-changed=accept")
    with E.Engine(str(copy), overlay=str(ov), backing_changed="accept") as eng:
        assert eng.blk_status(1) == AL
    assert header(ov).backing == str(copy)      # and it is the recorded one from now on
    with E.Engine(str(copy), overlay=str(ov)):
        pass


def test_block_size_is_adopted_or_must_match(made):
    disk, ov = made
    refused(disk, ov, "block size is 4096, not 65536", "omit --cow-block-size",
            block_size="64K")
    with E.Engine(str(disk), overlay=str(ov), block_size="4K") as eng:
        assert eng.block_size == 4096


def test_refuses_what_is_not_an_overlay(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    notes = tmp_path / "notes.txt"
    notes.write_text("dear diary\n" * 1000)
    refused(disk, notes, "not a cow overlay")
    refused(disk, disk, "the backing itself")      # by mistake
    with pytest.raises(F.OverlayError) as e:
        E.Engine(str(disk), overlay=str(tmp_path))
    one_line(e, str(tmp_path))


def _rewrite_slot(ov, slot, **changes):
    """Rewrite a header slot with changes to its packed fields, checksum recomputed."""
    raw = bytearray(read_file(ov)[:4096])
    s = raw[slot * 2048:(slot + 1) * 2048]
    fields = {"version": (8, "<I"), "flags": (12, "<I"), "seq": (16, "<Q")}
    for name, value in changes.items():
        at, fmt = fields[name]
        struct.pack_into(fmt, s, at, value)
    struct.pack_into("<I", s, 2044, zlib.crc32(bytes(s[:2044])))
    with open(ov, "r+b") as f:
        f.seek(slot * 2048)
        f.write(s)


def test_refuses_a_newer_format_version(made):
    disk, ov = made
    _rewrite_slot(ov, header(ov).slot, version=3)
    refused(disk, ov, "version 3", "newer")


def test_refuses_a_corrupt_or_truncated_header(made, tmp_path):
    disk, ov = made
    raw = read_file(ov)
    cur = header(ov).slot
    bad = bytearray(raw)
    bad[cur * 2048 + 30] ^= 0xFF                     # disk size field: checksum mismatch
    other = 1 - cur
    bad[other * 2048:(other + 1) * 2048] = bytes(2048)
    (tmp_path / "bad.cow").write_bytes(bad)
    refused(disk, tmp_path / "bad.cow", "corrupt overlay header", "checksum")
    (tmp_path / "short.cow").write_bytes(raw[:100])
    refused(disk, tmp_path / "short.cow", "truncated", "header")


def test_refuses_a_truncated_or_corrupt_bitmap(made, tmp_path):
    disk, ov = made
    raw = read_file(ov)
    h = header(ov)
    (tmp_path / "cut.cow").write_bytes(raw[:h.bitmap_offset + 10])
    refused(disk, tmp_path / "cut.cow", "truncated")
    bad = bytearray(raw)
    bad[h.bitmap_offset + 40] = 0b10_00_00_00        # block 163: state 2, never written
    (tmp_path / "bad.cow").write_bytes(bad)
    refused(disk, tmp_path / "bad.cow", "corrupt overlay bitmap", "block 163")


def test_refuses_a_state_past_the_last_block(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB - 4096)          # 255 blocks: the last bitmap byte has 3
    ov = tmp_path / "vm.cow"
    with E.Engine(str(disk), overlay=str(ov), block_size="4K"):
        pass
    h = header(ov)
    with open(ov, "r+b") as f:
        f.seek(h.bitmap_offset + h.bitmap_len - 1)
        f.write(bytes([0b01_00_00_00]))             # "block 255", which does not exist
    refused(disk, ov, "corrupt overlay bitmap", "block 255")


def test_refuses_an_interrupted_commit(made):
    disk, ov = made
    _rewrite_slot(ov, header(ov).slot, flags=F.FLAG_COMMITTING)
    refused(disk, ov, "commit", "interrupted", "python -m cow.overlay commit")


def test_a_torn_header_rewrite_leaves_the_older_slot_in_charge(made, tmp_path):
    disk, ov = made
    link = tmp_path / "renamed.img"
    os.link(disk, link)
    old = header(ov)
    with E.Engine(str(link), overlay=str(ov)):      # records the new name in the other slot
        pass
    new = header(ov)
    assert new.slot == 1 - old.slot and new.seq == old.seq + 1 and new.backing == str(link)
    with open(ov, "r+b") as f:                      # tear the new slot
        f.seek(new.slot * 2048 + 100)
        f.write(b"\xff" * 16)
    got = header(ov)
    assert got.slot == old.slot and got.backing == str(disk)


# -- the lock -------------------------------------------------------------------------------

def test_one_writer_at_a_time_in_one_process(made):
    disk, ov = made
    with E.Engine(str(disk), overlay=str(ov)):
        with pytest.raises(F.OverlayBusy) as e:
            E.Engine(str(disk), overlay=str(ov))
        one_line(e, str(ov), "in use by this process")
        with pytest.raises(F.OverlayBusy):
            E.Engine(str(disk), overlay=str(ov), readonly=True)
    with E.Engine(str(disk), overlay=str(ov), readonly=True):
        with E.Engine(str(disk), overlay=str(ov), readonly=True):  # readers share
            with pytest.raises(F.OverlayBusy):
                E.Engine(str(disk), overlay=str(ov))


def test_busy_names_the_holders_pid(made):
    disk, ov = made
    code = ("import sys, time; from cow.engine import Engine; "
            "e = Engine(sys.argv[1], overlay=sys.argv[2]); print('ready', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-P", "-c", code, str(disk), str(ov)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        with pytest.raises(F.OverlayBusy) as e:
            E.Engine(str(disk), overlay=str(ov))
        assert time.monotonic() - t0 < 5, "did not fail at once"
        one_line(e, str(ov), f"in use by pid {holder.pid}", "cow.engine")
    finally:
        holder.kill()
        holder.wait()
    with E.Engine(str(disk), overlay=str(ov)):      # a killed holder's lock is gone
        pass


# -- read-only ------------------------------------------------------------------------------

def test_read_only_open_writes_nothing(made, tmp_path):
    disk, ov = made
    before = digest(ov)
    with E.Engine(str(disk), overlay=str(ov), readonly=True) as eng:
        assert eng.readonly and eng.blk_status(1) == AL
        for call in (lambda: eng.pwrite(b"x", 0), lambda: eng.trim(4096, 0),
                     lambda: eng.zero(4096, 0), lambda: eng.blk_write(0, bytes(4096)),
                     lambda: eng.blk_trim(0)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EROFS
        eng.flush()
    assert digest(ov) == before
    with pytest.raises(F.OverlayError) as e:
        E.Engine(str(disk), overlay=str(tmp_path / "missing.cow"), readonly=True)
    one_line(e, "no such overlay")
    assert not (tmp_path / "missing.cow").exists()
    with pytest.raises(ValueError):
        E.Engine(str(disk), overlay=str(ov), readonly=True, cow_on_read=True)


def test_size_is_fixed_for_a_persistent_overlay(made):
    disk, ov = made
    with E.Engine(str(disk), overlay=str(ov)) as eng:
        eng.blk_set_size(eng.size)
        with pytest.raises(OSError) as e:
            eng.blk_set_size(eng.size * 2)
        assert e.value.errno == errno.EOPNOTSUPP


# -- crash safety, in the file ----------------------------------------------------------------

def test_every_mix_of_old_and_new_bitmap_bytes_is_safe(backing_factory, tmp_path):
    """overlay.pxi's argument, checked: take the bitmap as two flushes left it (A, then B), keep
    the data area as later, unflushed writes left it, and mix A's and B's bitmap bytes at random
    (a torn bitmap write at a power cut).  Every block must read what it held at A, at B, or
    now: never anything else (the data area holds each block's latest bytes, or a hole)."""
    disk = tmp_path / "sparse.img"                  # 33800 blocks of 4 KiB: 3 bitmap pages
    with open(disk, "wb") as f:
        f.truncate(33800 * 4096)
        for blk in range(0, 33800, 97):
            f.seek(blk * 4096)
            f.write(random.Random(blk).randbytes(4096))
    ov = tmp_path / "vm.cow"
    eng = E.Engine(str(disk), overlay=str(ov), block_size="4K")
    m = Model(eng, disk)
    bs, nblk = 4096, eng.nr_blocks

    def contents():
        return [zlib.crc32(m.want[b * bs:(b + 1) * bs]) for b in range(nblk)]

    snaps = []
    for _ in range(3):
        for _ in range(1500):
            m.op()
        if len(snaps) < 2:
            eng.flush()
            snaps.append((disk_bitmap(ov), contents()))
    now = contents()
    (bitmap_a, at_a), (bitmap_b, at_b) = snaps
    h = header(ov)
    image = bytearray(read_file(ov))                # as a power cut would find it
    rng = random.Random(3)
    for trial in range(4):
        mixed = bytes(rng.choice(pair) for pair in zip(bitmap_a, bitmap_b))
        image[h.bitmap_offset:h.bitmap_offset + h.bitmap_len] = mixed
        crash = tmp_path / f"crash{trial}.cow"
        crash.write_bytes(image)
        with E.Engine(str(disk), overlay=str(crash), readonly=True) as e2:
            got = read_all(e2)
        for b in range(nblk):
            c = zlib.crc32(got[b * bs:(b + 1) * bs])
            assert c in (at_a[b], at_b[b], now[b]), \
                f"trial {trial}: block {b} reads bytes never written to it"
        crash.unlink()
    eng.close()


def test_flushes_and_writes_from_many_threads(backing_factory, tmp_path):
    disk = backing_factory(8 * MiB)
    ov = tmp_path / "vm.cow"
    eng = E.Engine(str(disk), overlay=str(ov), block_size="4K")
    want = bytearray(read_file(disk))
    errors = []

    def worker(k):
        rng = random.Random(k)
        try:
            for i in range(300):
                blk = rng.randrange(k, eng.nr_blocks, 4)      # each thread its own blocks
                data = rng.randbytes(4096)
                eng.pwrite(data, blk * 4096, fua=(i % 17 == 0))
                want[blk * 4096:(blk + 1) * 4096] = data
                if i % 5 == 0:
                    eng.flush()
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    eng.flush()
    assert decode(disk_bitmap(ov), eng.nr_blocks) == states(eng)
    eng.close()
    with E.Engine(str(disk), overlay=str(ov), readonly=True) as eng:
        assert read_all(eng) == bytes(want)


def test_engines_hold_a_file_backing_against_commits(backing_factory, tmp_path):
    """Every engine over a file backing holds a shared lock on one byte of it, so a commit (an
    exclusive lock on the whole backing) fails while the backing is served, and no engine opens
    while a commit writes.  qemu's readers lock other bytes and coexist with engines; a qemu
    that has the image open makes a commit fail too."""
    disk = backing_factory(1 * MiB)
    eng = E.Engine(str(disk))                       # a temporary overlay holds it too
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", str(disk)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "read 512/512" in r.stdout, r.stdout + r.stderr
    fd = os.open(disk, os.O_RDWR)
    try:
        with pytest.raises(F.OverlayBusy) as e:
            F.lock_backing_for_commit(fd, str(disk))
        one_line(e, str(disk), "in use by this process")
        eng.close()
        sock = tmp_path / "qemu.sock"
        qemu = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", str(sock), str(disk)])
        try:
            from conftest import wait_for_socket
            wait_for_socket(sock, qemu)
            with pytest.raises(F.OverlayBusy) as e:
                F.lock_backing_for_commit(fd, str(disk))
            one_line(e, f"in use by pid {qemu.pid}", "qemu-nbd")
        finally:
            qemu.terminate()
            qemu.wait()
        F.lock_backing_for_commit(fd, str(disk))
        with pytest.raises(F.OverlayBusy) as e:
            E.Engine(str(disk), overlay=str(tmp_path / "vm.cow"))
        one_line(e, "being written", "commit")
        assert not (tmp_path / "vm.cow").exists()
    finally:
        os.close(fd)
