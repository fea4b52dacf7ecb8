"""Large I/O through python -m cow.server: READ replies sent from the files with sendfile,
sparse structured replies (NBD_REPLY_TYPE_OFFSET_HOLE, one data chunk under NBD_CMD_FLAG_DF),
with real clients (libnbd with structured replies on and off, nbdcopy, qemu-img) and data
compared byte for byte: over holes, trimmed blocks, blocks zeroed and kept allocated, a
persistent overlay (its data lives after a header and bitmap), TLS (the copying path), and reads
racing trims and writes of the same blocks.

Large WRITE payloads spliced from the socket into the overlay: data identical to a model after
writes over every kind of block (whole, partial, not allocated, trimmed, allocated), with block
sizes below and above the write size, with and without structured replies, cow-on-read, over
TCP and a persistent overlay (FUA, then kill -9); a payload cut short writes nothing; refused
writes (read-only, out of range, the overlay's cap) still consume their payload, so the next
request is understood.  Nothing here is timed."""

import os
import random
import socket
import struct
import subprocess
import sys
import threading

import nbd
import pytest

from cow import protocol as P
from cow.engine import Engine
from support_engine import overlay_write_calls
from support_server import RawClient, start_server

MiB = 1024 * 1024
SIZE = 16 * MiB
BS = 65536


