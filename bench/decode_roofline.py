"""The roofline rows of bench/decode_e2e.py, measured in the same run as the decode rows they divide
(tp_kernels.models.roofline): GB/s of a matrix-vector product over 256 MiB of fp32 in one process on 1 and
on 2 threads, and in two one-thread processes at once (each after a barrier, so that both stream together;
their sum is what the memory system gives two ranks)."""
from __future__ import annotations

from tp_kernels.models.roofline import gemv_gbps, gemv_gbps_on_all_ranks


def _one_process(tp):
    return gemv_gbps(1), gemv_gbps(2)


def measure(launch) -> dict:
    """launch is tp_kernels.models.launch.run_on_cpu_ranks."""
    one_thread, two_threads = launch(1, _one_process)[0]
    pair = launch(2, gemv_gbps_on_all_ranks)
    return {"one_process_1_thread": one_thread, "one_process_2_threads": two_threads,
            "two_processes_each": pair, "two_processes_total": sum(pair)}
