"""bench/run.py --quick on a tiny backing runs every target and writes its table and chart.

Nothing here looks at a measured number: performance lives in bench/, never in the test suite.
"""

import json
import subprocess
from pathlib import Path

from conftest import PYTHON

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["cow-server", "cow-shim", "python-null", "nbdkit-cow", "qemu-nbd", "nbdkit-file"]
FIO_ROWS = ["random 4 KiB writes", "random 4 KiB reads", "random 64 KiB read/write 50/50",
            "sequential 1 MiB reads", "sequential 1 MiB writes"]


def test_quick_run_writes_table_and_chart(tmp_path):
    out = tmp_path / "results"
    cmd = [PYTHON, str(REPO / "bench" / "run.py"), "--quick", "--targets", *TARGETS,
           "--size", "16M", "--runtime", "0.2", "--scaling-runtime", "0.2", "--connections", "2",
           "--remote-size", "4M", "--remote-delay-ms", "1", "--startup-size", "1G",
           "--nbdkit-threads", "1,2", "--threads-runtime", "0.2",
           "--flush-disk", "256M", "--flush-bytes", "8M",
           "--views-counts", "1,3", "--views-runtime", "0.2",
           "--serial-delays-ms", "1", "--serial-sizes", "2M", "--serial-qemu-sizes", "1M",
           "--drop-size", "4M", "--drop-delay-ms", "2", "--drop-every", "0.3",
           "--drop-timeout", "5",
           "--workdir", str(tmp_path / "work"), "--out-dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    table = (out / "latest.md").read_text()
    assert table.strip() == r.stdout.strip()
    assert "--quick" in table and "Linux " in table and "nbdkit 1." in table
    header = next(line for line in table.splitlines() if line.startswith("| workload |"))
    for label in ["cow.server", "cow shim", "do-nothing plugin", "nbdkit cow filter (C) (ref)",
                  "qemu-nbd", "nbdkit file", "shim ÷ do-nothing"]:
        assert label in header
    for row in FIO_ROWS + ["pipeline: nbdcopy whole export", "2 conn", "start-up (ms)",
                           "cow.server --lock-mode global", "nbdkit + cow shim (`uri=`)",
                           "nbdcopy straight from the backing (ceiling)",
                           "no multi-conn, cow-on-read 4K (MiB/s)", "fine ÷ global ≥ 1.9×",
                           "random 4 KiB reads, 1 conn, -t 2", "random 4 KiB writes, 4 conn, -t 1",
                           "random 4 KiB reads, NBD backing, -t 2",
                           "cow.server --overlay FILE against its temporary overlay",
                           "then one FLUSH (ms)",
                           "Views: many writable views of one backing in one server",
                           "8 views busy at once"]:
        assert row in table, row
    assert "ERROR" not in table and "| error" not in table
    # The serial rows (HTTP ones only where lighttpd is installed, else one line says why).
    for row in ["| file, 1 ms, 2 MiB | nbdcopy -C 4 |", "| file, 1 ms, 1 MiB | qemu-img convert |",
                "cow.server ÷ nbdkit filter"]:
        assert row in table, row
    assert "| http, 1 ms, 2 MiB | nbdcopy -C 4 |" in table or "HTTP rows skipped" in table
    # The drop rows: a result for each (a failed copy is a result, not an error of the bench).
    for label in ["| cow.server nbd+unix:///?socket=B |",
                  "| nbdkit --filter=cow nbd uri=nbd+unix:///?socket=B |",
                  "| nbdkit --filter=cow --filter=retry nbd uri=nbd+unix:///?socket=B |"]:
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert ("completed in" in row or "failed:" in row or "did not finish" in row), row
    assert "--overlay FILE, existing (reopened)" in table
    assert "CPU time per GiB served" in table and "pipeline: both steps" in table

    raw = json.loads((out / "latest.json").read_text())
    assert raw["errors"] == []
    measured = {(v["metric"], v["column"]) for v in raw["values"]}
    for target in TARGETS:
        for metric in ["randwrite-4k", "seqread-1m", "pipeline-copy", "randwrite-4k@2", "startup-s"]:
            assert (metric, target) in measured
    for setting in ["mc", "nomc", "nomc-cor4k"]:
        for column in ["cow-server", "cow-shim", "nbdkit-cow"]:
            assert (f"remote-{setting}", column) in measured
    for setting in ["mc", "nomc"]:
        for column in ["cow-server-global", "ceiling"]:
            assert (f"remote-{setting}", column) in measured
    for target in ["cow-shim", "python-null", "nbdkit-cow"]:
        assert ("randread-4k@4c-t2", target) in measured
    assert ("randread-4k-nbd@t1", "cow-shim") in measured
    cpu = {(v["metric"], v["column"]) for v in raw["cpu_s_per_gib"]}
    for target in TARGETS:
        for metric in ["randwrite-4k", "seqread-1m", "pipeline"]:
            assert (metric, target) in cpu
    for column in ("temporary", "persistent"):
        for metric in ("overlay-randwrite-4k", "overlay-flush"):
            assert (metric, column) in measured
    for column in ("cow-server", "nbdkit-cow", "ceiling"):
        assert ("serial-file-1ms-nbdcopy", column) in measured
    for column in ("temporary", "fresh", "existing"):
        assert ("startup-ov-read", column) in measured
        assert ("startup-ov-engine", column) in measured
    assert [d["column"] for d in raw["drop"]] == ["cow-server", "nbdkit-cow", "nbdkit-cow-retry"]
    for metric in ("views-first@1", "views-last@3", "views-per-view@3", "views-left-fds@3"):
        assert (metric, "cow-server") in measured
    assert ("views-randwrite", "8-views") in measured and ("views-randwrite", "1-view") in measured

    png = out / "latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The scratch folder given with --workdir is kept, but no server is left behind on it.
    assert not list((tmp_path / "work").glob("*.sock"))
