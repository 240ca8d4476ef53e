"""Performance models and the calibration that feeds them.

- `cost_model`: hardware constants with their sources, roofline times, and the chunk count of the
  overlapped GEMM + collective ops (everything it returns is *modeled*).
- `decode_model`: the modeled GPU decode step of a Llama-family decoder under tensor parallelism.
- `calibration`: the Hardware a group's overlap ops plan with (datasheet, set by the caller, or measured
  on this CPU host by an explicit calibration).

This package imports none of its modules itself, so that importing one (e.g. the cost model, from the
CUDA IPC planner) does not pull in the others.
"""
