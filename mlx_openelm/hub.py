"""Resolve `--model` / `--tokenizer` references to local paths.

A reference is a local path or a Hugging Face repo id (``apple/OpenELM-270M-Instruct``,
``mlx-community/...``). Repo ids are fetched once into the standard Hugging Face cache
through `huggingface_hub` (with its progress bars) and work offline afterwards
(``HF_HUB_OFFLINE=1``). With no model given, `DEFAULT_MODEL` is used. `generate`, `chat`
and `convert` share these functions.

Apple's OpenELM repos carry no tokenizer. `resolve_tokenizer` looks, in order, at the
tokenizer given, the model folder, and a default Llama-2 tokenizer repo
(`DEFAULT_TOKENIZER_REPO`, overridden by the ``MLX_OPENELM_TOKENIZER_REPO`` environment
variable; set it to an empty string to turn the fallback off).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .errors import CheckpointError, OpenELMError, TokenizerError
from .folder.names import (CONFIG_FILE, GENERATION_CONFIG, SAFETENSORS_INDEX, TOKENIZER_FILE, TOKENIZER_FILES,
                           TOKENIZER_JSON_COMPANIONS)

# An ungated mirror of meta-llama/Llama-2-7b-hf (whose tokenizer OpenELM uses); only its
# tokenizer.model is ever fetched.
DEFAULT_TOKENIZER_REPO = "NousResearch/Llama-2-7b-hf"
TOKENIZER_REPO_ENV = "MLX_OPENELM_TOKENIZER_REPO"
# What `chat` and `generate` run when no model is given (about 1 GB, fetched once).
DEFAULT_MODEL = "apple/OpenELM-270M-Instruct"
MODEL_PATTERNS = (CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX, GENERATION_CONFIG, *TOKENIZER_FILES,
                  *TOKENIZER_JSON_COMPANIONS)
TOKENIZER_PATTERNS = (*TOKENIZER_FILES, *TOKENIZER_JSON_COMPANIONS)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "on", "yes", "true"}

PathLike = Union[str, Path]


def looks_like_repo_id(reference: PathLike) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    text = str(reference)
    return bool(_REPO_ID.match(text)) and ".." not in text and not Path(text).expanduser().exists()


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    return False


def hub_cache_dir() -> Optional[Path]:
    """The Hugging Face cache folder, read from the environment now (None: the library default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def _cache_description() -> str:
    cache = hub_cache_dir()
    if cache is None:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    return f"the Hugging Face cache ({cache})"


def download_command(repo_id: str, files: Sequence[str] = ()) -> str:
    """The `hf` command that puts `repo_id` (or just `files` of it) into the Hugging Face cache."""
    return " ".join(["hf download", repo_id, *files])


def download(
    repo_id: str,
    allow_patterns: Sequence[str] = MODEL_PATTERNS,
    error: type[OpenELMError] = CheckpointError,
    files: Sequence[str] = (),
    alternative: str = "pass a local folder",
) -> Path:
    """The local snapshot folder of `repo_id`, downloading the files matching `allow_patterns`.

    Offline (``HF_HUB_OFFLINE=1``) only the cache is looked at. Errors are `error`
    instances whose message says what to do: the `hf download` command (for `files`
    of the repo, or all of it), or `alternative`.
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    offline = hub_offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            allow_patterns=list(allow_patterns),
            cache_dir=hub_cache_dir(),
            local_files_only=offline,
        )
    except hub_errors.GatedRepoError:
        raise error(
            f"{repo_id} is gated on the Hugging Face Hub: accept its license on huggingface.co/{repo_id} "
            f"and log in (`hf auth login`), or {alternative}"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise error(
            f"{repo_id}: no such local folder, and no such repo on the Hugging Face Hub "
            "(or it is private: log in with `hf auth login`)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise error(f"{repo_id}: its main revision was not found on the Hugging Face Hub") from None
    except hub_errors.LocalEntryNotFoundError:
        command = download_command(repo_id, files)
        if offline:
            raise error(
                f"{repo_id} is not in {_cache_description()} and HF_HUB_OFFLINE is set: download it once "
                f"while online with `{command}` (or unset HF_HUB_OFFLINE and run again), or {alternative}"
            ) from None
        raise error(
            f"{repo_id} is not in {_cache_description()} and the Hugging Face Hub cannot be reached: "
            f"check your connection and run again (or `{command}`), or {alternative}"
        ) from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as e:
        raise error(f"{repo_id}: cannot fetch it from the Hugging Face Hub ({e})") from None
    return Path(folder)


def resolve_model_path(reference: Optional[PathLike] = None) -> Path:
    """A local model folder for `reference`: an existing path, else a Hugging Face repo id.

    None means `DEFAULT_MODEL` (what `chat` and `generate` run without ``--model``).
    """
    if reference is None:
        return download(DEFAULT_MODEL, MODEL_PATTERNS, CheckpointError,
                        alternative="pass --model with a local model folder (no --model given: "
                                    f"{DEFAULT_MODEL} is the default)")
    if not str(reference).strip():  # Path('') is the current folder: never read it by accident
        raise CheckpointError("the model path is empty: give a model folder or a Hugging Face repo id")
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if looks_like_repo_id(reference):
        return download(str(reference), MODEL_PATTERNS, CheckpointError)
    raise CheckpointError(f"{reference}: model folder not found (nor a Hugging Face repo id like owner/name)")


def find_tokenizer(folder: PathLike) -> Optional[Path]:
    """The tokenizer file in `folder` (tokenizer.model before tokenizer.json), or None."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _tokenizer_from_repo(repo_id: str, patterns: Sequence[str] = TOKENIZER_PATTERNS) -> Path:
    wanted = [name for name in TOKENIZER_FILES if name in patterns]
    folder = download(repo_id, patterns, TokenizerError, files=wanted,
                      alternative="pass --tokenizer with a local tokenizer.model or tokenizer.json")
    path = find_tokenizer(folder)
    if path is None:
        raise TokenizerError(f"{repo_id} holds no {' or '.join(wanted)}")
    return path


def default_tokenizer_repo() -> Optional[str]:
    """The fallback tokenizer repo: $MLX_OPENELM_TOKENIZER_REPO if set (empty: none), else the default."""
    repo = os.environ.get(TOKENIZER_REPO_ENV, DEFAULT_TOKENIZER_REPO).strip()
    return repo or None


def resolve_tokenizer(
    model_folder: Optional[PathLike],
    tokenizer: Optional[PathLike] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """The tokenizer file (tokenizer.model or tokenizer.json) to use for `model_folder`.

    `tokenizer` (a file, a folder holding one, or a repo id) wins; else the model folder's
    own; else the default tokenizer repo's tokenizer.model (from the cache offline,
    downloaded online); else a `TokenizerError` saying what to pass. A folder holding both
    files gives its tokenizer.model (`TOKENIZER_FILES` is the order).
    """
    if tokenizer is not None:
        if not str(tokenizer).strip():  # Path('') is the current folder, whose tokenizer would be taken
            raise TokenizerError("the tokenizer path is empty: give a tokenizer.model or tokenizer.json file, "
                                 "its folder or a repo id")
        path = Path(tokenizer).expanduser()
        if path.is_dir():  # a local folder is never read as a repo id, even if named like one
            found = find_tokenizer(path)
            if found is not None:
                return found
            raise TokenizerError(f"{tokenizer}: no {' or '.join(TOKENIZER_FILES)} in this folder")
        if path.is_file():
            return path
        if looks_like_repo_id(tokenizer):
            return _tokenizer_from_repo(str(tokenizer))
        raise TokenizerError(f"{tokenizer}: tokenizer file not found")
    found = find_tokenizer(model_folder) if model_folder is not None else None
    if found is not None:
        return found
    repo = default_tokenizer_repo()
    reason = f"the fallback is off ({TOKENIZER_REPO_ENV} is empty)"
    if repo is not None:
        try:
            path = _tokenizer_from_repo(repo, [TOKENIZER_FILE])  # Llama-2's: its tokenizer.model is all we need
        except OpenELMError as e:
            reason = f"the default tokenizer repo could not be used: {e}"
        else:
            if log is not None:
                log(f"No tokenizer in {model_folder}; using the Llama-2 tokenizer from {repo}")
            return path
    raise TokenizerError(
        f"no {' or '.join(TOKENIZER_FILES)} in {model_folder}. Apple's OpenELM checkpoints ship without a "
        f"tokenizer: pass the Llama-2 SentencePiece tokenizer with --tokenizer (a tokenizer.model file, a folder "
        f"holding it, or a Hugging Face repo id such as {DEFAULT_TOKENIZER_REPO}), or copy it into the model folder "
        f"({reason})"
    )
