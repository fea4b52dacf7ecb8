"""Many writable views of one backing: a view per export name, opened on use, closed when idle.

    views = ViewSet(Backing(path), directory="/var/lib/cow/views")   # or temporary="keep"
    view = views.acquire("ci-42")        # opens (or creates) DIR/ci-42.cow; view.engine serves it
    ...                                  # every connection to "ci-42" gets the same view
    views.release(view)                  # the last one out flushes and closes it

A view is an Engine over the shared backing (one Backing, opened once, passed to every engine)
and its own overlay: a persistent overlay file ``DIR/NAME.cow`` (the format of ``--overlay``,
cow/overlayfile.py), or a temporary one.  A view no client holds costs nothing: no open file, no
bitmap.  It is opened when its first client arrives and flushed and closed when its last one
leaves (a temporary view with ``temporary="keep"`` stays open until close_all, as nbdkit's cow
filter keeps one overlay per export name; with ``"discard"`` its changes go with its last
client).

Names come from the network: only ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most MAX_NAME bytes, so a
name is never a path, never hidden, never an option, and maps to exactly one file.  Everything a
view refuses is a ViewError whose ``kind`` says why (a bad name, no such view, the cap, or the
view cannot be opened now): the server (cow/server/) turns it into the NBD reply a client
understands, the nbdkit shim into an errno.

Files: the folder's contents are not trusted (another local user, or a copied-in file, may have
planted anything there).  The folder is opened once, and every view file is opened relative to
that descriptor, following no link and never blocking (cow.overlayfile.open_in_dir): only a
regular file owned by this process's user, with one link, is served; anything else at a view's
name (a link, a FIFO, a device, a folder, another user's file, a hard-linked or empty file) is
refused, with one line in the log that names the file and why, and none of it is listed.

Concurrency: a view is OPENING, OPEN or CLOSING.  A client that finds it OPENING or CLOSING waits
until it settles, then joins the open view or opens it again once closed, so that a client
arriving while the last one leaves never sees a half-closed view, and the file's lock is never
taken twice; it waits at most settle_timeout seconds, then is refused.  Opening and closing
(file creation, fsync, the final flush) run outside the set's lock: other names open and close
meanwhile.

What reaches a client (a ViewError's message) names the view, never a server path: the log
has the detail.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import threading
import time

from cow import overlayfile
from cow import protocol as P
from cow.backing import Backing
from cow.engine import Engine

log = logging.getLogger("cow.views")

MAX_NAME = 128                      # bytes (and characters: the set is ASCII)
SUFFIX = ".cow"                     # DIR/NAME.cow
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TEMPORARY_MODES = ("keep", "discard")
# The default cap on views (cow.server --max-exports, the shim's max-exports=): a view open, and
# every kept temporary view, holds two descriptors (its file, its lock on the backing) and its
# bitmap (disk size / block size / 4 bytes: 4 MiB for a 1 TiB disk in 64 KiB blocks), and every
# view may grow to the disk's size on disk.  128 views hold at most 256 descriptors, a quarter of
# the usual limit of 1024.  0 (given explicitly) means no cap.
DEFAULT_MAX_VIEWS = 128
# How long a client waits for a view that another is opening or closing, at most.
SETTLE_TIMEOUT = 30.0

# ViewError kinds
BAD_NAME = "bad-name"               # not a name this server accepts (never a view)
NO_SUCH_VIEW = "no-such-view"       # it does not exist and will not be created (-r, no default)
LIMIT = "limit"                     # a new view beyond max_views
UNAVAILABLE = "unavailable"         # exists, but cannot be opened now (busy, corrupt, I/O error)


class ViewError(Exception):
    """A view that will not be served; ``kind`` is one of the kinds above, the message one line
    for the client."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def name_problem(name: object) -> str | None:
    """Why name cannot be a view's name, or None if it can."""
    if not isinstance(name, str):
        return "an export name is a string"
    if name == "":
        return "the empty name is not a view"
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "an export name must be UTF-8"
    if len(raw) > MAX_NAME:
        return f"a view name is at most {MAX_NAME} bytes, not {len(raw)}"
    if not _NAME.fullmatch(name):
        if name[0] in "._-":
            return "a view name starts with a letter or a digit"
        return ("a view name has only letters, digits, '.', '_' and '-' (ASCII; no '/', no "
                "spaces)")
    return None


