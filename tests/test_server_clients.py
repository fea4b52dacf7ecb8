"""python -m cow.server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio, and
nbdkit's nbd plugin, plus the qcow2 diff recipe from nbdkit's cow filter documentation."""

import json
import os
import subprocess

import nbd
import pytest

from support_server import start_server

SIZE = 8 * 1024 * 1024


def sh(*cmd, timeout=120, check=True):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def disk(backing_factory):
    return backing_factory(SIZE)


@pytest.fixture
def served(disk, tmp_path):
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        yield uri, proc


def pattern_file(path, size, seed):
    data = bytes((i * seed + i // 997) & 0xFF for i in range(65536))
    with open(path, "wb") as f:
        for _ in range(size // len(data)):
            f.write(data)
    return path


# ---- nbdinfo -----------------------------------------------------------------------------------

def test_nbdinfo_plain_json_list(served, disk):
    uri, _ = served
    out = sh("nbdinfo", uri).stdout
    assert f"export-size: {SIZE}" in out and "can_multi_conn: true" in out
    assert "base:allocation" in out and "qemu:allocation-depth" in out
    info = json.loads(sh("nbdinfo", "--json", uri).stdout)
    [export] = info["exports"]
    assert export["export-size"] == SIZE and export["can_zero"] and export["can_fast_zero"]
    assert export["block_size_maximum"] >= 64 * 1024 * 1024
    assert export["description"] == "copy-on-write view"  # never the backing (issue 18)
    listing = json.loads(sh("nbdinfo", "--list", "--json", uri).stdout)
    assert [e["export-name"] for e in listing["exports"]] == [""]


def test_nbdinfo_map(served):
    uri, _ = served
    rows = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    assert sum(r["length"] for r in rows) == SIZE
    assert {r["type"] for r in rows} == {0, 3}
    assert rows[0] == {"offset": 0, "length": 131072, "type": 0, "description": "data"}
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"z" * 4096, 65536 * 2)  # into the first hole
    h.shutdown()
    rows = json.loads(sh("nbdinfo", "--map", "--json", uri).stdout)
    assert rows[0]["length"] >= 65536 * 3 and rows[0]["type"] == 0
    depth = json.loads(sh("nbdinfo", "--map=qemu:allocation-depth", "--json", uri).stdout)
    assert [(r["offset"], r["length"], r["type"]) for r in depth[:3]] == [
        (0, 131072, 2), (131072, 65536, 1), (196608, SIZE - 196608, 2)]


# ---- nbdcopy -----------------------------------------------------------------------------------

def test_nbdcopy_out_and_in(served, disk, tmp_path):
    uri, _ = served
    out = tmp_path / "out.img"
    sh("nbdcopy", uri, out)
    assert out.read_bytes() == disk.read_bytes()
    src = pattern_file(tmp_path / "src.img", SIZE, 13)
    sh("nbdcopy", "--connections=4", "--requests=16", src, uri)
    sh("nbdcopy", "--connections=4", uri, tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()


# ---- qemu-img and qemu-io ----------------------------------------------------------------------

def test_qemu_img_info_map_compare_convert(served, disk, tmp_path):
    uri, _ = served
    info = json.loads(sh("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == SIZE
    mapping = json.loads(sh("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    assert sum(m["length"] for m in mapping) == SIZE
    assert any(m["data"] for m in mapping) and any(not m["data"] for m in mapping)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, uri)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, tmp_path / "c.qcow2")
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", tmp_path / "c.qcow2", disk)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
       pattern_file(tmp_path / "p.img", SIZE, 5), uri)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "p.img", uri)
    r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, uri, check=False)
    assert r.returncode == 1  # differ now


def test_qemu_io_fua_write_zeroes_discard(served, disk):
    uri, _ = served
    sh("qemu-io", "-f", "raw", uri,
       "-c", "write -P 0x55 -f 0 64k",
       "-c", "write -P 0x66 100000 5000",
       "-c", "write -z 200000 70000",
       "-c", "write -z -u 262144 131072",
       "-c", "discard 524288 65536",
       "-c", "flush")
    r = sh("qemu-io", "-f", "raw", uri,
           "-c", "read -P 0x55 0 64k",
           "-c", "read -P 0x66 100000 5000",
           "-c", "read -P 0 200000 70000",
           "-c", "read -P 0 262144 131072")
    assert "Pattern verification failed" not in r.stdout + r.stderr
    with open(disk, "rb") as f:
        f.seek(65536)
        expect = f.read(100000 - 65536)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(len(expect), 65536) == expect
    h.shutdown()


# ---- fio ---------------------------------------------------------------------------------------

def test_fio_nbd_engine_with_verify(served):
    uri, _ = served
    r = sh("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
           f"--size={SIZE}", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
           "--output-format=json", timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == SIZE and job["read"]["io_bytes"] == SIZE


def test_fio_nbd_engine_four_jobs(served):
    uri, _ = served
    r = sh("fio", "--name=mixed", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
           "--size=2M", "--numjobs=4", "--iodepth=8", "--group_reporting", "--output-format=json",
           timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] + job["write"]["io_bytes"] == 4 * 2 << 20


# ---- nbdkit's nbd plugin as a client -----------------------------------------------------------

def test_nbdkit_nbd_plugin_as_client(served, disk, nbdkit, tmp_path):
    uri, proc = served
    front = nbdkit("nbd", f"socket={proc.sock_path}")
    out = tmp_path / "via-nbdkit.img"
    sh("nbdcopy", front, out)
    assert out.read_bytes() == disk.read_bytes()
    h = nbd.NBD()
    h.connect_uri(front)
    h.pwrite(b"through nbdkit", 4096)
    h.zero(8192, 65536)
    h.trim(65536, 65536 * 4)
    h.flush()
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(14, 4096) == b"through nbdkit"
    assert h.pread(8192, 65536) == bytes(8192)
    assert h.pread(65536, 65536 * 4) == bytes(65536)
    h.shutdown()


# ---- the diff recipe ---------------------------------------------------------------------------

def test_qcow2_diff_recipe(served, disk, tmp_path):
    """nbdkit-cow-filter(1): make changes through the overlay, then turn them into a qcow2 whose
    backing is the original image, holding exactly the changes."""
    uri, proc = served
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x11" * 65536, 1 << 20)
    h.pwrite(b"\x22" * 100, 3 * (1 << 20) + 7)
    h.flush()
    h.shutdown()
    diff = tmp_path / "diff.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"nbd:unix:{proc.sock_path}", "-F", "raw",
       diff)
    sh("qemu-img", "rebase", "-F", "raw", "-b", disk, "-f", "qcow2", diff)
    # The diff over the original equals the modified export...
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", diff, uri)
    # ...and holds data only where the changes were.
    mapping = json.loads(sh("qemu-img", "map", "--output=json", diff).stdout)
    top = [(m["start"], m["length"]) for m in mapping if m["depth"] == 0 and m["data"]]
    covered = sum(n for _, n in top)
    assert 0 < covered <= 4 * 65536, top
    assert any(s <= 1 << 20 < s + n for s, n in top)
    assert any(s <= 3 * (1 << 20) + 7 < s + n for s, n in top)
    assert os.path.getsize(diff) < 2 * 1024 * 1024
