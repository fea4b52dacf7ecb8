"""Crash safety of --overlay FILE: clients write, trim, zero and flush under load, the server is
killed with SIGKILL at a random moment, restarted on the same FILE, and every sector is checked
against a model.  Repeated many times within a bounded time.

The model works per 512-byte sector.  Every write puts a tag in each sector it covers (the
write's id and the sector's number, then filler made from both), so a sector read back says
which write it came from, or that it is zeroes, or the backing's bytes.  Each client thread owns
its own 64 KiB groups (no two threads touch a sector), so per sector the operations are in
program order.  A sector may read:

* its value at the thread's last acknowledged FLUSH (or at the FUA write that covered it last):
  that FLUSH promised it;
* or the value of any operation issued after that point, the one in flight at the kill
  included (unflushed writes may or may not have landed);
* never anything else: not a tag of another sector, not another write's tag, not zeroes or the
  backing's bytes unless an allowed operation put them there.

After a restart the sectors read become the new baseline (a SIGKILL loses no page cache, and the
restarted server writes nothing until asked)."""

import random
import signal
import struct
import threading
import time

import nbd
import pytest

from support_server import start_server

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
GROUP = 64 * KiB                 # ownership unit: a thread's operations stay inside its groups
SECTORS_PER_GROUP = GROUP // SECTOR
MAGIC = 0xC0C0_5EC7_0000_0000


def tagged(write_id, first_sector, nsectors):
    out = bytearray()
    for s in range(first_sector, first_sector + nsectors):
        head = struct.pack("<QQ", MAGIC | write_id, s)
        out += head + bytes([(write_id * 7 + s) & 0xFF]) * (SECTOR - len(head))
    return bytes(out)


def decode(sector_no, data, backing_sector):
    """What a sector read back may be: a set of keys, "z" for zeroes, "b" for the backing's
    bytes, or a write id."""
    keys = set()
    if data == backing_sector:
        keys.add("b")
    if data.count(0) == SECTOR:
        keys.add("z")
    magic_id, s = struct.unpack_from("<QQ", data)
    if magic_id & 0xFFFF_FFFF_0000_0000 == MAGIC and s == sector_no:
        wid = magic_id & 0xFFFF_FFFF
        if data == tagged(wid, s, 1):
            keys.add(wid)
    return keys


class Sector:
    __slots__ = ("stable", "later")

    def __init__(self, stable):
        self.stable = stable        # keys the sector held at its last promised point
        self.later = []             # keys of operations issued since


class Client(threading.Thread):
    """One connection doing random operations on its own groups until the server dies.  An
    error is expected only once `killed` is set (just before the SIGKILL): one before it is the
    server failing under load, and fails the test."""

    def __init__(self, uri, groups, model, ids, seed, killed):
        super().__init__(daemon=True)
        self.uri, self.groups, self.model, self.ids = uri, groups, model, ids
        self.rng = random.Random(seed)
        self.killed = killed
        self.ops = 0
        self.ready = threading.Event()  # set once an operation was acknowledged, or at the end
        self.unexpected = None

    def issue(self, first, n, key):
        for s in range(first, first + n):
            self.model[s].later.append(key)

    def promise(self, sectors):
        for s in sectors:
            sec = self.model[s]
            if sec.later:
                sec.stable = {sec.later[-1]}
                sec.later = []

    def run(self):
        rng = self.rng
        touched = set()
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
        except nbd.Error as e:
            if not self.killed.is_set():
                self.unexpected = f"connecting before the kill: {e}"
            self.ready.set()
            return
        try:
            while True:
                g = rng.choice(self.groups)
                first = g * SECTORS_PER_GROUP + rng.randrange(SECTORS_PER_GROUP)
                n = rng.randint(1, g * SECTORS_PER_GROUP + SECTORS_PER_GROUP - first)
                if rng.random() < 0.3:                  # whole groups (whole blocks) too
                    first, n = g * SECTORS_PER_GROUP, SECTORS_PER_GROUP
                kind = rng.random()
                if kind < 0.15:
                    h.flush()
                    self.promise(touched)
                    touched = set()
                elif kind < 0.25:
                    self.issue(first, n, "z")
                    touched.update(range(first, first + n))
                    if rng.random() < 0.5:
                        h.trim(n * SECTOR, first * SECTOR)
                    else:
                        h.zero(n * SECTOR, first * SECTOR,
                               0 if rng.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE)
                else:
                    wid = next(self.ids)
                    fua = kind > 0.95
                    self.issue(first, n, wid)
                    touched.update(range(first, first + n))
                    h.pwrite(tagged(wid, first, n), first * SECTOR,
                             nbd.CMD_FLAG_FUA if fua else 0)
                    if fua:
                        self.promise(range(first, first + n))
                        touched.difference_update(range(first, first + n))
                self.ops += 1
                self.ready.set()
        except nbd.Error as e:
            if not self.killed.is_set():    # the server failed while it was still up
                self.unexpected = f"before the kill, operation {self.ops + 1}: {e}"
        except Exception as e:          # noqa: BLE001 - reported by the test
            self.unexpected = e
        finally:
            self.ready.set()


