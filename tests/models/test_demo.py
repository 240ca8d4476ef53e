"""`make demo` (python -m tp_kernels.demo) passes: TP=2 tokens equal TP=1 tokens. Its main() runs in this
process (the TP=2 ranks are spawned as under make demo), which saves a Python + torch start-up."""
import torch

from tp_kernels import demo


def test_demo_passes(capsys):
    threads = torch.get_num_threads()
    try:
        exit_code = demo.main()
    finally:
        torch.set_num_threads(threads)  # main() pins this process to one thread, as each TP=2 rank has
    out = capsys.readouterr().out
    assert exit_code == 0, out
    assert "OK: TP=2 tokens equal TP=1 tokens on both ranks" in out
    assert out.count("tokens/s") >= 4
