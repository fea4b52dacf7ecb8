"""cow.views in one process: names, a view per name over one shared backing, the lifecycle (open
on first use, flushed and closed after the last client), the race of a client arriving while the
last one leaves, the cap, read-only sets, temporary views, and what an idle view costs."""

import gc
import os
import threading
import time

import pytest

from cow import overlayfile
from cow.backing import Backing
from cow.views import (
    BAD_NAME,
    LIMIT,
    MAX_NAME,
    NO_SUCH_VIEW,
    UNAVAILABLE,
    ViewError,
    ViewSet,
    name_problem,
)
from support_temporaries import PlantedTemporaries

MiB = 1024 * 1024

GOOD_NAMES = ["a", "ci-42", "CI_42.branch-x", "0", "x" * MAX_NAME, "a..b", "v.cow"]
BAD_NAMES = ["", "../x", "/etc/passwd", "a/b", ".hidden", "..", ".", "-rf", "_x", "a b", "a\0b",
             "é", "x" * (MAX_NAME + 1), "a\\b", "a:b", "a\nb", "\udcff"]


@pytest.fixture
def backing(backing_factory):
    b = Backing(str(backing_factory(4 * MiB)))
    yield b
    b.close()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "views"
    d.mkdir()
    return d


def fds():
    # A ViewSet holds its folder's descriptor until it is collected: collect the earlier tests'
    # (some kept alive by reference cycles) before counting.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def kind_of(fn):
    with pytest.raises(ViewError) as e:
        fn()
    return e.value.kind


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_create_nothing(backing, folder, name):
    assert name_problem(name)
    views = ViewSet(backing, directory=str(folder), default="dflt")
    if name == "":         # the default view
        assert views.resolve("") == "dflt"
        return
    assert kind_of(lambda: views.acquire(name)) == BAD_NAME
    assert kind_of(lambda: views.probe(name)) == BAD_NAME
    assert list(folder.iterdir()) == [] and list(folder.parent.glob("*.cow")) == []


def test_the_empty_name_without_a_default_is_no_view(backing, folder):
    views = ViewSet(backing, directory=str(folder))
    assert kind_of(lambda: views.acquire("")) == NO_SUCH_VIEW
    assert list(folder.iterdir()) == []


def test_views_are_isolated_and_shared_by_name(backing, folder):
    views = ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 4096})
    base = bytearray(4096)
    backing.pread(base, 0)
    a1 = views.acquire("a")
    a2 = views.acquire("a")
    b = views.acquire("b")
    assert a1 is a2 and a1.clients == 2 and a1.engine is not b.engine
    a1.engine.pwrite(b"A" * 4096, 0)
    got = bytearray(4096)
    a2.engine.pread(got, 0)
    assert got == b"A" * 4096
    b.engine.pread(got, 0)
    assert got == base
    views.release(a1)
    assert a2.engine is not None            # one client left: still open, still locked
    with pytest.raises(overlayfile.OverlayBusy):
        overlayfile.open_locked(str(folder / "a.cow"), exclusive=True)
    views.release(a2)
    views.release(b)
    assert views.open_views() == []
    fd, h = overlayfile.open_locked(str(folder / "a.cow"), exclusive=True)   # closed, unlocked
    os.close(fd)
    assert h.block_size == 4096
    a = views.acquire("a")                  # reopened with its changes
    a.engine.pread(got, 0)
    assert got == b"A" * 4096
    views.release(a)


def test_an_existing_view_keeps_its_block_size(backing, folder):
    ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 4096})
    views = ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 4096})
    views.release(views.acquire("small"))
    views = ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 65536})
    v = views.acquire("small")
    assert v.engine.block_size == 4096
    assert views.probe("small").block_size == 4096 and views.probe("new").block_size == 65536
    views.release(v)
    v = views.acquire("new")
    assert v.engine.block_size == 65536
    views.release(v)


def test_probe_looks_without_creating(backing, folder):
    views = ViewSet(backing, directory=str(folder))
    info = views.probe("fresh")
    assert not info.exists and "new view" in info.description
    assert list(folder.iterdir()) == []
    views.release(views.acquire("fresh"))
    assert views.probe("fresh").exists


