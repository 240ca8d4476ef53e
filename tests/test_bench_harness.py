"""The benchmark harness (bench/): common.py's statistics and CSV round trip, the modeled decode step's
arithmetic, run_all's family list and summary, decode_e2e's backend forcing and CLI."""
import math
import os
import subprocess
import sys

import pytest
import torch

import tp_kernels  # noqa: F401  (first: the installed package, before the repo root goes on sys.path)
from tp_kernels.perf import decode_model as pd
from tp_kernels.perf.cost_model import HARDWARE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, "bench")
# The bench scripts import each other as top-level modules (`from common import ...`): run as
# `python bench/x.py`, bench/ is first on sys.path and tp_kernels is the installed package. Import them the
# same way here, and take bench/ off sys.path again so nothing imported later resolves there.
_saved_path = list(sys.path)
sys.path.insert(0, BENCH_DIR)
import all_reduce  # noqa: E402
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


def test_run_all_limits_have_headroom_and_a_quiet_run_fits():
    assert len({f.name for f in run_all.FAMILIES}) == len(run_all.FAMILIES)
    assert all(f.limit_s >= 3 * f.quiet_s for f in run_all.FAMILIES)
    assert sum(f.quiet_s for f in run_all.FAMILIES) <= run_all.TOTAL_LIMIT_S <= 600


def test_run_all_lists_an_overrunning_family_and_keeps_the_others(tmp_path, monkeypatch):
    """A family past its limit is stopped and listed; the others' results stay; the exit status is 0."""
    bench_dir, results_dir = tmp_path / "bench", tmp_path / "results"
    bench_dir.mkdir()
    (bench_dir / "decode_e2e.py").write_text("import time\ntime.sleep(60)\n")
    (bench_dir / "decode_model.py").write_text("")
    rows = decode_model.model_rows(context_len=256)[:2]
    common.write_rows("decode_model", rows, results_dir=str(results_dir))  # its results, as its run left them
    common.write_rows("decode_e2e", rows, results_dir=str(results_dir))  # an earlier run's: must not be shown
    monkeypatch.setattr(run_all, "BENCH_DIR", str(bench_dir))
    monkeypatch.setattr(run_all, "RESULTS_DIR", str(results_dir))
    monkeypatch.setattr(run_all, "FAMILIES", (run_all.Family("decode_e2e", 0.5, what="slow"),
                                              run_all.Family("decode_model", 10, what="fast")))
    assert run_all.main([]) == 0
    text = (results_dir / "SUMMARY.md").read_text()
    slow, fast = text.split("## decode_model")
    assert "**Not measured in this run**: ran past its 2 s limit, ~3x a quiet run: the host was busy" in slow
    assert rows[0].case not in slow  # the stale CSV is not presented as this run's
    assert rows[0].case in fast and "| modeled |" in fast


def test_run_all_reports_missing_script(tmp_path):
    ghost = run_all.Family("no_such_family", 2)
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
E2E_PROMPT = [5, 6, 7, 8]


def _rank_decode_e2e(tp, checkpoint, variants):
    """bench/decode_e2e.py's rank function on the tiny preset: 2 rounds of 4 new tokens."""
    return decode_e2e.rank_ours(tp, checkpoint, E2E_PROMPT, 4, 2, variants)


def test_decode_e2e_rows_run_what_they_name(tmp_path):
    """At TP=2 the shm row's collectives reach the shm communicator only and the torch row's gloo only
    (2 reductions per layer + the embedding + the greedy pick = 6 calls per token for 2 layers), both give
    TP=1's tokens, and the breakdown covers every step with the collectives split into own time and waits."""
    from conftest import spawn_ranks
    from tp_kernels.distributed import TPGroup

    checkpoint = decode_e2e.write_checkpoint(str(tmp_path / "tiny"), "tiny")
    tp1 = decode_e2e.Variant(None, False)
    single = _rank_decode_e2e(TPGroup.single(), checkpoint, [tp1])
    shm, gloo = decode_e2e.Variant("shm", False), decode_e2e.Variant("torch", False)
    per_rank = spawn_ranks(2, _rank_decode_e2e, checkpoint, [shm, gloo])
    reference = single["variants"][tp1]["tokens"]
    for rank_out in per_rank:
        assert rank_out["variants"][shm]["calls_per_token"] == {"torch": 0, "shm": 6}
        assert rank_out["variants"][gloo]["calls_per_token"] == {"torch": 6, "shm": 0}
        for variant in (shm, gloo):
            assert rank_out["variants"][variant]["tokens"] == reference
            assert len(rank_out["variants"][variant]["step_s"]) == 2 * 3  # 2 rounds of 3 decode steps
    for variant in (shm, gloo):
        parts = decode_e2e.breakdown(per_rank, variant)
        assert set(parts) == {"gemm", "qkv_rope", "attention", "sampling", "collective own", "collective wait",
                              "rest", "rank 1 wait"}
        assert all(parts[k] > 0 for k in ("gemm", "qkv_rope", "attention", "sampling", "collective own"))
    assert per_rank[0]["decode_bytes_per_rank"] < single["decode_bytes_per_rank"]


