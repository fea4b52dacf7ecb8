"""The persistent overlay file: its on-disk format, and how it is created, opened, checked and locked.

Everything a reader needs to know about the format is in this module; the engine (cow/overlay.pxi)
and the tools (cow/overlay.py) both go through it.  All integers are little-endian.

    offset          size            what
    0               4 KiB           header: two 2 KiB slots (below); the valid one with the higher
                                    sequence number is current, so a header rewrite torn by a
                                    crash leaves the other slot in charge
    4096            bitmap_len,     the bitmap: 2 bits a block, block N in byte N/4 at bit 2*(N%4):
                    padded to 4 KiB 0 not allocated (read the backing), 1 allocated (read the data
                                    area), 3 trimmed (reads as zeroes); 2 never occurs
    data_offset     block_size      block N's data at data_offset + N * block_size (sparse; the
                    per block       last block of a disk whose size is not a multiple of the block
                                    size is short); data_offset is aligned to the block size

A header slot (offsets within the slot):

    0   8   magic b"COW-OVL\\n"
    8   4   format version (2; version 1 is read too)
    12  4   flags: 1 = a commit into the backing was started and has not finished;
                   2 = a reset was started and has not finished
    16  8   sequence number of this slot
    24  8   disk size in bytes
    32  4   block size in bytes (a power of two, 4 KiB to 4 MiB)
    36  4   backing kind: 1 file, 2 block device, 3 NBD URI, 4 command (serving NBD)
    40  8   bitmap offset (4096)
    48  8   bitmap length in bytes, ceil(blocks / 4)
    56  8   data offset
    64  8   backing size in bytes
    72  8   backing modification time (st_mtime_ns; a file only, else 0)
    80  8   creation time of the overlay (ns since the epoch)
    88  4   length of the backing string
    92  8   backing device: a file's st_dev, a block device's own number (st_rdev); else 0
    100 8   backing inode: a file's st_ino; else 0 (0 and 0: not recorded)
    108 ..  the backing: absolute path, URI or command line (UTF-8, at most 1936 bytes)
    2044 4  CRC-32 of bytes 0 to 2043 of the slot

Version 1 had no device and inode: its backing string starts at 92 (at most 1952 bytes).  This
cow writes version 2 whenever it writes a header, so a version-1 file it has served read-write
becomes version 2.  A reader checks the version before anything else and refuses a newer one, so
a cow that reads only version 1 refuses a version-2 file instead of taking its device number for
the start of the backing's name.  What a header records about the backing (size, modification
time, device, inode) can be copied by anyone who can stat that file: it tells a reader whether
the backing it is given is still the one the overlay was made over, never which file to write
(python -m cow.overlay commit writes only into the file its --into names).

The bitmap reaches the file only at a flush (see overlay.pxi for why that is crash-safe), so a
reader of a file that a server holds would see a stale bitmap: every opener takes an OFD lock on
the whole file first, exclusive to write (a server, commit, reset), shared to read (a read-only
server, info, export, fork), and a conflicting opener fails at once, naming the holder's pid when
/proc shows it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import shlex
import stat
import struct
import time
import zlib
from typing import NamedTuple

MAGIC = b"COW-OVL\n"
VERSION = 2
HEADER_SIZE = 4096
SLOT_SIZE = 2048
PAGE = 4096
BITMAP_OFFSET = HEADER_SIZE
FLAG_COMMITTING = 1
FLAG_RESETTING = 2
KNOWN_FLAGS = FLAG_COMMITTING | FLAG_RESETTING

KIND_FILE = 1
KIND_BLOCK_DEVICE = 2
KIND_NBD = 3
KIND_COMMAND = 4
KIND_NAMES = {KIND_FILE: "file", KIND_BLOCK_DEVICE: "block device", KIND_NBD: "NBD",
              KIND_COMMAND: "command"}

_SLOT = struct.Struct("<8sIIQQIIQQQQQQI")  # the fields of both versions (92 bytes)
_FILE_ID = struct.Struct("<QQ")             # version 2: the backing's device and inode
_BACKING_AT = {1: _SLOT.size, 2: _SLOT.size + _FILE_ID.size}
_CRC_AT = SLOT_SIZE - 4
MAX_BACKING_LEN = _CRC_AT - _BACKING_AT[VERSION]
MIN_BLOCK_SIZE = 4096
# The largest block this cow reads or makes.  A partial write to a block not yet in the overlay
# reads, patches and writes the whole block, in a buffer of its size: a file that claims 1 GiB
# blocks made every small write allocate and copy 1 GiB.  4 MiB is twice qcow2's largest cluster
# (2 MiB), and "a block size larger than a few megabytes is not usually a good idea" (nbdkit's
# cow filter).  cow/engine.pyx's MAX_BLOCK_SIZE (--cow-block-size) is this one.
MAX_BLOCK_SIZE = 4 << 20

BACKING_CHANGED_CHOICES = ("refuse", "accept")


class OverlayError(ValueError):
    """The overlay file cannot be used as asked: the message is one line that names the file."""


class OverlayBusy(OverlayError):
    """Another process (or another open in this one) holds the overlay."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclasses.dataclass