def connect(uri, structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    return h


def pread_chunks(h, count, offset, flags=0):
    """pread_structured: (data, [(kind, offset, length)]) as libnbd saw the chunks."""
    chunks = []

    def chunk(buf, off, status, err):
        chunks.append((status, off, len(buf)))
        return 0

    data = h.pread_structured(count, offset, chunk, flags)
    return data, chunks


def changed_disk(h, want):
    """Writes, trims and zeroes through h, mirrored in want (a bytearray of the disk)."""
    def write(data, off):
        h.pwrite(data, off)
        want[off:off + len(data)] = data

    def zero(n, off, flags=0):
        h.zero(n, off, flags)
        want[off:off + n] = bytes(n)

    write(b"\x11" * (3 * BS), 2 * BS)                    # whole blocks, over a backing hole
    write(b"\x22" * 5000, 9 * BS - 1000)                 # unaligned, across two blocks
    h.trim(4 * BS, 16 * BS)                              # trimmed blocks read as zeroes
    want[16 * BS:20 * BS] = bytes(4 * BS)
    zero(2 * BS, 24 * BS, nbd.CMD_FLAG_NO_HOLE)          # allocated, punched: zeroes
    write(b"\x33" * 100, 25 * BS + 7)                    # ... then partly written again
    zero(3 * BS, 40 * BS)
    write(b"\x44" * MiB, 6 * MiB)
    h.trim(BS, SIZE - BS)                                # the very end
    want[SIZE - BS:] = bytes(BS)
    h.flush()


READS = [(0, 4 * MiB), (BS, 128 * 1024), (2 * BS - 4096, 200000), (15 * BS, 6 * BS + 3),
         (24 * BS, 2 * BS), (39 * BS + 1, 5 * BS), (6 * MiB - 100, MiB + 200),
         (SIZE - 2 * BS, 2 * BS), (SIZE - 64 * 1024, 64 * 1024), (0, SIZE)]


@pytest.fixture
def disk(backing_factory):
    return backing_factory(SIZE)


@pytest.fixture
def served(disk, tmp_path):
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        want = bytearray(disk.read_bytes())
        changed_disk(h, want)
        h.shutdown()
        yield uri, want, proc


def test_large_reads_with_structured_replies_describe_holes(served):
    uri, want, _ = served
    h = connect(uri)
    kinds = set()
    for offset, count in READS:
        data, chunks = pread_chunks(h, count, offset)
        assert data == want[offset:offset + count], (offset, count)
        # The chunks cover the range exactly, once, and holes are zeroes.
        covered = sorted((off, n) for _, off, n in chunks)
        pos = offset
        for off, n in covered:
            assert off == pos and n > 0
            pos += n
        assert pos == offset + count
        for kind, off, n in chunks:
            kinds.add(kind)
            if kind == nbd.READ_HOLE:
                assert want[off:off + n] == bytes(n)
    assert kinds == {nbd.READ_DATA, nbd.READ_HOLE}
    # A read of nothing but a trimmed range is one hole; one of allocated data, one data chunk.
    assert pread_chunks(h, 4 * BS, 16 * BS)[1] == [(nbd.READ_HOLE, 16 * BS, 4 * BS)]
    assert pread_chunks(h, MiB, 6 * MiB)[1] == [(nbd.READ_DATA, 6 * MiB, MiB)]
    h.shutdown()


def test_df_flag_gets_one_data_chunk(served):
    uri, want, _ = served
    h = connect(uri)
    assert h.can_df()
    for offset, count in READS:
        data, chunks = pread_chunks(h, count, offset, nbd.CMD_FLAG_DF)
        assert data == want[offset:offset + count]
        assert chunks == [(nbd.READ_DATA, offset, count)]
    h.shutdown()


def test_large_reads_without_structured_replies(served):
    uri, want, _ = served
    h = connect(uri, structured=False)
    assert not h.can_df()
    rng = random.Random(7)
    for offset, count in READS + [(rng.randrange(SIZE - MiB), rng.choice([65536, 300000, MiB]))
                                  for _ in range(40)]:
        assert h.pread(count, offset) == want[offset:offset + count], (offset, count)
    h.shutdown()


def read_raw(c, cookie=None):
    """One structured READ reply off the wire (the next one, whichever its cookie, if cookie
    is None): [(type, flags, offset, length, data)].  Its chunks must come together."""
    out = []
    while True:
        magic, flags, rtype, got_cookie, length = struct.unpack(">IHHQI", c.recv_exact(20))
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
        if cookie is None:
            cookie = got_cookie
        assert got_cookie == cookie, "chunks of two replies interleaved"
        payload = c.recv_exact(length)
        if rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", payload)
            out.append((rtype, flags, off, length - 8, payload[8:]))
        elif rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
            assert length == 12
            off, n = struct.unpack(">QI", payload)
            out.append((rtype, flags, off, n, None))
        else:
            raise AssertionError(f"chunk type {rtype}: {payload!r}")
        if flags & P.NBD_REPLY_FLAG_DONE:
            return cookie, out


def test_the_chunks_on_the_wire(disk, tmp_path):
    """The sample backing has data in two of every three 64 KiB pieces and a hole in the
    third: a read of [64K, 448K) is data, hole, data, hole, data; DONE only on the last."""
    backing = disk.read_bytes()
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        with RawClient(proc.sock_path) as c:
            c.negotiate(structured=True)
            c.request(P.NBD_CMD_READ, BS, 6 * BS, cookie=5)
            _, chunks = read_raw(c, 5)
            assert [(t, f, o, n) for t, f, o, n, _ in chunks] == [
                (P.NBD_REPLY_TYPE_OFFSET_DATA, 0, BS, BS),
                (P.NBD_REPLY_TYPE_OFFSET_HOLE, 0, 2 * BS, BS),
                (P.NBD_REPLY_TYPE_OFFSET_DATA, 0, 3 * BS, 2 * BS),
                (P.NBD_REPLY_TYPE_OFFSET_HOLE, 0, 5 * BS, BS),
                (P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_FLAG_DONE, 6 * BS, BS)]
            for t, _, o, n, data in chunks:
                if data is not None:
                    assert data == backing[o:o + n]
            c.request(P.NBD_CMD_READ, BS, 6 * BS, cookie=6, flags=P.NBD_CMD_FLAG_DF)
            _, [(t, f, o, n, data)] = read_raw(c, 6)
            assert (t, f, o, n) == (P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_FLAG_DONE, BS,
                                    6 * BS)
            assert data == backing[BS:7 * BS]
            # Several replies in flight: each stays whole (never interleaved), in any order.
            for cookie in range(10, 20):
                c.request(P.NBD_CMD_READ, cookie * BS, 3 * BS + 5, cookie=cookie)
            seen = set()
            for _ in range(10):
                cookie, chunks = read_raw(c)
                seen.add(cookie)
                got = bytearray(3 * BS + 5)
                for t, _, o, n, data in chunks:
                    if data is not None:
                        got[o - cookie * BS:o - cookie * BS + n] = data
                assert got == backing[cookie * BS:cookie * BS + 3 * BS + 5]
            assert seen == set(range(10, 20))
        with RawClient(proc.sock_path) as c:
            c.negotiate(structured=False)
            c.request(P.NBD_CMD_READ, BS, 6 * BS, cookie=7)
            assert c.reply(6 * BS) == (7, 0, backing[BS:7 * BS])


def sh(*cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


def test_copies_with_nbdcopy_and_qemu_img_are_identical(served, tmp_path):
    uri, want, _ = served
    model = tmp_path / "model.img"
    model.write_bytes(want)
    out = tmp_path / "nbdcopy.img"
    sh("nbdcopy", "--connections=4", uri, out)
    assert out.read_bytes() == want
    out2 = tmp_path / "qemu.img"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out2)
    assert out2.read_bytes() == want
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, model)
    q = tmp_path / "out.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, q)
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, model)


