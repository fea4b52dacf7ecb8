"""The engine over a real NBD server (nbdkit started by the test): data, sizes that are not a
multiple of the block size, extents passed through from base:allocation, errors of the backing,
unreachable servers, and a 16 TiB export.  What the backing holds is read with libnbd directly."""

import errno
import os
import socket
import subprocess
import threading

import pytest

from cow import engine as E
from support_engine import (
    HOLE_ZERO,
    KiB,
    MiB,
    TiB,
    engines,  # noqa: F401 - a fixture
    assert_same,
    check_extents,
    collect,
    file_map,
    nbd_map,
    nbd_read,
    randbytes,
    read_all,
    read_file,
    states,
)

NA, AL, TR = 0, 1, 3




def exercise(eng, want, backing_runs, seed=0):
    """A few writes, zeroes and trims (aligned and not, up to the end), checked after each."""
    want = bytearray(want)
    size, bs = eng.size, eng.block_size

    def check():
        assert_same(read_all(eng), want)
        check_extents(eng, backing_runs, content=want)

    check()
    if size == 0:
        return
    ops = [("pwrite", min(size, 700), size // 3), ("pwrite", min(size, bs), 0),
           ("zero", min(size, bs + 100), size // 2), ("trim", min(size, 3000), size - min(size, 3000)),
           ("pwrite", min(size, 10), size - min(size, 10)), ("zero-keep", min(size, 2 * bs), 0)]
    for i, (op, count, off) in enumerate(ops):
        count = min(count, size - off)
        if op == "pwrite":
            data = randbytes(seed * 100 + i, count)
            eng.pwrite(data, off)
            want[off:off + count] = data
        elif op == "trim":
            eng.trim(count, off)
            want[off:off + count] = bytes(count)
        else:
            eng.zero(count, off, may_trim=(op == "zero"))
            want[off:off + count] = bytes(count)
        check()


@pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB, 4 * MiB], ids=["4K", "64K", "4M"])
@pytest.mark.parametrize("size", [130000, 3 * 65536 + 5, 1 * MiB])
def test_file_plugin_backing(engines, backing_factory, nbdkit, bs, size):
    path = backing_factory(size)
    uri = nbdkit("-r", "file", path)
    eng = engines(uri, block_size=bs)
    assert eng.backing_is_nbd and eng.backing == uri
    assert eng.size == size and eng.nr_blocks == -(-size // bs)
    runs = nbd_map(uri)
    assert runs == file_map(path)
    exercise(eng, read_file(path), runs)


def test_pattern_plugin_backing(engines, nbdkit):
    size = 1 * MiB + 4097
    uri = nbdkit("-r", "pattern", str(size))
    eng = engines(uri, block_size=4096)
    data = nbd_read(uri)
    assert len(data) == size and data[8:16] == (8).to_bytes(8, "big")
    exercise(eng, data, nbd_map(uri), seed=1)


def test_memory_plugin_backing_is_all_holes(engines, nbdkit):
    uri = nbdkit("memory", "1M")
    eng = engines(uri)
    assert collect(eng.extents, eng.size, 0) == [(0, 1 * MiB, HOLE_ZERO)]
    exercise(eng, bytes(1 * MiB), nbd_map(uri), seed=2)


@pytest.mark.parametrize("seed", [1, 2])
def test_sparse_random_backing_extents_pass_through(engines, nbdkit, seed):
    size = 8 * MiB
    uri = nbdkit("-r", "sparse-random", str(size), f"seed={seed}", "percent=40", "runlength=100000")
    runs = nbd_map(uri)
    assert len({t for _, _, t in runs}) == 2, runs  # both data and holes
    eng = engines(uri, block_size=4096)
    check_extents(eng, runs)
    exercise(eng, nbd_read(uri), runs, seed=seed)


@pytest.mark.parametrize("plugin", [("null", "0"), ("memory", "0")])
def test_empty_export(engines, nbdkit, plugin):
    uri = nbdkit(*plugin)
    eng = engines(uri)
    assert eng.size == 0 and eng.nr_blocks == 0
    assert eng.extents(0, 0) == []
    eng.pread(bytearray(0), 0)
    with pytest.raises(ValueError):
        eng.pread(bytearray(1), 0)


@pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB, 4 * MiB], ids=["4K", "64K", "4M"])
@pytest.mark.parametrize("op", ["trim", "zero", "zero-keep"])
def test_unaligned_tail_reads_zero(engines, backing_factory, nbdkit, bs, op):
    path = backing_factory(100000, pattern=0x21, holes=False)
    eng = engines(nbdkit("-r", "file", path), block_size=bs)
    if op == "trim":
        eng.trim(100000, 0)
    else:
        eng.zero(100000, 0, may_trim=(op == "zero"))
    assert read_all(eng) == bytes(100000)