class Header:
    disk_size: int
    block_size: int
    backing_kind: int
    backing: str
    backing_size: int
    backing_mtime_ns: int = 0
    flags: int = 0
    seq: int = 1
    created_ns: int = 0
    backing_dev: int = 0    # st_dev of a file, st_rdev of a block device (0: not recorded)
    backing_ino: int = 0    # st_ino of a file (0: not recorded, or a block device)
    version: int = VERSION
    slot: int = -1  # where it was read from (-1: not read)

    # The layout follows from the disk and block sizes.
    @property
    def nr_blocks(self) -> int:
        return (self.disk_size + self.block_size - 1) // self.block_size

    @property
    def bitmap_len(self) -> int:
        return (self.nr_blocks + 3) // 4

    @property
    def bitmap_offset(self) -> int:
        return BITMAP_OFFSET

    @property
    def data_offset(self) -> int:
        return _round_up(BITMAP_OFFSET + _round_up(self.bitmap_len, PAGE), self.block_size)

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.backing_kind, f"kind {self.backing_kind}")

    @property
    def committing(self) -> bool:
        return bool(self.flags & FLAG_COMMITTING)

    @property
    def resetting(self) -> bool:
        return bool(self.flags & FLAG_RESETTING)

    @property
    def file_id(self) -> tuple[int, int] | None:
        """(device, inode) of a file backing, (device number, 0) of a block device, as recorded;
        None if the header records none (version 1, or another kind)."""
        if self.backing_kind == KIND_FILE and self.backing_ino:
            return self.backing_dev, self.backing_ino
        if self.backing_kind == KIND_BLOCK_DEVICE and self.backing_dev:
            return self.backing_dev, 0
        return None

    def pack(self) -> bytes:
        """The slot's bytes, in the layout of self.version (version 1 only to make old files)."""
        raw = os.fsencode(self.backing)
        at = _BACKING_AT[self.version]
        if len(raw) > _CRC_AT - at:
            raise OverlayError(f"the backing's name is {len(raw)} bytes; an overlay records at "
                               f"most {_CRC_AT - at}")
        slot = bytearray(SLOT_SIZE)
        _SLOT.pack_into(slot, 0, MAGIC, self.version, self.flags, self.seq, self.disk_size,
                        self.block_size, self.backing_kind, self.bitmap_offset, self.bitmap_len,
                        self.data_offset, self.backing_size, self.backing_mtime_ns,
                        self.created_ns, len(raw))
        if self.version >= 2:
            _FILE_ID.pack_into(slot, _SLOT.size, self.backing_dev, self.backing_ino)
        slot[at:at + len(raw)] = raw
        struct.pack_into("<I", slot, _CRC_AT, zlib.crc32(slot[:_CRC_AT]))
        return bytes(slot)


def _unpack_slot(path: str, raw: bytes, index: int) -> Header | None:
    """The header in one slot, None if the slot holds no valid one (torn or never written);
    OverlayError for a newer version or fields that cannot be right."""
    if len(raw) < SLOT_SIZE or raw[:8] != MAGIC:
        return None
    version = struct.unpack_from("<I", raw, 8)[0]
    if version > VERSION:
        raise OverlayError(f"{path}: overlay format version {version} is newer than this cow "
                           f"reads (version {VERSION}); use a newer cow")
    if zlib.crc32(raw[:_CRC_AT]) != struct.unpack_from("<I", raw, _CRC_AT)[0]:
        return None
    (_, version, flags, seq, disk_size, block_size, kind, bitmap_offset, bitmap_len, data_offset,
     backing_size, mtime_ns, created_ns, blen) = _SLOT.unpack_from(raw, 0)
    dev, ino = _FILE_ID.unpack_from(raw, _SLOT.size) if version >= 2 else (0, 0)
    at = _BACKING_AT.get(version, _SLOT.size)
    bad = None
    if version < 1:
        bad = f"version {version}"
    elif flags & ~KNOWN_FLAGS:
        bad = f"unknown flags {flags:#x}"
    elif block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        bad = f"block size {block_size}"
    elif block_size > MAX_BLOCK_SIZE:
        raise OverlayError(f"{path}: the overlay's block size is {block_size} bytes; this cow "
                           f"serves blocks of at most {MAX_BLOCK_SIZE >> 20} MiB (a partial "
                           f"write copies a whole block)")
    elif disk_size >= 1 << 63:
        bad = f"disk size {disk_size}"
    elif kind not in KIND_NAMES:
        bad = f"backing kind {kind}"
    elif blen > _CRC_AT - at:
        bad = f"backing name length {blen}"
    if bad:
        raise OverlayError(f"{path}: corrupt overlay header ({bad})")
    h = Header(disk_size=disk_size, block_size=block_size, backing_kind=kind,
               backing=os.fsdecode(raw[at:at + blen]), backing_size=backing_size,
               backing_mtime_ns=mtime_ns, flags=flags, seq=seq, created_ns=created_ns,
               backing_dev=dev, backing_ino=ino, version=version, slot=index)
    if (bitmap_offset, bitmap_len, data_offset) != (h.bitmap_offset, h.bitmap_len, h.data_offset):
        raise OverlayError(f"{path}: corrupt overlay header (layout {bitmap_offset}/{bitmap_len}/"
                           f"{data_offset} does not fit a disk of {disk_size} bytes in blocks of "
                           f"{block_size})")
    return h


