"""Measurements: sample backings, fio runs, the copy pipeline, nbdcopy timing, start-up, views."""

import json
import os
import random
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import nbd

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PIECE = 64 * KiB


def make_backing(path, size, holes=True):
    """A sparse sample disk: data in most 64 KiB pieces, a hole in every third one (the same shape
    as the test suite's sample backings). Each 4 KiB of data holds its own offset, so it differs
    everywhere."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, PIECE)):
            if holes and i % 3 == 2:
                continue
            n = min(PIECE, size - off)
            data = b"".join((off + j).to_bytes(8, "little") * 512 for j in range(0, n, 4096))
            f.seek(off)
            f.write(data[:n])
    return path


def make_random(path, size, seed=9):
    """A disk of random data with no holes: a copy reads every byte of it from the backing."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for off in range(0, size, 16 * MiB):
            f.write(rng.randbytes(min(16 * MiB, size - off)))
    return Path(path)


def make_sparse(path, size):
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass(frozen=True)
class FioJob:
    key: str
    title: str
    rw: str
    bs: str
    unit: str            # "IOPS" or "MiB/s"
    sequential: bool = False
    extra: tuple = ()


FIO_JOBS = [
    FioJob("randwrite-4k", "random 4 KiB writes", "randwrite", "4k", "IOPS"),
    FioJob("randread-4k", "random 4 KiB reads", "randread", "4k", "IOPS"),
    FioJob("randrw-64k", "random 64 KiB read/write 50/50", "randrw", "64k", "IOPS",
           extra=("--rwmixread=50",)),
    FioJob("seqread-1m", "sequential 1 MiB reads", "read", "1m", "MiB/s", sequential=True),
    FioJob("seqwrite-1m", "sequential 1 MiB writes", "write", "1m", "MiB/s", sequential=True),
]
FIO_BY_KEY = {j.key: j for j in FIO_JOBS}


