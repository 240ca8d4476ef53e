"""`make gpu-check` (bench/gpu_check.py) without a GPU: its dry-run listing is checked against the test files
that exist, `make gpu-check` says in one line that there is no GPU, and the driver's own logic (pytest
output parsing, overrun handling, the summary and result files) runs on fake steps in a temporary tree."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import tp_kernels  # noqa: F401  (first: the package under test, before the repo root goes on sys.path)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved_path = list(sys.path)
sys.path.append(os.path.join(REPO_ROOT, "bench"))  # the bench scripts import each other as top-level modules
import gpu_check  # noqa: E402
import gpu_collectives  # noqa: E402
import gpu_decode  # noqa: E402
import run_all  # noqa: E402,F401  (gpu_check_report imports it inside a function, after sys.path is restored)
from common import Row  # noqa: E402
from gpu_check import Step  # noqa: E402
from gpu_check_report import headline_lines, parse_pytest_output, summary_lines, write_results  # noqa: E402

sys.path[:] = _saved_path  # see tests/test_bench_harness.py: spawned ranks must import the package under test


# ----------------------------------------------------------------------------------------------------------
# the real plan
# ----------------------------------------------------------------------------------------------------------
def test_dry_run_lists_every_step_in_order_with_its_budget_and_command():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    total = sum(s.budget_s for s in gpu_check.STEPS)
    assert total <= gpu_check.TOTAL_BUDGET_S <= 8 * 60, "the whole run must fit in 8 minutes"
    assert out.splitlines()[0].startswith(f"gpu-check plan: {len(gpu_check.STEPS)} steps, {total:.0f} s of budgets")
    positions = [out.index(f"  {s.name} ") for s in gpu_check.STEPS]
    assert positions == sorted(positions), "steps listed out of order"
    names = [s.name for s in gpu_check.STEPS]
    assert names[0] == "build" and names.index("triton") < names.index("cuda_ipc") < names.index("gemm_collective") \
        < names.index("decoder") < min(i for i, s in enumerate(gpu_check.STEPS) if s.kind == "bench")
    for step in gpu_check.STEPS:
        assert f"{step.budget_s:4.0f} s  {step.what}" in out
        if step.kind == "bench":
            assert os.path.isfile(os.path.join(REPO_ROOT, step.argv[0])), f"{step.name}: {step.argv[0]} is missing"
            assert f"$ python {' '.join(step.argv)}" in out
    assert "$ python setup.py build_ext --inplace" in out


def test_only_selects_steps_in_run_order_and_rejects_unknown_names():
    assert [s.name for s in gpu_check.select("decoder,triton")] == ["triton", "decoder"]
    with pytest.raises(SystemExit, match=r"unknown steps \['tritn'\]"):
        gpu_check.select("tritn")


def test_every_gpu_test_file_is_run_by_a_group():
    """A file under tests/gpu is either matched by a named group or marked gpu (the catch-all group's -m)."""
    listing = "\n".join(gpu_check.plan_lines(gpu_check.STEPS, REPO_ROOT, None))
    gpu_dir = os.path.join(REPO_ROOT, "tests", "gpu")
    for name in sorted(os.listdir(gpu_dir)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        path = f"tests/gpu/{name}"
        with open(os.path.join(gpu_dir, name)) as f:
            marked = "pytest.mark.gpu" in f.read()
        named = any(path in gpu_check.resolve(s.paths, REPO_ROOT) for s in gpu_check.STEPS if not s.marker)
        assert named or marked, f"{path} is in no group and not marked gpu: gpu-check would never run it"
        if named:
            assert f" {path}" in listing


def test_missing_test_files_are_listed_as_not_present(tmp_path):
    step = Step("later", "tests", 30, "tests another session is writing", paths=("tests/gpu/test_not_yet*.py",))
    lines = gpu_check.plan_lines([step], str(tmp_path), None)
    assert lines[-1] == "      not present: no file matches tests/gpu/test_not_yet*.py"


def test_arch_list_is_the_visible_gpus_only():
    assert gpu_check.cuda_arch_list([(9, 0)]) == "9.0a"
    assert gpu_check.cuda_arch_list([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0a"
    assert gpu_check.cuda_arch_list([(8, 6)]) == "8.6"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, make gpu-check would run the whole check")
@pytest.mark.parametrize("python", [None, sys.executable], ids=["as-printed", "PYTHON=this-python"])
def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_fails(python):
    """`make gpu-check` as the README prints it (the machine's python3: with torch and no GPU, or without
    torch here), and with this test's Python, which has torch and sees no GPU."""
    argv = ["make", "gpu-check"] + ([f"PYTHON={python}"] if python else [])
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    mine = [line for line in proc.stderr.splitlines() if line.startswith("gpu-check:")]
    assert len(mine) == 1, proc.stderr
    assert ("no CUDA GPU visible" in mine[0]) or (python is None and "cannot import torch" in mine[0]), mine[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, the benchmark would run")
@pytest.mark.parametrize("bench", [gpu_collectives, gpu_decode], ids=lambda m: m.__name__)
def test_gpu_benchmarks_without_a_gpu_say_so_and_exit_2(bench, capsys):
    """The benchmarks gpu-check runs import and parse their arguments here; their measuring needs a GPU."""
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"{bench.BENCH}: no CUDA GPU visible; nothing measured\n"


# ----------------------------------------------------------------------------------------------------------
# pytest output parsing
# ----------------------------------------------------------------------------------------------------------
FINISHED = """\
tests/gpu/test_a.py::test_one PASSED                                     [ 33%]
tests/gpu/test_a.py::test_two[x] FAILED                                  [ 66%]
tests/gpu/test_a.py::test_three SKIPPED (needs 2 GPUs)                   [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/gpu/test_a.py:40: needs >= 2 CUDA GPUs on one node
SKIPPED [3] tests/gpu/test_b.py:12: needs >= 2 CUDA GPUs on one node
FAILED tests/gpu/test_a.py::test_two[x] - AssertionError: rank 1 differs
============== 1 failed, 1 passed, 1 skipped, 2 warnings in 12.34s ==============
"""


def test_parse_a_finished_run_uses_pytests_own_counts():
    counts, skips, failures = parse_pytest_output(FINISHED)
    assert counts == {"failed": 1, "passed": 1, "skipped": 1}
    assert skips == ["4 x needs >= 2 CUDA GPUs on one node (tests/gpu/test_a.py:40, tests/gpu/test_b.py:12)"]
    assert failures == ["FAILED tests/gpu/test_a.py::test_two[x] - AssertionError: rank 1 differs"]


def test_parse_a_killed_run_counts_the_tests_it_reported():
    killed = "\n".join(FINISHED.splitlines()[:2]) + "\ntests/gpu/test_a.py::test_three "  # killed in test_three
    counts, skips, failures = parse_pytest_output(killed)
    assert counts == {"passed": 1, "failed": 1} and skips == []
    assert failures == ["FAILED tests/gpu/test_a.py::test_two[x]"]


def test_parse_a_killed_xdist_run():
    killed = ("[gw1] [ 50%] PASSED tests/gpu/test_a.py::test_one \n"
              "[gw0] [100%] ERROR tests/gpu/test_a.py::test_two[x] \n")
    counts, _, failures = parse_pytest_output(killed)
    assert counts == {"passed": 1, "error": 1} and failures == ["ERROR tests/gpu/test_a.py::test_two[x]"]


def test_headline_summarizes_ratios_and_says_why_a_case_did_not_run():
    env = {"device": "NVIDIA H200", "torch": "t", "triton": "t", "commit": "c"}
    rows = [Row(bench="b", case="fused", config="", dtype="bf16", shape=str(i), world_size=1, median_us=1.0,
                p20_us=1.0, p80_us=1.0, baseline="unfused", ratio=r, env=env) for i, r in enumerate((1.1, 1.3, 0.9))]
    rows.append(Row(bench="d", case="tp=2", config="8b", dtype="bf16", shape="", world_size=2, median_us=float("nan"),
                    p20_us=float("nan"), p80_us=float("nan"), notes="needs 2 GPUs", env=env))
    rows.append(Row(bench="d", case="tp=1", config="8b", dtype="bf16", shape="", world_size=1, median_us=8000.0,
                    p20_us=1.0, p80_us=1.0, gbps=2000.0, ceiling_fraction=0.5, env=env))
    lines = headline_lines([r.flat() for r in rows])
    assert lines == ["b: fused vs unfused: 1.10x median (0.90-1.30x over 3 cases)",
                     "d: tp=2 8b: not run: needs 2 GPUs",
                     "d: tp=1 8b: 8000.0 us median, 2000 GB/s (50% of the ceiling)"]


# ----------------------------------------------------------------------------------------------------------
# the driver on fake steps
# ----------------------------------------------------------------------------------------------------------
FAKE_TESTS = {
    "tests/test_ok.py": """
        import pytest
        def test_a(): pass
        def test_b(): pass
        def test_c(): pytest.skip("needs the fake device")
    """,
    "tests/test_bad.py": """
        def test_wrong(): assert 1 + 1 == 3, "arithmetic"
    """,
    "tests/test_hangs.py": """
        import os, subprocess, sys, time
        def test_quick(): pass
        def test_hangs_with_a_child():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            with open(os.environ["CHILD_PID_FILE"], "w") as f:
                f.write(str(child.pid))
            time.sleep(300)
    """,
    "bench/fake_bench.py": """
        import csv, os, sys  # no torch: a second of import per run on a busy 2-core machine is 10
        with open(os.path.join(sys.argv[1], "fake_bench.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["bench", "case", "kind", "median_us", "baseline", "ratio", "device"])
            w.writerows([["fake_bench", "fast", "measured", 1.0, "slow", 2.0, "FakeGPU"]] * 2)
    """,
}


def _fake_tree(tmp_path):
    for rel, text in FAKE_TESTS.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie nobody reaped is dead too
    except FileNotFoundError:
        return True


def test_driver_reports_each_outcome_and_kills_an_overrunning_group(tmp_path):
    _fake_tree(tmp_path)
    results_dir = str(tmp_path / "results")
    child_pid_file = str(tmp_path / "child.pid")
    steps = [
        Step("build", "build", 20, "fake build", argv=("-c", "print('built')")),
        Step("ok", "tests", 25, "passing and skipped", paths=("tests/test_ok.py",)),
        Step("bad", "tests", 25, "a failing test", paths=("tests/test_bad.py",)),
        Step("hangs", "tests", 6, "a test that hangs", paths=("tests/test_hangs.py",)),
        Step("later", "tests", 25, "files not written yet", paths=("tests/test_later*.py",)),
        Step("marked", "tests", 25, "no test has the marker", paths=("tests/test_ok.py",), marker="gpu"),
        Step("bench", "bench", 25, "a benchmark", argv=("bench/fake_bench.py", results_dir)),
    ]
    env = dict(os.environ, CHILD_PID_FILE=child_pid_file, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    results = gpu_check.run_steps(steps, str(tmp_path), results_dir, lambda step: env, 300, echo=lambda line: None)
    by_name = {r.name: r for r in results}
    assert [r.status for r in results] == ["ok", "passed", "failed", "overran", "not present", "no tests", "ok"]
    assert by_name["ok"].counts == {"passed": 2, "skipped": 1}
    assert by_name["ok"].skip_reasons == ["1 x needs the fake device (tests/test_ok.py:5)"]
    assert by_name["bad"].failures == ["FAILED tests/test_bad.py::test_wrong - AssertionError: arithmetic"]
    hangs = by_name["hangs"]
    assert hangs.counts == {"passed": 1} and "stopped at its 6 s limit" in hangs.detail
    assert 6 <= hangs.seconds < 20
    with open(child_pid_file) as f:
        assert _dead(int(f.read())), "the hung test's child process outlived the group"
    assert by_name["later"].detail == "no file matches tests/test_later*.py"
    with open(tmp_path / "results" / "logs" / "hangs.log") as f:
        assert f.readline().startswith("$ ")  # every step's log starts with its command
    assert time.monotonic() - t0 < 120

    facts = {"name": "FakeGPU", "count": "1", "arch_list": "9.0a", "torch": "t", "cuda": "13.0"}
    lines = summary_lines(results, facts, results_dir, 42.0)
    write_results(results, lines, results_dir)
    assert lines[0].startswith("gpu-check: FakeGPU x1 (TORCH_CUDA_ARCH_LIST=9.0a)")
    assert len(lines) <= 40, "the summary must fit on one screen"
    assert any(line.startswith("hangs ") and "overran" in line and "1 passed" in line for line in lines)
    assert "  fake_bench: fast vs slow: 2.00x median (2.00-2.00x over 2 cases)" in lines
    for name in ("SUMMARY.md", "gpu_check.csv", "gpu_check.png", "fake_bench.csv"):
        assert os.path.isfile(os.path.join(results_dir, name)), name
    with open(os.path.join(results_dir, "SUMMARY.md")) as f:
        summary = f.read()
    assert "FAILED tests/test_bad.py::test_wrong" in summary and "## fake_bench" in summary


def test_a_failed_build_or_a_spent_total_stops_the_rest(tmp_path):
    _fake_tree(tmp_path)
    steps = [Step("build", "build", 20, "fails", argv=("-c", "raise SystemExit(3)")),
             Step("ok", "tests", 20, "never runs", paths=("tests/test_ok.py",))]
    results = gpu_check.run_steps(steps, str(tmp_path), str(tmp_path / "r"), lambda step: dict(os.environ), 60,
                                  echo=lambda line: None)
    assert [r.status for r in results] == ["failed", "not started"]
    assert "exit status 3" in results[0].detail and "the build failed" in results[1].detail
    spent = gpu_check.run_steps(steps[1:], str(tmp_path), str(tmp_path / "r"), lambda step: dict(os.environ), 1,
                                echo=lambda line: None)
    assert spent[0].status == "not started" and "total was used up" in spent[0].detail
