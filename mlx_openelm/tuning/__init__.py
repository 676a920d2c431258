"""Fine-tuning (installed as mlx_openelm.tuning): LoRA, DoRA and full fine-tuning, adapters, fuse.

`layers` (the LoRA/DoRA wrappers), `config` (adapter_config.json and its validator), `adapters`
(applying and loading adapters), `saving` (atomic adapter files), `data` (JSONL, masks, batches),
`trainer` (loss, schedule, loop), `fuse` (merging into a model folder), `cli` (`lora`, `fuse`).
Nothing is imported here, so the CLI's `--help` stays instant.
"""
