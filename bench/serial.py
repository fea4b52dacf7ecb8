"""Remote disks as users have them (issue 19): a backing that serves one request at a time per
connection and does not advertise multi-conn, as Debian 12's curl, ssh and vddk plugins (nbdkit
1.32) do; and a backing that drops: killed with SIGKILL and started again on the same socket.

Two sections of bench/run.py:

- `serial`: for each kind of backing (`file`: nbdkit's noparallel, multi-conn and delay filters
  over a file, which behaves as the curl plugin does; `http`: lighttpd on 127.0.0.1 and `nbdkit
  curl` with the delay filter, the real thing; `file` adds --filter=noextents, as the curl plugin
  has no extents) and each delay, time a whole copy with `nbdcopy -C
  4` and with `qemu-img convert` through three things a user would run:
    cow.server -U SOCK -- nbdkit STACK          (a command backing, started by cow.server)
    nbdkit -U SOCK --filter=cow STACK           (nbdkit's filter, one process)
    nbdkit -U SOCK STACK, copied straight       (no COW: the ceiling; nbdcopy only)
- `drop`: `nbdcopy -C 4` of the whole disk to a file through cow.server and through nbdkit's
  filter (with and without `--filter=retry`), both over `nbd+unix:///?socket=BACKING_SOCK`, while
  the backing nbdkit (the `file` stack) is killed with SIGKILL and started again on the same socket
  every 2 s; reported: completed or not, seconds, restarts during the copy, bytes identical (cmp).
"""

import errno
import filecmp
import os
import shlex
import subprocess
import time
from pathlib import Path

import report
import targets as tg
import workloads as wl

KINDS = [("file", "serialized file"), ("http", "HTTP, nbdkit curl")]
CLIENTS = [("nbdcopy", "nbdcopy -C {c}"), ("qemu-img", "qemu-img convert")]
# (column, heading, target, options): cow.server's variants (--serial-cow-args) come after
# the first column.
COLUMNS = [
    ("cow-server", "cow.server -- nbdkit STACK", "cow-server", {}),
    ("nbdkit-cow", "nbdkit --filter=cow STACK", "nbdkit-cow", {}),
    ("ceiling", "nbdcopy straight from nbdkit STACK", None, {}),
]
DROP_CONFIGS = [
    ("cow-server", "cow.server nbd+unix:///?socket=B", "cow-server", {}),
    ("nbdkit-cow", "nbdkit --filter=cow nbd uri=nbd+unix:///?socket=B", "nbdkit-cow", {}),
    ("nbdkit-cow-retry", "nbdkit --filter=cow --filter=retry nbd uri=nbd+unix:///?socket=B",
     "nbdkit-cow", {"retry": True}),
]


def variants(cow_args):
    """Columns for cow.server with extra options, one per --serial-cow-args string: (serial
    column, drop configuration)."""
    out = []
    for i, text in enumerate(cow_args or (), 1):
        args = shlex.split(text)
        out.append(((f"cow-server-{i}", f"cow.server {text} -- nbdkit STACK", "cow-server",
                     {"extra_args": args}),
                    (f"cow-server-{i}", f"cow.server {text} nbd+unix:///?socket=B", "cow-server",
                     {"extra_args": args})))
    return out


def key(kind, delay, client):
    return f"serial-{kind}-{delay}ms-{client}"


def wl_size(n):
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} bytes"


def errno_name(text):
    """The errno name whose message appears in text (nbdcopy prints strerror), else None."""
    for num in (errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN,
                errno.ECONNREFUSED, errno.ENOENT, errno.ETIMEDOUT, errno.EINVAL):
        if os.strerror(num) in text:
            return errno.errorcode[num]
    return None


