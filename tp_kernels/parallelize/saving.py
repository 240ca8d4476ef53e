"""`save_pretrained(model, dir)`: a model converted by parallelize, written back as one full Hugging Face
checkpoint that transformers reloads unconverted (and parallelize can split again, at any TP degree).

Every rank calls it: each swapped layer's full tensors are all-gathered (in the plan's order, the same on
every rank) and rank 0 writes them, a shard file at a time, so rank 0 holds at most one shard plus one
tensor beyond its own weights. A failure while writing on rank 0 is carried to the end of the gathers (so
the other ranks never wait on a rank that left) and then raised on every rank.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from tp_kernels import ops
from tp_kernels.parallelize.plan import PLAN_ATTRIBUTE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # 5 GiB: what the Hugging Face hub's large checkpoints use


class _ShardWriter:
    """Accumulates tensors into shards of at most max_shard_bytes and writes each when full (rank 0 only)."""

    def __init__(self, directory: str, max_shard_bytes: int, active: bool):
        self.directory, self.max_shard_bytes, self.active = directory, max_shard_bytes, active
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []  # the tensor names of each written shard
        self.written: List[str] = []  # temporary file names, in order
        self.total_bytes = 0
        self.error: Optional[BaseException] = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not self.active or self.error is not None:
            return
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.active or self.error is not None or not self.pending:
            return
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f".tp_kernels-shard-{len(self.written):05d}.tmp")
        try:
            save_file(self.pending, path, metadata={"format": "pt"})
        except BaseException as exc:  # noqa: BLE001  (carried to the end, then raised on every rank)
            self.error = exc
            return
        self.written.append(path)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> List[str]:
        """Rename the shards to their final names and write the index when there is more than one."""
        self.flush()
        if not self.active or self.error is not None:
            return []
        n = len(self.written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, final in zip(self.written, names):
            os.replace(tmp, os.path.join(self.directory, final))
        stale = [SINGLE_FILE, INDEX_FILE] if n > 1 else [INDEX_FILE]
        for name in stale:  # a previous save in the same directory must not shadow this one
            path = os.path.join(self.directory, name)
            if name not in names and os.path.exists(path):
                os.remove(path)
        if n > 1:
            weight_map = {tensor: file for file, shard in zip(names, self.shards) for tensor in shard}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
            names.append(INDEX_FILE)
        return names


def save_pretrained(model: nn.Module, save_directory, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write `model`, converted by `tp_kernels.parallelize`, as one full Hugging Face checkpoint in
    save_directory: config.json (and generation_config.json) and model.safetensors, or
    model-0000i-of-0000n.safetensors with model.safetensors.index.json past max_shard_bytes per file.
    `transformers.AutoModelForCausalLM.from_pretrained(save_directory)` reloads the unconverted model.

    Every rank of the model's group must call it (the shards are gathered with collectives); rank 0
    writes. Returns the file names written (on rank 0; [] on the others). Raises on every rank if rank 0
    could not write.
    """
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise ValueError(f"save_pretrained: this {type(model).__name__} was not converted by "
                         "tp_kernels.parallelize; use its own save_pretrained")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tp = model.get_submodule(plan.swaps[0].name).tp
    directory = os.fspath(save_directory)
    writer = _ShardWriter(directory, max_shard_bytes, active=tp.rank == 0)
    if writer.active:
        try:
            os.makedirs(directory, exist_ok=True)
            _save_config(model, directory)
        except BaseException as exc:  # noqa: BLE001
            writer.error = exc

    swapped = plan.swapped_names()
    for swap in plan.swaps:
        if swap.gather is None:  # tied: the table it shares is saved under its own name
            continue
        for param, tensor in swap.gather(model.get_submodule(swap.name)).items():
            writer.add(f"{swap.name}.{param}", tensor)
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] in swapped or id(tensor) in seen:  # a tensor shared by two names: once
            continue
        seen.add(id(tensor))
        writer.add(name, tensor)
    files = writer.finish()

    device = next(model.parameters()).device
    failed = ops.all_reduce(torch.tensor([1.0 if writer.error is not None else 0.0], device=device), tp)
    if failed.item():
        reason = f": {type(writer.error).__name__}: {writer.error}" if writer.error is not None else ""
        raise RuntimeError(f"save_pretrained: rank 0 could not write the checkpoint to {directory}{reason}") \
            from writer.error
    return files


def _save_config(model: nn.Module, directory: str) -> None:
    """config.json as transformers writes it (dtype and architectures of this model), generation_config.json."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"save_pretrained: {type(model).__name__} has no Hugging Face config to write")
    config = copy.deepcopy(config)
    config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
