"""`python -m tp_kernels.generate` end to end: the tiny preset on two CPU ranks it spawns itself."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_generates_at_tp2():
    cmd = [sys.executable, "-m", "tp_kernels.generate", "--model", "tiny", "--tp", "2", "--prompt", "hello",
           "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "prefill: 5 tokens" in proc.stdout
    assert "decode: 7 steps" in proc.stdout and "tokens/s" in proc.stdout and "GB/s" in proc.stdout


def test_cli_rejects_an_unknown_model():
    from tp_kernels.generate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "no-such-model-or-dir", "--prompt", "x"])
