"""Every launch config of the Triton kernels compiles ahead of time for sm_80 and sm_90 without a GPU,
with no register spills and shared memory within the device limit.

The compiles run in subprocesses, through the README's command (`python bench/kernel_resources.py`,
which writes bench/results/kernel_resources.csv), because this test session has TRITON_INTERPRET=1 set
(conftest), under which @triton.jit kernels are interpreted Python and cannot be compiled. Triton caches
the compiles (~/.triton/cache or TRITON_CACHE_DIR), so reruns take seconds of compute (~45 s of wall
time on the loaded 2-core VM).
"""
import csv
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="ahead-of-time compiles need triton (absent with the CPU-only torch)")

from tp_kernels.kernels import configs, resources  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPILE_TIMEOUT_S = 500  # under pytest-timeout's 600 s; cold cache, 2 loaded cores: 108 s measured for 36 kernels
# + probe, ~3-4 min for today's 68
PROBE_SCRIPT = """
import dataclasses, json
from tp_kernels.kernels import resources
print(json.dumps(dataclasses.asdict(resources.compile_case(*resources._spill_probe_case()))))
"""


def _run(args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def compiled():
    _run(["bench/kernel_resources.py"])  # the README's command, as printed there
    with open(os.path.join(REPO_ROOT, "bench", "results", "kernel_resources.csv")) as f:
        rows = [{k: (int(v) if v.isdigit() else v) for k, v in row.items()} for row in csv.DictReader(f)]
    probe = [json.loads(line) for line in _run(["-c", PROBE_SCRIPT]).splitlines() if line.startswith("{")]
    return rows, probe


def test_every_config_compiles_for_sm80_and_sm90(compiled):
    rows, _ = compiled
    for arch in configs.ARCHS:
        for kernel, table in (("qkv_rope", configs.QKV_CONFIGS), ("qkv_rope_kv_cache", configs.QKV_CONFIGS),
                              ("matmul", configs.MATMUL_CONFIGS)):
            for (table_arch, dtype_class, m_bucket), config in table.items():
                if table_arch != arch:
                    continue
                name = f"{dtype_class}_M<={m_bucket}_{config}"
                assert any(r["kernel"] == kernel and r["arch"] == arch and r["config"].startswith(name)
                           for r in rows), f"{kernel} {name} was not compiled for {arch}"


def test_no_spills_and_shared_memory_within_limit(compiled):
    rows, _ = compiled
    spilled = [r for r in rows if r["spills"] > 0]
    assert not spilled, f"configs that spill registers: {spilled}"
    over = [r for r in rows if r["shared_bytes"] > configs.SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not over, f"configs over the shared-memory limit: {over}"
    assert all(0 < r["registers"] <= 255 for r in rows), rows


def test_decode_variants_compile_as_decode_runs_them(compiled):
    """Triton turns an int argument equal to 1 into a constant, so decode (T = 1, one KV head per rank)
    runs kernels that a 16-divisible hint never compiles; they are compiled, and fit, too."""
    rows, _ = compiled
    for arch in configs.ARCHS:
        for dtype_class in configs.DTYPE_CLASSES:
            for kernel, suffix in (("qkv_rope", "_splitK_T1_kv1"), ("qkv_rope_kv_cache", "_splitK_T1_kv1"),
                                   ("qkv_rope", "_splitK"), ("matmul", "_M1")):
                decode = f"{dtype_class}_M<=16"
                assert any(r["kernel"] == kernel and r["arch"] == arch and r["config"].startswith(decode)
                           and r["config"].endswith(suffix) for r in rows), (kernel, arch, dtype_class, suffix)


def test_neox_prefill_stores_are_vector_stores(compiled):
    """qkv's neox epilogue stores the rotated halves of a tile as two contiguous blocks: every global
    store of the prefill configs is a vector store (before, 32 scalar st.global.b16 per tile on sm_90)."""
    rows, _ = compiled
    prefill = [r for r in rows if r["kernel"].startswith("qkv_rope") and "_M<=16_" not in r["config"]]
    # 2 archs x 2 dtype classes x 2 buckets x (2 kernels + the split-K path with the KV-cache store)
    assert len(prefill) == 2 * 2 * 2 * 3, prefill
    scalar = [r for r in prefill if r["scalar_stores"] or not r["vector_stores"]]
    assert not scalar, f"prefill qkv configs with scalar global stores: {scalar}"


def test_count_global_stores():
    ptx = ("@%p1 st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };\n"
           "@%p2 st.global.b16 [ %rd2 + 0 ], { %rs1 };\n st.global.v2.b32 [ %rd3 ], { %r5, %r6 };\n"
           "ld.global.b16 %rs2, [ %rd4 ];\n st.shared.b32 [ %r7 ], %r8;\n")
    assert resources.count_global_stores(ptx) == (2, 1)


def test_spill_check_sees_a_spilling_tile(compiled):
    """The check above can fail: a tile known to spill reports STACK > 0 through the same path."""
    _, probe = compiled
    assert len(probe) == 1 and probe[0]["spills"] > 0, probe


def test_parse_resource_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _matmul_kernel:\n"
            "  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:412 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert resources.parse_resource_usage(text) == (168, 16)
    with pytest.raises(RuntimeError, match="no REG:/STACK:"):
        resources.parse_resource_usage("Function f:\n")


# ----------------------------------------------------------------------------------------------------------
# fused GEMM + collective kernels (tp_kernels/kernels/gemm_collective*.py): their own compile run and table
# ----------------------------------------------------------------------------------------------------------
FUSED_COMPILE_TIMEOUT_S = 500  # cold cache, 2 loaded cores: 145-270 s measured (48 kernels, 40 distinct)


@pytest.fixture(scope="module")
def fused_compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "tp_kernels.kernels.gemm_collective_resources"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=FUSED_COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"ahead-of-time compile of the fused kernels failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_fused_kernels_compile_for_every_config_without_spills(fused_compiled):
    from tp_kernels.kernels import gemm_collective_resources

    expected = {(kernel, config, arch) for kernel, config, arch, *_ in gemm_collective_resources.cases()}
    assert {(r["kernel"], r["config"], r["arch"]) for r in fused_compiled} == expected
    assert {arch for _, _, arch in expected} == set(configs.ARCHS)
    spilled = [r for r in fused_compiled if r["spills"] > 0]
    assert not spilled, f"fused configs that spill registers: {spilled}"
    over = [r for r in fused_compiled if r["shared_bytes"] > configs.SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not over, f"fused configs over the shared-memory limit: {over}"
    assert all(0 < r["registers"] <= 255 for r in fused_compiled), fused_compiled
