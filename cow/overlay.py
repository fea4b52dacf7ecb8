"""``python -m cow.overlay``: tools for a persistent overlay (``python -m cow.server --overlay FILE``).

    info FILE [--json]        what FILE holds, and whether its backing is still the one it recorded
    export FILE OUT.qcow2     a qcow2 holding just the changes, over the original backing
    commit FILE --into BACKING --yes
                              write the changes into BACKING, which must be the file FILE was
                              made over, then empty FILE
    reset FILE --yes          discard every change
    fork FILE NEW             a second overlay with the same changes (reflink or sparse copy)

Each works on an overlay that no server holds (the overlay's lock says so at once), and on the
format of cow/overlayfile.py: it reads the header and bitmap itself, so info works without the
backing.  export leaves qcow2 to qemu: qemu-img makes the image, and qemu-nbd (started by
libnbd, on socket activation) writes the changed blocks into it.

commit writes only into the file the operator names with --into: an overlay file may have been
planted or changed by someone else, and what its header records about the backing (path, size,
modification time, device, inode) can be copied from any file by anyone who can stat it, so the
header is only a check against naming the wrong file, never the choice of which file to write.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import shlex
import stat
import sys
import textwrap
import time

from cow import overlayfile as F

PROG = "python -m cow.overlay"
CHUNK = 32 * 1024 * 1024            # bytes per read, write or NBD request
QCOW2_MAX_CLUSTER = 2 * 1024 * 1024
FICLONE = 0x40049409                # linux/fs.h: _IOW(0x94, 9, int)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


class ToolError(Exception):
    """A failure to report as one line (the message names the file)."""


class _Progress:
    """How far a long job is, on stderr as qemu-img convert -p shows it: ``(12.34/100%)``,
    rewritten in place on a terminal, or a line per whole percent elsewhere.  Shown on a
    terminal, or anywhere when asked (-p); never on stdout, which carries the result."""

    def __init__(self, total: int, asked: bool):
        self.total = max(total, 1)
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.show = asked or self.tty
        self.last = -1
        self.last_time = 0.0

    def __enter__(self):
        self._print(0)
        return self

    def add(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        self._print(self.done * 10000 // self.total)

    def _print(self, hundredths: int) -> None:
        if not self.show or hundredths == self.last:
            return
        now = time.monotonic()
        if self.tty:
            if hundredths < 10000 and now - self.last_time < 0.1:
                return
            sys.stderr.write(f"\r    ({hundredths / 100:.2f}/100%)")
        elif hundredths // 100 == self.last // 100:
            return
        else:
            sys.stderr.write(f"    ({hundredths // 100}.00/100%)\n")
        sys.stderr.flush()
        self.last, self.last_time = hundredths, now

    def __exit__(self, *exc):
        if self.show and self.tty:
            sys.stderr.write("\n")     # the line is the progress's own; what follows is not
            sys.stderr.flush()


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _backing_status(h: F.Header) -> tuple[str, str]:
    """("unchanged" | "changed" | "missing" | "unchecked", a phrase for people)."""
    if h.backing_kind not in (F.KIND_FILE, F.KIND_BLOCK_DEVICE):
        return "unchecked", f"{h.kind_name} backing: not checked"
    try:
        ident = F.file_identity(h.backing)
    except OSError as e:
        return "missing", f"cannot be opened: {e.strerror}"
    change = F.identity_change(h, ident.kind, ident.size, ident.mtime_ns, ident.file_id)
    if change:
        return "changed", f"changed since recorded: {change}"
    return "unchanged", "unchanged since recorded"


def _check_backing(path: str, h: F.Header, backing_changed: str) -> None:
    status, phrase = _backing_status(h)
    if status == "missing":
        raise ToolError(f"{path}: the backing {F.shown(h.backing)} {phrase}")
    if status == "changed" and backing_changed != "accept":
        raise ToolError(f"{path}: the backing {F.shown(h.backing)} {phrase}; if you know the "
                        f"overlay still fits it, add --backing-changed=accept")


def _refuse_interrupted_commit(path: str, h: F.Header) -> None:
    if h.committing:
        raise ToolError(f"{path}: a commit into the backing was interrupted; finish it with: "
                        f"{F.commit_command(path)}")


def _refuse_interrupted_reset(path: str, h: F.Header) -> None:
    if h.resetting:
        raise ToolError(f"{path}: a reset was interrupted (some changes are discarded, some "
                        f"not); finish it with: {F.reset_command(path)}")


def _runs(fd: int, h: F.Header):
    bits = F.read_bitmap(fd, h)
    F.bitmap_counts(bits, h.backing and "overlay")  # refuse a corrupt bitmap before acting on it
    return list(F.bitmap_runs(bits, h.nr_blocks))


def _blocks_bytes(h: F.Header, first: int, end: int) -> tuple[int, int]:
    """(offset, count) in the disk of blocks [first, end), clipped to the disk's end."""
    off = first * h.block_size
    return off, min(end * h.block_size, h.disk_size) - off


