"""TLS as nbdkit and qemu-nbd do it: --tls=off|on|require, --tls-certificates DIR,
--tls-verify-peer, STARTTLS in the handshake; --tls-psk where Python's ssl has PSK.

Clients are real: libnbd (python3-libnbd, nbdinfo, nbdcopy) and qemu-img with
``--object tls-creds-x509``.  Certificates are made per test session with GnuTLS certtool.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from support_reliability import (
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, EINVAL, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, PYTHON, REP_ACK,
    REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD, RawClient, run_server,
    run_tcp_server,
)
from support_tls import make_pki, make_psk_file, tls_handle

COW_SRC = Path(__file__).resolve().parent.parent / "cow"
SIZE = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def disk(backing_factory):
    path = backing_factory(SIZE)
    return path, path.read_bytes()


def _connect_fails(h, sock):
    with pytest.raises(nbd.Error):
        h.connect_unix(str(sock))


# ---------------------------------------------------------------- X.509 with real clients


def test_require_with_libnbd(pki, disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        h = tls_handle(pki.client)
        h.connect_unix(str(srv.sock))
        assert h.get_size() == SIZE
        assert h.pread(65536, 65536) == backing[65536:131072]
        h.pwrite(b"over tls" * 512, 4096)
        assert h.pread(4096, 4096) == b"over tls" * 512
        h.shutdown()
        # A client without TLS gets nowhere.
        _connect_fails(nbd.NBD(), srv.sock)
        plain = nbd.NBD()
        plain.set_tls(nbd.TLS_DISABLE)
        _connect_fails(plain, srv.sock)
        # nbdinfo and nbdcopy with nbds+unix URIs.
        uri = f"nbds+unix:///?socket={srv.sock}&tls-certificates={pki.client}"
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
        assert r.returncode == 0 and int(r.stdout) == SIZE, r.stderr
        out = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", uri, str(out)], check=True)
        want = bytearray(backing)
        want[4096:8192] = b"over tls" * 512
        assert out.read_bytes() == want
        r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={srv.sock}"],
                           capture_output=True, text=True)
        assert r.returncode != 0


def _qemu_img(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def test_require_with_qemu_img(pki, disk, tmp_path):
    path, backing = disk
    creds = f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client"
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        opts = (f"driver=nbd,server.type=unix,server.path={srv.sock},tls-creds=tls0,"
                "tls-hostname=localhost")
        r = _qemu_img("info", "--object", creds, "--image-opts", opts)
        assert r.returncode == 0 and f"({SIZE} bytes)" in r.stdout, r.stderr
        out = tmp_path / "out.raw"
        r = _qemu_img("convert", "--object", creds, "--image-opts", opts, "-O", "raw", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == backing
        r = _qemu_img("info", f"nbd+unix:///?socket={srv.sock}")          # no TLS
        assert r.returncode != 0


def test_require_over_tcp_with_qemu_img_and_libnbd(pki, disk, tmp_path):
    """Over TCP the certificate is checked against the address (IP SAN 127.0.0.1)."""
    path, backing = disk
    creds = f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client"
    with run_tcp_server(tmp_path, path, "--tls=require", "--tls-certificates",
                        pki.server) as (srv, port):
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
        r = _qemu_img("compare", "--object", creds, "--image-opts", opts,
                      f"driver=raw,file.driver=file,file.filename={path}")
        assert r.returncode == 0, r.stdout + r.stderr
        h = tls_handle(pki.client)
        h.connect_tcp("127.0.0.1", str(port))
        assert h.pread(512, 0) == backing[:512]
        h.shutdown()
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(f"nbd://127.0.0.1:{port}/")


def test_tls_with_large_requests_and_an_nbd_backing(pki, backing_factory, nbdkit, tmp_path):
    """Large READ/WRITE and an NBD backing would use worker threads; under TLS all of a
    connection stays on one thread.  Many requests in flight, replies checked."""
    path = backing_factory(8 * 1024 * 1024)
    backing = path.read_bytes()
    uri = nbdkit("file", path)
    with run_server(tmp_path, uri, "--tls=require", "--tls-certificates", pki.server) as srv:
        h = tls_handle(pki.client)
        h.connect_unix(str(srv.sock))
        big = os.urandom(1024 * 1024)
        h.pwrite(big, 3 * 1024 * 1024)
        bufs = [nbd.Buffer(512 * 1024) for _ in range(12)]
        for i, b in enumerate(bufs):
            h.aio_pread(b, i * 512 * 1024)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        want = bytearray(backing)
        want[3 * 1024 * 1024:4 * 1024 * 1024] = big
        got = b"".join(b.to_bytearray() for b in bufs)
        assert got == want[:len(got)]
        assert h.pread(4096, 3 * 1024 * 1024 + 4096) == big[4096:8192]
        h.shutdown()
        assert "Traceback" not in srv.stderr()


def test_tls_on_lets_the_client_choose(pki, disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--tls=on", "--tls-certificates", pki.server) as srv:
        plain = nbd.NBD()
        plain.set_tls(nbd.TLS_DISABLE)
        plain.connect_unix(str(srv.sock))
        assert not plain.get_tls_negotiated()
        plain.pwrite(b"plain", 0)
        secure = tls_handle(pki.client)
        secure.connect_unix(str(srv.sock))
        assert secure.get_tls_negotiated()
        assert secure.pread(5, 0) == b"plain"                  # one overlay for both
        allow = tls_handle(pki.client, nbd.TLS_ALLOW)
        allow.connect_unix(str(srv.sock))
        assert allow.get_tls_negotiated()
        for h in (plain, secure, allow):
            h.shutdown()


def test_tls_off_refuses_starttls(disk, tmp_path):
    path, _ = disk
    with run_server(tmp_path, path) as srv:
        _connect_fails(tls_handle(), srv.sock)
        c = RawClient(srv.sock)
        c.greeting()
        c.client_flags()
        c.option(OPT_STARTTLS)
        assert c.option_replies(OPT_STARTTLS)[-1][0] == REP_ERR_POLICY
        c.option(OPT_ABORT)
        c.close()


def test_verify_peer(pki, disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server,
                    "--tls-verify-peer") as srv:
        h = tls_handle(pki.client)                      # certificate signed by our CA
        h.connect_unix(str(srv.sock))
        assert h.pread(100, 0) == backing[:100]
        h.shutdown()
        _connect_fails(tls_handle(pki.anon), srv.sock)  # no client certificate
        _connect_fails(tls_handle(pki.rogue), srv.sock)  # signed by another CA
        creds = f"tls-creds-x509,id=tls0,dir={pki.anon},endpoint=client"
        r = _qemu_img("info", "--object", creds, "--image-opts",
                      f"driver=nbd,server.type=unix,server.path={srv.sock},tls-creds=tls0,"
                      "tls-hostname=localhost")
        assert r.returncode != 0
        h = tls_handle(pki.client)                      # refusals did not hurt the server
        h.connect_unix(str(srv.sock))
        assert h.pread(100, 0) == backing[:100]
        h.shutdown()


def test_client_that_does_not_trust_the_server(pki, disk, tmp_path):
    """A client whose CA did not sign our certificate refuses us (libnbd checks the server only
    when it has a host name, so over TCP; qemu-img always, given tls-hostname)."""
    path, backing = disk
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    shutil.copyfile(pki.root / "work" / "otherca-cert.pem", stranger / "ca-cert.pem")
    with run_tcp_server(tmp_path, path, "--tls=require", "--tls-certificates",
                        pki.server) as (srv, port):
        h = tls_handle(stranger)
        with pytest.raises(nbd.Error):
            h.connect_tcp("127.0.0.1", str(port))
        h = tls_handle(pki.anon)                        # trusts the CA: fine
        h.connect_tcp("127.0.0.1", str(port))
        assert h.pread(64, 0) == backing[:64]
        h.shutdown()
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        creds = f"tls-creds-x509,id=tls0,dir={stranger},endpoint=client"
        r = _qemu_img("info", "--object", creds, "--image-opts",
                      f"driver=nbd,server.type=unix,server.path={srv.sock},tls-creds=tls0,"
                      "tls-hostname=localhost")
        assert r.returncode != 0


# ---------------------------------------------------------------- the handshake, byte by byte


def _raw_tls(pki_client: Path, c: RawClient) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki_client / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki_client / "client-cert.pem"), str(pki_client / "client-key.pem"))
    return ctx.wrap_socket(c.sock, server_hostname="localhost")


def test_require_allows_nothing_but_starttls_and_abort(pki, disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        # Every option but STARTTLS and ABORT: one TLS_REQD reply each, nothing else.
        c = RawClient(srv.sock)
        c.greeting()
        c.client_flags()
        for opt, data in [(OPT_LIST, b""), (OPT_INFO, RawClient.info_data()),
                          (OPT_GO, RawClient.info_data()), (OPT_STRUCTURED_REPLY, b""),
                          (OPT_SET_META_CONTEXT, RawClient.meta_data(b"", (b"base:allocation",))),
                          (77, b""), (99, b"xyz")]:
            c.option(opt, data)
            replies = c.option_replies(opt)
            assert len(replies) == 1 and replies[0][0] == REP_ERR_TLS_REQD, replies
        c.option(OPT_EXPORT_NAME, b"")                  # cannot be refused: connection closed
        assert c.at_eof()
        c.close()
        c = RawClient(srv.sock)                         # ABORT is allowed
        c.greeting()
        c.client_flags()
        c.option(OPT_ABORT)
        assert c.at_eof()
        c.close()
        # STARTTLS, then the handshake goes on inside TLS.
        c = RawClient(srv.sock)
        c.greeting()
        c.client_flags()
        c.option(OPT_STARTTLS)
        assert c.option_replies(OPT_STARTTLS) == [(REP_ACK, b"")]
        c.sock = _raw_tls(pki.client, c)
        c.option(OPT_STARTTLS)                          # a second STARTTLS is invalid
        assert c.option_replies(OPT_STARTTLS)[-1][0] == REP_ERR_INVALID
        c.option(OPT_GO, RawClient.info_data())
        c.option_replies(OPT_GO)
        err, data, _ = c.call(CMD_READ, 4096, 512)
        assert err == 0 and data == backing[4096:4608]
        c.disconnect()


def test_options_before_starttls_are_forgotten(pki, disk, tmp_path):
    """With --tls=on a client may negotiate in plain text first; STARTTLS wipes that state
    (structured replies, meta contexts) as the spec requires."""
    path, _ = disk
    with run_server(tmp_path, path, "--tls=on", "--tls-certificates", pki.server) as srv:
        c = RawClient(srv.sock)
        c.greeting()
        c.client_flags()
        c.option(OPT_STRUCTURED_REPLY)
        assert c.option_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        c.option(OPT_SET_META_CONTEXT, RawClient.meta_data(b"", (b"base:allocation",)))
        assert c.option_replies(OPT_SET_META_CONTEXT)[-1][0] == REP_ACK
        c.option(OPT_STARTTLS)
        assert c.option_replies(OPT_STARTTLS) == [(REP_ACK, b"")]
        c.sock = _raw_tls(pki.client, c)
        c.option(OPT_GO, RawClient.info_data())
        c.option_replies(OPT_GO)
        c.request(CMD_BLOCK_STATUS, 0, 4096)            # no context any more: EINVAL ...
        (magic,) = struct.unpack(">I", c.recv_exact(4))
        assert magic == 0x67446698                      # ... in a simple reply
        err, cookie = struct.unpack(">IQ", c.recv_exact(12))
        assert err == EINVAL
        c.disconnect()



def _tls_client_in_transmission(pki, srv, backing):
    """A raw client through STARTTLS and GO, one READ done; its TLS socket reports an end of
    stream without close_notify as an error (as OpenSSL clients do: Python's context ignores
    it by default, and its sockets suppress it)."""
    c = RawClient(srv.sock)
    c.greeting()
    c.client_flags()
    c.option(OPT_STARTTLS)
    assert c.option_replies(OPT_STARTTLS) == [(REP_ACK, b"")]
    ctx = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki.client / "client-cert.pem"), str(pki.client / "client-key.pem"))
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost", suppress_ragged_eofs=False)
    c.option(OPT_GO, RawClient.info_data())
    c.option_replies(OPT_GO)
    err, data, _ = c.call(CMD_READ, 0, 512)
    assert err == 0 and data == backing[:512]
    return c


def test_disc_and_shutdown_end_the_tls_session_with_close_notify(pki, disk, tmp_path):
    """The spec: on NBD_CMD_DISC the server MUST close down the TLS session, then the TCP
    connection (and SHOULD when it hangs up itself, as at shutdown).  A read that meets
    close_notify returns b""; a bare end of stream raises SSLError (unexpected EOF)."""
    path, backing = disk
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        c = _tls_client_in_transmission(pki, srv, backing)
        c.request(CMD_DISC)
        assert c.sock.recv(1) == b""
        c.close()
        c = _tls_client_in_transmission(pki, srv, backing)
        srv.proc.send_signal(signal.SIGTERM)                 # shutdown with the client idle
        assert c.sock.recv(1) == b""
        c.close()
        assert srv.proc.wait(60) == 0

def test_starttls_garbage_instead_of_a_tls_hello(pki, disk, tmp_path):
    path, backing = disk
    with run_server(tmp_path, path, "--tls=require", "--tls-certificates", pki.server) as srv:
        for junk in (b"", b"\x16\x03\x01\x00", b"not tls at all" * 100, os.urandom(4096)):
            c = RawClient(srv.sock)
            c.greeting()
            c.client_flags()
            c.option(OPT_STARTTLS)
            c.option_replies(OPT_STARTTLS)
            try:
                c.send(junk)
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            assert c.at_eof()
            c.close()
        h = tls_handle(pki.client)
        h.connect_unix(str(srv.sock))
        assert h.pread(10, 0) == backing[:10]
        h.shutdown()
        assert srv.alive()


# ---------------------------------------------------------------- configuration errors


def _start_fails(tmp_path, backing, *args):
    r = subprocess.run([PYTHON, "-P", "-m", "cow.server", str(backing), "-U",
                        str(tmp_path / "never.sock"), *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_tls_configurations_are_one_clear_line(pki, disk, tmp_path):
    path, _ = disk
    assert "--tls-certificates" in _start_fails(tmp_path, path, "--tls=require")
    assert "not a directory" in _start_fails(tmp_path, path, "--tls=on", "--tls-certificates",
                                             tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copyfile(pki.server / "server-cert.pem", broken / "server-cert.pem")
    assert "server-key.pem" in _start_fails(tmp_path, path, "--tls=on", "--tls-certificates",
                                            broken)
    (broken / "server-key.pem").write_text("not a key\n")
    assert "server-key.pem" in _start_fails(tmp_path, path, "--tls=on", "--tls-certificates",
                                            broken)
    noca = tmp_path / "noca"
    noca.mkdir()
    for f in ("server-cert.pem", "server-key.pem"):
        shutil.copyfile(pki.server / f, noca / f)
    assert "ca-cert.pem" in _start_fails(tmp_path, path, "--tls=on", "--tls-certificates", noca,
                                         "--tls-verify-peer")
    assert "--tls" in _start_fails(tmp_path, path, "--tls=maybe")
    psk = tmp_path / "keys.psk"
    make_psk_file(psk)
    assert "together" in _start_fails(tmp_path, path, "--tls-certificates", pki.server,
                                      "--tls-psk", psk)


def test_tls_module_psk_file_parsing(tmp_path):
    from cow import tls
    f = tmp_path / "k.psk"
    f.write_text("# comment\n\nalice:00ff10\nbob:" + "ab" * 32 + "\n")
    assert tls.load_psk_file(str(f)) == {"alice": b"\x00\xff\x10", "bob": b"\xab" * 32}
    for bad in ("alice\n", "alice:xyz\n", ":0011\n", "alice:001\n", "a:00\na:11\n", "\n"):
        f.write_text(bad)
        with pytest.raises(tls.TLSConfigError):
            tls.load_psk_file(str(f))
    with pytest.raises(tls.TLSConfigError):
        tls.load_psk_file(str(tmp_path / "missing"))


# ---------------------------------------------------------------- TLS-PSK


def _psk_supported():
    from cow import tls
    return tls.psk_supported()


@pytest.mark.skipif(_psk_supported(), reason="this Python has TLS-PSK: the test below runs")
def test_psk_needs_python_3_13(disk, tmp_path):
    psk = tmp_path / "keys.psk"
    make_psk_file(psk)
    line = _start_fails(tmp_path, disk[0], "--tls=require", "--tls-psk", psk)
    assert "Python 3.13" in line


@pytest.mark.skipif(not _psk_supported(), reason="TLS-PSK needs Python 3.13+ (this is "
                    f"{sys.version_info.major}.{sys.version_info.minor}); the error is tested")
def test_psk_with_libnbd(disk, tmp_path):
    path, backing = disk
    psk = tmp_path / "keys.psk"
    make_psk_file(psk, "alice")
    with run_server(tmp_path, path, "--tls=require", "--tls-psk", psk) as srv:
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(psk))
        h.set_tls_username("alice")
        h.connect_unix(str(srv.sock))
        assert h.pread(100, 0) == backing[:100]
        h.shutdown()
        wrong = tmp_path / "wrong.psk"
        make_psk_file(wrong, "alice")
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(wrong))
        h.set_tls_username("alice")
        _connect_fails(h, srv.sock)


def _newer_python():
    """A Python >= 3.13 on this machine (PATH or pyenv), to run cow/tls.py's PSK path."""
    names = [f"python3.{m}" for m in range(13, 30)]
    found = [shutil.which(n) for n in names]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for exe in found:
        if not exe:
            continue
        r = subprocess.run([exe, "-c", "import ssl, sys; print(sys.version_info >= (3, 13) and "
                            "getattr(ssl, 'HAS_PSK', False))"], capture_output=True, text=True)
        if r.stdout.strip() == "True":
            return exe
    return None