def directory_problem(directory: str, *, create: bool) -> str | None:
    """Make the views' folder (mode 0700) if create and it is missing; why it cannot hold
    views, or None if it can.  Without create (a read-only server) it must exist."""
    if not create:
        return None if os.path.isdir(directory) else "no such directory (with -r no view is made)"
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create it: {e.strerror}"
    if not os.path.isdir(directory):
        return "not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable (views are made there)"
    return None


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


OPENING, OPEN, CLOSING, CLOSED = "opening", "open", "closing", "closed"


@dataclasses.dataclass(eq=False)
class View:
    """One name's view.  ``engine`` serves it while it is OPEN; ``clients`` hold it."""

    name: str
    engine: Engine | None = None
    clients: int = 0
    state: str = OPEN
    created: bool = False           # its overlay file was made by this open

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def block_size(self) -> int:
        return self.engine.block_size


@dataclasses.dataclass(frozen=True)
class ViewInfo:
    """What a client may learn of a view without opening it (NBD_OPT_INFO, NBD_OPT_LIST)."""

    name: str
    exists: bool
    block_size: int
    description: str


class ViewSet:
    """The views of one backing.

    backing: an open Backing, shared by every view (the caller closes it, after close_all()).
    directory: keep each view in directory/NAME.cow (persistent); or temporary="keep"|"discard"
    for temporary overlays (in engine_kwargs' tmpdir).  readonly: open existing views read-only
    and create none.  max_views: most views that may exist (0: no cap); a new name beyond it is
    refused.  default: the view the empty name "" means (None: "" is refused).
    engine_kwargs: the rest of Engine's options (block_size applies to new views only: an
    existing overlay keeps its own).  remove_unchanged: remove a view's file again at its close
    when this server created it and nothing was ever written to it (the nbdkit shim: nbdkit opens
    the plugin for NBD_OPT_INFO as for NBD_OPT_GO, so an INFO would otherwise create the view).
    settle_timeout: most seconds a client waits for a view another one is opening or closing.
    """

    _dir_fd = -1

    def __init__(self, backing: Backing, *, directory: str | None = None,
                 temporary: str | None = None, readonly: bool = False, max_views: int = 0,
                 default: str | None = None, engine_kwargs: dict | None = None,
                 remove_unchanged: bool = False, settle_timeout: float = SETTLE_TIMEOUT):
        if (directory is None) == (temporary is None):
            raise ValueError("give exactly one of directory and temporary")
        if temporary is not None and temporary not in TEMPORARY_MODES:
            raise ValueError(f"temporary must be one of {TEMPORARY_MODES}, not {temporary!r}")
        if temporary is not None and readonly:
            raise ValueError("read-only temporary views would all be the backing itself")
        if default is not None and (why := name_problem(default)):
            raise ValueError(f"default view {default!r}: {why}")
        if max_views < 0:
            raise ValueError("max_views is a number >= 0")
        if not settle_timeout > 0:
            raise ValueError("settle_timeout is a number of seconds > 0")
        self.backing = backing
        self.directory = None if directory is None else os.path.abspath(directory)
        self.temporary = temporary
        self.readonly = readonly
        self.max_views = max_views
        self.default = default
        self.remove_unchanged = remove_unchanged
        self.settle_timeout = settle_timeout
        kw = dict(engine_kwargs or {})
        for key in ("overlay", "readonly"):
            if key in kw:
                raise ValueError(f"engine_kwargs: {key} is the view set's to choose")
        if self.directory is not None and "tmpdir" in kw:
            raise ValueError("engine_kwargs: tmpdir is for temporary views")
        self.engine_kwargs = kw
        self.size = backing.size
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)    # a view finished opening or closing
        self._views: dict[str, View] = {}
        self._known: set[str] | None = None     # names with a file in directory (lazily)
        self._changed: dict[str, tuple[int, int, int]] = {}  # name -> (bytes, ino, mtime_ns)
        self._warned: dict[str, str] = {}       # name -> the refusal last logged for it
        self._warn_lock = threading.Lock()
        self._cap_logged = False    # the cap's refusals were logged since a view was last made
        self._closed = False
        if self.directory is not None:
            # The operator's folder (a link to it is followed); from here on every view file
            # is found relative to it, whatever happens to the path.
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __del__(self):
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    # -- names and what exists -----------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The view a requested export name means ("" is the default view); ViewError if none."""
        if name == "":
            if self.default is None:
                raise ViewError(NO_SUCH_VIEW, "this server has a view per export name and no "
                                              "default view: ask for a view by name")
            return self.default
        why = name_problem(name)
        if why:
            raise ViewError(BAD_NAME, f"invalid view name: {why}")
        return name

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def _lstat(self, name: str) -> os.stat_result | None:
        """What is at name's file (no link followed), None if nothing; ViewError if that cannot
        be told, or if it is something this server does not serve."""
        try:
            st = os.stat(name + SUFFIX, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._not_served(name, overlayfile.OverlayError(
                f"{self.path(name)}: {os.strerror(e.errno)}")) from None
        why = overlayfile.refusal(st)
        if why:
            raise self._not_served(name, overlayfile.OverlayRefused(self.path(name), why))
        return st

    def _not_served(self, name: str, e: overlayfile.OverlayError) -> ViewError:
        """Log why name's file is not served (once, not at every client that asks again) and
        make the client's refusal: the view's name, no path."""
        key = str(e)
        with self._warn_lock:       # (the set's lock may be held: acquire looks under it)
            again = self._warned.get(name) == key
            if not again:
                if len(self._warned) >= 4096:
                    self._warned.clear()
                self._warned[name] = key
        (log.info if again else log.warning)("view %s: %s", name, e)
        if isinstance(e, overlayfile.OverlayBusy):
            return ViewError(UNAVAILABLE, f"view {name} is in use by another process (see the "
                                          f"server's log)")
        if isinstance(e, overlayfile.OverlayRefused):
            return ViewError(UNAVAILABLE, f"view {name} is not available (see the server's log)")
        change = self._backing_change(name)
        if change:      # (the error names the golden image's path: the client gets the reason)
            return ViewError(UNAVAILABLE, f"view {name}: the golden image changed since the view "
                                          f"recorded it ({change}; see the server's log)")
        return ViewError(UNAVAILABLE, _client_line(name, str(e), self.path(name)))

    def _backing_change(self, name: str) -> str | None:
        """What changed in the golden image since name's file recorded it, in words that name
        no path; None if nothing did, or if the file cannot tell."""
        path = self.path(name)
        try:
            fd = overlayfile.open_at(self._dir_fd, name + SUFFIX, path, readonly=True)
        except (OSError, overlayfile.OverlayError):
            return None
        try:
            h = overlayfile.read_header(fd, path)
            kind, _, size, mtime_ns = overlayfile.backing_identity(self.backing)
            fid = overlayfile.backing_file_id(self.backing)
        except (OSError, overlayfile.OverlayError):
            return None
        finally:
            os.close(fd)
        if h.committing:
            return None
        return overlayfile.identity_change(h, kind, size, mtime_ns, fid)

    def _scan(self) -> dict[str, os.stat_result]:
        """The views in directory, by name: DIR/NAME.cow with a valid NAME, and a file this
        server serves (overlayfile.refusal: no link is followed, nothing is opened)."""
        found = {}
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            # A descriptor of its own: scandir reads the folder through it (a dup of the shared
            # one would share its position with other threads' scans).
            with os.scandir(fd) as it:
                for entry in it:
                    if not entry.name.endswith(SUFFIX):
                        continue
                    name = entry.name[:-len(SUFFIX)]
                    if name_problem(name) is not None:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if overlayfile.refusal(st) is None:
                        found[name] = st
        finally:
            os.close(fd)
        return found

    def _count(self, rescan: bool) -> int:
        """Views that exist (with the set's lock held): files, and views being made."""
        if self.temporary is not None:
            return len(self._views)
        if self._known is None or rescan:
            self._known = set(self._scan())
        return len(self._known | set(self._views))

    def _over_cap(self) -> bool:
        """Would one more view pass max_views?  (With the lock held.)  The set of files is known
        from a scan, kept up to date as views are made; files removed or added behind our back
        (rm, python -m cow.overlay fork) are noticed by a fresh scan before refusing."""
        if not self.max_views:
            return False
        return self._count(False) >= self.max_views and self._count(True) >= self.max_views

    def probe(self, name: str) -> ViewInfo:
        """What a client would get for name, without opening or creating anything: ViewError
        for a name that acquire() would refuse before trying to open it."""
        name = self.resolve(name)
        with self._lock:
            view = self._views.get(name)
            if view is not None and view.state == OPEN:
                return ViewInfo(name, True, view.engine.block_size, self._describe_open(view))
        exists = self.temporary is None and self._lstat(name) is not None
        if not exists:
            if self.readonly:
                raise ViewError(NO_SUCH_VIEW, f"no view {name} (this server is read-only and "
                                              f"creates none)")
            with self._lock:
                if name not in self._views and self._over_cap():
                    raise self._limit_error()
            return ViewInfo(name, False, self._new_block_size(), "new view, created on first "
                                                                 "use")
        path = self.path(name)
        try:
            fd = overlayfile.open_at(self._dir_fd, name + SUFFIX, path, readonly=True)
            try:
                block_size = overlayfile.read_header(fd, path).block_size
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise ViewError(UNAVAILABLE, f"view {name} went away meanwhile") from None
        except overlayfile.OverlayError as e:
            raise self._not_served(name, e) from None
        except OSError as e:
            raise self._not_served(name, overlayfile.OverlayError(
                f"{path}: {os.strerror(e.errno) if e.errno else e}")) from None
        return ViewInfo(name, True, block_size, self._describe_idle(name))

    def _new_block_size(self) -> int:
        return int(self.engine_kwargs.get("block_size") or 65536)

    def _limit_error(self) -> ViewError:
        return ViewError(LIMIT, f"this server holds its maximum of {self.max_views} views: no new "
                                f"view can be made")

    # -- opening and closing -------------------------------------------------------------------

    def acquire(self, name: str) -> View:
        """The open view for name (opened, or created, if need be), held until release(view).
        ViewError if it is refused or cannot be opened."""
        name = self.resolve(name)
        deadline = time.monotonic() + self.settle_timeout
        with self._settled:
            while True:
                if self._closed:
                    raise ViewError(UNAVAILABLE, "the server is shutting down")
                view = self._views.get(name)
                if view is None:
                    exists = self.temporary is None and self._lstat(name) is not None
                    if not exists:
                        if self.readonly:
                            raise ViewError(NO_SUCH_VIEW, f"no view {name} (this server is "
                                                          f"read-only and creates none)")
                        if self._over_cap():
                            if not self._cap_logged:   # once, not at every new name
                                self._cap_logged = True
                                log.warning("view %s refused: the server holds its maximum of "
                                            "%d views (--max-exports); refused again without "
                                            "a word until a view is made", name,
                                            self.max_views)
                            raise self._limit_error()
                    view = self._views[name] = View(name, state=OPENING)
                    break
                if view.state == OPEN:
                    view.clients += 1
                    return view
                # Opening or closing: then join it, or open it anew; but not forever.
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("view %s: still %s after %g s: a client was refused", name,
                                view.state, self.settle_timeout)
                    raise ViewError(UNAVAILABLE, f"view {name} is busy being opened or closed: "
                                                 f"try again")
                self._settled.wait(left)
        try:
            engine, created = self._open_engine(name)
        except BaseException as e:
            with self._settled:
                del self._views[name]
                view.state = CLOSED
                self._settled.notify_all()
            if isinstance(e, overlayfile.OverlayError):
                raise self._not_served(name, e) from None
            if isinstance(e, OSError):
                log.warning("view %s cannot be opened: %s", name, e)
                why = os.strerror(e.errno) if e.errno else "see the server's log"
                raise ViewError(UNAVAILABLE, f"view {name} cannot be opened: {why}") from None
            if isinstance(e, ValueError):
                log.warning("view %s: %s", name, e)
                raise ViewError(UNAVAILABLE, _client_line(name, str(e), "")) from None
            raise
        with self._settled:
            view.engine = engine
            view.created = created
            if created:
                self._cap_logged = False
            view.clients = 1
            view.state = OPEN
            if self._known is not None and self.temporary is None:
                self._known.add(name)
            self._settled.notify_all()
        return view

    def _open_engine(self, name: str) -> tuple[Engine, bool]:
        """The engine of name's view, and whether its file was made now."""
        kw = dict(self.engine_kwargs)
        if self.temporary is not None:
            return Engine(self.backing, **kw), True
        block_size = kw.pop("block_size", None)
        ovfile = overlayfile.open_in_dir(
            self._dir_fd, name + SUFFIX, self.backing, path=self.path(name),
            create=not self.readonly, new_block_size=block_size, readonly=self.readonly,
            backing_changed=kw.pop("backing_changed", "refuse"))
        try:
            return Engine(self.backing, overlay=ovfile, readonly=self.readonly, **kw), \
                ovfile.created
        except BaseException:
            ovfile.abandon()    # if the engine did not take it: closed, and removed if made now
            raise

    def release(self, view: View) -> None:
        """A client of view is gone.  The last one flushes and closes the view (unless it is a
        kept temporary view); OSError if that flush fails (the view is closed all the same)."""
        with self._lock:
            if view.state != OPEN or view.clients <= 0:
                return          # closed by close_all meanwhile
            view.clients -= 1
            if view.clients or self.temporary == "keep":
                return
            view.state = CLOSING
        self._close_view(view)

    def _close_view(self, view: View) -> None:
        engine = view.engine
        unchanged = False
        error = None
        try:
            st = engine.stats()
            unchanged = (self.remove_unchanged and view.created and not st["allocated_blocks"]
                         and not st["trimmed_blocks"])
            changed = st["allocated_blocks"] * engine.block_size
            engine.close()
            if self.temporary is None:
                fname = view.name + SUFFIX
                if unchanged:
                    os.unlink(fname, dir_fd=self._dir_fd)
                else:
                    st = os.stat(fname, dir_fd=self._dir_fd, follow_symlinks=False)
                    with self._lock:
                        self._changed[view.name] = (min(changed, self.size), st.st_ino,
                                                    st.st_mtime_ns)
        except OSError as e:
            error = e
        finally:
            with self._settled:
                if self._views.get(view.name) is view:
                    del self._views[view.name]
                if unchanged and self._known is not None:
                    self._known.discard(view.name)
                view.state = CLOSED
                view.engine = None
                self._settled.notify_all()
        if error is not None:
            raise error

    def close_all(self) -> list[tuple[str, OSError]]:
        """Close every open view (flushed first), held or not, and open no more: at shutdown,
        once the connections are gone.  Returns the views whose final flush failed."""
        with self._lock:
            self._closed = True
            views = [v for v in self._views.values() if v.state == OPEN]
            for v in views:
                v.state = CLOSING
        failed = []
        for v in views:
            try:
                self._close_view(v)
            except OSError as e:
                failed.append((v.name, e))
        return failed

    # -- what exists ---------------------------------------------------------------------------

    def open_views(self) -> list[View]:
        with self._lock:
            return [v for v in self._views.values() if v.state == OPEN]

    def count(self) -> int:
        """Views that exist now (files in the directory, or live temporary views)."""
        with self._lock:
            return self._count(True)

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every view that exists, by name: for NBD_OPT_LIST.  Open
        views say how many clients hold them and how much they changed; idle ones what their
        file uses on disk (or the bytes changed, as counted when this server last closed it)."""
        with self._lock:
            live = {name: v for name, v in self._views.items() if v.state == OPEN}
            out = {name: self._describe_open(v) for name, v in live.items()}
        if self.temporary is None:
            try:
                entries = self._scan()
            except OSError as e:
                log.warning("listing %s: %s", self.directory, e.strerror or e)
                entries = {}
            for name, st in entries.items():
                if name not in out:
                    out[name] = self._describe_idle(name, st)
        return sorted(out.items())

    def _describe_open(self, view: View) -> str:
        st = view.engine.stats()
        changed = min(st["allocated_blocks"] * view.engine.block_size, self.size)
        who = f"{view.clients} client{'s' if view.clients != 1 else ''}" if view.clients \
            else "idle"
        kind = "temporary view" if self.temporary is not None else "view"
        ro = ", read-only" if self.readonly else ""
        return f"{kind}, {who}{ro}, {_human(changed)} changed"

    def _describe_idle(self, name: str, st: os.stat_result | None = None) -> str:
        if st is None:
            try:
                st = os.stat(name + SUFFIX, dir_fd=self._dir_fd, follow_symlinks=False)
            except OSError as e:
                return f"view, idle, unreadable: {os.strerror(e.errno)}"
        ro = ", read-only" if self.readonly else ""
        with self._lock:
            known = self._changed.get(name)
        if known is not None and known[1:] == (st.st_ino, st.st_mtime_ns):
            return f"view, idle{ro}, {_human(known[0])} changed"
        if not stat.S_ISREG(st.st_mode):
            return "view, idle, not a regular file"
        return f"view, idle{ro}, {_human(st.st_blocks * 512)} on disk"


def _client_line(name: str, message: str, path: str) -> str:
    """What a client is told of why view name cannot be opened: the reason in message (an
    overlay error, which starts with the file's path), unless it names a path or URI (the
    backing's, say): the server's folders and backing are none of a client's business."""
    if path and message.startswith(path + ": "):
        message = message[len(path) + 2:]
    if "/" in message or not message:
        return f"view {name} cannot be opened (see the server's log)"
    return f"view {name}: {message}"


# -- the NBD side: the server (cow/server/) asks a ViewExports ---------------------------------

_REPLY_FOR = {
    BAD_NAME: P.NBD_REP_ERR_INVALID,        # not a name this server's syntax allows
    NO_SUCH_VIEW: P.NBD_REP_ERR_UNKNOWN,    # "the chosen export does not exist on this server"
    LIMIT: P.NBD_REP_ERR_POLICY,            # allowed by the syntax, forbidden by configuration
    UNAVAILABLE: P.NBD_REP_ERR_UNKNOWN,     # "the requested export is not available"
}


class _Trim:
    """Give freed heap memory back to the system, at most once per `interval` seconds: a closed
    view's bitmap is freed, but glibc keeps freed memory below the top of its heaps (measured:
    +4 MiB of RSS kept after 1000 views of a 1 GiB backing closed).  malloc_trim(0) returns the
    free pages inside the heaps too."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.last = 0.0
        self.lock = threading.Lock()
        try:
            import ctypes
            self.fn = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):   # not glibc
            self.fn = None

    def __call__(self, last: bool = False) -> None:
        """A view closed; ``last``: no view is open any more (then trim regardless)."""
        if self.fn is None:
            return
        now = time.monotonic()
        with self.lock:
            if now - self.last < self.interval and not last:
                return
            self.last = now
        self.fn(0)


class ViewExports(P.Exports):
    """A ViewSet as the exports of cow.server: GO opens (or creates) the named view, INFO and
    the meta context options only look, LIST lists the views that exist if list_all, else only
    the default view (see listing())."""

    def __init__(self, views: ViewSet, template: P.Export, *, list_all: bool = False):
        self.views = views
        self.template = template        # size, read-only, limits: the same for every view
        self.list_all = list_all        # NBD_OPT_LIST: every view, or only the default one
        self._trim = _Trim()

    def _export(self, name: str, block_size: int, description: str) -> P.Export:
        return dataclasses.replace(self.template, name=name, description=description,
                                   preferred_block_size=block_size)

    def lookup(self, name: str) -> P.Export:
        try:
            info = self.views.probe(name)
        except ViewError as e:
            raise P.Refused(_REPLY_FOR[e.kind], str(e)) from None
        return self._export(info.name, info.block_size, info.description)

    def acquire(self, name: str) -> tuple[P.Export, View]:
        try:
            view = self.views.acquire(name)
        except ViewError as e:
            raise P.Refused(_REPLY_FOR[e.kind], str(e)) from None
        try:
            description = self.views._describe_open(view)
        except Exception:
            self.views.release(view)
            raise
        return self._export(view.name, view.engine.block_size, description), view

    def release(self, handle: View) -> None:
        self.views.release(handle)
        if handle.state == CLOSED:
            self._trim(last=not self.views._views)

    def engine_of(self, handle: View):
        return handle.engine

    def listing(self) -> list[tuple[str, str]]:
        return listing(self.views, self.list_all)


def listing(views: ViewSet, list_all: bool) -> list[tuple[str, str]]:
    """What NBD_OPT_LIST shows of views: every view (list_all), or only the default view, if
    there is one.  A view's name is all a client needs to read and write it: by default a
    client learns no other client's name."""
    if list_all:
        return views.listing()
    if views.default is None:
        return []
    try:
        info = views.probe("")
    except ViewError:
        return []
    return [(info.name, info.description)]