def read_header(fd: int, path: str) -> Header:
    """The current header of an open overlay; OverlayError if it is not one, is corrupt, newer or
    truncated."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER_SIZE, 0)
    if raw[:8] != MAGIC and raw[SLOT_SIZE:SLOT_SIZE + 8] != MAGIC:
        what = "an empty file" if size == 0 else "no overlay header"
        raise OverlayError(f"{path}: not a cow overlay ({what})")
    if len(raw) < HEADER_SIZE:
        raise OverlayError(f"{path}: truncated cow overlay ({size} bytes, shorter than its "
                           f"{HEADER_SIZE}-byte header)")
    slots = [_unpack_slot(path, raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE], i) for i in (0, 1)]
    valid = [h for h in slots if h is not None]
    if not valid:
        raise OverlayError(f"{path}: corrupt overlay header (checksum mismatch)")
    h = max(valid, key=lambda h: h.seq)
    if size < h.data_offset:
        raise OverlayError(f"{path}: truncated cow overlay ({size} bytes; its bitmap ends at "
                           f"{h.bitmap_offset + h.bitmap_len} and its data starts at "
                           f"{h.data_offset})")
    return h


def write_header(fd: int, h: Header) -> None:
    """Make h the current header: written (seq + 1), in this cow's format version, into the slot
    that is not current, then synced.  A crash during the write leaves the old header current."""
    h.version = VERSION
    h.seq += 1
    h.slot = 1 - h.slot if h.slot in (0, 1) else 0
    os.pwrite(fd, h.pack(), h.slot * SLOT_SIZE)
    os.fdatasync(fd)


# -- locks ---------------------------------------------------------------------------------------

def _flock(kind: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)   # the whole file


def lock(fd: int, path: str, exclusive: bool) -> None:
    """An OFD lock on the whole file, exclusive or shared; OverlayBusy at once if it conflicts.

    OFD locks belong to the open file: a second open in the same process conflicts too (tests and
    tools open many), and closing some other descriptor of the file does not drop the lock, as it
    would a classic POSIX lock.  F_GETLK cannot name the holder of an OFD lock (l_pid is -1), so
    lock_holders looks through /proc instead."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise OverlayBusy(f"{path}: {in_use_message(fd)}") from None


def lock_holders(fd: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose open of this file holds a lock on it, as far
    as /proc shows them (other users' processes are hidden unless we are root)."""
    st = os.fstat(fd)
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            if pid == me and int(n) == fd:
                continue
            try:
                s = os.stat(f"/proc/{pid}/fd/{n}")
                if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as f:
                    if not any(line.startswith("lock:") for line in f):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            found.append((pid, shlex.join(argv)))
            break
    return found


def in_use_message(fd: int) -> str:
    holders = lock_holders(fd)
    if not holders:
        return "in use by another process (its pid is not visible here)"
    me = os.getpid()
    return "in use by " + ", ".join("this process" if pid == me else f"pid {pid} ({cmd})"
                                    for pid, cmd in holders)


# A cow engine over a file backing holds a shared lock on one byte of it, far past any end, and a
# commit takes an exclusive lock on the whole backing before writing into it: a commit fails while
# any engine (any overlay, temporary or not) serves that backing, and no engine starts while a
# commit writes.  The byte is far from the bytes qemu locks (100 and up), so qemu and cow
# readers do not disturb each other, while a qemu that has the image open (it always holds some
# lock) also makes a commit fail.
BACKING_LOCK_BYTE = 1 << 62


def hold_backing(backing) -> int | None:
    """Take the shared lock on a file backing (an open Backing): returns the descriptor that
    holds it (close it to release), None for an NBD backing.  OverlayBusy while a commit writes
    into the backing."""
    st = backing.fstat()
    if st is None:
        return None
    try:
        fd = os.open(backing.description, os.O_RDONLY | OPEN_FLAGS)
    except OSError:
        return None         # renamed since the Backing opened it: nothing to hold by that name
    try:
        if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return None
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, BACKING_LOCK_BYTE, 1, 0))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            return None     # a file system without locks: nothing to hold
        msg = in_use_message(fd)
        os.close(fd)
        raise OverlayBusy(f"{backing.description}: the backing is being written ({msg}: a "
                          f"python -m cow.overlay commit?)") from None
    return fd


