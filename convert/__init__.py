"""Checkpoint conversion (installed as mlx_openelm.convert)."""
