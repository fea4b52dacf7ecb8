"""Power cuts during the overlay tools (issue 21): `python -m cow.overlay commit`, `reset` and
`fork` run on an overlay and its backing that both live in the power-cut file system
(tests/support_powercut.py: commit writes the backing), and are killed midway: most cuts frozen
at an exact sync, write or name change (link, unlink) the tool makes, the rest after a random
delay; an armed cut the tool outruns comes after it finished.  The cut then drops all, none or a
random subset of the unsynced sectors.

Each round first serves the overlay (`cow.server BACKING --overlay FILE`), checks that it reads
what the last round left, writes, trims and zeroes some of it and flushes: E, the view, is then
known exactly (read back), as is B, the backing's bytes.  After the cut:

* commit: the overlay opens (`cow.overlay info`) and is in one of three states: untouched (the
  backing is B, not a byte written, the same blocks held), interrupted (info says so, and a
  server and reset refuse the overlay with one line naming the command that finishes it), or
  done (the backing is E, the overlay empty).  Run again, commit finishes: the backing is E,
  the overlay empty, and it serves E.
* reset: the overlay opens, and either says that a reset was interrupted (info says so, a
  server refuses it with one line naming the command that finishes it) or holds every block it
  held and serves E, or holds none and serves B: never some blocks discarded and others not
  with nothing to say so.  Run again, reset leaves an overlay that serves B.
* fork FILE NEW: FILE is untouched (the same blocks held; it serves E at the next round); NEW is
  absent, or a complete copy that serves E.  A temporary `.NEW.*.new` may stay (counted).

COW_POWERCUT_ROUNDS / 2 cuts (default 40: 14 of commit, 13 of reset, 13 of fork),
COW_POWERCUT_SEED the seed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import nbd
import pytest

from support_powercut import PowerCutFS
from support_server import server_command, start_server
from test_powercut import MODES, ROUNDS, SEED, overlay_info

MiB = 1024 * 1024
SIZE = 16 * MiB                  # 4K blocks: a bitmap of two sectors, which a cut may tear


@pytest.fixture
def fs(tmp_path):
    with PowerCutFS(tmp_path / "real", tmp_path / "mnt", tmp_path / "control") as fs:
        fs.path = tmp_path / "mnt"
        yield fs


def tool(*args):
    return subprocess.run([sys.executable, "-P", "-m", "cow.overlay", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def read_view(proc_uri):
    h = nbd.NBD()
    h.connect_uri(proc_uri)
    try:
        return h.pread(SIZE, 0)
    finally:
        h.shutdown()


def held(info):
    return info["allocated_blocks"] + info["trimmed_blocks"]


def change(uri, rng, block):
    """Some writes (partial and whole blocks, FUA now and then), zeroes and trims, then FLUSH;
    returns the view as read back after it."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for _ in range(rng.randint(4, 24)):
            kind = rng.random()
            off = rng.randrange(0, SIZE, 512)
            n = min(SIZE - off, rng.choice([512 * rng.randint(1, 16), block, 2 * block]))
            if kind < 0.7:
                h.pwrite(rng.randbytes(n), off, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
            elif kind < 0.85:
                h.zero(n, off)
            else:
                first = off // block * block
                h.trim(min(SIZE - first, block * rng.randint(1, 3)), first)
        h.flush()
        return h.pread(SIZE, 0)
    finally:
        h.shutdown()


def cut_during(fs, rng, args, arm_choices):
    """Run the tool with args, cut the power midway (or after it finished); returns (its exit
    code or None if killed, whether the cut was frozen at an armed moment, the cut's mode)."""
    armed = None
    if rng.random() < 0.85:
        armed = rng.choice(arm_choices)
        fs.arm(armed[1], armed[0])
    p = subprocess.Popen([sys.executable, "-P", "-m", "cow.overlay", *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + (30 if armed else rng.uniform(0.05, 0.5))
    while time.monotonic() < deadline and p.poll() is None:
        if armed and fs.stats()["frozen"]:
            break
        time.sleep(0.005)
    rc = p.poll()
    if rc is None:
        p.send_signal(signal.SIGKILL)
    mode = rng.choice(MODES)
    r = fs.cut(mode, rng.randrange(1 << 30), stay_off=True)
    p.wait()
    err = p.stderr.read().decode()
    p.stderr.close()
    fs.power_on()
    if rc is not None:
        assert rc == 0, f"{args[0]} failed before any cut: {err}"
    return rc, r["frozen"], mode


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_power_cut_during_commit_reset_and_fork(fs, tmp_path):
    rng = random.Random(f"{SEED}-tools")
    disk = fs.path / "disk.img"
    ov = fs.path / "vm.cow"
    with open(disk, "wb") as f:
        f.write(rng.randbytes(SIZE))
        os.fsync(f.fileno())
    b = disk.read_bytes()                            # the backing's bytes, B
    e = b                                            # the view, E
    block = 65536
    n = max(12, ROUNDS // 2)
    plan = [("commit", "reset", "fork")[i % 3] for i in range(n)]
    rng.shuffle(plan)
    seen = {"commit": {}, "reset": {}, "fork": {}}
    refusals = []
    leftovers = 0
    for i, what in enumerate(plan):
        where = f"seed {SEED!r}, cut {i + 1} ({what})"
        if not ov.exists() or held(overlay_info(ov)) == 0:
            if not ov.exists():
                block = rng.choice([4096, 65536])
            with start_server(disk, "--overlay", ov, "--cow-block-size", block // 1024 * 1024,
                              tmp_path=tmp_path) as (uri, _):
                assert read_view(uri) == e, f"{where}: the overlay does not serve what it held"
                e = change(uri, rng, block)
        before = overlay_info(ov)
        if what == "commit":
            rc, frozen, mode = cut_during(fs, rng, ["commit", ov, "--into", disk, "--yes"],
                                          [("sync", k) for k in range(1, 6)] +
                                          [(None, k) for k in range(1, 30, 3)])
            info = overlay_info(ov)
            now = disk.read_bytes()
            if info["commit_interrupted"]:
                state = "interrupted"
                if len(refusals) < 2:
                    r = subprocess.run(server_command(disk, "-U", tmp_path / "refused.sock",
                                                      "--overlay", ov),
                                       capture_output=True, text=True, timeout=60)
                    assert r.returncode != 0
                    lines = r.stderr.strip().splitlines()
                    assert len(lines) == 1 and "a commit into the backing was interrupted" \
                        in lines[0] and "cow.overlay commit" in lines[0], r.stderr
                    refusals.append(lines[0])
                    r = tool("info", ov)
                    assert r.returncode == 0 and "a commit was interrupted: finish it with" \
                        in r.stdout, r.stdout
                    r = tool("reset", ov, "--yes")
                    assert r.returncode == 1 and "a commit into the backing was interrupted" \
                        in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
            elif held(info) == 0:
                state = "done"
                assert now == e, f"{where}: commit looks done, but the backing is not the view"
            else:
                state = "untouched"
                assert held(info) == held(before), f"{where}: blocks lost, no commit recorded"
                assert now == b, f"{where}: the backing changed, no commit recorded"
            r = tool("commit", ov, "--into", disk, "--yes")
            assert r.returncode == 0, f"{where}: commit again after a cut ({state}): {r.stderr}"
            info = overlay_info(ov)
            assert not info["commit_interrupted"] and held(info) == 0, where
            assert disk.read_bytes() == e, f"{where}: the backing is not the view after commit"
            b = e
        elif what == "reset":
            rc, frozen, mode = cut_during(fs, rng, ["reset", ov, "--yes"],
                                          # the bitmap written, not synced, above all
                                          [("sync", 2)] * 3 + [("sync", 1), ("sync", 3)] +
                                          [(None, k) for k in range(1, 6)])
            info = overlay_info(ov)
            assert not info["commit_interrupted"]
            if info["reset_interrupted"]:
                state = "interrupted"
                r = subprocess.run(server_command(disk, "-U", tmp_path / "refused.sock",
                                                  "--overlay", ov),
                                   capture_output=True, text=True, timeout=60)
                lines = r.stderr.strip().splitlines()
                assert r.returncode != 0 and len(lines) == 1 and \
                    "a reset was interrupted" in lines[0], r.stderr
            else:
                with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
                    view = read_view(uri)
                if held(info) == 0:
                    state = "done"
                    assert view == b, f"{where}: an empty overlay that does not serve the backing"
                else:
                    state = "untouched"
                    assert held(info) == held(before), (
                        f"{where}: {held(info)} of {held(before)} blocks held after a cut during "
                        f"reset, and nothing says a reset was interrupted")
                    assert view == e, f"{where}: the overlay does not serve what it held"
            r = tool("reset", ov, "--yes")
            assert r.returncode == 0, f"{where}: reset again after a cut ({state}): {r.stderr}"
            assert held(overlay_info(ov)) == 0
            e = b
            if rng.random() < 0.4:
                os.unlink(ov)                       # made again, in a block size drawn anew
        else:
            new = fs.path / f"fork{i}.cow"
            rc, frozen, mode = cut_during(fs, rng, ["fork", ov, new],
                                          [("sync", 1), ("name", 1), ("name", 2)] +
                                          [(None, k) for k in range(1, 40, 4)])
            info = overlay_info(ov)
            assert held(info) == held(before) and info["file_size"] == before["file_size"], (
                f"{where}: the source changed")
            leftovers += sum(1 for x in os.listdir(fs.path) if x.startswith(f".fork{i}.cow."))
            if new.exists():
                state = "made"
                assert held(overlay_info(new)) == held(before), where
                with start_server(disk, "--overlay", new, "-r", tmp_path=tmp_path) as (uri, _):
                    assert read_view(uri) == e, f"{where}: the fork does not serve the view"
                os.unlink(new)
            else:
                state = "absent"
                assert rc is None, f"{where}: fork said it was done, and NEW is not there"
        key = f"{state}{' (finished before the cut)' if rc is not None else ''}"
        seen[what][key] = seen[what].get(key, 0) + 1
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        assert read_view(uri) == e
    print(f"{n} power cuts during the tools: {json.dumps(seen)}; {leftovers} temporary files "
          f"left by fork; refusals of an interrupted commit: {refusals[:1]}")
    assert seen["commit"].get("interrupted"), "no cut ever interrupted a commit"


def test_a_cut_during_reset_never_leaves_a_mix_that_nothing_reports(fs, tmp_path):
    """Replayed from the test above (COW_POWERCUT_ROUNDS=200, seed long1, which found it): reset
    zeroes the bitmap, syncs, then writes the header.  A bitmap of more than one sector, and a cut
    before that sync that keeps some of its sectors zeroed and not the others, left an overlay
    with some blocks discarded and the others not: neither the old disk nor the backing, and
    nothing said so (an ordinary overlay, fewer blocks held).  A reset now marks the header first
    (as commit does): after any cut the overlay holds every block it held, or none, or says that
    a reset was interrupted (info; a server refuses it, one line); reset again finishes it."""
    rng = random.Random("reset-mix")
    size = 16 * MiB                     # 4K blocks: a bitmap of two sectors
    disk = tmp_path / "disk.img"
    disk.write_bytes(rng.randbytes(size))
    made = tmp_path / "made.cow"
    with start_server(disk, "--overlay", made, "--cow-block-size", "4K",
                      tmp_path=tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        for base in (0, 12 * MiB):      # blocks in both halves of the bitmap
            for i in range(8):
                h.pwrite(rng.randbytes(4096), base + i * 64 * 1024)
        h.flush()
        h.shutdown()
    before = held(overlay_info(made))
    template = made.read_bytes()
    ov = fs.path / "vm.cow"
    outcomes = []
    for n in (1, 2, 3):
        for seed in range(4):
            with open(ov, "wb") as f:
                f.write(template)
                os.fsync(f.fileno())
            fs.arm(n, "sync")
            p = subprocess.Popen([sys.executable, "-P", "-m", "cow.overlay", "reset", str(ov),
                                  "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while not fs.stats()["frozen"] and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            p.kill()
            fs.cut("subset", seed, stay_off=True)
            p.wait()
            fs.power_on()
            info = overlay_info(ov)
            now = held(info)
            if info.get("reset_interrupted"):
                outcomes.append("interrupted")
                r = subprocess.run(server_command(disk, "-U", tmp_path / "r.sock", "--overlay",
                                                  ov), capture_output=True, text=True, timeout=60)
                lines = r.stderr.strip().splitlines()
                assert r.returncode != 0 and len(lines) == 1 and \
                    "a reset was interrupted" in lines[0], r.stderr
            else:
                assert now in (0, before), (
                    f"sync {n}, seed {seed}: a cut during reset left {now} of the {before} blocks "
                    f"held, and nothing says a reset was interrupted")
                outcomes.append("done" if now == 0 else "untouched")
            r = tool("reset", ov, "--yes")
            assert r.returncode == 0, r.stderr
            info = overlay_info(ov)
            assert held(info) == 0 and not info.get("reset_interrupted")
            os.unlink(ov)
    print(f"cuts during reset: {outcomes}")


def test_a_fork_cut_short_leaves_a_temporary_that_a_later_fork_removes(fs, tmp_path):
    """A cut while fork copies (frozen at the sync of its copy) leaves NEW absent and its
    temporary `.NEW.<hex>.new` beside it, as large as the data copied.  A fork of that name
    right after leaves it (it may be a fork still at work); once it is over a minute old, the
    next fork of that name removes it, and makes NEW, which serves the view."""
    import re
    from cow import overlayfile
    rng = random.Random(f"{SEED}-fork-leftover")
    disk = tmp_path / "disk.img"                    # outside the mount: never cut
    disk.write_bytes(rng.randbytes(SIZE))
    ov = fs.path / "vm.cow"
    new = fs.path / "experiment.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        e = change(uri, rng, 65536)
    ours = re.compile(r"\.experiment\.cow\.[0-9a-f]{12}\.new")

    def temporaries():
        return sorted(x for x in os.listdir(fs.path) if x.startswith(".experiment.cow."))

    fs.arm(1, "sync")
    p = subprocess.Popen([sys.executable, "-P", "-m", "cow.overlay", "fork", ov, new],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not fs.stats()["frozen"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fs.stats()["frozen"], "fork never synced its copy"
    p.send_signal(signal.SIGKILL)
    fs.cut("none", stay_off=True)
    p.wait()
    fs.power_on()
    left = temporaries()
    assert not new.exists() and len(left) == 1 and ours.fullmatch(left[0]), left
    stale = fs.path / left[0]
    assert stale.stat().st_size > 0

    r = tool("fork", ov, new)                       # fresh: it could be a fork at work
    assert r.returncode == 0, r.stderr
    assert temporaries() == left
    os.unlink(new)
    old = time.time() - 2 * overlayfile.STALE_TEMPORARY_S
    os.utime(stale, (old, old))
    r = tool("fork", ov, new)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert temporaries() == [] and new.exists()
    with start_server(disk, "--overlay", new, "-r", tmp_path=tmp_path) as (uri, _):
        assert read_view(uri) == e
