"""Fine-tuning (installed as mlx_openelm.tuning): LoRA, DoRA and full fine-tuning, adapters, fuse.

`layers` (the LoRA/DoRA wrappers), `config` (adapter_config.json), `adapters` (applying and
loading adapters). Nothing is imported here, so the CLI's `--help` stays instant.
"""
