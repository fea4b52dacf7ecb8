"""Several connections to an NBD backing, whether or not it advertises multi-conn (issue 19, item 1):
a backing that serves one request at a time per connection and lacks multi-conn (as nbdkit's
curl, ssh and vddk plugins) gets extra connections as load needs them, up to
--backing-connections; a backing that never greets an extra connection (qemu-nbd without
--shared) or refuses it is served through the first, and the log says so once.  The backing is
real nbdkit or qemu-nbd; the connections it saw are counted in nbdkit's log filter."""

import os
import re
import subprocess
import time

import nbd
import pytest

from conftest import wait_for_socket, write_sample
from support_server import server_command, start_server

MiB = 1 << 20
SERIALIZED = ("--filter=noparallel", "--filter=multi-conn", "--filter=delay")
SERIALIZED_PARAMS = ("serialize=requests", "multi-conn-mode=disable")


def connections_seen(log):
    return len(re.findall(r"connection=\d+ Connect ", log.read_text()))


def serialized_backing(nbdkit, disk, log, rdelay="20ms"):
    """nbdkit over a file: one request at a time per connection, no multi-conn (as Debian 12's
    curl plugin), each read taking rdelay; its log filter records each connection."""
    return nbdkit("--filter=log", *SERIALIZED, "file", disk, f"logfile={log}",
                  *SERIALIZED_PARAMS, f"rdelay={rdelay}")


def copy_through(uri, out, timeout=120):
    subprocess.run(["nbdcopy", "-C", "4", uri, str(out)], check=True, timeout=timeout)


def test_cli_repeats_the_backings_default():
    """--help shows the default without importing the engine."""
    from cow import backing, cli
    assert cli.DEFAULT_BACKING_CONNECTIONS == backing.DEFAULT_CONNECTIONS
    assert cli.DEFAULT_BACKING_CONNECTIONS_MULTI_CONN == backing.DEFAULT_CONNECTIONS_MULTI_CONN


