"""Power cuts under a views folder (issue 21): `cow.server GOLDEN --overlay-dir DIR` with DIR
inside the power-cut file system (tests/support_powercut.py), a client on each of a few named
views writing, trimming, zeroing, with FLUSH and FUA, killed and cut at a random moment: most
cuts frozen at an exact sync or write, some at the rename (or link and unlink) that puts a new
view's file in place (a view made at the cut), the rest after a random delay.  The cut drops
all, none or a random subset of the unsynced sectors.  Now and then a view is removed (rm,
while no client holds it) so that views keep being made, and cut while made, all along the run.

After each cut the server is started again on DIR, and every view a client ever asked for
opens (none is refused), and reads, sector by sector, as the model of
tests/test_overlay_crash.py allows: its value at the last acknowledged FLUSH or FUA, or a value
some operation issued since, never bytes nobody wrote.  A view whose making was cut is absent
(and made again, empty, by the next client) or opens empty; its temporary `.NAME.*.new` may
stay in DIR (counted, and left there).

COW_POWERCUT_ROUNDS / 2 cuts (default 40), COW_POWERCUT_SEED the seed."""

import contextlib
import os
import random
import signal
import threading
import time

import nbd
import pytest

from support_powercut import MODES, PowerCutFS, load_and_cut
from support_server import start_server
from test_overlay_crash import GROUP, MiB, Client, Sector, SECTORS_PER_GROUP, check_and_rebase
from test_powercut import ROUNDS, SEED, make_backing, overlay_info

NAMES = [f"vm-{i}" for i in range(10)]


@pytest.fixture
def fs(tmp_path):
    with PowerCutFS(tmp_path / "real", tmp_path / "mnt", tmp_path / "control") as fs:
        fs.path = tmp_path / "mnt"
        yield fs


class View:
    def __init__(self, rng, size):
        ngroups = size // GROUP
        self.groups = rng.sample(range(ngroups), 12)
        self.untouched = rng.sample(sorted(set(range(ngroups)) - set(self.groups)), 4)
        self.model = {s: Sector({"b"}) for g in self.groups
                      for s in range(g * SECTORS_PER_GROUP, (g + 1) * SECTORS_PER_GROUP)}


def view_uri(proc, name):
    return f"nbd+unix:///{name}?socket={proc.sock_path}"


