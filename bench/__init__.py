"""Throughput benchmarks (installed as mlx_openelm.bench): `mlx-openelm bench`.

- `core`: random-weight models, quantization, the naive RMSNorm, engines (ours and
  mlx-lm's), one timed trial, bytes read per token.
- `settings`: `BenchSettings` (what to measure) and `Progress` (callbacks).
- `runner`: the sweep (sources x bits x lengths x engines, interleaved trials), a library.
- `report`: table, JSON, CSV, plot. `hardware`: machine info and Apple chips'
  bandwidth. `paper`: the paper's Table 7b protocol. `cli`: the click command.
"""