@pytest.mark.parametrize("bad", ["0", "65", "x"])
def test_backing_connections_out_of_range_is_one_line(tmp_path, bad):
    r = subprocess.run(server_command(None, "-U", tmp_path / "s.sock", "--backing-connections",
                                      bad), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert "--backing-connections" in lines[-1] and "1 to 64" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_a_serialized_backing_gets_extra_connections(nbdkit, tmp_path):
    """nbdcopy -C 4 through the server over a serialized, no-multi-conn backing: the backing sees
    more than one connection (at most the default limit) and the copy is identical."""
    from cow.backing import DEFAULT_CONNECTIONS
    disk = write_sample(tmp_path / "base.img", 16 * MiB, holes=False)
    log = tmp_path / "backing.log"
    back = serialized_backing(nbdkit, disk, log)
    out = tmp_path / "out.img"
    with start_server(back, tmp_path=tmp_path) as (uri, proc):
        copy_through(uri, out)
        server_log = proc.log_path.read_text()
    assert out.read_bytes() == disk.read_bytes()
    seen = connections_seen(log)
    assert 2 <= seen <= DEFAULT_CONNECTIONS, seen
    assert "extra connection" not in server_log, server_log


def test_the_limit_is_respected(nbdkit, tmp_path):
    """--backing-connections 1: the backing sees one connection, however busy; 3: at most 3."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    for limit in (1, 3):
        log = tmp_path / f"backing{limit}.log"
        back = serialized_backing(nbdkit, disk, log)
        out = tmp_path / "out.img"
        with start_server(back, "--backing-connections", limit, tmp_path=tmp_path) as (uri, _):
            copy_through(uri, out)
        assert out.read_bytes() == disk.read_bytes()
        seen = connections_seen(log)
        assert (seen == 1) if limit == 1 else (2 <= seen <= limit), (limit, seen)


def busy_reads(uri, size, handles=4, depth=8, rounds=3):
    """Several libnbd handles with reads in flight at once; the bytes read, by offset."""
    hs = []
    got = {}
    for _ in range(handles):
        h = nbd.NBD()
        h.connect_uri(uri)
        hs.append(h)
    chunk = 256 * 1024
    offsets = list(range(0, size, chunk))
    for _ in range(rounds):
        pending = []
        for i, off in enumerate(offsets):
            h = hs[i % handles]
            buf = nbd.Buffer(chunk)
            pending.append((h, h.aio_pread(buf, off), buf, off))
            if len(pending) >= handles * depth:
                for h2, cookie, b, o in pending:
                    while not h2.aio_command_completed(cookie):
                        h2.poll(-1)
                    got[o] = b.to_bytearray()
                pending = []
        for h2, cookie, b, o in pending:
            while not h2.aio_command_completed(cookie):
                h2.poll(-1)
            got[o] = b.to_bytearray()
    for h in hs:
        h.shutdown()
    return got


def test_an_extra_connection_never_greeted(tmp_path):
    """qemu-nbd without --shared takes one client: a second connection is accepted and never
    greeted.  The server serves through the first, gives up on the extra one within a bound,
    says so once in its log, and goes on serving (no hang)."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    sock = tmp_path / "qemu.sock"
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", str(sock), str(disk)],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_socket_quietly(sock)
        back = f"nbd+unix:///?socket={sock}"
        with start_server(back, tmp_path=tmp_path) as (uri, proc):
            data = disk.read_bytes()
            deadline = time.monotonic() + 60
            while "extra connection" not in proc.log_path.read_text():
                assert time.monotonic() < deadline, proc.log_path.read_text()
                got = busy_reads(uri, 8 * MiB, rounds=1)
                assert all(got[o] == data[o:o + len(got[o])] for o in got)
            t0 = time.monotonic()
            got = busy_reads(uri, 8 * MiB, rounds=2)     # no waiting for another attempt
            assert time.monotonic() - t0 < 30
            assert all(got[o] == data[o:o + len(got[o])] for o in got)
            log = proc.log_path.read_text()
        lines = [ln for ln in log.splitlines() if "extra connection" in ln]
        assert len(lines) == 1, log
        assert "no NBD greeting within 5 s" in lines[0] and "serving through 1" in lines[0], log
        assert back in lines[0] and "Traceback" not in log
    finally:
        qemu.kill()
        qemu.wait()


def wait_for_socket_quietly(sock, timeout=20):
    """qemu-nbd without --shared serves one client and then exits: wait for its socket without
    connecting to it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, f"{sock} did not appear"
        time.sleep(0.02)


def test_an_extra_connection_refused(nbdkit, tmp_path):
    """nbdkit's limit filter (limit=1) closes a second client: the server goes on through the
    first, and says so once."""
    disk = write_sample(tmp_path / "base.img", 8 * MiB, holes=False)
    back = nbdkit("--filter=limit", *SERIALIZED, "file", disk, "limit=1", *SERIALIZED_PARAMS,
                  "rdelay=5ms")
    out = tmp_path / "out.img"
    with start_server(back, tmp_path=tmp_path) as (uri, proc):
        copy_through(uri, out)
        copy_through(uri, out)
        log = proc.log_path.read_text()
    assert out.read_bytes() == disk.read_bytes()
    lines = [ln for ln in log.splitlines() if "extra connection" in ln]
    assert len(lines) == 1 and "serving through 1" in lines[0], log
    assert "Traceback" not in log


def test_a_command_backing_gets_extra_connections(tmp_path):
    """A backing command (nbdkit, on the server's own socket) takes several connections; the
    socket's folder is removed when the server stops."""
    disk = write_sample(tmp_path / "base.img", 16 * MiB, holes=False)
    log = tmp_path / "backing.log"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    out = tmp_path / "out.img"
    with start_server(None, "--", "nbdkit", "--filter=log", *SERIALIZED, "file", disk,
                      f"logfile={log}", *SERIALIZED_PARAMS, "rdelay=20ms",
                      tmp_path=tmp_path, env=env) as (uri, proc):
        assert [p.name.startswith("cow-backing-") for p in tmp.iterdir()] == [True]
        copy_through(uri, out)
    assert out.read_bytes() == disk.read_bytes()
    assert connections_seen(log) >= 2
    assert list(tmp.iterdir()) == [], "the command's socket folder was left behind"
