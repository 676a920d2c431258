"""The `mlx-openelm` command line: the click group and the table of its subcommands.

Each subcommand lives with its feature and is imported only when run, so
`mlx-openelm --help` is instant; this module imports nothing from the project but `blas`
(a leaf, for `--version`).
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; each module imports MLX inside its command body only.
COMMANDS = {
    "generate": "mlx_openelm.generate_cli:generate_command",
    "chat": "mlx_openelm.chat_cli:chat_command",
    "convert": "mlx_openelm.convert.cli:convert",
    "bench": "mlx_openelm.bench.cli:bench",
    "eval": "mlx_openelm.evaluate_cli:eval_command",
    "serve": "mlx_openelm.serve.cli:serve_command",
    "lora": "mlx_openelm.tuning.cli:lora_command",
    "fuse": "mlx_openelm.tuning.cli:fuse_command",
}


def _print_version(ctx, param, value):
    """`--version`: the package's version and which BLAS MLX's CPU matrix products would use."""
    if not value or ctx.resilient_parsing:
        return
    import warnings
    from importlib.metadata import version

    from mlx_openelm.blas import describe  # a leaf; loads the BLAS, not MLX

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed load's reason is in the line itself
        blas = describe()
    click.echo(f"mlx-openelm, version {version('mlx-openelm')}\nBLAS: {blas}")
    ctx.exit()


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the BLAS under MLX's CPU backend, and exit.")
def main():
    """Run Apple's OpenELM models with MLX: generate, chat, serve, convert, eval, bench, lora (fine-tune), fuse."""


if __name__ == "__main__":
    main()