def read_sectors(uri, groups):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return {g: h.pread(GROUP, g * GROUP) for g in groups}
    finally:
        h.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("block_size, budget", [("4K", 24.0), ("64K", 12.0)])
def test_kill_9_under_load_loses_nothing_flushed(tmp_path, block_size, budget):
    rng = random.Random(f"crash-{block_size}")
    size = 160 * MiB                    # 40960 blocks of 4 KiB: three bitmap pages
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 3 * MiB):         # some data in the backing, some holes
            f.seek(off)
            f.write(rng.randbytes(256 * KiB))
    backing = disk.read_bytes()
    ov = tmp_path / "vm.cow"
    nthreads = 3
    all_groups = rng.sample(range(size // GROUP), 240)
    owned = [all_groups[k::nthreads] for k in range(nthreads)]
    untouched = rng.sample(sorted(set(range(size // GROUP)) - set(all_groups)), 40)
    model = {}
    for g in all_groups:
        for s in range(g * SECTORS_PER_GROUP, (g + 1) * SECTORS_PER_GROUP):
            model[s] = Sector({"b"})
    ids = iter(range(1, 1 << 31))
    deadline = time.monotonic() + budget
    rounds = ops = 0
    while rounds < 4 or (time.monotonic() < deadline and rounds < 40):
        rounds += 1
        with start_server(disk, "--overlay", ov, "--cow-block-size", block_size,
                          tmp_path=tmp_path, check_exit=False) as (uri, proc):
            if rounds > 1:
                check_and_rebase(uri, all_groups, untouched, model, backing, rounds)
            killed = threading.Event()
            clients = [Client(uri, owned[k], model, ids, rng.random(), killed)
                       for k in range(nthreads)]
            for c in clients:
                c.start()
            for c in clients:           # every client is under way: the kill lands under load
                assert c.ready.wait(60), "a client got no reply in 60 s"
                assert c.unexpected is None, c.unexpected
            time.sleep(rng.uniform(0, 0.5))     # a random moment (not a sequencing)
            killed.set()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for c in clients:
                c.join(30)
                assert not c.is_alive(), "a client hung after the kill"
                assert c.unexpected is None, repr(c.unexpected)
                ops += c.ops
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        check_and_rebase(uri, all_groups, untouched, model, backing, rounds + 1)
    print(f"{ops} operations in {rounds} rounds")
    assert disk.read_bytes() == backing


def check_and_rebase(uri, groups, untouched, model, backing, round_no):
    got = read_sectors(uri, groups + untouched)
    for g in untouched:
        assert got[g] == backing[g * GROUP:(g + 1) * GROUP], f"untouched group {g} changed"
    for g in groups:
        data = got[g]
        for i in range(SECTORS_PER_GROUP):
            s = g * SECTORS_PER_GROUP + i
            sec = model[s]
            keys = decode(s, data[i * SECTOR:(i + 1) * SECTOR], backing[s * SECTOR:(s + 1) * SECTOR])
            allowed = set(sec.stable) | set(sec.later)
            assert keys & allowed, (
                f"round {round_no}: sector {s} reads {sorted(map(str, keys)) or 'foreign bytes'}; "
                f"allowed: last promised {sorted(map(str, sec.stable))}, then "
                f"{[str(k) for k in sec.later]}")
            sec.stable = keys
            sec.later = []
