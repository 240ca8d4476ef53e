"""The cost model of the fused GEMM + collective kernels (cost_model.fused_time_s, best_form): what it must
say about decode, large M and the Flux anchor, all modeled (datasheet constants), never measured."""
import pytest
import torch

from tp_kernels.comm import ipc_plan
from tp_kernels.perf import cost_model
from tp_kernels.perf.cost_model import HARDWARE

BF16 = torch.bfloat16


def test_one_rank_is_the_gemm():
    hw = HARDWARE["H100"]
    assert cost_model.fused_time_s(64, 8192, 1024, 1, BF16, hw) == cost_model.gemm_time_s(64, 8192, 1024, BF16, hw)


@pytest.mark.parametrize("collective", cost_model.COLLECTIVES)
def test_large_m_reaches_the_overlap_bound_and_beats_the_chunks(collective):
    """Thousands of tiles in ~100 waves: the fused kernel is within 3 % of max(T_gemm, T_comm), where the
    best chunk count pays a launch, a weight re-read and a latency per chunk."""
    hw = HARDWARE["H100"]
    m, n, k = 8192, 8192, 3584
    fused = cost_model.fused_time_s(m, n, k, 8, BF16, hw, collective)
    bound = cost_model.overlap_bound_s(m, n, k, 8, BF16, hw, collective)
    chunks = cost_model.best_chunks(m, n, k, 8, BF16, hw, collective)
    assert bound <= fused <= 1.03 * bound
    assert fused < cost_model.pipeline_time_s(m, n, k, 8, BF16, hw, chunks, collective)
    assert cost_model.best_form(m, n, k, 8, BF16, hw, collective)[:2] == ("fused", 1)


def test_decode_is_one_wave_the_sum_of_gemm_and_collective():
    """One wave: nothing to overlap. One-shot all-reduce (8 ranks, 16 KB) pulls 7 partials, one phase,
    so the model puts it within 1 % of sequential and keeps the cheaper sequential form."""
    hw = HARDWARE["H100"]
    seq = cost_model.pipeline_time_s(1, 8192, 1024, 8, BF16, hw, 1)
    assert ipc_plan.choose_algorithm(8192 * 2, 8, hw) == "one_shot"  # what the launcher picks here
    fused = cost_model.fused_time_s(1, 8192, 1024, 8, BF16, hw, algo="one_shot")
    assert fused == pytest.approx(seq, rel=0.02)
    form, chunks, t = cost_model.best_form(1, 8192, 1024, 8, BF16, hw, algo="one_shot")
    assert t == min(seq, fused) and chunks == 1


def test_flux_anchor_between_chunked_and_ceiling():
    """Flux's GEMM + reduce-scatter (M=4096, N=12288, K=49152 over 8 H800s; published 1.51x): the
    modeled fused speedup beats the modeled chunk pipeline's and stays under the ceiling 1 + min/max."""
    hw = HARDWARE["H800"]
    m, n, k = 4096, 12288, 49152 // 8
    seq = cost_model.pipeline_time_s(m, n, k, 8, BF16, hw, 1, "reduce_scatter")
    chunked = cost_model.pipeline_time_s(m, n, k, 8, BF16, hw, cost_model.best_chunks(m, n, k, 8, BF16, hw,
                                                                                     "reduce_scatter"),
                                        "reduce_scatter")
    fused = cost_model.fused_time_s(m, n, k, 8, BF16, hw, "reduce_scatter")
    g = cost_model.gemm_time_s(m, n, k, BF16, hw)
    c = cost_model.collective_time_s(m * n * 2, 8, hw, "reduce_scatter")
    assert seq / chunked < seq / fused <= 1 + min(g, c) / max(g, c)


def test_bad_collective_or_algo_raises():
    with pytest.raises(ValueError, match="collective must be one of"):
        cost_model.fused_time_s(8, 8, 8, 2, BF16, HARDWARE["H100"], "broadcast")
    with pytest.raises(ValueError, match="algo must be one of"):
        cost_model.fused_time_s(8, 8, 8, 2, BF16, HARDWARE["H100"], algo="three_shot")
