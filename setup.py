"""Builds tp_kernels._C.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are
compiled when torch was built with CUDA and nvcc is found; TP_KERNELS_BUILD_CUDA=0/1 overrides that.
A GPU is not needed to build: the CUDA sources compile and link against torch's CUDA build on a
CPU-only machine, which is how CI checks them.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit root. torch guesses it from `which nvcc`, which is wrong when nvcc is a wrapper
    script in /usr/local/bin (it would pick /usr/local), so resolve it before torch looks."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("TP_KERNELS_BUILD_CUDA")
    have_nvcc = _cuda_home is not None and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
    if forced is not None and forced not in ("0", "1"):
        sys.exit(f"TP_KERNELS_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1":
        if torch.version.cuda is None:
            sys.exit("TP_KERNELS_BUILD_CUDA=1 but this torch has no CUDA (torch.version.cuda is None)")
        if not have_nvcc:
            sys.exit("TP_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if forced == "0":
        return False
    return torch.version.cuda is not None and have_nvcc


def _pip_nvidia_includes():
    """torch's CUDA headers include e.g. cusparse.h, which /usr/local/cuda may lack; the pip nvidia
    packages that torch's CUDA build depends on ship them."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/nccl/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


cxx_flags = ["-O3", "-fvisibility=hidden", "-march=x86-64-v2"]
build_cuda = _want_cuda()
sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    ext = CUDAExtension(
        "tp_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _pip_nvidia_includes(),
        define_macros=[("TP_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "--threads=2"]},
    )
else:
    ext = CppExtension(
        "tp_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )


class PersistentBuildExt(BuildExtension):
    """Keeps object files in build/ (pip's editable install would use a fresh temporary directory), so
    ninja rebuilds only what changed: a second `pip install -e .` after no change takes seconds, not the
    minutes the CUDA sources take from scratch."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-{'cuda' if build_cuda else 'cpu'}-torch{torch.__version__}")


print(f"tp_kernels: building _C with{'' if build_cuda else 'out'} CUDA (torch {torch.__version__})")

setup(
    name="tp_kernels",
    version="0.1.0",
    packages=find_packages(include=["tp_kernels", "tp_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": PersistentBuildExt.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
