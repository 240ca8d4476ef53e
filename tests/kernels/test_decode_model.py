"""The latency-bound part of the cost model (tp_kernels.perf.cost_model: streaming_bandwidth_gbps,
latency_bound_time_s) that bench/qkv_rope.py --modeled uses for decode: Little's law, capped at the HBM
peak and at the resident programs."""
import pytest

from tp_kernels.perf import cost_model


def test_latency_bound_streaming_follows_littles_law():
    hw = cost_model.HARDWARE["H100"]
    latency_s = cost_model.MEMORY_LATENCY[hw.name].dram_latency_ns * 1e-9
    # the old decode tiles of issue 18: 40 programs with ~12 KB in flight each -> ~0.7 TB/s
    assert cost_model.streaming_bandwidth_gbps(40, 12 * 1024, hw) == pytest.approx(40 * 12 * 1024 / latency_s / 1e9)
    assert 600 < cost_model.streaming_bandwidth_gbps(40, 12 * 1024, hw) < 800
    # enough in flight: the HBM peak, never more
    assert cost_model.streaming_bandwidth_gbps(160, 24 * 1024, hw) == hw.hbm_gbps
    # resident programs are capped at SMs x programs per SM
    assert cost_model.streaming_bandwidth_gbps(10 ** 4, 1024, hw, programs_per_sm=2) == pytest.approx(
        132 * 2 * 1024 / latency_s / 1e9)


def test_latency_bound_time_is_the_roofline_when_enough_is_in_flight():
    hw = cost_model.HARDWARE["H100"]
    flops, weight_bytes = 2.0 * 1280 * 8192, 1280 * 8192 * 2  # Llama-70B TP=8 QKV, one token, bf16
    floor = cost_model.roofline_time_s(flops, weight_bytes, hw)
    assert cost_model.latency_bound_time_s(flops, weight_bytes, 160, 24 * 1024, hw) == floor
    assert cost_model.latency_bound_time_s(flops, weight_bytes, 40, 12 * 1024, hw) > 4 * floor


def test_bench_qkv_rope_modeled_rows():
    """`python bench/qkv_rope.py --modeled`, as the README prints it: Llama-70B at TP=8 decodes one token
    with >= 132 programs, modeled at the floor, and the pre-split-K tiles it replaced are modeled latency-
    bound (~30 us, 40 programs)."""
    import csv
    import os
    import subprocess
    import sys

    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "bench/qkv_rope.py", "--modeled"], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(repo_root, "bench", "results", "qkv_rope.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["config"].startswith("model=llama3-70b tp=8")
                and r["shape"].startswith("T=1 ")]
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"unfused", "fused", "fused-before"} and all(r["kind"] == "modeled" for r in rows)
    programs = {case: int(r["config"].split("programs=")[1]) for case, r in by_case.items() if case != "unfused"}
    assert programs == {"fused": 160, "fused-before": 40}, programs
    fused, before = float(by_case["fused"]["median_us"]), float(by_case["fused-before"]["median_us"])
    assert fused < 7 and 25 < before < 35, (fused, before)