def run_fio(job, uri, *, size, numjobs, iodepth, runtime_s, out_json, cwd):
    """Run fio's nbd engine against uri; return a dict with value (in job.unit), iops, MiB/s, p99."""
    cmd = ["fio", f"--name={job.key}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--numjobs={numjobs}", f"--iodepth={iodepth}", "--time_based",
           f"--runtime={max(1, int(runtime_s * 1000))}ms", "--group_reporting",
           "--output-format=json", f"--output={out_json}", *job.extra]
    if job.sequential:
        # Each job streams through its own slice, as separate sequential clients would.
        bs = int(job.bs[:-1]) * (MiB if job.bs.endswith("m") else KiB)
        per_job = max(bs, (size // numjobs) // bs * bs)
        cmd += [f"--size={per_job}", f"--offset_increment={per_job}"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio {job.key} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    text = Path(out_json).read_text()
    data = json.loads(text[text.index("{"):])
    res = data["jobs"][0]
    if res.get("error"):
        raise RuntimeError(f"fio {job.key} reported error {res['error']}")
    iops = res["read"]["iops"] + res["write"]["iops"]
    mibs = (res["read"]["bw_bytes"] + res["write"]["bw_bytes"]) / MiB
    p99 = []
    for d in ("read", "write"):
        pct = res[d].get("clat_ns", {}).get("percentile") or {}
        if res[d]["total_ios"] and "99.000000" in pct:
            p99.append(pct["99.000000"] / 1e6)
    value = iops if job.unit == "IOPS" else mibs
    if value <= 0:
        raise RuntimeError(f"fio {job.key} did no I/O")
    moved = res["read"]["io_bytes"] + res["write"]["io_bytes"]
    return {"value": value, "iops": iops, "mib_s": mibs, "p99_ms": max(p99) if p99 else None,
            "bytes": moved}


def pipeline_prep(uri, size, seed=1):
    """Through the overlay, over one connection: trim a quarter of the disk (1 MiB of every 4 MiB,
    or the first quarter of a small disk), then rewrite pieces: aligned blocks, unaligned 4 KiB
    pieces and unaligned multi-block pieces. Returns seconds."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        if not h.can_trim():
            raise RuntimeError("the export does not support trim")
        t0 = time.monotonic()
        stride = 4 * MiB
        if size >= stride:
            for off in range(0, size - MiB + 1, stride):
                h.trim(MiB, off)
        else:
            h.trim(size // 4, 0)
        nwrites = max(8, size // (2 * MiB))
        for i in range(nwrites):
            length = (PIECE, 4096, 3 * PIECE + 4096)[i % 3]
            length = min(length, size)
            off = rng.randrange(0, size - length + 1) // 4096 * 4096
            h.pwrite(bytes([(i % 255) + 1]) * length, off)
        if h.can_flush():
            h.flush()
        return time.monotonic() - t0
    finally:
        h.shutdown()
        del h


def nbdcopy_time(uri, dest, connections, cwd):
    """Copy the whole export with nbdcopy (multi-conn when the server offers it); seconds."""
    cmd = ["nbdcopy", f"--connections={connections}", f"--threads={connections}", uri, str(dest)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nbdcopy failed ({r.returncode}): {r.stderr[-800:]}")
    return elapsed



def nbdcopy_plain(uri, connections, cwd):
    """`nbdcopy -C N URI null:`, as a user would type it (nbdcopy's default threads: the number of
    cores, which also caps its connections). Returns (seconds, nbdcopy's user + system seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(["nbdcopy", "-C", str(connections), uri, "null:"], cwd=cwd,
                       capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"nbdcopy failed ({r.returncode}): {r.stderr[-800:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def scattered_writes_then_flush(uri, disk_size, total, jobs, iodepth, out_json, cwd):
    """fio writes `total` bytes in 4 KiB pieces at random places of the whole disk, each place once
    (each job its own slice of the disk), with no flush; then one client times a single FLUSH.
    Returns (write seconds, flush seconds)."""
    per_job = disk_size // jobs // 4096 * 4096
    cmd = ["fio", "--name=scatter", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
           "--bs=4k", f"--numjobs={jobs}", f"--iodepth={iodepth}", f"--size={per_job}",
           f"--offset_increment={per_job}", f"--io_size={total // jobs // 4096 * 4096}",
           "--group_reporting", "--output-format=json", f"--output={out_json}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    writes = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fio scatter failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        t0 = time.monotonic()
        h.flush()
        return writes, time.monotonic() - t0
    finally:
        h.shutdown()
        del h


# -- views: many writable views of one backing in one server ------------------------------------

def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def views_clients(uris, size, writes=4, seed=1):
    """One client per URI, one after another: connect (the server opens its view), write
    `writes` 4 KiB blocks at random places and flush; every client stays connected.  Returns
    (seconds from connect to the first write's reply, per client; the open handles)."""
    rng = random.Random(seed)
    firsts, handles = [], []
    try:
        for uri in uris:
            h = nbd.NBD()
            t0 = time.monotonic()
            h.connect_uri(uri)
            h.pwrite(b"v" * 4096, rng.randrange(size // 4096) * 4096)
            firsts.append(time.monotonic() - t0)
            handles.append(h)
            for _ in range(writes - 1):
                h.pwrite(b"w" * 4096, rng.randrange(size // 4096) * 4096)
            h.flush()
    except BaseException:
        close_all(handles)
        raise
    return firsts, handles


def close_all(handles):
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    handles.clear()


def wait_fds(pid, want, timeout=60.0):
    """Wait until the process holds at most `want` descriptors; returns how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n is None or n <= want or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def run_fio_uris(uris, *, size, bs, rw, iodepth, runtime_s, out_json, cwd):
    """One fio job per URI (fio's nbd engine), job i in the i-th slice of the disk (so that the
    work of a job does not depend on whether the URIs are one export or many), reported as a
    group; returns IOPS."""
    per_job = size // len(uris) // MiB * MiB
    cmd = ["fio", "--ioengine=nbd", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
           "--time_based", f"--runtime={max(1, int(runtime_s * 1000))}ms", "--group_reporting",
           "--output-format=json", f"--output={out_json}"]
    for i, uri in enumerate(uris):
        cmd += [f"--name=job{i}", f"--uri={uri}", f"--offset={i * per_job}", f"--size={per_job}"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    text = Path(out_json).read_text()
    res = json.loads(text[text.index("{"):])["jobs"][0]
    if res.get("error"):
        raise RuntimeError(f"fio reported error {res['error']}")
    iops = res["read"]["iops"] + res["write"]["iops"]
    if iops <= 0:
        raise RuntimeError("fio did no I/O")
    return iops
