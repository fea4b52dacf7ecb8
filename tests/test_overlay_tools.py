"""python -m cow.overlay: info, export, commit, reset and fork, with real clients: the served view
is read with libnbd, exports are checked with qemu-img compare and qemu-img map, commits by the
backing's bytes."""

import json
import os
import struct
import subprocess
import zlib

import nbd
import pytest

from conftest import PYTHON, sha256_file, write_sample
from support_server import start_server
from support_temporaries import PlantedTemporaries

KiB = 1024
MiB = 1024 * KiB


def tool(*args, timeout=120):
    return subprocess.run([PYTHON, "-P", "-m", "cow.overlay", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def ok(*args):
    r = tool(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fails(*args, words=()):
    r = tool(*args)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def info(ov):
    return json.loads(ok("info", ov, "--json"))


def view(disk, ov, tmp_path):
    """The whole disk as a read-only server on (disk, ov) serves it."""
    with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        data = h.pread(h.get_size(), 0)
        h.shutdown()
    return data


def changes(disk, ov, tmp_path, block_size, *, more=()):
    """Serve (disk, ov) and make changes of every kind; return the served view after them."""
    with start_server(disk, "--overlay", ov, "--cow-block-size", block_size,
                      tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        size = h.get_size()
        bs = int(block_size[:-1]) * (MiB if block_size.endswith("M") else KiB)
        h.pwrite(b"whole blocks" * (2 * bs // 12) + bytes(2 * bs % 12), bs)
        h.pwrite(b"partial", 5 * bs + 100)
        h.pwrite(bytes(bs), 7 * bs)                              # zeroes, written
        h.trim(3 * bs, 9 * bs)                                   # over backing data
        h.zero(bs, 13 * bs, nbd.CMD_FLAG_NO_HOLE)                # allocated, punched
        h.pwrite(b"the tail", size - 8)                          # the short last block
        for off, data in more:
            h.pwrite(data, off)
        h.flush()
        data = h.pread(size, 0)
        h.shutdown()
    return data


# -- info -----------------------------------------------------------------------------------

def test_info_text_and_json(backing_factory, tmp_path):
    disk = backing_factory(4 * MiB + 1000)
    ov = tmp_path / "vm.cow"
    changes(disk, ov, tmp_path, "64K")
    d = info(ov)
    st = os.stat(disk)
    assert d["backing"] == {"kind": "file", "name": str(disk), "size": 4 * MiB + 1000,
                            "mtime_ns": st.st_mtime_ns,
                            "device": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                            "inode": st.st_ino, "status": "unchanged",
                            "status_text": "unchanged since recorded",
                            "used_when_not_named": True, "why_not_used_when_not_named": None}
    assert (d["disk_size"], d["block_size"], d["blocks"]) == (4 * MiB + 1000, 65536, 65)
    # blocks 1, 2, 5, 7, 13 and the last written; 9, 10, 11 trimmed
    assert (d["allocated_blocks"], d["trimmed_blocks"]) == (6, 3)
    assert d["bytes_on_disk"] == os.stat(ov).st_blocks * 512 and not d["commit_interrupted"]
    text = ok("info", ov)
    assert f"{ov}: cow overlay, format version 2" in text
    assert f"device {os.major(st.st_dev)}:{os.minor(st.st_dev)}, inode {st.st_ino}" in text
    assert "6 allocated, 3 trimmed, 56 unchanged" in text and str(disk) in text


def test_info_needs_no_backing_and_says_what_became_of_it(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = tmp_path / "vm.cow"
    changes(disk, ov, tmp_path, "4K")
    os.utime(disk, ns=(1, 1))
    d = info(ov)
    assert d["backing"]["status"] == "changed" and "modified" in d["backing"]["status_text"]
    os.unlink(disk)
    d = info(ov)
    assert d["backing"]["status"] == "missing" and d["allocated_blocks"] > 0


def test_tools_refuse_an_overlay_a_server_holds(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (_, proc):
        for args in (("info", ov), ("export", ov, tmp_path / "o.qcow2"),
                     ("commit", ov, "--into", disk, "--yes"),
                     ("reset", ov, "--yes"), ("fork", ov, tmp_path / "f.cow")):
            fails(*args, words=(str(ov), f"in use by pid {proc.pid}"))
    assert not (tmp_path / "o.qcow2").exists() and not (tmp_path / "f.cow").exists()


def test_bad_arguments_are_one_clear_line(backing_factory, tmp_path):
    disk = backing_factory(1 * MiB)
    fails("info", tmp_path / "missing.cow", words=("No such file",))
    fails("info", disk, words=("not a cow overlay",))
    r = tool("frobnicate", disk)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = tool("export", disk)
    assert r.returncode == 2 and "OUT.qcow2" in r.stderr


@pytest.mark.parametrize("command", ["info", "export", "commit", "reset", "fork"])
def test_every_command_has_help_with_an_example(command):
    out = ok(command, "--help")
    assert f"example:\n  python -m cow.overlay {command} " in out


# -- export ---------------------------------------------------------------------------------

def qemu_map(image):
    r = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("block_size", ["4K", "64K", "4M"])
def test_export_holds_exactly_the_changes(backing_factory, tmp_path, block_size):
    bs = int(block_size[:-1]) * (MiB if block_size.endswith("M") else KiB)
    size = 15 * bs + 777                             # a short last block
    disk = backing_factory(size)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, block_size)
    out = tmp_path / "changes.qcow2"
    stdout = ok("export", ov, out)
    assert str(out) in stdout and str(disk) in stdout

    qi = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                   capture_output=True, text=True, check=True).stdout)
    assert (qi["format"], qi["backing-filename"], qi["backing-filename-format"]) == \
        ("qcow2", str(disk), "raw")
    assert qi["virtual-size"] == (size + 511) // 512 * 512     # qcow2 counts in sectors
    with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
        r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), uri],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    # What qemu-img map shows as allocated in OUT itself (depth 0) is the changed blocks, and the
    # trimmed (and written-as-zero) ones are zero clusters.
    changed = {1, 2, 5, 7, 9, 10, 11, 13, 15}
    zero_blocks = {7, 9, 10, 11, 13}
    top = set()
    zeros = set()
    for e in qemu_map(out):
        if e["depth"] != 0:
            continue
        blocks = range(e["start"] // bs, (e["start"] + e["length"] + bs - 1) // bs)
        top.update(blocks)
        if e["zero"] and not e["data"]:
            zeros.update(blocks)
    assert top == changed and zeros == zero_blocks
    assert served == view(disk, ov, tmp_path)        # export left the overlay alone


def test_export_refusals(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = tmp_path / "vm.cow"
    changes(disk, ov, tmp_path, "4K")
    out = tmp_path / "o.qcow2"
    out.write_bytes(b"mine")
    fails("export", ov, out, words=("already exists",))
    assert out.read_bytes() == b"mine"
    os.utime(disk, ns=(5, 5))
    fails("export", ov, tmp_path / "new.qcow2", words=("changed", "--backing-changed=accept"))
    assert not (tmp_path / "new.qcow2").exists()
    ok("export", ov, tmp_path / "new.qcow2", "--backing-changed=accept")


# -- commit ---------------------------------------------------------------------------------

def test_commit_writes_the_view_into_the_backing(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 2 * MiB + 4096 * 3)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "4K")
    before = sha256_file(disk)
    fails("commit", ov, words=("--yes",))
    fails("commit", ov, "--yes", words=("--into BACKING --yes",))
    fails("commit", ov, "--into", disk, words=("--yes",))
    assert sha256_file(disk) == before
    out = ok("commit", ov, "--into", disk, "--yes")
    assert "now empty" in out
    assert disk.read_bytes() == served
    d = info(ov)
    assert (d["allocated_blocks"], d["trimmed_blocks"]) == (0, 0)
    assert d["backing"]["status"] == "unchanged"     # the new identity is recorded
    assert d["file_size"] == d["data_offset"]        # the data area's space is given back
    assert view(disk, ov, tmp_path) == served


def test_commit_refuses_a_backing_in_use_or_not_a_file(tmp_path, nbdkit):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = tmp_path / "vm.cow"
    changes(disk, ov, tmp_path, "4K")
    before = sha256_file(disk)
    with start_server(disk, tmp_path=tmp_path) as (_, proc):    # another view of the backing
        fails("commit", ov, "--into", disk, "--yes", words=(str(disk), f"in use by pid {proc.pid}"))
    assert sha256_file(disk) == before and info(ov)["allocated_blocks"] > 0

    uri = nbdkit("memory", "1M")
    nov = tmp_path / "nbd.cow"
    with start_server(uri, "--overlay", nov, tmp_path=tmp_path) as (u, _):
        h = nbd.NBD()
        h.connect_uri(u)
        h.pwrite(b"x", 0)
        h.shutdown()
    fails("commit", nov, "--into", disk, "--yes", words=("NBD", "use export instead"))


def _set_flags(ov, flags):
    raw = bytearray(ov.read_bytes()[:4096])
    seqs = [struct.unpack_from("<Q", raw, i * 2048 + 16)[0] if raw[i * 2048:i * 2048 + 8] ==
            b"COW-OVL\n" else -1 for i in (0, 1)]
    at = 2048 * seqs.index(max(seqs))
    struct.pack_into("<I", raw, at + 12, flags)
    struct.pack_into("<I", raw, at + 2044, zlib.crc32(bytes(raw[at:at + 2044])))
    with open(ov, "r+b") as f:
        f.write(raw)


def test_an_interrupted_commit_is_finished_by_running_it_again(tmp_path):
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "4K")
    # As a crash in the middle leaves it: flag set, the backing partly written (mtime changed).
    _set_flags(ov, 1)
    with open(disk, "r+b") as f:
        f.write(served[:4096 * 3])
    assert info(ov)["commit_interrupted"]
    r = subprocess.run([PYTHON, "-P", "-m", "cow.server", str(disk), "--overlay", str(ov), "-U",
                        str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "interrupted" in r.stderr and "cow.overlay commit" in r.stderr
    assert "--into BACKING --yes" in r.stderr
    fails("reset", ov, "--yes", words=("interrupted",))
    fails("export", ov, tmp_path / "o.qcow2", words=("interrupted",))
    ok("commit", ov, "--into", disk, "--yes")        # no "backing changed" refusal here
    assert disk.read_bytes() == served and not info(ov)["commit_interrupted"]


@pytest.mark.parametrize("command", ["commit", "reset"])
def test_rerunning_an_interrupted_commit_or_reset_says_it_finishes_one(tmp_path, command):
    """The header as a cut or Ctrl-C in the middle leaves it (flag 1: a commit was under way,
    the backing partly written; flag 2: a reset was): the same command again finishes the work
    and its one line of output says that it finished one that was interrupted; run once more,
    on an overlay nothing interrupted, it does not say so."""
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    original = disk.read_bytes()
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "4K")
    if command == "commit":
        _set_flags(ov, 1)
        with open(disk, "r+b") as f:
            f.write(served[:4096 * 3])
        args = ("commit", ov, "--into", disk, "--yes")
    else:
        _set_flags(ov, 2)
        args = ("reset", ov, "--yes")
    assert info(ov)[f"{command}_interrupted"]
    r = tool(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and f"finished the {command} that was interrupted: " in lines[0], \
        r.stdout
    d = info(ov)
    assert not d[f"{command}_interrupted"] and (d["allocated_blocks"], d["trimmed_blocks"]) == \
        (0, 0)
    assert disk.read_bytes() == (served if command == "commit" else original)
    assert view(disk, ov, tmp_path) == disk.read_bytes()
    again = ok(*args)
    assert "that was interrupted" not in again and len(again.splitlines()) == 1, again


# -- reset ----------------------------------------------------------------------------------

def test_reset_discards_everything(backing_factory, tmp_path):
    disk = backing_factory(2 * MiB)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "64K")
    fails("reset", ov, words=("--yes",))
    assert view(disk, ov, tmp_path) == served
    assert "discarded" in ok("reset", ov, "--yes")
    d = info(ov)
    assert (d["allocated_blocks"], d["trimmed_blocks"]) == (0, 0)
    assert d["file_size"] == d["data_offset"]
    assert view(disk, ov, tmp_path) == disk.read_bytes()


# -- fork -----------------------------------------------------------------------------------

def test_fork_makes_two_views_that_diverge(backing_factory, tmp_path):
    disk = backing_factory(8 * MiB)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "64K")
    new = tmp_path / "experiment.cow"
    out = ok("fork", ov, new)
    assert "sparse copy" in out or "reflink" in out
    assert os.stat(new).st_mode & 0o777 == 0o600
    assert os.stat(new).st_blocks <= os.stat(ov).st_blocks + 8    # sparse, as the original
    assert view(disk, new, tmp_path) == served
    a = changes(disk, ov, tmp_path, "64K", more=[(0, b"only in vm.cow")])
    b = changes(disk, new, tmp_path, "64K", more=[(0, b"only in experiment.cow")])
    assert a[:14] == b"only in vm.cow" and b[:22] == b"only in experiment.cow"
    assert a[22:] == b[22:] == served[22:]
    fails("fork", ov, new, words=("already exists",))
    line = fails("fork", ov, tmp_path / "no-such-dir" / "x.cow",
                 words=(f"{tmp_path}/no-such-dir/x.cow: cannot create it",))
    assert ".new" not in line                       # not the internal temporary name


def test_a_fork_removes_what_a_fork_cut_short_left_and_nothing_else(backing_factory, tmp_path):
    """A fork cut short leaves `.NEW.<hex>.new` beside NEW.  The next fork of that name removes
    those over a minute old that are regular files of this user whose lock nobody holds, and
    never follows a link: not a fresh one (a fork may still be at work), a locked one, a
    symbolic link (nor what it points at), one of another user or another name."""
    disk = backing_factory(2 * MiB)
    ov = tmp_path / "vm.cow"
    served = changes(disk, ov, tmp_path, "64K")
    with PlantedTemporaries(tmp_path, "experiment.cow") as planted:
        assert "forked from" in ok("fork", ov, tmp_path / "experiment.cow")
    planted.check()
    assert view(disk, tmp_path / "experiment.cow", tmp_path) == served


# -- long work: progress, and Ctrl-C --------------------------------------------------------

def _big_overlay(tmp_path, size=2 * 1024 * MiB):
    """A sparse backing and an overlay with every block allocated (as zeroes, punched): a
    commit or export with much to do, made in a moment."""
    from cow.engine import Engine
    disk = tmp_path / "big.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    ov = tmp_path / "big.cow"
    with Engine(str(disk), overlay=str(ov), block_size="1M") as e:
        e.zero(size, 0, may_trim=False)
        e.flush()
    return disk, ov


@pytest.mark.parametrize("command", ["commit", "export"])
def test_ctrl_c_is_one_line_and_says_what_to_run_next(tmp_path, command):
    """SIGINT to the process group (what Ctrl-C sends) in the middle of the work, once -p has
    shown progress: exit 130, one line, no traceback; then the same command finishes."""
    import signal
    disk, ov = _big_overlay(tmp_path)
    out = tmp_path / "changes.qcow2"
    args = ["commit", ov, "--into", disk, "--yes"] if command == "commit" else ["export", ov, out]
    proc = subprocess.Popen([PYTHON, "-P", "-m", "cow.overlay", *map(str, args), "-p"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    first = proc.stderr.readline()      # "    (0.00/100%)"
    second = proc.stderr.readline()     # "    (1.00/100%)": the work is under way
    assert first.strip() == "(0.00/100%)" and second.strip() == "(1.00/100%)", (first, second)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, rest = proc.communicate(timeout=60)
    lines = [line for line in rest.splitlines() if not line.strip().startswith("(")]
    assert proc.returncode == 130, rest
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in rest, rest
    if command == "commit":
        assert info(ov)["commit_interrupted"]
        assert "run the same command again to finish the commit" in lines[0]
    else:
        assert "run the export again" in lines[0] and not out.exists()
    r = tool(*args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""               # not a terminal, no -p: no progress
    if command == "commit":
        assert not info(ov)["commit_interrupted"] and info(ov)["allocated_blocks"] == 0
        assert "finished the commit that was interrupted" in r.stdout, r.stdout


def test_progress_counts_to_100_percent(tmp_path):
    disk, ov = _big_overlay(tmp_path, 64 * MiB)
    r = tool("commit", ov, "--into", disk, "--yes", "-p")
    assert r.returncode == 0, r.stderr
    shown = [line.strip() for line in r.stderr.splitlines()]
    assert shown[0] == "(0.00/100%)" and shown[-1] == "(100.00/100%)", shown
    assert len(shown) == len(set(shown)) <= 101 and "now empty" in r.stdout


def test_export_of_an_overlay_over_a_command_is_one_line(tmp_path):
    """A qcow2 cannot have `nbdkit file base.img` as its backing file: refused, nothing made,
    with the way to a self-contained copy."""
    disk = write_sample(tmp_path / "disk.img", 1 * MiB)
    ov = tmp_path / "cmd.cow"
    with start_server(None, "--overlay", ov, "--", "nbdkit", "file", disk,
                      tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"changed", 4096)
        h.flush()
        h.shutdown()
    out = tmp_path / "o.qcow2"
    fails("export", ov, out, words=("backing is a command", "qemu-img convert"))
    assert not out.exists()
