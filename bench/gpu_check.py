"""`make gpu-check`: every piece of GPU code proven in one short run on a GPU node.

    python bench/gpu_check.py               # build for this GPU, run the test groups and the GPU benchmarks
    python bench/gpu_check.py --dry-run     # anywhere, no GPU needed: the steps, their budgets and commands
    python bench/gpu_check.py --only triton,decoder

Uses the Python and torch it runs under (no venv, no download: the GPU machine has no network). The steps
run in this order, most valuable results first, each in its own process group with a time budget; a step
that overruns is killed and reported with what it had done, and the next step starts, so a short lease
still returns results. The budgets add up to 8 minutes (TOTAL_BUDGET_S), within one 10-minute command.

Test groups select tests by path pattern (and marker), so test files added later are picked up without
editing this file; a group whose files do not exist is reported as "not present", not as a failure. The
last test group runs every other test marked `gpu`.

Results go to bench/results/gpu/: gpu_check.csv (one row per step), gpu_check.png (time vs budget per
step), the benchmarks' CSVs and plots, SUMMARY.md, and logs/<step>.log with each step's whole output.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
# gpu-check runs from the checkout it builds in place (no install on the GPU machine), so the tree's
# tp_kernels is what every step imports (PYTHONPATH, step_env); bench/ is first on sys.path as for every
# bench script run as `python bench/x.py`.
from gpu_check_report import StepResult, _join, parse_pytest_output, summary_lines, write_results

DEFAULT_RESULTS_DIR = os.path.join(BENCH_DIR, "results", "gpu")
BENCH_RESULTS_ENV = "TP_KERNELS_BENCH_RESULTS_DIR"  # bench/common.py writes its rows there when set
TOTAL_BUDGET_S = 480.0  # 8 minutes: the bound for one H100, and 2 minutes inside the 10-minute command
MIN_START_S = 5.0  # a step with less time left than this is not started (it could not even import torch)
HAVE_XDIST = importlib.util.find_spec("xdist") is not None  # pytest-xdist: on the GPU machine's image


@dataclass(frozen=True)
class Step:
    """One unit of the check: a build, a group of pytest files, or a benchmark script.

    tests: `paths` are glob patterns relative to the repo root (files or directories), `marker` a pytest -m
    expression, `exclude_paths` patterns of files left to other groups, `workers` pytest-xdist processes for
    groups of single-process tests. build / bench: `argv` is the command after the Python interpreter. `env`
    is added to the environment of that step only."""

    name: str
    kind: str  # "build", "tests" or "bench"
    budget_s: float
    what: str
    paths: Tuple[str, ...] = ()
    marker: str = ""
    exclude_paths: Tuple[str, ...] = ()
    argv: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    workers: int = 0  # tests: pytest-xdist processes where it is installed (0: one process)


def resolve(patterns: Sequence[str], root: str) -> List[str]:
    """The existing files/directories matching the patterns, relative to root, in pattern order."""
    found: List[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            rel = os.path.relpath(path, root)
            if rel not in found:
                found.append(rel)
    return found


def group_of_tests(name: str, budget_s: float, what: str, *paths: str, marker: str = "",
              exclude_paths: Tuple[str, ...] = (), workers: int = 0) -> Step:
    return Step(name, "tests", budget_s, what, paths=paths, marker=marker, exclude_paths=exclude_paths,
                workers=workers)


# The test groups' patterns; the catch-all group leaves their files to them.
TRITON_TESTS = ("tests/gpu/test_triton*.py",)
IPC_TESTS = ("tests/gpu/test_cuda_ipc*.py",)
GEMM_COLLECTIVE_TESTS = ("tests/gpu/test_overlap*.py", "tests/gpu/test_gemm_collective*.py")
DECODER_TESTS = ("tests/gpu/test_decode*.py",)
GROUPED_TESTS = TRITON_TESTS + IPC_TESTS + GEMM_COLLECTIVE_TESTS + DECODER_TESTS

# Budgets, 480 s in all. Expected times on one H100/H200 with a cold Triton cache (estimates, not yet
# measured: no GPU run has happened): the build compiles ~10 translation units on 16 cores, the longest
# (custom_all_reduce.cu, one arch) ~40 s; each test group pays ~5 s of torch import and a few seconds of
# Triton JIT per kernel config; ranks sharing one GPU time-slice, so the IPC group gets the most (its review
# estimated 1-4 minutes on one GPU, by the default time slice), then the fused kernels' ~30 JIT compiles.
STEPS: Tuple[Step, ...] = (
    Step("build", "build", 90, "tp_kernels._C in place: C++ and CUDA sources for this GPU's arch, all cores",
         argv=("setup.py", "build_ext", "--inplace"), env=(("TP_KERNELS_BUILD_CUDA", "1"),)),
    # each parametrization JIT-compiles its own kernel specialization (~1-3 s each, one at a time in a
    # process): 8 xdist processes compile side by side on the GPU machine's 16 cores
    group_of_tests("triton", 60, "Triton kernels compiled, vs the float64 reference", *TRITON_TESTS, workers=8),
    group_of_tests("cuda_ipc", 110, "CUDA IPC all-reduce: one-shot, two-shot, fused norm, graphs, back-to-back, timeout",
              *IPC_TESTS),
    group_of_tests("gemm_collective", 80, "overlapped and fused GEMM + collective ops", *GEMM_COLLECTIVE_TESTS),
    group_of_tests("decoder", 40, "decoder tokens: TP=1 vs TP=2 vs the unsharded Hugging Face model", *DECODER_TESTS),
    group_of_tests("other_gpu", 20, "every other test marked gpu", "tests", marker="gpu", exclude_paths=GROUPED_TESTS),
    Step("bench_qkv_rope", "bench", 25, "qkv_rope fused vs unfused (do_bench)", argv=("bench/qkv_rope.py",)),
    Step("bench_collectives", "bench", 35,
         "all-reduce per backend vs NCCL, fused all-reduce + norm vs steps, GEMM + all-reduce vs sequential",
         argv=("bench/gpu_collectives.py",)),
    Step("bench_decode", "bench", 20, "decode tokens/s, Llama-3-8B shape, bf16, batch 1",
         argv=("bench/gpu_decode.py",)),
)


# ----------------------------------------------------------------------------------------------------------
# the GPU and the build
# ----------------------------------------------------------------------------------------------------------
def cuda_arch_list(capabilities: Sequence[Tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for these devices only. sm_90 builds as 9.0a, as setup.py's default list does
    (the arch-specific Hopper target the CUDA sources are checked against in CI)."""
    archs = []
    for major, minor in sorted(set(capabilities)):
        arch = f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}"
        archs.append(arch)
    return ";".join(archs)


