"""The nbdkit shim's overlay=FILE: the same file, format and lock as python -m cow.server
--overlay FILE, served by real nbdkit to real clients."""

import subprocess

import nbd

from conftest import PYTHON
from support_server import start_server
from support_shim import plugin_path, run_nbdkit_cmd

MiB = 1024 * 1024


def shim(tmp_path, name, *params, nbdkit_args=()):
    cmd = ["nbdkit", *nbdkit_args, "python", plugin_path(), *map(str, params)]
    return run_nbdkit_cmd(cmd, tmp_path / f"{name}.sock")


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def start_up_error(tmp_path, *params):
    r = subprocess.run(["nbdkit", "-f", "-U", str(tmp_path / "never.sock"), "python",
                        plugin_path(), *map(str, params)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nbdkit: error:"), r.stderr
    return lines[0]


def test_shim_and_server_share_one_overlay_format(backing_factory, tmp_path):
    disk = backing_factory(4 * MiB)
    ov = tmp_path / "vm.cow"
    with shim(tmp_path, "a", f"file={disk}", f"overlay={ov}", "cow-block-size=4K") as server:
        h = connect(server.uri)
        h.pwrite(b"from nbdkit" * 100, 5000)
        h.flush()
        h.trim(MiB, MiB)
        h.pwrite(b"kept at exit", 3 * MiB)          # no flush: cleanup closes (and flushes)
        want = h.pread(4 * MiB, 0)
        h.shutdown()
    # The server serves what the shim wrote, and the reverse.
    with start_server(None, "--overlay", ov, tmp_path=tmp_path) as (uri, proc):
        assert "block size 4096" in proc.log_path.read_text()
        h = connect(uri)
        assert h.pread(4 * MiB, 0) == want
        h.pwrite(b"from cow.server", 0)
        want = h.pread(4 * MiB, 0)
        h.shutdown()
    with shim(tmp_path, "b", f"overlay={ov}") as server:       # file= from FILE
        h = connect(server.uri)
        assert h.pread(4 * MiB, 0) == want
        h.shutdown()


def test_one_holder_between_shim_and_server(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with shim(tmp_path, "a", f"file={disk}", f"overlay={ov}") as server:
        line = start_up_error(tmp_path, f"file={disk}", f"overlay={ov}")
        assert f"overlay={ov}" in line and f"in use by pid {server.proc.pid}" in line
        r = subprocess.run([PYTHON, "-P", "-m", "cow.server", str(disk), "--overlay", str(ov),
                            "-U", str(tmp_path / "s.sock")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and f"in use by pid {server.proc.pid} (nbdkit" in r.stderr
        r = subprocess.run([PYTHON, "-P", "-m", "cow.overlay", "info", str(ov)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "in use by pid" in r.stderr


def test_shim_refusals_are_one_line(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with shim(tmp_path, "a", f"file={disk}", f"overlay={ov}", "cow-block-size=4K"):
        pass
    line = start_up_error(tmp_path, f"file={disk}", f"overlay={ov}", "cow-block-size=64K")
    assert "block size is 4096, not 65536" in line
    copy = tmp_path / "copy.img"
    copy.write_bytes(disk.read_bytes())
    line = start_up_error(tmp_path, f"file={copy}", f"overlay={ov}")
    assert "differs" in line and "accept" in line
    with shim(tmp_path, "b", f"file={copy}", f"overlay={ov}", "overlay-backing-changed=accept"):
        pass
    line = start_up_error(tmp_path, f"overlay={tmp_path / 'missing.cow'}")
    assert "no such overlay" in line
    line = start_up_error(tmp_path, f"file={disk}", "overlay-backing-changed=accept")
    assert "goes with overlay=" in line
    line = start_up_error(tmp_path, f"file={disk}", f"overlay={ov}", "overlay-backing-changed=maybe")
    assert "refuse or accept" in line


def test_launcher_takes_overlay_alone(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    run = f"nbdsh -u \"$uri\" -c 'h.pwrite(b\"launched\", 0); h.flush()'"
    r = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "-U", "-", str(disk), f"overlay={ov}",
                        "--run", run], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "-U", "-", f"overlay={ov}", "--run",
                        "nbdsh -u \"$uri\" -c 'print(h.pread(8, 0).decode())'"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "launched", r.stderr
