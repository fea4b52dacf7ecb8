"""The servers under test: how to start each one over a backing, and how to stop it.

Every target serves one export on a Unix socket. A backing is either a file path or an NBD URI
(the remote section's delayed backing); a target that cannot take an NBD backing says so. The
serial section also gives an nbdkit stack as a list (filters, plugin and parameters, e.g.
`["--filter=delay", "curl", URL, "rdelay=2ms"]`): cow.server runs it as a command backing
(`-- nbdkit STACK`), nbdkit's cow filter goes on top of it in one process (`nbdkit --filter=cow
STACK`), and StackBacking serves it alone.
The three COW targets over an NBD backing also take nbdkit's cow settings: cow_block_size="4K",
cow_on_read="true" (virt-v2v's setting).
"""

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd

REPO = Path(__file__).resolve().parent.parent
NULL_PLUGIN = Path(__file__).resolve().parent / "null_plugin.py"

# Processes this run started (pid -> Popen), so that an interrupted run stops exactly those.
_STARTED = {}


def kill_started():
    for proc in list(_STARTED.values()):
        _stop_proc(proc)


def _stop_proc(proc):
    _STARTED.pop(proc.pid, None)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_status_kib(pid, field_name):
    """A kB field of /proc/PID/status (VmHWM, VmRSS), in KiB; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far, all its threads included (from
    /proc/PID/stat); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nbd_handshake(uri):
    """Connect, complete the handshake, return (size, can_multi_conn); raises nbd.Error."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.get_size(), bool(h.can_multi_conn())
    finally:
        h.shutdown()
        del h


