"""Parallelize a Hugging Face model over CPU ranks and check it against the original.

    python python/examples/parallelize_hf_model.py                       # tiny random Llama, TP=2
    python python/examples/parallelize_hf_model.py --arch gpt2 --tp 4
    python python/examples/parallelize_hf_model.py --model /path/to/hf_dir --tp 2

Each rank is a process (torch.multiprocessing + gloo). Every rank loads the full model, prints nothing but
rank 0's plan, converts it with tp_kernels.parallelize (keeping only its own slices) and compares the
logits and a greedy generation with the unconverted copy. Exits non-zero if they differ.
"""
import argparse
import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def load_model(args):
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)  # every rank builds the same random weights
    if args.arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if args.arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def run_rank(rank, args, init_file):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=args.tp, backend="gloo", init_method=f"file://{init_file}")
    model = load_model(args).eval()
    original = copy.deepcopy(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))

    if rank == 0:
        print(tp_kernels.parallelize(model, tp, dry_run=True))
    tp_kernels.parallelize(model, tp)

    with torch.no_grad():
        max_diff = (model(prompt).logits - original(prompt).logits).abs().max().item()
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = original.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    params_per_rank = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}: {params_per_rank} parameters (unconverted: {sum(p.numel() for p in original.parameters())}), "
          f"max |logits - original| = {max_diff:.2e}, greedy tokens equal: {torch.equal(tokens, expected)}")
    dist.barrier()
    dist.destroy_process_group()
    if max_diff > 1e-4 or not torch.equal(tokens, expected):
        raise SystemExit(f"rank {rank}: the parallelized model does not match the original")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["llama", "qwen2", "gpt2"], default="llama",
                        help="tiny random model to build when --model is not given")
    parser.add_argument("--model", help="a local Hugging Face model directory")
    parser.add_argument("--tp", type=int, default=2, help="number of CPU ranks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(args, os.path.join(tmp, "rendezvous")), nprocs=args.tp)
    print("OK: logits and greedy tokens match on every rank")


if __name__ == "__main__":
    main()
