"""A FUSE file system that makes a power cut real, in userspace (issue 21).

It passes everything through to a real folder, and remembers, per file, every write since that
file's last fsync/fdatasync: the bytes each 512-byte sector held at that sync (its durable value)
and every value written to it since, and the file's size at that sync and after each change.
Reads see the latest values, as they would through the page cache.  A power cut (the `cut`
command, after the test has killed whatever used the files) then rewrites each unsynced sector
to one of its possible values, as a disk with a volatile cache may have left it:

* "all":    every unsynced write is lost: each sector and size goes back to its synced value;
* "none":   nothing is lost (what a SIGKILL alone leaves);
* "subset": each sector, independently, keeps its synced value or any value written to it
            since (a disk persists any subset, in any order, a sector at a time); the size is
            any size the file had since its sync.

Carried, with the model above: write (pwrite, and writes that reach FUSE through splice: the
kernel turns them into ordinary WRITEs), truncate, fallocate (a punched hole is a write of
zeroes, unsynced until fsync), fsync and fdatasync (both make the file's data and size durable).
Treated as durable at once: creating, linking, renaming (with renameat2's flags, such as
RENAME_NOREPLACE) and unlinking names, and directory fsync; arm(n, "name") can freeze a link,
unlink or rename as it can a write or a sync.  Locks: no lock handler, so the kernel keeps
POSIX and OFD locks itself, per kernel inode.  libfuse's high-level API gives each name its own
kernel inode, so a lock taken through one hard link does not conflict with an open of another
name of the same file (opens of one name do conflict).  A file unlinked while open is renamed
to .fuse_hidden* in the real folder until closed (libfuse's way).  Every file is opened with
direct_io: the kernel keeps no page cache of its own for it, so what a reader sees after a cut
is what the cut left.

The cut can also come at an exact moment: arm(n) freezes the n-th change or sync from then on,
before it takes effect, until the cut (which loses it).  From a cut until power_on(), every
change and sync fails with EIO, so that nothing a killed process still had in flight lands
after the cut.

Run as `python support_powercut.py REAL MOUNT CONTROL_SOCKET`; `PowerCutFS` (a context
manager) starts it, waits for the mount, sends commands and unmounts."""

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

