"""nbdkit python plugin: serve the copy-on-write engine inside real nbdkit.

    nbdkit python PATH-TO-THIS-FILE file=BACKING | uri=nbd://...
                 [cow-block-size=N] [cow-on-read=false|true|/PATH] [cow-on-cache=false|true]
                 [overlay=FILE | overlay-dir=DIR [max-exports=N] [list-views=false|true]]
                 [overlay-backing-changed=...] [backing-connections=N] [backing-wait=SECONDS]

`python -m cow.nbdkit --print-plugin-path` prints PATH-TO-THIS-FILE.  The parameters have the names,
defaults and meanings of nbdkit's cow filter (nbdkit-cow-filter(1)).  One engine, created at start-up,
serves every connection, so all clients share one overlay; the backing is opened read-only.
overlay=FILE keeps the overlay in FILE, as python -m cow.server --overlay FILE does (file= and uri=
may then be left out: FILE records its backing, which is used if FILE is this user's and nobody
else may write it, and is never a command); FILE is locked, and flushed at FLUSH, FUA and exit.
overlay-dir=DIR serves a view per export name, kept in DIR/NAME.cow, as python -m cow.server
--overlay-dir DIR does (cow/views.py): the backing is opened once and shared, a view is opened by
its first connection and flushed and closed after its last one, the connection's handle is its
view's engine, and max-exports=N caps the views (default 128, cow.views.DEFAULT_MAX_VIEWS; 0: no
cap).  A listing shows no view unless list-views=true: a view's name is all a client needs to open
it.  nbdkit opens the plugin for NBD_OPT_INFO as for NBD_OPT_GO, so a view this shim made is removed
again when it closes with nothing written to it.  backing-connections=N: most connections to an NBD
backing (1 to 64; default cow.backing.DEFAULT_CONNECTIONS, or DEFAULT_CONNECTIONS_MULTI_CONN where
it advertises multi-conn), opened as load needs them, as python -m
cow.server --backing-connections N.  backing-wait=SECONDS: how long reads wait for an NBD backing
whose connection broke to come back (it is connected again with backoff), as python -m cow.server
--backing-wait (default cow.backing.DEFAULT_WAIT).

nbdkit runs this file as `__main__` with neither its folder nor any virtual environment on sys.path,
so it imports nothing relative: it adds the site-packages folder of the environment it belongs to
(see _site_dir) and imports `cow.engine` from there.  Every callback only delegates to the engine;
the engine releases the GIL for each whole call, so with the parallel thread model requests from
nbdkit's worker threads overlap in I/O.
"""

import errno
import json
import os
import site
import sys
import threading
from importlib.machinery import EXTENSION_SUFFIXES

API_VERSION = 2