def lock_backing_for_commit(fd: int, path: str) -> None:
    """An exclusive lock on the whole backing, opened for writing; OverlayBusy naming who has it
    open if an engine serves it or qemu uses it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise OverlayBusy(f"{path}: the backing is {in_use_message(fd)}") from None


# -- the backing's identity ----------------------------------------------------------------------

def backing_identity(backing) -> tuple[int, str, int, int]:
    """(kind, name, size, mtime_ns) of an open cow.backing.Backing."""
    if backing.command is not None:
        return KIND_COMMAND, backing.description, backing.size, 0
    if backing.is_nbd:
        return KIND_NBD, backing.description, backing.size, 0
    st = backing.fstat()
    name = os.path.abspath(backing.description)
    if stat.S_ISBLK(st.st_mode):
        return KIND_BLOCK_DEVICE, name, backing.size, 0
    return KIND_FILE, name, backing.size, st.st_mtime_ns


def stat_file_id(st: os.stat_result) -> tuple[int, int]:
    """(device, inode) as a header records them for a backing with this stat: a file's st_dev
    and st_ino, a block device's own number (st_rdev: the node in /dev may be made anew at each
    boot, the device keeps its number) and 0; (0, 0) for anything else."""
    if stat.S_ISBLK(st.st_mode):
        return st.st_rdev, 0
    if stat.S_ISREG(st.st_mode):
        return st.st_dev, st.st_ino
    return 0, 0


def backing_file_id(backing) -> tuple[int, int]:
    """stat_file_id of an open cow.backing.Backing; (0, 0) for an NBD or command backing."""
    st = backing.fstat()
    return (0, 0) if st is None else stat_file_id(st)


class FileIdentity(NamedTuple):
    kind: int
    size: int
    mtime_ns: int       # 0 for a block device
    file_id: tuple[int, int]


def fd_identity(fd: int) -> FileIdentity:
    """The identity of an open file or block device; OSError (EINVAL) for anything else."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return FileIdentity(KIND_BLOCK_DEVICE, os.lseek(fd, 0, os.SEEK_END), 0, stat_file_id(st))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file or block device")
    return FileIdentity(KIND_FILE, st.st_size, st.st_mtime_ns, stat_file_id(st))


def file_identity(path: str) -> FileIdentity:
    """The identity of a file or block device by path (for the tools); OSError."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(errno.EINVAL, "not a regular file or block device")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return fd_identity(fd)
    finally:
        os.close(fd)


def _ns_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 10**9:09d}"


def describe_file_id(kind: int, fid: tuple[int, int]) -> str:
    dev, ino = fid
    if kind == KIND_BLOCK_DEVICE:
        return f"device {os.major(dev)}:{os.minor(dev)}"
    return f"device {os.major(dev)}:{os.minor(dev)}, inode {ino}"


def identity_change(h: Header, kind: int, size: int, mtime_ns: int,
                    fid: tuple[int, int] | None = None) -> str | None:
    """What changed in a file backing since the header recorded it, or None.  fid: the
    (device, inode) of the file at hand, to compare with the header's (when it records them)."""
    if h.backing_kind not in (KIND_FILE, KIND_BLOCK_DEVICE):
        return None
    if size != h.backing_size:
        return f"its size is {size} bytes, was {h.backing_size}"
    if fid is not None and h.file_id is not None and kind == h.backing_kind \
            and fid != h.file_id:
        return f"it is another file ({describe_file_id(kind, fid)}; the overlay recorded " \
               f"{describe_file_id(kind, h.file_id)})"
    if h.backing_kind == KIND_FILE and kind == KIND_FILE and mtime_ns != h.backing_mtime_ns:
        return f"it was modified at {_ns_time(mtime_ns)}, after the overlay recorded " \
               f"{_ns_time(h.backing_mtime_ns)}"
    return None


def shown(text: str) -> str:
    """text for a one-line message: what a crafted header could hold that is not printable
    (a newline, a terminal escape, bytes that are not UTF-8) is shown as an escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape",
                                                      "backslashreplace").decode("ascii")
                   for c in text)


# -- opening -------------------------------------------------------------------------------------
#
# Two callers, two rules.  An overlay the operator names (--overlay FILE, overlay=FILE) is opened
# by its path, a symbolic link followed (the command line is trusted), but it must end at a
# regular file, and it is opened O_NONBLOCK so that a FIFO is refused, not waited on; an empty
# file there becomes a new overlay (mktemp's).  A view (cow.views) is a name a network client
# chose in a folder whose contents nobody vouches for: open_in_dir opens it relative to the
# folder's descriptor, follows no link, never blocks, and serves only a regular file owned by
# this process's user with one link; it never adopts an empty file, and makes new ones atomically
# under a temporary name (create_at).  What it refuses is an OverlayRefused, read nor written.

OPEN_FLAGS = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # no open may block (a FIFO, a device)
MAX_ATTEMPTS = 3    # opens of a view whose name keeps appearing and vanishing, then a refusal


class OverlayRefused(OverlayError):
    """The file at a view's name is not one this server opens: ``why`` says what it is (a
    symbolic link, a FIFO, another user's file...), without its path."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}: not served")
        self.why = why