class Serial:
    """State of the two sections in one bench run."""

    def __init__(self, bench):
        self.bench = bench
        a = bench.a
        self.folder = bench.workdir / "serial"
        self.images = {}          # size -> image path
        self.http = None          # HttpServer, when lighttpd is there
        self.http_skipped = None  # why the HTTP rows were skipped
        self.multi_conn = {}      # (kind, column) -> what the server or backing advertised
        self.drop = []            # one dict per drop run
        # (delay, client) -> image size
        self.sizes = {(d, "nbdcopy"): n for d, n in zip(a.serial_delays, a.serial_sizes)}
        self.sizes.update({(d, "qemu-img"): n for d, n in zip(a.serial_delays,
                                                               a.serial_qemu_sizes)})
        extra = variants(a.serial_cow_args)
        self.columns = COLUMNS[:1] + [c for c, _ in extra] + COLUMNS[1:]
        self.drop_configs = DROP_CONFIGS[:1] + [d for _, d in extra] + DROP_CONFIGS[1:]

    def image(self, size):
        if size not in self.images:
            self.folder.mkdir(exist_ok=True)
            self.bench.log(f"making a {wl_size(size)} random image (no holes) for the serial rows")
            self.images[size] = wl.make_random(self.folder / f"disk-{size}.img", size)
        return self.images[size]

    def prepare(self):
        a = self.bench.a
        if "serial" in a.workloads:
            for size in sorted(set(self.sizes.values())):
                self.image(size)
            if "http" in a.serial_kinds:
                why = tg.HttpServer.available()
                if why:
                    self.http_skipped = why
                    self.bench.log(f"serial: HTTP rows skipped: {why}")
                else:
                    self.http = tg.HttpServer(self.folder, self.bench.workdir, "serial").start()
                    self.bench.log(f"serial: lighttpd serving {self.folder} on "
                                   f"127.0.0.1:{self.http.port}")
        if "drop" in a.workloads:
            self.image(a.drop_size)

    def stop(self):
        if self.http:
            self.http.stop()

    def kinds(self):
        return [k for k in self.bench.a.serial_kinds if k != "http" or self.http]

    def stack(self, kind, delay, size):
        img = self.image(size)
        if kind == "http":
            return tg.http_stack(self.http.url(img.name), delay)
        return tg.serial_stack(img, delay)

    def runs(self):
        out = []
        for kind in self.kinds():
            for delay in self.bench.a.serial_delays:
                for client, _ in CLIENTS:
                    for config in self.columns:
                        if config[0] == "ceiling" and client != "nbdcopy":
                            continue
                        out.append((kind, delay, client, config))
        return out

    def round(self, rnd):
        runs = self.runs()
        k = rnd * len(runs) // max(1, self.bench.a.serial_rounds)
        for run in runs[k:] + runs[:k]:
            self.once(*run)

    # One copy: a fresh server (and backing) for it.
    def once(self, kind, delay, client, config):
        column, _, target, opts = config
        b = self.bench
        size = self.sizes[(delay, client)]
        stack = self.stack(kind, delay, size)
        k = key(kind, delay, client)

        def go():
            if target is None:
                server = b.start(tg.StackBacking(), stack)
            else:
                server = b.start(tg.BY_NAME[target], stack, **opts)
            with server:
                self.multi_conn[(kind, column)] = server.multi_conn
                secs = self.copy(client, server.uri, self.image(size))
            b.results.add(k, column, secs)
            b.log(f"{k:<28} {column:<11} {secs:6.2f} s ({size / wl.MiB / secs:.0f} MiB/s)")
        b.attempt(k, column, go)

    def copy(self, client, uri, image):
        """Seconds for the client to copy the whole export; a qemu-img copy is compared with the
        image (nbdcopy's too when --copy-to file)."""
        b = self.bench
        out = b.workdir / "serial-copy.img"
        out.unlink(missing_ok=True)
        if client == "qemu-img":
            cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)]
        else:
            dest = "null:" if b.a.copy_to == "null" else str(out)
            cmd = ["nbdcopy", "-C", str(b.a.copy_connections), uri, dest]
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=b.workdir, capture_output=True, text=True,
                               timeout=b.a.serial_timeout)
            secs = time.monotonic() - t0
            if r.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-800:]}")
            if out.exists() and not filecmp.cmp(out, image, shallow=False):
                raise RuntimeError(f"{cmd[0]}: the copy differs from the image")
            return secs
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cmd[0]} did not finish within {b.a.serial_timeout:g} s")
        finally:
            out.unlink(missing_ok=True)

    # The drop row: one copy per configuration, once per run (in the first round).
    def drop_all(self):
        for column, _, target, opts in self.drop_configs:
            self.drop_once(column, target, opts)

    def drop_once(self, column, target_name, opts):
        b, a = self.bench, self.bench.a
        image = self.image(a.drop_size)
        stack = tg.serial_stack(image, a.drop_delay_ms)
        backing = tg.StackBacking()
        target = tg.BY_NAME[target_name]
        out = b.workdir / "drop-copy.img"
        errlog = b.workdir / "drop-nbdcopy.err"
        row = {"column": column, "size": a.drop_size, "delay_ms": a.drop_delay_ms,
               "every_s": a.drop_every}

        def go():
            back = backing.start(b.ctx, stack, b.workdir, "drop")
            server = p = None
            try:
                server = target.start(b.ctx, back.uri, b.workdir, b.tag(), **opts)
                out.unlink(missing_ok=True)
                with open(errlog, "wb") as ef:
                    t0 = time.monotonic()
                    p = subprocess.Popen(["nbdcopy", "-C", str(a.copy_connections), server.uri,
                                          str(out)], cwd=b.workdir, stdin=subprocess.DEVNULL,
                                         stdout=ef, stderr=ef)
                tg._STARTED[p.pid] = p
                restarts, timed_out = 0, False
                next_kill = t0 + a.drop_every
                while p.poll() is None:
                    now = time.monotonic()
                    if now - t0 > a.drop_timeout:
                        timed_out = True
                        p.kill()
                        p.wait()
                        break
                    if now >= next_kill:
                        back.proc.kill()   # SIGKILL: nbdkit ignores SIGTERM with a client on
                        back.proc.wait()
                        tg._STARTED.pop(back.proc.pid, None)
                        back = backing.start(b.ctx, stack, b.workdir, "drop")
                        restarts += 1
                        next_kill = time.monotonic() + a.drop_every
                    time.sleep(0.02)
                secs = time.monotonic() - t0
                rc = p.returncode
                alive = server.proc.poll() is None
            finally:
                if p is not None and p.poll() is None:  # the bench itself failed midway
                    p.kill()
                    p.wait()
                if p is not None:
                    tg._STARTED.pop(p.pid, None)
                if server:
                    server.stop()
                back.stop()
            err = errlog.read_text(errors="replace").strip().splitlines()
            try:  # what nbdcopy had written (a sparse file: its allocated bytes)
                written = min(out.stat().st_blocks * 512, a.drop_size)
            except OSError:
                written = 0
            row.update(seconds=secs, restarts=restarts, server_alive=alive, written=written)
            if timed_out:
                row.update(completed=False, identical=None,
                           outcome=f"did not finish within {a.drop_timeout:g} s")
            elif rc != 0:
                last = err[-1] if err else f"exit {rc}"
                name = errno_name("\n".join(err))
                row.update(completed=False, identical=None, message=last[-300:],
                           outcome=f"failed: {name or 'nbdcopy exit ' + str(rc)} after "
                                   f"{secs:.1f} s")
            else:
                same = filecmp.cmp(out, image, shallow=False)
                few = (" (fewer than six restarts: give a larger --drop-size)"
                       if restarts < 6 else "")
                row.update(completed=True, identical=same,
                           outcome=f"completed in {secs:.1f} s{few}")
            out.unlink(missing_ok=True)
            self.drop.append(row)
            b.results.add(f"drop-seconds-{'ok' if row['completed'] else 'failed'}", column, secs)
            b.log(f"{'drop':<16} {column:<17} {row['outcome']}, {restarts} restarts, "
                  f"identical: {row['identical']}"
                  + (f" ({row['message']})" if row.get("message") else ""))
        b.attempt("drop", column, go)

    # The report.
    def render(self):
        a = self.bench.a
        out = []
        if "serial" in a.workloads:
            out += self.render_serial()
        if "drop" in a.workloads and (self.drop or any(
                w == "drop" for w, _, _ in self.bench.results.errors)):
            out += self.render_drop()
        return out

    def render_serial(self):
        a, res = self.bench.a, self.bench.results
        c = a.copy_connections
        out = ["## Remote disks as users have them: one request at a time, no multi-conn\n"]
        sizes = "; ".join(f"at {d} ms, {wl_size(self.sizes[(d, 'nbdcopy')])} for nbdcopy and "
                          f"{wl_size(self.sizes[(d, 'qemu-img')])} for qemu-img"
                          for d in a.serial_delays)
        url = "http://127.0.0.1:PORT/disk.img"
        out.append(
            f"STACK, `file`: `--filter=noparallel --filter=multi-conn --filter=noextents "
            f"--filter=delay file IMG serialize=requests multi-conn-mode=disable rdelay=Nms` (a "
            f"request at a time per connection, no multi-conn, no extents: as Debian 12's curl "
            f"plugin); `http`: `--filter=delay curl {url} rdelay=Nms`, lighttpd serving the "
            f"image on localhost (the curl plugin's thread model is serialize_requests). Images "
            f"of random data (no holes): {sizes} (nbdcopy's threads, one per core here and "
            f"capping its connections, each take 128 MiB at a time: below 256 MiB one connection "
            f"does the whole copy; nbdkit's filter with qemu-img reads 64 KiB blocks one after "
            f"another). Each copy gets fresh servers: cow.server runs the backing as a command "
            f"(`cow.server -U SOCK -- nbdkit STACK`, as its --help shows for `nbdkit "
            f"curl`); nbdkit's filter sits on the same stack in one process (`nbdkit "
            f"--filter=cow STACK`, as a user of the curl plugin runs it); the ceiling is `nbdkit "
            f"-U SOCK STACK` copied straight, no COW. Clients: `nbdcopy -C {c} URI "
            f"{'null:' if a.copy_to == 'null' else 'OUT'}` and `qemu-img convert -f raw -O raw "
            f"URI OUT` (OUT a file in the scratch folder, compared with the image). Seconds, "
            f"medians of {a.serial_rounds} round(s) (`--serial-rounds`); ratios are speed (MiB/s "
            f"over MiB/s: for the same image, the other's time over cow.server's), >1 is "
            f"cow.server faster.\n")
        if self.http_skipped:
            out.append(f"HTTP rows skipped: {self.http_skipped}.\n")
        out.append("| backing, delay, size | client | "
                   + " | ".join(f"{h} (s)" for _, h, _, _ in self.columns)
                   + " | cow.server ÷ nbdkit filter | cow.server ÷ straight nbdcopy |")
        out.append("|---|---|" + "---|" * (len(self.columns) + 2))
        errors = {(w, col) for w, col, _ in res.errors}
        for kind in self.kinds():
            for delay in a.serial_delays:
                straight = res.median(key(kind, delay, "nbdcopy"), "ceiling")
                for client, ctitle in CLIENTS:
                    k = key(kind, delay, client)
                    cells = []
                    nbk = res.median(k, "nbdkit-cow")
                    for column, _, _, _ in self.columns:
                        v = res.median(k, column)
                        if column == "ceiling" and client != "nbdcopy":
                            cells.append("")
                        elif v is None:
                            cells.append("error" if (k, column) in errors else "—")
                        else:
                            cells.append(report.fmt_value(v, "s"))
                            r = report.ratio(v, nbk, False)
                            if column.startswith("cow-server-") and r:
                                cells[-1] += f" ({r:.2f}×)"  # a variant: against the filter
                    cow = res.median(k, "cow-server")
                    r1 = report.ratio(cow, nbk, False)
                    # Against the straight copy by speed (MiB/s): qemu-img's image is smaller.
                    size, ssize = self.sizes[(delay, client)], self.sizes[(delay, "nbdcopy")]
                    r2 = report.ratio(size / cow if cow else None,
                                      ssize / straight if straight else None, True)
                    cells.append(f"**{r1:.2f}×**" if r1 else "—")
                    cells.append(f"{r2:.2f}×" if r2 else "—")
                    out.append(f"| {kind}, {delay} ms, {wl_size(self.sizes[(delay, client)])} | "
                               f"{ctitle.format(c=c)} | " + " | ".join(cells) + " |")
        adv = sorted(f"{col} ({kind}): {'yes' if mc else 'no'}"
                     for (kind, col), mc in self.multi_conn.items())
        if adv:
            out.append("\nMulti-conn advertised to the client (nbdcopy opens one connection "
                       "without it): " + ", ".join(adv) + ".")
        out.append("\nIssue 19's targets: nbdcopy ≥ 2.0× nbdkit's filter and ≥ 2.5× straight "
                   "nbdcopy; qemu-img convert ≥ 10× nbdkit's filter.\n")
        return out

    def render_drop(self):
        a = self.bench.a
        out = ["## A backing that drops: killed and restarted every "
               f"{a.drop_every:g} s during a copy\n"]
        out.append(
            f"Backing B: `nbdkit -U B --filter=noparallel --filter=multi-conn --filter=noextents "
            f"--filter=delay file IMG serialize=requests multi-conn-mode=disable "
            f"rdelay={a.drop_delay_ms}ms`, "
            f"{wl_size(a.drop_size)} of random data. On top, over `nbd+unix:///?socket=B`: each "
            f"configuration below, then `nbdcopy -C {a.copy_connections} URI OUT` of the whole "
            f"disk to a file; {a.drop_every:g} s after the copy starts, and {a.drop_every:g} s after "
            f"each restart, the backing is killed (SIGKILL) and started again on the same "
            f"socket, until the copy ends (or "
            f"{a.drop_timeout:g} s pass). One run each. Identical: OUT compared with IMG (cmp).\n")
        out.append("| configuration | result | seconds | backing restarts during the copy | "
                   "bytes identical | server still running |")
        out.append("|---|---|---|---|---|---|")
        labels = {c: label for c, label, _, _ in self.drop_configs}
        for row in self.drop:
            ident = {True: "yes", False: "**no**", None: "—"}[row["identical"]]
            done = "" if row["completed"] else f" ({row['written'] / wl.MiB:.0f} MiB written)"
            out.append(f"| {labels[row['column']]} | {row['outcome']}{done} | "
                       f"{row['seconds']:.1f} | {row['restarts']} | {ident} | "
                       f"{'yes' if row['server_alive'] else 'no'} |")
        done_cols = {row["column"] for row in self.drop}
        for column, label, _, _ in self.drop_configs:
            if column not in done_cols and any(w == "drop" and c == column
                                               for w, c, _ in self.bench.results.errors):
                out.append(f"| {label} | error of the bench (see Notes) | | | | |")
        msgs = [f"{labels[r['column']]}: `{r['message']}`" for r in self.drop if r.get("message")]
        if msgs:
            out.append("\nnbdcopy's last line: " + "; ".join(msgs) + ".")
        out.append("\nIssue 19's target: a whole copy through six backing restarts completes with "
                   "identical bytes.\n")
        return out
