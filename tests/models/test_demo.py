"""`make demo` (python -m tp_kernels.demo) passes: TP=2 tokens equal TP=1 tokens."""
import os
import subprocess
import sys


def _env_importing_this_tp_kernels() -> dict:
    """The child must import the tp_kernels this process imported (the source tree, or the installed package
    when the CPU-torch suite runs from inside .venv-cpu), whatever its working directory."""
    import tp_kernels

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(tp_kernels.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))


def test_demo_passes():
    proc = subprocess.run([sys.executable, "-m", "tp_kernels.demo"], env=_env_importing_this_tp_kernels(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: TP=2 tokens equal TP=1 tokens on both ranks" in proc.stdout
    assert proc.stdout.count("tokens/s") >= 4
