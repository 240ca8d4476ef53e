"""The latency-bound part of the cost model (tp_kernels.perfmodel: streaming_bandwidth_gbps,
latency_bound_time_s) that bench/qkv_rope.py --modeled uses for decode: Little's law, capped at the HBM
peak and at the resident programs."""
import pytest

from tp_kernels import perfmodel


def test_latency_bound_streaming_follows_littles_law():
    hw = perfmodel.HARDWARE["H100"]
    latency_s = perfmodel.MEMORY_LATENCY[hw.name].dram_latency_ns * 1e-9
    # the old decode tiles of issue 18: 40 programs with ~12 KB in flight each -> ~0.7 TB/s
    assert perfmodel.streaming_bandwidth_gbps(40, 12 * 1024, hw) == pytest.approx(40 * 12 * 1024 / latency_s / 1e9)
    assert 600 < perfmodel.streaming_bandwidth_gbps(40, 12 * 1024, hw) < 800
    # enough in flight: the HBM peak, never more
    assert perfmodel.streaming_bandwidth_gbps(160, 24 * 1024, hw) == hw.hbm_gbps
    # resident programs are capped at SMs x programs per SM
    assert perfmodel.streaming_bandwidth_gbps(10 ** 4, 1024, hw, programs_per_sm=2) == pytest.approx(
        132 * 2 * 1024 / latency_s / 1e9)


def test_latency_bound_time_is_the_roofline_when_enough_is_in_flight():
    hw = perfmodel.HARDWARE["H100"]
    flops, weight_bytes = 2.0 * 1280 * 8192, 1280 * 8192 * 2  # Llama-70B TP=8 QKV, one token, bf16
    floor = perfmodel.roofline_time_s(flops, weight_bytes, hw)
    assert perfmodel.latency_bound_time_s(flops, weight_bytes, 160, 24 * 1024, hw) == floor
    assert perfmodel.latency_bound_time_s(flops, weight_bytes, 40, 12 * 1024, hw) > 4 * floor