def test_persistent_overlay_reads_from_its_data_area(disk, tmp_path):
    ov = tmp_path / "vm.cow"
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        want = bytearray(disk.read_bytes())
        changed_disk(h, want)
        for structured in (True, False):
            g = connect(uri, structured)
            for offset, count in READS:
                assert g.pread(count, offset) == want[offset:offset + count]
            g.shutdown()
        h.shutdown()
    with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        for offset, count in READS:
            data, chunks = pread_chunks(h, count, offset)
            assert data == want[offset:offset + count]
        h.shutdown()


def test_tls_keeps_the_copying_path(disk, tmp_path):
    from support_tls import make_pki, tls_handle

    pki = make_pki(tmp_path / "pki")
    with start_server(disk, "--tls=require", "--tls-certificates", pki.server,
                      tmp_path=tmp_path) as (uri, proc):
        h = tls_handle(pki.client)
        h.connect_unix(str(proc.sock_path))
        want = bytearray(disk.read_bytes())
        changed_disk(h, want)
        for offset, count in READS:
            data, chunks = pread_chunks(h, count, offset)
            assert data == want[offset:offset + count]
            assert [k for k, _, _ in chunks] == [nbd.READ_DATA]
        h.shutdown()


# ---- reads racing trims and writes of the same blocks ------------------------------------------

