"""Triton kernels: `@triton.jit` bodies, their launch configs and their launchers.

- tiling.py: the GEMM tiling every kernel here shares (program -> tile order, fp32 accumulator tile)
- matmul.py: the plain GEMM y = x @ w.T + bias (`matmul`)
- qkv.py: the fused QKV projection + bias + RoPE + head split, optionally writing the KV cache
  (`qkv_rope`, `qkv_rope_kv_cache`)
- gemm_collective.py: the fused GEMM + collective launchers (`gemm_reduce_scatter`, `gemm_all_reduce`,
  `allgather_gemm`) over a group's symmetric buffers; their kernels in gemm_collective_reduce.py and
  gemm_collective_gather.py, the tile/signal protocol in gemm_collective_protocol.py, their configs in
  gemm_collective_configs.py, their AOT cases in gemm_collective_resources.py
- configs.py: launch configs per GPU arch, dtype and M bucket, and the split-K policy
- launch.py: how a launcher starts a kernel (directly in eager mode, through wrap_triton only while a
  tracer records) and the split-K arrival counters
- resources.py: ahead-of-time compile of every config for sm_80/sm_90 and its registers, spills and
  shared memory (needs no GPU)

This package imports triton; tp_kernels.ops imports it only when triton is installed. Launchers run on
CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests check them without a GPU).
"""
