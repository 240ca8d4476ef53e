"""Ahead-of-time compile of every launch config for sm_80 and sm_90, and the resources each one uses.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 or 90, 32))` produces the
cubin, Triton's bundled cuobjdump reports its registers and stack ("STACK" > 0 means spilled registers)
and `metadata.shared` is the dynamic shared memory. Compiles land in Triton's cache directory, so a
second run takes seconds.

Each config is compiled with the arguments specialized as a real launch specializes them (pointers and
strides 16-divisible, unit strides constant) and with every epilogue feature on (bias, neox RoPE over
the whole head and, for qkv, both the plain and the KV-cache store), the variant that needs the most.

Run as `python -m tp_kernels.kernels.resources` (TRITON_INTERPRET unset: the interpreter replaces the
kernels by Python functions that cannot be compiled); it prints one JSON row per compiled kernel.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterator, List, Tuple

ARCH_CAPABILITY = {"sm_80": 80, "sm_90": 90}


@dataclass
class KernelResources:
    kernel: str
    config: str
    arch: str
    registers: int
    spills: int  # bytes of stack frame: spilled registers (the kernels use no local arrays)
    shared_bytes: int


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def parse_resource_usage(text: str) -> Tuple[int, int]:
    """(registers, stack bytes) from `cuobjdump --dump-resource-usage` output of a one-kernel cubin."""
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if regs is None or stack is None:
        raise RuntimeError(f"cuobjdump output has no REG:/STACK: fields:\n{text}")
    return int(regs.group(1)), int(stack.group(1))


def _element_type(dtype_class: str) -> str:
    return "fp32" if dtype_class == "fp32" else "bf16"


def _signature(fn, types: dict, constants: dict):
    """Triton's signature for fn: `types` gives the non-constant arguments (pointer and int types);
    `constants` the constexpr and unit-stride arguments. Every other int is hinted 16-divisible."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _qkv_case(dtype_class: str, head_dim: int, config, write_kv_cache: bool):
    from tp_kernels.kernels.qkv import _qkv_rope_kernel, head_slots_for

    element = f"*{_element_type(dtype_class)}"
    head_slots = head_slots_for(head_dim)
    types = {name: element for name in ("x_ptr", "w_ptr", "bias_ptr", "q_ptr", "k_ptr", "v_ptr")}
    types.update(cos_sin_ptr="*fp32", positions_ptr="*i64", batch_index_ptr="*i64")
    constants = dict(stride_xk=1, stride_wk=1, stride_cs_col=1, stride_kd=1, stride_vd=1,
                     HEAD_DIM=head_dim, HEAD_SLOTS=head_slots, ROTARY_DIM=head_dim, ROPE_STYLE="neox",
                     HAS_BIAS=True, WRITE_KV_CACHE=write_kv_cache, BLOCK_M=config.block_m,
                     BLOCK_N=min(config.block_n, head_slots), BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     UPCAST_OPERANDS=False, DOT_PRECISION="ieee" if dtype_class == "fp32" else "tf32")
    name = "qkv_rope_kv_cache" if write_kv_cache else "qkv_rope"
    return name, _qkv_rope_kernel, types, constants


def _matmul_case(dtype_class: str, config):
    from tp_kernels.kernels.matmul import _matmul_kernel

    element = f"*{_element_type(dtype_class)}"
    types = {name: element for name in ("a_ptr", "b_ptr", "bias_ptr", "c_ptr")}
    constants = dict(stride_ak=1, stride_bk=1, stride_cn=1, HAS_BIAS=True, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     UPCAST_OPERANDS=False, DOT_PRECISION="ieee" if dtype_class == "fp32" else "tf32")
    return "matmul", _matmul_kernel, types, constants


def cases() -> Iterator[tuple]:
    """(kernel name, config string, arch, jit fn, types, constants, config) for every table entry.
    A qkv entry is compiled for head_dim 128 and, where its BLOCK_N is wider than 64, also for head_dim
    64, whose heads cap the tile at 64 columns (the table has no such entry today)."""
    from tp_kernels.kernels import configs

    for (arch, dtype_class, m_bucket), config in configs.QKV_CONFIGS.items():
        for head_dim in (128, 64) if config.block_n > 64 else (128,):
            for write_kv_cache in (False, True):
                name, fn, types, constants = _qkv_case(dtype_class, head_dim, config, write_kv_cache)
                yield (name, f"{dtype_class}_M<={m_bucket}_{config}_hd{head_dim}", arch, fn, types, constants,
                       config)
    for (arch, dtype_class, m_bucket), config in configs.MATMUL_CONFIGS.items():
        name, fn, types, constants = _matmul_case(dtype_class, config)
        yield name, f"{dtype_class}_M<={m_bucket}_{config}", arch, fn, types, constants, config


def compile_case(name, config_name, arch, fn, types, constants, config) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(fn, types, constants)
    target = GPUTarget("cuda", ARCH_CAPABILITY[arch], 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=target,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    registers, stack = parse_resource_usage(dump)
    return KernelResources(name, config_name, arch, registers, stack, int(compiled.metadata.shared))


# A tile known to spill (the 128x256 bf16 tile with 4 warps of DESIGN.md: REG 255, STACK 1856 on sm_90),
# compiled on request so a test can show that the spill check sees spills.
SPILL_PROBE = ("matmul_spill_probe", "sm_90", dict(block_m=128, block_n=256, block_k=64, num_warps=4, num_stages=3))


def _spill_probe_case():
    from tp_kernels.kernels.configs import TileConfig

    name, arch, fields = SPILL_PROBE
    config = TileConfig(**fields)
    _, fn, types, constants = _matmul_case("16bit", config)
    return name, f"16bit_{config}", arch, fn, types, constants, config


def _all_cases(spill_probe: bool) -> list:
    return list(cases()) + ([_spill_probe_case()] if spill_probe else [])


def _compile_nth(index: int, spill_probe: bool) -> KernelResources:
    return compile_case(*_all_cases(spill_probe)[index])


def collect(jobs: int = 1, spill_probe: bool = False) -> List[KernelResources]:
    """Compile every case (in `jobs` processes) and return their resources, in table order."""
    import triton

    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted Python functions and cannot "
                           "be compiled; run with TRITON_INTERPRET unset")
    n_cases = len(_all_cases(spill_probe))
    if jobs <= 1:
        return [_compile_nth(i, spill_probe) for i in range(n_cases)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_nth, range(n_cases), [spill_probe] * n_cases))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--spill-probe", action="store_true", help="also compile a tile known to spill")
    args = parser.parse_args(argv)
    for row in collect(args.jobs, args.spill_probe):
        print(json.dumps(asdict(row)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
