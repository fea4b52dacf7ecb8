"""The temporary files a making of an overlay cut short leaves (`.NAME.<hex>.new`: a view's
creation, a fork; cow/overlayfile.py temporary_at), planted by hand beside what the next making
of NAME must leave alone: a fresh one (a making may still be at work), a locked one, a symbolic
link (and what it points at), one of another user (when the tests run as root, who alone can
give a file away), one of another name, and a name that only looks like one.

    with PlantedTemporaries(folder, "a.cow") as planted:   # the locked one, locked meanwhile
        ... make a.cow (a view's creation, a fork) ...
    planted.check()        # the stale one removed, everything else as planted
"""

import os
import time
from pathlib import Path

from cow import overlayfile

CONTENT = b"copied overlay data" * 4096


class PlantedTemporaries:
    def __init__(self, folder, name):
        self.folder = Path(folder)
        old = time.time() - 2 * overlayfile.STALE_TEMPORARY_S
        self.stale = self._plant(f".{name}.0123456789ab.new", old)
        self.held = self._plant(f".{name}.aaaaaaaaaaaa.new", old)
        self.target = self._plant("elsewhere", old)
        self.kept = [self.held, self.target,
                     self._plant(f".{name}.00000000000f.new", time.time()),    # fresh
                     self._plant(".other.cow.0123456789ab.new", old),
                     self._plant(f".{name}.0123456789ab.new.keep", old)]
        if os.geteuid() == 0:
            theirs = self._plant(f".{name}.cccccccccccc.new", old)
            os.chown(theirs, 65534, 65534)
            self.kept.append(theirs)
        self.link = self.folder / f".{name}.bbbbbbbbbbbb.new"
        self.link.symlink_to(self.target)
        self._fd = None

    def _plant(self, name, mtime):
        p = self.folder / name
        p.write_bytes(CONTENT)
        os.utime(p, (mtime, mtime))
        return p

    def __enter__(self):
        self._fd = os.open(self.held, os.O_RDWR)
        overlayfile.lock(self._fd, str(self.held), exclusive=True)    # a making still at work
        return self

    def __exit__(self, *exc):
        os.close(self._fd)

    def check(self):
        assert not self.stale.exists(), f"{self.stale.name} was left"
        gone = [p.name for p in self.kept if not p.exists()]
        assert not gone, f"removed: {gone}"
        assert self.link.is_symlink() and self.target.read_bytes() == CONTENT