@dataclasses.dataclass
class OverlayFile:
    """An open, locked overlay: close() releases the lock.  dir_fd and name: where open_in_dir
    found it (abandon() removes it there), else the path is used."""

    path: str
    fd: int
    header: Header
    readonly: bool
    created: bool = False
    pending: Header | None = None   # a header to write once the engine has accepted the file
    dir_fd: int | None = None
    name: str | None = None

    def finish_open(self) -> None:
        """The engine accepted the file: record what changed about the backing (a new path, or
        an identity the user accepted)."""
        if self.pending is not None:
            write_header(self.fd, self.pending)
            self.header, self.pending = self.pending, None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """The engine refused the file: close it, and remove it if this open created it (and the
        name still is this file).  Nothing to do if it is closed already."""
        if self.fd < 0:
            return
        if self.created:
            name, dir_fd = (self.path, None) if self.dir_fd is None else (self.name, self.dir_fd)
            try:
                st = os.fstat(self.fd)
                there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        self.close()


def fsync_dir(path: str) -> None:
    """Make a new name in path's folder durable."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


AT_FDCWD = -100
RENAME_NOREPLACE = 1
_renameat2 = None


def put_in_place(tmp: str, name: str, dir_fd: int = AT_FDCWD) -> None:
    """Give the file at tmp the name name instead, in one step, never replacing anything at name
    (FileExistsError, a dangling symbolic link included; no link is followed): renameat2 with
    RENAME_NOREPLACE.  A crash at any moment leaves tmp or name, one name for the file.  Where the
    file system has no RENAME_NOREPLACE: linkat then unlink, which a crash in between leaves with
    both names (a view's file with two links is not served, so its leftover temporary name must
    then be removed by hand)."""
    global _renameat2
    if _renameat2 is None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        f = getattr(libc, "renameat2", None)
        if f is not None:
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
        _renameat2 = (f, ctypes)
    f, ctypes = _renameat2
    if f is not None:
        if f(dir_fd, os.fsencode(tmp), dir_fd, os.fsencode(name), RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), name)
    os.link(tmp, name, src_dir_fd=None if dir_fd == AT_FDCWD else dir_fd,
            dst_dir_fd=None if dir_fd == AT_FDCWD else dir_fd, follow_symlinks=False)
    os.unlink(tmp, dir_fd=None if dir_fd == AT_FDCWD else dir_fd)


def _initialise(fd: int, h: Header) -> None:
    os.pwrite(fd, h.pack(), 0)
    os.ftruncate(fd, h.data_offset)   # the bitmap area exists (all zeroes: nothing allocated)
    os.fsync(fd)


# A temporary file (temporary_at: of a creation, or of a fork) this much older than now was left
# by one that never finished (a crash or a power cut before it was put in place).
STALE_TEMPORARY_S = 60.0


def _temporary_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(f".{name}.") + r"[0-9a-f]{12}\.new")


def remove_stale_temporaries(dir_fd: int, name: str) -> list[str]:
    """Remove the temporary files that makings of name cut short (temporary_at) left in the
    folder dir_fd: regular files of this user, older than STALE_TEMPORARY_S, whose lock nobody
    holds (a making in progress holds it).  No link is followed.  They hold nothing that is not
    elsewhere: a creation writes only the header before it puts the file in place, a fork a
    copy of an overlay that is still there.  The names removed."""
    pattern = _temporary_pattern(name)
    removed = []
    try:
        entries = [e for e in os.listdir(dir_fd) if pattern.fullmatch(e)]
    except OSError:
        return removed
    for entry in entries:
        try:
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                    or time.time() - st.st_mtime < STALE_TEMPORARY_S:
                continue
            fd = os.open(entry, os.O_RDWR | os.O_NOFOLLOW | OPEN_FLAGS, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                continue
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
            os.unlink(entry, dir_fd=dir_fd)
            removed.append(entry)
        except OSError:
            continue            # locked: a creation still at work; or gone meanwhile
        finally:
            os.close(fd)
    return removed


def temporary_at(dir_fd: int, name: str) -> tuple[int, str]:
    """A new file, to be put in place as name in the folder dir_fd (put_in_place) once written:
    .NAME.<12 hex digits>.new beside it, mode 0600, made with O_EXCL (no link followed) and
    locked (exclusive: remove_stale_temporaries leaves it alone while it is being written, however
    long that takes).  The temporaries of earlier makings of name that never finished are
    removed first.  Returns (its descriptor, its name)."""
    remove_stale_temporaries(dir_fd, name)
    for _ in range(100):
        tmp = f".{name}.{os.urandom(6).hex()}.new"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | OPEN_FLAGS,
                         0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name")
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        lock(fd, tmp, exclusive=True)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp, dir_fd)
        raise
    return fd, tmp


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def create_at(dir_fd: int, name: str, h: Header) -> int:
    """Create the overlay name in the folder dir_fd, locked (exclusive), mode 0600, atomically:
    made under a temporary name beside it (temporary_at), synced, and put in place
    (put_in_place: a rename that fails with FileExistsError on anything already at name, a
    dangling symbolic link included), so no half-made file is ever seen there, nothing else is
    written, and a crash leaves the file with one name (a temporary .NAME.*.new, or name).
    Returns its descriptor."""
    fd, tmp = temporary_at(dir_fd, name)
    try:
        _initialise(fd, h)
        put_in_place(tmp, name, dir_fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp, dir_fd)
        raise
    os.fsync(dir_fd)
    return fd


def create(path: str, h: Header) -> int:
    """create_at for a path: the overlay at path, made atomically in its folder.  Returns its
    descriptor; FileExistsError if something is at path (a dangling symbolic link included)."""
    folder = os.path.dirname(os.path.abspath(path))
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return create_at(dir_fd, os.path.basename(path), h)
    finally:
        os.close(dir_fd)


def new_header(backing, block_size: int) -> Header:
    kind, name, size, mtime_ns = backing_identity(backing)
    dev, ino = backing_file_id(backing)
    return Header(disk_size=size, block_size=block_size, backing_kind=kind, backing=name,
                  backing_size=size, backing_mtime_ns=mtime_ns, backing_dev=dev,
                  backing_ino=ino, created_ns=time.time_ns())


def open_locked(path: str, *, exclusive: bool) -> tuple[int, Header]:
    """Open an existing overlay for the tools: locked, header read and checked.  OverlayError
    (one line) for anything that is not a usable overlay."""
    try:
        fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise OverlayError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OverlayError(f"{path}: not a regular file")
        lock(fd, path, exclusive)
        return fd, read_header(fd, path)
    except BaseException:
        os.close(fd)
        raise


@dataclasses.dataclass
class Recorded:
    """What an overlay records about its backing, for a server that is given no BACKING."""

    kind: int
    backing: str                # the path, URI or command line, as recorded
    untrusted: str | None       # why this file may not choose a backing, or None

    @property
    def command(self) -> bool:
        return self.kind == KIND_COMMAND


def untrusted(st: os.stat_result) -> str | None:
    """Why a file with this stat may have been written by someone other than this process's
    user (then what it records must not choose a backing to serve), or None."""
    me = os.geteuid()
    if st.st_uid != me:
        return f"it belongs to {_user(st.st_uid)}, not to this process's user {_user(me)}"
    if st.st_mode & 0o022:
        return f"others may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _user(uid: int) -> str:
    import pwd
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def recorded_backing(path: str) -> Recorded:
    """What an existing overlay records about its backing, and whether the file may choose it
    (Recorded.untrusted; the caller refuses a recorded command in any case).  Reads the header
    without the lock (the engine takes it after).  OverlayError for a file that is not an
    overlay; OSError (FileNotFoundError...) from the open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OverlayError(f"{path}: not a regular file")
        h = read_header(fd, path)
    finally:
        os.close(fd)
    return Recorded(h.backing_kind, h.backing, untrusted(st))


