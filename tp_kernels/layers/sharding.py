"""What every parallel layer does the same way: checked division of sizes, slicing full tensors (or the lazy
slices of safetensors' get_slice) into this rank's shard, nn.Linear's initialization at the full fan-in,
and the checks of the group and of the input."""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch
import torch.nn as nn

from tp_kernels.distributed import TPGroup


def check_size(name: str, value) -> int:
    """value as an int, which must be a positive integer (a layer of zero or negative width would build
    and then compute nothing, or fail much later)."""
    try:
        size = operator.index(value)  # ints and integer-like (numpy) values, not floats
    except TypeError:
        size = None
    if isinstance(value, bool) or size is None or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return size


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, which must divide evenly; `what` names the quantities in the error."""
    if numerator % denominator:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


def full_shape(t) -> Tuple[int, ...]:
    """Shape of a tensor or of a safetensors slice (which has get_shape() instead of .shape)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def expect_shape(name: str, t, expected: Tuple[int, ...]) -> None:
    if full_shape(t) != tuple(expected):
        raise ValueError(f"{name} must have the full unsharded shape {tuple(expected)}, got {full_shape(t)}")


def rows_of(t, start: int, stop: int) -> torch.Tensor:
    return t[start:stop]


def cols_of(t, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop]


def copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shard has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def check_bias_given(bias, layer_bias: Optional[torch.Tensor]) -> None:
    """load_full's bias: a full one exactly when the layer was built with one."""
    if (bias is None) != (layer_bias is None):
        raise ValueError(f"bias given: {bias is not None}, but the layer was built with bias={layer_bias is not None}")


def init_linear_(weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in: int) -> None:
    """nn.Linear's default initialization, with the fan-in of the full (unsharded) layer."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        nn.init.uniform_(weight, -bound, bound)
        if bias is not None:
            nn.init.uniform_(bias, -bound, bound)


def check_tp(tp) -> TPGroup:
    if not isinstance(tp, TPGroup):
        raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
    return tp


def check_input(layer: str, x: torch.Tensor, in_features: int, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input must be (..., {in_features}), got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{layer}: input dtype {x.dtype} does not match the weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the weight is on {weight.device}")


def check_sequence_split(layer: str, x: torch.Tensor, tp: TPGroup) -> None:
    """Sequence parallelism splits the first (token) dimension T into p blocks of T / p."""
    if x.dim() < 2 or x.shape[0] % tp.world_size:
        raise ValueError(f"{layer}: with sequence_parallel=True the input must be (T, ..., features) with T "
                         f"divisible by tp={tp.world_size}, got shape {tuple(x.shape)}")
