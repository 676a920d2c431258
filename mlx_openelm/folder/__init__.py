"""The model folder on disk, in one room: its file names (`names`), writing it (`writing`: shards,
config.json, the tokenizer) and installing it atomically (`install`: a temporary folder renamed
into place, never replacing what the user has without `force`). The converter and fine-tuning's
`fuse` both write folders through here; the loader reads them by the same names."""