def stamp(block, gen):
    """A block's contents for one write: every 16 bytes name the block and the generation, so a
    read can tell whose data a sector holds."""
    return struct.pack("<QQ", block, gen) * (BS // 16)


def check_sector(got, block, back):
    """got (4 KiB of block) is a legal result of a read racing writes and trims of that block:
    each 8-byte word at an even place is the backing's there, zero (a trim), or the block number
    of some write of this very block (never another block's).  Finer tearing than 8 bytes does
    not happen on this machine's copies."""
    if got == back or not any(got):
        return
    words = memoryview(got).cast("Q")[::2].tolist()
    if set(words) == {block}:
        return
    backw = memoryview(back).cast("Q")[::2].tolist()
    for i, w in enumerate(words):
        assert w in (block, 0, backw[i]), f"a sector of block {block} holds data of block {w}"


@pytest.mark.parametrize("structured", [True, False])
def test_reads_racing_trims_and_writes(disk, tmp_path, structured):
    backing = disk.read_bytes()
    nblocks = 48                       # the first 3 MiB: data and holes of the backing
    stop = threading.Event()
    errors = []

    with start_server(disk, tmp_path=tmp_path) as (uri, _):
        def writer(seed):
            h = connect(uri)
            rng = random.Random(seed)
            gen = seed << 32
            try:
                while not stop.is_set():
                    b = rng.randrange(nblocks)
                    gen += 1
                    kind = rng.randrange(4)
                    if kind == 0:
                        h.trim(BS * rng.randint(1, 3), b * BS)
                    elif kind == 1:                     # part of a block, maybe not copied up
                        data = stamp(b, gen)
                        lo = rng.randrange(0, BS, 4096)
                        h.pwrite(data[lo:lo + 8192][:BS - lo], b * BS + lo)
                    else:
                        n = rng.randint(1, 4)
                        n = min(n, nblocks - b)
                        h.pwrite(b"".join(stamp(b + i, gen) for i in range(n)), b * BS)
            except Exception as e:
                errors.append(e)
            finally:
                h.shutdown()

        def reader(seed):
            h = connect(uri, structured)
            rng = random.Random(seed)
            try:
                for _ in range(100):
                    first = rng.randrange(nblocks - 1)
                    n = rng.randint(1, min(16, nblocks - first))
                    data = h.pread(n * BS, first * BS)
                    for i in range(n):
                        for s in range(0, BS, 4096):
                            at = (first + i) * BS + s
                            check_sector(data[i * BS + s:i * BS + s + 4096], first + i,
                                         backing[at:at + 4096])
            except Exception as e:
                errors.append(e)
            finally:
                h.shutdown()

        writers = [threading.Thread(target=writer, args=(i,)) for i in (1, 2)]
        readers = [threading.Thread(target=reader, args=(i,)) for i in (3, 4)]
        for t in writers + readers:
            t.start()
        for t in readers:
            t.join()
        stop.set()
        for t in writers:
            t.join()
        assert not errors, errors
        # Quiet again: a read from the files sees exactly what reads too small for that
        # (the copying path) see.
        h = connect(uri)
        whole = h.pread(nblocks * BS, 0)
        assert whole == b"".join(h.pread(32768, off) for off in range(0, nblocks * BS, 32768))
        h.shutdown()


# ---- large WRITEs: payloads spliced from the socket into the overlay ----------------------------

def model_writes(h, want, seed, sizes=(65536, 100000, 128 * 1024, MiB, 3 * MiB + 5, 8 * MiB),
                 rounds=40, flags=0):
    """Writes of large sizes at random (often unaligned) offsets through h, mirrored in want,
    with trims among them so that some land on trimmed blocks."""
    rng = random.Random(seed)
    for i in range(rounds):
        n = rng.choice(sizes)
        off = rng.randrange(0, SIZE - n + 1)
        if rng.random() < 0.5:
            off -= off % BS                     # aligned: whole blocks, maybe a partial tail
        if i % 7 == 6:
            at = min(off, SIZE - 2 * MiB)
            h.trim(2 * MiB, at)
            want[at:at + 2 * MiB] = bytes(2 * MiB)
            continue
        data = rng.randbytes(n)
        h.pwrite(data, off, flags)
        want[off:off + n] = data


def spliced(proc):
    return proc.log_path.read_text().count("(spliced)")


@pytest.mark.parametrize("block_size,cor", [("64K", "false"), ("4K", "true"), ("4M", "false")])
@pytest.mark.parametrize("structured", [True, False])
def test_large_writes_are_identical(disk, tmp_path, block_size, cor, structured):
    with start_server(disk, "-v", "--cow-block-size", block_size, "--cow-on-read", cor,
                      tmp_path=tmp_path) as (uri, proc):
        h = connect(uri, structured)
        want = bytearray(disk.read_bytes())
        model_writes(h, want, hash((block_size, structured)) & 0xffff)
        assert spliced(proc) > 0
        for offset, count in READS:
            assert h.pread(count, offset) == want[offset:offset + count], (offset, count)
        h.shutdown()
        out = tmp_path / "copy.img"
        sh("nbdcopy", uri, out)
        assert out.read_bytes() == want


def test_large_writes_over_tcp_with_fua_survive_kill(disk, tmp_path):
    """Over TCP (splice from a TCP socket), into a persistent overlay: qemu-img and nbdcopy
    write whole images, libnbd writes with FUA; after kill -9 the overlay holds every byte of
    the writes made with FUA and every byte flushed."""
    ov = tmp_path / "vm.cow"
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(5).randbytes(SIZE))
    sh(sys.executable, "-P", "-m", "cow.server", disk, "--overlay", ov, "-p", "0",
       "--run", f'qemu-img convert -n -f raw -O raw {src} "$uri" && '
                f'nbdcopy {src} "$uri" && nbdinfo --size "$uri"')
    want = bytearray(src.read_bytes())
    with start_server(disk, "--overlay", ov, tmp_path=tmp_path, check_exit=False) as (uri, proc):
        h = connect(uri)
        assert h.pread(SIZE, 0) == want
        model_writes(h, want, 11, rounds=20, flags=nbd.CMD_FLAG_FUA)
        proc.kill()
        proc.wait()
    with start_server(disk, "--overlay", ov, "-r", tmp_path=tmp_path) as (uri, _):
        h = connect(uri)
        assert h.pread(SIZE, 0) == want
        h.shutdown()


