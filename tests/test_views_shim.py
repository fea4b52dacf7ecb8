"""The nbdkit shim's overlay-dir=DIR: a view per export name (nbdkit gives the plugin the name),
the same files as python -m cow.server --overlay-dir DIR, served by real nbdkit to real
clients."""

import json
import subprocess

import nbd
import pytest

from conftest import PYTHON
from support_server import start_server
from test_overlay_shim import connect, shim, start_up_error
from test_views_server import held_files, sh, wait_until

MiB = 1024 * 1024


def uri_of(server, name):
    return f"nbd+unix:///{name}?socket={server.sock}"


@pytest.fixture
def disk(backing_factory):
    return backing_factory(4 * MiB)


def test_views_by_name_isolated_shared_and_listed(disk, tmp_path):
    folder = tmp_path / "views"
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}",
              "cow-block-size=4K", "list-views=true") as server:
        a1, a2 = connect(uri_of(server, "ci-1")), connect(uri_of(server, "ci-1"))
        b = connect(uri_of(server, "ci-2"))
        assert a1.can_multi_conn() and a1.get_block_size(nbd.SIZE_PREFERRED) == 4096
        a1.pwrite(b"A" * 4096, 0)
        a1.flush()
        assert a2.pread(4096, 0) == b"A" * 4096
        b.pwrite(b"B" * 4096, 4096)
        assert b.pread(4096, 0) == disk.read_bytes()[:4096]
        assert held_files(server.proc, folder) == {"ci-1.cow", "ci-2.cow"}
        listing = json.loads(sh("nbdinfo", "--list", "--json", server.uri).stdout)
        got = {e["export-name"]: e.get("description") for e in listing["exports"]}
        assert got == {"ci-1": "view, 2 clients, 4.0 KiB changed",
                       "ci-2": "view, 1 client, 4.0 KiB changed"}
        for h in (a1, a2, b):
            h.shutdown()
        wait_until(lambda: not held_files(server.proc, folder), what="the views to close")
        # nbdkit opens the plugin for INFO as for GO: the view made for it goes again, unchanged.
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(uri_of(server, "peek"))
        h.opt_info()
        assert h.get_size() == 4 * MiB
        h.opt_abort()
        wait_until(lambda: not (folder / "peek.cow").exists(), what="peek.cow to go")
    assert sorted(p.name for p in folder.iterdir()) == ["ci-1.cow", "ci-2.cow"]
    # The same files as cow.server's --overlay-dir.
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        h = connect(f"nbd+unix:///ci-1?socket={proc.sock_path}")
        assert h.pread(4096, 0) == b"A" * 4096
        h.pwrite(b"S" * 4096, 8192)
        h.shutdown()
    with shim(tmp_path, "b", f"file={disk}", f"overlay-dir={folder}") as server:
        h = connect(uri_of(server, "ci-1"))
        assert h.pread(3 * 4096, 0) == b"A" * 4096 + disk.read_bytes()[4096:8192] + b"S" * 4096
        h.shutdown()


@pytest.mark.parametrize("name", ["../x", ".hidden", "a%2Fb", "x" * 129, "", "%C3%A9"])
def test_bad_names_are_refused_and_nothing_is_created(disk, tmp_path, name):
    folder = tmp_path / "views"
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}") as server:
        with pytest.raises(nbd.Error):
            connect(uri_of(server, name))
        r = sh("qemu-img", "info", uri_of(server, name), check=False)
        assert r.returncode != 0 and "not available" in r.stderr
        connect(uri_of(server, "ok")).shutdown()       # nbdkit goes on serving
    assert list(folder.iterdir()) == []                # "ok" had no change: not kept


def test_the_cap_and_read_only(disk, tmp_path):
    folder = tmp_path / "views"
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}", "max-exports=2") as server:
        for n in ("a", "b"):
            h = connect(uri_of(server, n))
            h.pwrite(n.encode() * 512, 0)
            h.shutdown()
        with pytest.raises(nbd.Error):
            connect(uri_of(server, "c"))
        connect(uri_of(server, "a")).shutdown()
    assert sorted(p.name for p in folder.iterdir()) == ["a.cow", "b.cow"]
    with shim(tmp_path, "r", f"file={disk}", f"overlay-dir={folder}",
              nbdkit_args=("-r",)) as server:
        h = connect(uri_of(server, "a"))
        assert h.is_read_only() and h.pread(512, 0) == b"a" * 512
        h.shutdown()
        with pytest.raises(nbd.Error):
            connect(uri_of(server, "new"))
    assert sorted(p.name for p in folder.iterdir()) == ["a.cow", "b.cow"]


@pytest.mark.parametrize("params, words", [
    (("overlay-dir={t}/v",), ("file=PATH or uri=",)),
    (("file={disk}", "overlay-dir={t}/v", "overlay={t}/x.cow"), ("give one of them",)),
    (("file={disk}", "max-exports=3"), ("goes with overlay-dir",)),
    (("file={disk}", "overlay-dir={t}/v", "max-exports=-1"), ("max-exports=-1",)),
    (("file={disk}", "overlay-dir={t}/none/v"), ("cannot create",)),
])
def test_start_up_errors_are_one_line(disk, tmp_path, params, words):
    line = start_up_error(tmp_path, *[p.format(t=tmp_path, disk=disk) for p in params])
    for w in words:
        assert w in line, line


def test_the_launcher_passes_overlay_dir(disk, tmp_path):
    folder = tmp_path / "views"
    r = subprocess.run([
        PYTHON, "-P", "-m", "cow.nbdkit", "-U", "-", str(disk), f"overlay-dir={folder}", "--run",
        'nbdsh -u "nbd+unix:///lx?socket=$unixsocket" -c "h.pwrite(b\'L\' * 512, 0)"'],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in folder.iterdir()] == ["lx.cow"]
