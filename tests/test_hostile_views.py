"""Issue 18, the views' part: files planted in --overlay-dir (links, FIFOs, devices, folders, other
users' and hard-linked files, empty files, a 1 GiB block size), names that keep changing, a client
making new names without end, and what a client learns (NBD_OPT_LIST, error messages).  Each test
performs the attack against a real server (python -m cow.server, or nbdkit with the shim) with
real clients, and checks that nothing outside the intended files changed, that the refusal is one
line, and that the server goes on serving others."""

import json
import os
import stat
import struct
import subprocess
import threading
import time

import nbd
import pytest

from cow import overlayfile
from cow import protocol as P
from cow.backing import Backing
from cow.engine import Engine
from cow.views import DEFAULT_MAX_VIEWS, UNAVAILABLE, ViewError, ViewSet
from support_server import RawClient, server_command, start_server
from test_overlay_shim import shim, start_up_error
from test_views_server import connect, go_reply, server_fds, sh, wait_until

MiB = 1024 * 1024
NOBODY = 65534


@pytest.fixture
def disk(backing_factory):
    return backing_factory(4 * MiB)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "views"
    d.mkdir(mode=0o700)
    return d


def plant_overlay(path, disk, block_size=65536):
    """A valid overlay header over disk (as another user, or a copied-in file, could write)."""
    st = os.stat(disk)
    h = overlayfile.Header(disk_size=st.st_size, block_size=block_size,
                           backing_kind=overlayfile.KIND_FILE, backing=str(disk),
                           backing_size=st.st_size, backing_mtime_ns=st.st_mtime_ns,
                           created_ns=time.time_ns())
    with open(path, "wb") as f:
        f.write(h.pack())
        f.truncate(h.data_offset)


def warnings_about(proc, word):
    """The lines of the server's log that contain word; no traceback anywhere."""
    text = proc.log_path.read_text()
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if word in line]


def snapshot(path):
    """What a file outside the views is: to check that nothing changed it."""
    st = os.stat(path, follow_symlinks=False)
    data = open(path, "rb").read() if stat.S_ISREG(st.st_mode) else None
    return st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, data


def served_normally(proc, name="good"):
    h = connect(proc, name)
    h.pwrite(b"fine" * 128, 0)
    assert h.pread(512, 0) == b"fine" * 128
    h.shutdown()


def list_names(proc):
    r = sh("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={proc.sock_path}")
    return sorted(e["export-name"] for e in json.loads(r.stdout)["exports"])


# -- item 1: what is planted at a view's name is refused, read nor written ---------------------

PLANTED = {
    # kind: (how to plant folder/evil.cow given (folder, outside, disk), word in the log line)
    "symlink-to-empty-file": "symbolic link",
    "symlink-to-an-overlay": "symbolic link",
    "hard-link-to-an-overlay": "2 links",
    "another-users-overlay": f"owned by uid {NOBODY}",
    "empty-file": "empty file",
    "fifo": "FIFO",
    "directory": "directory",
    "device": "device",
}


def plant(kind, folder, outside, disk):
    evil = folder / "evil.cow"
    target = None
    if kind == "symlink-to-empty-file":
        target = outside / "victim"
        target.write_bytes(b"")
        evil.symlink_to(target)
    elif kind == "symlink-to-an-overlay":
        target = outside / "secret.cow"
        with Engine(str(disk), overlay=str(target)) as e:
            e.pwrite(b"secret" * 100, 0)
        evil.symlink_to(target)
    elif kind == "hard-link-to-an-overlay":
        target = outside / "secret.cow"
        plant_overlay(target, disk)
        os.link(target, evil)
    elif kind == "another-users-overlay":
        plant_overlay(evil, disk)
        os.chown(evil, NOBODY, NOBODY)
        target = evil
    elif kind == "empty-file":
        evil.write_bytes(b"")
        target = evil
    elif kind == "fifo":
        os.mkfifo(evil, 0o600)
        target = evil
    elif kind == "directory":
        evil.mkdir()
        target = evil
    elif kind == "device":
        os.mknod(evil, stat.S_IFCHR | 0o600, os.makedev(1, 3))     # /dev/null's numbers
        target = evil
    return target


