"""Installing tp_kernels as a user would: the commands of the README's "Install as a library" section, run
exactly as printed, in fresh venvs; then the installed package is imported and an op is called from a
directory outside the checkout.

Each fresh venv reuses the packages of the environment running the tests (torch, build tools) through a .pth
file, so nothing is downloaded but the build tools of pip's isolated builds (setuptools, ninja).

Cost, kept inside `make test`'s budget: no compile. `pip install .` and `pip wheel .` from the checkout reuse
the objects `make` compiled into build/ and only link (where there are none for the default configuration, a
tree never built with CUDA, the CPU-only line runs instead and leaves its objects for the next run). The
compile from the sdist is the one `make test` does anyway for its CPU-only-torch venv, which it installs from
the sdist's contents; `test_this_environment_was_installed_from_the_sdist` checks that install when the suite
runs there.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Install as a library"
VERSION = "0.1.0"
COMMAND_TIMEOUT_S = 1200
# Two links and an sdist: ~1 minute on a quiet 2-core machine, many times that under load from other jobs.
# The first test that uses `installs` pays for all of them.
pytestmark = pytest.mark.timeout(2400)

# README commands this test does not run, and why.
NOT_RUN = {
    "pip install dist/tp_kernels-0.1.0.tar.gz":
        "make test installs its CPU-only-torch venv from this sdist's contents (the same compile, against the "
        "CPU-only torch) and runs test_this_environment_was_installed_from_the_sdist there; a second compile "
        "here would add minutes to the suite",
    "pip wheel --no-deps -w dist dist/tp_kernels-0.1.0.tar.gz":
        "the same compile from the sdist as the line above, packed as a wheel; the wheel of the checkout is "
        "built and installed here",
    "MAX_JOBS=1 TORCH_CUDA_ARCH_LIST=\"9.0a\" pip install .":
        "a CUDA build for another arch list compiles the CUDA sources from scratch (minutes)",
}


def readme_commands() -> list:
    """The command lines of the ```bash blocks of the README's install section, comments removed."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end != -1 else len(text)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


# ----------------------------------------------------------------------------------------------------------
# fresh venvs over the running environment's packages
# ----------------------------------------------------------------------------------------------------------
def _site_dirs() -> list:
    """This environment's package directories: its site-packages and those that .pth files add."""
    return [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def fresh_venv(path: Path) -> Path:
    """A new venv whose sys.path ends with this environment's package directories (a .pth file; the .pth
    files inside them, such as an editable install's import hook, are not run). pip then reinstalls
    tp_kernels into the venv even where the base has it editable, and the compile lines name the same torch
    and CUDA include paths as make's build, so ninja can reuse its objects. `pip` runs that pip in the venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    purelib = sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    Path(purelib, "base-environment.pth").write_text("".join(f"{d}\n" for d in _site_dirs()))
    pip = path / "bin" / "pip"
    pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    pip.chmod(0o755)
    return path


def run_in(venv: Path, command: str, cwd: Path, **extra_env) -> float:
    """Run one README command line with venv's bin first on PATH; returns its wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra_env)
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, (f"`{command}` exited with {proc.returncode} after {elapsed:.0f} s:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return elapsed


CHECK = r"""
import importlib.metadata, json, sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tp_kernels
    from tp_kernels import _extension
torch.manual_seed(0)
x, residual = torch.randn(5, 64), torch.randn(5, 64)
weight = torch.randn(64)
normed, new_residual = tp_kernels.ops.add_rmsnorm(x, residual, weight, 1e-5)
torch.save({"x": x, "residual": residual, "weight": weight, "normed": normed, "new_residual": new_residual},
           sys.argv[1])
meta = importlib.metadata.metadata("tp_kernels")
print(json.dumps({"file": tp_kernels.__file__, "cuda": _extension.built_with_cuda(),
                  "warnings": [str(w.message) for w in caught if "tp_kernels" in str(w.message)],
                  "summary": meta["Summary"], "requires_python": meta["Requires-Python"],
                  "requires": meta.get_all("Requires-Dist")}))
"""


def check_installed(venv: Path, cwd: Path, out: Path) -> dict:
    """Import the package in venv from cwd and call an op of _C; compare it with plain PyTorch in float64."""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(out)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    t = torch.load(out)
    expected_residual = t["x"].double() + t["residual"].double()
    rms = torch.rsqrt(expected_residual.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_close(t["new_residual"], expected_residual, torch.float32)
    assert_close(t["normed"], expected_residual * rms * t["weight"].double(), torch.float32, reduction_len=64)
    return result


def _reusable_objects(cuda: bool) -> bool:
    """Whether build/ holds the objects of a previous build of this checkout for this torch (by make)."""
    temp = ROOT / "build" / f"temp-{'cuda' if cuda else 'cpu'}-torch{torch.__version__}"
    return (temp / ".ninja_log").is_file()


def _default_build_is_cuda() -> bool:
    forced = os.environ.get("TP_KERNELS_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    nvcc = any(os.path.exists(os.path.join(d, "bin", "nvcc")) for d in (os.environ.get("CUDA_HOME", ""),
                                                                        "/usr/local/cuda"))
    return torch.version.cuda is not None and nvcc


# ----------------------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------------------
def test_every_readme_command_is_run_or_says_why_not():
    commands = readme_commands()
    assert "pip install ." in commands and "python -m build --sdist" in commands, commands
    assert set(NOT_RUN) <= set(commands), "NOT_RUN names a command the README no longer prints"
    assert set(commands) - set(NOT_RUN) <= set(RUN), f"run these too, or say in NOT_RUN why not: " \
                                                       f"{sorted(set(commands) - set(NOT_RUN) - set(RUN))}"


# One of the two checkout lines runs: the one whose objects a previous build left in build/ (in CI, make's
# CUDA build, so `pip install .`), else the CPU-only one. They differ only in TP_KERNELS_BUILD_CUDA.
CHECKOUT_INSTALLS = ("pip install .", "TP_KERNELS_BUILD_CUDA=0 pip install .")
WHEEL = ("pip wheel --no-deps -w dist .", "pip install dist/tp_kernels-0.1.0-*.whl")
SDIST = "python -m build --sdist"
RUN = CHECKOUT_INSTALLS + WHEEL + (SDIST,)


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """Run the README's commands: a checkout install into venv `checkout`; a wheel of the checkout and its
    install into venv `wheel`; the sdist. Returns {venv name: path} and the timings."""
    if any(Path(d, "tp_kernels", "__init__.py").is_file() for d in _site_dirs()):
        pytest.skip("this environment has a regular install of tp_kernels (make test's CPU-only-torch run): "
                    "the main run of the suite tests installing")
    if not _importable("build"):
        pytest.skip("the `build` package is not installed here (requirements-common.txt has it)")
    tmp = tmp_path_factory.mktemp("install")
    times = {}
    for old in (ROOT / "dist").glob("tp_kernels-*"):  # a wheel of another Python would match the glob too
        old.unlink()
    cuda = _default_build_is_cuda()
    # the checkout lines: the configuration whose objects make left in build/, so that they only link
    extra_env = {} if _reusable_objects(cuda) or not cuda else {"TP_KERNELS_BUILD_CUDA": "0"}
    built_cuda = cuda and not extra_env

    wheel_venv = fresh_venv(tmp / "venv-wheel")
    for command in WHEEL:
        times[command] = run_in(wheel_venv, command, ROOT, **extra_env)
    times[SDIST] = run_in(wheel_venv, SDIST, ROOT)

    checkout_venv = fresh_venv(tmp / "venv-checkout")
    command = "pip install ." if built_cuda or not cuda else "TP_KERNELS_BUILD_CUDA=0 pip install ."
    times[command] = run_in(checkout_venv, command, ROOT)
    print("install steps, wall seconds:", json.dumps({k: round(v, 1) for k, v in times.items()}))
    return {"wheel": wheel_venv, "checkout": checkout_venv, "built_cuda": built_cuda, "times": times}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_sdist_holds_what_setup_py_compiles(installs):
    import tarfile

    with tarfile.open(ROOT / "dist" / f"tp_kernels-{VERSION}.tar.gz") as sdist:
        names = {Path(n).relative_to(f"tp_kernels-{VERSION}").as_posix() for n in sdist.getnames()
                 if "/" in n}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    assert {"setup.py", "pyproject.toml", "README.md", "tp_kernels/__init__.py"} <= names
    assert not any(n.endswith((".so", ".o")) or n.startswith("tests/") for n in names), sorted(names)


def test_this_environment_was_installed_from_the_sdist(tmp_path):
    """In make test's CPU-only-torch venv (.venv-cpu), which the Makefile installs from the sdist's contents
    unpacked under build/sdist/: the package imported here is that regular install, not the checkout, and
    its compiled op works, called from outside the checkout."""
    import importlib.metadata

    if not any(Path(d, "tp_kernels", "__init__.py").is_file() for d in _site_dirs()):
        pytest.skip("runs in make test's CPU-only-torch venv, which is installed from the sdist (here tp_kernels "
                    "is not a regular install)")
    origin = json.loads(importlib.metadata.distribution("tp_kernels").read_text("direct_url.json") or "{}")
    assert origin.get("url", "").endswith(f"/build/sdist/tp_kernels-{VERSION}"), origin
    source = Path(origin["url"][len("file://"):])
    assert (source / "PKG-INFO").is_file(), f"{source} is not an unpacked sdist (no PKG-INFO)"
    assert not (source / "tests").exists(), f"{source} holds tests/: not the sdist's contents"
    result = check_installed(Path(sys.prefix), tmp_path, tmp_path / "out.pt")
    assert Path(result["file"]).parent.parent in {Path(d) for d in _site_dirs()}, result["file"]
    assert result["warnings"] == [], result["warnings"]
    assert "torch<2.15,>=2.11" in result["requires"], result["requires"]


@pytest.mark.parametrize("venv", ["wheel", "checkout"])
def test_installed_package_works_outside_the_tree(venv, installs, tmp_path):
    result = check_installed(installs[venv], tmp_path, tmp_path / "out.pt")
    site_dir = sysconfig.get_path("purelib", vars={"base": str(installs[venv]), "platbase": str(installs[venv])})
    assert result["file"] == os.path.join(site_dir, "tp_kernels", "__init__.py"), result["file"]
    assert result["warnings"] == [], result["warnings"]
    assert result["cuda"] == installs["built_cuda"]
    assert result["requires_python"] == ">=3.10" and "tensor-parallel" in result["summary"]
    assert "torch<2.15,>=2.11" in result["requires"], result["requires"]
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in result["requires"])


def test_running_from_the_checkout_says_the_tree_shadows_the_install(installs, tmp_path):
    """From the checkout's root the working directory comes first on sys.path: the tree is imported, and
    one warning says so (with its own _C, or without one)."""
    proc = subprocess.run([str(installs["wheel"] / "bin" / "python"), "-c", "import tp_kernels"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "imported from the source tree" in line]
    assert len(lines) == 1, proc.stderr
    assert str(ROOT / "tp_kernels") in lines[0] and str(installs["wheel"]) in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------------------
# the shadowing check on its own (no build)
# ----------------------------------------------------------------------------------------------------------
def _fake_tree(root: Path) -> Path:
    (root / "csrc").mkdir(parents=True)
    (root / "setup.py").write_text("")
    shutil.copytree(ROOT / "tp_kernels", root / "tp_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return root / "tp_kernels"


def test_shadowed_install_is_found_only_for_a_source_tree(tmp_path):
    from tp_kernels._extension import shadowed_install

    tree_pkg = _fake_tree(tmp_path / "checkout")
    installed = tmp_path / "site" / "tp_kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert shadowed_install(str(tree_pkg), [str(tree_pkg.parent), str(installed.parent)]) == str(installed)
    assert shadowed_install(str(tree_pkg), [str(tree_pkg.parent)]) is None  # the tree alone
    assert shadowed_install(str(installed), [str(installed.parent), str(tree_pkg.parent)]) is None  # installed


# Runs in a fresh interpreter before `import tp_kernels`: drop the import hooks of editable installs, which
# would supply another tree's _C to a tree that has none (that case has its own test below).
NO_EDITABLE_HOOKS = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"


def _import_in(cwd: Path, prelude: str, pythonpath: Path) -> subprocess.CompletedProcess:
    """`import tp_kernels` in a new interpreter from cwd after prelude; returns the process (checked)."""
    proc = subprocess.run([sys.executable, "-c", prelude + "import tp_kernels; print(tp_kernels.__file__)"],
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=str(pythonpath)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _tp_kernels_warnings(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "RuntimeWarning: tp_kernels" in line]


def test_a_tree_without_its_extension_ahead_of_an_install_says_so_in_one_line(tmp_path):
    tree_pkg = _fake_tree(tmp_path / "checkout")
    installed = tmp_path / "site" / "tp_kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    proc = _import_in(tree_pkg.parent, NO_EDITABLE_HOOKS, installed.parent)
    assert proc.stdout.strip() == str(tree_pkg / "__init__.py")
    lines = _tp_kernels_warnings(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert (f"tp_kernels was imported from the source tree {tree_pkg}, whose tp_kernels._C does not load" in lines[0]
            and f"instead of the installed copy at {installed}" in lines[0]), lines[0]


def test_an_extension_found_outside_the_package_is_named(tmp_path):
    """A tree with no _C whose import is completed by a hook that finds another copy's _C (as an editable
    install's does): the code and the extension come from different copies, and one warning says so."""
    from tp_kernels import _extension

    if _extension._C is None:
        pytest.skip(f"tp_kernels._C is not loaded here ({_extension.LOAD_ERROR})")
    tree_pkg = _fake_tree(tmp_path / "checkout")
    elsewhere = (NO_EDITABLE_HOOKS + "import importlib.util\n"
                 "class Elsewhere:\n"
                 "    @staticmethod\n"
                 "    def find_spec(name, path=None, target=None):\n"
                 "        if name == 'tp_kernels._C':\n"
                 f"            return importlib.util.spec_from_file_location(name, {_extension._C.__file__!r})\n"
                 "sys.meta_path.append(Elsewhere)\n")
    proc = _import_in(tree_pkg.parent, elsewhere, tmp_path / "nothing")
    lines = _tp_kernels_warnings(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert (f"tp_kernels was imported from {tree_pkg}, but its tp_kernels._C from {_extension._C.__file__}"
            in lines[0]), lines[0]
