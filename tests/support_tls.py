"""Test certificates and PSK files, generated at test time with GnuTLS certtool / psktool.

``make_pki(root)`` writes, as nbdkit-tls(1) describes them:

    root/server/   ca-cert.pem server-cert.pem server-key.pem   (the server's --tls-certificates)
    root/client/   ca-cert.pem client-cert.pem client-key.pem   (libnbd / qemu client dir)
    root/anon/     ca-cert.pem                                  (a client without a certificate)
    root/rogue/    ca-cert.pem client-cert.pem client-key.pem   (client cert from another CA)

The server certificate names localhost and 127.0.0.1 (libnbd checks the host name it
connected to; over a Unix socket it uses "localhost" ... or no check, see the tests).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nbd

CERTTOOL = "certtool"


def _run(*args: str) -> None:
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")


def _privkey(path: Path) -> Path:
    _run(CERTTOOL, "--generate-privkey", "--key-type=ecdsa", "--outfile", str(path))
    os.chmod(path, 0o600)
    return path


def _template(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key = _privkey(work / f"{name}-key.pem")
    info = _template(work / f"{name}.info", [f"cn = cow test CA {name}", "ca", "cert_signing_key",
                                             "expiration_days = 30"])
    cert = work / f"{name}-cert.pem"
    _run(CERTTOOL, "--generate-self-signed", "--load-privkey", str(key), "--template", str(info),
         "--outfile", str(cert))
    return cert, key


def _issue(work: Path, name: str, ca: tuple[Path, Path], template: list[str]) -> tuple[Path, Path]:
    key = _privkey(work / f"{name}-key.pem")
    info = _template(work / f"{name}.info", template + ["expiration_days = 30"])
    cert = work / f"{name}-cert.pem"
    _run(CERTTOOL, "--generate-certificate", "--load-ca-certificate", str(ca[0]),
         "--load-ca-privkey", str(ca[1]), "--load-privkey", str(key), "--template", str(info),
         "--outfile", str(cert))
    return cert, key


@dataclass(frozen=True)
class PKI:
    root: Path
    server: Path  # --tls-certificates for our server (and for nbdkit/qemu-nbd)
    client: Path  # client dir with a certificate signed by the CA
    anon: Path  # client dir with only the CA (no client certificate)
    rogue: Path  # client dir whose client certificate comes from another CA


def make_pki(root: Path) -> PKI:
    root = Path(root)
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other_ca = _ca(work, "otherca")
    server = _issue(work, "server", ca, [
        "organization = cow tests", "cn = localhost", "dns_name = localhost",
        "ip_address = 127.0.0.1", "tls_www_server", "encryption_key", "signing_key"])
    client = _issue(work, "client", ca, [
        "organization = cow tests", "cn = client.cow.test", "tls_www_client", "encryption_key",
        "signing_key"])
    rogue = _issue(work, "rogue", other_ca, [
        "organization = not us", "cn = rogue.cow.test", "tls_www_client", "encryption_key",
        "signing_key"])

    dirs = {}
    for name, files in {
        "server": {"ca-cert.pem": ca[0], "server-cert.pem": server[0], "server-key.pem": server[1]},
        "client": {"ca-cert.pem": ca[0], "client-cert.pem": client[0], "client-key.pem": client[1]},
        "anon": {"ca-cert.pem": ca[0]},
        "rogue": {"ca-cert.pem": ca[0], "client-cert.pem": rogue[0], "client-key.pem": rogue[1]},
    }.items():
        d = root / name
        d.mkdir(mode=0o700)
        for dst, src in files.items():
            shutil.copyfile(src, d / dst)
            os.chmod(d / dst, 0o600 if dst.endswith("-key.pem") else 0o644)
        dirs[name] = d
    return PKI(root, dirs["server"], dirs["client"], dirs["anon"], dirs["rogue"])


def make_psk_file(path: Path, username: str = "alice", key: bytes | None = None) -> bytes:
    """A psktool-format file ``username:hexkey`` (written directly: psktool asks no questions
    but needs no help here either).  Returns the key."""
    key = secrets.token_bytes(32) if key is None else key
    Path(path).write_text(f"{username}:{key.hex()}\n")
    os.chmod(path, 0o600)
    return key


def tls_handle(pki_dir: Path | None = None, tls: int = nbd.TLS_REQUIRE) -> nbd.NBD:
    """A libnbd handle set for TLS, with the client certificates in pki_dir (if given)."""
    h = nbd.NBD()
    h.set_tls(tls)
    if pki_dir is not None:
        h.set_tls_certificates(str(pki_dir))
    return h