@pytest.mark.parametrize("kind", list(PLANTED))
def test_a_file_planted_at_a_views_name_is_refused_and_left_alone(disk, folder, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = plant(kind, folder, outside, disk)
    before = snapshot(target)
    with start_server(disk, "--overlay-dir", folder, "--list-views", "--handshake-timeout", "5",
                      tmp_path=tmp_path) as (_, proc):
        for option in (P.NBD_OPT_INFO, P.NBD_OPT_GO, P.NBD_OPT_GO):
            rtype, msg = go_reply(proc, b"evil", option)
            assert rtype == P.NBD_REP_ERR_UNKNOWN, (option, rtype, msg)
            assert b"evil" in msg and b"/" not in msg, msg       # the view, never a path
        assert "evil" not in list_names(proc)
        served_normally(proc)
        assert list_names(proc) == ["good"]
        lines = warnings_about(proc, f"{folder}/evil.cow")
        assert len(lines) == 1 and PLANTED[kind] in lines[0], lines   # once, naming file and why
    assert snapshot(target) == before
    assert sorted(p.name for p in folder.iterdir()) == ["evil.cow", "good.cow"]
    assert not (folder / "good.cow").is_symlink()


@pytest.mark.parametrize("kind", ["symlink-to-empty-file", "hard-link-to-an-overlay", "fifo"])
def test_the_shim_refuses_a_planted_file_too(disk, folder, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = plant(kind, folder, outside, disk)
    before = snapshot(target)
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}") as server:
        for _ in range(2):
            with pytest.raises(nbd.Error):
                connect_uri(f"nbd+unix:///evil?socket={server.sock}")
        h = connect_uri(f"nbd+unix:///good?socket={server.sock}")
        h.pwrite(b"g" * 512, 0)
        h.shutdown()
        lines = [line for line in server.stderr_text().splitlines() if "evil.cow" in line]
        assert len(lines) == 1 and PLANTED[kind] in lines[0], lines
    assert snapshot(target) == before


# -- item 2: a FIFO never holds a handshake, nor a --max-connections slot ----------------------

@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_a_planted_fifo_never_blocks_a_handshake(disk, folder, tmp_path, readonly):
    with Engine(str(disk), overlay=str(folder / "good.cow")) as e:
        e.pwrite(b"good" * 128, 0)
    os.mkfifo(folder / "evil.cow", 0o600)
    opts = ["--overlay-dir", folder, "--max-connections", "2", "--handshake-timeout", "3"]
    with start_server(disk, *opts, *(["-r"] if readonly else []),
                      tmp_path=tmp_path) as (_, proc):
        for _ in range(4):              # more rounds than --max-connections has slots
            with RawClient(proc.sock_path, timeout=10) as c:
                c.greeting()
                data = struct.pack(">I", 4) + b"evil" + struct.pack(">H", 0)
                assert c.option(P.NBD_OPT_INFO, data)[-1][0] == P.NBD_REP_ERR_UNKNOWN
                assert c.option(P.NBD_OPT_GO, data)[-1][0] == P.NBD_REP_ERR_UNKNOWN
        h = connect(proc, "good")       # a real client still gets a slot and its view
        assert h.pread(512, 0) == b"good" * 128
        h.shutdown()
        assert len(warnings_about(proc, "evil.cow: a FIFO")) == 1
    assert stat.S_ISFIFO(os.stat(folder / "evil.cow").st_mode)


# -- item 3: a name that keeps changing is refused after a few tries, never waited on ------------

def test_a_dangling_link_as_overlay_file_is_one_line_not_a_spin(disk, tmp_path):
    """--overlay FILE (the operator's): a link is followed, but a dangling one is refused at
    once (it made the create loop spin forever: the link's name always exists, its target never
    does)."""
    link = tmp_path / "vm.cow"
    link.symlink_to(tmp_path / "nowhere" / "vm.cow")
    r = subprocess.run(server_command(disk, "--overlay", link, "-U", tmp_path / "s.sock"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0] and "does not exist" in lines[0], r.stderr
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()


def test_a_view_name_flipping_between_link_and_nothing(disk, folder, tmp_path):
    """A local user plants and removes a dangling link at a view's name as fast as it can while
    clients ask for that name: every client gets an answer at once (made, or refused), nothing
    is created where the link points, and the server serves others all along."""
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = folder / "flip.cow"
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            try:
                evil.symlink_to(outside / "target.cow")
            except FileExistsError:
                pass
            try:
                if evil.is_symlink():
                    evil.unlink()
            except FileNotFoundError:
                pass

    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        t = threading.Thread(target=flipper)
        t.start()
        try:
            answers = set()
            for _ in range(30):
                rtype, msg = go_reply(proc, b"flip")        # RawClient: 20 s at most
                answers.add(rtype)
                assert b"/" not in msg
                if rtype == P.NBD_REP_ACK:
                    break                                   # the server made it: done
            assert answers <= {P.NBD_REP_ACK, P.NBD_REP_ERR_UNKNOWN}
            served_normally(proc)
        finally:
            stop.set()
            t.join()
    assert not (outside / "target.cow").exists()


def test_a_dangling_link_at_a_views_name_is_refused(disk, folder, tmp_path):
    (folder / "ghost.cow").symlink_to(tmp_path / "nowhere.cow")
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        for option in (P.NBD_OPT_INFO, P.NBD_OPT_GO):
            rtype, msg = go_reply(proc, b"ghost", option)
            assert rtype == P.NBD_REP_ERR_UNKNOWN and b"/" not in msg, msg
        served_normally(proc)
        assert len(warnings_about(proc, "ghost.cow: a symbolic link")) == 1
    assert not (tmp_path / "nowhere.cow").exists()


class _SlowToOpen(ViewSet):
    """A view set whose opening of name "slow" waits for an event: the stand-in for an open
    that takes long (a slow disk's fsync); the wait under test is ViewSet.acquire's own."""

    def __init__(self, *a, gate, **kw):
        super().__init__(*a, **kw)
        self.gate = gate

    def _open_engine(self, name):
        if name == "slow":
            self.gate.wait(60)
        return super()._open_engine(name)


def test_no_client_waits_without_limit_for_a_view_to_settle(disk, folder):
    gate = threading.Event()
    b = Backing(str(disk))
    try:
        views = _SlowToOpen(b, directory=str(folder), settle_timeout=0.5, gate=gate)
        first = []
        t = threading.Thread(target=lambda: first.append(views.acquire("slow")))
        t.start()
        wait_until(lambda: "slow" in views._views, what="the first open to start")
        t0 = time.monotonic()
        with pytest.raises(ViewError) as e:
            views.acquire("slow")                   # would have waited for ever
        assert e.value.kind == UNAVAILABLE and "try again" in str(e.value)
        assert time.monotonic() - t0 < 10
        gate.set()
        t.join()
        views.release(first[0])
        views.release(views.acquire("slow"))        # settled: served again
    finally:
        b.close()


# -- item 7: a finite default cap, temporary views included ---------------------------------------

def test_one_client_making_new_names_meets_the_default_cap(disk, tmp_path):
    with start_server(disk, "--temporary-views", "keep", tmp_path=tmp_path) as (_, proc):
        assert f"at most {DEFAULT_MAX_VIEWS})" in proc.log_path.read_text()
        for k in range(DEFAULT_MAX_VIEWS):
            assert go_reply(proc, f"t{k}".encode())[0] == P.NBD_REP_ACK, k
        # Each kept view holds its overlay and its lock on the backing: bounded by the cap.
        wait_until(lambda: server_fds(proc) < 2 * DEFAULT_MAX_VIEWS + 32,
                   what="descriptors within two a view")
        fds = server_fds(proc)
        for k in range(20):
            rtype, msg = go_reply(proc, f"more{k}".encode())
            assert rtype == P.NBD_REP_ERR_POLICY and f"maximum of {DEFAULT_MAX_VIEWS}".encode() in msg
        # Without -v, the log says it once, not at every new name.
        wait_until(lambda: "refused: the server holds its maximum" in proc.log_path.read_text(),
                   what="the cap's refusal logged")
        assert proc.log_path.read_text().count("refused: the server holds its maximum") == 1
        assert go_reply(proc, b"t7", P.NBD_OPT_INFO)[0] == P.NBD_REP_ACK   # existing: served
        h = connect(proc, "t7")
        h.pwrite(b"x" * 512, 0)
        h.shutdown()
        wait_until(lambda: server_fds(proc) <= fds, what="descriptors back")


def test_the_default_cap_is_documented_and_zero_means_none():
    from cow.cli import _DEFAULT_MAX_EXPORTS
    assert _DEFAULT_MAX_EXPORTS == DEFAULT_MAX_VIEWS
    r = subprocess.run(server_command(None, "--help"), capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert f"Default {DEFAULT_MAX_VIEWS}" in text and "--max-exports 0: no cap" in text
    assert "--list-views" in text


def test_max_exports_zero_is_the_operators_no_cap(disk, tmp_path):
    with start_server(disk, "--temporary-views", "discard", "--max-exports", "0",
                      tmp_path=tmp_path) as (_, proc):
        assert "no cap)" in proc.log_path.read_text()


def test_the_shims_default_cap(disk, tmp_path):
    folder = tmp_path / "views"
    folder.mkdir(mode=0o700)
    for k in range(DEFAULT_MAX_VIEWS):        # views made before: the folder is at the cap
        plant_overlay(folder / f"v{k}.cow", disk)
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}") as server:
        with pytest.raises(nbd.Error):
            connect_uri(f"nbd+unix:///new?socket={server.sock}")
        h = connect_uri(f"nbd+unix:///v3?socket={server.sock}")
        h.pwrite(b"y" * 512, 0)
        h.shutdown()
    assert not (folder / "new.cow").exists()


def connect_uri(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


# -- item 10: NBD_OPT_LIST shows no view by default; messages name no server path -----------------

def test_views_are_not_listed_unless_asked(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        for name in ("alice-secret", "bob-secret"):
            served_normally(proc, name)
        assert list_names(proc) == []
    with start_server(disk, "--overlay-dir", folder, "-e", "main",
                      tmp_path=tmp_path) as (_, proc):
        assert list_names(proc) == ["main"]            # the view "" gives, and only it
    with start_server(disk, "--overlay-dir", folder, "--list-views",
                      tmp_path=tmp_path) as (_, proc):
        assert list_names(proc) == ["alice-secret", "bob-secret"]


def test_the_shim_lists_no_view_unless_asked(disk, tmp_path):
    folder = tmp_path / "views"
    with shim(tmp_path, "a", f"file={disk}", f"overlay-dir={folder}") as server:
        h = connect_uri(f"nbd+unix:///secret?socket={server.sock}")
        h.pwrite(b"s" * 512, 0)
        h.shutdown()
        r = sh("nbdinfo", "--list", "--json", server.uri)
        assert '"secret"' not in r.stdout
    with shim(tmp_path, "b", f"file={disk}", f"overlay-dir={folder}",
              "list-views=true") as server:
        r = sh("nbdinfo", "--list", "--json", server.uri)
        assert '"secret"' in r.stdout


def test_a_temporary_views_error_names_no_path(disk, tmp_path):
    tmpdir = tmp_path / "scratch-dir"
    tmpdir.mkdir()
    with start_server(disk, "--temporary-views", "keep", "--tmpdir", tmpdir,
                      tmp_path=tmp_path) as (_, proc):
        tmpdir.rmdir()                              # the overlay cannot be made any more
        rtype, msg = go_reply(proc, b"t1")
        assert rtype == P.NBD_REP_ERR_UNKNOWN and b"t1" in msg, msg
        assert b"/" not in msg and b"scratch-dir" not in msg, msg
        assert len(warnings_about(proc, "scratch-dir")) == 1         # the log has it


def test_a_views_error_names_not_the_golden_image(disk, folder, tmp_path):
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        served_normally(proc, "v1")
    os.utime(disk, ns=(time.time_ns(), time.time_ns() + 10**9))  # the golden image "changed"
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        rtype, msg = go_reply(proc, b"v1")
        assert rtype == P.NBD_REP_ERR_UNKNOWN and b"v1" in msg, msg
        assert b"/" not in msg and disk.name.encode() not in msg, msg
        assert len(warnings_about(proc, "changed since the overlay was made")) == 1


# -- item 11: a sane largest block size -------------------------------------------------------------

def test_a_planted_view_with_1_gib_blocks_is_refused(disk, folder, tmp_path):
    plant_overlay(folder / "huge.cow", disk, block_size=1 << 30)
    before = snapshot(folder / "huge.cow")
    with start_server(disk, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        rss0 = _rss_kib(proc)
        for option in (P.NBD_OPT_INFO, P.NBD_OPT_GO):
            rtype, msg = go_reply(proc, b"huge", option)
            assert rtype == P.NBD_REP_ERR_UNKNOWN and b"block size" in msg, msg
            assert b"/" not in msg
        lines = warnings_about(proc, "huge.cow")
        assert len(lines) == 1 and "at most 4 MiB" in lines[0], lines
        served_normally(proc)
        assert _rss_kib(proc) - rss0 < 64 * 1024
    assert snapshot(folder / "huge.cow") == before


def _rss_kib(proc):
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def test_an_overlay_file_with_1_gib_blocks_is_one_line(disk, tmp_path):
    plant_overlay(tmp_path / "vm.cow", disk, block_size=1 << 30)
    r = subprocess.run(server_command(disk, "--overlay", tmp_path / "vm.cow", "-U",
                                      tmp_path / "s.sock"),
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "at most 4 MiB" in lines[0], r.stderr


@pytest.mark.parametrize("size", ["8M", "1G"])
def test_the_largest_block_size_on_the_command_line(disk, tmp_path, size):
    r = subprocess.run(server_command(disk, "--cow-block-size", size, "-U", tmp_path / "s.sock"),
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "to 4M" in lines[0], r.stderr
    line = start_up_error(tmp_path, f"file={disk}", f"cow-block-size={size}")
    assert "to 4M" in line, line


def test_4m_blocks_are_still_served(disk, tmp_path):
    with start_server(disk, "--cow-block-size", "4M", tmp_path=tmp_path) as (uri, _):
        h = connect_uri(uri)
        h.pwrite(b"z" * 512, 4096)
        assert h.pread(512, 4096) == b"z" * 512
        h.shutdown()


# -- --overlay FILE: the operator's file ----------------------------------------------------------

def test_overlay_file_follows_the_operators_link_but_refuses_a_fifo(disk, tmp_path):
    real = tmp_path / "real.cow"
    real.write_bytes(b"")                   # mktemp's: an empty file the operator names is made
    (tmp_path / "link.cow").symlink_to(real)   # an overlay, through the link
    with start_server(disk, "--overlay", tmp_path / "link.cow", tmp_path=tmp_path) as (uri, _):
        h = connect_uri(uri)
        h.pwrite(b"kept", 0)
        h.shutdown()
    with start_server(disk, "--overlay", real, tmp_path=tmp_path) as (uri, _):
        h = connect_uri(uri)
        assert h.pread(4, 0) == b"kept"
        h.shutdown()
    assert (tmp_path / "link.cow").is_symlink()
    os.mkfifo(tmp_path / "fifo.cow")
    for extra in ([], ["-r"]):
        r = subprocess.run(server_command(disk, "--overlay", tmp_path / "fifo.cow", *extra, "-U",
                                          tmp_path / "s.sock"),
                           capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "not a regular file" in lines[0], \
            r.stderr