def test_idle_views_hold_no_file_and_no_engine(backing, folder):
    views = ViewSet(backing, directory=str(folder))
    before = fds()
    held = [views.acquire(f"v{i}") for i in range(50)]
    assert fds() >= before + 50            # an overlay each (and the backing's lock)
    for v in held:
        views.release(v)
    assert fds() == before
    assert views.open_views() == [] and all(v.engine is None for v in held)
    for round_ in range(3):                 # open and close them again: nothing accumulates
        for i in range(50):
            views.release(views.acquire(f"v{i}"))
        assert fds() == before
    assert views.count() == 50


def test_a_client_arriving_while_the_last_one_leaves(backing, folder):
    """Many threads acquire and release one name at once, each writing its own sector: every
    acquire gets a working view (never one being closed, never OverlayBusy from the file's lock
    taken twice), and every write survives."""
    views = ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 4096})
    errors = []
    rounds = 60

    def worker(k):
        try:
            for i in range(rounds):
                v = views.acquire("hot")
                v.engine.pwrite(bytes([k + 1]) * 512, k * 4096 + (i % 8) * 512)
                views.release(v)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert views.open_views() == []
    v = views.acquire("hot")
    for k in range(8):
        got = bytearray(4096)
        v.engine.pread(got, k * 4096)
        assert got == bytes([k + 1]) * 4096
    views.release(v)


def test_the_cap_refuses_new_names_only(backing, folder):
    views = ViewSet(backing, directory=str(folder), max_views=3)
    for n in ("a", "b", "c"):
        views.release(views.acquire(n))
    assert kind_of(lambda: views.acquire("d")) == LIMIT
    assert kind_of(lambda: views.probe("d")) == LIMIT
    assert not (folder / "d.cow").exists()
    views.release(views.acquire("a"))       # an existing view is always served
    (folder / "b.cow").unlink()             # removed behind the server's back: room again
    views.release(views.acquire("d"))
    assert kind_of(lambda: views.acquire("e")) == LIMIT
    # Other files in the folder are not views and do not count.
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.cow").write_text("x")
    assert views.count() == 3


def test_the_cap_holds_when_new_names_race(backing, folder):
    views = ViewSet(backing, directory=str(folder), max_views=5)
    got, refused = [], []

    def one(i):
        try:
            got.append(views.acquire(f"n{i}"))
        except ViewError as e:
            refused.append(e.kind)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 5 and refused == [LIMIT] * 15
    assert len(list(folder.glob("*.cow"))) == 5
    for v in got:
        views.release(v)


def test_read_only_serves_existing_views_and_creates_none(backing, folder):
    rw = ViewSet(backing, directory=str(folder))
    v = rw.acquire("old")
    v.engine.pwrite(b"x" * 512, 0)
    rw.release(v)
    ro = ViewSet(backing, directory=str(folder), readonly=True)
    assert kind_of(lambda: ro.acquire("new")) == NO_SUCH_VIEW
    assert kind_of(lambda: ro.probe("new")) == NO_SUCH_VIEW
    assert sorted(p.name for p in folder.iterdir()) == ["old.cow"]
    v1, v2 = ro.acquire("old"), ro.acquire("old")
    assert v1 is v2 and v1.engine.readonly
    with pytest.raises(OSError):
        v1.engine.pwrite(b"y" * 512, 0)
    fd, _ = overlayfile.open_locked(str(folder / "old.cow"), exclusive=False)  # info works
    os.close(fd)
    ro.release(v1)
    ro.release(v2)


def test_a_view_a_tool_holds_is_unavailable(backing, folder):
    views = ViewSet(backing, directory=str(folder))
    views.release(views.acquire("busy"))
    fd, _ = overlayfile.open_locked(str(folder / "busy.cow"), exclusive=True)   # a commit, say
    try:
        with pytest.raises(ViewError) as e:
            views.acquire("busy")
        assert e.value.kind == UNAVAILABLE and "in use" in str(e.value)
        assert str(folder) not in str(e.value)      # the client is not told the server's paths
    finally:
        os.close(fd)
    views.release(views.acquire("busy"))


def test_a_file_that_is_no_overlay_is_unavailable_and_left_alone(backing, folder):
    (folder / "junk.cow").write_bytes(b"not an overlay" * 1000)
    (folder / "dangling.cow").symlink_to(folder / "nowhere")
    views = ViewSet(backing, directory=str(folder))
    assert kind_of(lambda: views.acquire("junk")) == UNAVAILABLE
    assert kind_of(lambda: views.acquire("dangling")) == UNAVAILABLE
    assert (folder / "junk.cow").read_bytes() == b"not an overlay" * 1000
    assert not (folder / "nowhere").exists()


