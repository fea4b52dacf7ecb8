"""python -m cow.server with python3-libnbd: data, flags, errors, multi-conn, concurrency."""

import errno
import os
import signal
import struct
import threading
import time

import nbd
import pytest

from support_hold import held  # noqa: F401 - a fixture
from support_server import start_server

SIZE = 4 * 1024 * 1024


def connect(uri, strict=True, structured=True, contexts=()):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def read_file(path, offset, count):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def errnum(fn, *args, **kw):
    with pytest.raises(nbd.Error) as e:
        fn(*args, **kw)
    return e.value.errnum


@pytest.fixture
def disk(backing_factory):
    return backing_factory(SIZE)


@pytest.fixture
def server(disk, tmp_path):
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        yield uri


@pytest.mark.parametrize("structured", [True, False])
def test_reads_match_the_backing_and_writes_go_to_the_overlay(disk, server, structured):
    h = connect(server, structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_size() == SIZE
    for offset, count in [(0, 512), (65536 * 2 - 100, 300), (SIZE - 4096, 4096), (12345, 1 << 20)]:
        assert h.pread(count, offset) == read_file(disk, offset, count)
    h.pwrite(b"\xab" * 5000, 70000)
    h.pwrite(b"\xcd" * 3, SIZE - 3, nbd.CMD_FLAG_FUA)
    expect = bytearray(read_file(disk, 65536, 65536 * 2))
    expect[70000 - 65536:75000 - 65536] = b"\xab" * 5000
    assert h.pread(65536 * 2, 65536) == bytes(expect)
    assert h.pread(3, SIZE - 3) == b"\xcd" * 3
    h.flush()
    h.shutdown()


def test_flags_and_block_size(server):
    h = connect(server)
    assert not h.is_read_only()
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_df,
                h.can_cache, h.can_multi_conn):
        assert can(), can.__name__
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 65536
    assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 64 * 1024 * 1024
    h.shutdown()


def test_trim_zero_cache(disk, server):
    h = connect(server)
    h.trim(100000, 10)
    assert h.pread(100000, 10) == bytes(100000)
    assert h.pread(10, 0) == read_file(disk, 0, 10)
    assert h.pread(10, 100010) == read_file(disk, 100010, 10)
    h.zero(5000, 300000)
    h.zero(65536, 65536 * 8, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(5000, 300000) == bytes(5000)
    assert h.pread(65536, 65536 * 8) == bytes(65536)
    h.zero(65536, 65536 * 16, nbd.CMD_FLAG_FAST_ZERO)  # whole block: fast
    assert h.pread(65536, 65536 * 16) == bytes(65536)
    h.cache(SIZE, 0)
    assert h.pread(4096, 65536 * 20) == read_file(disk, 65536 * 20, 4096)
    h.shutdown()


def test_fast_zero_that_is_not_fast_is_enotsup(disk, server):
    h = connect(server)
    # An unaligned piece of a block still in the backing would need a backing read.
    assert errnum(h.zero, 100, 65536 * 30 + 10, nbd.CMD_FLAG_FAST_ZERO) == errno.ENOTSUP
    assert h.pread(4096, 65536 * 30) == read_file(disk, 65536 * 30, 4096)
    h.shutdown()


def extents(h, count, offset, context=nbd.CONTEXT_BASE_ALLOCATION, flags=0):
    out = []

    def cb(meta, off, entries, err):
        if meta == context:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, cb, flags)
    return out


def test_block_status_base_allocation_and_allocation_depth(disk, server):
    h = connect(server, contexts=[nbd.CONTEXT_BASE_ALLOCATION, "qemu:allocation-depth"])
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.can_meta_context("qemu:allocation-depth")
    # The backing has a hole in every third 64 KiB piece.
    ext = extents(h, SIZE, 0)
    assert sum(n for n, _ in ext) <= SIZE and ext[0] == (2 * 65536, 0)
    assert ext[1] == (65536, nbd.STATE_HOLE | nbd.STATE_ZERO)
    depth = extents(h, SIZE, 0, "qemu:allocation-depth")
    assert depth == [(SIZE, 2)]
    h.pwrite(b"x" * 10, 65536 * 2 + 5)  # into the first hole: that block is copied up
    h.trim(65536, 65536 * 5)
    ext = extents(h, SIZE, 0)
    assert ext[:3] == [(3 * 65536, 0), (2 * 65536, 0), (65536, 3)] or \
        ext[:2] == [(5 * 65536, 0), (65536, 3)]
    depth = extents(h, 65536 * 8, 0, "qemu:allocation-depth")
    assert depth == [(65536 * 2, 2), (65536, 1), (65536 * 2, 2), (65536, 1), (65536 * 2, 2)]
    one = extents(h, 65536 * 8, 0, "qemu:allocation-depth", nbd.CMD_FLAG_REQ_ONE)
    assert one == [(65536 * 2, 2)]
    one = extents(h, 1000, 65536 * 2 + 100, flags=nbd.CMD_FLAG_REQ_ONE)
    assert one == [(1000, 0)]
    h.shutdown()


