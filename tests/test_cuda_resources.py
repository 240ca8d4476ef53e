"""Resource usage of the compiled CUDA IPC all-reduce kernels, read from the built extension with
`cuobjdump --dump-resource-usage` (no GPU needed): every kernel is there for every target architecture,
fits the 512-thread launch bound, and spills nothing (STACK:0)."""
import os
import re
import shutil
import subprocess

import pytest

from tp_kernels import _extension
from tp_kernels.comm import ipc_plan



def _expected_archs():
    """The SASS targets of TORCH_CUDA_ARCH_LIST as setup.py uses it (default "8.0;9.0a")."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    return {"sm_" + a.replace("+PTX", "").replace(".", "") for a in re.split(r"[;\s]+", arch_list.strip()) if a}


EXPECTED_ARCHS = _expected_archs()
KERNEL = "all_reduce_kernel"
N_INSTANCES = 6  # {float, Half, BFloat16} x {plain, fused}
# 64 K registers per SM / 512 threads per block: more than 128 per thread and a block cannot launch
MAX_REGISTERS = 65536 // ipc_plan.THREADS_PER_BLOCK


def _cuobjdump():
    """Triton's bundled cuobjdump if Triton is installed, else the CUDA toolkit's."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (os.path.join(cuda_home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_resource_usage(text):
    """{(arch, function): {"REG": int, "STACK": int, ...}} from cuobjdump --dump-resource-usage output."""
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function "):-1]
        elif function is not None and line.startswith("REG:"):
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def test_parse_resource_usage():
    text = ("arch = sm_90a\nResource usage:\n Common:\n  GLOBAL:0\n Function _Zkern:\n"
            "  REG:90 STACK:0 SHARED:1028 LOCAL:0 CONSTANT[0]:776 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_resource_usage(text) == {("sm_90a", "_Zkern"): {
        "REG": 90, "STACK": 0, "SHARED": 1028, "LOCAL": 0, "CONSTANT[0]": 776, "TEXTURE": 0, "SURFACE": 0,
        "SAMPLER": 0}}


def test_ipc_kernels_use_sane_resources():
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA: there are no kernels to inspect")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither Triton's bundled one nor $CUDA_HOME/bin/cuobjdump)")
    out = subprocess.run([tool, "--dump-resource-usage", _extension._C.__file__], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    kernels = {key: value for key, value in parse_resource_usage(out).items() if KERNEL in key[1]}
    archs = {arch for arch, _ in kernels}
    assert archs == EXPECTED_ARCHS, f"kernels compiled for {sorted(archs)}, expected {sorted(EXPECTED_ARCHS)}"
    for arch in archs:
        assert sum(a == arch for a, _ in kernels) == N_INSTANCES, f"{arch}: {sorted(kernels)}"
    for (arch, name), usage in kernels.items():
        assert usage["STACK"] == 0, f"{arch} {name} uses {usage['STACK']} bytes of stack (spills or local arrays)"
        assert 0 < usage["REG"] <= MAX_REGISTERS, f"{arch} {name} uses {usage['REG']} registers"
