"""Checkpoint conversion (installed as mlx_openelm.convert): `convert(...)` and its report.

The modules are named for their jobs (see `pipeline`). The names below load lazily, so
importing the package (as the CLI does for `convert --help`) does not import MLX.
"""

__all__ = ["ConvertReport", "convert"]


def __getattr__(name: str):
    if name == "convert":
        from .pipeline import convert

        return convert
    if name == "ConvertReport":
        from .report import ConvertReport

        return ConvertReport
    raise AttributeError(f"module 'mlx_openelm.convert' has no attribute {name!r}")