SECTOR = 512
MODES = ("all", "none", "subset", "subset")  # a subset is the cut that finds ordering bugs
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Dirty:
    """What one file (one real inode) wrote since its last sync."""

    def __init__(self, fd, size):
        self.fd = fd                    # our own descriptor: the file may lose its names
        self.sizes = [size]             # the synced size, then the size after each change
        self.sectors = {}               # sector number -> [synced value, values written since]


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.dirty = {}                 # (st_dev, st_ino) of the real file -> Dirty
        self.stats = {"writes": 0, "syncs": 0, "punches": 0, "cuts": 0}
        self.off = False                # cut, and not yet powered on: every change fails
        self.freeze_in = 0              # >0: the change or sync that brings it to 0 waits
        self.freeze_kind = None         # counting only "change"s or "sync"s, or (None) both
        self.frozen = False             # ... and is waiting for the cut (it never happens)

    def _enter(self, kind):
        """Under the lock, before a change or a sync (kind): EIO once the power is off; the
        armed one freezes until the cut, then fails."""
        counted = self.freeze_kind == kind or (self.freeze_kind is None and kind != "name")
        if not self.off and self.freeze_in > 0 and counted:
            self.freeze_in -= 1
            if self.freeze_in == 0:
                self.frozen = True
                while not self.off:
                    self.cond.wait()
        if self.off:
            raise OSError(errno.EIO, "the power is off")

    def _record(self, fd, first, last, size_before):
        """Before a change to sectors [first, last): note their synced values (the first time)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        d = self.dirty.get(key)
        if d is None:
            d = self.dirty[key] = Dirty(os.dup(fd), size_before)
        if last > first:
            old = os.pread(fd, (last - first) * SECTOR, first * SECTOR)
            old = old.ljust((last - first) * SECTOR, b"\0")
            for s in range(first, last):
                if s not in d.sectors:
                    i = (s - first) * SECTOR
                    d.sectors[s] = [old[i:i + SECTOR]]
        return d

    def change(self, fd, offset, count, op):
        """Run op() (a change of bytes [offset, offset+count) of fd, or of its size) and record
        the sectors' values before and after it."""
        first = offset // SECTOR
        last = (offset + count + SECTOR - 1) // SECTOR
        with self.lock:
            self._enter("change")
            size_before = os.fstat(fd).st_size
            d = self._record(fd, first, last, size_before)
            result = op()
            size_after = os.fstat(fd).st_size
            if last > first:
                new = os.pread(fd, (last - first) * SECTOR, first * SECTOR)
                new = new.ljust((last - first) * SECTOR, b"\0")
                for s in range(first, last):
                    i = (s - first) * SECTOR
                    d.sectors[s].append(new[i:i + SECTOR])
            if size_after != d.sizes[-1]:
                d.sizes.append(size_after)
            return result

    def name(self, op):
        """Run op(), a change of names (link, unlink, rename): durable at once, but it can be
        frozen (arm(n, "name")) or fail once the power is off."""
        with self.lock:
            self._enter("name")
            return op()

    def sync(self, fd):
        st = os.fstat(fd)
        with self.lock:
            self._enter("sync")
            d = self.dirty.pop((st.st_dev, st.st_ino), None)
            self.stats["syncs"] += 1
            if d is not None:
                os.close(d.fd)

    def cut(self, mode, seed):
        """The power cut: every file's unsynced sectors and size take one of their possible
        values (see the module's doc).  Returns counts of what was kept and lost."""
        rng = random.Random(seed)
        kept = lost = 0
        with self.lock:
            for d in self.dirty.values():
                if mode == "all":
                    size = d.sizes[0]
                elif mode == "none":
                    size = d.sizes[-1]
                else:
                    size = rng.choice(d.sizes)
                for s, values in d.sectors.items():
                    if mode == "all":
                        v = values[0]
                    elif mode == "none":
                        v = values[-1]
                    else:
                        v = rng.choice(values)
                    if v == values[-1]:
                        kept += 1
                    else:
                        lost += 1
                        if s * SECTOR < size:
                            os.pwrite(d.fd, v, s * SECTOR)
                os.ftruncate(d.fd, size)
                os.close(d.fd)
            self.dirty.clear()
            self.stats["cuts"] += 1
            frozen, self.frozen, self.freeze_in = self.frozen, False, 0
            self.off = True
            self.cond.notify_all()
        return {"kept": kept, "lost": lost, "frozen": frozen}

    def power_on(self):
        with self.lock:
            self.off = False
        return {}

    def arm(self, n, kind=None):
        with self.lock:
            self.freeze_in, self.freeze_kind = n, kind
        return {}