def _runs_bytes(h: F.Header, runs) -> int:
    return sum(_blocks_bytes(h, first, end)[1] for first, end, _ in runs)


def _chunks(h: F.Header, first: int, end: int):
    """(offset, count) pieces of blocks [first, end) of at most CHUNK bytes, whole blocks."""
    per = max(1, CHUNK // h.block_size)
    for b in range(first, end, per):
        yield _blocks_bytes(h, b, min(end, b + per))


# -- info ----------------------------------------------------------------------------------------

def info(path: str) -> dict:
    fd, h = F.open_locked(path, exclusive=False)
    try:
        alloc, trimmed = F.bitmap_counts(F.read_bitmap(fd, h), path)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    status, phrase = _backing_status(h)
    fid = h.file_id
    # Would python -m cow.server --overlay FILE, given no BACKING, serve the one recorded?
    if h.backing_kind == F.KIND_COMMAND:
        not_by_itself = "a recorded command runs only when it is given after --"
    else:
        not_by_itself = F.untrusted(st)
    return {
        "file": os.path.abspath(path),
        "format_version": h.version,
        "backing": {"kind": h.kind_name, "name": h.backing, "size": h.backing_size,
                    "mtime_ns": h.backing_mtime_ns or None,
                    "device": f"{os.major(fid[0])}:{os.minor(fid[0])}" if fid else None,
                    "inode": fid[1] if fid and h.backing_kind == F.KIND_FILE else None,
                    "status": status, "status_text": phrase,
                    "used_when_not_named": not_by_itself is None,
                    "why_not_used_when_not_named": not_by_itself},
        "disk_size": h.disk_size,
        "block_size": h.block_size,
        "blocks": h.nr_blocks,
        "allocated_blocks": alloc,
        "trimmed_blocks": trimmed,
        "changed_bytes": min(alloc * h.block_size, h.disk_size),
        "file_size": st.st_size,
        "bytes_on_disk": st.st_blocks * 512,
        "data_offset": h.data_offset,
        "created_ns": h.created_ns,
        "commit_interrupted": h.committing,
        "reset_interrupted": h.resetting,
    }


def _print_info(d: dict) -> None:
    b = d["backing"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["created_ns"] / 1e9))
    where = ""
    if b["device"]:
        where = f", device {b['device']}" + (f", inode {b['inode']}" if b["inode"] else "")
    rows = [
        ("backing", f"{F.shown(b['name'])} ({b['kind']}{where}, {b['size']} bytes; "
                    f"{b['status_text']})"),
        ("disk size", f"{d['disk_size']} bytes ({_human(d['disk_size'])})"),
        ("block size", f"{d['block_size']} bytes"),
        ("blocks", f"{d['blocks']}: {d['allocated_blocks']} allocated, {d['trimmed_blocks']} "
                   f"trimmed, {d['blocks'] - d['allocated_blocks'] - d['trimmed_blocks']} "
                   f"unchanged"),
        ("changed", f"{_human(d['changed_bytes'])} written, "
                    f"{_human(min(d['trimmed_blocks'] * d['block_size'], d['disk_size']))} "
                    f"trimmed"),
        ("on disk", f"{_human(d['bytes_on_disk'])} used (file size {d['file_size']} bytes)"),
        ("created", created),
    ]
    if not b["used_when_not_named"]:
        file = F.shown(shlex.quote(d["file"]))
        how = f"--overlay {file} -- {F.shown(b['name'])}" if b["kind"] == "command" \
            else f"BACKING --overlay {file}"
        rows.append(("serve with", f"python -m cow.server {how} ({b['why_not_used_when_not_named']}"
                                   f": a server given no BACKING refuses this file)"))
    if d["commit_interrupted"]:
        rows.append(("state", f"a commit was interrupted: finish it with "
                              f"{F.commit_command(d['file'])}"))
    if d["reset_interrupted"]:
        rows.append(("state", f"a reset was interrupted: finish it with "
                              f"{F.reset_command(d['file'])}"))
    print(f"{d['file']}: cow overlay, format version {d['format_version']}")
    for k, v in rows:
        print(f"  {k + ':':12} {v}")