@pytest.mark.parametrize("mode", ["keep", "discard"])
def test_temporary_views(backing, tmp_path, mode):
    views = ViewSet(backing, temporary=mode, engine_kwargs={"tmpdir": str(tmp_path)})
    before = fds()
    v = views.acquire("t")
    v.engine.pwrite(b"T" * 512, 0)
    views.release(v)
    v = views.acquire("t")
    got = bytearray(512)
    v.engine.pread(got, 0)
    assert (got == b"T" * 512) == (mode == "keep")
    views.release(v)
    assert [n for n, _ in views.listing()] == (["t"] if mode == "keep" else [])
    assert list(tmp_path.glob("cow-overlay-*")) == []       # unnamed files
    views.close_all()
    assert fds() == before


def test_close_all_flushes_every_open_view_and_opens_no_more(backing, folder):
    views = ViewSet(backing, directory=str(folder))
    v = views.acquire("a")
    v.engine.pwrite(b"Z" * 512, 0)          # no flush: close_all saves it
    assert views.close_all() == []
    assert kind_of(lambda: views.acquire("a")) == UNAVAILABLE
    views.release(v)                        # a late connection: nothing happens
    again = ViewSet(backing, directory=str(folder))
    v = again.acquire("a")
    got = bytearray(512)
    v.engine.pread(got, 0)
    assert got == b"Z" * 512
    again.release(v)


def test_listing_describes_open_and_idle_views(backing, folder):
    views = ViewSet(backing, directory=str(folder), engine_kwargs={"block_size": 4096})
    v = views.acquire("idle")
    v.engine.pwrite(b"q" * 8192, 0)
    views.release(v)
    held = views.acquire("held")
    held.engine.pwrite(b"q" * 4096, 0)
    listing = dict(views.listing())
    assert list(listing) == ["held", "idle"]
    assert listing["held"] == "view, 1 client, 4.0 KiB changed"
    assert listing["idle"] == "view, idle, 8.0 KiB changed"
    views.release(held)
    restarted = dict(ViewSet(backing, directory=str(folder)).listing())
    assert restarted["idle"].startswith("view, idle, ") and "on disk" in restarted["idle"]


def test_remove_unchanged_removes_only_what_it_made_and_nobody_wrote(backing, folder):
    views = ViewSet(backing, directory=str(folder), remove_unchanged=True)
    views.release(views.acquire("peek"))
    assert not (folder / "peek.cow").exists()
    v = views.acquire("kept")
    v.engine.pwrite(b"k" * 512, 0)
    views.release(v)
    views.release(views.acquire("kept"))   # existed before this open: kept even unchanged now
    assert (folder / "kept.cow").exists()


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def test_an_open_view_costs_its_bitmap_and_a_few_kib(tmp_path):
    """Held views cost their bitmap and a few KiB each (the engine's block of zeroes is the
    kernel's zero page, not a block of memory per view)."""
    sparse = tmp_path / "golden.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)                 # 16384 blocks of 64 KiB: a 4 KiB bitmap
    (tmp_path / "views").mkdir()
    b = Backing(str(sparse))
    try:
        views = ViewSet(b, directory=str(tmp_path / "views"))
        warm = [views.acquire(f"w{i}") for i in range(20)]
        for v in warm:
            v.engine.pwrite(b"w" * 4096, 0)
        before = rss_kib()
        held = []
        for i in range(200):
            v = views.acquire(f"v{i}")
            v.engine.pwrite(b"v" * 4096, (i * 997 % 16384) * 65536)
            v.engine.zero(4096, 8192)       # a partial block of zeroes: reads the zero block
            held.append(v)
        per_view = (rss_kib() - before) / 200
        assert per_view < 4 + 12, per_view
        for v in warm + held:
            views.release(v)
    finally:
        b.close()


def test_a_creation_cut_short_leaves_a_temporary_that_the_next_creation_removes(backing, folder):
    # A crash or a power cut between making a view's file and linking it into place leaves
    # `.NAME.cow.<hex>.new` (no `.cow` name points at it).  The next creation of that name
    # removes those that are old and unlocked, and nothing else.
    with PlantedTemporaries(folder, "a.cow") as planted:
        views = ViewSet(backing, directory=str(folder))
        views.release(views.acquire("a"))
    planted.check()
    assert (folder / "a.cow").is_file()
