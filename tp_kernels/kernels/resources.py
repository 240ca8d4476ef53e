"""Ahead-of-time compile of every launch config for sm_80 and sm_90, and the resources each one uses.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 or 90, 32))` produces the
cubin, Triton's bundled cuobjdump reports its registers and stack ("STACK" > 0 means spilled registers)
and `metadata.shared` is the dynamic shared memory. Compiles land in Triton's cache directory, so a
second run takes seconds.

Each config is compiled with the arguments specialized as a real launch specializes them (pointers and
strides 16-divisible, unit strides constant) and with every epilogue feature on (bias, neox RoPE over
the whole head and, for qkv, both the plain and the KV-cache store), the variant that needs the most.
Triton also turns an int argument equal to 1 into a constant, so a decode config is compiled a second
time as decode runs it: one token (T = 1, M = 1 for matmul) and, for qkv, one KV head per rank
(n_kv_heads = 1, e.g. Llama-70B at TP = 8) with the split-K path on and its part count not hinted.

Besides registers, spills and shared memory, each row counts the global stores in the PTX by width
(`st.global.v2/v4...` vector stores against scalar ones): a fused epilogue that stores one element per
instruction shows up there (qkv's neox halves, issue 18 item 14).

Run as `python -m tp_kernels.kernels.resources` (TRITON_INTERPRET unset: the interpreter replaces the
kernels by Python functions that cannot be compiled); it prints one JSON row per compiled kernel.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, List, Tuple

ARCH_CAPABILITY = {"sm_80": 80, "sm_90": 90}


@dataclass
class KernelResources:
    kernel: str
    config: str
    arch: str
    registers: int
    spills: int  # bytes of stack frame: spilled registers (the kernels use no local arrays)
    shared_bytes: int
    vector_stores: int  # st.global.v2/.v4/.v8 instructions in the PTX
    scalar_stores: int  # other st.global instructions


def count_global_stores(ptx: str) -> Tuple[int, int]:
    """(vector, scalar) global store instructions in PTX text."""
    stores = re.findall(r"\bst\.global((?:\.\w+)*)", ptx)
    vector = sum(1 for suffix in stores if re.search(r"\.v\d", suffix))
    return vector, len(stores) - vector


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


def _signature(fn, types: dict, constants: dict, unhinted=()):
    """Triton's signature for fn: `types` gives the non-constant arguments (pointer and int types);
    `constants` the constexpr arguments and the ints specialized as constants (unit strides, T = 1).
    Every other argument but those named in `unhinted` is hinted 16-divisible."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
            if name not in unhinted:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


# Decode as it runs: one token, one KV head per rank; the split-K part count and the cache's batch size
# are small ints with no divisibility to hint
DECODE_ONES = dict(T=1, n_kv_heads=1)
DECODE_UNHINTED = ("split_k", "cache_batch")


def _qkv_case(dtype_class: str, head_dim: int, config, write_kv_cache: bool, split_k: bool, decode_ones: bool):
    from tp_kernels.kernels.qkv import _qkv_rope_kernel, head_slots_for

    element = f"*{_element_type(dtype_class)}"
    head_slots = head_slots_for(head_dim)
    types = {name: element for name in ("x_ptr", "w_ptr", "bias_ptr", "q_ptr", "k_ptr", "v_ptr")}
    types.update(cos_sin_ptr="*fp32", positions_ptr="*i64", batch_index_ptr="*i64", partials_ptr="*fp32",
                 counters_ptr="*i32")
    constants = dict(stride_xk=1, stride_wk=1, stride_cs_col=1, stride_kd=1, stride_vd=1,
                     HEAD_DIM=head_dim, HEAD_SLOTS=head_slots, ROTARY_DIM=head_dim, ROPE_STYLE="neox",
                     HAS_BIAS=True, WRITE_KV_CACHE=write_kv_cache, BLOCK_M=config.block_m,
                     BLOCK_N=min(config.block_n, head_slots), BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     SPLIT_K=split_k, UPCAST_OPERANDS=False,
                     DOT_PRECISION="ieee" if dtype_class == "fp32" else "tf32")
    if decode_ones:
        constants.update(DECODE_ONES)
    name = "qkv_rope_kv_cache" if write_kv_cache else "qkv_rope"
    return name, _qkv_rope_kernel, types, constants, DECODE_UNHINTED if decode_ones else ()


