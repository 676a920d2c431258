"""Throughput benchmarks (installed as mlx_openelm.bench)."""