def _blocking(fd: int) -> None:
    """A regular file opened O_NONBLOCK: clear the flag (it means nothing for one, but the
    engine's splice and sendfile need not wonder)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def refusal(st: os.stat_result) -> str | None:
    """Why a file found at a view's name (its lstat, or the fstat of its open) is not served, or
    None: only a regular file owned by this process's user, with one link and not empty is."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this server's user (uid {os.geteuid()})"
    if st.st_nlink != 1:
        return f"a file with {st.st_nlink} links (a view's file has one name)"
    if st.st_size == 0:
        return "an empty file (views are made by the server, never adopted)"
    return None


def open_at(dir_fd: int, name: str, path: str, *, readonly: bool) -> int:
    """Open the existing file name in the folder dir_fd (path: how messages name it) under the
    rules for views: no link followed, no blocking, refusal() before and after the open (the same
    file both times).  FileNotFoundError if nothing is there; OverlayRefused; OverlayError."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    why = refusal(st)
    if why:
        raise OverlayRefused(path, why)
    try:
        fd = os.open(name, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW | OPEN_FLAGS,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OverlayRefused(path, "a symbolic link") from None
        if e.errno == errno.EISDIR:
            raise OverlayRefused(path, "a directory") from None
        raise OverlayError(f"{path}: {e.strerror}") from None
    try:
        now = os.fstat(fd)
        why = refusal(now)
        if not why and (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            why = "replaced while it was opened"
        if why:
            raise OverlayRefused(path, why)
        _blocking(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_in_dir(dir_fd: int, name: str, backing, *, path: str, create: bool,
                new_block_size: int | None, readonly: bool,
                backing_changed: str = "refuse") -> OverlayFile:
    """open_for_engine for a view: the overlay name in the folder dir_fd (path: how messages name
    it), opened by open_at's rules (it keeps its own block size), or, if nothing is there and
    create, made by create_at (in blocks of new_block_size, None: 64 KiB).

    A name that keeps changing (a link planted and removed while the view is made) is tried
    MAX_ATTEMPTS times, then refused.  Raises OverlayRefused, OverlayError (one line naming
    path), OverlayBusy."""
    if backing_changed not in BACKING_CHANGED_CHOICES:
        raise ValueError(f"invalid backing_changed {backing_changed!r}: expected one of "
                         f"{', '.join(BACKING_CHANGED_CHOICES)}")
    for _ in range(MAX_ATTEMPTS):
        try:
            fd = open_at(dir_fd, name, path, readonly=readonly)
        except FileNotFoundError:
            if readonly or not create:
                raise OverlayError(f"{path}: no such overlay") from None
        else:
            return _open_checked(fd, path, backing, None, readonly, backing_changed,
                                 adopt_empty=False, where=(dir_fd, name))
        h = new_header(backing, new_block_size or 65536)
        try:
            fd = create_at(dir_fd, name, h)
        except FileExistsError:
            continue            # something appeared at the name: open it, by the same rules
        except OSError as e:
            raise OverlayError(f"{path}: cannot create the overlay: {e.strerror}") from None
        h.slot = 0
        return OverlayFile(path, fd, h, readonly, created=True, dir_fd=dir_fd, name=name)
    raise OverlayRefused(path, f"it kept changing while it was opened ({MAX_ATTEMPTS} tries)")


def open_for_engine(path: str, backing, *, block_size: int | None, readonly: bool,
                    backing_changed: str = "refuse") -> OverlayFile:
    """Open (or create) the overlay at path for an engine over backing (an open Backing).

    The path is the operator's (--overlay FILE): a symbolic link is followed, but it must end at
    a regular file (a FIFO or a device is refused, never waited on); an empty file becomes a new
    overlay; a dangling link is refused.
    block_size: None to take the file's (64 KiB for a new file); else it must match the file's.
    readonly: open for reading with a shared lock, never create nor write.
    backing_changed: "refuse" a file backing whose size or modification time differs from what
    the overlay recorded, or "accept" it (and record its new identity).
    Raises OverlayError with one line that names path; path is left untouched."""
    if backing_changed not in BACKING_CHANGED_CHOICES:
        raise ValueError(f"invalid backing_changed {backing_changed!r}: expected one of "
                         f"{', '.join(BACKING_CHANGED_CHOICES)}")
    path = os.fspath(path)
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | OPEN_FLAGS
    for _ in range(MAX_ATTEMPTS):
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            if os.path.islink(path):
                raise OverlayError(f"{path}: a symbolic link to {os.readlink(path)}, which does "
                                   f"not exist") from None
            if readonly:
                raise OverlayError(f"{path}: no such overlay (a read-only open does not create "
                                   f"one)") from None
        except OSError as e:
            raise OverlayError(f"{path}: {e.strerror}") from None
        h = new_header(backing, block_size or 65536)
        try:
            fd = create(path, h)
        except FileExistsError:
            continue            # made by someone else meanwhile: open theirs
        except OSError as e:
            raise OverlayError(f"{path}: cannot create the overlay: {e.strerror}") from None
        h.slot = 0
        return OverlayFile(path, fd, h, readonly, created=True)
    else:
        raise OverlayError(f"{path}: it kept appearing and vanishing while it was opened")
    return _open_checked(fd, path, backing, block_size, readonly, backing_changed,
                         adopt_empty=not readonly, where=None)


def _open_checked(fd, path, backing, block_size, readonly, backing_changed, *, adopt_empty,
                  where) -> OverlayFile:
    """An overlay just opened (fd, owned from here): a regular file, not the backing; locked,
    its header read and checked against backing (or, if adopt_empty and it is empty, made a new
    overlay)."""
    dir_fd, name = where if where is not None else (None, None)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OverlayError(f"{path}: not a regular file")
        _blocking(fd)
        bst = backing.fstat()
        if bst is not None and (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            raise OverlayError(f"{path}: this is the backing itself; the overlay must be "
                               f"another file")
        lock(fd, path, exclusive=not readonly)
        if adopt_empty and os.fstat(fd).st_size == 0:
            # An empty file (mktemp's, touch's) the operator named becomes a new overlay.
            h = new_header(backing, block_size or 65536)
            _initialise(fd, h)
            h.slot = 0
            return OverlayFile(path, fd, h, readonly, created=False)
        h = read_header(fd, path)
        pending = _check_against(path, h, backing, block_size, readonly, backing_changed)
        return OverlayFile(path, fd, h, readonly, pending=pending, dir_fd=dir_fd, name=name)
    except BaseException:
        os.close(fd)
        raise


def _check_against(path, h: Header, backing, block_size, readonly, backing_changed):
    """Refuse an overlay that does not fit this backing and block size; return the header to
    record once the engine accepts the file (None: nothing to record)."""
    if h.committing:
        raise OverlayError(f"{path}: a commit into the backing was interrupted; finish it with: "
                           f"{commit_command(path)}")
    if h.resetting:
        raise OverlayError(f"{path}: a reset was interrupted; finish it with: "
                           f"{reset_command(path)}")
    if block_size is not None and block_size != h.block_size:
        raise OverlayError(f"{path}: the overlay's block size is {h.block_size}, not {block_size} "
                           f"(omit --cow-block-size to use the overlay's)")
    kind, name, size, mtime_ns = backing_identity(backing)
    if size != h.disk_size:
        raise OverlayError(f"{path}: the backing {name} is {size} bytes, but the overlay is for a "
                           f"disk of {h.disk_size} bytes")
    if (kind in (KIND_FILE, KIND_BLOCK_DEVICE)) != (h.backing_kind in (KIND_FILE, KIND_BLOCK_DEVICE)):
        raise OverlayError(f"{path}: the overlay was made over {h.kind_name} {h.backing}, not "
                           f"over a {KIND_NAMES[kind]} such as {name}")
    # Device and inode too (version 2): a copy made with cp -p has the size and time of the
    # original, but it is not the file the overlay was made over.
    dev, ino = backing_file_id(backing)
    change = identity_change(h, kind, size, mtime_ns, (dev, ino))
    if change and backing_changed != "accept":
        what = f"the backing {name} changed since the overlay was made" if name == h.backing \
            else f"the overlay was made over {h.backing}, and {name} differs from it"
        raise OverlayError(f"{path}: {what} ({change}); its changes may no longer fit it. If "
                           f"you know they still do, accept it with "
                           f"--overlay-backing-changed=accept")
    if readonly or (not change and h.version == VERSION and (kind, name, mtime_ns, dev, ino)
                    == (h.backing_kind, h.backing, h.backing_mtime_ns, h.backing_dev,
                        h.backing_ino)):
        return None
    # Record the backing as served (a version-1 file gains its device and inode).
    new = dataclasses.replace(h, backing_kind=kind, backing=name, backing_size=size,
                              backing_mtime_ns=mtime_ns, backing_dev=dev, backing_ino=ino)
    return new


def commit_command(path: str) -> str:
    """The command that commits the overlay at path, as every hint names it: the backing is a
    placeholder the operator fills in, never the name the header records (a header is no
    authority on which file to write)."""
    return f"python -m cow.overlay commit {shown(shlex.quote(path))} --into BACKING --yes"


def reset_command(path: str) -> str:
    """The command that finishes an interrupted reset of the overlay at path."""
    return f"python -m cow.overlay reset {shown(shlex.quote(path))} --yes"


# -- the bitmap, for the tools -------------------------------------------------------------------

NOT_ALLOCATED, ALLOCATED, TRIMMED = 0, 1, 3
_LO = int.from_bytes(b"\x55" * PAGE * 16, "little")


def read_bitmap(fd: int, h: Header) -> bytes:
    raw = os.pread(fd, h.bitmap_len, h.bitmap_offset)
    if len(raw) != h.bitmap_len:
        raise OverlayError("truncated overlay bitmap")
    return raw


def bitmap_counts(bits: bytes, path: str = "overlay") -> tuple[int, int]:
    """(allocated, trimmed) blocks; OverlayError if a block has the state 2, which never occurs."""
    alloc = trimmed = 0
    step = PAGE * 16
    for at in range(0, len(bits), step):
        x = int.from_bytes(bits[at:at + step], "little")
        lo = x & _LO
        hi = (x >> 1) & _LO
        both = lo & hi
        if hi & ~lo:
            raise OverlayError(f"{path}: corrupt overlay bitmap (invalid block state near block "
                               f"{at * 4})")
        t = both.bit_count()
        trimmed += t
        alloc += lo.bit_count() - t
    return alloc, trimmed


_RUN = re.compile(rb"\x55+|\xff+|[^\x00]")


def bitmap_runs(bits: bytes, nr_blocks: int):
    """Yield (first, end, state) for the runs of allocated and of trimmed blocks, in order and
    merged (not-allocated blocks are skipped quickly: they are most of a typical bitmap)."""
    cur = None
    for m in _RUN.finditer(bits):
        i = m.start()
        run = m.group()
        if run[0] in (0x55, 0xFF) and len(run) > 1 or run in (b"\x55", b"\xff"):
            pieces = [(i * 4, min(m.end() * 4, nr_blocks), ALLOCATED if run[0] == 0x55 else TRIMMED)]
        else:
            pieces = []
            byte = run[0]
            for k in range(4):
                state = (byte >> (2 * k)) & 3
                if state and i * 4 + k < nr_blocks:
                    pieces.append((i * 4 + k, i * 4 + k + 1, state))
        for first, end, state in pieces:
            if cur is not None and cur[1] == first and cur[2] == state:
                cur = (cur[0], end, state)
            else:
                if cur is not None:
                    yield cur
                cur = (first, end, state)
    if cur is not None:
        yield cur
