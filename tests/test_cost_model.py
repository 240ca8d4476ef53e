"""The overlap cost model: T(k) pieces, best_chunks's guarantees (1 for M=1, non-decreasing in M), and
the choices it must make (no chunking without overlap, chunking for large M on an H100)."""
import dataclasses

import pytest
import torch

from tp_kernels.perf import cost_model
from tp_kernels.perf.cost_model import HARDWARE, best_chunks, pipeline_time_s

SHAPES = [(8192, 1024), (8192, 3584), (4096, 4096), (512, 64)]  # (N, K per rank)
# A CPU-like host where the collective cannot overlap the GEMM, and one where it is slow and overlaps
NO_OVERLAP = dataclasses.replace(HARDWARE["H100"], name="no-overlap", overlap_efficiency=0.0)
SLOW_LINK = dataclasses.replace(HARDWARE["A100"], name="slow-link", link_gbps=20.0, link_latency_us=50.0)
HWS = [HARDWARE["H100"], HARDWARE["A100"], HARDWARE["H800"], NO_OVERLAP, SLOW_LINK]


@pytest.mark.parametrize("collective", cost_model.COLLECTIVES)
def test_one_row_is_one_chunk(collective):
    for hw in HWS:
        for n, k in SHAPES:
            for world_size in (2, 8):
                assert best_chunks(1, n, k, world_size, torch.bfloat16, hw, collective) == 1


@pytest.mark.parametrize("collective", cost_model.COLLECTIVES)
def test_choice_never_decreases_with_m(collective):
    for hw in HWS:
        for n, k in SHAPES:
            for dtype in (torch.bfloat16, torch.float32):
                choices = [best_chunks(m, n, k, 8, dtype, hw, collective) for m in range(1, 1200, 7)]
                choices += [best_chunks(m, n, k, 8, dtype, hw, collective) for m in (2048, 4096, 8192, 16384)]
                assert choices == sorted(choices), (hw.name, n, k, dtype, choices)
                assert all(1 <= c <= cost_model.MAX_CHUNKS for c in choices)


def test_one_rank_and_no_overlap_give_one_chunk():
    for m in (1, 64, 8192):
        assert best_chunks(m, 8192, 1024, 1, torch.bfloat16, HARDWARE["H100"]) == 1
        assert best_chunks(m, 8192, 1024, 8, torch.bfloat16, NO_OVERLAP) == 1


def test_h100_chunks_large_m_and_not_decode():
    hw = HARDWARE["H100"]
    assert best_chunks(8, 8192, 1024, 8, torch.bfloat16, hw) == 1  # decode: the weight read dominates
    assert best_chunks(8192, 8192, 1024, 8, torch.bfloat16, hw) > 1
    seq = pipeline_time_s(8192, 8192, 1024, 8, torch.bfloat16, hw, 1)
    best = min(pipeline_time_s(8192, 8192, 1024, 8, torch.bfloat16, hw, c) for c in range(1, 9))
    bound = cost_model.overlap_bound_s(8192, 8192, 1024, 8, torch.bfloat16, hw)
    assert bound <= best < seq


def test_one_chunk_is_gemm_plus_collective():
    hw = HARDWARE["A100"]
    m, n, k = 300, 1024, 512
    g = cost_model.gemm_time_s(m, n, k, torch.float16, hw)
    c = cost_model.collective_time_s(m * n * 2, 4, hw, "all_reduce")
    assert pipeline_time_s(m, n, k, 4, torch.float16, hw, 1) == pytest.approx(g + c, rel=1e-12)
    # an all-reduce sends twice the bytes of a reduce-scatter
    rs = cost_model.collective_time_s(m * n * 2, 4, hw, "reduce_scatter")
    lat = hw.link_latency_us * 1e-6
    assert c - lat == pytest.approx(2 * (rs - lat), rel=1e-12)


def test_bad_arguments_raise():
    hw = HARDWARE["H100"]
    with pytest.raises(ValueError, match="collective must be one of"):
        best_chunks(16, 8, 8, 2, torch.float32, hw, "broadcast")
    with pytest.raises(ValueError, match="m, n, k must be >= 1"):
        best_chunks(0, 8, 8, 2, torch.float32, hw)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        pipeline_time_s(16, 8, 8, 2, torch.float32, hw, 0)