def test_block_status_without_context_is_einval(server):
    h = connect(server, strict=False)
    assert errnum(extents, h, 4096, 0) == errno.EINVAL
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_out_of_range_and_bad_requests(server, structured):
    h = connect(server, strict=False, structured=structured,
                contexts=[nbd.CONTEXT_BASE_ALLOCATION] if structured else [])
    assert errnum(h.pread, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.pwrite, b"xx", SIZE - 1) == errno.ENOSPC
    assert errnum(h.trim, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.zero, 2, SIZE - 1) == errno.ENOSPC
    assert errnum(h.cache, 2, SIZE - 1) == errno.EINVAL
    if structured:
        assert errnum(extents, h, 2, SIZE - 1) == errno.EINVAL
    assert errnum(h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE) == errno.EINVAL
    assert errnum(h.pwrite, b"x", 0, nbd.CMD_FLAG_REQ_ONE) == errno.EINVAL
    if not structured:
        assert errnum(h.pread, 512, 0, nbd.CMD_FLAG_DF) == errno.EINVAL
    # The connection is still in step after all of those.
    assert len(h.pread(512, 0)) == 512
    h.shutdown()


def test_read_only(disk, tmp_path):
    with start_server(disk, "-r", tmp_path=tmp_path) as (uri, proc):
        h = connect(uri, strict=False)
        assert h.is_read_only() and not h.can_trim() and not h.can_zero()
        assert errnum(h.pwrite, b"x", 0) == errno.EPERM
        assert errnum(h.trim, 512, 0) == errno.EPERM
        assert errnum(h.zero, 512, 0) == errno.EPERM
        assert h.pread(512, 0) == read_file(disk, 0, 512)
        h.flush()
        h.shutdown()


def test_export_name(disk, tmp_path):
    with start_server(disk, "-e", "my disk", tmp_path=tmp_path) as (uri, proc):
        assert uri.endswith(f"/my%20disk?socket={proc.sock_path}")
        h = connect(uri)
        assert h.get_export_name() == "my disk"
        assert h.pread(16, 0) == read_file(disk, 0, 16)
        h.shutdown()
        h = nbd.NBD()
        h.set_export_name("other")
        with pytest.raises(nbd.Error):
            h.connect_unix(str(proc.sock_path))
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(str(proc.sock_path))
        names = []
        h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
        assert names == [("my disk", "copy-on-write view")]  # never the backing (issue 18)
        h.opt_abort()


def test_multi_conn_write_on_one_read_on_another(disk, server):
    handles = [connect(server) for _ in range(4)]
    for i, h in enumerate(handles):
        h.pwrite(bytes([i + 1]) * 4096, i * 65536 + 100)
    handles[0].flush()
    for i in range(4):
        for h in handles:
            assert h.pread(4096, i * 65536 + 100) == bytes([i + 1]) * 4096
    for h in handles:
        h.shutdown()


def test_many_requests_in_flight_on_one_connection(disk, server):
    """aio: 64 writes then 64 reads in flight at once, each read back right."""
    h = connect(server)
    bufs = []
    for i in range(64):
        buf = nbd.Buffer.from_bytearray(bytearray([i]) * 3000)
        bufs.append(buf)
        h.aio_pwrite(buf, i * 3001)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads = []
    for i in range(64):
        b = nbd.Buffer(3000)
        reads.append((i, b, h.aio_pread(b, i * 3001)))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, b, cookie in reads:
        assert h.aio_command_completed(cookie)
        assert b.to_bytearray() == bytearray([i]) * 3000
    h.shutdown()


