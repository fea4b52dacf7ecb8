"""Hostile clients against the server's own limits (issue 18, items 6, 8 and 10): a server run
out of descriptors by connections, clients that send large READs over an NBD backing and never
read the replies, and what a client can learn of the server (export descriptions, error
messages).

Always: the server keeps serving the other clients, nothing fails that should not, no
traceback, and nothing a client receives names a server path or the backing's command line.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import struct
import subprocess
import time
from array import array
from pathlib import Path

import nbd
import pytest

from conftest import write_sample
from support_server import start_server
from support_reliability import (
    CMD_READ, CMD_WRITE, EINVAL, ENOSPC, ESHUTDOWN, OPT_GO, OPT_INFO, OPT_LIST, REP_ACK, REP_ERR,
    REP_INFO, REP_SERVER, RawClient, rss_kib, run_server, wait_until,
)

KiB = 1024
MiB = 1024 * KiB

# The server's read budgets (cow/server.py READ_BUDGET, SERVER_READ_BUDGET), restated so that
# the bounds below are the documented ones.
READ_BUDGET = 32 * MiB
SERVER_READ_BUDGET = 256 * MiB


def _log_lines(srv, pattern):
    return len(re.findall(pattern, srv.stderr()))


# ---------------------------------------------------------------- what a client learns (item 10)


class _Recording(RawClient):
    """A raw client that keeps every byte the server sent it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = bytearray()

    def recv_exact(self, n):
        data = super().recv_exact(n)
        self.received += data
        return data


NBD_INFO_NAME, NBD_INFO_DESCRIPTION = 1, 2


def _ask_everything(sock_path):
    """INFO with name and description, LIST, INFO and GO for names that do not exist, then
    requests that fail: every byte the server sent."""
    c = _Recording(sock_path)
    c.greeting()
    c.client_flags()
    for opt, data in ((OPT_INFO, c.info_data(b"", (NBD_INFO_NAME, NBD_INFO_DESCRIPTION))),
                      (OPT_LIST, b""),
                      (OPT_INFO, c.info_data(b"no-such", (NBD_INFO_DESCRIPTION,))),
                      (OPT_GO, c.info_data(b"../../etc/passwd"))):
        c.option(opt, data)
        replies = c.option_replies(opt)
        assert replies[-1][0] in (REP_ACK, REP_ERR | 6, REP_ERR | 3), replies
    c.option(8)  # STRUCTURED_REPLY: error replies carry a message
    assert c.option_replies(8)[-1][0] == REP_ACK
    c.structured = True
    c.option(OPT_GO, c.info_data(b"", (NBD_INFO_DESCRIPTION,)))
    assert c.option_replies(OPT_GO)[-1][0] == REP_ACK
    size = 4 * MiB
    errors = []
    for cmd, offset, length, payload in ((CMD_READ, size - 4096, 8192, b""),
                                         (CMD_WRITE, 0, 4096, b"x" * 4096),
                                         (CMD_WRITE, MiB, 4096, b"x" * 4096),  # over the cap
                                         (CMD_WRITE, 0, 2 * 65536, b"x" * 2 * 65536),
                                         (CMD_WRITE, size, 4096, b"y" * 4096),
                                         (CMD_READ, 0, 65 * MiB, b"")):
        err, _, chunks = c.call(cmd, offset, length, payload=payload)
        errors.append(err)
    assert errors == [EINVAL, 0, ENOSPC, ENOSPC, ENOSPC, EINVAL], errors
    c.disconnect()
    return bytes(c.received)


def test_descriptions_and_errors_name_no_path_and_no_command_line(tmp_path, nbdkit):
    """A file backing in a distinctive folder, and a command backing with a secret in its
    command line: neither the path nor the secret reaches a client (nbdinfo --json, nbdsh's
    get_export_description, NBD_OPT_LIST, a raw client's INFO and its error replies), and
    the server's own output still names the backing for the operator."""
    secret = "hunter2-s3cr3t-token"
    folder = tmp_path / "golden-images-Zq7xK"
    folder.mkdir()
    disk = folder / "golden.img"
    write_sample(disk, 4 * MiB)
    cases = [((disk,), ("golden-images-Zq7xK", str(folder))),
             ((None, "--", "env", f"COW_TEST_TOKEN={secret}", "nbdkit", "pattern", "4M"),
              (secret, "COW_TEST_TOKEN", "nbdkit"))]
    for args, hidden in cases:
        with start_server(args[0], "--overlay-max-size", "64K", *args[1:],
                          tmp_path=tmp_path) as (uri, proc):
            seen = [json.dumps(json.loads(subprocess.run(
                        ["nbdinfo", "--json", uri], check=True, capture_output=True,
                        text=True).stdout)),
                    subprocess.run(["nbdinfo", "--list", "--json", uri], check=True,
                                   capture_output=True, text=True).stdout]
            h = nbd.NBD()
            h.set_full_info(True)
            h.connect_uri(uri)
            seen.append(h.get_export_description())
            h.shutdown()
            raw = _ask_everything(proc.sock_path)
            assert b"copy-on-write view" in raw
            for text in seen:
                assert "copy-on-write view" in text
                for word in hidden:
                    assert word not in text, f"{word!r} reached a client: {text}"
            for word in hidden:
                assert word.encode() not in raw, f"{word!r} reached a raw client: {raw!r}"
            # The operator's start-up line still names the backing.
            assert hidden[0] in proc.log_path.read_text()