def test_split_waits_separates_waiting_from_the_collective():
    split_waits = decode_e2e.split_waits

    # one step, two calls: rank 1 arrives 3 s late at the first, rank 0 1 s late at the second
    rank0 = [[(0.0, 5.0), (11.0, 12.0)]]
    rank1 = [[(3.0, 5.0), (10.0, 12.0)]]
    (wait0, own0), (wait1, own1) = split_waits([rank0, rank1])[0][0], split_waits([rank0, rank1])[1][0]
    assert (wait0, own0) == (3.0, 3.0) and (wait1, own1) == (1.0, 3.0)
    with pytest.raises(ValueError, match="different numbers of collective calls"):
        split_waits([rank0, [[(3.0, 5.0)]]])


def test_decode_e2e_roofline_and_targets_table():
    roofline = {"one_process_1_thread": 18.0, "one_process_2_threads": 20.0, "two_processes_each": [17.0, 15.0],
                "two_processes_total": 32.0}
    # a row's ceiling: the median over its probes of the ranks' mean GB/s, over the bytes a step reads per rank
    ceiling, note = decode_e2e.row_ceiling([{"probe_gbps": [20.0, 10.0, 19.0, 30.0]}], 10 ** 9)
    assert ceiling == pytest.approx(19.5) and note == "probes GB/s per rank: 10.0-30.0, median 19.5 of 4"
    per_rank = [{"probe_gbps": [17.0, 9.0, 14.0]}, {"probe_gbps": [15.0, 11.0, 20.0]}]  # per probe: 16, 10, 17
    ceiling, note = decode_e2e.row_ceiling(per_rank, 10 ** 9)
    assert ceiling == pytest.approx(16.0) and note == "probes GB/s per rank: 10.0-17.0, median 16.0 of 3"
    with pytest.raises(ValueError, match="no roofline probe"):
        decode_e2e.row_ceiling([{"probe_gbps": []}], 10 ** 9)
    rows = [decode_e2e.step_row("tp1 eager", 1, [0.05] * 3, 2, 10 ** 9, 20.0, ["probes GB/s per rank: 19.0-21.0, "
                                                                              "median 20.0 of 4"], "c"),
            decode_e2e.step_row("tp2 shm eager", 2, [0.025] * 3, 1, 10 ** 9, 16.0, ["n"], "c")]
    assert rows[1].ceiling_fraction == pytest.approx(40 / 16.0) and rows[0].gbps == pytest.approx(20.0)
    targets = decode_e2e.target_values({r.case: r for r in rows}, "tp2 shm eager")
    assert [round(v, 2) if v is not None else None for _, v, _ in targets] == [2.5, 2.0, None, None]
    table = decode_e2e.markdown(rows, roofline, targets)
    assert "| tp1 eager | 20.0 | 50.0 (50.0-50.0) | 20.0 (19.0-21.0) | 100% |" in table
    assert "| tp2 shm eager | 40.0 | 25.0 (25.0-25.0) | 16.0 | 250% |" in table
    assert "| TP=2 / our TP=1 (tp2 shm eager) | 2.00 | 1.5 | yes |" in table
    assert "| TP=2 / transformers tp_plan TP=2 (tp2 shm eager) | n/a | 2.5 | n/a |" in table
    assert decode_e2e.tokens_note([1, 2, 3], [1, 2, 3]) == "greedy tokens equal tp1 eager's"
    assert "at new token 1" in decode_e2e.tokens_note([1, 5, 3], [1, 2, 3])


def test_decode_e2e_help_runs():
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "decode_e2e.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--no-compile" in out.stdout and "--no-peers" in out.stdout


# ----------------------------------------------------------------------------------------------------------
# all_reduce
# ----------------------------------------------------------------------------------------------------------
def test_all_reduce_bench_times_every_path_interleaved():
    """One tiny run: a row per path, the op and in-place op rows beside the direct ones."""
    name = "test_all_reduce_smoke"
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "all_reduce.py"), "--sizes", "4K",
                          "--dtypes", "fp32", "--rounds", "2", "--budget-s", "0.01", "--name", name],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = common.read_rows(os.path.join(common.RESULTS_DIR, f"{name}.csv"))
    assert [r["case"] for r in rows] == ["shm-direct", "shm-direct-out", "shm-inplace", "shm-op", "shm-op-inplace",
                                         "gloo", "touch"]
    assert all(r["median_us"] > 0 and r["kind"] == "measured" for r in rows)
    # each row proves its backend: the shm rows ran steps on the shared-memory communicator, gloo and touch none
    steps = {r["case"]: int(r["notes"].split("shm steps in one untimed call: ")[1].split(";")[0]) for r in rows}
    assert all(steps[case] > 0 for case in steps if case.startswith("shm")), steps
    assert steps["gloo"] == 0 and steps["touch"] == 0, steps


def test_a_bench_path_that_misses_its_backend_raises():
    all_reduce.check_backend_proof("shm-op", 2, through_shm=True)
    all_reduce.check_backend_proof("gloo", 0, through_shm=False)
    with pytest.raises(RuntimeError, match="'shm-op' ran 0 shm steps in one call: it did not reach"):
        all_reduce.check_backend_proof("shm-op", 0, through_shm=True)
    with pytest.raises(RuntimeError, match="'gloo' ran 1 shm steps in one call: it reached"):
        all_reduce.check_backend_proof("gloo", 1, through_shm=False)
