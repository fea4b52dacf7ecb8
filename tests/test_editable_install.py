"""The tree as a newcomer meets it: the package is installed editable (./dev setup), so the
commands work from the repository root, where the source folder cow/ has no compiled engine.

`python -m cow.server` there must import the installed package (cow/ from this tree, the engine
from build/), and nbdkit, which runs cow/nbdkit_plugin.py with no environment at all, must find
the same engine.  Where that cannot work, the error names the cause.
"""

import json
import shutil
import subprocess
from pathlib import Path

from conftest import PYTHON
from support_shim import plugin_path

ROOT = Path(__file__).resolve().parent.parent
BARE_ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}


def run_here(*args, timeout=60, **kw):
    """The venv's python, run from the repository root, without -P (what anyone types first)."""
    return subprocess.run([PYTHON, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_package_is_editable_from_this_tree():
    r = run_here("-c", "import cow, cow.engine; print(cow.__file__); print(cow.engine.__file__)")
    assert r.returncode == 0, r.stderr
    package, engine = map(Path, r.stdout.split())
    assert package == ROOT / "cow" / "__init__.py"
    assert engine.parent == ROOT / "build" / "cow"


def test_server_help_from_the_repository_root():
    r = run_here("-m", "cow.server", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m cow.server") and "--cow-block-size" in r.stdout


def test_server_captive_run_from_the_repository_root(backing_factory):
    disk = backing_factory(2 * 1024 * 1024 + 512)
    r = run_here("-m", "cow.server", disk, "--run", 'nbdinfo --json "$uri"')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exports"][0]["export-size"] == 2 * 1024 * 1024 + 512


def test_plugin_path_is_the_source_file_and_nbdkit_finds_the_engine(backing_factory):
    r = run_here("-m", "cow.nbdkit", "--print-plugin-path")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "cow" / "nbdkit_plugin.py" == Path(plugin_path())
    # nbdkit with no PYTHONPATH, no venv on PATH, started from another folder.
    disk = backing_factory(1024 * 1024)
    out = subprocess.run(
        ["nbdkit", "-U", "-", "python", r.stdout.strip(), f"file={disk}",
         "--run", 'nbdinfo --json "$uri"'],
        cwd="/", env=BARE_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["exports"][0]["export-size"] == 1024 * 1024


def test_plugin_without_a_build_names_the_cause(tmp_path, backing_factory):
    """A source tree that was never set up (here: a copy of the plugin alone)."""
    tree = tmp_path / "checkout"
    (tree / "cow").mkdir(parents=True)
    shutil.copy(ROOT / "cow" / "nbdkit_plugin.py", tree / "cow")
    disk = backing_factory(64 * 1024)
    r = subprocess.run(["nbdkit", "-f", "-U", str(tmp_path / "s.sock"), "python",
                        str(tree / "cow" / "nbdkit_plugin.py"), f"file={disk}"],
                       env=BARE_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"no editable build of {tree}" in r.stderr and "run ./dev setup" in r.stderr, r.stderr


def test_plugin_with_a_build_whose_environment_is_gone(tmp_path, backing_factory):
    tree = tmp_path / "checkout"
    (tree / "cow").mkdir(parents=True)
    (tree / "build" / "cow").mkdir(parents=True)
    shutil.copy(ROOT / "cow" / "nbdkit_plugin.py", tree / "cow")
    (tree / "build" / "cow" / "environment.json").write_text(json.dumps(
        {"site_packages": str(tmp_path / "gone" / "site-packages"),
         "python_version": json.loads((ROOT / "build/cow/environment.json").read_text())
         ["python_version"]}))
    disk = backing_factory(64 * 1024)
    r = subprocess.run(["nbdkit", "-f", "-U", str(tmp_path / "s.sock"), "python",
                        str(tree / "cow" / "nbdkit_plugin.py"), f"file={disk}"],
                       env=BARE_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "The above exception" not in r.stderr, r.stderr
    assert f"cannot import cow.engine from {tmp_path / 'gone'}" in r.stderr, r.stderr
    assert "run ./dev setup" in r.stderr


def test_dev_setup_again_changes_nothing():
    """Set-up is idempotent: the editable install is there, nothing to rebuild."""
    before = (ROOT / "build" / "cow" / "environment.json").stat().st_mtime_ns
    r = subprocess.run([str(ROOT / "dev"), "setup"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", r.stderr
    assert (ROOT / "build" / "cow" / "environment.json").stat().st_mtime_ns == before


def test_dev_serve_takes_paths_from_the_callers_folder(tmp_path):
    """`cd ~/vm && path/to/dev serve disk.img --overlay rel.cow`: both paths are the caller's."""
    (tmp_path / "disk.img").write_bytes(b"\x5a" * 65536)
    r = subprocess.run([str(ROOT / "dev"), "serve", "disk.img", "--overlay", "rel.cow",
                        "--run", 'nbdinfo --size "$uri"'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "65536"
    assert (tmp_path / "rel.cow").is_file()
    assert not (ROOT / "rel.cow").exists()


def test_dev_help_exits_0():
    r = subprocess.run([str(ROOT / "dev"), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: ./dev serve"), r.stderr
