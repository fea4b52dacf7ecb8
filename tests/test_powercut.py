"""Power cuts, not only kill -9 (issue 21): `cow.server --overlay FILE` with FILE inside the
power-cut file system (tests/support_powercut.py), under load from several libnbd clients
(aligned and partial writes, trims, zeroes, FUA, FLUSH), killed at a random moment; then the
cut drops the unsynced writes: all of them, none, or a random subset of sectors (chosen at
random each time).  Restarted on the same FILE, every sector is checked against the model of
tests/test_overlay_crash.py: a sector reads its value at the last acknowledged FLUSH or FUA,
or a value some operation issued since put there, never bytes nobody wrote there; and
`cow.overlay info --json` counts as many blocks held by the overlay as the server reports at
depth 1 of qemu:allocation-depth.

Most cuts come at an exact moment: the file system freezes the n-th write or sync (n random),
the server is killed while it waits, and the cut loses that one and whatever else was not
synced; the rest come at a random time.  Now and then the overlay is made anew, since a cut
matters most while blocks are first written and their bits change.

COW_POWERCUT_ROUNDS sets the number of cuts per block size (default 80: 160 cuts under load,
and 20 while the overlay is made; about 2 minutes on 2 cores), COW_POWERCUT_SEED the seed (a
failure names the seed, block size and cut, and the same seed replays it)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import nbd
import pytest

import support_powercut
from support_powercut import MODES, PowerCutFS, _punch
from support_server import server_command, start_server
from test_overlay_crash import GROUP, MiB, KiB, Client, Sector, SECTORS_PER_GROUP, \
    check_and_rebase

ROUNDS = int(os.environ.get("COW_POWERCUT_ROUNDS", "80"))
SEED = os.environ.get("COW_POWERCUT_SEED", "powercut")


@pytest.fixture
def fs(tmp_path):
    with PowerCutFS(tmp_path / "real", tmp_path / "mnt", tmp_path / "control") as fs:
        fs.path = tmp_path / "mnt"
        yield fs


def make_backing(path, size, rng):
    """Data everywhere but a few holes: a block whose bit survived a cut but whose data did
    not reads zeroes, which must not pass for the backing's bytes."""
    data = bytearray(rng.randbytes(size))
    for off in range(0, size, 16 * MiB):
        data[off:off + 256 * KiB] = bytes(256 * KiB)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        for off in range(0, size, 16 * MiB):
            _punch(f.fileno(), off, 256 * KiB)
    return bytes(data)


