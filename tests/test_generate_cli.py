"""`python -m tp_kernels.generate` end to end: the tiny preset on two CPU ranks it spawns itself."""
import os
import subprocess
import sys

import pytest


def _env_importing_this_tp_kernels() -> dict:
    """The child must import the tp_kernels this process imported (the source tree, or the installed package
    when the CPU-torch suite runs from inside .venv-cpu), whatever its working directory."""
    import tp_kernels

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(tp_kernels.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))


def test_cli_generates_at_tp2():
    cmd = [sys.executable, "-m", "tp_kernels.generate", "--model", "tiny", "--tp", "2", "--device", "cpu",
           "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
           "--seed", "3"]
    proc = subprocess.run(cmd, env=_env_importing_this_tp_kernels(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "prefill: 5 tokens" in proc.stdout
    assert "decode: 7 steps" in proc.stdout and "tokens/s" in proc.stdout and "GB/s" in proc.stdout


def test_cli_rejects_an_unknown_model():
    from tp_kernels.generate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "no-such-model-or-dir", "--prompt", "x"])


def test_cli_on_a_hf_directory_with_its_tokenizer(tmp_path, capsys):
    """TP=1 in this process: config.json + model.safetensors written by HF, and a tokenizer.json."""
    pytest.importorskip("transformers", reason="writes the checkpoint with save_pretrained")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    from tp_kernels.generate import main

    vocab = 101
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                               eos_token_id=None, bos_token_id=None)).save_pretrained(tmp_path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert main(["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "4"]) == 0
    text, stats = capsys.readouterr().out.split("---\n")
    words = text.split()
    assert len(words) == 4 and all(w.startswith("w") and 0 <= int(w[1:]) < vocab for w in words), text
    assert "prefill: 3 tokens" in stats and "decode: 3 steps" in stats


def _readme_preset_commands():
    """The `python -m tp_kernels.generate --model tiny ...` lines of README.md, as printed."""
    import shlex

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        lines = [line.strip() for line in f if line.startswith("python -m tp_kernels.generate --model tiny")]
    return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("argv", _readme_preset_commands(), ids=lambda argv: " ".join(argv[3:]))
def test_readme_preset_commands_run_as_printed(argv):
    """Each README command on the tiny preset (plain and --compile: a TP=2 Inductor compile, ~1 min here)."""
    assert argv[:3] == ["python", "-m", "tp_kernels.generate"]
    proc = subprocess.run([sys.executable] + argv[1:], env=_env_importing_this_tp_kernels(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "decode: 31 steps" in proc.stdout
    assert ("compile: " in proc.stdout) == ("--compile" in argv)


def test_readme_prints_the_compile_command():
    assert any("--compile" in argv for argv in _readme_preset_commands())


# ----------------------------------------------------------------------------------------------------------
# --device: every cuda path's error, checked with a given GPU count (no GPU needed)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, world_size, local_rank, gpus, expected", [
    ("cpu", 4, None, 0, "cpu"),
    (None, 2, None, 8, "cpu"),  # without torchrun the default stays on the CPU
    ("cuda", 1, None, 1, "cuda"),
    ("cuda", 4, None, 4, "cuda"),
    ("cuda:3", 1, None, 4, "cuda:3"),
    ("cuda", 2, 1, 2, "cuda"),  # under torchrun: LOCAL_RANK 1 of 2 GPUs
])
def test_device_accepted(spec, world_size, local_rank, gpus, expected):
    from tp_kernels.generate import check_device

    assert check_device(spec, world_size, local_rank, gpu_count=gpus) == expected


@pytest.mark.parametrize("spec, world_size, local_rank, gpus, message", [
    ("gpu", 1, None, 1, "--device must be cpu, cuda or cuda:I (a GPU index), got 'gpu'"),
    ("cuda:", 1, None, 1, "--device must be cpu, cuda or cuda:I"),
    ("cuda:x", 1, None, 1, "--device must be cpu, cuda or cuda:I"),
    ("cuda", 1, None, 0, "--device cuda: CUDA is not available: "),
    ("cuda:0", 1, None, 0, "--device cuda:0: CUDA is not available: "),
    ("cuda:2", 1, None, 2, "--device cuda:2 is out of range: 2 GPU(s) visible (cuda:0 to cuda:1)"),
    ("cuda:0", 2, None, 2, "--device cuda:0 places one rank, but there are 2: use --device cuda"),
    ("cuda", 4, None, 2, "--device cuda with --tp 4 needs 4 GPUs (one per rank), 2 visible"),
    ("cuda", 4, 3, 2, "--device cuda: torchrun's LOCAL_RANK 3 has no GPU, 2 visible"),
])
def test_device_rejected_saying_why(spec, world_size, local_rank, gpus, message):
    from tp_kernels.generate import check_device

    with pytest.raises(ValueError) as info:
        check_device(spec, world_size, local_rank, gpu_count=gpus)
    assert str(info.value).startswith(message), str(info.value)


def test_cli_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    """On a machine without CUDA the real check runs: the CLI stops before loading anything."""
    import torch

    from tp_kernels.generate import parse_args

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    with pytest.raises(SystemExit) as info:
        parse_args(["--model", "tiny", "--prompt", "x", "--device", "cuda", "--tp", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    reason = "was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
    assert "error: --device cuda: CUDA is not available: " in err and reason in err, err
