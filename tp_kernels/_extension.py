"""Loads tp_kernels._C, the compiled extension that declares every op schema (csrc/ops.cpp).

`import tp_kernels` must work even when the extension is missing or fails to load (a checkout that was
not built, a torch it was not built against), so a failure here becomes one warning that says why and
how to fix it; the ops then raise when called instead of at import.

It also says when the package was imported from a source checkout while an installed copy exists further
down sys.path: running from the checkout's root puts the tree first (the working directory comes first),
and the tree is then used, with its own _C or with none, instead of the package that was installed.
"""
import os
import sys
import warnings
from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_source_tree(package_dir: str) -> bool:
    """A checkout (setup.py and csrc/ beside the package), as opposed to an installed copy."""
    root = os.path.dirname(package_dir)
    return os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))


def shadowed_install(package_dir: str = PACKAGE_DIR, path: Optional[list] = None) -> Optional[str]:
    """The directory of another tp_kernels on sys.path when package_dir is a source tree, else None.
    (An editable install points at a tree through an import hook, not a sys.path entry, so it is not
    reported: that tree is the install.)"""
    if not _is_source_tree(package_dir):
        return None
    for entry in sys.path if path is None else path:
        candidate = os.path.join(entry or os.getcwd(), "tp_kernels")
        if (os.path.isfile(os.path.join(candidate, "__init__.py"))
                and os.path.realpath(candidate) != os.path.realpath(package_dir)):
            return candidate
    return None


def _build_hint(package_dir: str) -> str:
    if _is_source_tree(package_dir):
        return "build it in place with `pip install --no-build-isolation -e .` in that checkout"
    return "reinstall tp_kernels against the torch in this environment (`pip install --no-build-isolation .`)"


def _load_warning(exc: ImportError, package_dir: str, other: Optional[str]) -> str:
    if other:
        return (f"tp_kernels was imported from the source tree {package_dir}, whose tp_kernels._C does not load "
                f"({exc}), instead of the installed copy at {other}: the tree comes first on sys.path (the working "
                f"directory or PYTHONPATH); run from another directory, or {_build_hint(package_dir)}")
    return (f"tp_kernels._C could not be loaded ({exc}); torch.ops.tp_kernels is unavailable: "
            f"{_build_hint(package_dir)}")


def _elsewhere_warning(c_file: str, package_dir: str) -> Optional[str]:
    """When _C was found outside the package (an editable install's import hook supplies a tree that has no
    _C of its own with another tree's), the Python code and the extension come from different copies."""
    if os.path.dirname(os.path.realpath(c_file)) == os.path.realpath(package_dir):
        return None
    return (f"tp_kernels was imported from {package_dir}, but its tp_kernels._C from {c_file} (an import hook, "
            f"e.g. of an editable install elsewhere, found it: this copy has no _C of its own); "
            f"{_build_hint(package_dir)}, or run from another directory")


try:
    from tp_kernels import _C  # noqa: F401  (loading runs the TORCH_LIBRARY registrations)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc
    warnings.warn(_load_warning(exc, PACKAGE_DIR, shadowed_install()), RuntimeWarning, stacklevel=2)
else:
    _other = shadowed_install()
    _mixed = _elsewhere_warning(_C.__file__, PACKAGE_DIR)
    if _mixed:
        warnings.warn(_mixed, RuntimeWarning, stacklevel=2)
    elif _other:
        warnings.warn(f"tp_kernels was imported from the source tree {PACKAGE_DIR}, not from the installed copy "
                      f"at {_other}: the tree comes first on sys.path (the working directory or PYTHONPATH); "
                      "run from another directory to use the installed package", RuntimeWarning, stacklevel=2)


def require_extension() -> None:
    """Raise a clear error if the extension did not load."""
    if _C is None:
        raise RuntimeError(f"tp_kernels._C is not loaded ({LOAD_ERROR}); {_build_hint(PACKAGE_DIR)}")


def built_with_cuda() -> bool:
    return _C is not None and _C.built_with_cuda()
