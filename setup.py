"""Builds tp_kernels._C; the package's metadata (dependencies, extras) is in pyproject.toml.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*) are compiled
when torch was built with CUDA and nvcc is found. A GPU is not needed to build: the CUDA sources compile
and link against torch's CUDA build on a CPU-only machine, which is how CI checks them.

The extension is compiled against the torch installed in the environment it will run in: a binary built
against another torch does not load. Settings, read from the environment:
  TP_KERNELS_BUILD_CUDA   0: CPU sources only; 1: the CUDA sources too, or stop saying why; unset: CUDA when
                          torch has it and nvcc is found
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0a": A100, H100/H200)
  MAX_JOBS                how many sources compile at once (default: ninja's, the core count + 2)
  TP_KERNELS_DEBUG=1      keep debug information in the C++ objects (off by default, see CXX_FLAGS)
"""
import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(ROOT, "build")

# setuptools runs this file for every step of a build. Only these steps compile, and only they need torch:
# metadata (egg_info, dist_info) and the sdist are written without it, so `python -m build --sdist` works
# in an environment that has no torch, and pip's metadata steps skip torch's 2-5 s import.
COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}

CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-march=x86-64-v2"]
if os.environ.get("TP_KERNELS_DEBUG") != "1":
    # Python's CFLAGS bring -g, and writing debug information for torch's headers was most of a compile:
    # csrc/cpu/add_rmsnorm.cpp took 42.4 s of CPU with it and 16.4 s without (object 5.0 MB -> 0.11 MB).
    CXX_FLAGS.append("-g0")
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--threads=2"]  # --threads: the archs compile in parallel
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


CPU_SOURCES = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")


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


def _import_torch():
    """torch, from this environment or else from the one this interpreter runs in without pip's isolation.

    pip builds a package in an isolated environment that holds only the build requirements (setuptools,
    ninja), while _C must be compiled against the torch it will load. When that torch is not importable
    here, ask the same interpreter without the isolation (-E drops pip's PYTHONPATH) where it finds torch,
    and put its paths after the isolated ones; if it has no torch either, stop with one line that says what
    to run."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    probe = subprocess.run([sys.executable, "-E", "-c", "import json, sys, torch; print(json.dumps(sys.path))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit("tp_kernels: _C is compiled against the torch it will run with, and no torch is importable "
                 "here (an isolated build?): install torch first, then `pip install --no-build-isolation .` "
                 "(with python -m build: --no-isolation)")
    sys.path.extend(p for p in json.loads(probe.stdout.splitlines()[-1]) if p and p not in sys.path)
    import torch

    print(f"tp_kernels: pip isolated this build from the packages of {sys.prefix}; compiling against their torch "
          f"{torch.__version__} ({os.path.dirname(torch.__file__)})")
    return torch


def _want_cuda(torch, cuda_home):
    forced = os.environ.get("TP_KERNELS_BUILD_CUDA")
    have_nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
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


def _put_ninja_on_path():
    """torch compiles through the first `ninja` on PATH, else one source at a time. Prefer the ninja package
    of the environment that runs the build (the venv's, or the one pip's isolated build installs) over
    another on PATH: its bin/ is not on PATH when the venv is not activated, and a ninja that finds a build
    log written by another version starts over (1.11 writes format v5, 1.13 v7), so make's build and a later
    `pip install .` of the same tree would not share their objects."""
    try:
        import ninja
    except ImportError:
        return  # the ninja on PATH, if any; without one torch warns and compiles serially
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _compiled_extension():
    """(extension, build_ext command) for a step that compiles: imports torch."""
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    torch = _import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    _put_ninja_on_path()
    build_cuda = _want_cuda(torch, cuda_home)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension(
            "tp_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")] + _pip_nvidia_includes(),
            define_macros=[("TP_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        ext = CppExtension("tp_kernels._C", CPU_SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": CXX_FLAGS})
    build_temp = os.path.join(BUILD_DIR, f"temp-{'cuda' if build_cuda else 'cpu'}-torch{torch.__version__}")

    class PersistentBuildExt(BuildExtension):
        """Keeps object files in build/ (pip's editable install would use a fresh temporary directory), so
        ninja rebuilds only what changed: a second `pip install -e .` after no change takes seconds, not the
        minutes the CUDA sources take from scratch."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp
            # distutils adds <venv>/include when building in a venv; our sources include nothing from it, and
            # its path would make every object's command line differ per venv, so that `pip install .` into
            # another venv (same torch) recompiled everything instead of reusing the objects in build/.
            venv_include = os.path.join(sys.exec_prefix, "include")
            self.include_dirs = [d for d in self.include_dirs if d != venv_include]

    print(f"tp_kernels: building _C with{'' if build_cuda else 'out'} CUDA (torch {torch.__version__})")
    return ext, PersistentBuildExt.with_options(use_ninja=True)


if any(arg in COMPILING_COMMANDS for arg in sys.argv[1:]):
    extension, build_ext = _compiled_extension()
    cmdclass = {"build_ext": build_ext}
else:  # metadata or sdist only: the same extension as far as they care (name, sources), no torch
    extension, cmdclass = Extension("tp_kernels._C", CPU_SOURCES + CUDA_SOURCES), {}

setup(ext_modules=[extension], cmdclass=cmdclass)
