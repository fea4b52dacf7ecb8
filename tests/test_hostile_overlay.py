"""Hostile overlay files (issue 18, items 4 and 5): an overlay is data that another local user, or
a file copied in from elsewhere, may have written, so what its header records must never choose
which file commit writes, which command the server runs, or which file it serves.  Each test
crafts the overlay with cow.overlayfile's own Header.pack, as an attacker who can stat the target
would, and attacks the real tools, the real server and the real nbdkit shim."""

import json
import os
import shlex
import stat
import subprocess
import time

import nbd
import pytest

from conftest import PYTHON, sha256_file, write_sample
from cow import overlayfile as F
from support_server import server_command, start_server
from support_shim import plugin_path

KiB = 1024
MiB = 1024 * KiB
NOBODY = 65534
# A server that should refuse to start, run so that one which starts anyway (as before the fix)
# stops again at once instead of serving until the test times out.
CAPTIVE = ("--run", "true")


def tool(*args):
    return subprocess.run([PYTHON, "-P", "-m", "cow.overlay", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def one_line(r, *words, status=1):
    """r failed with one line naming words, and no traceback."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in r.stderr
    return lines[0]


def fails(*args, words=()):
    return one_line(tool(*args), *words)


def state(*paths):
    """What must not change: each file's bytes and modification time."""
    return [(sha256_file(p), os.stat(p).st_mtime_ns) for p in paths]


def craft(path, *, backing, kind=F.KIND_FILE, disk_size, forge=None, flags=0, version=F.VERSION,
          block_size=4 * KiB, blocks=None, mode=0o600):
    """An overlay written byte by byte with overlayfile's own pack: its header records backing;
    forge: a file whose size, modification time, device and inode it copies (as anyone who can
    stat that file can); blocks: {block number: data} marked allocated."""
    h = F.Header(disk_size=disk_size, block_size=block_size, backing_kind=kind,
                 backing=str(backing), backing_size=disk_size, flags=flags,
                 created_ns=time.time_ns(), version=version)
    if forge is not None:
        st = os.stat(forge)
        h.backing_size, h.backing_mtime_ns = st.st_size, st.st_mtime_ns
        if version >= 2:
            h.backing_dev, h.backing_ino = st.st_dev, st.st_ino
    bitmap = bytearray(h.bitmap_len)
    with open(path, "wb") as f:
        f.write(h.pack())
        f.truncate(h.data_offset)
        for n, data in (blocks or {}).items():
            bitmap[n // 4] |= 1 << (2 * (n % 4))
            f.seek(h.data_offset + n * block_size)
            f.write(data.ljust(block_size, b"\0"))
        f.seek(h.bitmap_offset)
        f.write(bitmap)
    os.chmod(path, mode)
    return path


def read_header(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return F.read_header(fd, str(path))
    finally:
        os.close(fd)


def served(uri, count, offset=0):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(count, offset)
    finally:
        h.shutdown()


def make_overlay(tmp_path, disk, name="vm.cow", data=b"changed by a client"):
    """A real overlay over disk, written by the real server; returns (overlay, view)."""
    ov = tmp_path / name
    with start_server(disk, "--overlay", ov, "--cow-block-size", "4K",
                      tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(data, 4 * KiB + 10)
        h.trim(8 * KiB, 16 * KiB)
        h.flush()
        view = h.pread(h.get_size(), 0)
        h.shutdown()
    return ov, view


def set_committing(ov):
    """As a crash in the middle of a commit leaves the overlay: its flag set."""
    h = read_header(ov)
    h.flags |= F.FLAG_COMMITTING
    with open(ov, "r+b") as f:
        F.write_header(f.fileno(), h)


# -- item 4: commit writes only into the file the operator names, and only if it is the one ------

def test_a_crafted_overlay_cannot_make_commit_write_another_file(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    passwd = etc / "passwd"                         # the stand-in the operator never names
    passwd.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n".ljust(64 * KiB, b"#"))
    disk = write_sample(tmp_path / "disk.img", 64 * KiB)     # the operator's real backing
    st = os.stat(passwd)
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))      # same size, same time: only the
    link = tmp_path / "link.img"                             # device and inode tell them apart
    link.symlink_to(passwd)
    evil = craft(tmp_path / "evil.cow", backing=passwd, disk_size=64 * KiB, forge=passwd,
                 blocks={0: b"root::0:0:owned:/root:/bin/bash\n"})
    stuck = craft(tmp_path / "stuck.cow", backing=passwd, disk_size=64 * KiB, forge=passwd,
                  flags=F.FLAG_COMMITTING, blocks={0: b"root::0:0:owned:/root:/bin/bash\n"})
    before = state(passwd, disk, evil, stuck)

    for ov in (evil, stuck):
        # --yes alone no longer commits: one line that names the whole command.
        line = fails("commit", ov, "--yes", words=("python -m cow.overlay commit", "--into BACKING",
                                                   "--yes"))
        assert str(passwd) not in line      # the header's pick is never offered as the target
        # The real backing of another file: same size and time, but not the file recorded.
        fails("commit", ov, "--into", disk, "--yes", words=("not the file the overlay was made "
                                                           "over", "inode"))
        # A symbolic link, to the recorded file or to any other.
        fails("commit", ov, "--into", link, "--yes", words=("symbolic link",))
        link2 = tmp_path / "link2.img"
        link2.symlink_to(disk)
        fails("commit", ov, "--into", link2, "--yes", words=("symbolic link",))
        link2.unlink()
        assert state(passwd, disk, evil, stuck) == before

    # Every hint to run commit names the target as a placeholder, never the recorded file.
    r = subprocess.run(server_command(disk, "--overlay", stuck, "-U", tmp_path / "s.sock"),
                       capture_output=True, text=True, timeout=60)
    line = one_line(r, "interrupted", f"python -m cow.overlay commit {stuck} --into BACKING --yes")
    r = tool("info", stuck)
    assert r.returncode == 0, r.stderr
    assert f"python -m cow.overlay commit {stuck} --into BACKING --yes" in r.stdout
    fails("reset", stuck, "--yes", words=("--into BACKING --yes",))
    assert state(passwd, disk, evil, stuck) == before


def test_commit_checks_the_named_file_against_the_recorded_one(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov, view = make_overlay(tmp_path, disk)
    h = read_header(ov)
    st = os.stat(disk)
    assert (h.version, h.backing_dev, h.backing_ino) == (2, st.st_dev, st.st_ino)
    copy = tmp_path / "copy.img"                    # cp -p: same bytes, size and time
    subprocess.run(["cp", "-p", str(disk), str(copy)], check=True)
    before = state(disk, copy, ov)
    fails("commit", ov, "--into", copy, "--yes", words=("not the file the overlay was made over",
                                                        "--backing-changed=accept"))
    fails("commit", ov, "--into", copy, words=("--yes",))
    fails("commit", ov, "--into", tmp_path / "missing.img", "--yes", words=("missing.img",))
    fails("commit", ov, "--into", tmp_path, "--yes", words=("not a regular file",))
    short = write_sample(tmp_path / "short.img", 1 * MiB - 4 * KiB)
    fails("commit", ov, "--into", short, "--yes", words=("1044480 bytes",))
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # modified since
    fails("commit", ov, "--into", disk, "--yes", words=("changed since", "modified"))
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert state(disk, copy, ov) == before
    # The operator may insist on another file (say the backing moved to another file system).
    r = tool("commit", ov, "--into", copy, "--yes", "--backing-changed=accept")
    assert r.returncode == 0, r.stderr
    assert copy.read_bytes() == view and state(disk)[0] == before[0]
    h = read_header(ov)
    cst = os.stat(copy)
    assert (h.backing, h.backing_dev, h.backing_ino) == (str(copy), cst.st_dev, cst.st_ino)


def test_an_interrupted_commit_checks_the_file_but_not_its_time(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov, view = make_overlay(tmp_path, disk)
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "-p", str(disk), str(copy)], check=True)
    set_committing(ov)
    with open(disk, "r+b") as f:                    # the part written before the crash
        f.seek(4 * KiB)
        f.write(view[4 * KiB:8 * KiB])
    before = state(disk, copy, ov)
    fails("commit", ov, "--into", copy, "--yes", words=("not the file the overlay was made over",))
    link = tmp_path / "link.img"
    link.symlink_to(disk)
    fails("commit", ov, "--into", link, "--yes", words=("symbolic link",))
    assert state(disk, copy, ov) == before
    r = tool("commit", ov, "--into", disk, "--yes")     # its time moved: not a refusal here
    assert r.returncode == 0, r.stderr
    assert disk.read_bytes() == view and copy.read_bytes() != view
    assert not read_header(ov).committing


def test_a_version_1_overlay_commits_only_into_the_file_it_names(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov, view = make_overlay(tmp_path, disk)
    h = read_header(ov)
    old = F.Header(**{**h.__dict__, "version": 1, "backing_dev": 0, "backing_ino": 0,
                      "seq": h.seq + 1})
    with open(ov, "r+b") as f:                      # as a cow of format version 1 wrote it
        f.write(old.pack())
        f.seek(2048)
        f.write(bytes(2048))
    h = read_header(ov)
    assert (h.version, h.file_id) == (1, None)
    assert json.loads(tool("info", ov, "--json").stdout)["format_version"] == 1
    copy = tmp_path / "copy.img"
    subprocess.run(["cp", "-p", str(disk), str(copy)], check=True)
    before = state(disk, copy, ov)
    fails("commit", ov, "--into", copy, "--yes", words=("version-1", str(disk)))
    with start_server(None, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
        assert served(uri, len(view)) == view       # read-only: read, and left as it is
    assert state(disk, copy, ov) == before
    r = tool("commit", ov, "--into", disk, "--yes")
    assert r.returncode == 0, r.stderr
    assert disk.read_bytes() == view
    h = read_header(ov)
    st = os.stat(disk)
    assert (h.version, h.file_id) == (2, (st.st_dev, st.st_ino))
    # An interrupted commit of a version-1 overlay: still only into the file it names.
    stuck = craft(tmp_path / "stuck.cow", backing=disk, disk_size=1 * MiB, forge=disk,
                  version=1, flags=F.FLAG_COMMITTING, blocks={1: b"from a v1 crash"})
    before = state(disk, copy, stuck)
    fails("commit", stuck, "--into", copy, "--yes", words=("version-1",))
    assert state(disk, copy, stuck) == before
    assert tool("commit", stuck, "--into", disk, "--yes").returncode == 0
    assert disk.read_bytes()[4 * KiB:4 * KiB + 15] == b"from a v1 crash"


def test_a_version_1_overlay_served_read_write_records_its_backing(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = craft(tmp_path / "v1.cow", backing=disk, disk_size=1 * MiB, forge=disk, version=1,
               blocks={2: b"kept from version 1"})
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        assert served(uri, 19, 8 * KiB) == b"kept from version 1"
    h = read_header(ov)
    st = os.stat(disk)
    assert (h.version, h.file_id, h.backing) == (2, (st.st_dev, st.st_ino), str(disk))


# -- item 5: a recorded backing is not the operator's word ----------------------------------------

def test_a_recorded_command_runs_only_when_the_operator_gives_it(tmp_path):
    marker = tmp_path / "marker"
    argv = ["sh", "-c", f"touch {marker}; exec nbdkit memory 1M"]
    command = shlex.join(argv)
    # Even a file this user owns and nobody else may write.
    evil = craft(tmp_path / "evil.cow", backing=command, kind=F.KIND_COMMAND, disk_size=1 * MiB)
    sock = tmp_path / "s.sock"
    r = subprocess.run(server_command(None, "--overlay", evil, "-U", sock, *CAPTIVE),
                       capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    one_line(r, command, f"python -m cow.server --overlay {evil} [OPTIONS] -- {command}")
    assert not sock.exists()
    r = subprocess.run(["nbdkit", "-f", "-U", str(sock), *CAPTIVE, "python", plugin_path(),
                        f"overlay={evil}"], capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    line = one_line(r, command, "runs no command", "python -m cow.server")
    assert line.startswith("nbdkit: error:")
    r = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "-U", "-", f"overlay={evil}", "--run",
                        "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "runs no command" in r.stderr
    r = tool("info", evil)
    assert r.returncode == 0 and command in r.stdout and f"-- {command}" in r.stdout
    d = json.loads(tool("info", evil, "--json").stdout)["backing"]
    assert d["name"] == command and d["used_when_not_named"] is False
    assert not marker.exists()
    # Restated after --, it is the operator's command: it runs.
    with start_server(None, "--overlay", evil, "--", *argv, tmp_path=tmp_path) as (uri, _):
        assert served(uri, 4) == bytes(4)
    assert marker.exists()


def test_a_command_hidden_in_a_header_stays_on_one_line(tmp_path):
    evil = craft(tmp_path / "evil.cow", backing="nbdkit memory 1M\n\x1b[2Jpython -m cow.server: "
                 "serving", kind=F.KIND_COMMAND, disk_size=1 * MiB)
    r = subprocess.run(server_command(None, "--overlay", evil, "-U", tmp_path / "s.sock",
                                      *CAPTIVE),
                       capture_output=True, text=True, timeout=60)
    line = one_line(r, "\\n\\x1b[2J")
    assert "\x1b" not in r.stderr


def test_a_recorded_file_is_served_only_from_an_overlay_nobody_else_could_write(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n".ljust(64 * KiB, b"\0"))
    evil = craft(tmp_path / "evil.cow", backing=secret, disk_size=64 * KiB, forge=secret)
    sock = tmp_path / "s.sock"
    for owner, mode, words in ((NOBODY, 0o600, ("uid 65534",)), (0, 0o666, ("mode 0666",)),
                               (0, 0o620, ("mode 0620",))):
        os.chown(evil, owner, -1)
        os.chmod(evil, mode)
        r = subprocess.run(server_command(None, "--overlay", evil, "-U", sock, *CAPTIVE),
                           capture_output=True, text=True, timeout=60)
        one_line(r, *words, str(secret), "python -m cow.server BACKING --overlay")
        assert not sock.exists()
        r = subprocess.run(["nbdkit", "-f", "-U", str(sock), *CAPTIVE, "python", plugin_path(),
                            f"overlay={evil}"], capture_output=True, text=True, timeout=60)
        one_line(r, *words, "file= or uri=")
        assert not sock.exists()
        d = json.loads(tool("info", evil, "--json").stdout)["backing"]
        assert d["used_when_not_named"] is False
    # Named by the operator, the same file is the operator's choice; and a file this user owns
    # that nobody else may write chooses its backing, as before.
    os.chown(evil, 0, -1)
    os.chmod(evil, 0o644)
    with start_server(None, "--overlay", evil, "-r", tmp_path=tmp_path) as (uri, _):
        assert served(uri, 10) == secret.read_bytes()[:10]


def test_a_recorded_uri_follows_the_same_rule(tmp_path, nbdkit):
    uri = nbdkit("memory", "1M")
    evil = craft(tmp_path / "evil.cow", backing=uri, kind=F.KIND_NBD, disk_size=1 * MiB,
                 mode=0o666)
    r = subprocess.run(server_command(None, "--overlay", evil, "-U", tmp_path / "s.sock",
                                      *CAPTIVE),
                       capture_output=True, text=True, timeout=60)
    one_line(r, "mode 0666", "python -m cow.server BACKING --overlay")
    os.chmod(evil, 0o600)
    with start_server(None, "--overlay", evil, "-r", tmp_path=tmp_path) as (u, _):
        assert served(u, 4) == bytes(4)


def view_uri(proc, name):
    return f"nbd+unix:///{name}?socket={proc.sock_path}"


def _pattern(offset, count):
    """What nbdkit's pattern plugin serves: each 8-byte word holds its offset, big-endian."""
    return b"".join((o).to_bytes(8, "big") for o in range(offset, offset + count, 8))


def test_views_never_use_a_recorded_backing(tmp_path, backing_factory):
    marker = tmp_path / "marker"
    command = shlex.join(["sh", "-c", f"touch {marker}; exec nbdkit memory 1M"])
    views = tmp_path / "views"
    views.mkdir(mode=0o700)
    # Planted as the views server accepts a view file: this user's, mode 0600, one link.
    craft(views / "planted.cow", backing=command, kind=F.KIND_COMMAND, disk_size=1 * MiB,
          blocks={0: b"planted"})
    # Over a golden command backing, the planted view is served over the golden image.
    with start_server(None, "--overlay-dir", views, "--", "nbdkit", "pattern", "1M",
                      tmp_path=tmp_path) as (_, proc):
        assert served(view_uri(proc, "planted"), 7) == b"planted"
        assert served(view_uri(proc, "planted"), 4 * KiB, 4 * KiB) == _pattern(4 * KiB, 4 * KiB)
        assert served(view_uri(proc, "other"), 64, 64 * KiB) == _pattern(64 * KiB, 64)
    assert not marker.exists()
    # Over a golden file, it does not fit (made over a command): refused; the others serve.
    os.unlink(views / "other.cow")
    golden = backing_factory(1 * MiB, name="golden.img")
    with start_server(golden, "--overlay-dir", views, tmp_path=tmp_path) as (_, proc):
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(view_uri(proc, "planted"))
        assert served(view_uri(proc, "other"), 64) == golden.read_bytes()[:64]
        assert "planted" in proc.log_path.read_text()
    assert not marker.exists()
    assert stat.S_IMODE(os.stat(views / "planted.cow").st_mode) == 0o600
