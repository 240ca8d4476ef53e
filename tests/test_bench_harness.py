"""The benchmark harness (bench/): common.py's statistics and CSV round trip, the modeled decode step's
arithmetic, run_all's family list and summary, decode_e2e's backend forcing and CLI."""
import math
import os
import subprocess
import sys

import pytest
import torch

from tp_kernels import perfmodel_decode as pd
from tp_kernels.perfmodel import HARDWARE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, "bench")
# The bench scripts import each other as top-level modules (`from common import ...`): run as
# `python bench/x.py`, bench/ is first on sys.path and tp_kernels is the installed package. Import them the
# same way here, and take bench/ off sys.path again so nothing imported later resolves there.
_saved_path = list(sys.path)
sys.path.insert(0, BENCH_DIR)
import common  # noqa: E402
import decode_e2e  # noqa: E402
import decode_model  # noqa: E402
import run_all  # noqa: E402

sys.path[:] = _saved_path


# ----------------------------------------------------------------------------------------------------------
# common.py
# ----------------------------------------------------------------------------------------------------------
def test_quantiles_interpolate_between_order_statistics():
    samples = torch.randperm(11).double().tolist()  # 0..10 in random order
    timing = common.timing_from_samples(samples)
    assert (timing.median_s, timing.p20_s, timing.p80_s, timing.n) == (5.0, 2.0, 8.0, 11)
    # p20 of 0..4: index 0.8 -> 0.8 (linear between the order statistics 0 and 1)
    assert common._quantile([0.0, 1.0, 2.0, 3.0, 4.0], 0.2) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least one sample"):
        common.timing_from_samples([])


