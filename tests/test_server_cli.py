"""The command line of python -m cow.server: help, errors, captive mode, socket activation, TCP."""

import re
import signal
import subprocess

import nbd
import pytest

from support_server import PYTHON, server_command, start_server

SIZE = 1024 * 1024


def run(args, timeout=60, **kw):
    return subprocess.run(server_command(*args) if args else server_command(None), timeout=timeout,
                          capture_output=True, text=True, **kw)


def test_help_documents_every_option_with_examples():
    r = run([None, "--help"])
    assert r.returncode == 0
    for opt in ("--unix", "--port", "--ipaddr", "--readonly", "--exportname", "--threads",
                "--pidfile", "--run", "--cow-block-size", "--cow-on-read", "--cow-on-cache",
                "--lock-mode", "--overlay-max-size", "--tmpdir", "--verbose", "BACKING"):
        assert opt in r.stdout, opt
    assert "examples:" in r.stdout
    assert "nbdinfo --map -- [ python -m cow.server disk.img ]" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--no-such-option"], "unrecognized arguments"),
    (["--lock-mode", "coarse"], "invalid choice"),
    (["-p", "99999"], "out of range"),
    (["--cow-on-read", "maybe"], "absolute path"),
    (["--threads", "-3"], "expected a number"),
    (["-e", "x" * 4097], "4096 bytes"),
    (["-e", "caf\udce9"], "UTF-8"),   # argv bytes that are not UTF-8 (b"caf\xe9")
])
def test_bad_option_is_one_clear_line(backing_factory, args, words):
    disk = backing_factory(SIZE)
    r = run([disk, "-U", "/nonexistent/x.sock", *args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing.img", "No such file or directory"),
    (lambda tmp: tmp, "Is a directory"),
])
def test_unreadable_backing_is_one_clear_line(tmp_path, make, words):
    r = run([make(tmp_path), "-U", tmp_path / "s.sock"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open backing" in lines[0] and words in lines[0], r.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("args, words", [
    (["--cow-block-size", "3000"], "--cow-block-size"),
    (["--overlay-max-size", "lots"], "--overlay-max-size"),
    (["--tmpdir", "/nonexistent-dir"], "--tmpdir"),
])
def test_bad_engine_option_is_one_clear_line(backing_factory, tmp_path, args, words):
    r = run([backing_factory(SIZE), "-U", tmp_path / "s.sock", *args])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_socket_path_that_cannot_be_bound(backing_factory, tmp_path):
    r = run([backing_factory(SIZE), "-U", tmp_path / "no-dir" / "s.sock"])
    assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_captive_run_sets_variables_and_returns_the_status(backing_factory, tmp_path):
    disk = backing_factory(SIZE)
    out = tmp_path / "vars.txt"
    r = run([disk, "-e", "exp", "--run",
             f'echo "$uri|$unixsocket|$port|$exportname" > {out}; nbdinfo --size "$uri"; exit 7'])
    assert r.returncode == 7, r.stderr
    uri, sock, port, name = out.read_text().strip().split("|")
    assert uri == f"nbd+unix:///exp?socket={sock}" and port == "" and name == "exp"
    assert r.stdout.strip() == str(SIZE)


def test_captive_run_copies_the_export(backing_factory, tmp_path):
    disk = backing_factory(SIZE)
    copy = tmp_path / "copy.img"
    r = run([disk, "-U", tmp_path / "s.sock", "--run", f'nbdcopy "$uri" {copy}'])
    assert r.returncode == 0, r.stderr
    assert copy.read_bytes() == disk.read_bytes()
    assert not (tmp_path / "s.sock").exists()


def test_captive_run_over_tcp(backing_factory):
    disk = backing_factory(SIZE)
    r = run([disk, "-p", "0", "--run", 'echo "$port $uri"; nbdinfo --size "$uri"'])
    assert r.returncode == 0, r.stderr
    port, uri, size = r.stdout.split()
    assert uri == f"nbd://127.0.0.1:{port}" and size == str(SIZE)