# -- export --------------------------------------------------------------------------------------

def export(path: str, out: str, backing_changed: str = "refuse", progress: bool = False) -> dict:
    """Make OUT a qcow2 image over the original backing (raw) holding just the changed blocks:
    allocated blocks as data (all-zero ones as zero clusters), trimmed blocks as zero clusters."""
    import subprocess

    nbd = _libnbd()
    fd, h = F.open_locked(path, exclusive=False)
    try:
        _refuse_interrupted_commit(path, h)
        _refuse_interrupted_reset(path, h)
        if h.backing_kind == F.KIND_COMMAND:
            # A qcow2's backing is a file or a URI that qemu opens itself: it cannot start a
            # command.  A self-contained copy of the view is one qemu-img convert away.
            raise ToolError(f"{path}: its backing is a command ({F.shown(h.backing)}), which a "
                            f"qcow2 cannot name as its backing file; for a self-contained qcow2 "
                            f"of the view, serve it (python -m cow.server --overlay "
                            f"{F.shown(shlex.quote(path))} -r -- COMMAND) and run qemu-img "
                            f"convert -O qcow2 on its URI")
        _check_backing(path, h, backing_changed)
        runs = _runs(fd, h)
        if os.path.lexists(out):
            raise ToolError(f"{out}: already exists; remove it or choose another name")
        cluster = min(h.block_size, QCOW2_MAX_CLUSTER)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            f"cluster_size={cluster}", "-u", "-F", "raw", "-b", h.backing, out,
                            str(h.disk_size)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ToolError(f"{out}: qemu-img create failed: {r.stderr.strip()}")
        stats = {"data_bytes": 0, "zero_bytes": 0}
        try:
            with _Progress(_runs_bytes(h, runs), progress) as shown:
                _fill_qcow2(fd, h, runs, out, stats, nbd, shown)
        except BaseException:
            os.unlink(out)
            raise
    finally:
        os.close(fd)
    return {"out": os.path.abspath(out), "backing": h.backing, **stats}


def _libnbd():
    """libnbd's Python bindings, the nbd module: Debian's python3-libnbd (Fedora's too).  No
    registry has them (the nbd on PyPI is an unrelated notebook diff tool), so the package
    cannot declare them: a Python without them gets one line."""
    where = ("install python3-libnbd (Debian, Ubuntu, Fedora) and run this with /usr/bin/python3 "
             "or from a venv made with --system-site-packages")
    try:
        import nbd
    except ImportError as e:
        raise ToolError(f"export needs libnbd's Python bindings, which {sys.executable} cannot "
                        f"import ({e}): {where}") from None
    if not hasattr(nbd, "NBD"):
        raise ToolError(f"export needs libnbd's Python bindings, and the nbd module "
                        f"{sys.executable} imports ({nbd.__file__}) is another package's (the nbd "
                        f"on PyPI is a notebook diff tool): pip uninstall nbd, then {where}")
    return nbd


def _fill_qcow2(fd, h, runs, out, stats, nbd, progress):
    # The image is opened without its backing: every write below covers whole clusters (a
    # cluster is the block size, or divides it), so qemu never needs the backing's bytes, and
    # the export works even while an NBD backing is offline.
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": os.path.abspath(out)}})
    h_nbd = nbd.NBD()
    try:
        h_nbd.connect_systemd_socket_activation(
            ["qemu-nbd", "-f", "qcow2", "--discard=unmap", "--cache=writeback",
             f"json:{spec}"])
    except nbd.Error as e:
        raise ToolError(f"{out}: cannot start qemu-nbd on it: {e}") from None
    try:
        for first, end, state in runs:
            for off, count in _chunks(h, first, end):
                if state == F.TRIMMED:
                    h_nbd.zero(count, off)      # may trim: zero clusters over the backing
                    stats["zero_bytes"] += count
                else:
                    data = os.pread(fd, count, h.data_offset + off)
                    data += bytes(count - len(data))    # past the file's end: zeroes
                    _write_blocks(h_nbd, h.block_size, off, data, stats)
                progress.add(count)
        h_nbd.flush()
        h_nbd.shutdown()
    except nbd.Error as e:
        raise ToolError(f"{out}: writing through qemu-nbd failed: {e}") from None
    finally:
        del h_nbd                       # closes the connection; libnbd stops qemu-nbd


