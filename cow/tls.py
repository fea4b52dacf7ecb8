"""TLS for the NBD server: the server's ``ssl.SSLContext``, as nbdkit and qemu-nbd configure it.

Two ways to authenticate, as in nbdkit (``nbdkit-tls(1)``):

* X.509 certificates from a directory (``--tls-certificates DIR``) laid out as nbdkit and
  qemu-nbd expect it::

      DIR/ca-cert.pem       the CA certificate (needed to check client certificates)
      DIR/server-cert.pem   the server certificate (its chain may follow in the same file)
      DIR/server-key.pem    the server private key
      DIR/ca-crl.pem        optional: revoked client certificates

  With ``verify_peer`` (``--tls-verify-peer``) a client must present a certificate signed by
  that CA (and not revoked); without it no client certificate is asked for.

* Pre-shared keys (``--tls-psk FILE``), the file written by GnuTLS ``psktool``: one
  ``username:hexkey`` per line.  Python's ``ssl`` module offers PSK from Python 3.13 on;
  on older versions :func:`server_context` says so in one clear error.

This module knows nothing of NBD or sockets beyond building the context; the server wraps a
connection's socket with it when the client sends NBD_OPT_STARTTLS.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
from dataclasses import dataclass

TLS_MODES = ("off", "on", "require")

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

_PSK_USERNAME = re.compile(r"[^:\s]+")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class TLSConfigError(Exception):
    """The TLS options or files cannot make a working server context (message for humans)."""


def psk_supported() -> bool:
    """True when this Python's ssl module can serve TLS-PSK (3.13+ built with PSK)."""
    return bool(getattr(ssl, "HAS_PSK", False)) and hasattr(ssl.SSLContext,
                                                             "set_psk_server_callback")


def load_psk_file(path: str) -> dict[str, bytes]:
    """Read a psktool file: ``username:hexkey`` lines -> {username: key bytes}.

    Blank lines and lines starting with '#' are skipped; anything else that is not
    ``name:hex`` is an error naming the line (the key itself is never echoed).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TLSConfigError(f"--tls-psk {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TLSConfigError(f"--tls-psk {path}: not a text file") from None
    keys: dict[str, bytes] = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hexkey = line.partition(":")
        if not sep or not _PSK_USERNAME.fullmatch(username) or not _HEX.fullmatch(hexkey):
            raise TLSConfigError(f"--tls-psk {path}: line {lineno} is not 'username:hexkey'")
        if username in keys:
            raise TLSConfigError(f"--tls-psk {path}: line {lineno}: username {username!r} "
                                 "appears twice")
        keys[username] = bytes.fromhex(hexkey)
    if not keys:
        raise TLSConfigError(f"--tls-psk {path}: no keys in the file")
    return keys


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # NBD has its own framing: a TLS close_notify is not needed to end a connection cleanly,
    # and session tickets are of no use to NBD clients (they reconnect with a fresh handshake).
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _x509_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    if not os.path.isdir(directory):
        raise TLSConfigError(f"--tls-certificates {directory}: not a directory")
    cert = os.path.join(directory, SERVER_CERT)
    key = os.path.join(directory, SERVER_KEY)
    ca = os.path.join(directory, CA_CERT)
    crl = os.path.join(directory, CA_CRL)
    for path in (cert, key):
        if not os.path.isfile(path):
            raise TLSConfigError(f"--tls-certificates {directory}: {os.path.basename(path)} "
                                 "is missing")
    ctx = _base_context()
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TLSConfigError(f"--tls-certificates {directory}: cannot load {SERVER_CERT} "
                             f"with {SERVER_KEY}: {e.reason or e}") from None
    except OSError as e:
        raise TLSConfigError(f"--tls-certificates {directory}: {e.strerror}") from None
    if verify_peer:
        if not os.path.isfile(ca):
            raise TLSConfigError(f"--tls-verify-peer needs {CA_CERT} in {directory}")
        try:
            ctx.load_verify_locations(cafile=ca)
            if os.path.isfile(crl):
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as e:
            raise TLSConfigError(f"--tls-certificates {directory}: cannot load the CA: "
                                 f"{getattr(e, 'reason', None) or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE  # as nbdkit: client certificates are not asked for
    return ctx


def _psk_context(path: str) -> ssl.SSLContext:
    if not psk_supported():
        v = sys.version_info
        raise TLSConfigError(f"--tls-psk needs Python 3.13 or later with TLS-PSK in its ssl "
                             f"module (this is Python {v.major}.{v.minor}); use "
                             "--tls-certificates instead")
    keys = load_psk_file(path)
    ctx = _base_context()
    ctx.verify_mode = ssl.CERT_NONE
    # TLS 1.2 PSK cipher suites; TLS 1.3 uses the same callback with its own suites.
    ctx.set_ciphers("PSK:!aNULL:!eNULL:!MD5:!RC4:!3DES")

    def lookup(identity: str | None) -> bytes:
        # b"" rejects the handshake: an unknown user gets no key and no hint why.
        return keys.get(identity or "", b"")

    ctx.set_psk_server_callback(lookup)
    return ctx


@dataclass(frozen=True)
class TLSSettings:
    """The server's TLS choice: ``mode`` is off, on (client's choice) or require."""

    mode: str = "off"
    context: ssl.SSLContext | None = None
    kind: str = ""  # "x509" or "psk", for the start-up line

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def required(self) -> bool:
        return self.mode == "require"


def server_settings(mode: str | None, certificates: str | None = None,
                    psk_file: str | None = None, verify_peer: bool = False) -> TLSSettings:
    """Turn the command-line options into :class:`TLSSettings` (TLSConfigError if they clash).

    As nbdkit: without ``--tls`` TLS is offered (``on``) when certificates or a PSK file are
    given and off otherwise.  Unlike nbdkit there is no default certificate directory: TLS
    needs ``--tls-certificates`` or ``--tls-psk``, and giving both is an error rather than
    a silent choice.
    """
    if mode is None:
        mode = "on" if (certificates or psk_file) else "off"
    if mode not in TLS_MODES:
        raise TLSConfigError(f"--tls must be one of {', '.join(TLS_MODES)}, not {mode!r}")
    if certificates and psk_file:
        raise TLSConfigError("--tls-certificates and --tls-psk cannot be used together")
    if verify_peer and not certificates:
        raise TLSConfigError("--tls-verify-peer needs --tls-certificates DIR (with ca-cert.pem)")
    if mode == "off":
        if certificates or psk_file:
            raise TLSConfigError("--tls=off with --tls-certificates or --tls-psk: "
                                 "drop one of them")
        return TLSSettings()
    if psk_file:
        return TLSSettings(mode, _psk_context(psk_file), "psk")
    if certificates:
        return TLSSettings(mode, _x509_context(certificates, verify_peer), "x509")
    raise TLSConfigError(f"--tls={mode} needs --tls-certificates DIR or --tls-psk FILE")