def test_parallel_connections_in_threads(disk, server):
    """Four threads, each on its own connection, write their own pattern into interleaved
    512-byte pieces of the same blocks; every piece reads back as written."""
    errors = []

    def worker(k):
        try:
            h = connect(server)
            for i in range(200):
                h.pwrite(bytes([k + 1]) * 512, (i * 4 + k) * 512)
            h.shutdown()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    h = connect(server)
    data = h.pread(800 * 512, 0)
    for j in range(800):
        assert data[j * 512:(j + 1) * 512] == bytes([j % 4 + 1]) * 512
    h.shutdown()


def test_nbd_backing_uses_read_workers(backing_factory, nbdkit, tmp_path):
    disk = backing_factory(SIZE)
    backing_uri = nbdkit("--filter=delay", "file", disk, "rdelay=10ms")
    with start_server(backing_uri, "-v", tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        # 32 reads in flight: with 4 workers per connection they overlap on the delay.
        bufs = []
        for i in range(32):
            b = nbd.Buffer(65536)
            bufs.append((i, b, h.aio_pread(b, i * 65536)))
        h.pwrite(b"new" * 100, 10)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for i, b, cookie in bufs:
            assert h.aio_command_completed(cookie)
            want = bytearray(read_file(disk, i * 65536, 65536))
            got = b.to_bytearray()
            if i == 0:  # the write may land before or after this read: compare the rest
                got[10:310] = want[10:310]
            assert got == want
        assert h.pread(300, 10) == b"new" * 100
        h.shutdown()
    log = proc.log_path.read_text()
    assert "READ offset=" in log and "WRITE offset=10 count=300" in log


def test_raw_structured_read_over_holes(disk, server):
    """A structured READ over the backing's holes comes as OFFSET_DATA and OFFSET_HOLE chunks
    (a hole chunk is an offset and a length, no data); RawClient.reply puts them together by
    offset into what the backing holds, as libnbd does."""
    from support_server import RawClient
    from cow import protocol as P
    sock_path = server.split("socket=")[1]
    offset, count = 65536 + 4096, 6 * 65536            # pieces 1..7: holes in 2 and 5
    with RawClient(sock_path) as c:
        c.negotiate(structured=True)
        c.request(P.NBD_CMD_READ, offset, count, cookie=9)
        assert c.reply(count, offset) == (9, 0, read_file(disk, offset, count))
        kinds = [rtype for _, rtype, _ in c.chunks]
        assert P.NBD_REPLY_TYPE_OFFSET_HOLE in kinds and P.NBD_REPLY_TYPE_OFFSET_DATA in kinds, \
            kinds
    h = connect(server)
    assert h.pread(count, offset) == read_file(disk, offset, count)
    h.shutdown()


def test_disc_finishes_requests_in_flight(disk, server, tmp_path):
    """Writes sent right before NBD_CMD_DISC are all done and answered before the close."""
    from support_server import RawClient
    from cow import protocol as P
    sock_path = server.split("socket=")[1]
    with RawClient(sock_path) as c:
        c.negotiate(structured=False)
        batch = b"".join(P.pack_request(P.NBD_CMD_WRITE, i * 4096, 4096, cookie=i)
                         + bytes([i]) * 4096 for i in range(1, 30))
        c.send(batch + P.pack_request(P.NBD_CMD_DISC))
        cookies = set()
        for _ in range(1, 30):
            cookie, error, _ = c.reply()
            assert error == 0
            cookies.add(cookie)
        assert cookies == set(range(1, 30))
        assert c.is_closed()
    h = connect(server)
    for i in range(1, 30):
        assert h.pread(4096, i * 4096) == bytes([i]) * 4096
    h.shutdown()


def test_sample_disk_when_no_backing(tmp_path):
    with start_server(None, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri, contexts=[nbd.CONTEXT_BASE_ALLOCATION])
        assert h.get_size() == 64 * 1024 * 1024
        assert h.pread(512, 0).startswith(b"cow sample disk, sector 0")
        assert h.pread(512, 2 * 1024 * 1024) == bytes(512)
        kinds = {t for _, t in extents(h, h.get_size(), 0)}
        assert 0 in kinds and (nbd.STATE_HOLE | nbd.STATE_ZERO) in kinds
        h.shutdown()
    assert "no BACKING given" in proc.log_path.read_text()


def test_overlay_max_size_gives_enospc(disk, tmp_path):
    with start_server(disk, "--overlay-max-size", "256K", "--cow-block-size", "64K",
                      tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        for i in range(4):
            h.pwrite(b"y" * 65536, i * 65536)
        assert errnum(h.pwrite, b"z" * 65536, 10 * 65536) == errno.ENOSPC
        assert h.pread(65536, 0) == b"y" * 65536
        h.shutdown()


def test_statuses_of_engine_options_reach_the_engine(disk, tmp_path):
    """--cow-block-size shows up as the preferred block size; --lock-mode global serves."""
    with start_server(disk, "--cow-block-size", "4K", "--lock-mode", "global", "--cow-on-read",
                      "true", "--cow-on-cache", "true", "--tmpdir", tmp_path,
                      tmp_path=tmp_path) as (uri, proc):
        h = connect(uri, contexts=["qemu:allocation-depth"])
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        h.pread(4096, 8192)  # cow-on-read: the block is copied up
        assert extents(h, 4096, 8192, "qemu:allocation-depth") == [(4096, 1)]
        h.cache(4096, 65536)  # cow-on-cache too
        assert extents(h, 4096, 65536, "qemu:allocation-depth") == [(4096, 1)]
        h.shutdown()


def test_write_is_seen_on_an_unaligned_tail_disk(backing_factory, tmp_path):
    disk = backing_factory(130000)
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        assert h.get_size() == 130000
        h.pwrite(b"q" * 1000, 129000)
        assert h.pread(1000, 129000) == b"q" * 1000
        h.trim(130000, 0)
        assert h.pread(130000, 0) == bytes(130000)
        h.shutdown()


def test_pidfile_and_verbose_log(disk, tmp_path):
    pidfile = tmp_path / "cow.pid"
    with start_server(disk, "-P", pidfile, "-v", tmp_path=tmp_path) as (uri, proc):
        assert int(pidfile.read_text()) == proc.pid
        h = connect(uri)
        h.pread(512, 4096)
        h.shutdown()
    assert not pidfile.exists()
    log = proc.log_path.read_text()
    assert "READ offset=4096 count=512 flags=0x0 -> OK" in log


def test_sigterm_with_a_connection_open(disk, tmp_path):
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        h.pwrite(b"x" * 4096, 0)
        # start_server's exit sends SIGTERM and checks: exit 0, socket removed.
    with pytest.raises(nbd.Error):
        h.pread(512, 0)


def test_sigint_stops_cleanly(disk, tmp_path):
    import signal
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        connect(uri).pread(512, 0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not os.path.exists(proc.sock_path)



def wait_for_text(path, text, timeout=30.0):
    """Wait until a log file contains text (a wait for an event, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.01)


def test_shutdown_completes_requests_in_flight_and_answers_later_ones_eshutdown(
        backing_factory, held, tmp_path):
    """At SIGTERM a READ in flight (its NBD backing holds it until the test releases it) still
    completes; requests that arrive after shutdown began are answered NBD_ESHUTDOWN without
    waiting for it (they come while it is still held); the client then disconnects and the
    server exits 0.  NBD orders no replies: the two ESHUTDOWN ones are compared as a set."""
    from support_server import RawClient
    from cow import protocol as P
    disk = backing_factory(SIZE)
    back = held("file", disk)
    with start_server(back.uri, "-v", tmp_path=tmp_path) as (uri, proc):
        with RawClient(proc.sock_path) as c:
            c.negotiate(structured=True)
            back.hold()
            c.request(P.NBD_CMD_READ, 65536, 4096, cookie=1)
            back.wait_for(r" Read id=\d+ offset=0x10000 ")   # the READ is in flight, held
            proc.send_signal(signal.SIGTERM)
            wait_for_text(proc.log_path, "shutting down")
            c.request(P.NBD_CMD_WRITE, 8192, 512, cookie=2, payload=b"\x77" * 512)
            c.request(P.NBD_CMD_FLUSH, cookie=3)
            early = [c.reply() for _ in range(2)]            # the READ cannot answer yet
            assert {(cookie, error) for cookie, error, _ in early} == {
                (2, P.NBD_ESHUTDOWN), (3, P.NBD_ESHUTDOWN)}, early
            assert back.pending(), "the backing read was not held"
            back.release()
            assert c.reply(4096) == (1, 0, read_file(disk, 65536, 4096))
            try:
                c.request(P.NBD_CMD_DISC)
            except OSError:
                pass  # the server may have hung up already: nothing is in flight any more
            assert c.is_closed()
        assert proc.wait(30) == 0


def test_shutdown_answers_options_err_shutdown(disk, tmp_path):
    """A client still in option haggling at SIGTERM is told why: its next option gets
    NBD_REP_ERR_SHUTDOWN (libnbd reports ESHUTDOWN), and it can still abort cleanly."""
    with start_server(disk, "-v", tmp_path=tmp_path) as (uri, proc):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(uri)
        proc.send_signal(signal.SIGTERM)
        wait_for_text(proc.log_path, "shutting down")
        assert errnum(h.opt_info) == errno.ESHUTDOWN  # libnbd's reading of ERR_SHUTDOWN
        h.opt_abort()
        assert proc.wait(30) == 0

def test_struct_sizes_used_by_raw_clients():
    from cow import protocol as P
    assert len(P.pack_request(P.NBD_CMD_READ)) == P.REQUEST_SIZE == struct.calcsize(">IHHQQI")


def test_large_requests_in_flight_go_through_workers(backing_factory, tmp_path):
    """Large READ/WRITE are served by the connection's workers: many in flight, out of order
    replies, every byte where it belongs.

    The writes in flight never overlap one another: NBD orders nothing between requests in
    flight, so overlapping ones could land in any order.  The reads are sent only once every
    write has been answered."""
    size = 8 * 1024 * 1024
    disk = backing_factory(size)
    sizes = [128 * 1024, 1 << 20, 200000, (3 << 20) // 2, 65536 * 3 + 1]
    offset = 0
    layout = []
    for i in range(12):
        n = sizes[i % len(sizes)]
        layout.append((offset, bytes([i + 1]) * n))
        offset += n + 4096
    assert offset <= size  # laid end to end with gaps: no two writes share a byte
    with start_server(disk, tmp_path=tmp_path) as (uri, proc):
        h = connect(uri)
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                   for off, data in layout]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        expect = bytearray(read_file(disk, 0, size))
        for off, data in layout:
            expect[off:off + len(data)] = data
        reads = []
        for off in range(0, size, 1 << 20):
            b = nbd.Buffer(1 << 20)
            reads.append((off, b, h.aio_pread(b, off)))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for off, b, c in reads:
            assert h.aio_command_completed(c)
            assert b.to_bytearray() == expect[off:off + (1 << 20)]
        h.shutdown()


def test_disc_waits_for_large_writes_in_workers(disk, server):
    from support_server import RawClient
    from cow import protocol as P
    sock_path = server.split("socket=")[1]
    n = 512 * 1024
    with RawClient(sock_path) as c:
        c.negotiate(structured=True)
        for i in range(6):
            c.request(P.NBD_CMD_WRITE, i * n, n, cookie=i + 1, payload=bytes([0x40 + i]) * n)
        c.request(P.NBD_CMD_DISC)
        got = {c.reply()[:2] for _ in range(6)}
        assert got == {(i + 1, 0) for i in range(6)}
        assert c.is_closed()
    h = connect(server)
    for i in range(6):
        assert h.pread(n, i * n) == bytes([0x40 + i]) * n
    h.shutdown()


def test_errno_mapping():
    from cow import protocol as P
    from cow.server.errors import nbd_error_from_errno as m
    assert m(errno.EPERM) == m(errno.EROFS) == P.NBD_EPERM
    assert m(errno.ENOSPC) == m(errno.EFBIG) == m(errno.EDQUOT) == P.NBD_ENOSPC
    assert m(errno.ENOTSUP) == m(errno.EOPNOTSUPP) == P.NBD_ENOTSUP
    assert m(errno.EINVAL) == P.NBD_EINVAL and m(errno.ENOMEM) == P.NBD_ENOMEM
    assert m(errno.EOVERFLOW) == P.NBD_EOVERFLOW and m(errno.ESHUTDOWN) == P.NBD_ESHUTDOWN
    assert m(errno.EIO) == m(errno.ENOENT) == m(errno.EBADF) == m(None) == P.NBD_EIO