def gpu_facts() -> Optional[Dict[str, str]]:
    """Name, capabilities and count of the visible GPUs, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    capabilities = [torch.cuda.get_device_capability(i) for i in range(count)]
    return {"name": torch.cuda.get_device_name(0), "count": str(count), "arch_list": cuda_arch_list(capabilities),
            "torch": torch.__version__, "cuda": str(torch.version.cuda)}


def step_env(step: Step, arch_list: str, results_dir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels: the interpreter would copy CUDA tensors to the host
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"  # the log has everything up to the moment an overrunning step is killed
    env[BENCH_RESULTS_ENV] = results_dir
    if step.kind == "build":
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
        env["MAX_JOBS"] = str(os.cpu_count() or 1)
    env.update(dict(step.env))
    return env


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------
def pytest_timeout_s(budget_s: float) -> int:
    """pytest-timeout's per-test limit: 10 s under the group's budget, so that a hung test's stacks are
    dumped into the log (and the group's other tests still run) before the group itself is killed; 0 (no
    per-test limit) for budgets under 30 s, which 10 s less would leave too little to run anything."""
    return int(budget_s) - 10 if budget_s >= 30 else 0


def command(step: Step, root: str, python: str = sys.executable) -> Tuple[Optional[List[str]], List[str]]:
    """(argv, missing patterns) of a step; argv is None when none of a test group's patterns matched or
    a benchmark's script does not exist."""
    if step.kind == "bench" and not os.path.isfile(os.path.join(root, step.argv[0])):
        return None, [step.argv[0]]
    if step.kind != "tests":
        return [python, *step.argv], []
    paths = resolve(step.paths, root)
    missing = [p for p in step.paths if not glob.glob(os.path.join(root, p))]
    if not paths:
        return None, missing
    argv = [python, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider",
            f"--timeout={pytest_timeout_s(step.budget_s)}"]
    if step.workers and HAVE_XDIST:
        argv += ["-n", str(step.workers)]
    argv += paths
    if step.marker:
        # a module that fails to import elsewhere in the tree must not stop the marked tests from running
        argv += ["-m", step.marker, "--continue-on-collection-errors"]
    argv += [f"--ignore={p}" for p in resolve(step.exclude_paths, root)]
    return argv, missing