def test_measure_counts_repeats_and_orders_quantiles():
    calls = []
    timing = common.measure(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and timing.n == 7
    assert 0 <= timing.p20_s <= timing.median_s <= timing.p80_s


def test_rows_round_trip_through_csv(tmp_path):
    timing = common.timing_from_samples([1e-3, 2e-3, 3e-3])
    rows = [common.Row.from_timing("unit", "a", timing, config="x=1", dtype="fp32", shape="4096", world_size=2,
                                   gbps=1.5, notes="n"),
            common.Row(bench="unit", case="b", config="x=2", dtype="bf16", shape="8", world_size=1,
                       median_us=math.nan, p20_us=math.nan, p80_us=math.nan, kind="modeled",
                       env={"device": "d", "torch": "t", "triton": "none", "commit": "1234e56"})]
    path = common.write_rows("unit", rows, results_dir=str(tmp_path))
    back = common.read_rows(path)
    assert [r["case"] for r in back] == ["a", "b"]
    assert back[0]["median_us"] == pytest.approx(2000.0) and back[0]["p80_us"] == pytest.approx(2600.0)
    assert back[0]["world_size"] == 2 and back[0]["gbps"] == 1.5 and back[0]["tflops"] is None
    assert back[0]["shape"] == "4096" and back[1]["commit"] == "1234e56"  # text fields stay text
    assert math.isnan(back[1]["median_us"]) and back[1]["kind"] == "modeled"
    assert os.path.isfile(tmp_path / "unit.json")
    table = common.markdown_table(back, ["case", "median_us", "kind"])
    assert table.splitlines()[2] == "| a | 2e+03 | measured |"


# ----------------------------------------------------------------------------------------------------------
# the modeled decode step
# ----------------------------------------------------------------------------------------------------------
def test_weight_bytes_of_llama2_7b():
    # Llama-2-7B has 6,738,415,616 parameters (the published checkpoint's count)
    assert pd.params_per_rank(pd.LLAMA2_7B, 1) == pd.LLAMA2_7B.n_params == 6_738_415_616
    assert pd.weight_bytes_per_rank(pd.LLAMA2_7B, 1) == 2 * 6_738_415_616
    # everything but the norm weights (65 * 4096 of them) splits evenly
    norms = (2 * 32 + 1) * 4096
    assert pd.params_per_rank(pd.LLAMA2_7B, 8) == (6_738_415_616 - norms) // 8 + norms


def test_kv_heads_replicate_past_their_count():
    args = pd.LLAMA2_70B  # 8 KV heads
    assert [pd.n_kv_heads_per_rank(args, tp) for tp in (1, 2, 8)] == [8, 4, 1]
    sixteen = args.replace(n_heads=128, n_kv_heads=8, head_dim=128)
    assert pd.n_kv_heads_per_rank(sixteen, 16) == 1
    # 2 (k, v) * layers * tokens * heads * head_dim * 2 bytes
    assert pd.kv_cache_bytes_per_rank(args, 2, context_len=100) == 2 * 80 * 100 * 4 * 128 * 2


def test_decode_model_is_monotone_in_tp_and_custom_beats_nccl():
    for hw in HARDWARE.values():
        for args in (pd.LLAMA2_7B, pd.LLAMA2_70B):
            for allreduce in pd.ALLREDUCE_KINDS:
                steps = [pd.decode_step(args, tp, hw, allreduce) for tp in (1, 2, 4, 8)]
                tokens = [s.tokens_per_s for s in steps]
                assert tokens == sorted(tokens), (hw.name, allreduce, tokens)
                assert steps[0].comm_s == 0 and steps[0].n_all_reduces == 0
                assert all(s.n_all_reduces == 2 * args.n_layers for s in steps[1:])
            for tp in (2, 4, 8):
                assert pd.decode_step(args, tp, hw, "custom").total_s < pd.decode_step(args, tp, hw, "nccl").total_s


def test_decode_step_arithmetic_and_errors():
    hw = HARDWARE["A100"]
    step = pd.decode_step(pd.LLAMA2_7B, 1, hw, context_len=0)
    assert step.total_s == pytest.approx(2 * 6_738_415_616 / 2039e9)
    # NCCL's ring/LL latency on 8 GPUs: 6.6 + 14 * 0.6 us, plus 14/8 of 8 KB at half of 300 GB/s
    assert pd.nccl_all_reduce_s(8192, 8, hw) == pytest.approx(15.0e-6 + 8192 * 14 / 8 / 150e9)
    assert pd.custom_all_reduce_s(8192, 1, hw) == 0.0
    with pytest.raises(ValueError, match="allreduce must be one of"):
        pd.decode_step(pd.LLAMA2_7B, 2, hw, "carrier-pigeon")
    with pytest.raises(ValueError, match=r"tp \(3\) must divide n_heads"):
        pd.decode_step(pd.LLAMA2_7B, 3, hw)


def test_decode_model_rows_are_modeled_and_compare_with_gpt_fast():
    rows = decode_model.model_rows(context_len=256)
    assert rows and all(r.kind == "modeled" for r in rows)
    compared = [r for r in rows if r.ratio is not None]
    # every published gpt-fast figure (4 for 7B, 3 for 70B) next to both all-reduce rows (TP 1: one row)
    assert len(compared) == 1 + 3 * 2 + 3 * 2
    assert all("A100" in r.case and 0 < r.ratio < 1 for r in compared)  # the model is an upper bound
    table = decode_model.tokens_table(rows)
    assert "| llama-2-70b | A100 | 8 |" in table and "| 62.5 |" in table


# ----------------------------------------------------------------------------------------------------------
# run_all
# ----------------------------------------------------------------------------------------------------------
OWN_FAMILIES = {"decode_e2e", "decode_model"}


@pytest.mark.parametrize("family", run_all.FAMILIES, ids=lambda f: f.name)
def test_run_all_family_points_at_a_script(family):
    path = run_all.script_path(family)
    if not os.path.isfile(path):
        if family.name in OWN_FAMILIES:
            pytest.fail(f"{path} is missing")
        pytest.skip(f"bench/{family.name}.py is not merged into this tree yet")
    assert family.limit_s > 0


def test_run_all_limits_fit_the_total():
    assert len({f.name for f in run_all.FAMILIES}) == len(run_all.FAMILIES)
    assert sum(f.limit_s for f in run_all.FAMILIES) <= run_all.TOTAL_LIMIT_S <= 600


def test_run_all_reports_missing_script(tmp_path):
    ghost = run_all.Family("no_such_family", 5)
    outcome = run_all.run_family(ghost, 5, str(tmp_path))
    assert not outcome.ok and "does not exist" in outcome.reason


def test_summary_from_csvs(tmp_path):
    rows = decode_model.model_rows(context_len=256)[:3]
    common.write_rows("decode_model", rows, results_dir=str(tmp_path))
    families = [f for f in run_all.FAMILIES if f.name in ("decode_model", "decode_e2e")]
    failed = run_all.Outcome(families[0], False, 1.0, "exited with status 1; last lines: boom")
    path = run_all.write_summary(families, [failed], results_dir=str(tmp_path))
    text = open(path).read()
    assert "## decode_model" in text and rows[0].case in text and "| modeled |" in text
    assert "**This run failed**: exited with status 1" in text  # decode_e2e (first) failed
    assert "(no results: the CSV is missing)" in text  # decode_e2e wrote nothing here


# ----------------------------------------------------------------------------------------------------------
# decode_e2e
# ----------------------------------------------------------------------------------------------------------
class _FakeCommunicator:
    def __init__(self, name):
        self.name = name


def test_decode_e2e_forces_one_backend_or_says_why_not():
    chain = [_FakeCommunicator(n) for n in ("identity", "shm", "torch")]
    forced, reason = decode_e2e.chain_for(chain, "torch", world_size=2)
    assert [c.name for c in forced] == ["identity", "torch"] and reason is None
    forced, reason = decode_e2e.chain_for(chain, "shm", world_size=2)
    assert [c.name for c in forced] == ["identity", "shm"]
    forced, reason = decode_e2e.chain_for(chain[::2], "shm", world_size=2)
    assert forced is None and "'shm' is not in this group's all-reduce chain ['identity', 'torch']" in reason


def test_decode_e2e_comm_timer_times_the_wrapped_collective():
    from tp_kernels.distributed import IdentityCommunicator

    timer = decode_e2e.CommTimer()
    timed = decode_e2e.timed_communicator(IdentityCommunicator(1), timer)
    x = torch.randn(3)
    assert timed.name == "identity" and timed.applies(x)
    assert torch.equal(timed.all_reduce(x), x)
    assert timer.calls == 1 and timer.seconds > 0


def test_decode_e2e_help_runs():
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "decode_e2e.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--backends" in out.stdout and "--world-sizes" in out.stdout


def test_decode_e2e_rows_report_missing_backend_and_comm_share():
    args = decode_e2e.argparse.Namespace(batch=2, prompt_len=4, steps=3, rounds=1, dtype="fp32")
    out = {"results": {"shm": decode_e2e.BackendResult(missing="backend 'shm' is not in this group's chain"),
                       "torch": decode_e2e.BackendResult(step_s=[0.010, 0.020, 0.030], comm_s=[0.002, 0.004, 0.006])},
           "weight_bytes_per_rank": 10 ** 6, "threads": 1}
    rows = decode_e2e.rows_for(2, out, args, ["shm", "torch"])
    assert [r.case for r in rows] == ["tp2 shm", "tp2 torch", "tp2 torch comm"]
    missing, step, comm = rows
    assert math.isnan(missing.median_us) and "missing: backend 'shm'" in missing.notes
    assert step.median_us == pytest.approx(20_000) and step.gbps == pytest.approx(10 ** 6 / 0.020 / 1e9)
    assert decode_e2e.tokens_per_s_of(step) == pytest.approx(2 / 0.020, rel=1e-3)  # batch / median step
    assert comm.median_us == pytest.approx(4_000) and comm.ratio == pytest.approx(0.2)
    table = decode_e2e.tokens_table(rows)
    assert "| 2 | shm | missing: backend 'shm'" in table and "| 2 | torch | 100.0 | 20.0 (" in table
    both = {"results": {"shm": decode_e2e.BackendResult(step_s=[0.010], comm_s=[0.001]),
                        "torch": decode_e2e.BackendResult(step_s=[0.020], comm_s=[0.011])},
            "weight_bytes_per_rank": 10 ** 6, "threads": 1}
    shm_row = decode_e2e.rows_for(2, both, args, ["shm", "torch"])[0]
    assert shm_row.baseline == "tp2 torch" and shm_row.ratio == pytest.approx(2.0)