def test_systemd_socket_activation_with_nbdinfo(backing_factory):
    disk = backing_factory(SIZE)
    cmd = ["nbdinfo", "--json", "--", "[", *server_command(disk), "]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import json
    info = json.loads(r.stdout)
    assert info["exports"][0]["export-size"] == SIZE
    r = subprocess.run(["nbdinfo", "--map", "--", "[", *server_command(disk), "]"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hole,zero" in r.stdout and "data" in r.stdout


def test_socket_activation_with_libnbd(backing_factory):
    disk = backing_factory(SIZE)
    h = nbd.NBD()
    h.connect_systemd_socket_activation(server_command(disk, "-r"))
    assert h.get_size() == SIZE and h.is_read_only()
    assert h.pread(100, 0) == disk.read_bytes()[:100]
    h.shutdown()


def test_tcp_listener_and_startup_line(backing_factory):
    disk = backing_factory(SIZE)
    proc = subprocess.Popen(server_command(disk, "-p", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"serving (\S+) \((\d+) bytes.* at (nbd://127\.0\.0\.1:(\d+))$", line.strip())
        assert m, line
        assert m.group(1) == str(disk) and int(m.group(2)) == SIZE
        h = nbd.NBD()
        h.connect_uri(m.group(3))
        assert h.pread(512, 0) == disk.read_bytes()[:512]
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_python_path_is_not_needed():
    """The module runs from the installed package (-P): the help works from any directory."""
    r = subprocess.run([PYTHON, "-P", "-m", "cow.server", "--help"], cwd="/", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_console_script_and_module_share_one_command_line():
    """The cow-server script (pyproject) and python -m cow.server (cow/server/__main__.py) run
    the same cow.cli.main."""
    from pathlib import Path

    script = Path(PYTHON).parent / "cow-server"
    r = subprocess.run([str(script), "--help"], cwd="/", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage: python -m cow.server" in r.stdout, r.stderr
    r = subprocess.run([PYTHON, "-P", "-m", "cow.server", "--no-such-option"], cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr, r.stderr


def test_console_scripts_for_the_tools_and_the_shim():
    """cow-overlay (python -m cow.overlay) and cow-nbdkit (python -m cow.nbdkit) beside
    cow-server, from any folder."""
    from pathlib import Path

    bin_dir = Path(PYTHON).parent
    r = subprocess.run([str(bin_dir / "cow-overlay"), "--help"], cwd="/", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "commit" in r.stdout and "export" in r.stdout, r.stderr
    r = subprocess.run([str(bin_dir / "cow-nbdkit"), "--print-plugin-path"], cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("nbdkit_plugin.py"), r.stderr


def test_a_stale_socket_is_replaced_a_live_one_refused(backing_factory, tmp_path):
    """After kill -9 the socket file stays: a restart on it works (as qemu-nbd); a socket some
    server still listens on, or a file that is not a socket, is left alone."""
    import socket as socketlib
    disk = backing_factory(SIZE)
    sock = tmp_path / "s.sock"
    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(str(sock))
    stale.close()                       # the file stays, nobody listens: as after kill -9
    r = run([disk, "-U", sock, "--run", 'nbdinfo --size "$uri"'])
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr

    sock.unlink(missing_ok=True)       # (the server removed its own at exit)
    live = socketlib.socket(socketlib.AF_UNIX)
    live.bind(str(sock))
    live.listen()
    try:
        inode = sock.stat().st_ino
        r = run([disk, "-U", sock, "--run", "true"])
        assert r.returncode == 1 and "cannot listen" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert sock.stat().st_ino == inode      # still the live server's socket
    finally:
        live.close()

    plain = tmp_path / "plain"
    plain.write_text("mine")
    r = run([disk, "-U", plain, "--run", "true"])
    assert r.returncode == 1 and "cannot listen" in r.stderr and plain.read_text() == "mine"


def test_conventions_of_nbdkit_and_qemu_nbd(backing_factory, tmp_path):
    """-V/--version, -f accepted (always in the foreground), -U with -p refused, a URL backing
    gets the nbdkit plugin to put in front of it."""
    from cow import __version__
    for flag in ("-V", "--version"):
        r = run([None, flag])
        assert r.returncode == 0 and r.stdout.strip() == f"cow.server {__version__}", r.stderr
    disk = backing_factory(SIZE)
    r = run([disk, "-f", "--run", 'nbdinfo --size "$uri"'])
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
    r = run([disk, "-U", tmp_path / "s.sock", "-p", "10809"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "-U and -p" in lines[0], r.stderr
    assert not (tmp_path / "s.sock").exists()
    r = run(["https://example.com/disk.img", "-U", tmp_path / "s.sock"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "-- nbdkit curl https://example.com/disk.img" in lines[0]


def test_a_fifo_as_backing_is_refused_at_once(tmp_path):
    import os
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    r = run([fifo, "-U", tmp_path / "s.sock"], timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "not a regular file or block device" in lines[0]


def test_socket_activation_prints_nothing_into_the_clients_terminal(backing_factory):
    """nbdinfo [ cow.server ... ]: the client's stderr is the server's; the start-up line is
    for -v only (nbdkit prints none either)."""
    disk = backing_factory(SIZE)
    r = subprocess.run(["nbdinfo", "--size", "--", "[", *server_command(disk), "]"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr
    assert "serving" not in r.stderr, r.stderr
    r = subprocess.run(["nbdinfo", "--size", "--", "[", *server_command(disk, "-v"), "]"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serving" in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--cow-block-size", "-4K"], "--cow-block-size: invalid cow block size '-4K'"),
    (["--cow-block-size", "4M"], "--cow-block-size 4M: larger than the disk"),
    (["--overlay-max-size", "0"], "--overlay-max-size 0 is smaller than one block"),
    (["--overlay-max-size", "-1"], "--overlay-max-size"),
])
def test_option_values_are_named_as_typed(backing_factory, tmp_path, args, words):
    r = run([backing_factory(SIZE), "-U", tmp_path / "s.sock", *args])
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2) and len(lines) == 1 and words in lines[0], r.stderr
    assert "overlay_max_size" not in r.stderr and "expected one argument" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_moved_backing_is_named_as_the_overlays_and_naming_it_works(tmp_path):
    import os
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * SIZE)
    ov = tmp_path / "vm.cow"
    r = run([disk, "--overlay", ov, "--run", "true"])
    assert r.returncode == 0, r.stderr
    moved = tmp_path / "moved.img"
    os.rename(disk, moved)
    r = run([None, "--overlay", ov, "-U", tmp_path / "s.sock"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"that --overlay {ov} records" in lines[0] and "if it moved, name it" in lines[0]
    r = run([moved, "--overlay", ov, "--run", 'nbdinfo --size "$uri"'])
    assert r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr


@pytest.mark.parametrize("threads, cap", [(None, 64), ("5", 5)])
def test_threads_cap_the_requests_that_wait_for_an_nbd_backing(tmp_path, threads, cap):
    """README (over a remote backing): requests that must wait for the backing (a partial
    write that copies its block up...) go to worker threads of the connection, started as
    needed, "-t caps them, 64 by default".  Over a backing that holds every request it gets,
    one connection sends cap + 16 partial writes to blocks not yet copied up: exactly cap of
    them reach the backing (each worker waits for one copy-up), the rest wait; once the
    backing answers, every write is done and right, and at no moment had the backing more
    than cap (its log says so)."""
    from test_server_clients import HeldBacking, pattern_bytes, wait_all
    options = ["--cow-block-size", "4K"] + (["-t", threads] if threads else [])
    with HeldBacking(tmp_path) as back, \
            start_server(back.uri, *options, tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        writes = {k * 4096 + 512: bytes([k % 250 + 1]) * 512 for k in range(cap + 16)}
        with back.held():
            cookies = [h.aio_pwrite(data, off) for off, data in writes.items()]
            back.wait_in_flight(cap, h)
        wait_all(h, cookies)
        assert back.peak() == cap
        for off, data in writes.items():
            assert h.pread(4096, off - 512) == \
                pattern_bytes(off - 512, 512) + data + pattern_bytes(off + 512, 3072)
        h.shutdown()
