"""Every file name of a model folder and of an adapter folder, defined once.

A model folder (Hugging Face's layout, which mlx-lm and transformers read too) holds
`config.json`, the weights (`model.safetensors`, or shards listed by
`model.safetensors.index.json`), a tokenizer (`tokenizer.model` or `tokenizer.json`) and the
Hugging Face files describing it. An adapter folder (ours and mlx-lm's) holds
`adapter_config.json` and `adapters.safetensors`. Imports nothing, so anything may use it.
"""

CONFIG_FILE = "config.json"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

TOKENIZER_FILE = "tokenizer.model"  # Llama-2 SentencePiece model
TOKENIZER_JSON = "tokenizer.json"  # a Hugging Face tokenizers file (mlx-community folders, byte-level BPE models)
# The tokenizer files a folder may hold, in the order they are preferred: OpenELM's own
# SentencePiece model wins where a folder holds both (mlx-community's carry Llama-2's as both).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_JSON)
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' newer home for the chat template
EXTRA_CHAT_TEMPLATES = "additional_chat_templates"  # a folder of named ones (NAME.jinja)
# What names a tokenizer.json's special tokens and chat template, and travels with it.
TOKENIZER_JSON_COMPANIONS = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE)
# The Hugging Face files a converted folder gets beside its tokenizer (`hf_files`).
HF_TOKENIZER_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)
# Everything beside the weights and config.json that describes the tokenizer, copied as it is
# when a folder is rewritten (`fuse`).
TOKENIZER_SIDE_FILES = (*TOKENIZER_FILES, *HF_TOKENIZER_FILES, CHAT_TEMPLATE_FILE)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTERS_FILE = "adapters.safetensors"

# A folder being written is ".<name>.tmp-<random>" beside its target, with this file inside (the
# writer's pid) until the moment it is renamed into place (`install`); the loader refuses it.
TEMPORARY_INFIX = ".tmp-"
IN_PROGRESS_FILE = ".mlx-openelm-converting"


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (from 1) of `count`, as Hugging Face names them."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"
