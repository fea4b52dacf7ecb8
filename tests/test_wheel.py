"""The package as a new user meets it outside ./dev's own .venv (issue 20, item 2).

- A Python with no built engine (Debian's /usr/bin/python3, a venv without the package) run from
  the source folder: `python -m cow.server --help` works, anything else is one line.
- A service user: the editable install is the set-up user's alone (importing it rebuilds in
  build/), so `./dev wheel` builds a wheel, installed here into a venv of its own that the user
  `nobody` runs: cow-server, cow-overlay and cow-nbdkit with nbdkit, over a backing nobody may
  only read, leaving the editable install's folders as they were.
- The same wheel in a plain venv (no system site-packages): it installs with no dependency,
  serves, and `cow-overlay export`, which needs libnbd's Python bindings, says so in one line.

The wheel is built once for the module (it compiles the engine: about a minute).
"""

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import sha256_file, write_sample

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
BARE_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
MiB = 1024 * 1024

pytestmark = pytest.mark.timeout(900)  # the first test builds the wheel


def run(args, *, cwd="/", env=None, timeout=120, check=True):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env if env is not None else {"PATH": BARE_PATH})
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def as_nobody(*args, cwd, timeout=120, check=True):
    """ARGS run as the user nobody with a bare environment (no venv, no PYTHONPATH)."""
    return run(["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={BARE_PATH}",
                "HOME=/nonexistent", *args], cwd=cwd, timeout=timeout, check=check)


def one_line(r):
    """The one line a failure prints: no traceback, nothing else."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def public_folder(prefix):
    """A temporary folder others may enter and read (pytest's tmp_path is root's alone)."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    top.chmod(0o755)
    return top


