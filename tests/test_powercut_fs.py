"""The power-cut file system's own tests (tests/support_powercut.py): what a cut keeps and
loses, through the mount, with the system calls the overlay makes."""

import ctypes
import errno
import fcntl
import os
import struct

import pytest

from support_powercut import PowerCutFS

SECTOR = 512
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@pytest.fixture
def fs(tmp_path):
    with PowerCutFS(tmp_path / "real", tmp_path / "mnt", tmp_path / "control") as fs:
        fs.path = tmp_path / "mnt"
        fs.real_path = tmp_path / "real"
        yield fs
    assert not os.path.ismount(tmp_path / "mnt")


def new_file(fs, name="f", content=b""):
    fd = os.open(fs.path / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    if content:
        os.pwrite(fd, content, 0)
    os.fsync(fd)
    return fd


def test_a_write_not_synced_is_gone_after_a_cut(fs):
    fd = new_file(fs, content=b"a" * 4096)
    os.pwrite(fd, b"b" * 4096, 0)
    os.pwrite(fd, b"c" * 100, 8000)                  # past the synced end: the size grows
    assert os.pread(fd, 4096, 0) == b"b" * 4096       # read back before the cut, as cached
    assert os.fstat(fd).st_size == 8100
    os.close(fd)
    assert fs.cut("all") == {"kept": 0, "lost": 8 + 1, "frozen": False}
    assert (fs.path / "f").read_bytes() == b"a" * 4096
    assert (fs.real_path / "f").read_bytes() == b"a" * 4096


def test_a_synced_write_stays(fs):
    fd = new_file(fs, content=b"a" * 4096)
    os.pwrite(fd, b"b" * 1000, 100)
    os.fdatasync(fd)
    os.pwrite(fd, b"c" * 512, 3584)                   # this one is not synced
    os.close(fd)
    fs.cut("all")
    assert (fs.path / "f").read_bytes() == b"a" * 100 + b"b" * 1000 + b"a" * 2996


def test_no_cut_loses_nothing(fs):
    fd = new_file(fs, content=b"a" * 4096)
    os.pwrite(fd, b"b" * 4096, 2048)
    os.close(fd)
    assert fs.cut("none") == {"kept": 8, "lost": 0, "frozen": False}
    assert (fs.path / "f").read_bytes() == b"a" * 2048 + b"b" * 4096


def test_a_random_subset_keeps_whole_sectors_only(fs):
    old = bytes(range(256)) * 64                      # 16 KiB, 32 sectors
    fd = new_file(fs, content=old)
    os.pwrite(fd, b"\xb1" * 10000, 300)               # partial first and last sectors
    os.pwrite(fd, b"\xb2" * 3000, 5000)               # a second version of some of them
    os.close(fd)
    seen = set()
    for seed in range(8):
        if seed:                                      # the same writes again, then a cut
            fd = os.open(fs.path / "f", os.O_RDWR)
            os.pwrite(fd, old, 0)
            os.fsync(fd)
            os.pwrite(fd, b"\xb1" * 10000, 300)
            os.pwrite(fd, b"\xb2" * 3000, 5000)
            os.close(fd)
        fs.cut("subset", seed)
        got = (fs.path / "f").read_bytes()
        assert len(got) == len(old)
        after1 = old[:300] + b"\xb1" * 10000 + old[10300:]
        after2 = after1[:5000] + b"\xb2" * 3000 + after1[8000:]
        for s in range(len(old) // SECTOR):
            piece = got[s * SECTOR:(s + 1) * SECTOR]
            versions = [v[s * SECTOR:(s + 1) * SECTOR] for v in (old, after1, after2)]
            assert piece in versions, f"seed {seed}: sector {s} is a mix"
            seen.add((s, versions.index(piece)))
    changed = {s for s in range(len(old) // SECTOR) if old[s * SECTOR:(s + 1) * SECTOR] !=
               (old[:300] + b"\xb1" * 10000)[s * SECTOR:(s + 1) * SECTOR]}
    assert {v for s, v in seen if s in changed} == {0, 1, 2}, "the cuts never varied"


def test_a_punched_hole_reads_zeroes_and_is_a_write_until_synced(fs):
    fd = new_file(fs, content=b"d" * 16384)
    assert libc.fallocate(fd, 3, 4096, 8192) == 0, os.strerror(ctypes.get_errno())
    assert os.pread(fd, 16384, 0) == b"d" * 4096 + bytes(8192) + b"d" * 4096
    assert fs.stats()["punches"] == 1
    fs.cut("all")                                     # fd stays open across the cut
    assert os.pread(fd, 16384, 0) == b"d" * 16384
    assert libc.fallocate(fd, 3, 4096, 8192) == 0
    os.fsync(fd)
    fs.cut("all")
    assert os.pread(fd, 16384, 0) == b"d" * 4096 + bytes(8192) + b"d" * 4096
    assert os.stat(fs.real_path / "f").st_blocks * 512 <= 8192, "no hole in the real file"
    os.close(fd)


def test_a_write_through_splice_is_carried(fs):
    fd = new_file(fs, content=b"a" * 65536)
    r, w = os.pipe()
    try:
        os.write(w, b"s" * 65536)
        assert os.splice(r, fd, 65536, offset_dst=4096) == 65536
    finally:
        os.close(r)
        os.close(w)
    assert os.pread(fd, 70000, 0) == b"a" * 4096 + b"s" * 65536
    assert fs.stats()["dirty_sectors"] == 128
    fs.cut("all")
    assert os.pread(fd, 70000, 0) == b"a" * 65536
    os.close(fd)


def test_an_ofd_lock_conflicts_across_two_opens(fs):
    fd1 = new_file(fs)
    fd2 = os.open(fs.path / "f", os.O_RDWR)
    lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    fcntl.fcntl(fd1, fcntl.F_OFD_SETLK, lock)
    with pytest.raises(BlockingIOError):
        fcntl.fcntl(fd2, fcntl.F_OFD_SETLK, lock)
    os.close(fd1)
    fcntl.fcntl(fd2, fcntl.F_OFD_SETLK, lock)         # released with its open
    os.close(fd2)


def test_overlay_creation_link_unlink_and_folder_sync(fs):
    """What cow/overlayfile.py create_at does: a temporary name, written and fsynced, linked
    into place, unlinked, the folder fsynced; then writes through the kept descriptor."""
    dfd = os.open(fs.path, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(".vm.cow.1.new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=dfd)
    os.pwrite(fd, b"h" * 4096, 0)
    os.ftruncate(fd, 65536)
    os.fsync(fd)
    os.link(".vm.cow.1.new", "vm.cow", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.unlink(".vm.cow.1.new", dir_fd=dfd)
    os.fsync(dfd)
    os.close(dfd)
    assert os.fstat(fd).st_ino == os.stat(fs.path / "vm.cow").st_ino
    os.pwrite(fd, b"x" * 512, 65536)                  # not synced: the file grew
    os.close(fd)
    assert os.path.getsize(fs.path / "vm.cow") == 65536 + 512
    fs.cut("all")
    assert sorted(os.listdir(fs.path)) == ["vm.cow"]
    assert (fs.path / "vm.cow").read_bytes() == b"h" * 4096 + bytes(65536 - 4096)


def test_an_armed_cut_freezes_a_write_and_loses_it(fs):
    """arm(n): the n-th change from then on waits, untouched, until the cut; after the cut
    every change fails until the power is back."""
    import threading
    fd = new_file(fs, content=b"a" * 4096)
    fs.arm(2)
    os.pwrite(fd, b"b" * 512, 0)                      # the first: done, not synced
    result = []
    t = threading.Thread(target=lambda: result.append(_try(os.pwrite, fd, b"c" * 512, 512)))
    t.start()
    for _ in range(200):
        if fs.stats()["frozen"]:
            break
        t.join(0.05)
    assert fs.stats()["frozen"] and t.is_alive(), "the second write did not freeze"
    assert fs.cut("none", stay_off=True) == {"kept": 1, "lost": 0, "frozen": True}
    t.join(10)
    assert result == [errno.EIO]
    assert _try(os.pwrite, fd, b"d" * 512, 1024) == errno.EIO
    assert _try(os.fsync, fd) == errno.EIO
    fs.power_on()
    assert os.pread(fd, 4096, 0) == b"b" * 512 + b"a" * 3584
    os.close(fd)


def _try(f, *args):
    try:
        f(*args)
    except OSError as e:
        return e.errno
    return 0


def test_an_armed_cut_freezes_a_link_and_counts_only_names(fs):
    """arm(n, "name"): the n-th link, unlink or rename waits until the cut (writes and syncs
    are not counted, and a plain arm(n) does not count names); the name change never
    happens."""
    import threading
    fd = new_file(fs, ".a.new", content=b"a" * 512)
    fs.arm(1, "name")
    os.pwrite(fd, b"b" * 512, 0)                      # not counted
    os.fsync(fd)
    t = threading.Thread(target=lambda: _try(os.link, fs.path / ".a.new", fs.path / "a"))
    t.start()
    for _ in range(200):
        if fs.stats()["frozen"]:
            break
        t.join(0.05)
    assert fs.stats()["frozen"] and t.is_alive(), "the link did not freeze"
    fs.cut("all", stay_off=True)
    t.join(10)
    assert _try(os.unlink, fs.path / ".a.new") == errno.EIO
    fs.power_on()
    assert sorted(os.listdir(fs.path)) == [".a.new"]
    fs.arm(2)                                         # changes and syncs only
    assert _try(os.link, fs.path / ".a.new", fs.path / "a") == 0
    assert _try(os.unlink, fs.path / ".a.new") == 0
    assert not fs.stats()["frozen"]
    fs.arm(0)
    os.close(fd)


def test_rename_noreplace_is_carried(fs):
    """renameat2's RENAME_NOREPLACE reaches the real folder (mfusepy alone drops the flags,
    which would replace the file at the new name)."""
    libc_ = ctypes.CDLL(None, use_errno=True)

    def rename2(old, new, flags):
        if libc_.renameat2(-100, bytes(old), -100, bytes(new), ctypes.c_uint(flags)) != 0:
            return ctypes.get_errno()
        return 0

    os.close(new_file(fs, "x", b"x" * 512))
    os.close(new_file(fs, "y", b"y" * 512))
    RENAME_NOREPLACE = 1
    assert rename2(fs.path / "x", fs.path / "y", RENAME_NOREPLACE) == errno.EEXIST
    assert (fs.path / "y").read_bytes() == b"y" * 512
    assert rename2(fs.path / "x", fs.path / "z", RENAME_NOREPLACE) == 0
    assert sorted(os.listdir(fs.path)) == ["y", "z"]
    assert (fs.path / "z").read_bytes() == b"x" * 512
