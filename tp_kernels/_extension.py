"""Loads tp_kernels._C, the compiled extension that declares every op schema (csrc/ops.cpp).

`import tp_kernels` must work even when the extension is missing or fails to load (a checkout that was
not built, a torch it was not built against), so a failure here becomes one warning that says why and
how to fix it; the ops then raise when called instead of at import.
"""
import warnings

import torch  # noqa: F401  (_C links against libtorch/libc10, which only torch's import loads)

try:
    from tp_kernels import _C  # noqa: F401  (loading runs the TORCH_LIBRARY registrations)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"tp_kernels._C could not be loaded ({exc}); torch.ops.tp_kernels is unavailable. "
        "Build it with `pip install -e . --no-build-isolation` against the torch in this environment.",
        RuntimeWarning,
        stacklevel=2,
    )


def require_extension() -> None:
    """Raise a clear error if the extension did not load."""
    if _C is None:
        raise RuntimeError(f"tp_kernels._C is not loaded ({LOAD_ERROR}); build it with "
                           "`pip install -e . --no-build-isolation`")


def built_with_cuda() -> bool:
    return _C is not None and _C.built_with_cuda()