@pytest.mark.parametrize("buffered", [0, 4096, 300000])
@pytest.mark.parametrize("offset", [0, 3 * BS + 1234])
def test_a_payload_cut_short_writes_nothing(disk, tmp_path, buffered, offset):
    """The client sends a 2 MiB WRITE, part of its payload (some of it with the header, in the
    server's receive buffer), and hangs up: nothing of it is written, the server goes on."""
    backing = disk.read_bytes()
    count = 2 * MiB
    with start_server(disk, "-v", tmp_path=tmp_path) as (uri, proc):
        for sent in (buffered, count // 2, count - 1):
            with RawClient(proc.sock_path) as c:
                c.negotiate(structured=False)
                head = P.pack_request(P.NBD_CMD_WRITE, offset, count, cookie=9)
                c.send(head + b"\xee" * buffered)
                c.send(b"\xee" * (sent - buffered))
            h = connect(uri)
            assert h.pread(count + BS, offset) == backing[offset:offset + count + BS]
            h.shutdown()
        assert "truncated WRITE payload" in proc.log_path.read_text()


def test_refused_large_writes_keep_the_stream_in_step(disk, tmp_path):
    """A large WRITE refused (read-only, past the end (ENOSPC, as the spec says), past
    --overlay-max-size) still has its
    payload consumed: the error comes back and the next requests are understood."""
    backing = disk.read_bytes()
    payload = b"\x5a" * (2 * MiB)

    def check(c, cases):
        for i, (offset, count, error) in enumerate(cases):
            c.request(P.NBD_CMD_WRITE, offset, count, cookie=100 + i, payload=payload[:count])
            c.request(P.NBD_CMD_READ, 0, BS, cookie=200 + i)
            assert c.reply()[:2] == (100 + i, error), (offset, count)
            cookie, err, data = c.reply(BS)
            assert (cookie, err) == (200 + i, 0)
            return data

    with start_server(disk, "-r", tmp_path=tmp_path) as (uri, proc):
        with RawClient(proc.sock_path) as c:
            c.negotiate(structured=False)
            assert check(c, [(0, MiB, P.NBD_EPERM)]) == backing[:BS]
    with start_server(disk, "--overlay-max-size", "1M", tmp_path=tmp_path) as (uri, proc):
        with RawClient(proc.sock_path) as c:
            c.negotiate(structured=False)
            assert check(c, [(SIZE - BS, MiB, P.NBD_ENOSPC)]) == backing[:BS]
            assert check(c, [(BS, 2 * MiB, P.NBD_ENOSPC)]) == backing[:BS]
            assert check(c, [(0, 512 * 1024, 0)]) == payload[:BS]
        h = connect(uri)
        assert h.pread(2 * MiB + BS, 0) == payload[:512 * 1024] + backing[512 * 1024:2 * MiB + BS]
        h.shutdown()


def test_tls_writes_keep_the_copying_path(disk, tmp_path):
    from support_tls import make_pki, tls_handle

    pki = make_pki(tmp_path / "pki")
    with start_server(disk, "-v", "--tls=require", "--tls-certificates", pki.server,
                      tmp_path=tmp_path) as (uri, proc):
        h = tls_handle(pki.client)
        h.connect_unix(str(proc.sock_path))
        want = bytearray(disk.read_bytes())
        model_writes(h, want, 3, rounds=10)
        assert h.pread(SIZE, 0) == want
        h.shutdown()
        assert spliced(proc) == 0


def test_views_write_and_read_large_without_copies(disk, tmp_path):
    """Many views: large writes spliced into each view's own overlay, large reads sent from
    its files; each view sees its own data only, also after the server restarts."""
    views = tmp_path / "views"
    backing = disk.read_bytes()
    wants = {}
    with start_server(disk, "-v", "--overlay-dir", views, tmp_path=tmp_path) as (uri, proc):
        for i, name in enumerate(["a", "b", "c"]):
            h = connect(f"nbd+unix:///{name}?socket={proc.sock_path}")
            want = bytearray(backing)
            model_writes(h, want, 20 + i, rounds=12)
            h.flush()
            wants[name] = want
            h.shutdown()
        for name, want in wants.items():
            for structured in (True, False):
                h = connect(f"nbd+unix:///{name}?socket={proc.sock_path}", structured)
                for offset, count in READS:
                    assert h.pread(count, offset) == want[offset:offset + count], (name, offset)
                h.shutdown()
        assert spliced(proc) > 0
        log = proc.log_path.read_text()
        assert "sent from the files" in log
    with start_server(disk, "--overlay-dir", views, tmp_path=tmp_path) as (uri, proc):
        for name, want in wants.items():
            h = connect(f"nbd+unix:///{name}?socket={proc.sock_path}")
            assert h.pread(SIZE, 0) == want
            h.shutdown()


# ---- a spliced payload never leaves a sector half written ---------------------------------

SPLICE_SCRIPT = r"""
import os, socket, sys, threading
from cow.engine import Engine

backing, overlay = sys.argv[1:3]
eng = Engine(backing, overlay=overlay, block_size="64K")
# (offset, bytes given as the prefix, bytes in all, size of the pieces the client sends)
cases = [(0, 1000, 2 * 65536, 1001),                 # whole blocks: the prefix ends mid-sector
         (700, 300, 1536 * 1024 + 77, 1001),        # allocated blocks, over several pipes
         (5 * 65536 + 100, 200, 65536, 999)]
for offset, prefix, total, piece in cases:
    data = os.urandom(total)
    a, b = socket.socketpair()
    def send():
        for i in range(prefix, total, piece):
            a.sendall(data[i:i + piece])
    t = threading.Thread(target=send)
    t.start()
    eng.pwrite_from(b.fileno(), total, offset, data[:prefix])
    t.join()
    out = bytearray(total)
    eng.pread(out, offset)
    assert out == data, "data differs"
    os.write(1, b"---\n")                           # the end of one write in the trace
eng.close()
"""


def test_spliced_write_ends_each_system_call_on_a_sector_boundary(tmp_path):
    """Engine.pwrite_from writes a payload that starts in memory and goes on in pipes with
    several system calls.  A process killed between two of them (SIGKILL) keeps what the first
    wrote: so each must end on a 512-byte sector boundary, or a sector would be left half old,
    half new, which no disk does.  Checked on the system calls themselves, with strace."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(4 * MiB))
    overlay = tmp_path / "vm.cow"
    script = tmp_path / "splice.py"
    script.write_text(SPLICE_SCRIPT)
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=pwrite64,splice,write", "-o",
                    str(trace), sys.executable, "-P", str(script), str(backing), str(overlay)],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    groups = overlay_write_calls(trace.read_text(), "vm.cow")
    assert len(groups) == 3, trace.read_text()[-2000:]
    for i, group in enumerate(groups):
        assert len(group) > 1, f"write {i}: one system call only, nothing checked: {group}"
        torn = [(pos, n) for pos, _, n in group[:-1] if (pos + n) % 512]
        assert not torn, f"write {i}: calls that end inside a sector: {torn} of {group}"


def test_pwrite_from_gives_up_a_payload_that_stops_arriving(tmp_path):
    """Engine.pwrite_from with a timeout: half a 2 MiB payload, then silence.  TimeoutError after
    the timeout, nothing written, and the pipes that held the half are closed."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(os.urandom(4 * MiB))
    with Engine(str(backing)) as eng:
        fds = len(os.listdir("/proc/self/fd"))
        a, b = socket.socketpair()
        sender = threading.Thread(target=a.sendall, args=(b"\xee" * MiB,))
        sender.start()
        with pytest.raises(TimeoutError, match="nothing received for 0.5 s"):
            eng.pwrite_from(b.fileno(), 2 * MiB, 4096, timeout=0.5)
        sender.join(10)
        got = bytearray(2 * MiB)
        eng.pread(got, 4096)
        assert got == backing.read_bytes()[4096:4096 + 2 * MiB]
        a.close()
        b.close()
        eng.drop_idle_pipes()
        assert len(os.listdir("/proc/self/fd")) == fds
