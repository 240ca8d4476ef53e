"""Ahead-of-time compile of the fused GEMM + collective kernels for sm_80 and sm_90, for every launch
config they use (gemm_collective_configs.FUSED_CONFIGS), with the resources each one uses. The machinery (specialization, cuobjdump)
is tp_kernels.kernels.resources'; this module only lists the fused cases, kept apart from its table.

Each config is compiled in every variant: the reduce kernel in its three modes (reduce-scatter,
two-shot and one-shot all-reduce) and the all-gather kernel, with the bias on, the global-timer waits
of a GPU, and the 8 rank lanes every launch has. Run as `python -m tp_kernels.kernels.gemm_collective_resources`
(TRITON_INTERPRET unset); one JSON row per compiled kernel.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Iterator, List

from tp_kernels.comm.symmetric import MAX_WORLD_SIZE  # the rank lanes of every launch

MODES = (("gemm_reduce_scatter", 0), ("gemm_all_reduce_two_shot", 1), ("gemm_all_reduce_one_shot", 2))
# The kernels' do_not_specialize ints (a rank, the group size, row counts, the call's signature): not
# hinted divisible, as a launch does not specialize them. N, K and the strides are hinted.
UNHINTED = ("rank", "world_size", "rows_per_owner", "M", "R", "n_publish", "signature")


def _types(dtype_class: str) -> dict:
    element = "*fp32" if dtype_class == "fp32" else "*bf16"
    types = {name: element for name in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr")}
    types.update(table_ptr="*i64", control_ptr="*i64", status_ptr="*i64", timeout_ns="i64")
    return types


def _constants(dtype_class: str, config) -> dict:
    return dict(stride_xk=1, stride_wk=1, stride_on=1, HAS_BIAS=True, BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, UPCAST_OPERANDS=False,
                DOT_PRECISION="ieee" if dtype_class == "fp32" else "tf32", USE_GLOBALTIMER=True)


def cases() -> Iterator[tuple]:
    """(kernel name, config string, arch, jit fn, types, constants, unhinted, config), as resources.cases()."""
    from tp_kernels.kernels.gemm_collective_configs import FUSED_CONFIGS
    from tp_kernels.kernels.gemm_collective_gather import _allgather_gemm_kernel
    from tp_kernels.kernels.gemm_collective_reduce import _gemm_reduce_kernel

    for (arch, dtype_class, m_bucket), config in FUSED_CONFIGS.items():
        name = f"{dtype_class}_M<={m_bucket}_{config}"
        for kernel, mode in MODES:
            yield (kernel, name, arch, _gemm_reduce_kernel, _types(dtype_class),
                   dict(_constants(dtype_class, config), MODE=mode, WORLD_BLOCK=MAX_WORLD_SIZE), UNHINTED, config)
        yield ("allgather_gemm", name, arch, _allgather_gemm_kernel, _types(dtype_class),
               _constants(dtype_class, config), UNHINTED, config)


def _case_list() -> list:
    return list(cases())


def collect(jobs: int = 1) -> List:
    """Compile every fused case (in `jobs` processes); their KernelResources, in order."""
    from tp_kernels.kernels.resources import compile_all

    return compile_all(_case_list, jobs)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    for row in collect(args.jobs):
        print(json.dumps(asdict(row)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
