"""The `mlx-openelm` command line: the click group and the table of its subcommands.

Each subcommand lives with its feature and is imported only when run, so
`mlx-openelm --help` is instant; this module imports nothing from the project.
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


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-openelm")
def main():
    """Run Apple's OpenELM models with MLX: generate, chat, serve, convert, eval, bench, lora (fine-tune), fuse."""


if __name__ == "__main__":
    main()
