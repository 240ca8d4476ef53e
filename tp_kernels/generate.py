"""Generate text with the tensor-parallel GPT decoder.

    python -m tp_kernels.generate --model PATH|PRESET --tp N --prompt TEXT --max-new-tokens K \\
        [--device cpu|cuda|cuda:I] [--temperature T] [--top-k K] [--top-p P] [--seed S] \\
        [--dtype float32|bfloat16|float16] [--compile]

PATH is a local Hugging Face model directory (config.json, *.safetensors, optionally tokenizer.json);
PRESET is a name from tp_kernels.models.PRESETS, with seeded random weights. Under torchrun (RANK and
WORLD_SIZE set) every process is one rank, on GPU LOCAL_RANK (--device cuda, the default when CUDA is
available) or on the CPU. Otherwise this command starts the ranks itself: --device cpu (the default) N CPU
ranks over gloo; --device cuda one rank per GPU (rank r on cuda:r, NCCL), or one rank in this process at
--tp 1; --device cuda:I one rank on GPU I. Rank 0 prints the text, then prefill and decode tokens/s and the
GB/s of weights each rank streams per decode step.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("tp_kernels.generate")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tp_kernels.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or preset name")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel degree (default: torchrun's WORLD_SIZE, else 1)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and weight seed of a preset)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile(fullgraph=True) (CUDA: as a CUDA graph)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda (one GPU per rank) or cuda:I (one rank on GPU I); default: cuda under "
                             "torchrun when CUDA is available, else cpu")
    args = parser.parse_args(argv)
    if args.tp is not None and args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    try:
        args.device = check_device(args.device, _world_size(args), _local_rank())
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not os.path.isdir(args.model):
        from tp_kernels.models.config import PRESETS

        if args.model not in PRESETS:
            parser.error(f"--model {args.model!r} is neither a directory nor a preset (presets: {sorted(PRESETS)})")
    return args


def _world_size(args: argparse.Namespace) -> int:
    return int(os.environ["WORLD_SIZE"]) if _under_torchrun() else (args.tp or 1)


def _local_rank() -> Optional[int]:
    """This process's GPU index under torchrun, None when this command starts the ranks itself."""
    return int(os.environ.get("LOCAL_RANK", 0)) if _under_torchrun() else None


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def check_device(spec: Optional[str], world_size: int, local_rank: Optional[int],
                 gpu_count: Optional[int] = None) -> str:
    """The --device to use: "cpu", "cuda" (one GPU per rank: cuda:LOCAL_RANK under torchrun, cuda:r for a
    rank this command starts) or "cuda:I". Raises ValueError saying why the GPUs cannot hold the ranks.
    gpu_count defaults to torch.cuda.device_count() (tests pass one)."""
    if spec is None:
        spec = "cuda" if local_rank is not None and torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    index = spec[len("cuda:"):] if spec.startswith("cuda:") else None
    if spec != "cuda" and not (index and index.isdigit()):
        raise ValueError(f"--device must be cpu, cuda or cuda:I (a GPU index), got {spec!r}")
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if count == 0:
        raise ValueError(f"--device {spec}: CUDA is not available: {_no_cuda_reason()}; use --device cpu")
    if index is not None:
        if int(index) >= count:
            raise ValueError(f"--device {spec} is out of range: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
        if world_size > 1:
            raise ValueError(f"--device {spec} places one rank, but there are {world_size}: use --device cuda "
                             f"(one GPU per rank)")
    elif local_rank is not None and local_rank >= count:
        raise ValueError(f"--device cuda: torchrun's LOCAL_RANK {local_rank} has no GPU, {count} visible")
    elif local_rank is None and world_size > count:
        raise ValueError(f"--device cuda with --tp {world_size} needs {world_size} GPUs (one per rank), "
                         f"{count} visible")
    return spec


def _rank_device(spec: str) -> str:
    """This rank's device for a checked --device: "cuda" means the GPU this rank was put on."""
    return f"cuda:{torch.cuda.current_device()}" if spec == "cuda" else spec


def _run_rank(tp, args: argparse.Namespace):
    """Load, generate, and return (text, stats) on every rank (rank 0 prints)."""
    from tp_kernels.models import GPT, generate
    from tp_kernels.models.tokenizer import load_tokenizer

    device = _rank_device(args.device)
    dtype = DTYPES[args.dtype]
    if os.path.isdir(args.model):
        model = GPT.from_pretrained(args.model, tp, dtype=dtype, device=device)
        model_dir = args.model
        if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")) and tp.rank == 0:
            log.warning("no tokenizer.json in %s: prompt and output are UTF-8 bytes as token ids", model_dir)
    else:
        model = GPT.from_preset(args.model, tp, dtype=dtype, device=device, seed=args.seed)
        model_dir = None
    tokenizer = load_tokenizer(model_dir, model.args.vocab_size)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens")
    # Untimed warm-up: the first call of a torch custom op imports torch._dynamo (3.3 s on this 2-core box).
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    generate(model, [prompt], 2, **sampling)
    # --compile: generate compiles the step before its timed part (stats.compile_s)
    tokens, stats = generate(model, [prompt], args.max_new_tokens, compile=args.compile, **sampling)
    return tokenizer.decode(tokens[0]), tokens[0], stats


def report(text: str, stats, world_size: int) -> str:
    return (f"{text}\n"
            f"---\n"
            f"prefill: {stats.n_prompt_tokens} tokens, {stats.prefill_tokens_per_s:.1f} tokens/s\n"
            f"decode: {stats.n_decode_steps} steps, {stats.decode_tokens_per_s:.1f} tokens/s, "
            f"{stats.decode_weight_gb_per_s:.3f} GB/s of weights per rank "
            f"({stats.decode_bytes_per_rank / 1e6:.2f} MB read per rank per step, tp={world_size})"
            + (f"\ncompile: {stats.compile_s:.1f} s (the first call of the compiled decode step)" if stats.compile_s else ""))


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models.launch import BACKENDS, run_on_ranks

    device_type = args.device.split(":")[0]
    world_size = _world_size(args)
    if _under_torchrun():
        if args.tp is not None and args.tp != world_size:
            raise SystemExit(f"--tp {args.tp} does not match torchrun's WORLD_SIZE={world_size}")
        tp = TPGroup.init(backend=BACKENDS[device_type])  # with nccl it puts this process on GPU LOCAL_RANK
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(args.device))
        text, _, stats = _run_rank(tp, args)
        if tp.rank == 0:
            print(report(text, stats, world_size))
        return 0
    if world_size == 1:  # in this process
        if args.device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(args.device))  # Triton launches on the current device
        text, _, stats = _run_rank(TPGroup.single(), args)
    else:
        text, _, stats = run_on_ranks(world_size, _run_rank, args, device_type=device_type)[0]
    print(report(text, stats, world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