def _matmul_case(dtype_class: str, config, decode_ones: bool = False):
    from tp_kernels.kernels.matmul import _matmul_kernel

    element = f"*{_element_type(dtype_class)}"
    types = {name: element for name in ("a_ptr", "b_ptr", "bias_ptr", "c_ptr")}
    constants = dict(stride_ak=1, stride_bk=1, stride_cn=1, HAS_BIAS=True, BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     UPCAST_OPERANDS=False, DOT_PRECISION="ieee" if dtype_class == "fp32" else "tf32")
    if decode_ones:
        constants["M"] = 1
    return "matmul", _matmul_kernel, types, constants, ()


def _qkv_variants(config, decode: bool):
    """(split_k, decode_ones, write_kv_cache, name suffix) of the compiles of one qkv config: both stores
    as configured; where the config may split K, the split-K path (for a prefill config with the KV-cache
    store only, the larger epilogue); for the decode config also as decode runs it (DECODE_ONES)."""
    for write_kv_cache in (False, True):
        yield False, False, write_kv_cache, ""
    if config.split_k:
        for write_kv_cache in (False, True) if decode else (True,):
            yield True, False, write_kv_cache, "_splitK"
    if config.split_k and decode:
        for write_kv_cache in (False, True):
            yield True, True, write_kv_cache, "_splitK_T1_kv1"


def cases() -> Iterator[tuple]:
    """(kernel name, config string, arch, jit fn, types, constants, unhinted, config) for every table
    entry. A qkv entry is compiled for head_dim 128 and, where its BLOCK_N is wider than 64, also for
    head_dim 64, whose heads cap the tile at 64 columns (the table has no such entry today)."""
    from tp_kernels.kernels import configs

    for (arch, dtype_class, m_bucket), config in configs.QKV_CONFIGS.items():
        for head_dim in (128, 64) if config.block_n > 64 else (128,):
            for split_k, decode_ones, write_kv_cache, suffix in _qkv_variants(config,
                                                                              m_bucket == configs.M_BUCKETS[0]):
                case = _qkv_case(dtype_class, head_dim, config, write_kv_cache, split_k, decode_ones)
                yield (case[0], f"{dtype_class}_M<={m_bucket}_{config}_hd{head_dim}{suffix}", arch, *case[1:],
                       config)
    for (arch, dtype_class, m_bucket), config in configs.MATMUL_CONFIGS.items():
        for decode_ones in (False, True) if m_bucket == configs.M_BUCKETS[0] else (False,):
            case = _matmul_case(dtype_class, config, decode_ones)
            yield (case[0], f"{dtype_class}_M<={m_bucket}_{config}" + ("_M1" if decode_ones else ""), arch,
                   *case[1:], config)


def compile_case(name, config_name, arch, fn, types, constants, unhinted, config) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(fn, types, constants, unhinted)
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
    return KernelResources(name, config_name, arch, registers, stack, int(compiled.metadata.shared),
                           *count_global_stores(compiled.asm["ptx"]))


# A tile known to spill (the 128x256 bf16 tile with 4 warps of DESIGN.md: REG 255, STACK 1856 on sm_90),
# compiled on request so a test can show that the spill check sees spills.
SPILL_PROBE = ("matmul_spill_probe", "sm_90", dict(block_m=128, block_n=256, block_k=64, num_warps=4, num_stages=3))


def _spill_probe_case():
    from tp_kernels.kernels.configs import TileConfig

    name, arch, fields = SPILL_PROBE
    config = TileConfig(**fields)
    _, fn, types, constants, unhinted = _matmul_case("16bit", config)
    return name, f"16bit_{config}", arch, fn, types, constants, unhinted, config


def _all_cases(spill_probe: bool) -> list:
    return list(cases()) + ([_spill_probe_case()] if spill_probe else [])


def _compile_nth(list_cases: Callable[[], list], index: int) -> KernelResources:
    return compile_case(*list_cases()[index])


def compile_all(list_cases: Callable[[], list], jobs: int = 1) -> List[KernelResources]:
    """Compile every case of list_cases() (in `jobs` processes; list_cases must pickle: a module-level
    function or a partial of one) and return their resources, in its order."""
    import triton

    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted Python functions and cannot "
                           "be compiled; run with TRITON_INTERPRET unset")
    n_cases = len(list_cases())
    if jobs <= 1:
        return [_compile_nth(list_cases, i) for i in range(n_cases)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_nth, [list_cases] * n_cases, range(n_cases)))


def collect(jobs: int = 1, spill_probe: bool = False) -> List[KernelResources]:
    """Compile every case (in `jobs` processes) and return their resources, in table order."""
    return compile_all(functools.partial(_all_cases, spill_probe), jobs)


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
