"""Every script in python/examples and python/tutorials runs to completion (exit status 0) as a user would run
it, against the tp_kernels this test session imports. The scripts check their own results and exit non-zero
when a check fails; here we also look for the line each prints last when it succeeds.

The scripts start together (one subprocess each) and each test waits for its own: they spend much of their
time starting interpreters and waiting on rendezvous, so running them side by side keeps the file's wall
time near the slowest script's instead of the sum.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tp_kernels

PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"
TIMEOUT_S = 240  # the slowest script takes ~45 s on 2 loaded cores; all run at once
# the line each script prints when it succeeds (a tutorial prints its last table or claim)
SCRIPTS = {
    "examples/parallelize_hf_model.py": "OK: logits and greedy tokens match on every rank",
    "examples/call_ops.py": "OK: every op matches its plain-PyTorch equivalent",
    "examples/generate_from_checkpoint.py": "$ ",
    "tutorials/01_column_and_row_parallel.py": "its output equals the full MLP's: True",
    "tutorials/02_allreduce_in_decode.py": "The GEMM time falls as 1/tp",
    "tutorials/03_overlap_pipeline.py": "equals the unchunked result",
}
NEEDS = {  # script -> (module it needs, why the test skips without it)
    "examples/parallelize_hf_model.py": ("transformers", "the example converts a Hugging Face model"),
    "examples/generate_from_checkpoint.py": ("transformers", "the example writes its tiny checkpoint with it"),
}


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


def test_every_script_is_listed():
    found = {str(p.relative_to(PYTHON_DIR)) for p in PYTHON_DIR.glob("*/*.py")}
    assert found == set(SCRIPTS), "add new scripts to SCRIPTS (with the line they print on success)"


@pytest.fixture(scope="module")
def running_scripts(tmp_path_factory):
    """Start every runnable script at once, from an empty directory as a user's would be; yields
    {script: Popen}."""
    env = dict(os.environ)
    # the scripts import the tp_kernels this session tests (a source tree or an installed package)
    package_root = str(Path(tp_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    workdir = tmp_path_factory.mktemp("examples")
    procs = {}
    for script in SCRIPTS:
        if script in NEEDS and _missing(NEEDS[script][0]):
            continue
        procs[script] = subprocess.Popen([sys.executable, str(PYTHON_DIR / script)], cwd=workdir,
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs(script, running_scripts):
    if script not in running_scripts:
        module, why = NEEDS[script]
        pytest.skip(f"{module} is not importable: {why}")
    proc = running_scripts[script]
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{script} did not finish within {TIMEOUT_S} s; its output:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{script} exited with status {proc.returncode}; its output:\n{output[-4000:]}"
    assert SCRIPTS[script] in output, f"{script} did not print {SCRIPTS[script]!r}; its output:\n{output[-4000:]}"