def open_view(proc, name):
    """Connect to the view name; a refusal fails the test with the server's reason."""
    h = nbd.NBD()
    try:
        h.connect_uri(view_uri(proc, name))
    except nbd.Error as e:
        raise AssertionError(f"the view {name} does not open after the cut: {e}; server log:\n"
                             f"{proc.log_path.read_text()[-2000:]}") from None
    h.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_power_cut_under_views_loses_nothing_flushed(fs, tmp_path):
    rng = random.Random(f"{SEED}-views")
    size = 8 * MiB
    golden = tmp_path / "golden.img"                # outside the mount: never cut
    backing = make_backing(golden, size, rng)
    folder = fs.path / "views"
    folder.mkdir()
    views = {}                                      # name -> View, once a client asked for it
    ids = iter(range(1, 1 << 31))
    counts = {"ops": 0, "lost": 0, "kept": 0, "frozen": 0, "at a name": 0, "made at the cut": 0}
    modes = []
    n = max(8, ROUNDS // 2)
    for round_no in range(1, n + 2):
        block = rng.choice(["4K", "64K"])           # for the views made in this round
        with start_server(golden, "--overlay-dir", folder, "--cow-block-size", block,
                          tmp_path=tmp_path, check_exit=False) as (_, proc):
            what = f"seed {SEED!r}, cut {round_no - 1} ({modes[-1] if modes else '-'})"
            for name, v in views.items():
                open_view(proc, name)
                try:
                    check_and_rebase(view_uri(proc, name), v.groups, v.untouched, v.model,
                                     backing, round_no)
                except AssertionError as e:
                    raise AssertionError(f"{what}, view {name}: {e}") from None
            if round_no == n + 1:
                break
            new = [x for x in NAMES if x not in views]
            chosen = rng.sample(sorted(views), min(len(views), 2))
            if new and (len(chosen) < 2 or rng.random() < 0.5):
                chosen.append(new[0])
            held = [x for x in chosen if x in views]
            if held and rng.random() < 0.25:
                # The operator removes a view no client holds: the next client makes it anew,
                # so that views are made (and cut while made) all along the run.
                gone = rng.choice(held)
                with contextlib.suppress(FileNotFoundError):   # (its making was cut)
                    os.unlink(folder / f"{gone}.cow")
                del views[gone]
                new.append(gone)
            for name in chosen:
                views.setdefault(name, View(rng, size))
            creating = any(name in new for name in chosen)
            r = rng.random()
            armed = None
            if creating and r < 0.3:                # at the rename that puts a new view's file
                armed = ("name", rng.randint(1, 2))  # in place (or its link, then its unlink)
            elif r < 0.6:
                armed = ("sync", rng.randint(1, 12))
            elif r < 0.85:
                armed = (None, rng.randint(1, 600))
            cut = load_and_cut(fs, proc, rng, armed, lambda killed: [
                Client(view_uri(proc, name), views[name].groups, views[name].model, ids,
                       rng.random(), killed) for name in chosen], counts, modes)
            if armed and armed[0] == "name" and cut["frozen"]:
                counts["at a name"] += 1
        for name in chosen:
            if name in new:
                counts["made at the cut"] += not (folder / f"{name}.cow").exists()
                if (folder / f"{name}.cow").exists():
                    # Made at the cut or just before: it opens as an overlay, and whatever it
                    # holds is checked against the model above.
                    overlay_info(folder / f"{name}.cow")
    leftovers = sorted(x for x in os.listdir(folder) if x.endswith(".new"))
    spread = ", ".join(f"{modes.count(m)} {m}" for m in MODES[:3])
    print(f"{n} power cuts under {len(views)} views ({spread}), {counts['frozen']} frozen at an "
          f"exact change, sync or name ({counts['at a name']} at the rename that puts a new "
          f"view's file in place), {counts['made at the cut']} views whose file the cut left "
          f"unmade, {counts['ops']} operations, {counts['lost']} unsynced sectors lost and "
          f"{counts['kept']} kept; temporary files left: {leftovers}")
    assert counts["ops"] > 10 * n, f"only {counts['ops']} operations in {n} rounds"
    assert counts["lost"] > 0, "no cut ever lost a write: the test did not test power cuts"
    assert golden.read_bytes() == backing


@pytest.mark.parametrize("nth", [1, 2])
def test_a_cut_while_a_view_is_put_in_place_leaves_it_served(fs, tmp_path, nth):
    """The cut replayed from the test above (seed "powercut", cut 1), which found it: a view's
    new file was linked into place, then its temporary name unlinked; a cut between the two (a
    kill -9 too) left DIR/NAME.cow with two links, which the server refuses to serve ("a file
    with 2 links"), for good, until someone removes the temporary name by hand.  The file is now
    renamed into place (RENAME_NOREPLACE): one name at any moment.  The cut freezes the first
    (nth=1) or second (nth=2) change of names while the view is made; after it the view is
    served, reads the golden image, and its file, if there, has one link."""
    size = 4 * MiB
    golden = tmp_path / "golden.img"
    backing = make_backing(golden, size, random.Random(nth))
    folder = fs.path / "views"
    folder.mkdir()
    with start_server(golden, "--overlay-dir", folder, tmp_path=tmp_path,
                      check_exit=False) as (_, proc):
        fs.arm(nth, "name")
        connected = []

        def connect():
            h = nbd.NBD()
            with contextlib.suppress(nbd.Error):
                h.connect_uri(view_uri(proc, "ci-1"))
                connected.append(h)

        client = threading.Thread(target=connect, daemon=True)
        client.start()
        deadline = time.monotonic() + 5
        while not fs.stats()["frozen"] and not connected and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        fs.cut("all", stay_off=True)
        proc.wait()
        fs.power_on()
        client.join(30)
    files = sorted(os.listdir(folder))
    if (folder / "ci-1.cow").exists():
        assert os.stat(folder / "ci-1.cow").st_nlink == 1, files
    with start_server(golden, "--overlay-dir", folder, tmp_path=tmp_path) as (_, proc):
        open_view(proc, "ci-1")
        h = nbd.NBD()
        h.connect_uri(view_uri(proc, "ci-1"))
        assert h.pread(size, 0) == backing
        h.shutdown()
    print(f"files after the cut at name change {nth}: {files}")