_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _site_dir():
    """The site-packages folder that this copy of cow runs from.

    Installed from a wheel, this file is SITE/cow/nbdkit_plugin.py, beside the compiled engine.
    Installed editable (./dev setup), it is the source file in the repository; the engine is in
    the build folder, which records the environment it was installed into (cow/meson.build).
    The build folder is build/ (./dev's) or build/cpXY (meson-python's default)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.exists(os.path.join(package_dir, "engine" + s)) for s in EXTENSION_SUFFIXES):
        return os.path.dirname(package_dir)
    root = os.path.dirname(package_dir)
    builds = [os.path.join(root, "build"), os.path.join(root, "build", "cp" + _PYTHON.replace(".", ""))]
    for build in builds:
        try:
            with open(os.path.join(build, "cow", "environment.json")) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            continue
        if recorded.get("python_version") == _PYTHON:
            return recorded["site_packages"]
    raise ImportError(
        f"no compiled cow engine for {__file__} with nbdkit's Python {_PYTHON}: none beside it "
        f"(an installed package) and no editable build of {root} for Python {_PYTHON} in build/ "
        f"or build/cp{_PYTHON.replace('.', '')}/. In the repository, run ./dev setup")


def _one_line(exc):
    """Make nbdkit log exc, raised at start-up, as its message alone, on one line.  nbdkit logs
    a Python error as traceback.format_exception's lines joined, and ends them with a newline
    of its own: without a traceback, the exception's type and the format's final newline, the
    log is one line.  nbdkit exits after a start-up failure, so what format_exception does in
    this process no longer matters to anything else."""
    sys.tracebacklimit = 0
    import traceback

    def only_the_message(*args, **kwargs):
        return [str(exc).rstrip("\n")]

    traceback.format_exception = only_the_message
    return exc


def _import_error(message):
    return _one_line(ImportError(message))  # nbdkit prints this at start-up


try:
    _SITE_DIR = _site_dir()
except ImportError as exc:
    raise _import_error(str(exc)) from None
if _SITE_DIR not in sys.path:
    # In front, so that this installation's `cow` wins over any other on the system path;
    # addsitedir then processes the folder's .pth files (an editable install's loader among them).
    sys.path.insert(0, _SITE_DIR)
site.addsitedir(_SITE_DIR)

import nbdkit  # noqa: E402  (the module nbdkit's python plugin provides)

try:
    from cow import overlayfile  # noqa: E402
    from cow.backing import Backing  # noqa: E402
    from cow.engine import Engine, parse_block_size  # noqa: E402
    from cow.views import BAD_NAME, DEFAULT_MAX_VIEWS, LIMIT, NO_SUCH_VIEW, UNAVAILABLE, \
        ViewError, ViewSet, directory_problem  # noqa: E402
except ImportError as exc:
    # An editable install rebuilds on import; a failed build's log is in the exception's notes.
    notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
    raise _import_error(
        f"cannot import cow.engine from {_SITE_DIR} with nbdkit's Python {_PYTHON}: {exc}{notes}. "
        "The package must be installed into a Python of the same version as nbdkit's python "
        "plugin (see: nbdkit python --dump-plugin); in the repository, run ./dev setup") from None


class ConfigError(Exception):
    """A missing or bad parameter: reported by nbdkit as one error line at start-up."""


_PARAMETERS = ("file", "uri", "cow-block-size", "cow-on-read", "cow-on-cache", "overlay",
               "overlay-backing-changed", "overlay-dir", "max-exports", "list-views",
               "backing-connections", "backing-wait")
_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")

_params = {}   # key -> value, as given on the command line
_engine = None  # the one Engine, made in config_complete, closed in cleanup
# overlay-dir=DIR: the shared backing, its lock, the views (made at the first open or listing, when
# nbdkit says whether it is read-only), the options every view's engine gets, and each open
# view's engine (a connection's handle) -> its view.
_backing = None
_backing_lock_fd = None
_views = None
_views_options = None
_list_all = False   # list-views=true: NBD_OPT_LIST lists every view (else none)
_view_of = {}
_views_lock = threading.Lock()


def _parse_bool(key, value):
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{key}={value}: expected a boolean (true or false)")


def _parse_cow_on_read(value):
    if value.startswith("/"):
        return value  # on while this path exists
    try:
        return _parse_bool("cow-on-read", value)
    except ConfigError:
        raise ConfigError(f"cow-on-read={value}: expected true, false or an absolute path") from None


def _engine_arguments(params):
    """Check the parameters; return (backing, keyword arguments for Engine)."""
    unknown = [k for k in params if k not in _PARAMETERS]
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]}={params[unknown[0]]} "
            f"(known: {', '.join(p + '=' for p in _PARAMETERS)})")
    overlay = None
    if "overlay" in params:
        if not params["overlay"]:
            raise ConfigError("overlay=: the overlay path is empty")
        # Absolute: nbdkit may change directory to / when it forks into the background.
        overlay = os.path.abspath(params["overlay"])
    if "overlay-dir" in params:
        if overlay is not None:
            raise ConfigError("overlay=FILE serves one view, overlay-dir=DIR a view per export "
                              "name: give one of them")
        if not params["overlay-dir"]:
            raise ConfigError("overlay-dir=: the folder is empty")
        if "file" not in params and "uri" not in params:
            raise ConfigError("overlay-dir=DIR needs the backing every view is a view of: "
                              "file=PATH or uri=nbd://...")
    else:
        for key in ("max-exports", "list-views"):
            if key in params:
                raise ConfigError(f"{key}= goes with overlay-dir=DIR")
    if "file" in params and "uri" in params or not ("file" in params or "uri" in params
                                                    or overlay is not None):
        raise ConfigError("give the backing as exactly one of file=PATH or uri=nbd://... (or "
                          "overlay=FILE alone, which records its backing)")
    if "file" not in params and "uri" not in params:
        backing = _recorded_backing(params["overlay"], overlay)
    elif "file" in params:
        if not params["file"]:
            raise ConfigError("file=: the backing path is empty")
        # nbdkit may change directory to / when it forks into the background.
        backing = os.path.realpath(params["file"])
        if not os.path.exists(backing):
            raise ConfigError(f"file={params['file']}: no such file or device")
    else:
        backing = params["uri"]
        if "://" not in backing or not backing.startswith("nbd"):
            raise ConfigError(f"uri={backing}: expected an NBD URI (nbd://, nbds://, nbd+unix://...)")
    kwargs = {}
    if "cow-block-size" in params:
        try:
            kwargs["block_size"] = parse_block_size(params["cow-block-size"])
        except ValueError as exc:
            raise ConfigError(f"cow-block-size={params['cow-block-size']}: {exc}") from None
    if "cow-on-read" in params:
        kwargs["cow_on_read"] = _parse_cow_on_read(params["cow-on-read"])
    if "cow-on-cache" in params:
        kwargs["cow_on_cache"] = _parse_bool("cow-on-cache", params["cow-on-cache"])
    if overlay is not None:
        kwargs["overlay"] = overlay
        changed = params.get("overlay-backing-changed", "refuse")
        if changed not in overlayfile.BACKING_CHANGED_CHOICES:
            raise ConfigError(f"overlay-backing-changed={changed}: expected refuse or accept")
        kwargs["backing_changed"] = changed
    elif "overlay-dir" in params:
        changed = params.get("overlay-backing-changed", "refuse")
        if changed not in overlayfile.BACKING_CHANGED_CHOICES:
            raise ConfigError(f"overlay-backing-changed={changed}: expected refuse or accept")
        kwargs["backing_changed"] = changed
    elif "overlay-backing-changed" in params:
        raise ConfigError("overlay-backing-changed= goes with overlay=FILE or overlay-dir=DIR")
    if "backing-connections" in params:
        value = params["backing-connections"]
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= 64:
            raise ConfigError(f"backing-connections={value}: expected a number from 1 to 64")
        kwargs["nbd_connections"] = n
    if "backing-wait" in params:
        value = params["backing-wait"]
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < 1e9:
            raise ConfigError(f"backing-wait={value}: expected a number of seconds >= 0")
        kwargs["backing_wait"] = seconds
    return backing, kwargs


def _recorded_backing(given, overlay):
    """overlay=FILE alone: the file or URI FILE records, if FILE may choose it (owned by this
    process's user, writable by nobody else: see overlayfile.recorded_backing).  A recorded
    command is never run: the plugin takes no command backing."""
    try:
        rec = overlayfile.recorded_backing(overlay)
    except FileNotFoundError:
        raise ConfigError(f"overlay={given}: no such overlay yet; give file= or uri= to make it "
                          f"over") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"overlay={given}: {exc}") from None
    shown = overlayfile.shown(rec.backing)
    if rec.command:
        raise ConfigError(f"overlay={overlayfile.shown(given)} records a command as its backing "
                          f"({shown}), and this plugin runs no command: serve it with python -m "
                          f"cow.server --overlay {overlayfile.shown(overlay)} -- {shown}")
    if rec.untrusted:
        raise ConfigError(f"overlay={overlayfile.shown(given)}: {rec.untrusted}, so the backing "
                          f"it records ({shown}) is used only when you name it with file= or "
                          f"uri=")
    return rec.backing


def _views_arguments(params):
    """(folder, max views, list them all) for overlay-dir=DIR."""
    # Absolute: nbdkit may change directory to / when it forks into the background.
    folder = os.path.abspath(params["overlay-dir"])
    try:
        max_views = int(params.get("max-exports", str(DEFAULT_MAX_VIEWS)))
    except ValueError:
        max_views = -1
    if max_views < 0:
        raise ConfigError(f"max-exports={params['max-exports']}: expected a number >= 0")
    list_all = _parse_bool("list-views", params.get("list-views", "false"))
    return folder, max_views, list_all


def _open_views(backing, kwargs):
    """overlay-dir=DIR at start-up: the folder, the shared backing and its lock, the options
    checked once on a throw-away engine."""
    global _backing, _backing_lock_fd, _views_options, _list_all
    folder, max_views, _list_all = _views_arguments(_params)
    why = directory_problem(folder, create=True)
    if why:
        raise ConfigError(f"overlay-dir={_params['overlay-dir']}: {why}")
    _backing = Backing(backing, wait=kwargs.get("backing_wait"),
                       **({"connections": kwargs["nbd_connections"]}
                          if "nbd_connections" in kwargs else {}))
    _backing_lock_fd = overlayfile.hold_backing(_backing)
    probe = {k: v for k, v in kwargs.items() if k != "backing_changed"}
    Engine(_backing, tmpdir=folder, **probe).close()
    _views_options = dict(directory=folder, max_views=max_views, engine_kwargs=kwargs)


def _fail_at_start_up(exc):
    raise _one_line(exc) from None


def _set_errno(exc):
    """Pass the errno of exc to nbdkit, which sends it to the client (else the client sees EIO)."""
    code = getattr(exc, "errno", None)
    if not code:
        code = errno.EINVAL if isinstance(exc, ValueError) else errno.EIO
    nbdkit.set_error(code)


# -- start-up -----------------------------------------------------------------------------------

def config(key, value):
    _params[key] = value


def config_complete():
    global _engine
    try:
        backing, kwargs = _engine_arguments(_params)
        nbdkit.debug(f"cow: backing {backing}, engine options {kwargs}")
        if "overlay-dir" in _params:
            _open_views(backing, kwargs)
        else:
            _engine = Engine(backing, **kwargs)
    except ConfigError as exc:
        _fail_at_start_up(exc)
    except (OSError, ValueError) as exc:
        # An overlay's refusal names the overlay; anything else, the backing.
        keys = ("overlay", "file", "uri") if isinstance(exc, overlayfile.OverlayError) \
            else ("file", "uri", "overlay")
        key = next(k for k in keys if k in _params)
        _fail_at_start_up(ConfigError(f"{key}={_params[key]}: {exc}"))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def cleanup():
    if _engine is not None:
        _engine.close()
    if _views is not None:
        for name, exc in _views.close_all():
            nbdkit.debug(f"cow: closing view {name}: {exc}; changes since its last flush may "
                         f"be lost")
    if _backing_lock_fd is not None:
        os.close(_backing_lock_fd)
    if _backing is not None:
        _backing.close()


# -- per connection: the handle is the shared engine, or the engine of the connection's view ----

# How a refused view reaches the client: nbdkit answers a failed open with an error reply to
# NBD_OPT_GO (and hangs up on NBD_OPT_EXPORT_NAME).
_ERRNO_FOR = {BAD_NAME: errno.EINVAL, NO_SUCH_VIEW: errno.ENOENT, LIMIT: errno.EPERM,
              UNAVAILABLE: errno.EBUSY}


def _view_set(readonly):
    """The views, made at the first open or listing, when nbdkit says whether it serves
    read-only (nbdkit -r: then existing views are opened read-only and none is made)."""
    global _views
    with _views_lock:
        if _views is None:
            _views = ViewSet(_backing, readonly=bool(readonly), remove_unchanged=True,
                             **_views_options)
        return _views


def open(readonly):
    if _views_options is None:
        return _engine
    views = _view_set(readonly)
    name = nbdkit.export_name()
    try:
        if bool(readonly) != views.readonly:
            raise ViewError(UNAVAILABLE, "views are served read-only or read-write, not both")
        view = views.acquire(name)
    except ViewError as exc:
        nbdkit.set_error(_ERRNO_FOR[exc.kind])
        nbdkit.debug(f"cow: export {name!r} refused: {exc}")
        raise
    with _views_lock:
        _view_of[view.engine] = view
    return view.engine


def close(h):
    if _views_options is None:
        return
    with _views_lock:
        view = _view_of.get(h)
    if view is None:
        return
    try:
        _views.release(view)
    finally:
        with _views_lock:
            if view.engine is None:
                _view_of.pop(h, None)


def list_exports(readonly, is_tls):
    if _views_options is None:
        return [""]
    if not _list_all:
        return []
    return _view_set(readonly).listing()


def get_size(h):
    return h.size


_MAX_PREFERRED = 32 * 1024 * 1024  # nbdkit refuses a larger preferred block size
# nbdkit itself refuses a read or write over 64 MiB (with ENOMEM, before any plugin sees it;
# nbdkit-blocksize-filter(1) calls it "the nbdkit maximum"), so that is the largest request a
# client can rely on.  Trim, zero, cache and extents of any length still reach the engine.
_MAX_REQUEST = 64 * 1024 * 1024


def block_size(h):
    # Any size up to the maximum works; whole blocks avoid read-modify-write.
    return (1, min(h.block_size, _MAX_PREFERRED), _MAX_REQUEST)


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def can_multi_conn(h):
    # One overlay for all connections, and flush covers all of it.
    return True


# -- data path ----------------------------------------------------------------------------------
# nbdkit calls these once per request, with the GIL taken for the call.  Each one is a single
# engine call and nothing more: no decorator frame, no lookups beyond the engine's method, flags
# tested against module constants.  An engine error passes its errno to nbdkit (else the client
# sees EIO) and goes on up.  What the rest of a request costs is measured in bench/README.md.

_FLAG_FUA = nbdkit.FLAG_FUA
_FLAG_MAY_TRIM = nbdkit.FLAG_MAY_TRIM
_FLAG_FAST_ZERO = nbdkit.FLAG_FAST_ZERO
_FLAG_REQ_ONE = nbdkit.FLAG_REQ_ONE


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)  # fills nbdkit's buffer in place
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags & _FLAG_FUA != 0)
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def flush(h, flags):
    try:
        h.flush()
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def trim(h, count, offset, flags):
    try:
        h.trim(count, offset)
        if flags & _FLAG_FUA:
            h.flush()
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def zero(h, count, offset, flags):
    # ENOTSUP from a fast zero reaches the client as ENOTSUP; nbdkit's python plugin takes
    # ENOTSUP from a plain zero as "write the zeroes with pwrite instead".
    try:
        h.zero(count, offset, may_trim=flags & _FLAG_MAY_TRIM != 0,
               fast=flags & _FLAG_FAST_ZERO != 0)
        if flags & _FLAG_FUA:
            h.flush()
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def cache(h, count, offset, flags):
    try:
        h.cache(count, offset)
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise


def extents(h, count, offset, flags):
    try:
        runs = h.extents(count, offset, flags & _FLAG_REQ_ONE != 0)
    except (OSError, ValueError) as exc:
        _set_errno(exc)
        raise
    # The engine gives (length, type) runs from offset; nbdkit wants (offset, length, type).
    # Its type bits are NBD_STATE_HOLE / NBD_STATE_ZERO, the same as nbdkit.EXTENT_*.
    result = []
    for length, kind in runs:
        result.append((offset, length, kind))
        offset += length
    return result