def serve_control(state, path):
    """One JSON command a line on a Unix socket: {"cut": MODE, "seed": N} or {"stats": 1}."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def handle(conn):
        with conn, conn.makefile("rw") as f:
            for line in f:
                req = json.loads(line)
                if "cut" in req:
                    reply = state.cut(req["cut"], req.get("seed", 0))
                elif "power_on" in req:
                    reply = state.power_on()
                elif "arm" in req:
                    reply = state.arm(req["arm"], req.get("kind"))
                else:
                    with state.lock:
                        reply = dict(state.stats, frozen=state.frozen,
                                     dirty_files=len(state.dirty),
                                     dirty_sectors=sum(len(d.sectors)
                                                       for d in state.dirty.values()))
                f.write(json.dumps(reply) + "\n")
                f.flush()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def make_operations(root, state):
    import mfusepy as fuse

    def real(path):
        return os.path.join(root, path.lstrip("/"))

    class PowerCut(fuse.Operations):
        use_ns = True

        # -- names: passed through, durable at once ----------------------------------------
        def getattr(self, path, fh=None):
            st = os.fstat(fh.fh) if fh is not None else os.lstat(real(path))
            return {k: getattr(st, k) for k in (
                "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")} | {
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns}

        def readdir(self, path, fh):
            out = []
            for name in [".", ".."] + os.listdir(real(path)):
                st = os.lstat(os.path.join(real(path), name))
                out.append((name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
            return out

        def mkdir(self, path, mode):
            os.mkdir(real(path), mode)

        def rmdir(self, path):
            os.rmdir(real(path))

        def unlink(self, path):
            state.name(lambda: os.unlink(real(path)))

        def rename(self, old, new, flags=0):
            state.name(lambda: _rename(real(old), real(new), flags))

        def link(self, target, source):
            state.name(lambda: os.link(real(source), real(target)))

        def symlink(self, target, source):
            os.symlink(source, real(target))

        def readlink(self, path):
            return os.readlink(real(path))

        def chmod(self, path, mode):
            os.chmod(real(path), mode)

        def chown(self, path, uid, gid):
            os.chown(real(path), uid, gid)

        def utimens(self, path, times=None):
            os.utime(real(path), ns=times)

        def statfs(self, path):
            sv = os.statvfs(real(path))
            return {k: getattr(sv, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def fsyncdir(self, path, datasync, fh):
            return 0                    # names are durable at once

        # -- files -------------------------------------------------------------------------
        def open(self, path, fi):
            fi.fh = os.open(real(path), _flags(fi.flags) & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            fi.direct_io = 1
            if fi.flags & os.O_TRUNC:
                state.change(fi.fh, 0, 0, lambda: os.ftruncate(fi.fh, 0))
            return 0

        def create(self, path, mode, fi):
            fi.fh = os.open(real(path), _flags(fi.flags) | os.O_CREAT, mode)
            fi.direct_io = 1
            return 0

        def release(self, path, fh):
            os.close(fh.fh)

        def flush(self, path, fh):
            return 0                    # close is not a sync

        def read(self, path, size, offset, fh):
            return os.pread(fh.fh, size, offset)

        def write(self, path, data, offset, fh):
            state.stats["writes"] += 1
            return state.change(fh.fh, offset, len(data),
                                lambda: os.pwrite(fh.fh, data, offset))

        def truncate(self, path, length, fh=None):
            fd = fh.fh if fh is not None else os.open(real(path), os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                lo, hi = min(size, length), max(size, length)
                state.change(fd, lo, hi - lo, lambda: os.ftruncate(fd, length))
            finally:
                if fh is None:
                    os.close(fd)

        def fallocate(self, path, mode, offset, size, fh):
            if mode & FALLOC_FL_PUNCH_HOLE:
                state.stats["punches"] += 1
            if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
                raise fuse.FuseOSError(errno.EOPNOTSUPP)   # the overlay only punches
            if not mode & FALLOC_FL_PUNCH_HOLE:
                return 0
            state.change(fh.fh, offset, size, lambda: _punch(fh.fh, offset, size))
            return 0

        def fsync(self, path, datasync, fh):
            state.sync(fh.fh)
            return 0

    return PowerCut()


def _flags(flags):
    """A writer's real descriptor reads too: the model reads what a change replaces."""
    if flags & os.O_ACCMODE != os.O_RDONLY:
        flags = flags & ~os.O_ACCMODE | os.O_RDWR
    return flags


def _rename(old, new, flags):
    """rename, or renameat2 with its flags (RENAME_NOREPLACE...), as the caller asked."""
    if not flags:
        return os.rename(old, new)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, old.encode(), -100, new.encode(), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return None


def _punch(fd, offset, count):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main(argv):
    import mfusepy as fuse
    root, mount, control = argv
    state = State()
    threading.Thread(target=serve_control, args=(state, control), daemon=True).start()

    class FUSE(fuse.FUSE):
        def rename_fuse_3(self, old, new, flags):
            # mfusepy drops the flags: a RENAME_NOREPLACE would replace what is at new.
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

    FUSE(make_operations(os.path.abspath(root), state), mount, raw_fi=True,
              foreground=True, use_ino=True, attr_timeout=0,
              entry_timeout=0, negative_timeout=0, fsname="powercut")


