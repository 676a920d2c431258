"""Errors meant for users: each message names the file, key or option at fault.

An option is named as the library call's parameter, never as a command-line flag: the one at
fault leads the message (`mlx_path: ...`), others are quoted in backticks (`force=True`,
`batch_size=4`). The CLI shows each as its command's flag (`cli_common.as_flags`).
"""


def one_line(text: object, most: int = 300) -> str:
    """`text` on one line (whitespace runs become one space), cut to `most` characters: for quoting
    another library's message inside ours."""
    text = " ".join(str(text).split())
    return text if len(text) <= most else text[: most - 3] + "..."


class OpenELMError(Exception):
    """Base class for every error mlx-openelm reports to a user."""


class ConfigError(OpenELMError, ValueError):
    """A config.json (or preset, or option) that is not a valid OpenELM architecture."""


class CheckpointError(OpenELMError):
    """Weights that are missing, unreadable, unexpected or wrongly shaped."""


class TokenizerError(OpenELMError):
    """A tokenizer that cannot be found or read."""


class ContextLengthError(OpenELMError, ValueError):
    """A request that does not fit in the model's context window."""


class OpenELMWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI shows it once, on stderr)."""


class PromptError(OpenELMError, ValueError):
    """A prompt that cannot be used: text with bytes that are not valid UTF-8, a value of the
    wrong kind, or token ids outside the vocabulary."""


class OptionError(OpenELMError, ValueError):
    """An option or argument out of its range: a command-line flag or an API keyword."""


class DataError(OpenELMError, ValueError):
    """Training data that cannot be used (fine-tuning's JSONL files); the message names the file and line."""


class TrainingInterrupted(OpenELMError):
    """Fine-tuning stopped by Ctrl-C or a signal, after saving the adapters trained so far."""

    def __init__(self, message: str, iteration: int, path):
        super().__init__(message)
        self.iteration = iteration
        self.path = path


class ChatTemplateError(OpenELMError, ValueError):
    """A chat template that cannot be read, compiled or rendered (the message names its file), or one that
    refused the conversation it was given (its `raise_exception`)."""


class GrammarError(OptionError):
    """A constraint (JSON schema, regex, Lark grammar, tools) that cannot be compiled or used; the
    message names the keyword, line or field at fault. The server answers it with a 400."""


class ToolError(OptionError):
    """OpenAI tools, tool_choice or tool messages that cannot be used (a clashing or malformed tool, a
    tool message without its tool_call_id); the message names the field. The server answers 400."""
