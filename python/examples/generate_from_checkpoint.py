"""Generate from a local Hugging Face checkpoint at TP=N with the `python -m tp_kernels.generate` CLI.

    python python/examples/generate_from_checkpoint.py                  # a tiny random checkpoint, TP=2
    python python/examples/generate_from_checkpoint.py --model DIR --tp 4 --prompt "Once upon a time"

Without --model, the script writes a tiny random Llama (save_pretrained: config.json + model.safetensors)
into a temporary directory first, as a stand-in for a downloaded model. The CLI spawns the CPU ranks itself
(under torchrun it would use torchrun's ranks instead); each rank reads only its own slices of the
safetensors file. With no tokenizer.json in the directory the CLI encodes the prompt as bytes, so the tiny
model's vocabulary covers the 256 byte values.
"""
import argparse
import os
import subprocess
import sys
import tempfile


def write_tiny_checkpoint(directory: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Hugging Face model directory (default: a tiny random one)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "tiny-llama")
            write_tiny_checkpoint(model)
            print(f"wrote a tiny random Llama to {model}: {sorted(os.listdir(model))}")
        command = [sys.executable, "-m", "tp_kernels.generate", "--model", model, "--tp", str(args.tp),
                   "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--seed", "0"]
        print("$", " ".join(command), flush=True)
        # run from the temporary directory: `python -m` puts the working directory first on sys.path, and a
        # source checkout there would shadow the installed package
        completed = subprocess.run(command, cwd=tmp)
    if completed.returncode:
        raise SystemExit(f"tp_kernels.generate exited with status {completed.returncode}")


if __name__ == "__main__":
    main()