def run_step(step: Step, root: str, limit_s: float, log_dir: str, env: Dict[str, str],
             python: str = sys.executable) -> StepResult:
    """Run one step in its own process group, killed (with every process it started) at limit_s."""
    argv, missing = command(step, root, python)
    if argv is None:
        return StepResult(step.name, step.kind, step.budget_s, 0.0, "not present",
                          detail=f"no file matches {', '.join(missing)}")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{step.name}.log")
    t0 = time.monotonic()
    overran = False
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            overran = True
        finally:
            _kill_group(proc)
    seconds = time.monotonic() - t0
    with open(log_path, errors="replace") as log:
        output = log.read()
    result = StepResult(step.name, step.kind, step.budget_s, seconds, "", log=os.path.relpath(log_path, root))
    if step.kind == "tests":
        result.counts, result.skip_reasons, result.failures = parse_pytest_output(output)
    if missing:
        result.detail = f"not present: {', '.join(missing)}"
    if overran:
        result.status = "overran"
        result.detail = _join(f"stopped at its {limit_s:.0f} s limit", result.detail)
    elif proc.returncode == 5 and step.kind == "tests":  # pytest: no test collected (e.g. no gpu marker left)
        result.status = "no tests"
    elif proc.returncode != 0:
        result.status = "failed"
        result.detail = _join(f"exit status {proc.returncode}", result.detail)
        if not result.failures:
            result.failures = output.strip().splitlines()[-3:]
    elif step.kind == "tests" and result.counts.get("passed", 0) == 0:
        result.status = "skipped"
    else:
        result.status = "passed" if step.kind == "tests" else "ok"
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the step's whole process group: pytest and any rank processes it spawned."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
def run_steps(steps: Sequence[Step], root: str, results_dir: str, env_for, total_budget_s: float,
              python: str = sys.executable, echo=print) -> List[StepResult]:
    """Run steps in order within total_budget_s; a failed build stops the rest (they would test nothing)."""
    deadline = time.monotonic() + total_budget_s
    results: List[StepResult] = []
    stop_reason = ""
    for step in steps:
        left_s = deadline - time.monotonic()
        if stop_reason or left_s < MIN_START_S:
            reason = stop_reason or f"not started: the {total_budget_s:.0f} s total was used up"
            results.append(StepResult(step.name, step.kind, step.budget_s, 0.0, "not started", detail=reason))
            continue
        echo(f"[gpu-check] {step.name}: {step.what} (budget {step.budget_s:.0f} s)")
        result = run_step(step, root, min(step.budget_s, left_s), os.path.join(results_dir, "logs"),
                          env_for(step), python)
        echo(f"[gpu-check] {step.name}: {result.status} in {result.seconds:.0f} s {result.counts_text()}")
        results.append(result)
        if step.kind == "build" and result.status != "ok":
            stop_reason = f"not started: the build failed (see {result.log})"
    return results


def plan_lines(steps: Sequence[Step], root: str, facts: Optional[Dict[str, str]]) -> List[str]:
    """What would run: each step with its budget, command and missing files (the --dry-run listing)."""
    arch = facts["arch_list"] if facts else "(read from the GPU at run time)"
    lines = [f"gpu-check plan: {len(steps)} steps, {sum(s.budget_s for s in steps):.0f} s of budgets "
             f"(total limit {TOTAL_BUDGET_S:.0f} s); TORCH_CUDA_ARCH_LIST={arch}; MAX_JOBS={os.cpu_count()}"]
    for step in steps:
        argv, missing = command(step, root, "python")
        lines.append(f"  {step.name:18s} {step.kind:6s} {step.budget_s:4.0f} s  {step.what}")
        if argv is None:
            lines.append(f"      not present: no file matches {', '.join(missing)}")
            continue
        lines.append(f"      $ {' '.join(argv)}")
        if step.workers and not HAVE_XDIST:
            lines.append(f"      one process: pytest-xdist is not installed here (-n {step.workers} where it is)")
        if missing:
            lines.append(f"      not present: {', '.join(missing)}")
    return lines


def select(names: Optional[str]) -> List[Step]:
    if not names:
        return list(STEPS)
    known = {s.name: s for s in STEPS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown steps {unknown}; known: {list(known)}")
    return [s for s in STEPS if s.name in wanted]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps, budgets and commands; run nothing")
    parser.add_argument("--only", help="comma separated steps (default: all); see --dry-run for the names")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="where results go (default %(default)s)")
    args = parser.parse_args(argv)
    steps = select(args.only)
    if args.dry_run:
        print("\n".join(plan_lines(steps, REPO_ROOT, None)))
        return 0
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: {sys.executable} cannot import torch ({exc}): nothing run; give the node's Python "
              "with PYTHON=", file=sys.stderr)
        return 2
    facts = gpu_facts()
    if facts is None:
        print(f"gpu-check: no CUDA GPU visible to this Python (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}): nothing run; `python bench/gpu_check.py --dry-run` lists what would run",
              file=sys.stderr)
        return 2
    results_dir = os.path.abspath(args.results_dir)
    os.makedirs(results_dir, exist_ok=True)
    print("\n".join(plan_lines(steps, REPO_ROOT, facts)), flush=True)
    t0 = time.monotonic()
    results = run_steps(steps, REPO_ROOT, results_dir,
                        lambda step: step_env(step, facts["arch_list"], results_dir), TOTAL_BUDGET_S,
                        echo=lambda line: print(line, flush=True))
    lines = summary_lines(results, facts, results_dir, time.monotonic() - t0)
    write_results(results, lines, results_dir)
    print("\n".join(lines))
    return 0 if all(r.status in ("ok", "passed", "not present", "no tests") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