def nbd_list(uri):
    """Connect and list the exports without choosing one (a server of views has no default
    export to hand to a handshake); returns True (a view has multi-conn)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    try:
        h.opt_list(lambda name, description: 0)
        return True
    finally:
        h.opt_abort()
        del h


@dataclass
class Server:
    """One running server process."""

    target: "Target"
    proc: subprocess.Popen
    sock: Path
    log: Path
    cleanup: list = field(default_factory=list)
    multi_conn: bool = False
    startup_s: float = 0.0  # from spawning the process to the first completed handshake

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def view_uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    @property
    def pid(self):
        return self.proc.pid

    def peak_rss_kib(self):
        return read_status_kib(self.pid, "VmHWM")

    def rss_kib(self):
        return read_status_kib(self.pid, "VmRSS")

    def cpu_seconds(self):
        return cpu_seconds(self.pid)

    def stop(self):
        _stop_proc(self.proc)
        for path in self.cleanup:
            Path(path).unlink(missing_ok=True)
        Path(self.sock).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def log_tail(path, n=15):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Target:
    """A kind of server. Subclasses build the command line (and any files it needs)."""

    name = ""        # command-line name (--targets)
    label = ""       # column heading
    nbd_backing = False  # can serve a copy-on-write view of an NBD URI backing

    def available(self, ctx):
        """None when usable, else a short reason."""
        return None

    def command(self, ctx, backing, sock, workdir, cleanup, **opts):
        raise NotImplementedError

    def start(self, ctx, backing, workdir, tag, timeout=60.0, env=None, **opts):
        """Start a fresh server over backing; return a Server once a client completed a handshake
        (or, for a server of views, listed its exports)."""
        workdir = Path(workdir)
        sock = workdir / f"{self.name}-{tag}.sock"
        log = workdir / f"{self.name}-{tag}.log"
        sock.unlink(missing_ok=True)
        cleanup = []
        probe = opts.pop("probe", None)
        backing = list(backing) if isinstance(backing, (list, tuple)) else str(backing)
        cmd = self.command(ctx, backing, str(sock), workdir, cleanup, **opts)
        t_spawn = time.monotonic()
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    cwd=workdir, env={**ctx.env, **(env or {})})
        _STARTED[proc.pid] = proc
        server = Server(self, proc, sock, log, cleanup)
        server.t_spawn = t_spawn
        if probe is None:
            probe = nbd_list if opts.get("overlay_dir") else nbd_handshake_multi_conn
        try:
            server.multi_conn = wait_ready(server, timeout, probe)
        except BaseException:
            server.stop()
            raise
        server.startup_s = time.monotonic() - t_spawn
        return server


def nbd_handshake_multi_conn(uri):
    return nbd_handshake(uri)[1]


def wait_ready(server, timeout, probe=nbd_handshake_multi_conn):
    """Poll until probe(uri) succeeds (an NBD handshake); return what it says of multi-conn."""
    deadline = time.monotonic() + timeout
    last = None
    refused_handshakes = 0
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.target.name} exited with status {server.proc.returncode}:\n"
                               + log_tail(server.log))
        if os.path.exists(server.sock):
            try:
                return probe(server.uri)
            except nbd.Error as e:
                last = e
                # Connected, but the server turned the handshake down: it will not get better.
                if "handshake" in str(e):
                    refused_handshakes += 1
                    if refused_handshakes >= 5:
                        raise RuntimeError(f"{server.target.name}: {e}\n" + log_tail(server.log))
        time.sleep(0.005)
    raise TimeoutError(f"{server.target.name} not ready after {timeout:.0f} s ({last}):\n"
                       + log_tail(server.log))


def nbdkit_base(sock, threads=None):
    """nbdkit in the foreground on sock; threads: its --threads (threads per connection)."""
    base = ["nbdkit", "-f", "--exit-with-parent", "-U", sock]
    return base + [f"--threads={threads}"] if threads else base


def launcher_threads(ctx):
    """The threads per connection `python -m cow.nbdkit` gives nbdkit: {"file": N, "uri": N}."""
    if ctx.launcher_threads is None:
        r = subprocess.run([ctx.python, "-P", "-c",
                            "import json, cow.nbdkit; print(json.dumps(cow.nbdkit.DEFAULT_THREADS))"],
                           capture_output=True, text=True, env=ctx.env, cwd="/", timeout=60)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"cannot import cow.nbdkit (run ./dev setup): {err}")
        ctx.launcher_threads = json.loads(r.stdout)
    return ctx.launcher_threads


def nbd_plugin_args(uri):
    """nbdkit's nbd plugin arguments for an NBD backing: `nbd uri=URI`, as a user stacks nbdkit's
    cow filter on a remote disk (the plugin connects with libnbd, as our engine does)."""
    return ["nbd", f"uri={uri}"]


def cow_params(opts):
    """nbdkit cow parameters (the shim's and the C filter's) from cow_block_size / cow_on_read."""
    out = []
    if opts.get("cow_block_size"):
        out.append(f"cow-block-size={opts['cow_block_size']}")
    if opts.get("cow_on_read"):
        out.append(f"cow-on-read={opts['cow_on_read']}")
    return out


class CowServer(Target):
    name = "cow-server"
    label = "cow.server"
    nbd_backing = True

    def available(self, ctx):
        # cow.server.accept, not the cow.server package, whose import needs no engine.
        r = subprocess.run([ctx.python, "-P", "-c", "import cow.server.accept"],
                           capture_output=True, text=True, env=ctx.env, cwd="/")
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"cannot import cow.server (run ./dev setup): {err}"
        return None

    def command(self, ctx, backing, sock, workdir, cleanup, lock_mode=None, overlay=None,
                cow_block_size=None, cow_on_read=None, overlay_dir=None, keep_overlay=False,
                extra_args=(), **opts):
        # extra_args: more options as a user gives them (the serial section's variants).
        cmd = [ctx.python, "-P", "-m", "cow.server", "-U", sock, *extra_args]
        if overlay_dir:
            # The caller makes and removes it; up to 1000 views are measured: no cap.
            cmd += ["--overlay-dir", str(overlay_dir), "--max-exports", "0"]
        if lock_mode:
            cmd += ["--lock-mode", lock_mode]
        if cow_block_size:
            cmd += ["--cow-block-size", cow_block_size]
        if cow_on_read:
            cmd += ["--cow-on-read", cow_on_read]
        if overlay:
            # A fresh overlay file for every run, removed after it; keep_overlay: the file is
            # the caller's (made fresh or reopened), and the caller removes it.
            if not keep_overlay:
                Path(overlay).unlink(missing_ok=True)
                cleanup.append(overlay)
            cmd += ["--overlay", str(overlay)]
        if isinstance(backing, list):
            # An nbdkit stack: a command backing, started by cow.server on socket activation.
            return cmd + ["--", "nbdkit", *backing]
        return cmd + [backing]


class CowShim(Target):
    name = "cow-shim"
    label = "nbdkit + cow shim"
    nbd_backing = True

    def available(self, ctx):
        try:
            r = subprocess.run([ctx.python, "-P", "-m", "cow.nbdkit", "--print-plugin-path"],
                               capture_output=True, text=True, env=ctx.env, cwd="/", timeout=60)
        except subprocess.TimeoutExpired:
            return "cow.nbdkit --print-plugin-path timed out"
        path = r.stdout.strip()
        if r.returncode != 0 or not path or not os.path.exists(path):
            err = (r.stderr.strip().splitlines() or ["no plugin path printed"])[-1]
            return f"cow.nbdkit --print-plugin-path failed: {err}"
        ctx.shim_path = path
        try:
            launcher_threads(ctx)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return str(e)
        return None

    def command(self, ctx, backing, sock, workdir, cleanup, threads=None, **opts):
        # What `python -m cow.nbdkit BACKING [cow-*=...]` runs: its default threads unless told.
        key = "uri" if "://" in backing else "file"
        threads = threads or launcher_threads(ctx)[key]
        return (nbdkit_base(sock, threads) + ["python", ctx.shim_path, f"{key}={backing}"]
                + cow_params(opts))


class PythonNull(Target):
    """A python plugin whose callbacks do nothing (bench/null_plugin.py): the ceiling of any
    python plugin, the shim included, at the same threads per connection."""

    name = "python-null"
    label = "nbdkit python, do-nothing plugin"

    def available(self, ctx):
        try:
            launcher_threads(ctx)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return str(e)
        return None

    def command(self, ctx, backing, sock, workdir, cleanup, threads=None, **opts):
        threads = threads or launcher_threads(ctx)["file"]
        return nbdkit_base(sock, threads) + ["python", str(NULL_PLUGIN), f"file={backing}"]


class NbdkitCow(Target):
    name = "nbdkit-cow"
    label = "nbdkit cow filter (C)"
    nbd_backing = True

    def command(self, ctx, backing, sock, workdir, cleanup, threads=None, retry=False, **opts):
        # nbdkit's default threads (16) unless told; the filter's parameters after the plugin's.
        # retry: nbdkit's retry filter under the cow filter, reopening the plugin on an error.
        if isinstance(backing, list):
            plugin = backing  # an nbdkit stack: the cow filter on top, in the same process
        elif "://" in backing:
            plugin = nbd_plugin_args(backing)
        else:
            plugin = ["file", backing]
        filters = ["--filter=cow"] + (["--filter=retry"] if retry else [])
        return nbdkit_base(sock, threads) + filters + plugin + cow_params(opts)


class QemuNbd(Target):
    name = "qemu-nbd"
    label = "qemu-nbd qcow2 overlay"

    def command(self, ctx, backing, sock, workdir, cleanup, **opts):
        overlay = Path(workdir) / f"overlay-{Path(sock).stem}.qcow2"
        overlay.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing,
                        str(overlay)], check=True, cwd=workdir)
        cleanup.append(overlay)
        # -t: keep serving after a client leaves; --shared: allow the parallel connections;
        # --discard=unmap: honour trims as the COW engines do.
        return ["qemu-nbd", "-k", sock, "-t", f"--shared={ctx.max_connections}", "--discard=unmap",
                "-f", "qcow2", str(overlay)]


class NbdkitFile(Target):
    name = "nbdkit-file"
    label = "nbdkit file, no COW (ceiling)"

    def command(self, ctx, backing, sock, workdir, cleanup, **opts):
        # Beside the backing: the 16 TiB sparse backing lives on a file system that can hold it.
        copy = Path(backing).parent / f"copy-{Path(sock).stem}.img"
        copy.unlink(missing_ok=True)
        subprocess.run(["cp", "--sparse=always", backing, str(copy)], check=True)
        cleanup.append(copy)
        return nbdkit_base(sock) + ["file", str(copy)]


class DelayedBacking(Target):
    """Not a target: a remote disk, `nbdkit --filter=delay file BACKING rdelay=Nms` with nbdkit's
    default threads, as a user would run it. It advertises multi-conn (nbdkit's file plugin does)
    unless multi_conn=False: then `--filter=multi-conn ... multi-conn-mode=disable` turns it off,
    as for nbdkit's ssh and vddk plugins and most remote sources."""

    name = "delayed-backing"

    def command(self, ctx, backing, sock, workdir, cleanup, delay_ms=2, multi_conn=True, **opts):
        if multi_conn:
            return nbdkit_base(sock) + ["--filter=delay", "file", backing, f"rdelay={delay_ms}ms"]
        return nbdkit_base(sock) + ["--filter=multi-conn", "--filter=delay", "file", backing,
                                    f"rdelay={delay_ms}ms", "multi-conn-mode=disable"]


def serial_stack(image, delay_ms):
    """nbdkit arguments for a remote disk as Debian 12's curl plugin (nbdkit 1.32) serves one: a
    request at a time per connection, no multi-conn, no extents, each read delayed. Without
    --filter=noextents nbdkit's cow filter passes on the file's one data extent and qemu-img reads
    2 MiB at a time through it; over the curl plugin (no extents) the filter answers block status
    a 64 KiB block at a time and qemu-img reads 64 KiB one after another."""
    return ["--filter=noparallel", "--filter=multi-conn", "--filter=noextents", "--filter=delay",
            "file", str(image), "serialize=requests", "multi-conn-mode=disable",
            f"rdelay={delay_ms}ms"]


def http_stack(url, delay_ms):
    """nbdkit arguments for the real thing: the curl plugin (thread model serialize_requests, no
    multi-conn in nbdkit 1.32) over HTTP range requests, each read delayed."""
    return ["--filter=delay", "curl", url, f"rdelay={delay_ms}ms"]


class StackBacking(Target):
    """Not a target: `nbdkit -U SOCK STACK` alone, a backing to copy straight from or to put a
    COW server over by its URI."""

    name = "stack-backing"

    def command(self, ctx, backing, sock, workdir, cleanup, **opts):
        return nbdkit_base(sock) + list(backing)


class HttpServer:
    """lighttpd serving one folder on 127.0.0.1 (range requests, as any static file server)."""

    def __init__(self, folder, workdir, tag):
        self.folder = Path(folder)
        self.conf = Path(workdir) / f"lighttpd-{tag}.conf"
        self.log = Path(workdir) / f"lighttpd-{tag}.log"
        self.proc = None
        self.port = None

    @staticmethod
    def available():
        import shutil
        if shutil.which("lighttpd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")):
            return None
        return "lighttpd is not installed (apt-get install -y lighttpd)"

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self, timeout=30.0):
        import socket
        import shutil
        exe = shutil.which("lighttpd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
        for _ in range(5):
            with socket.socket() as s:  # a free port (closed again: retried if taken meanwhile)
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.conf.write_text(
                f'server.document-root = "{self.folder}"\n'
                f'server.bind = "127.0.0.1"\n'
                f'server.port = {self.port}\n'
                f'server.errorlog = "{self.log}"\n'
                f'mimetype.assign = ("" => "application/octet-stream")\n')
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen([exe, "-D", "-f", str(self.conf)],
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            _STARTED[self.proc.pid] = self.proc
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError("lighttpd did not start:\n" + log_tail(self.log))

    def stop(self):
        if self.proc is not None:
            _stop_proc(self.proc)
            self.proc = None


ALL_TARGETS = [CowServer(), CowShim(), PythonNull(), NbdkitCow(), QemuNbd(), NbdkitFile()]
REFERENCE = "nbdkit-cow"
BY_NAME = {t.name: t for t in ALL_TARGETS}
