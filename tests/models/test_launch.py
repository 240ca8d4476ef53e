"""run_on_cpu_ranks (used by the CLI and the demo) reports failing and crashing ranks instead of hanging.
Its success path runs in test_demo.py and test_generate_cli.py."""
import os

import pytest

from tp_kernels.models.launch import run_on_cpu_ranks


def _fail_or_crash(tp):
    if tp.rank == 0:
        raise ValueError("rank zero fails on purpose")
    os._exit(3)  # rank 1 dies without reporting anything


def test_failing_and_crashing_ranks_are_named():
    with pytest.raises(RuntimeError) as info:
        run_on_cpu_ranks(2, _fail_or_crash, timeout_s=120)
    message = str(info.value)
    assert "failed on ranks [0, 1]" in message
    assert "rank zero fails on purpose" in message and "exited with code 3" in message
