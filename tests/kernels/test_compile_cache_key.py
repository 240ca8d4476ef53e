"""torch.compile's AOTAutograd cache key covers the Triton kernels of qkv_rope / qkv_rope_kv_cache and the
launch code that picks their configs (issue 18, item 11).

A graph compiled by torch.compile holds the op's kernel with the tile sizes and split-K choice of the
moment baked in; its AOTAutograd cache key is computed from the graph before that, so it reads the
kernels that torch._library.triton.triton_ops_to_kernels lists for each op (their source, the jit
functions they call and the constexpr globals they use). tp_kernels/ops/triton_impls.py lists the kernel
and qkv._launch_code_key, whose LAUNCH_CODE_DIGEST hashes configs.py, launch.py and qkv.py.

The test computes the key's Triton part with torch's own code (AOTAutogradCacheDetails.
get_triton_source_codes_from_gm) for a graph calling both ops, in a copy of the package whose configs.py
is edited, and checks that the edit changes it (against an unedited copy). Subprocesses, since
this session sets TRITON_INTERPRET=1, under which the kernels are interpreted functions.
"""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")

from tp_kernels._extension import _C  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO_ROOT, "tp_kernels")

KEY_SCRIPT = r'''
import hashlib
import torch
import tp_kernels.ops  # noqa: F401  (registers the ops and their kernels)
from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCacheDetails


def f(x, w, cos_sin, positions, batch_index, k_cache, v_cache):
    q, k, v = torch.ops.tp_kernels.qkv_rope.default(x, w, None, cos_sin, positions, 2, 1, 64, "neox")
    q2 = torch.ops.tp_kernels.qkv_rope_kv_cache.default(x, w, None, cos_sin, positions, batch_index, k_cache,
                                                        v_cache, 2, 1, 64, "neox")
    return q + q2, k, v


gm = torch.fx.symbolic_trace(f)
details = AOTAutogradCacheDetails.__new__(AOTAutogradCacheDetails)  # only the method that reads the kernels
sources = details.get_triton_source_codes_from_gm(gm)
assert len(sources) == 4 and all("def _qkv_rope_kernel" in s or "LAUNCH_CODE_DIGEST" in s for s in sources), sources
print("KEY", hashlib.sha256("\n".join(sources).encode()).hexdigest(), tp_kernels.__file__)
'''


def _key(package_parent: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=package_parent)
    proc = subprocess.run([sys.executable, "-c", KEY_SCRIPT], cwd=package_parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, key, package_file = next(line for line in proc.stdout.splitlines() if line.startswith("KEY ")).split()
    assert package_file.startswith(package_parent), f"imported {package_file}, not the copy in {package_parent}"
    return key


def _package_copy(parent: str, configs_edit=None) -> str:
    """tp_kernels linked file by file under parent (so the copy imports the same sources and extension),
    with configs.py replaced by an edited copy when configs_edit = (old text, new text)."""
    shutil.copytree(PACKAGE, os.path.join(parent, "tp_kernels"), copy_function=os.symlink,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if configs_edit is not None:
        path = os.path.join(parent, "tp_kernels", "kernels", "configs.py")
        text = open(path).read()
        assert configs_edit[0] in text, f"configs.py no longer has {configs_edit[0]!r}: update this test"
        os.unlink(path)
        with open(path, "w") as f:
            f.write(text.replace(configs_edit[0], configs_edit[1]))
    return parent


@pytest.mark.skipif(_C is None, reason="tp_kernels._C (the op schemas) is not built")
def test_editing_a_config_changes_the_compile_cache_key(tmp_path):
    original = _key(_package_copy(str(tmp_path / "same")))
    # the 16-bit decode tile: 256 deep in K -> 128
    edited = _key(_package_copy(str(tmp_path / "edited"), ('"16bit": {16: (16, 16, 256, True)',
                                                           '"16bit": {16: (16, 16, 128, True)')))
    assert edited != original, "an edit of configs.py left torch's compile-cache key unchanged"


def test_launch_code_digest_hashes_the_files_in_order(tmp_path):
    from tp_kernels.kernels import launch

    class Module:
        def __init__(self, path):
            self.__file__ = str(path)

    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    expected = int(hashlib.sha256(b"x = 1\ny = 2\n").hexdigest()[:15], 16)
    assert launch.source_digest(Module(a), Module(b)) == expected
    b.write_text("y = 3\n")
    assert launch.source_digest(Module(a), Module(b)) != expected