_PSK_SERVER = """
import socket, sys
sys.path.insert(0, sys.argv[1])
import tls
settings = tls.server_settings(None, psk_file=sys.argv[2])
assert settings.mode == "on" and settings.kind == "psk"
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
for _ in range(2):
    conn, _ = listener.accept()
    try:
        s = settings.context.wrap_socket(conn, server_side=True)
        s.sendall(b"psk ok " + s.version().encode() + b"\\n")
        s.close()
        print("handshake ok", flush=True)
    except Exception as e:
        print("handshake failed", type(e).__name__, flush=True)
        conn.close()
"""


def test_psk_context_with_a_gnutls_client(tmp_path):
    """cow/tls.py's PSK context, under a Python that has PSK, against GnuTLS (libnbd's TLS
    library): the right key gets in, a wrong one does not."""
    exe = _newer_python()
    if exe is None:
        pytest.skip("no Python >= 3.13 with ssl.HAS_PSK on this machine")
    if shutil.which("gnutls-cli") is None:
        pytest.skip("gnutls-cli (gnutls-bin) is needed as the PSK client")
    psk = tmp_path / "keys.psk"
    key = make_psk_file(psk, "alice")
    srv = subprocess.Popen([exe, "-c", _PSK_SERVER, str(COW_SRC), str(psk)],
                           stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        outcomes = []
        for k in (key, bytes(32)):
            r = subprocess.run(["gnutls-cli", "--priority", "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK",
                                "--pskusername", "alice", "--pskkey", k.hex(), "-p", str(port),
                                "127.0.0.1"], input="", capture_output=True, text=True,
                               timeout=60)
            outcomes.append(srv.stdout.readline().strip())
        assert outcomes == ["handshake ok", "handshake failed SSLError"], outcomes
    finally:
        srv.kill()
        srv.wait()


# ---------------------------------------------------------------- the state machine, bytes only


def _opt(option, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, option, len(data)), data


def _send(conn, option, data=b""):
    from cow import protocol as P

    head, data = _opt(option, data)
    out = conn.receive(head)
    if data and out.action is P.Action.CONTINUE and conn.next_read_size() == len(data):
        out = conn.receive(data)
    return out


def test_protocol_tls_modes():
    from cow import protocol as P

    export = P.Export(size=1 << 20)
    # off: STARTTLS is refused by policy and the haggling goes on.
    conn = P.ServerConnection(export)
    conn.receive(struct.pack(">I", 3))
    out = _send(conn, OPT_STARTTLS)
    assert out.action is P.Action.CONTINUE
    assert struct.unpack(">QIII", out.data[:20])[2] == REP_ERR_POLICY
    # on: STARTTLS is acknowledged with the STARTTLS action; state before it is wiped.
    conn = P.ServerConnection(export, tls="on")
    conn.receive(struct.pack(">I", 3))
    _send(conn, OPT_STRUCTURED_REPLY)
    assert conn.structured_replies
    out = _send(conn, OPT_STARTTLS)
    assert out.action is P.Action.STARTTLS
    assert struct.unpack(">QIII", out.data)[2] == REP_ACK
    conn.tls_started()
    assert conn.tls_active and not conn.structured_replies
    out = _send(conn, OPT_STARTTLS)                     # twice: invalid, goes on
    assert out.action is P.Action.CONTINUE
    assert struct.unpack(">QIII", out.data[:20])[2] == REP_ERR_INVALID
    out = _send(conn, OPT_GO, struct.pack(">IH", 0, 0))
    assert out.action is P.Action.TRANSMISSION
    # require: EXPORT_NAME before TLS closes; STARTTLS with data is malformed.
    conn = P.ServerConnection(export, tls="require")
    conn.receive(struct.pack(">I", 3))
    out = _send(conn, OPT_STARTTLS, b"x")
    assert struct.unpack(">QIII", out.data[:20])[2] == REP_ERR_INVALID
    out = _send(conn, OPT_EXPORT_NAME, b"")
    assert out.action is P.Action.CLOSE
    with pytest.raises(ValueError):
        P.ServerConnection(export, tls="sometimes")
