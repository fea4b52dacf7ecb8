"""The cow engine inside real nbdkit (cow/nbdkit_plugin.py), driven by real NBD clients.

Cases follow nbdkit's own cow filter tests (test-cow-*.sh): an unaligned 130000-byte disk, extents
after trims and writes, cow-on-read (also the /PATH form), block sizes 4 KiB and 4 MiB, a 0-byte
backing; plus an NBD backing (uri=), nbdkit -r, --run, background mode and filters stacked on top.
Where nbdkit's C cow filter defines the answer, the same requests go to both and the answers are
compared.
"""

import errno
import json
import os
import random
import re
import shlex
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import nbd
import pytest

from conftest import PYTHON, sha256_file, write_sample
from support_reliability import CMD_READ, RawClient
from support_shim import (plugin_path, run_cow_filter, run_nbdkit_cmd, run_shim, shim_command,
                          wait_for_pidfile)

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def servers(tmp_path):
    """servers.shim(backing, *params, nbdkit_args=()) / servers.cow_filter(...) -> running nbdkit.
    After the test, each shim's stderr must hold no Python traceback unless the test allowed it."""

    class Servers:
        def __init__(self):
            self.stack = ExitStack()
            self.n = 0
            self.checked = []

        def _sock(self):
            self.n += 1
            return tmp_path / f"s{self.n}.sock"

        def shim(self, backing, *params, nbdkit_args=(), errors_expected=False, env=None):
            server = self.stack.enter_context(
                run_shim(backing, self._sock(), *params, nbdkit_args=nbdkit_args, env=env))
            if not errors_expected:
                self.checked.append(server)
            return server

        def cow_filter(self, backing, *params, nbdkit_args=()):
            return self.stack.enter_context(
                run_cow_filter(backing, self._sock(), *params, nbdkit_args=nbdkit_args))

        def nbdkit(self, *args):
            return self.stack.enter_context(
                run_nbdkit_cmd(["nbdkit", *map(str, args)], self._sock()))

    s = Servers()
    with s.stack:
        yield s
    for server in s.checked:
        text = server.stderr_text()
        errors = [line for line in text.splitlines() if "error" in line or "Traceback" in line]
        assert not errors, f"{server.cmd}:\n{text}"


@pytest.fixture
def connect():
    """connect(uri, meta=False) -> a connected python-libnbd handle (shut down after the test)."""
    handles = []

    def make(uri, meta=False):
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield make
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def nbdinfo_json(uri):
    out = subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["exports"][0]


def nbdinfo_map(uri):
    """[(offset, length, type)] from nbdinfo --map."""
    out = subprocess.run(["nbdinfo", "--map", uri], check=True, capture_output=True, text=True)
    rows = []
    for line in out.stdout.splitlines():
        fields = line.split()
        rows.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return rows


def block_status(h, count, offset, flags=0):
    """[(offset, length, type)] for one base:allocation block status request."""
    runs = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for i in range(0, len(entries), 2):
                runs.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return runs


def read_all(h, size, chunk=4 * MiB):
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def nbdcopy_out(uri, dest, *opts):
    subprocess.run(["nbdcopy", *opts, uri, str(dest)], check=True)
    return Path(dest).read_bytes()


def assert_extents_consistent(h, data, size):
    """Every extent flagged as zero must read as zeroes, and the extents tile the whole disk."""
    pos = 0
    while pos < size:
        runs = block_status(h, min(size - pos, 64 * MiB), pos)
        assert runs and runs[0][0] == pos
        for off, length, kind in runs:
            length = min(length, size - off)
            if kind & nbd.STATE_ZERO:
                assert data[off:off + length] == bytes(length), f"extent {off}+{length} not zero"
            pos = off + length
            if pos >= size:
                break


ALL_OPS = ("write", "write", "write", "zero", "trim", "cache", "read")


