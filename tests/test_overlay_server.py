"""python -m cow.server --overlay FILE with real clients: changes survive a restart, FILE records
its backing, refusals are one line that leave FILE untouched, one server holds FILE at a time,
and -r opens it read-only."""

import hashlib
import os
import stat
import subprocess
import time

import nbd
import pytest

from support_server import server_command, start_server

MiB = 1024 * 1024


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def run(*args, timeout=60):
    return subprocess.run(server_command(*args), capture_output=True, text=True, timeout=timeout)


def one_error_line(r, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_changes_survive_a_restart(backing_factory, tmp_path):
    disk = backing_factory(4 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, "--cow-block-size", "4K", tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        h.pwrite(b"flushed" * 1000, 12345)
        h.flush()
        h.pwrite(b"F" * 4096, 2 * MiB, nbd.CMD_FLAG_FUA)
        h.trim(1 * MiB, 1 * MiB)
        h.pwrite(b"at close" * 10, 3 * MiB)         # no flush: a clean stop saves it
        want = h.pread(4 * MiB, 0)
        h.shutdown()
    assert stat.S_IMODE(os.stat(ov).st_mode) == 0o600
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, proc):
        assert "block size 4096" in proc.log_path.read_text()      # adopted from FILE
        h = connect(uri)
        assert h.pread(4 * MiB, 0) == want
        h.shutdown()
    # BACKING omitted: FILE records it.
    with start_server(None, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, proc):
        assert f"serving {disk}" in proc.log_path.read_text()
        h = connect(uri)
        assert h.pread(4 * MiB, 0) == want
        assert h.is_read_only()
        h.shutdown()


def test_qemu_img_sees_the_same_view_after_a_restart(backing_factory, tmp_path):
    disk = backing_factory(2 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 100k 300k", uri],
                       check=True, capture_output=True)
        first = tmp_path / "first.img"
        subprocess.run(["nbdcopy", uri, str(first)], check=True)
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(first), uri],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_refusals_are_one_line_and_leave_the_file_untouched(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, "--cow-block-size", "4K", tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        h.pwrite(b"x" * 10000, 0)
        h.shutdown()
    before = digest(ov)
    sock = tmp_path / "never.sock"
    other = backing_factory(2 * MiB, name="other.img")
    one_error_line(run(other, "--overlay", ov, "-U", sock), "vm.cow", "2097152 bytes")
    one_error_line(run(disk, "--overlay", ov, "--cow-block-size", "64K", "-U", sock),
                   "block size is 4096, not 65536")
    copy = tmp_path / "copy.img"
    copy.write_bytes(disk.read_bytes())
    one_error_line(run(copy, "--overlay", ov, "-U", sock), "changed",
                   "--overlay-backing-changed=accept")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an overlay\n" * 500)
    one_error_line(run(disk, "--overlay", notes, "-U", sock), "not a cow overlay")
    one_error_line(run(None, "--overlay", tmp_path / "missing.cow", "-U", sock),
                   "does not exist", "BACKING")
    one_error_line(run(disk, "--overlay", tmp_path / "missing.cow", "-r", "-U", sock),
                   "does not create")
    one_error_line(run(disk, "--overlay", ov, "--tmpdir", tmp_path, "-U", sock), "--tmpdir")
    assert digest(ov) == before
    assert not sock.exists() and not (tmp_path / "missing.cow").exists()
    # The override, when the user knows better: served, and recorded.
    with start_server(copy, "--overlay", ov, "--overlay-backing-changed=accept",
                      tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        assert h.pread(10000, 0) == b"x" * 10000
        h.shutdown()
    with start_server(copy, "--overlay", ov, tmp_path=tmp_path):
        pass


def test_a_second_server_fails_at_once_naming_the_first(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, first):
        t0 = time.monotonic()
        r = run(disk, "--overlay", ov, "-U", tmp_path / "second.sock")
        assert time.monotonic() - t0 < 20
        one_error_line(r, "vm.cow", f"in use by pid {first.pid}", "cow.server")
        r = run(disk, "--overlay", ov, "-r", "-U", tmp_path / "third.sock")
        one_error_line(r, f"in use by pid {first.pid}")
        h = connect(uri)                            # the first one is unharmed
        h.pwrite(b"still mine", 0)
        h.shutdown()
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        assert h.pread(10, 0) == b"still mine"
        h.shutdown()


def test_read_only_servers_share_the_file_and_write_nothing(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        h.pwrite(b"kept", 0)
        h.shutdown()
    before = digest(ov)
    with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri1, _):
        with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri2, _):
            for uri in (uri1, uri2):
                h = connect(uri)
                assert h.pread(4, 0) == b"kept"
                with pytest.raises(nbd.Error):
                    h.pwrite(b"nope", 0)
                h.flush()
                h.shutdown()
            r = run(disk, "--overlay", ov, "-U", tmp_path / "rw.sock")
            one_error_line(r, "in use by pid")
    assert digest(ov) == before


def test_help_documents_the_overlay_options():
    r = subprocess.run(server_command(None, "--help"), capture_output=True, text=True)
    assert r.returncode == 0
    for words in ("--overlay FILE", "--overlay-backing-changed", "python -m cow.overlay",
                  "--overlay vm.cow"):
        assert words in r.stdout, words


def test_an_nbd_backing_is_recorded_and_reads_come_from_the_file(tmp_path, nbdkit):
    """Over an NBD backing the server starts reads asynchronously (another path through the
    engine): blocks in FILE must still be read from FILE, at its data offset."""
    disk = tmp_path / "remote.img"
    disk.write_bytes(bytes(range(256)) * (8 * 1024))            # 2 MiB of a pattern
    uri = nbdkit("file", disk)
    ov = tmp_path / "vm.cow"
    with start_server(uri, "--overlay", ov, "--cow-block-size", "4K", tmp_path=tmp_path) as (u, _):
        h = connect(u)
        h.pwrite(b"over nbd" * 512, 8192)
        h.flush()
        h.shutdown()
    want = bytearray(disk.read_bytes())
    want[8192:8192 + 4096] = b"over nbd" * 512
    with start_server(None, "--overlay", ov, "-r", tmp_path=tmp_path) as (u, proc):
        assert f"serving {uri}" in proc.log_path.read_text()
        h = connect(u)
        assert h.pread(len(want), 0) == bytes(want)
        assert h.pread(4096, 8192) == b"over nbd" * 512
        h.shutdown()