def test_cow_on_read_and_blk_api(engines, backing_factory, nbdkit):
    bs = 65536
    path = backing_factory(4 * bs + 333)
    data = read_file(path)
    eng = engines(nbdkit("-r", "file", path), cow_on_read=True)
    buf = bytearray(100)
    eng.pread(buf, bs + 7)
    assert buf == data[bs + 7:bs + 107]
    assert states(eng) == [NA, AL, NA, NA, NA]
    block = bytearray(bs)
    eng.blk_read(4, block)
    assert block == data[4 * bs:] + bytes(bs - 333)
    eng.blk_cache(2, E.CACHE_MODE_COW)
    assert eng.blk_status(2) == AL
    eng.blk_trim(2)
    eng.blk_read(2, block)
    assert block == bytes(bs) and eng.blk_status(2) == TR


@pytest.mark.parametrize("connections", [1, 2, 8])
def test_parallel_readers_over_several_connections(engines, backing_factory, nbdkit, connections):
    bs = 4096
    path = backing_factory(2 * MiB)
    data = read_file(path)
    eng = engines(nbdkit("-r", "file", path), block_size=bs, nbd_connections=connections)
    errors = []

    def reader(k):
        try:
            buf = bytearray(3 * bs + 17)
            for i in range(200):
                off = ((k * 7919 + i * 104729) % (2 * MiB - len(buf)))
                eng.pread(buf, off)
                assert buf == data[off:off + len(buf)], f"offset {off}"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


def test_tcp_uri(engines, backing_factory, tmp_path):
    """nbd://HOST:PORT.  The test binds and listens on a port the kernel picks and hands the
    listening socket to nbdkit (socket activation, as systemd does): no port is freed and
    taken again, so no other process can get in between."""
    path = backing_factory(130000)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    fd = lsock.fileno()
    proc = subprocess.Popen(
        ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; '
         f'exec "$@" 3<&{fd} {fd}<&-', "bash",      # (bash: dash takes one-digit fds only)
         "nbdkit", "-f", "--exit-with-parent", "-r", "file", str(path)],
        pass_fds=(fd,), stderr=subprocess.DEVNULL)
    lsock.close()                         # nbdkit holds it now
    try:
        uri = f"nbd://127.0.0.1:{port}"
        eng = engines(uri)                # the connection waits in the listen queue if need be
        assert eng.backing_is_nbd and eng.size == 130000
        assert read_all(eng) == read_file(path)
        eng.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_unreachable_unix_socket(engines, tmp_path):
    sock = tmp_path / "nobody-listens.sock"
    uri = f"nbd+unix:///?socket={sock}"
    with pytest.raises(OSError) as ei:
        engines(uri)
    msg = str(ei.value)
    assert str(sock) in msg or uri in msg, f"message does not say what failed: {msg!r}"


