"""Parallelize a Hugging Face model over CPU ranks, check it against the original, save it and reload it.

    python python/examples/parallelize_hf_model.py                       # tiny random Llama, TP=2
    python python/examples/parallelize_hf_model.py --arch phi3 --tp 4    # any family of --help
    python python/examples/parallelize_hf_model.py --model /path/to/hf_dir --tp 2 --save /tmp/out

Each rank is a process (torch.multiprocessing + gloo). Every rank loads the full model, converts it with
tp_kernels.parallelize (keeping only its own slices; rank 0 prints the plan) and compares the logits and a
greedy generation with the unconverted copy. Then every rank calls tp_kernels.save_pretrained, which gathers
the slices and writes one full checkpoint from rank 0, and rank 0 reloads it with transformers and checks
that every tensor equals the original's. Exits non-zero if anything differs.
"""
import argparse
import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels

LLAMA_LIKE = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
TINY = {  # model_type -> config fields of a tiny random model
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": dict(LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": dict(LLAMA_LIKE, head_dim=32), "phi3": LLAMA_LIKE, "gemma": dict(LLAMA_LIKE, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, head_dim=16),
    "gpt_neox": dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "opt": dict(vocab_size=101, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, pad_token_id=1),
    "gpt2": dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
}


def load_model(args):
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)  # every rank builds the same random weights
    config = transformers.AutoConfig.for_model(args.arch, **TINY[args.arch])
    return transformers.AutoModelForCausalLM.from_config(config)


def run_rank(rank, args, init_file, save_dir):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=args.tp, backend="gloo", init_method=f"file://{init_file}")
    model = load_model(args).eval()
    original = copy.deepcopy(model)
    prompt = torch.randint(2, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))

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

    files = tp_kernels.save_pretrained(model, save_dir)  # every rank: the slices are gathered to rank 0
    reload_ok = True
    if rank == 0:
        reloaded = type(original).from_pretrained(save_dir, dtype=torch.float32).state_dict()
        reload_ok = sorted(reloaded) == sorted(original.state_dict()) and all(
            torch.equal(reloaded[name], t) for name, t in original.state_dict().items())
        print(f"saved {', '.join(files)} to {save_dir}; reloaded by transformers, every tensor equal: {reload_ok}")
    dist.barrier()
    dist.destroy_process_group()
    if max_diff > 1e-4 or not torch.equal(tokens, expected) or not reload_ok:
        raise SystemExit(f"rank {rank}: the parallelized model does not match the original")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(TINY), default="llama",
                        help="tiny random model to build when --model is not given")
    parser.add_argument("--model", help="a local Hugging Face model directory")
    parser.add_argument("--tp", type=int, default=2, help="number of CPU ranks")
    parser.add_argument("--save", help="directory to save the converted model to (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = args.save or os.path.join(tmp, "saved")
        mp.spawn(run_rank, args=(args, os.path.join(tmp, "rendezvous"), save_dir), nprocs=args.tp)
    print("OK: logits and greedy tokens match on every rank, and the saved checkpoint reloads equal")


if __name__ == "__main__":
    main()
