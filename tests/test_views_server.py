"""python -m cow.server --overlay-dir DIR / --temporary-views with real clients (libnbd, qemu-img,
qemu-io, nbdinfo --list): a view per export name, isolated from the others and shared by the
connections to it; listing; every bad name refused with nothing created; the cap; read-only;
a view surviving a restart; the overlay tools on the files; and hundreds of views opened and
closed with the server's descriptors and memory back where they were."""

import errno
import json
import os
import struct
import subprocess
import time

import nbd
import pytest

from conftest import write_sample
from cow import protocol as P
from support_server import RawClient, server_command, start_server
from test_overlay_tools import fails as tool_fails
from test_overlay_tools import ok as tool_ok

MiB = 1024 * 1024


def view_uri(proc, name):
    return f"nbd+unix:///{name}?socket={proc.sock_path}"


def connect(proc, name):
    h = nbd.NBD()
    h.connect_uri(view_uri(proc, name))
    return h


def sh(*args, check=True):
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, check=check,
                          timeout=120)


def wait_until(fn, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def server_fds(proc):
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def server_rss_kib(proc):
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def held_files(proc, folder):
    """Names of the files in folder the server has open (by inode: a view made by the server
    is open under the temporary name it was made as)."""
    try:
        files = {(st.st_dev, st.st_ino): p.name for p in folder.iterdir()
                 if (st := p.stat())}
    except FileNotFoundError:
        return set()
    out = set()
    for fd in os.listdir(f"/proc/{proc.pid}/fd"):
        try:
            st = os.stat(f"/proc/{proc.pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in files:
            out.add(files[st.st_dev, st.st_ino])
    return out


def go_reply(proc, raw_name: bytes, option=P.NBD_OPT_GO):
    """The final reply type to GO (or INFO) for a raw name, from a hand-made client."""
    with RawClient(proc.sock_path) as c:
        c.greeting()
        data = struct.pack(">I", len(raw_name)) + raw_name + struct.pack(">H", 0)
        rtype, msg = c.option(option, data)[-1]
        c.send(P.pack_option(P.NBD_OPT_ABORT))
        return rtype, msg


@pytest.fixture
def disk(backing_factory):
    return backing_factory(4 * MiB)


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "views"


def test_views_are_isolated_shared_and_listed(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, "--cow-block-size", "4K", "--list-views",
                      tmp_path=tmp_path) as (_, proc):
        assert "a view per export name in" in proc.log_path.read_text()
        base = disk.read_bytes()[:4096]
        a1, a2, b = connect(proc, "ci-1"), connect(proc, "ci-1"), connect(proc, "ci-2")
        assert a1.can_multi_conn() and b.can_multi_conn()
        a1.pwrite(b"A" * 4096, 0)
        a1.flush()
        assert a2.pread(4096, 0) == b"A" * 4096          # one view, two connections
        b.pwrite(b"B" * 4096, 4096)
        assert b.pread(4096, 0) == base                   # another view: its own changes only
        assert a2.pread(4096, 4096) == disk.read_bytes()[4096:8192]
        assert a1.get_export_name() == "ci-1"
        assert held_files(proc, folder) == {"ci-1.cow", "ci-2.cow"}
        listing = json.loads(sh("nbdinfo", "--list", "--json", f"nbd+unix:///?socket="
                                f"{proc.sock_path}").stdout)
        got = {e["export-name"]: e for e in listing["exports"]}
        assert set(got) == {"ci-1", "ci-2"}
        assert got["ci-1"]["description"] == "view, 2 clients, 4.0 KiB changed"
        assert got["ci-2"]["export-size"] == 4 * MiB
        for h in (a1, a2, b):
            h.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="the views to close")
        out = sh("nbdinfo", "--list", f"nbd+unix:///?socket={proc.sock_path}").stdout
        assert "view, idle, 4.0 KiB changed" in out
    assert sorted(p.name for p in folder.iterdir()) == ["ci-1.cow", "ci-2.cow"]
    assert (os.stat(folder).st_mode & 0o777) == 0o700


def test_qemu_tools_on_a_view_and_a_restart_keeps_it(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 100k 300k", view_uri(proc, "vm7"))
        first = tmp_path / "first.img"
        sh("nbdcopy", view_uri(proc, "vm7"), first)
        h = connect(proc, "vm7")
        h.pwrite(b"not flushed, saved at shutdown", 3 * MiB)   # SIGTERM with a client on
        r = sh("qemu-img", "info", "--output=json", view_uri(proc, "other"))
        assert json.loads(r.stdout)["virtual-size"] == 4 * MiB
        with_client = first.read_bytes()
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        assert "(2 exist, at most 128)" in proc.log_path.read_text()
        h = connect(proc, "vm7")
        assert h.pread(300 * 1024, 100 * 1024) == b"\x5a" * 300 * 1024
        assert h.pread(30, 3 * MiB) == b"not flushed, saved at shutdown"
        assert h.pread(1024, 0) == with_client[:1024]
        h.shutdown()
        r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, view_uri(proc, "other"))
        assert r.returncode == 0


@pytest.mark.parametrize("raw, reply", [
    (b"../x", P.NBD_REP_ERR_INVALID),
    (b"/etc/passwd", P.NBD_REP_ERR_INVALID),
    (b"a/b", P.NBD_REP_ERR_INVALID),
    (b".hidden", P.NBD_REP_ERR_INVALID),
    (b"..", P.NBD_REP_ERR_INVALID),
    (b"-x", P.NBD_REP_ERR_INVALID),
    (b"a b", P.NBD_REP_ERR_INVALID),
    (b"a\0b", P.NBD_REP_ERR_INVALID),
    (b"\xff\xfe", P.NBD_REP_ERR_INVALID),
    ("é".encode(), P.NBD_REP_ERR_INVALID),
    (b"x" * 129, P.NBD_REP_ERR_INVALID),
    (b"x" * 4097, P.NBD_REP_ERR_INVALID),
    (b"", P.NBD_REP_ERR_UNKNOWN),                     # no default view without -e
])
def test_bad_names_are_refused_and_nothing_is_created(disk, folder, tmp_path, raw, reply):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        for option in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            rtype, msg = go_reply(proc, raw, option)
            assert rtype == reply, (rtype, msg)
        # A real client hears it too, and the server goes on serving.
        if b"\0" not in raw and len(raw) <= 4096 and raw.isascii() or raw == "é".encode():
            h = nbd.NBD()
            h.set_export_name(raw.decode())
            with pytest.raises(nbd.Error):
                h.connect_unix(str(proc.sock_path))
        # EXPORT_NAME cannot be refused: the server hangs up.
        with RawClient(proc.sock_path) as c:
            c.greeting()
            c.send(P.pack_option(P.NBD_OPT_EXPORT_NAME, raw[:4096]))
            assert c.is_closed()
        h = connect(proc, "fine")
        h.shutdown()
    assert sorted(p.name for p in folder.iterdir()) == ["fine.cow"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".cow") == []


def test_old_style_export_name_opens_a_view_too(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        with RawClient(proc.sock_path) as c:
            c.greeting()
            c.send(P.pack_option(P.NBD_OPT_EXPORT_NAME, b"legacy"))
            size, _ = struct.unpack(">QH", c.recv_exact(10))
            assert size == 4 * MiB
            c.request(P.NBD_CMD_WRITE, 0, 5, cookie=7, payload=b"hello")
            assert c.reply() == (7, 0, b"")
            c.request(P.NBD_CMD_DISC)
        wait_until(lambda: not held_files(proc, folder), what="legacy to close")
        h = connect(proc, "legacy")
        assert h.pread(5, 0) == b"hello"
        h.shutdown()


def test_qemu_img_is_told_why_a_name_is_refused(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, "--max-exports", "1",
                      tmp_path=tmp_path) as (_, proc):
        r = sh("qemu-img", "info", view_uri(proc, ".x"), check=False)
        assert r.returncode != 0 and "invalid view name" in r.stderr
        sh("qemu-img", "info", view_uri(proc, "one"))
        r = sh("qemu-img", "info", view_uri(proc, "two"), check=False)
        assert r.returncode != 0 and "maximum of 1 views" in r.stderr
    assert [p.name for p in folder.iterdir()] == ["one.cow"]


def test_info_on_a_new_name_creates_nothing(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_full_info(True)
        h.connect_unix(str(proc.sock_path))
        h.set_export_name("later")
        h.opt_info()
        assert h.get_size() == 4 * MiB and "new view" in h.get_export_description()
        assert not folder.exists() or list(folder.iterdir()) == []
        h.opt_go()                                   # GO makes it
        assert (folder / "later.cow").exists()
        h.shutdown()


def test_the_cap_refuses_new_views_only(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, "--max-exports", "2",
                      tmp_path=tmp_path) as (_, proc):
        for name in ("a", "b"):
            connect(proc, name).shutdown()
        rtype, msg = go_reply(proc, b"c")
        assert rtype == P.NBD_REP_ERR_POLICY and b"maximum of 2" in msg
        assert go_reply(proc, b"c", P.NBD_OPT_INFO)[0] == P.NBD_REP_ERR_POLICY
        connect(proc, "a").shutdown()                # existing views are always served
        assert sorted(p.name for p in folder.iterdir()) == ["a.cow", "b.cow"]
        wait_until(lambda: not held_files(proc, folder), what="b to close")
        tool_ok("reset", folder / "b.cow", "--yes")
        (folder / "b.cow").unlink()                  # the operator retires a view: room again
        connect(proc, "c").shutdown()
    assert sorted(p.name for p in folder.iterdir()) == ["a.cow", "c.cow"]


def test_read_only_serves_existing_views_and_makes_none(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        h = connect(proc, "gold")
        h.pwrite(b"kept", 0)
        h.shutdown()
    before = (folder / "gold.cow").read_bytes()
    with start_server(disk, "--overlay-dir", folder, "-r", tmp_path=tmp_path) as (_, proc):
        h1, h2 = connect(proc, "gold"), connect(proc, "gold")
        assert h1.is_read_only() and h1.pread(4, 0) == b"kept"
        with pytest.raises(nbd.Error):
            h1.pwrite(b"nope", 0)
        # Held read-only: python -m cow.overlay info still reads it (a shared lock).
        assert tool_ok("info", folder / "gold.cow").startswith(str(folder / "gold.cow"))
        h1.shutdown()
        h2.shutdown()
        rtype, msg = go_reply(proc, b"new")
        assert rtype == P.NBD_REP_ERR_UNKNOWN and b"read-only" in msg
    assert sorted(p.name for p in folder.iterdir()) == ["gold.cow"]
    assert (folder / "gold.cow").read_bytes() == before


def test_the_default_view(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, "-e", "main",
                      tmp_path=tmp_path) as (uri, proc):
        assert uri == f"nbd+unix:///main?socket={proc.sock_path}"
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={proc.sock_path}")   # "" is the default view
        h.pwrite(b"default", 0)
        h.shutdown()
        h = connect(proc, "main")
        assert h.pread(7, 0) == b"default"
        h.shutdown()
    assert [p.name for p in folder.iterdir()] == ["main.cow"]


def test_the_overlay_tools_on_the_files(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, "--list-views",
                      tmp_path=tmp_path) as (_, proc):
        h = connect(proc, "t1")
        h.pwrite(b"T" * 65536, 0)
        h.flush()
        for args in (("info", folder / "t1.cow"), ("reset", folder / "t1.cow", "--yes"),
                     ("fork", folder / "t1.cow", folder / "t2.cow")):
            tool_fails(*args, words=("t1.cow", f"in use by pid {proc.pid}"))
        h.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="t1 to close")
        assert json.loads(tool_ok("info", folder / "t1.cow", "--json"))["allocated_blocks"] == 1
        tool_ok("fork", folder / "t1.cow", folder / "t2.cow")
        # The golden image is held while the server runs: committing one view into it would
        # change every other view.
        tool_fails("commit", folder / "t1.cow", "--into", disk, "--yes",
                   words=(f"in use by pid {proc.pid}",))
        tool_ok("reset", folder / "t1.cow", "--yes")
        h1, h2 = connect(proc, "t1"), connect(proc, "t2")
        assert h1.pread(4, 0) == disk.read_bytes()[:4] and h2.pread(4, 0) == b"TTTT"
        h1.shutdown()
        h2.shutdown()
        listing = sh("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={proc.sock_path}")
        assert {e["export-name"] for e in json.loads(listing.stdout)["exports"]} == {"t1", "t2"}


def test_hundreds_of_views_leave_no_descriptor_and_no_memory_behind(disk, folder, tmp_path):
    """Views opened and closed by the hundred: once their clients are gone the server holds
    exactly the descriptors it held before, and its memory does not grow with them."""
    with start_server(disk, "--overlay-dir", folder, "--max-exports", "0",
                      tmp_path=tmp_path) as (_, proc):

        def one(name, k):
            h = connect(proc, name)
            h.pwrite(bytes([k % 251 + 1]) * 4096, (k % 64) * 65536)
            h.flush()
            h.shutdown()

        def settled():
            return not held_files(proc, folder)

        for k in range(40):                          # warm up: threads, buffers, arenas
            one(f"warm{k}", k)
        wait_until(settled, what="the warm-up views to close")
        fd0, rss0 = server_fds(proc), server_rss_kib(proc)
        for k in range(300):
            one(f"v{k}", k)
        wait_until(settled, what="the views to close")
        fd1, rss1 = server_fds(proc), server_rss_kib(proc)
        for k in range(300):                         # every one of them again
            one(f"v{k}", k + 1)
        wait_until(settled, what="the views to close")
        fd2, rss2 = server_fds(proc), server_rss_kib(proc)
        assert fd1 == fd0 and fd2 == fd0, (fd0, fd1, fd2)
        assert rss1 - rss0 < 3 * 1024, (rss0, rss1)       # KiB: well under 10 KiB a view
        assert rss2 - rss1 < 1024, (rss1, rss2)
        h = connect(proc, "v123")
        assert h.pread(4096, 59 * 65536) == bytes([124]) * 4096     # the first round's
        assert h.pread(4096, 60 * 65536) == bytes([125]) * 4096     # and the second's
        h.shutdown()
    assert len(list(folder.glob("v*.cow"))) == 300


@pytest.mark.parametrize("mode", ["keep", "discard"])
def test_temporary_views(disk, tmp_path, mode):
    with start_server(disk, "--temporary-views", mode, "--max-exports", "3", "--list-views",
                      tmp_path=tmp_path) as (_, proc):
        a, b = connect(proc, "a"), connect(proc, "b")
        a.pwrite(b"a" * 512, 0)
        assert b.pread(512, 0) == disk.read_bytes()[:512]
        a.shutdown()
        b.shutdown()
        h = connect(proc, "a")
        assert (h.pread(512, 0) == b"a" * 512) == (mode == "keep")
        h.shutdown()
        connect(proc, "c").shutdown()
        # keep: a, b and c exist, the cap is reached; discard: none is left once they are idle.
        rtype, _ = go_reply(proc, b"d")
        assert rtype == (P.NBD_REP_ERR_POLICY if mode == "keep" else P.NBD_REP_ACK)
        listing = json.loads(sh("nbdinfo", "--list", "--json",
                                f"nbd+unix:///?socket={proc.sock_path}").stdout)
        names = sorted(e["export-name"] for e in listing["exports"])
        assert names == (["a", "b", "c"] if mode == "keep" else [])


def test_views_over_an_nbd_backing(tmp_path, nbdkit):
    """Over an NBD backing reads are started and collected per connection: each must go
    through the engine of its own view."""
    remote = tmp_path / "remote.img"
    remote.write_bytes(bytes(range(256)) * (8 * 1024))
    uri = nbdkit("file", remote, "--filter=delay", "rdelay=1ms")
    folder = tmp_path / "views"
    with start_server(uri, "--overlay-dir", folder, "--cow-block-size", "4K",
                      tmp_path=tmp_path) as (_, proc):
        hs = {n: connect(proc, n) for n in ("r1", "r2", "r3")}
        for i, (n, h) in enumerate(hs.items()):
            h.pwrite(bytes([0xA0 + i]) * 4096, i * 4096)
        for i, (n, h) in enumerate(hs.items()):
            got = h.pread(3 * 4096, 0)
            for j in range(3):
                want = bytes([0xA0 + j]) * 4096 if j == i else remote.read_bytes()[j * 4096:(j + 1) * 4096]
                assert got[j * 4096:(j + 1) * 4096] == want, (n, j)
        for h in hs.values():
            h.shutdown()


def one_error_line(r, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (("--overlay-dir", "{d}"), ("--overlay-dir needs the BACKING",)),
    (("{disk}", "--overlay-dir", "{d}", "--overlay", "{t}/x.cow"), ("--overlay FILE",)),
    (("{disk}", "--overlay-dir", "{d}", "--temporary-views", "keep"), ("give one of them",)),
    (("{disk}", "--max-exports", "3"), ("--max-exports",)),
    (("{disk}", "--temporary-views", "keep", "-r"), ("--readonly",)),
    (("{disk}", "--overlay-dir", "{d}", "-e", "../x"), ("-e", "default view")),
    (("{disk}", "--overlay-dir", "{d}", "--tmpdir", "{t}"), ("--tmpdir",)),
    (("{disk}", "--overlay-dir", "{t}/none/x"), ("cannot create",)),
    (("{disk}", "--overlay-dir", "{d}", "-r"), ("no such directory",)),
    (("{disk}", "--overlay-dir", "{d}", "--cow-block-size", "1K"), ("block size",)),
    (("{disk}", "--temporary-views", "sometimes"), ("--temporary-views",)),
])
def test_bad_views_options_are_one_line(disk, tmp_path, args, words):
    d = tmp_path / "views"
    args = [a.format(d=d, disk=disk, t=tmp_path) for a in args]
    r = subprocess.run(server_command(None, *args, "-U", tmp_path / "never.sock"),
                       capture_output=True, text=True, timeout=60)
    if "--temporary-views" in args and "sometimes" in args:
        assert r.returncode == 2 and "--temporary-views" in r.stderr
    else:
        one_error_line(r, *words)
    assert not (tmp_path / "never.sock").exists()
    assert not d.exists() or list(d.iterdir()) == []


def test_help_documents_the_views_options():
    r = subprocess.run(server_command(None, "--help"), capture_output=True, text=True)
    assert r.returncode == 0
    for words in ("--overlay-dir DIR", "--temporary-views MODE", "--max-exports N",
                  "nbd+unix:///ci-42?socket=/tmp/s", "NBD_REP_ERR_POLICY"):
        assert words in r.stdout, words


# -- per-view options, a changed golden image, refusals on the wire (issue 21: README claims) ----

DEPTH = "qemu:allocation-depth"


def depth_map(h, length, offset=0):
    """[(length, depth)] of qemu:allocation-depth (1: the view's overlay, 2: the backing)."""
    out = []

    def got(meta, off, entries, err):
        if meta == DEPTH:
            out.extend(zip(entries[::2], entries[1::2]))
        return 0

    h.block_status(length, offset, got)
    return out


def connect_depth(proc, name):
    h = nbd.NBD()
    h.add_meta_context(DEPTH)
    h.connect_uri(view_uri(proc, name))
    return h


def allocated_blocks(path):
    return json.loads(tool_ok("info", path, "--json"))["allocated_blocks"]


def test_overlay_max_size_caps_each_view(disk, folder, tmp_path):
    """README (views): --overlay-max-size applies to each view.  16 blocks of 4 KiB a view:
    each of two views takes its 16 (the cap is not shared between them), the 17th new block
    fails with ENOSPC in each, a write into a block the view holds still succeeds, and the
    server goes on serving."""
    with start_server(disk, "--overlay-dir", folder, "--cow-block-size", "4K",
                      "--overlay-max-size", "64K", tmp_path=tmp_path) as (_, proc):
        a, b = connect(proc, "a"), connect(proc, "b")
        for h, byte in ((a, b"a"), (b, b"b")):
            for k in range(16):
                h.pwrite(byte * 4096, k * 8192)
            with pytest.raises(nbd.Error) as e:
                h.pwrite(byte * 4096, 16 * 8192)
            assert e.value.errno in ("ENOSPC", errno.ENOSPC), e.value
            h.pwrite(byte * 100, 5 * 8192 + 7)              # a block it holds: no new space
            h.flush()
        assert a.pread(4096, 15 * 8192) == b"a" * 4096 and b.pread(4096, 15 * 8192) == b"b" * 4096
        assert a.pread(4096, 16 * 8192) == disk.read_bytes()[16 * 8192:16 * 8192 + 4096]
        a.shutdown()
        b.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="the views to close")
        # A view made before, with more blocks than the cap: served, and held to the cap.
        assert allocated_blocks(folder / "a.cow") == 16
        c = connect(proc, "c")
        c.pwrite(b"c" * 4096, 0)
        c.shutdown()
    assert allocated_blocks(folder / "a.cow") == 16 and allocated_blocks(folder / "b.cow") == 16


@pytest.mark.parametrize("mode", ["true", "path"])
def test_cow_on_read_applies_to_each_view(disk, folder, tmp_path, mode):
    """README (views): --cow-on-read applies to each view.  A read through view a copies the
    blocks it read into a's overlay (and only a's); with --cow-on-read PATH, only while PATH
    exists."""
    switch = tmp_path / "cow-on-read-on"
    value = "true" if mode == "true" else str(switch)
    with start_server(disk, "--overlay-dir", folder, "--cow-block-size", "4K",
                      "--cow-on-read", value, tmp_path=tmp_path) as (_, proc):
        a, b = connect_depth(proc, "a"), connect_depth(proc, "b")
        base = disk.read_bytes()
        if mode == "path":
            assert a.pread(4096, 65536) == base[65536:65536 + 4096]
            assert depth_map(a, 4096, 65536) == [(4096, 2)]       # PATH absent: not copied
            switch.write_bytes(b"")
        assert a.pread(8192, 0) == base[:8192]
        assert depth_map(a, 8192) == [(8192, 1)]                  # now in a's overlay
        assert depth_map(b, 8192) == [(8192, 2)]                  # b still reads the backing
        assert b.pread(4096, 32768) == base[32768:32768 + 4096]
        assert depth_map(b, 4096, 32768) == [(4096, 1)]
        assert depth_map(a, 4096, 32768) == [(4096, 2)]
        a.shutdown()
        b.shutdown()
    assert allocated_blocks(folder / "a.cow") == 2 and allocated_blocks(folder / "b.cow") == 1


def change_golden(golden, offset, data):
    """Change the golden image the way a careless operator would: write into it."""
    with open(golden, "r+b") as f:
        f.seek(offset)
        f.write(data)
    st = os.stat(golden)     # and make sure its time moved (a coarse clock may not)
    os.utime(golden, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_golden_image_changed_under_existing_views(folder, tmp_path):
    """README: a file backing whose modification time changed since an overlay recorded it is
    refused (--overlay-backing-changed=accept serves it and records the new one), and a view
    whose file cannot be opened gets NBD_REP_ERR_UNKNOWN.  The golden image changes while the
    server runs, with view a idle and view c held: a's next client is refused, on the wire and
    in qemu-img, naming no path, with one line in the log; a's file is left as it was; c's
    client goes on being served, and once it leaves c is refused too; a new view is made over
    the changed image; the server serves throughout."""
    golden = write_sample(tmp_path / "golden.img", 4 * MiB)
    with start_server(golden, "--overlay-dir", folder, "--cow-block-size", "4K",
                      tmp_path=tmp_path) as (_, proc):
        for name in ("a", "c"):
            h = connect(proc, name)
            h.pwrite(name.encode() * 4096, 0)
            h.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="the views to close")
        c = connect(proc, "c")
        before = (folder / "a.cow").read_bytes()
        change_golden(golden, 65536, b"\xee" * 4096)
        rtype, msg = go_reply(proc, b"a")
        assert rtype == P.NBD_REP_ERR_UNKNOWN, (rtype, msg)
        assert msg.startswith(b"view a: the golden image changed since the view recorded it "
                              b"(it was modified at "), msg           # the reason...
        assert b"/" not in msg and b"golden.img" not in msg, msg     # ...and no path
        r = sh("qemu-img", "info", view_uri(proc, "a"), check=False)
        [said] = [line for line in r.stderr.splitlines() if "server reported:" in line]
        assert r.returncode != 0 and "the golden image changed" in said and "/" not in said, \
            r.stderr
        lines = [line for line in proc.log_path.read_text().splitlines()
                 if "changed since the overlay was made" in line]
        assert len(lines) == 1 and "view a" in lines[0], lines
        assert c.pread(4096, 0) == b"c" * 4096                    # a held view is served on
        c.pwrite(b"C" * 4096, 8192)
        c.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="c to close")
        assert go_reply(proc, b"c")[0] == P.NBD_REP_ERR_UNKNOWN
        d = connect(proc, "d")                                    # new views: over the new one
        assert d.pread(4096, 65536) == b"\xee" * 4096
        d.shutdown()
        assert (folder / "a.cow").read_bytes() == before
    with start_server(golden, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        assert go_reply(proc, b"a")[0] == P.NBD_REP_ERR_UNKNOWN    # after a restart too
        connect(proc, "d").shutdown()
    assert (folder / "a.cow").read_bytes() == before


def test_overlay_backing_changed_accept_applies_to_each_view(folder, tmp_path):
    """README (views): --overlay-backing-changed applies to each view.  After the golden image
    changed, accept serves every existing view with its own changes over the changed image,
    and records the new image in each, so that the next server, without accept, serves them."""
    golden = write_sample(tmp_path / "golden.img", 4 * MiB)
    with start_server(golden, "--overlay-dir", folder, "--cow-block-size", "4K",
                      tmp_path=tmp_path) as (_, proc):
        for name in ("a", "b"):
            h = connect(proc, name)
            h.pwrite(name.encode() * 4096, 0)
            h.shutdown()
    change_golden(golden, 65536, b"\xee" * 4096)
    with start_server(golden, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        for name in (b"a", b"b"):
            assert go_reply(proc, name)[0] == P.NBD_REP_ERR_UNKNOWN
    with start_server(golden, "--overlay-dir", folder, "--overlay-backing-changed=accept",
                      tmp_path=tmp_path) as (_, proc):
        for name in ("a", "b"):
            h = connect(proc, name)
            assert h.pread(4096, 0) == name.encode() * 4096          # its own changes
            assert h.pread(4096, 65536) == b"\xee" * 4096            # the changed image
            h.shutdown()
    with start_server(golden, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        for name in ("a", "b"):
            h = connect(proc, name)
            assert h.pread(4096, 0) == name.encode() * 4096
            h.shutdown()
        assert "changed since" not in proc.log_path.read_text()


def test_a_view_that_cannot_be_opened_is_nbd_rep_err_unknown_with_the_reason(disk, folder,
                                                                             tmp_path):
    """README (views): a view whose file cannot be opened (held by a tool, not an overlay...)
    gets NBD_REP_ERR_UNKNOWN with the reason, and the server's log says more.  On the wire,
    from a hand-made client, for GO and INFO; a real client (qemu-img) hears the reason; the
    files are left alone and other views are served."""
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        h = connect(proc, "busy")
        h.pwrite(b"busy", 0)
        h.shutdown()
        wait_until(lambda: not held_files(proc, folder), what="busy to close")
    (folder / "junk.cow").write_bytes(b"not an overlay at all\n" * 300)
    junk = (folder / "junk.cow").read_bytes()
    with start_server(disk, "--overlay-dir", folder, "--list-views", tmp_path=tmp_path) as (_, proc):
        # Another process holds busy.cow: a second server on it, as --overlay FILE.
        with start_server(None, "--overlay", folder / "busy.cow", tmp_path=tmp_path) as (_, other):
            rtype, msg = go_reply(proc, b"busy")
            assert rtype == P.NBD_REP_ERR_UNKNOWN, (rtype, msg)
            assert b"view busy is in use by another process" in msg, msg
            # INFO only looks (it reads the header, which the lock does not forbid).
            assert go_reply(proc, b"busy", P.NBD_OPT_INFO)[0] == P.NBD_REP_ACK
            r = sh("qemu-img", "info", view_uri(proc, "busy"), check=False)
            assert r.returncode != 0 and "in use by another process" in r.stderr, r.stderr
            log = proc.log_path.read_text()
            assert f"in use by pid {other.pid}" in log, log
        for option in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            rtype, msg = go_reply(proc, b"junk", option)
            assert rtype == P.NBD_REP_ERR_UNKNOWN, (option, rtype, msg)
            assert msg.startswith(b"view junk: ") and b"/" not in msg, msg
        r = sh("qemu-img", "info", view_uri(proc, "junk"), check=False)
        assert r.returncode != 0 and "view junk: " in r.stderr, r.stderr
        assert sum("junk.cow" in line for line in proc.log_path.read_text().splitlines()) == 1
        h = connect(proc, "busy")                    # free again: served
        assert h.pread(4, 0) == b"busy"
        h.shutdown()
        connect(proc, "other").shutdown()
        assert "Traceback" not in proc.log_path.read_text()
    assert (folder / "junk.cow").read_bytes() == junk
