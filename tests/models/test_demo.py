"""`make demo` (python -m tp_kernels.demo) passes: TP=2 tokens equal TP=1 tokens. Its main() runs in this
process (the TP=2 ranks are spawned as under make demo), which saves a Python + torch start-up."""
import torch

from tp_kernels import demo


def test_demo_passes(capsys):
    threads = torch.get_num_threads()
    try:
        exit_code = demo.main()
    finally:
        torch.set_num_threads(threads)  # main() gives TP=1, in this process, every core
    out = capsys.readouterr().out
    assert exit_code == 0, out
    assert "OK: TP=2 tokens equal TP=1 tokens on both ranks" in out
    for label in ("TP=1 (1 process", "TP=2 (2 processes"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert "tokens/s =" in line and "% of its roofline" in line and "GB/s" in line, line
    assert "x TP=1" in out
