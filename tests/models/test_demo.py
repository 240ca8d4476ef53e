"""`make demo` (python -m tp_kernels.demo) passes: TP=2 tokens equal TP=1 tokens."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_passes():
    proc = subprocess.run([sys.executable, "-m", "tp_kernels.demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: TP=2 tokens equal TP=1 tokens on both ranks" in proc.stdout
    assert proc.stdout.count("tokens/s") >= 4