@contextmanager
def untouched(*folders):
    """Every file and folder under FOLDERS keeps its size and modification time."""
    def state():
        return {p: (st.st_mtime_ns, st.st_size) for folder in folders
                for p in [folder, *folder.rglob("*")] if (st := p.lstat())}
    before = state()
    yield
    after = state()
    changed = sorted(str(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, changed


@pytest.fixture(scope="module", autouse=True)
def root_only():
    if os.geteuid() != 0:
        pytest.skip("runs tools as the user nobody: run the tests as root (./dev test)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([ROOT / "dev", "wheel", out], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    [whl] = out.glob("cow-*.whl")
    assert f"dev: built {whl}" in r.stderr, r.stderr
    return whl


def make_venv(top, wheel, *system):
    venv = top / "venv"
    run([SYSTEM_PYTHON, "-m", "venv", *system, venv])
    # --no-index and no --no-deps: the wheel installs with nothing from a registry (nor from
    # this machine's pip configuration: its find-links and constraints).
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", wheel],
        env={"PATH": BARE_PATH, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""})
    return venv


@pytest.fixture(scope="module")
def service_venv(wheel):
    """The wheel in a venv with Debian's packages (python3-libnbd), as the README sets it up."""
    top = public_folder("cow-service-")
    yield make_venv(top, wheel, "--system-site-packages")
    shutil.rmtree(top)


@pytest.fixture(scope="module")
def plain_venv(wheel):
    top = public_folder("cow-plain-")
    yield make_venv(top, wheel)
    shutil.rmtree(top)


@pytest.fixture
def nobody_files():
    """data/disk.img, root's and only readable by others, and work/, the user nobody's."""
    top = public_folder("cow-nobody-")
    (top / "data").mkdir(mode=0o755)
    disk = write_sample(top / "data" / "disk.img", 2 * MiB)
    disk.chmod(0o644)
    digest = sha256_file(disk)
    work = top / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    yield disk, work
    assert sha256_file(disk) == digest, "the backing was modified"
    shutil.rmtree(top)


# -- a Python with no engine, from the source folder ----------------------------------------------

@pytest.fixture(scope="module")
def bare_venv():
    """A venv without the package (nor Debian's)."""
    top = public_folder("cow-bare-")
    run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", top / "venv"])
    yield top / "venv" / "bin" / "python"
    shutil.rmtree(top)


@pytest.fixture(params=["system", "venv"])
def engineless_python(request, bare_venv):
    python = SYSTEM_PYTHON if request.param == "system" else bare_venv
    # It has no cow of its own: from the source folder it imports cow/, which has no engine.
    assert run([python, "-c", "import cow"], check=False).returncode != 0
    return python


def test_server_help_needs_no_engine(engineless_python):
    r = run([engineless_python, "-m", "cow.server", "--help"], cwd=ROOT)
    assert r.stdout.startswith("usage: python -m cow.server") and "--cow-block-size" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("options", [[], ["--overlay", "{tmp}/vm.cow", "-U", "{tmp}/s.sock"],
                                     ["--run", "touch {tmp}/ran"]])
def test_server_without_an_engine_is_one_line(engineless_python, tmp_path, options):
    disk = write_sample(tmp_path / "disk.img", MiB)
    options = [o.format(tmp=tmp_path) for o in options]
    r = run([engineless_python, "-m", "cow.server", disk, *options], cwd=ROOT, check=False)
    line = one_line(r)
    assert r.returncode == 1
    assert line == (f"python -m cow.server: error: {engineless_python} imports cow from the "
                    f"source folder {ROOT / 'cow'}, which has no compiled engine, and this Python "
                    f"has no install of the package: run ./dev setup in {ROOT}, then use its "
                    f".venv/bin/python"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


def test_cli_takes_the_servers_defaults_without_the_engine():
    """cow.cli shows the server's defaults in --help (from cow.server.tuning) without importing
    the server's connections or the engine."""
    r = run([sys.executable, "-P", "-c", "import sys, cow.cli; print(sorted(m for m in sys.modules "
             "if m.startswith('cow.')))"], cwd="/")
    assert r.stdout.split("'")[1::2] == ["cow.cli", "cow.protocol", "cow.server",
                                         "cow.server.tuning"], r.stdout


# -- a service user, from a wheel -----------------------------------------------------------------

def editable_folders():
    return ROOT / "build", ROOT / "cow"


def test_wheel_runs_as_a_service_user(service_venv, nobody_files):
    disk, work = nobody_files
    bin_ = service_venv / "bin"
    with untouched(*editable_folders()):
        r = as_nobody(bin_ / "cow-server", "--help", cwd=work)
        assert r.stdout.startswith("usage: python -m cow.server")
        # Its cow and its engine are the wheel's, not the editable install's.
        r = as_nobody(bin_ / "python", "-c", "import cow.engine; print(cow.engine.__file__)",
                      cwd=work)
        assert Path(r.stdout.strip()).is_relative_to(service_venv), r.stdout
        # A real serve, keeping the changes in an overlay of nobody's: one write, then the size.
        r = as_nobody(bin_ / "cow-server", disk, "--overlay", "vm.cow", "--run",
                      'nbdsh -u "$uri" -c "h.pwrite(b\\"x\\" * 512, 0)" && nbdinfo --size "$uri"',
                      cwd=work)
        assert r.stdout.strip() == str(2 * MiB), r.stderr
        assert (work / "vm.cow").stat().st_uid == 65534
        r = as_nobody(bin_ / "cow-overlay", "info", "vm.cow", "--json", cwd=work)
        assert '"allocated_blocks": 1' in r.stdout, r.stdout


def test_wheel_shim_runs_in_nbdkit_as_a_service_user(service_venv, nobody_files):
    disk, work = nobody_files
    bin_ = service_venv / "bin"
    with untouched(*editable_folders()):
        r = as_nobody(bin_ / "cow-nbdkit", "--print-plugin-path", cwd=work)
        plugin = Path(r.stdout.strip())
        assert plugin.name == "nbdkit_plugin.py" and plugin.is_relative_to(service_venv)
        # nbdkit runs the plugin with no venv: it finds the engine beside it.
        r = as_nobody(bin_ / "cow-nbdkit", "-U", "-", disk, "--run",
                      'nbdsh -u "$uri" -c "h.pwrite(b\\"y\\" * 512, 4096)" && '
                      'nbdinfo --size "$uri"', cwd=work)
        assert r.stdout.strip() == str(2 * MiB), r.stderr


# -- the wheel in a plain venv --------------------------------------------------------------------

def test_plain_venv_serves_and_export_says_what_it_needs(plain_venv, tmp_path):
    bin_ = plain_venv / "bin"
    assert run([bin_ / "python", "-c", "import nbd"], check=False).returncode != 0
    disk = write_sample(tmp_path / "disk.img", 2 * MiB)
    digest = sha256_file(disk)
    r = run([bin_ / "cow-server", disk, "--overlay", "vm.cow", "--run",
             'nbdsh -u "$uri" -c "h.pwrite(b\\"z\\" * 512, 0)"'], cwd=tmp_path)
    before = sha256_file(tmp_path / "vm.cow")
    r = run([bin_ / "cow-overlay", "export", "vm.cow", "diff.qcow2"], cwd=tmp_path, check=False)
    line = one_line(r)
    assert r.returncode == 1
    assert line.startswith("python -m cow.overlay export: error: export needs libnbd's Python "
                           f"bindings, which {bin_ / 'python'} cannot import (No module named "
                           "'nbd'): install python3-libnbd"), line
    assert "--system-site-packages" in line
    assert not (tmp_path / "diff.qcow2").exists()
    assert sha256_file(tmp_path / "vm.cow") == before and sha256_file(disk) == digest


def test_an_engine_that_cannot_load_is_one_line(plain_venv, tmp_path):
    """libnbd, which the engine links, broken (here: an empty libnbd.so.0 found first)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libnbd.so.0").write_bytes(b"")
    disk = write_sample(tmp_path / "disk.img", MiB)
    env = {"PATH": BARE_PATH, "LD_LIBRARY_PATH": str(tmp_path / "lib")}
    server = plain_venv / "bin" / "cow-server"
    assert run([server, "--help"], env=env).stdout.startswith("usage: python -m cow.server")
    r = run([server, disk, "--overlay", "vm.cow"], cwd=tmp_path, env=env, check=False)
    line = one_line(r)
    package = next(plain_venv.glob("lib/python3*/site-packages/cow"))
    assert line.startswith(f"python -m cow.server: error: cannot load the cow engine of "
                           f"{package}: {tmp_path / 'lib' / 'libnbd.so.0'}: file too short"), line
    assert line.endswith("(it needs libnbd: Debian's libnbd0)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "lib"]


def test_export_names_an_nbd_module_that_is_not_libnbds(plain_venv, tmp_path):
    """PyPI's `nbd` is a notebook diff tool: installed, it hides libnbd's bindings."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "nbd.py").write_text('"""Not libnbd."""\n')
    disk = write_sample(tmp_path / "disk.img", MiB)
    bin_ = plain_venv / "bin"
    run([bin_ / "cow-server", disk, "--overlay", "vm.cow", "--run", "true"], cwd=tmp_path)
    r = run([bin_ / "cow-overlay", "export", "vm.cow", "diff.qcow2"], cwd=tmp_path, check=False,
            env={"PATH": BARE_PATH, "PYTHONPATH": str(other)})
    line = one_line(r)
    assert f"the nbd module {bin_ / 'python'} imports ({other / 'nbd.py'}) is another " \
           "package's" in line and "pip uninstall nbd" in line, line
    assert not (tmp_path / "diff.qcow2").exists()