def _write_blocks(h_nbd, bs, off, data, stats):
    """Write data at off, whole blocks that read as zeroes as zero clusters, the rest as data,
    one request per run of each."""
    n = len(data)
    b = 0
    while b < n:
        zero = data.count(0, b, min(n, b + bs)) == min(bs, n - b)
        e = b + bs
        while e < n and (data.count(0, e, min(n, e + bs)) == min(bs, n - e)) == zero:
            e += bs
        e = min(e, n)
        if zero:
            h_nbd.zero(e - b, off + b)
            stats["zero_bytes"] += e - b
        else:
            h_nbd.pwrite(data[b:e], off + b)
            stats["data_bytes"] += e - b
        b = e


# -- commit --------------------------------------------------------------------------------------

def _punch(fd: int, offset: int, count: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) == 0


def _copy_range(src: int, dst: int, count: int, src_off: int, dst_off: int,
                progress: _Progress | None = None) -> None:
    """copy_file_range (a reflink or a server-side copy where the file system has one), else
    read and write."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, CHUNK), src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                               errno.EBADF):
                raise
            n = 0
        if n == 0:                      # unsupported, or the source ends: plain copy
            data = os.pread(src, min(count, CHUNK), src_off)
            data += bytes(min(count, CHUNK) - len(data))
            os.pwrite(dst, data, dst_off)
            n = len(data)
        count -= n
        src_off += n
        dst_off += n
        if progress is not None:
            progress.add(n)


def _empty(fd: int, h: F.Header, **header_changes) -> None:
    """Forget every change: the bitmap first (synced), then the header, then the data.  Never the
    data first: a crash in between would leave allocated bits over punched (zero) data."""
    for off in range(0, h.bitmap_len, CHUNK):
        os.pwrite(fd, bytes(min(CHUNK, h.bitmap_len - off)), h.bitmap_offset + off)
    os.fdatasync(fd)
    for k, v in header_changes.items():
        setattr(h, k, v)
    F.write_header(fd, h)
    os.ftruncate(fd, h.data_offset)
    os.fsync(fd)


def _open_target(path: str, into: str) -> int:
    """The file --into names, opened for writing: never through a symbolic link, never anything
    but a regular file or a block device (nothing else is even opened)."""
    try:
        st = os.lstat(into)
    except OSError as e:
        raise ToolError(f"{path}: --into {into}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ToolError(f"{path}: --into {into} is a symbolic link (to {os.readlink(into)}); "
                        f"name the file itself")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ToolError(f"{path}: --into {into} is not a regular file or block device")
    try:
        # O_NOFOLLOW: a link put in its place since the lstat is refused too (ELOOP).
        return os.open(into, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ToolError(f"{path}: --into {into} is a symbolic link; name the file "
                            f"itself") from None
        raise ToolError(f"{path}: cannot open --into {into} for writing: {e.strerror}") from None


def _check_target(path: str, h: F.Header, into: str, bfd: int,
                  backing_changed: str) -> F.FileIdentity:
    """Refuse unless the open --into is the file the overlay was made over.

    Always: a file or block device as the overlay recorded, of the overlay's disk size.  Which
    file: the device and inode the header records; a version-1 header records none, so there
    --into must be the file that the path it records names.  Unchanged since: its modification
    time, except after an interrupted commit, which itself wrote into the file and so moved its
    time to an instant nothing recorded can predict (a commit never changes the device, inode or
    size: it writes in place, within the size).  --backing-changed=accept passes a file that
    is not the one recorded or was modified since, never a link, another kind or size."""
    try:
        ident = F.fd_identity(bfd)
    except OSError:
        raise ToolError(f"{path}: --into {into} is not a regular file or block device") from None
    if ident.kind != h.backing_kind:
        raise ToolError(f"{path}: the overlay was made over a {h.kind_name}; --into {into} is a "
                        f"{F.KIND_NAMES[ident.kind]}")
    if ident.size != h.disk_size:
        raise ToolError(f"{path}: --into {into} is {ident.size} bytes; the overlay is for a disk "
                        f"of {h.disk_size} bytes")
    accept = backing_changed == "accept"
    recorded = F.shown(h.backing)
    if h.file_id is not None:
        if ident.file_id != h.file_id and not accept:
            raise ToolError(f"{path}: --into {into} is not the file the overlay was made over "
                            f"({F.describe_file_id(ident.kind, ident.file_id)}; it recorded "
                            f"{recorded}, {F.describe_file_id(h.backing_kind, h.file_id)}). If "
                            f"it is that file, moved to another file system, add "
                            f"--backing-changed=accept")
    elif not accept:
        try:
            named = F.stat_file_id(os.stat(h.backing))
        except OSError:
            named = None
        if named != ident.file_id:
            raise ToolError(f"{path}: --into {into} is not {recorded}, the file the overlay "
                            f"records (a version-1 overlay records no device and inode: --into "
                            f"must name that file)")
    if not h.committing:
        change = F.identity_change(h, ident.kind, ident.size, ident.mtime_ns)
        if change and not accept:
            raise ToolError(f"{path}: --into {into} changed since the overlay recorded it "
                            f"({change}); if you know the overlay still fits it, add "
                            f"--backing-changed=accept")
    return ident


def commit(path: str, into: str, backing_changed: str = "refuse",
           progress: bool = False) -> dict:
    """Write the overlay's changes into into (the operator's name for the backing), then empty
    the overlay.  Refused, with nothing written, unless into is the file the overlay was made
    over (_check_target)."""
    fd, h = F.open_locked(path, exclusive=True)
    try:
        if h.backing_kind not in (F.KIND_FILE, F.KIND_BLOCK_DEVICE):
            raise ToolError(f"{path}: commit writes into a file or block device backing; this "
                            f"overlay's backing is {h.kind_name} {F.shown(h.backing)} (use "
                            f"export instead)")
        _refuse_interrupted_reset(path, h)
        finishing = h.committing
        runs = _runs(fd, h)
        bfd = _open_target(path, into)
        try:
            _check_target(path, h, into, bfd, backing_changed)
            F.lock_backing_for_commit(bfd, into)
            ident = _check_target(path, h, into, bfd, backing_changed)   # now held
            is_file = ident.kind == F.KIND_FILE
            # From here until the end, a crash says so, and the header names the file being
            # written as the operator did.
            h.flags |= F.FLAG_COMMITTING
            h.backing = os.path.abspath(into)
            h.backing_dev, h.backing_ino = ident.file_id
            F.write_header(fd, h)
            written = zeroed = 0
            with _Progress(_runs_bytes(h, runs), progress) as shown:
                for first, end, state in runs:
                    off, count = _blocks_bytes(h, first, end)
                    if state == F.TRIMMED:
                        if not (is_file and _punch(bfd, off, count)):
                            for o, c in _chunks(h, first, end):
                                os.pwrite(bfd, bytes(c), o)
                        zeroed += count
                        shown.add(count)
                    else:
                        _copy_range(fd, bfd, count, h.data_offset + off, off, shown)
                        written += count
            os.fsync(bfd)
            st = os.fstat(bfd)
        finally:
            os.close(bfd)
        _empty(fd, h, flags=h.flags & ~F.FLAG_COMMITTING, backing_size=ident.size,
               backing_mtime_ns=st.st_mtime_ns if is_file else 0)
    finally:
        os.close(fd)
    return {"backing": h.backing, "written_bytes": written, "trimmed_bytes": zeroed,
            "finished_interrupted": finishing}


# -- reset ---------------------------------------------------------------------------------------

def reset(path: str) -> dict:
    fd, h = F.open_locked(path, exclusive=True)
    try:
        _refuse_interrupted_commit(path, h)
        finishing = h.resetting
        alloc, trimmed = F.bitmap_counts(F.read_bitmap(fd, h), path)
        changes = {}
        # Empty, the overlay fits any backing of its size: record the backing as it is now.
        if h.backing_kind in (F.KIND_FILE, F.KIND_BLOCK_DEVICE):
            try:
                ident = F.file_identity(h.backing)
                if ident.size == h.disk_size and ident.kind == h.backing_kind:
                    changes = {"backing_size": ident.size, "backing_mtime_ns": ident.mtime_ns,
                               "backing_dev": ident.file_id[0], "backing_ino": ident.file_id[1]}
            except OSError:
                pass
        # Marked first, as a commit is: the bitmap may span many sectors, and a crash while it
        # is zeroed may keep any of them, so until _empty has synced it the header says so.
        h.flags |= F.FLAG_RESETTING
        F.write_header(fd, h)
        _empty(fd, h, flags=h.flags & ~F.FLAG_RESETTING, **changes)
    finally:
        os.close(fd)
    return {"discarded_blocks": alloc, "discarded_trims": trimmed,
            "finished_interrupted": finishing}


# -- fork ----------------------------------------------------------------------------------------

def fork(path: str, new: str) -> dict:
    fd, h = F.open_locked(path, exclusive=False)
    try:
        if os.path.lexists(new):
            raise ToolError(f"{new}: already exists; remove it or choose another name")
        try:
            dir_fd = os.open(os.path.dirname(os.path.abspath(new)),
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ToolError(f"{new}: cannot create it: {e.strerror}") from None
        try:
            how, copied = _copy_into_place(fd, dir_fd, os.path.basename(new), new)
        finally:
            os.close(dir_fd)
    finally:
        os.close(fd)
    return {"new": os.path.abspath(new), "method": how, "copied_bytes": copied}


def _copy_into_place(fd: int, dir_fd: int, name: str, new: str) -> tuple[str, int]:
    """Copy the file fd into a temporary beside name in the folder dir_fd (F.temporary_at: one
    that a fork cut short leaves is removed by a later fork or creation of that name), sync it
    and put it in place in one step (NEW may be a view's file); how, and the bytes copied."""
    try:
        tfd, tmp = F.temporary_at(dir_fd, name)
    except OSError as e:    # (its message would name the temporary file, not NEW)
        raise ToolError(f"{new}: cannot create it: {e.strerror}") from None
    placed = False
    try:
        try:
            fcntl.ioctl(tfd, FICLONE, fd)
            how, copied = "reflink", 0
        except OSError:
            how, copied = "sparse copy", _sparse_copy(fd, tfd)
        os.fsync(tfd)
        F.put_in_place(tmp, name, dir_fd)
        placed = True
    except FileExistsError:
        raise ToolError(f"{new}: already exists; remove it or choose another name") from None
    finally:
        os.close(tfd)
        if not placed:
            os.unlink(tmp, dir_fd=dir_fd)
    os.fsync(dir_fd)
    return how, copied


def _sparse_copy(src: int, dst: int) -> int:
    """Copy the data of src into dst, leaving its holes as holes; the bytes copied."""
    size = os.fstat(src).st_size
    pos = copied = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            break
        hole = os.lseek(src, data, os.SEEK_HOLE)
        _copy_range(src, dst, hole - data, data, data)
        copied += hole - data
        pos = hole
    os.ftruncate(dst, size)
    return copied


# -- the command line ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description=textwrap.fill(
                    "Tools for an overlay kept by python -m cow.server --overlay FILE. Each "
                    "refuses an overlay that a server holds. See COMMAND --help.", 78),
                epilog="examples:\n"
                       f"  {PROG} info vm.cow\n"
                       f"  {PROG} export vm.cow changes.qcow2\n"
                       f"  {PROG} fork vm.cow experiment.cow\n"
                       f"  {PROG} reset experiment.cow --yes\n"
                       f"  {PROG} commit vm.cow --into disk.img --yes\n")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=_Parser)

    def add(name, help, example, description):
        return sub.add_parser(name, help=help, description=textwrap.fill(description, 78),
                              epilog=f"example:\n  {PROG} {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = add("info", "what FILE holds", "info vm.cow --json",
            "Show the overlay's backing (and whether it changed since), disk and block size, "
            "blocks allocated and trimmed, and the space the file uses.  Needs no backing.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s = add("export", "a qcow2 of the changes, over the original backing",
            "export vm.cow changes.qcow2",
            "Write OUT, a qcow2 image whose backing file is the overlay's backing (format raw) "
            "and which holds only the changed blocks (trimmed ones as zero clusters): it reads "
            "as the served view.  The overlay is left as it is.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("out", metavar="OUT.qcow2")
    s.add_argument("-p", "--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal (on a "
                        "terminal it is shown anyway)")
    s.add_argument("--backing-changed", choices=("refuse", "accept"), default="refuse",
                   help="when the file backing changed since the overlay recorded it")
    s = add("commit", "write the changes into the backing, then empty FILE",
            "commit vm.cow --into disk.img --yes",
            "Write every changed block into BACKING, a file or block device (opened for "
            "writing here only), then empty the overlay.  You name BACKING: the overlay's "
            "header does not choose what is written (anyone who can stat a file can copy its "
            "size, time, device and inode into a header); it only checks that BACKING is the "
            "file the overlay was made over: its device and inode, size, and (unless a commit "
            "was interrupted) modification time, and never a symbolic link.  This changes the "
            "backing for good: every other overlay made over it no longer fits it.  Refused "
            "while anything (a cow server, a qemu) has the backing open.  An interrupted "
            "commit is finished by running it again.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--into", metavar="BACKING",
                   help="the backing to write into: the file the overlay was made over, e.g. "
                        "--into disk.img")
    s.add_argument("--yes", action="store_true", help="really write into the backing")
    s.add_argument("-p", "--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal (on a "
                        "terminal it is shown anyway)")
    s.add_argument("--backing-changed", choices=("refuse", "accept"), default="refuse",
                   help="when BACKING is not the file the overlay recorded (another device or "
                        "inode, say after a move to another file system) or was modified "
                        "since: refuse (default), or accept and commit into it")
    s = add("reset", "discard every change", "reset vm.cow --yes",
            "Empty the overlay: every block reads the backing again, and the space is given "
            "back.  The overlay then records the backing as it is now.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--yes", action="store_true", help="really discard the changes")
    s = add("fork", "a second overlay with the same changes", "fork vm.cow experiment.cow",
            "Copy the overlay into NEW, so that two servers can take the two apart from here.  "
            "A reflink where the file system has one (btrfs, XFS), else a sparse copy of the "
            "data alone.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("new", metavar="NEW")
    return p


def _header_now(path: str) -> F.Header | None:
    """path's header as an interrupted command left it (read without the lock), or None where
    it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            return F.read_header(fd, path)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def _after_interrupt(args) -> str:
    """What an interrupted command left, and what to run next."""
    if args.command == "export":
        if os.path.lexists(args.out):   # (an existing OUT is refused before any work)
            return f"; remove the incomplete {args.out} and run the export again"
        return f"; {args.out} was not made (run the export again)"
    if args.command == "reset":
        h = _header_now(args.file)
        if h is not None and h.resetting:
            return (f"; {args.file} is partly reset and says so: run the same command again "
                    f"to finish the reset")
        return ""
    if args.command != "commit":
        return ""
    h = _header_now(args.file)
    if h is None:
        return ""
    if h.committing:
        return (f"; {args.into} is partly written and {args.file} says so: run the same "
                f"command again to finish the commit")
    return "; nothing was committed"


def _finished(d: dict, what: str) -> str:
    """The words that open the report of a commit or reset that finished one interrupted."""
    return f"finished the {what} that was interrupted: " if d["finished_interrupted"] else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "info":
            d = info(args.file)
            if args.json:
                print(json.dumps(d, indent=2))
            else:
                _print_info(d)
        elif args.command == "export":
            d = export(args.file, args.out, args.backing_changed, args.progress)
            print(f"{d['out']}: {_human(d['data_bytes'])} of data and {_human(d['zero_bytes'])} "
                  f"of zeroes over {d['backing']} (raw)")
        elif args.command == "commit":
            if args.into is None:
                raise ToolError(f"{args.file}: commit writes into the backing for good, into "
                                f"the file you name: {F.commit_command(args.file)}")
            if not args.yes:
                raise ToolError(f"{args.file}: commit writes into {args.into} for good; add "
                                f"--yes to do it")
            d = commit(args.file, args.into, args.backing_changed, args.progress)
            print(f"{d['backing']}: {_finished(d, 'commit')}{_human(d['written_bytes'])} "
                  f"written, {_human(d['trimmed_bytes'])} trimmed; {args.file} is now empty")
        elif args.command == "reset":
            if not args.yes:
                raise ToolError(f"{args.file}: reset discards every change; add --yes to do it")
            d = reset(args.file)
            print(f"{args.file}: {_finished(d, 'reset')}{d['discarded_blocks']} changed and "
                  f"{d['discarded_trims']} trimmed blocks discarded")
        elif args.command == "fork":
            d = fork(args.file, args.new)
            print(f"{d['new']}: forked from {args.file} ({d['method']}"
                  + (f", {_human(d['copied_bytes'])} copied)" if d["method"] != "reflink"
                     else ")"))
    except (ToolError, F.OverlayError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:            # info | head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