def test_unreachable_tcp(engines):
    """A port bound by this test and not listening: a connection is refused, and no other
    process can bind the port meanwhile (the socket stays bound until the end)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        uri = f"nbd://127.0.0.1:{port}"
        with pytest.raises(OSError) as ei:
            engines(uri)
    assert ei.value.errno == errno.ECONNREFUSED, ei.value
    assert str(port) in str(ei.value), str(ei.value)


def test_bad_nbd_uri(engines):
    """A URI libnbd cannot parse: EINVAL, and the message names the URI and says what is
    wrong with it (not just any error with some text)."""
    uri = "nbd+unix:///?no-socket-here"
    with pytest.raises(OSError) as ei:
        engines(uri)
    assert ei.value.errno == errno.EINVAL, ei.value
    msg = str(ei.value)
    assert uri in msg and "socket" in msg.split(uri, 1)[1], msg
    assert "\n" not in msg and "Traceback" not in msg, msg


def test_backing_read_errors_raise_oserror(engines, nbdkit, tmp_path):
    """nbdkit's error filter fails every read with EIO: the engine raises OSError(EIO) naming the
    operation, and a failed copy-up leaves the block not allocated."""
    uri = nbdkit("--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%")
    eng = engines(uri, cow_on_read=True, cow_on_cache=True)
    bs = eng.block_size
    cases = [("read", lambda: eng.pread(bytearray(100), 10)),
             ("write", lambda: eng.pwrite(b"w" * 100, bs + 10)),           # needs a copy-up
             ("zero", lambda: eng.zero(100, 2 * bs + 10, may_trim=False)),
             ("trim", lambda: eng.trim(100, 3 * bs + 10)),
             ("cache", lambda: eng.cache(bs, 4 * bs)),
             ("blk_read", lambda: eng.blk_read(5, bytearray(bs)))]
    for name, call in cases:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EIO, (name, ei.value)
        assert str(ei.value).strip(), name
    assert states(eng) == [NA] * eng.nr_blocks, "a failed copy-up changed a block's state"
    # what needs no backing read still works
    eng.pwrite(b"k" * bs, 6 * bs)
    eng.trim(bs, 7 * bs)
    eng.zero(bs, 8 * bs)
    buf = bytearray(3 * bs)
    eng.pread(buf, 6 * bs)
    assert buf == b"k" * bs + bytes(2 * bs)


def test_16_TiB_export(engines, nbdkit):
    uri = nbdkit("memory", "16T")
    eng = engines(uri, block_size="64K")
    size = 16 * TiB
    assert eng.size == size and eng.nr_blocks == size // 65536
    buf = bytearray(65536)
    eng.pread(buf, size - 65536)
    assert buf == bytes(65536)
    ext = eng.extents(size, 0)
    assert ext and all(t == HOLE_ZERO for _, t in ext)
    assert collect(eng.extents, MiB, size - MiB) == [(size - MiB, size, HOLE_ZERO)]
    eng.pwrite(b"mid", 8 * TiB)
    assert eng.blk_status(8 * TiB // 65536) == AL


def test_16_TiB_export_last_block_is_writable(engines, nbdkit):
    """The overlay maps disk offsets 1:1, so its file system must hold a file this long: tmpfs
    does (ext4 stops 4 KiB short of 16 TiB: see the next test)."""
    eng = engines(nbdkit("memory", "16T"), block_size="64K", tmpdir="/dev/shm")
    size = eng.size
    eng.pwrite(b"end!" * 1024, size - 4096)
    buf = bytearray(8192)
    eng.pread(buf, size - 8192)
    assert buf == bytes(4096) + b"end!" * 1024


def test_16_TiB_export_overlay_on_ext4_fails_cleanly_at_the_end(engines, nbdkit, tmp_path):
    """On a file system whose files stop short of 16 TiB (ext4: 4 KiB short), a write past that
    limit is a clean EFBIG and changes nothing; the rest of the disk works.  What the overlay's
    file system allows is asked of it first (a sparse probe file), and the engine's answer must
    match it: the write fails with EFBIG and reads back zeroes, or succeeds and reads back."""
    eng = engines(nbdkit("memory", "16T"), block_size="64K")
    size = eng.size
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"p" * 4096, size - 4096)
        fits = True
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        fits = False
    finally:
        os.close(fd)
        probe.unlink()
    buf = bytearray(4096)
    if fits:
        eng.pwrite(b"end!" * 1024, size - 4096)
        assert eng.blk_status(eng.nr_blocks - 1) == AL
        eng.pread(buf, size - 4096)
        assert buf == b"end!" * 1024
    else:
        with pytest.raises(OSError) as ei:
            eng.pwrite(b"end!" * 1024, size - 4096)
        assert ei.value.errno == errno.EFBIG, ei.value
        assert eng.blk_status(eng.nr_blocks - 1) == NA
        eng.pread(buf, size - 4096)
        assert buf == bytes(4096), "a failed write left data behind"
    eng.pwrite(b"ok", size - 65536 - 2)
    eng.pread(buf, size - 65536 - 4096)
    assert buf[-2:] == b"ok"


def test_nbdkit_served_backing_unchanged(engines, backing_factory, nbdkit):
    """A writable export too: the engine never writes to its backing (backing_factory checks the
    file after the test; here we also read the export through libnbd)."""
    path = backing_factory(300000)
    uri = nbdkit("file", path)
    before = nbd_read(uri)
    eng = engines(uri, block_size=4096)
    eng.pwrite(b"x" * 300000, 0)
    eng.trim(100000, 50000)
    eng.zero(5000, 7)
    eng.flush()
    assert nbd_read(uri) == before


def test_grown_disk_extents_past_the_backing(engines, nbdkit):
    """After blk_set_size grows the disk past the export's end, extents there are hole|zero (the
    engine must not ask the server about ranges past its end: nbdkit refuses them)."""
    uri = nbdkit("-r", "pattern", "100000")
    eng = engines(uri, block_size=4096)
    eng.blk_set_size(300000)
    assert eng.size == 300000
    buf = bytearray(200000)
    eng.pread(buf, 100000)
    assert buf == bytes(200000)
    runs = collect(eng.extents, 200000, 100000)
    assert runs == [(100000, 300000, HOLE_ZERO)], runs
    assert collect(eng.extents, 300000, 0)[0] == (0, 100000, 0)


@pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB, 4 * MiB], ids=["4K", "64K", "4M"])
def test_backing_block_size_constraints_are_respected(engines, nbdkit, bs):
    """A server may advertise a minimum and a maximum request size and refuse anything else
    (nbdkit's blocksize-policy filter with the error policy; qemu-nbd over O_DIRECT images advertises
    a minimum too).  Client requests of any alignment must still work: the engine reads the backing
    in whole aligned pieces (as nbdkit's cow filter does, whole blocks) and no larger than the maximum."""
    size = 10 * MiB + 4096
    uri = nbdkit("-r", "--filter=blocksize-policy", "pattern", str(size), "blocksize-minimum=4096",
                 "blocksize-preferred=65536", "blocksize-maximum=1M", "blocksize-error-policy=error")
    data = nbd_read(uri)
    eng = engines(uri, block_size=bs)
    for count, offset in [(100, 1000), (4096, 512), (5 * MiB + 3, 7), (1, size - 1), (3 * MiB, 0)]:
        buf = bytearray(count)
        eng.pread(buf, offset)
        assert buf == data[offset:offset + count], (count, offset)
    check_extents(eng, nbd_map(uri), 1000, 2 * MiB)
    exercise(eng, data, nbd_map(uri), seed=3)


def test_backing_without_block_status(engines, nbdkit):
    """A server without base:allocation: not-allocated blocks are reported as data (the safe
    answer), trimmed ones still as hole|zero."""
    uri = nbdkit("--filter=noextents", "memory", "1M")
    eng = engines(uri, block_size=4096)
    assert collect(eng.extents, MiB, 0) == [(0, MiB, 0)]
    eng.trim(8192, 4096)
    assert collect(eng.extents, MiB, 0) == [(0, 4096, 0), (4096, 12288, HOLE_ZERO), (12288, MiB, 0)]
    assert read_all(eng) == bytes(MiB)


def _backing_reads(log):
    """(offset, count) of every read the backing server saw, from nbdkit's log filter."""
    import re

    return [(int(o, 16), int(c, 16))
            for o, c in re.findall(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ",
                                   log.read_text() if log.exists() else "")]


def test_backing_is_read_only_when_needed(engines, nbdkit, tmp_path):
    """Counted on the server: a block is copied up once; writes into an allocated block, whole-block
    writes, trims and zeroes of whole blocks, and anything in a trimmed block read nothing."""
    log = tmp_path / "reads.log"
    uri = nbdkit("--filter=log", "pattern", "1M", f"logfile={log}")
    bs = 4096
    eng = engines(uri, block_size=bs, nbd_connections=1)
    data = nbd_read(uri)
    base = len(_backing_reads(log))  # nbd_read's own reads

    def reads():
        return _backing_reads(log)[base:]

    for i in range(8):                                   # eight sectors of block 3: one copy-up
        eng.pwrite(bytes([i + 1]) * 512, 3 * bs + i * 512)
    assert [(o, c) for o, c in reads()] == [(3 * bs, bs)], reads()
    eng.pwrite(b"x" * 100, 3 * bs + 7)                   # already allocated: no read
    eng.pwrite(b"w" * (2 * bs), 10 * bs)                 # whole blocks: no read
    eng.trim(bs, 20 * bs)
    eng.zero(bs, 21 * bs, may_trim=False)
    eng.zero(100, 20 * bs + 5)                           # inside a trimmed block: no read
    eng.pwrite(b"t" * 10, 20 * bs + 200)
    assert len(reads()) == 1, reads()
    buf = bytearray(bs)
    eng.pread(buf, 20 * bs)
    eng.pread(buf, 3 * bs)
    assert len(reads()) == 1, reads()
    eng.pread(buf, 30 * bs)                              # not allocated: from the backing
    assert buf == data[30 * bs:31 * bs]
    assert len(reads()) == 2
    want = bytearray(data)
    for i in range(8):
        want[3 * bs + i * 512:3 * bs + (i + 1) * 512] = bytes([i + 1]) * 512
    want[3 * bs + 7:3 * bs + 107] = b"x" * 100
    want[10 * bs:12 * bs] = b"w" * (2 * bs)
    want[20 * bs:22 * bs] = bytes(2 * bs)
    want[20 * bs + 200:20 * bs + 210] = b"t" * 10
    assert_same(read_all(eng), want)


def test_cow_on_read_copies_up_once(engines, nbdkit, tmp_path):
    """Counted on the server: after the first read (or cache) of a block, it comes from the overlay."""
    log = tmp_path / "reads.log"
    uri = nbdkit("--filter=log", "pattern", "1M", f"logfile={log}")
    eng = engines(uri, block_size=4096, cow_on_read=True, cow_on_cache=True, nbd_connections=1)
    buf = bytearray(100)
    eng.pread(buf, 5 * 4096 + 10)
    eng.cache(8192, 7 * 4096)
    first = _backing_reads(log)
    # Each block read once (blocks 7 and 8 may come in one request).
    blocks = [b for o, c in first for b in range(o // 4096, (o + c + 4095) // 4096)]
    assert sorted(blocks) == [5, 7, 8], first
    for _ in range(3):
        eng.pread(buf, 5 * 4096 + 10)
        eng.pread(buf, 8 * 4096)
        eng.cache(8192, 7 * 4096)
        eng.cache(4096, 5 * 4096)
    assert _backing_reads(log) == first
    assert states(eng)[5:9] == [AL, NA, AL, AL]
