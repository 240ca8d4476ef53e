"""ColumnParallelLinear / RowParallelLinear with sequence_parallel=True against the unsharded nn.Linear
pair, at world sizes 1, 2 and 4 on CPU ranks; the chunk planner and calibration across ranks."""
import os

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, spawn_ranks
from tp_kernels.perf import calibration, cost_model
from tp_kernels.layers import ColumnParallelLinear, RowParallelLinear
from tp_kernels.ops import overlap_plan


def _mlp_rank(tp, x, up, down, chunks):
    """Sequence-parallel column then row linear: rank r holds tokens [r T/p, (r+1) T/p) in and out."""
    col = ColumnParallelLinear.from_linear(up, tp, sequence_parallel=True, chunks=chunks)
    row = RowParallelLinear.from_linear(down, tp, sequence_parallel=True, chunks=chunks)
    tokens_per_rank = x.shape[0] // tp.world_size
    block = x[tp.rank * tokens_per_rank:(tp.rank + 1) * tokens_per_rank]  # (T / p, B, in)
    with torch.no_grad():  # outputs cross the process boundary, which autograd's graph cannot
        hidden = col(block)  # (T, B, hidden / p)
        out = row(hidden)  # (T / p, B, out)
    if tp.world_size > 1:  # every T divides by 1: nothing to reject there
        with pytest.raises(ValueError, match="T divisible by tp"):
            row(hidden[:1])
    return hidden.shape, out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sequence_parallel_mlp_matches_unsharded(world_size):
    seq, batch, d_in, d_hidden, d_out = 3 * world_size, 2, 16, 24, 12
    up, down = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)
    x = torch.randn(seq, batch, d_in)
    with torch.no_grad():
        expected = down.double()(up.double()(x.double()))  # (T, B, out)
    up, down = up.float(), down.float()
    for chunks in (None, 2):
        results = spawn_ranks(world_size, _mlp_rank, x, up, down, chunks)
        for rank, (hidden_shape, out) in enumerate(results):
            assert tuple(hidden_shape) == (seq, batch, d_hidden // world_size)
            rows = slice(rank * seq // world_size, (rank + 1) * seq // world_size)
            assert_close(out, expected[rows], torch.float32, reduction_len=d_in + d_hidden,
                         msg=f"rank {rank} chunks={chunks}")


def _calibrate_rank(tp, cache_dir):
    os.environ[calibration.CACHE_ENV] = cache_dir
    x = torch.randn(4096, 64)
    plan = lambda: overlap_plan.plan_chunks(None, tp, x, 4096, 8192, 1024, 4096, "all_reduce")  # noqa: E731
    uncalibrated = plan(), calibration.hardware_for(tp, x.device), os.listdir(cache_dir)
    measured = calibration.calibrate(tp, force=True)
    cached = calibration.calibrate(tp)
    in_use = calibration.hardware_for(tp, x.device)
    calibration.set_hardware(tp, cost_model.HARDWARE["H100"])
    planned = plan()
    calibration.set_hardware(tp, None)
    return uncalibrated, measured, cached, in_use is cached, planned


def test_calibration_is_explicit_identical_on_every_rank_and_cached(tmp_path):
    results = spawn_ranks(2, _calibrate_rank, str(tmp_path))
    (uncalibrated0, measured0, cached0, in_use0, planned0), (uncalibrated1, measured1, cached1, in_use1, planned1) = results
    # before tp_kernels.calibrate: one chunk on CPU, no constants, nothing written
    assert uncalibrated0 == uncalibrated1 == (1, None, [])
    assert in_use0 and in_use1  # calibrate() sets what the ops plan with
    fields = ("tflops_fp32", "tflops_bf16", "hbm_gbps", "link_gbps", "link_latency_us", "launch_overhead_us",
              "overlap_efficiency")
    for name in fields:
        assert getattr(measured0, name) == getattr(measured1, name), name  # the group's mean, on every rank
        assert getattr(cached0, name) == getattr(measured0, name), name  # rank 0's cache, sent to both
        assert getattr(measured0, name) > 0 or name == "overlap_efficiency", name
    assert 0.0 <= measured0.overlap_efficiency <= 1.0
    assert "cached" in cached0.source and "cached" in cached1.source
    assert len(os.listdir(tmp_path)) == 1
    # set_hardware overrides the plan on every rank alike
    expected = cost_model.best_chunks(4096, 8192, 1024, 2, torch.float32, cost_model.HARDWARE["H100"])
    assert planned0 == planned1 == expected