class PowerCutFS:
    """The file system mounted at mount over the folder real, in a subprocess, for a with
    block: unmounted (and the process ended) when the block ends, however it ends."""

    def __init__(self, real, mount, control):
        self.real, self.mount, self.control = str(real), str(mount), str(control)
        self.proc = None
        self._sock = None

    def __enter__(self):
        os.makedirs(self.real, exist_ok=True)
        os.makedirs(self.mount, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.real, self.mount, self.control],
            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (os.path.ismount(self.mount) and os.path.exists(self.control)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the power-cut file system did not mount")
            time.sleep(0.05)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(self.control)
        self._f = self._sock.makefile("rw")
        return self

    def _ask(self, req):
        self._f.write(json.dumps(req) + "\n")
        self._f.flush()
        return json.loads(self._f.readline())

    def cut(self, mode, seed=0, stay_off=False):
        """The power cut: mode "all", "none" or "subset".  Whatever used the file system must
        be dead already (SIGKILL and wait); or killed and not yet reaped, with stay_off: then
        every change and sync fails with EIO from the cut on (requests of the dying process
        still in the file system included) until power_on()."""
        r = self._ask({"cut": mode, "seed": seed})
        if not stay_off:
            self.power_on()
        return r

    def power_on(self):
        """After a cut, once whatever used the file system has been reaped."""
        return self._ask({"power_on": 1})

    def arm(self, n, kind=None):
        """Freeze the n-th change or sync from now (write, truncate, punch; fsync, fdatasync)
        before it takes effect, until the cut, which loses it: a cut at an exact moment.
        kind "change" or "sync" counts only those (None: both); "name" counts only links,
        unlinks and renames.  stats() says "frozen" once it waits."""
        return self._ask({"arm": n, "kind": kind})

    def stats(self):
        return self._ask({"stats": 1})

    def __exit__(self, *exc):
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._f.close()
                self._sock.close()
        if os.path.ismount(self.mount):
            r = subprocess.run(["fusermount3", "-u", self.mount], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mount], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)


def load_and_cut(fs, proc, rng, armed, make_clients, counts, modes):
    """Load a server and cut the power under it: start the clients make_clients(killed) makes
    (threads with .ops and .unexpected, which stop counting errors as failures once killed is
    set), wait until the change armed = (kind, n) freezes (up to 5 s; 1 s for a change of
    names, which may never come) or, armed None, for a random moment; kill proc (the server),
    cut (a mode of MODES, recorded in modes), power on once it is reaped, and join the clients:
    none may hang or have failed before the kill.  Adds the cut's lost, kept and frozen and the
    clients' ops to counts; returns the cut's report."""
    if armed:
        fs.arm(armed[1], armed[0])
    killed = threading.Event()     # errors are the test's failure until it is set
    clients = make_clients(killed)
    for c in clients:
        c.start()
    if armed:
        deadline = time.monotonic() + (1 if armed[0] == "name" else 5)
        while not fs.stats()["frozen"] and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(rng.uniform(0.05, 0.6))
    killed.set()
    proc.send_signal(signal.SIGKILL)
    mode = rng.choice(MODES)
    modes.append(mode)
    cut = fs.cut(mode, rng.randrange(1 << 30), stay_off=True)
    proc.wait()                    # what it still had in flight failed
    fs.power_on()
    for k in ("lost", "kept", "frozen"):
        counts[k] += cut[k]
    for c in clients:
        c.join(30)
        assert not c.is_alive(), "a client hung after the kill"
        assert c.unexpected is None, repr(c.unexpected)
        counts["ops"] += c.ops
    return cut


if __name__ == "__main__":
    main(sys.argv[1:])