def overlay_info(ov):
    r = subprocess.run([sys.executable, "-P", "-m", "cow.overlay", "info", "--json", str(ov)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"cow.overlay info refused the overlay after a cut: {r.stderr}"
    return json.loads(r.stdout)


def blocks_at_depth_1(uri, size, block_size):
    """Blocks the server says the overlay holds (qemu:allocation-depth 1): allocated or
    trimmed."""
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    try:
        held = 0
        offset = 0
        while offset < size:
            runs = []

            def extent(metacontext, off, entries, err):
                if metacontext == "qemu:allocation-depth":
                    runs.extend(zip(entries[0::2], entries[1::2]))
                return 0

            h.block_status(min(size - offset, 1 << 30), offset, extent)
            assert runs, "no extents"
            for length, depth in runs:
                if depth == 1:
                    assert offset % block_size == 0 and length % block_size == 0
                    held += length // block_size
                offset += length
        return held
    finally:
        h.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("block_size", ["4K", "64K"])
def test_power_cut_under_load_loses_nothing_flushed(fs, tmp_path, block_size):
    rng = random.Random(f"{SEED}-{block_size}")
    size = 64 * MiB
    blksize = {"4K": 4096, "64K": 65536}[block_size]
    disk = tmp_path / "disk.img"                    # outside the mount: never cut
    backing = make_backing(disk, size, rng)
    ov = fs.path / "vm.cow"
    nthreads = 3
    all_groups = rng.sample(range(size // GROUP), 96)
    owned = [all_groups[k::nthreads] for k in range(nthreads)]
    untouched = rng.sample(sorted(set(range(size // GROUP)) - set(all_groups)), 16)
    model = {}
    for g in all_groups:
        for s in range(g * SECTORS_PER_GROUP, (g + 1) * SECTORS_PER_GROUP):
            model[s] = Sector({"b"})
    ids = iter(range(1, 1 << 31))
    counts = {"ops": 0, "lost": 0, "kept": 0, "frozen": 0}
    modes = []
    info = None

    def load_and_cut(uri, proc):
        armed = None
        if rng.random() < 0.8:                      # the cut at an exact change or sync,
            if rng.random() < 0.7:                  # at a sync above all: the moments where
                armed = ("sync", rng.randint(1, 20))    # order matters
            else:
                armed = (None, rng.randint(1, 1500))
        # (else at a random moment)
        support_powercut.load_and_cut(
            fs, proc, rng, armed, lambda killed: [
                Client(uri, owned[k], model, ids, rng.random(), killed) for k in range(nthreads)],
            counts, modes)

    for round_no in range(1, ROUNDS + 2):
        with start_server(disk, "--overlay", ov, "--cow-block-size", block_size,
                          tmp_path=tmp_path, check_exit=False) as (uri, proc):
            if round_no > 1:
                what = f"seed {SEED!r}, block size {block_size}, cut {round_no - 1} ({modes[-1]})"
                try:
                    check_and_rebase(uri, all_groups, untouched, model, backing, round_no)
                except AssertionError as e:
                    raise AssertionError(f"{what}: {e}") from None
                held = blocks_at_depth_1(uri, size, blksize)
                assert held == info["allocated_blocks"] + info["trimmed_blocks"], (
                    f"{what}: cow.overlay info counts {info['allocated_blocks']} allocated and "
                    f"{info['trimmed_blocks']} trimmed blocks; the server holds {held}")
            if round_no == ROUNDS + 1:
                break
            fresh = round_no > 1 and rng.random() < 0.2
            if not fresh:
                load_and_cut(uri, proc)
        if fresh:
            # A new overlay now and then: a cut matters most while blocks are first written
            # (their bits change), and a few rounds of load leave every block allocated.
            os.unlink(ov)
            for sec in model.values():
                sec.stable, sec.later = {"b"}, []
            with start_server(disk, "--overlay", ov, "--cow-block-size", block_size,
                              tmp_path=tmp_path, check_exit=False) as (uri, proc):
                load_and_cut(uri, proc)
        info = overlay_info(ov)
    ops, lost, kept, frozen = (counts[k] for k in ("ops", "lost", "kept", "frozen"))
    print(f"{ROUNDS} power cuts ({', '.join(f'{modes.count(m)} {m}' for m in MODES[:3])}), "
          f"{frozen} of them at an exact change or sync, {ops} operations, {lost} unsynced sectors "
          f"lost and {kept} kept by the cuts")
    assert ops > 20 * ROUNDS, f"only {ops} operations in {ROUNDS} rounds"
    assert lost > 0, "no cut ever lost a write: the test did not test power cuts"
    assert disk.read_bytes() == backing


@pytest.mark.slow
def test_power_cut_while_the_overlay_is_made(fs, tmp_path):
    """Cut while `--overlay FILE` creates FILE (half of the cuts frozen at the sync of its
    header): FILE is linked into place only after its header and bitmap are synced, so after any
    cut it is either absent (and made again by the next start; a cut between the temporary
    file's creation and the link leaves that file, .FILE.*.new, behind) or opens as an empty
    overlay; never a file that opens with wrong data."""
    rng = random.Random(f"{SEED}-create")
    size = 8 * MiB
    disk = tmp_path / "disk.img"
    backing = make_backing(disk, size, rng)
    outcomes = {"absent": 0, "empty": 0}
    n = max(8, ROUNDS // 4)
    for i in range(n):
        ov = fs.path / f"v{i}.cow"
        sock = tmp_path / f"create{i}.sock"
        armed = i % 2 == 0
        if armed:                       # at the header's sync
            fs.arm(1, "sync")
        with open(tmp_path / f"create{i}.log", "wb") as log:
            proc = subprocess.Popen(server_command(disk, "-U", sock, "--overlay", ov),
                                    stdout=log, stderr=subprocess.STDOUT)
        if armed:
            deadline = time.monotonic() + 10
            while not fs.stats()["frozen"] and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        fs.cut(rng.choice(MODES), rng.randrange(1 << 30), stay_off=True)
        proc.wait()
        fs.power_on()
        if not ov.exists():
            outcomes["absent"] += 1
        else:
            info = overlay_info(ov)
            assert info["allocated_blocks"] == info["trimmed_blocks"] == 0
            outcomes["empty"] += 1
        with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
            h = nbd.NBD()
            h.connect_uri(uri)
            assert h.pread(size, 0) == backing
            h.shutdown()
    leftovers = [name for name in os.listdir(fs.path) if name.endswith(".new")]
    print(f"{n} cuts while the overlay was made: {outcomes}; "
          f"{len(leftovers)} temporary files left behind")
