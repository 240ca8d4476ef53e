"""The cost model of the fused GEMM + collective kernels (perfmodel.fused_time_s, best_form): what it must
say about decode, large M and the Flux anchor, all modeled (datasheet constants), never measured."""
import pytest
import torch

from tp_kernels import perfmodel
from tp_kernels.perfmodel import HARDWARE

BF16 = torch.bfloat16


def test_one_rank_is_the_gemm():
    hw = HARDWARE["H100"]
    assert perfmodel.fused_time_s(64, 8192, 1024, 1, BF16, hw) == perfmodel.gemm_time_s(64, 8192, 1024, BF16, hw)


@pytest.mark.parametrize("collective", perfmodel.COLLECTIVES)
def test_large_m_reaches_the_overlap_bound_and_beats_the_chunks(collective):
    """Thousands of tiles in ~100 waves: the fused kernel is within 3 % of max(T_gemm, T_comm), where the
    best chunk count pays a launch, a weight re-read and a latency per chunk."""
    hw = HARDWARE["H100"]
    m, n, k = 8192, 8192, 3584
    fused = perfmodel.fused_time_s(m, n, k, 8, BF16, hw, collective)
    bound = perfmodel.overlap_bound_s(m, n, k, 8, BF16, hw, collective)
    chunks = perfmodel.best_chunks(m, n, k, 8, BF16, hw, collective)
    assert bound <= fused <= 1.03 * bound
    assert fused < perfmodel.pipeline_time_s(m, n, k, 8, BF16, hw, chunks, collective)
    assert perfmodel.best_form(m, n, k, 8, BF16, hw, collective)[:2] == ("fused", 1)


def test_decode_is_one_wave_the_sum_of_gemm_and_collective():
    """One wave: nothing to overlap. One-shot all-reduce (8 ranks, 16 KB) pulls 7 partials, one phase,
    so the model puts it within 1 % of sequential and keeps the cheaper sequential form."""
    hw = HARDWARE["H100"]
    seq = perfmodel.pipeline_time_s(1, 8192, 1024, 8, BF16, hw, 1)
    fused = perfmodel.fused_time_s(1, 8192, 1024, 8, BF16, hw)
    assert fused == pytest.approx(seq, rel=0.02)
    form, chunks, t = perfmodel.best_form(1, 8192, 1024, 8, BF16, hw)
    assert t == min(seq, fused) and chunks == 1


def test_flux_anchor_between_chunked_and_ceiling():
    """Flux's GEMM + reduce-scatter (M=4096, N=12288, K=49152 over 8 H800s; published 1.51x): the
    modeled fused speedup beats the modeled chunk pipeline's and stays under the ceiling 1 + min/max."""
    hw = HARDWARE["H800"]
    m, n, k = 4096, 12288, 49152 // 8
    seq = perfmodel.pipeline_time_s(m, n, k, 8, BF16, hw, 1, "reduce_scatter")
    chunked = perfmodel.pipeline_time_s(m, n, k, 8, BF16, hw, perfmodel.best_chunks(m, n, k, 8, BF16, hw,
                                                                                     "reduce_scatter"),
                                        "reduce_scatter")
    fused = perfmodel.fused_time_s(m, n, k, 8, BF16, hw, "reduce_scatter")
    g = perfmodel.gemm_time_s(m, n, k, BF16, hw)
    c = perfmodel.collective_time_s(m * n * 2, 8, hw, "reduce_scatter")
    assert seq / chunked < seq / fused <= 1 + min(g, c) / max(g, c)


def test_bad_collective_raises():
    with pytest.raises(ValueError, match="collective must be one of"):
        perfmodel.fused_time_s(8, 8, 8, 2, BF16, HARDWARE["H100"], "broadcast")
