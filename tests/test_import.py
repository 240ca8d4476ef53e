"""`import tp_kernels` is lean: no CUDA initialization, and it survives a missing extension with one warning."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_import_does_not_initialize_cuda():
    proc = _run("import torch, tp_kernels, tp_kernels.layers, tp_kernels.ops\n"
                "assert not torch.cuda.is_initialized(), 'import initialized CUDA'\n"
                "print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_import_without_extension_warns_once_and_ops_raise():
    # Block tp_kernels._C as if it had not been built.
    code = (
        "import sys, warnings, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'tp_kernels._C': raise ImportError('simulated: extension not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, tp_kernels\n"
        "mine = [w for w in caught if 'tp_kernels._C' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "assert 'simulated: extension not built' in str(mine[0].message)\n"
        "try:\n"
        "    tp_kernels.ops.all_reduce(torch.ones(2), tp_kernels.TPGroup.single())\n"
        "except RuntimeError as e:\n"
        "    assert 'tp_kernels._C is not loaded' in str(e), e\n"
        "    print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_extension_was_built_as_expected():
    """The main environment (torch's CUDA build + nvcc) must include the CUDA sources: that is how CI checks
    they compile and link. The CPU-only-torch run of the suite sets TP_KERNELS_EXPECT_CUDA_BUILD=0."""
    from tp_kernels import _extension

    assert _extension._C is not None, f"tp_kernels._C failed to load: {_extension.LOAD_ERROR}"
    expected = os.environ.get("TP_KERNELS_EXPECT_CUDA_BUILD")
    if expected is None:
        nvcc = any(os.path.exists(os.path.join(d, "bin", "nvcc"))
                   for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"))
        if torch.version.cuda is None or not nvcc:
            pytest.skip("this torch has no CUDA or nvcc is missing: the CUDA sources are not expected to build")
        expected = "1"
    assert _extension.built_with_cuda() == (expected == "1")
