"""Multi-rank GPU tests on however many GPUs the machine has, one included.

`run_on_gpus(world_size, fn, *args)` runs `fn(rank, *args)` on world_size processes of conftest.spawn_ranks
(a gloo group over which CPU tensors are exchanged), rank r on cuda:(r % n_gpus), and returns the per-rank
results. `rank` is a GpuRank: the TPGroup, the device, and an NCCL group over the same ranks when every rank
has a GPU of its own. With fewer GPUs than ranks, ranks share GPUs: CUDA IPC works between processes on one
GPU, so the IPC protocol (barriers, staging, CUDA-graph slots, teardown) is checked on a one-GPU machine;
NCCL refuses two ranks on one GPU, so there is no NCCL group then (`rank.nccl` is None) and `rank.gather`
goes through gloo instead.

The CUDA IPC communicator declines ranks that share a GPU in production (the chain falls back to NCCL: two
processes on one GPU gain nothing from it); `rank.ipc_communicator()` turns on its test switch
(`allow_shared_gpu`) exactly when ranks share a GPU. Processes that share a GPU (without MPS) run their kernels
time-sliced, not side by side: a kernel spinning at a barrier keeps the GPU until its time slice ends (compute
preemption, since Pascal, is what guarantees progress), so a barrier costs up to one slice per rank there and
loops are sized for it. Since the ranks never run at once there, a one-GPU run checks the protocol (barrier
values across calls, slots, staging, teardown, traps), not the memory ordering under real concurrency. The
kernels' barrier timeout is TEST_KERNEL_TIMEOUT_MS unless TP_KERNELS_IPC_TIMEOUT is set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist

from conftest import RankError, spawn_ranks
from tp_kernels import _extension
from tp_kernels.comm import ipc_plan
from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.distributed import TPGroup

_NCCL: Dict[int, dist.ProcessGroup] = {}  # per rank process and world size: the NCCL group over its ranks
NOT_SUPPORTED_HERE = "IPC all-reduce not supported on this machine:"
TEST_KERNEL_TIMEOUT_MS = 60_000


class NotSupportedHere(RuntimeError):
    """The machine's topology rules the IPC path out (e.g. no NVLink above 2 ranks): a skip, not a failure."""


@dataclass
class GpuRank:
    tp: TPGroup
    device: torch.device
    n_gpus: int
    nccl: Optional[dist.ProcessGroup]

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.tp.world_size

    @property
    def shares_gpu(self) -> bool:
        return self.tp.world_size > self.n_gpus

    def gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's t, in rank order, on this rank's device (NCCL when each rank has its own GPU, else
        through gloo on CPU copies)."""
        if self.nccl is not None:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t.contiguous(), group=self.nccl)
            return parts
        cpu = t.detach().cpu().contiguous()
        parts = [torch.empty_like(cpu) for _ in range(self.world_size)]
        dist.all_gather(parts, cpu, group=self.tp.process_group)
        return [p.to(self.device) for p in parts]

    def ipc_communicator(self, buffer_bytes: int = ipc_plan.DEFAULT_BUFFER_BYTES) -> CudaIpcCommunicator:
        """A CUDA IPC communicator over the ranks (collective); the test switch on iff ranks share a GPU.
        Raises NotSupportedHere when the topology rules it out, RuntimeError for any other refusal."""
        comm, reason = CudaIpcCommunicator.create_or_reason(self.tp, buffer_bytes, self.device,
                                                             allow_shared_gpu=self.shares_gpu)
        if comm is None:
            if "NVLink" in reason:
                raise NotSupportedHere(f"{NOT_SUPPORTED_HERE} {reason}")
            raise RuntimeError(f"CudaIpcCommunicator declined: {reason}")
        if ipc_plan.KERNEL_TIMEOUT_ENV not in os.environ:
            # A protocol bug that hangs traps within a minute, naming the rank, instead of using up the
            # run's budget (run_on_gpus waits 300 s); a legitimate wait here is a few time slices.
            comm.timeout_ms = TEST_KERNEL_TIMEOUT_MS
        return comm


def require_gpu_build() -> None:
    """Skip (in the test process) unless a GPU and the CUDA build of tp_kernels._C are there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA")


def run_on_gpus(world_size: int, fn: Callable, *args, fresh: bool = False, timeout_s: float = 300.0) -> List:
    """fn(GpuRank, *args) on world_size ranks over the visible GPUs; the per-rank results. fn must be a
    module-level function. A NotSupportedHere raised on the ranks becomes a skip."""
    require_gpu_build()
    try:
        return spawn_ranks(world_size, _on_gpu, fn, args, fresh=fresh, timeout_s=timeout_s)
    except RankError as error:
        text = str(error)
        if NOT_SUPPORTED_HERE in text:
            reason = text[text.index(NOT_SUPPORTED_HERE):].splitlines()[0]
            pytest.skip(reason)
        raise


def _on_gpu(tp: TPGroup, fn: Callable, args: tuple):
    n_gpus = torch.cuda.device_count()
    device = torch.device("cuda", tp.rank % n_gpus)
    torch.cuda.set_device(device)
    nccl = None
    if tp.world_size <= n_gpus:
        if tp.world_size not in _NCCL:  # made once per rank process, by every rank of its pool
            _NCCL[tp.world_size] = dist.new_group(list(range(tp.world_size)), backend="nccl")
        nccl = _NCCL[tp.world_size]
    return fn(GpuRank(tp, device, n_gpus, nccl), *args)