def apply_random_ops(h, model, rng, n_ops, block, ops=ALL_OPS):
    """Random writes, zeroes, trims and caches at any alignment, mirrored in the bytearray model."""
    size = len(model)
    for _ in range(n_ops):
        op = rng.choice(ops)
        if rng.random() < 0.5:
            off = rng.randrange(0, size)
            count = rng.randrange(1, min(3 * block, size - off) + 1)
        else:
            nblocks = max(1, size // block)
            b = rng.randrange(0, nblocks)
            off = b * block
            count = min(rng.randrange(1, 3) * block, size - off)
        if count <= 0:
            continue
        if op == "write":
            buf = rng.randbytes(count)
            h.pwrite(buf, off, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
            model[off:off + count] = buf
        elif op == "zero":
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
            if rng.random() < 0.3:
                flags |= nbd.CMD_FLAG_FAST_ZERO
            try:
                h.zero(count, off, flags)
            except nbd.Error as exc:
                # Fast zero may refuse (ENOTSUP) when it would need a backing read; then nothing
                # changed.
                assert flags & nbd.CMD_FLAG_FAST_ZERO and exc.errnum == errno.ENOTSUP, exc
            else:
                model[off:off + count] = bytes(count)
        elif op == "trim":
            # A trim promises little: the engine, like nbdkit's cow filter, drops the whole blocks
            # in the range (they read as zeroes) and may leave partial blocks as they were.
            h.trim(count, off)
            after = h.pread(count, off)
            first = min(max(-(-off // block) * block, off), off + count)
            last = max((off + count) // block * block, first)
            assert after[first - off:last - off] == bytes(last - first)
            for lo, hi in ((off, first), (last, off + count)):
                piece = after[lo - off:hi - off]
                assert piece in (bytes(model[lo:hi]), bytes(hi - lo)), f"trim {off}+{count}"
            model[off:off + count] = after
        elif op == "cache":
            h.cache(count, off)
        else:
            assert h.pread(count, off) == bytes(model[off:off + count])


# -- the plugin path and the launcher --------------------------------------------------------------

def test_print_plugin_path_is_the_shim_of_the_installed_package():
    # Installed editable (./dev setup), that is the source file; tests/test_editable_install.py
    # checks that nbdkit finds the compiled engine from there.
    path = Path(plugin_path())
    assert path.is_absolute() and path.is_file() and path.name == "nbdkit_plugin.py"
    origin = subprocess.run(
        [PYTHON, "-P", "-c", "import importlib.util as u; print(u.find_spec('cow.nbdkit_plugin').origin)"],
        check=True, capture_output=True, text=True).stdout.strip()
    assert Path(origin) == path


def test_shim_needs_no_pythonpath(servers, connect, backing_factory):
    """nbdkit runs the shim with a bare environment: no PYTHONPATH, no virtualenv on PATH."""
    backing = backing_factory(1 * MiB)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/root")}
    server = servers.shim(backing, env=env)
    h = connect(server.uri)
    assert h.pread(MiB, 0) == backing.read_bytes()


def test_launcher_runs_nbdkit_with_the_shim(tmp_path, backing_factory):
    backing = backing_factory(2 * MiB + 5)
    out = subprocess.run(
        [PYTHON, "-P", "-m", "cow.nbdkit", "-U", "-", str(backing), "cow-block-size=4K",
         "--run", 'nbdinfo --json "$uri"'],
        check=True, capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)["exports"][0]
    assert info["export-size"] == 2 * MiB + 5
    assert info["block_size_preferred"] == 4096
    assert info["is_read_only"] is False


def test_launcher_options_after_backing_and_uri_backing(tmp_path, servers, backing_factory):
    backing = backing_factory(1 * MiB)
    source = servers.nbdkit("-r", "file", backing)
    copy = tmp_path / "copy.img"
    subprocess.run(
        [PYTHON, "-P", "-m", "cow.nbdkit", source.uri, "-r", "--run", f'nbdcopy "$uri" {copy}',
         "-U", "-", "cow-on-read=false"],
        check=True, capture_output=True, timeout=60)
    assert copy.read_bytes() == backing.read_bytes()


def test_launcher_split_arguments():
    # Pure Python, no engine needed: the same code the installed launcher runs.
    from cow.nbdkit import UsageError, split_arguments

    assert split_arguments(["-fv", "-U", "/s", "disk.img", "cow-block-size=4K"]) == (
        ["-fv", "-U", "/s"], ["file=disk.img", "cow-block-size=4K"])
    assert split_arguments(["-U-", "nbd+unix:///?socket=/x", "--run", "nbdinfo $uri", "-r"]) == (
        ["-U-", "--run", "nbdinfo $uri", "-r"], ["uri=nbd+unix:///?socket=/x"])
    assert split_arguments(["--filter", "stats", "--filter=blocksize", "file=/a=b",
                            "statsfile=/tmp/x", "-e", "name"]) == (
        ["--filter", "stats", "--filter=blocksize", "-e", "name"], ["file=/a=b", "statsfile=/tmp/x"])
    assert split_arguments(["/tmp/a=b.img"]) == ([], ["file=/tmp/a=b.img"])
    # After "--" come the backing and parameters, as after cow.server's "--"; nothing there is
    # an nbdkit option, and a command (a second bare word) is refused, not run.
    assert split_arguments(["-U", "s", "--", "disk.img", "cow-block-size=4K"]) == (
        ["-U", "s"], ["file=disk.img", "cow-block-size=4K"])
    assert split_arguments(["-U", "s", "--", "-odd.img"]) == (["-U", "s"], ["file=-odd.img"])
    with pytest.raises(UsageError, match="backing command .*cow.server -- COMMAND"):
        split_arguments(["-U", "s", "--", "nbdkit", "curl", "http://example.com/disk.img"])
    with pytest.raises(UsageError):
        split_arguments(["-U", "/s"])
    with pytest.raises(UsageError):
        split_arguments(["a.img", "b.img"])
    with pytest.raises(UsageError):
        split_arguments(["a.img", "-U"])


def test_launcher_threads_default_by_backing_unless_given():
    from cow.nbdkit import DEFAULT_THREADS, PLUGIN_PATH, nbdkit_command

    def threads(argv):
        return [a for a in nbdkit_command(argv) if a.startswith("--threads=")]

    assert threads(["disk.img"]) == [f"--threads={DEFAULT_THREADS['file']}"]
    assert threads(["file=disk.img", "-r"]) == [f"--threads={DEFAULT_THREADS['file']}"]
    assert threads(["nbd+unix:///?socket=/s"]) == [f"--threads={DEFAULT_THREADS['uri']}"]
    # -U takes a value: "-t" here is the socket's name, not the threads option.
    assert threads(["-U", "-t", "disk.img"]) == [f"--threads={DEFAULT_THREADS['file']}"]
    for given in (["-t", "4"], ["-t4"], ["-ft4"], ["--threads", "4"], ["--threads=4"]):
        assert nbdkit_command([*given, "disk.img"]) == [
            "nbdkit", *given, "python", PLUGIN_PATH, "file=disk.img"]


@pytest.mark.parametrize("kind,given,expected", [
    ("file", [], None), ("uri", [], None), ("file", ["-t", "3"], 3), ("uri", ["--threads=2"], 2)])
def test_launcher_threads_reach_nbdkit(servers, backing_factory, kind, given, expected):
    from cow.nbdkit import DEFAULT_THREADS

    backing = backing_factory(1 * MiB)
    source = str(backing) if kind == "file" else servers.nbdkit("-r", "file", backing).uri
    expected = expected or DEFAULT_THREADS[kind]
    r = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "-v", "-U", "-", *given, source,
                        "--run", 'nbdinfo --size "$uri"'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(1 * MiB)
    # nbdkit -v names its worker threads per connection; with -t 1 it has none (inline).
    workers = re.findall(r"processing requests with (\d+) threads", r.stderr)
    assert workers == ([] if expected == 1 else [str(expected)]), r.stderr[-2000:]


def test_launcher_usage_errors():
    r = subprocess.run([PYTHON, "-P", "-m", "cow.nbdkit", "-f"], capture_output=True, text=True)
    assert r.returncode == 2 and "no BACKING" in r.stderr


# -- what the server advertises --------------------------------------------------------------------

# 4M is the largest block size (cow.overlayfile.MAX_BLOCK_SIZE), below nbdkit's largest preferred
# block size (32 MiB), which the shim's cap on it kept to while larger blocks were allowed.
@pytest.mark.parametrize("block_size,param", [(64 * KiB, None), (4 * KiB, "4K"), (4 * MiB, "4M")])
def test_advertised_flags_and_block_size(servers, connect, backing_factory, block_size, param):
    backing = backing_factory(3 * MiB + 100)
    params = [f"cow-block-size={param}"] if param else []
    server = servers.shim(backing, *params)
    info = nbdinfo_json(server.uri)
    assert info["export-size"] == 3 * MiB + 100
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                 "can_multi_conn"):
        assert info[flag] is True, flag
    assert info["is_read_only"] is False
    assert "base:allocation" in info["contexts"]
    assert (info["block_size_minimum"], info["block_size_preferred"],
            info["block_size_maximum"]) == (1, block_size, 64 * MiB)
    h = connect(server.uri)
    h.pwrite(b"w" * 5000, 1000)
    assert h.pread(7000, 0) == backing.read_bytes()[:1000] + b"w" * 5000 + backing.read_bytes()[6000:7000]


def test_advertised_maximum_is_the_largest_request_nbdkit_takes(tmp_path, servers, connect):
    """nbdkit refuses any read or write over 64 MiB itself (ENOMEM, before the plugin sees it),
    so the shim advertises 64 MiB: a client that keeps to the advertised maximum always gets
    through, and one request past it does not.  Requests without data may be longer."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(192 * MiB)
    server = servers.shim(disk, errors_expected=True)  # nbdkit logs the refused request
    assert nbdinfo_json(server.uri)["block_size_maximum"] == 64 * MiB

    h = connect(server.uri)
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    assert maximum == 64 * MiB
    data = random.Random(12).randbytes(maximum)
    h.pwrite(data, 3 * MiB)
    assert h.pread(maximum, 3 * MiB) == data
    h.zero(128 * MiB, 64 * MiB)  # past the maximum: no data, so nbdkit passes it on
    h.trim(96 * MiB, 96 * MiB)
    h.cache(192 * MiB, 0)
    assert h.pread(4 * MiB, 64 * MiB + 3 * MiB) == bytes(4 * MiB)

    # One byte more than advertised: refused by nbdkit, and the connection stays usable.
    with RawClient(server.sock) as raw:
        raw.handshake(structured=False)
        raw.request(CMD_READ, 0, maximum + 1, cookie=1)
        assert raw.reply(maximum + 1)[:2] == (1, errno.ENOMEM)
        raw.request(CMD_READ, 3 * MiB, 4096, cookie=2)
        assert raw.reply(4096)[:3] == (2, 0, data[:4096])


def test_thread_model_is_parallel(backing_factory):
    backing = backing_factory(64 * KiB)
    out = subprocess.run(["nbdkit", "python", plugin_path(), f"file={backing}", "--dump-plugin"],
                         check=True, capture_output=True, text=True).stdout
    assert "thread_model=parallel" in out.splitlines()


# -- start-up errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("params,needle", [
    ([], "file=PATH or uri="),
    (["file={b}", "uri=nbd://localhost"], "exactly one"),
    (["file=/nonexistent/disk.img"], "/nonexistent/disk.img"),
    (["file=/"], "file=/"),
    (["file={b}", "cow-block-size=3K"], "cow-block-size=3K"),
    (["file={b}", "cow-block-size=1K"], "cow-block-size=1K"),
    (["file={b}", "cow-block-size=lots"], "cow-block-size=lots"),
    (["file={b}", "cow-on-read=maybe"], "cow-on-read=maybe"),
    (["file={b}", "cow-on-read=relative/path"], "cow-on-read=relative/path"),
    (["file={b}", "cow-on-cache=sometimes"], "cow-on-cache=sometimes"),
    (["file={b}", "cow-size=4K"], "cow-size=4K"),
    (["uri=http://example.com/disk"], "uri=http://example.com/disk"),
])
def test_bad_parameters_fail_with_one_error_line(tmp_path, backing_factory, params, needle):
    backing = backing_factory(64 * KiB)
    params = [p.format(b=backing) for p in params]
    r = subprocess.run(["nbdkit", "-f", "-U", str(tmp_path / "s.sock"), "python", plugin_path(),
                        *params], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr                # no blank line after it either
    assert lines[0].startswith("nbdkit: error:") and needle in lines[0], r.stderr
    assert "Error: " not in lines[0]                # the message, not the exception's type
    assert not (tmp_path / "s.sock").exists()


def test_unreachable_nbd_backing_fails_at_start_up(tmp_path):
    r = subprocess.run(["nbdkit", "-f", "-U", str(tmp_path / "s.sock"), "python", plugin_path(),
                        f"uri=nbd+unix:///?socket={tmp_path}/nothing.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing.sock" in lines[0], r.stderr


# -- data ------------------------------------------------------------------------------------------

def test_reads_match_backing_nbdcopy_and_libnbd(tmp_path, servers, connect, backing_factory):
    size = 5 * MiB + 12345
    backing = backing_factory(size)
    server = servers.shim(backing)
    data = backing.read_bytes()
    assert nbdcopy_out(server.uri, tmp_path / "out.img") == data
    h = connect(server.uri)
    assert h.get_size() == size
    rng = random.Random(1)
    for _ in range(200):
        off = rng.randrange(size)
        count = rng.randrange(1, min(300 * KiB, size - off) + 1)
        assert h.pread(count, off) == data[off:off + count]


def test_unaligned_130000_byte_disk(servers, connect, backing_factory):
    # nbdkit tests/test-cow-unaligned.sh: a size that is no multiple of the block size.
    backing = backing_factory(130000)
    server = servers.shim(backing, "cow-block-size=4K")
    h = connect(server.uri)
    assert h.get_size() == 130000
    buf = b"abcdefghijklm" * 10000
    h.pwrite(buf, 0)
    assert h.pread(130000, 0) == buf
    # The last, partial block on its own, then a read from a second connection.
    h.pwrite(b"Z" * 1000, 129000)
    assert connect(server.uri).pread(2000, 128000) == buf[128000:129000] + b"Z" * 1000


def test_zero_byte_backing(tmp_path, servers, connect):
    # nbdkit tests/test-cow-null.sh (cow on the null plugin): qemu-img info on an empty disk.
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    server = servers.shim(empty)
    assert nbdinfo_json(server.uri)["export-size"] == 0
    assert connect(server.uri).get_size() == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", server.uri],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 0
    subprocess.run(["nbdinfo", "--map", server.uri], check=True, capture_output=True)
    assert empty.stat().st_size == 0


@pytest.mark.parametrize("block_param,block", [("4K", 4 * KiB), ("64K", 64 * KiB), ("4M", 4 * MiB)])
def test_random_operations_match_a_model(tmp_path, servers, connect, backing_factory,
                                         block_param, block):
    # nbdkit tests/test-cow-block-size.sh uses 4M; here every operation is checked byte for byte.
    size = 3 * block + 3 * MiB + 777 if block == 4 * MiB else 40 * block + 777
    backing = backing_factory(size)
    server = servers.shim(backing, f"cow-block-size={block_param}")
    h = connect(server.uri, meta=True)
    model = bytearray(backing.read_bytes())
    rng = random.Random(block)
    apply_random_ops(h, model, rng, 150, block)
    h.flush()
    assert read_all(h, size) == model
    assert nbdcopy_out(server.uri, tmp_path / "out.img") == model
    assert_extents_consistent(h, model, size)


def test_extents_after_trims_and_writes_match_nbdkit_cow_filter(tmp_path, servers, connect):
    # nbdkit tests/test-cow-extents1.sh: a base file half allocated, half sparse.
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.write(random.Random(7).randbytes(128 * KiB))
        f.truncate(4 * MiB)
    digest = sha256_file(base)
    ours = servers.shim(base)
    theirs = servers.cow_filter(base)

    assert nbdinfo_map(ours.uri) == nbdinfo_map(theirs.uri) == [(0, 131072, 0), (131072, 4063232, 3)]

    bs = 65536
    for uri in (ours.uri, theirs.uri):
        h = connect(uri)
        h.trim(bs, bs)
        h.trim(bs + 2, 4 * bs - 1)
        h.pwrite(b"1" * bs, 16 * bs)
        h.trim(2 * bs, 32 * bs)
        h.pwrite(b"2" * (2 * bs), 48 * bs)

    expected = [(0, 65536, 0), (65536, 131072, 3), (196608, 65536, 0), (262144, 65536, 3),
                (327680, 65536, 0), (393216, 655360, 3), (1048576, 65536, 0),
                (1114112, 2031616, 3), (3145728, 131072, 0), (3276800, 917504, 3)]
    assert nbdinfo_map(theirs.uri) == expected
    assert nbdinfo_map(ours.uri) == expected
    assert (nbdcopy_out(ours.uri, tmp_path / "ours.img")
            == nbdcopy_out(theirs.uri, tmp_path / "theirs.img"))
    assert sha256_file(base) == digest


@pytest.mark.parametrize("size", [3 * 1024 * MiB, 4 * 1024 * MiB, 4 * 1024 * MiB + 4096,
                                  8 * 1024 * MiB])
def test_extents_of_large_sparse_disks(tmp_path, servers, size):
    # nbdkit tests/test-cow-extents-large.sh: an overflow in cow_extents past 4 GiB.
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(size)
        f.seek(size - 4096)
        f.write(b"E" * 4096)
    runs = nbdinfo_map(servers.shim(disk).uri)
    assert runs[0][0] == 0 and runs[-1][0] + runs[-1][1] == size
    assert all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert runs[-1][2] == 0 and all(kind == 3 for _, _, kind in runs[:-1])
    assert runs[-1][1] <= 64 * KiB  # the one data block, not the whole disk


def test_req_one_extents(servers, connect, backing_factory):
    backing = backing_factory(1 * MiB)  # 64 KiB pieces: data, data, hole, ...
    h = connect(servers.shim(backing).uri, meta=True)
    runs = block_status(h, 1 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(runs) == 1 and runs[0][0] == 0 and runs[0][2] == 0
    runs = block_status(h, 512 * KiB, 2 * 65536 + 100, nbd.CMD_FLAG_REQ_ONE)
    assert len(runs) == 1 and runs[0][2] & nbd.STATE_HOLE


def test_same_requests_same_answers_as_nbdkit_cow_filter(tmp_path, servers, connect,
                                                         backing_factory):
    size = 2 * MiB + 4321
    backing = backing_factory(size)
    ours = connect(servers.shim(backing).uri)
    theirs = connect(servers.cow_filter(backing).uri)
    for h in (ours, theirs):
        rng = random.Random(42)
        model = bytearray(backing.read_bytes())
        # nbdkit 1.32's cow filter does not offer zero (can_zero is false).
        apply_random_ops(h, model, rng, 120, 64 * KiB, ops=("write", "trim", "cache", "read"))
    assert read_all(ours, size) == read_all(theirs, size)


# -- cow-on-read and cow-on-cache --------------------------------------------------------------------
# The only way to see from a client whether a read copied data up: change the backing behind the
# server's back afterwards.  Blocks copied up keep the old data; others show the new data.

def overwrite(path, pattern):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(bytes([pattern]) * size)


def test_cow_on_read_default_nbdkit_case(servers, connect, tmp_path):
    # nbdkit tests/test-cow-on-read.sh (on a 128K zero disk).
    disk = tmp_path / "zero.img"
    with open(disk, "wb") as f:
        f.truncate(128 * KiB)
    h = connect(servers.shim(disk, "cow-on-read=true").uri)
    buf = b"abcd" * 16384
    h.pwrite(buf, 32768)
    assert h.pread(32768, 0) == bytes(32768)
    assert h.pread(65536, 32768) == buf


@pytest.mark.parametrize("mode", ["false", "true", "path"])
def test_cow_on_read(tmp_path, servers, connect, mode):
    disk = write_sample(tmp_path / "disk.img", 512 * KiB, pattern=0x11, holes=False)
    switch = tmp_path / "cow-on-read-switch"
    param = f"cow-on-read={switch}" if mode == "path" else f"cow-on-read={mode}"
    h = connect(servers.shim(disk, param, "cow-block-size=4K").uri)
    if mode == "path":
        assert h.pread(8 * KiB, 0) == b"\x11" * 8 * KiB     # switch absent: no copy-up
        switch.touch()
        assert h.pread(8 * KiB, 64 * KiB) == b"\x11" * 8 * KiB  # switch present: copied up
        switch.unlink()
        assert h.pread(8 * KiB, 128 * KiB) == b"\x11" * 8 * KiB  # absent again
        overwrite(disk, 0x22)
        assert h.pread(8 * KiB, 0) == b"\x22" * 8 * KiB
        assert h.pread(8 * KiB, 64 * KiB) == b"\x11" * 8 * KiB
        assert h.pread(8 * KiB, 128 * KiB) == b"\x22" * 8 * KiB
        return
    # An unaligned read copies up every block it touches.
    assert h.pread(10000, 1000) == b"\x11" * 10000
    overwrite(disk, 0x22)
    kept = b"\x11" if mode == "true" else b"\x22"
    assert h.pread(12 * KiB, 0) == kept * 12 * KiB
    assert h.pread(4 * KiB, 12 * KiB) == b"\x22" * 4 * KiB  # never read before


@pytest.mark.parametrize("cow_on_cache", ["false", "true"])
def test_cow_on_cache(tmp_path, servers, connect, cow_on_cache):
    disk = write_sample(tmp_path / "disk.img", 256 * KiB, pattern=0x33, holes=False)
    h = connect(servers.shim(disk, f"cow-on-cache={cow_on_cache}", "cow-block-size=4K").uri)
    h.cache(5000, 4096)  # blocks 1 and 2
    overwrite(disk, 0x44)
    kept = b"\x33" if cow_on_cache == "true" else b"\x44"
    assert h.pread(8 * KiB, 4 * KiB) == kept * 8 * KiB
    assert h.pread(4 * KiB, 0) == b"\x44" * 4 * KiB


# -- zero flags and errors --------------------------------------------------------------------------

def test_fast_zero_reaches_client_as_enotsup(servers, connect, backing_factory):
    backing = backing_factory(1 * MiB)
    data = backing.read_bytes()
    h = connect(servers.shim(backing, "cow-block-size=64K").uri, meta=True)
    # Part of a block not yet in the overlay: zeroing it needs a backing read, so not fast.
    with pytest.raises(nbd.Error) as info:
        h.zero(1000, 100, nbd.CMD_FLAG_FAST_ZERO)
    assert info.value.errnum == errno.ENOTSUP
    assert h.pread(2000, 0) == data[:2000]  # nothing changed
    # Without the fast flag the same request works.
    h.zero(1000, 100)
    assert h.pread(2000, 0) == data[:100] + bytes(1000) + data[1100:2000]
    # Whole blocks, with and without may-trim (NO_HOLE), with FUA.
    h.zero(128 * KiB, 256 * KiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    h.zero(128 * KiB, 512 * KiB)
    h.trim(64 * KiB, 768 * KiB, nbd.CMD_FLAG_FUA)
    assert h.pread(128 * KiB, 256 * KiB) == bytes(128 * KiB)
    assert h.pread(128 * KiB, 512 * KiB) == bytes(128 * KiB)
    assert h.pread(64 * KiB, 768 * KiB) == bytes(64 * KiB)
    # NO_HOLE (may-trim off) keeps allocated zeroes; a plain zero may drop the blocks.
    assert [kind for _, _, kind in block_status(h, 128 * KiB, 256 * KiB)] == [0]
    assert [kind for _, _, kind in block_status(h, 128 * KiB, 512 * KiB)] == [
        nbd.STATE_HOLE | nbd.STATE_ZERO]


def test_backing_errors_reach_client_and_server_recovers(tmp_path, servers, connect,
                                                         backing_factory):
    """A failing NBD backing: the engine reports EIO (the backing's fault, whatever its errno); the
    shim passes it on, and the same connection works again once the backing does."""
    backing = backing_factory(1 * MiB)
    inject = tmp_path / "inject"
    source = servers.nbdkit("-r", "--filter=error", "file", backing, "error=EPERM",
                            "error-pread-rate=100%", f"error-pread-file={inject}")
    h = connect(servers.shim(source.uri, errors_expected=True).uri)
    assert h.pread(4096, 0) == backing.read_bytes()[:4096]
    inject.touch()
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, 128 * KiB)
    assert info.value.errnum == errno.EIO
    inject.unlink()
    assert h.pread(4096, 128 * KiB) == backing.read_bytes()[128 * KiB:132 * KiB]


# -- backings, options and stacking -----------------------------------------------------------------

def test_nbd_backing_via_uri(tmp_path, servers, connect, backing_factory):
    size = 3 * MiB + 999
    backing = backing_factory(size)
    source = servers.nbdkit("-r", "file", backing)
    server = servers.shim(source.uri, "cow-block-size=4K")
    h = connect(server.uri, meta=True)
    model = bytearray(backing.read_bytes())
    apply_random_ops(h, model, random.Random(3), 100, 4 * KiB)
    assert read_all(h, size) == model
    assert_extents_consistent(h, model, size)
    # The NBD source still serves the original data.
    assert read_all(connect(source.uri), size) == backing.read_bytes()


def test_readonly(servers, connect, backing_factory):
    backing = backing_factory(256 * KiB)
    server = servers.shim(backing, nbdkit_args=["-r"])
    assert nbdinfo_json(server.uri)["is_read_only"] is True
    h = connect(server.uri)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    assert h.pread(256 * KiB, 0) == backing.read_bytes()


def test_run_with_nbdcopy(tmp_path, backing_factory):
    backing = backing_factory(3 * MiB + 1)
    out = tmp_path / "out.img"
    cmd = shim_command(backing, nbdkit_args=["-U", "-"])
    cmd += ["--run", f'nbdcopy "$uri" {shlex.quote(str(out))}']
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == backing.read_bytes()


def test_stats_filter_on_top(tmp_path, servers, connect, backing_factory):
    backing = backing_factory(1 * MiB)
    stats = tmp_path / "stats.txt"
    server = servers.shim(backing, f"statsfile={stats}", nbdkit_args=["--filter=stats"])
    h = connect(server.uri)
    h.pwrite(b"s" * 65536, 0)
    assert h.pread(65536, 0) == b"s" * 65536
    h.shutdown()
    server.stop()
    text = stats.read_text()
    assert "read:" in text and "write:" in text, text


def test_blocksize_filter_on_top(servers, connect, backing_factory):
    # blocksize splits large requests into 4 KiB ones and widens small ones to 512-byte units.
    backing = backing_factory(1 * MiB)
    server = servers.shim(backing, "minblock=512", "maxdata=4096", nbdkit_args=["--filter=blocksize"])
    h = connect(server.uri)
    model = bytearray(backing.read_bytes())
    buf = random.Random(5).randbytes(100000)
    h.pwrite(buf, 12345)
    model[12345:12345 + len(buf)] = buf
    h.zero(70000, 300001)
    model[300001:370001] = bytes(70000)
    assert h.pread(1 * MiB, 0) == model


def test_tls_psk(tmp_path, servers, backing_factory):
    """nbdkit does TLS for the shim: --tls=require with a pre-shared key, and a libnbd nbds+unix
    client using that key."""
    backing = backing_factory(1 * MiB)
    psk = tmp_path / "keys.psk"
    psk.write_text(f"alice:{random.Random(11).randbytes(32).hex()}\n")
    server = servers.shim(backing, nbdkit_args=["--tls=require", f"--tls-psk={psk}"])
    sock = server.sock
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(psk))
    h.set_tls_username("alice")
    h.connect_unix(str(sock))
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"T" * 4096, 8192)
        assert h.pread(16384, 4096) == (backing.read_bytes()[4096:8192] + b"T" * 4096
                                        + backing.read_bytes()[12288:20480])
    finally:
        h.shutdown()
    plain = nbd.NBD()
    with pytest.raises(nbd.Error):  # no TLS: refused
        plain.connect_unix(str(sock))


def test_background_mode_with_pidfile(tmp_path, servers, connect, backing_factory):
    """Without -f nbdkit forks into the background after start-up; the engine made before the
    fork must keep working in the child, for a file (given relative to nbdkit's working
    directory; the child changes directory to /) and for an NBD backing."""
    backing = backing_factory(1 * MiB)
    source = servers.nbdkit("-r", "file", backing)
    for name, back in (("file", backing.name), ("nbd", source.uri)):
        sock, pidfile = tmp_path / f"bg-{name}.sock", tmp_path / f"bg-{name}.pid"
        subprocess.run(shim_command(back, nbdkit_args=["-U", sock, "-P", pidfile]),
                       check=True, timeout=60, cwd=tmp_path)
        pid = wait_for_pidfile(pidfile)
        try:
            h = connect(f"nbd+unix:///?socket={sock}")
            h.pwrite(b"B" * 5000, 70000)
            assert h.pread(80000, 0) == (backing.read_bytes()[:70000] + b"B" * 5000
                                         + backing.read_bytes()[75000:80000])
            h.shutdown()
        finally:
            os.kill(pid, 15)
            for _ in range(500):  # until it is gone or a zombie (reaped by init, not by us)
                try:
                    if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                        break
                except FileNotFoundError:
                    break
                time.sleep(0.02)


# -- connections share one overlay --------------------------------------------------------------------

def test_connections_share_one_overlay(servers, connect, backing_factory):
    backing = backing_factory(1 * MiB)
    server = servers.shim(backing)
    a, b = connect(server.uri), connect(server.uri)
    a.pwrite(b"A" * 3000, 100000)
    a.flush()
    assert b.pread(3000, 100000) == b"A" * 3000
    b.trim(65536, 65536 * 4)
    assert a.pread(65536, 65536 * 4) == bytes(65536)


def test_parallel_writes_from_many_connections(tmp_path, servers, backing_factory):
    """nbdcopy with 4 connections x 16 requests in flight writes a whole image through the shim."""
    size = 24 * MiB + 4096
    backing = backing_factory(size)
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(9).randbytes(size))
    server = servers.shim(backing, "cow-block-size=4K")
    subprocess.run(["nbdcopy", "--connections=4", "--requests=16", "--request-size=262144",
                    str(source), server.uri], check=True)
    assert nbdcopy_out(server.uri, tmp_path / "out.img", "--connections=4") == source.read_bytes()


def test_qemu_io_writes_and_qemu_img_diff(tmp_path, servers, backing_factory):
    """The diff recipe from nbdkit-cow-filter(1): qemu-img create on the NBD export, then rebase
    onto the original; the qcow2 then reads the same as the live overlay."""
    backing = backing_factory(4 * MiB)
    server = servers.shim(backing)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1000 70000",
                    "-c", "write -z 2M 128k", "-c", "discard 3M 64k", server.uri],
                   check=True, capture_output=True)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(backing), server.uri],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr  # 1: the images differ
    diff = tmp_path / "diff.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", server.uri,
                    str(diff)], check=True)
    subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing),
                    str(diff)], check=True)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(diff), server.uri],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
