"""Chat templates: the Jinja template a model folder ships, rendered exactly as transformers'
``apply_chat_template`` renders it, within bounds of time and size.

Which template (`read_folder_template`): the folder's ``chat_template.jinja`` (with any named
extras in ``additional_chat_templates/*.jinja``), else ``tokenizer_config.json``'s
``chat_template``: a string, or a list of ``{"name", "template"}`` (``tool_use`` is chosen when
tools are given, else ``default``). A folder with neither has no template (the tokenizer then
uses OpenELM-Instruct's format).

How it renders (`ChatTemplate.render`): transformers' environment, so the text is the same byte
for byte: Jinja2's ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
loop controls, a ``tojson`` that does not escape HTML, ``raise_exception``, ``strftime_now``,
``namespace`` (no ``_`` names) and a restricted ``dict``; the messages rebuilt as plain JSON data
without ``None`` values; ``tools``, ``documents``, ``add_generation_prompt`` and the caller's
keyword arguments as variables. A template is data from the Hub: rendering is bounded in time
(`MAX_RENDER_SECONDS`) and in output (`MAX_RENDER_CHARS`, also for single expressions such as
``'x' * 10**9``), and every failure is one `ChatTemplateError` line naming the template's file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ChatTemplateError, PromptError, TokenizerError, one_line
from ..folder.names import CHAT_TEMPLATE_FILE, EXTRA_CHAT_TEMPLATES, TOKENIZER_CONFIG
from ..folder.reading import read_json_object
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_CHARS = 8 << 20  # far more than any model's context holds
# (deadline, seconds allowed) of the render running in this thread (or task)
_DEADLINE: ContextVar[tuple[float, float]] = ContextVar("chat_template_deadline", default=(math.inf, math.inf))

PathLike = Union[str, Path]


class _Refused(Exception):
    """Raised inside a render that went past its bounds."""


def _plain(value: Any, where: str) -> Any:
    """`value` rebuilt from plain JSON types (as transformers does), so the sandbox sees no rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is dict:
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their methods
        if isinstance(value, kind):
            return kind(value) if kind is bool else getattr(kind, f"__{kind.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise PromptError(f"{where}: holds a {type(value).__name__}; chat messages, tools and documents hold only JSON "
                      "values (strings, numbers, booleans, lists, objects)")


def _arguments(call: Any, where: str) -> Any:
    """A tool call with its ``function.arguments`` JSON string parsed to an object, as templates expect."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError as e:
        raise PromptError(f"{where}.function.arguments: not valid JSON ({e})") from None
    return {**call, "function": {**function, "arguments": arguments}}


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The messages as a template sees them: plain JSON data, keys whose value is None dropped, and each
    ``tool_calls[].function.arguments`` string parsed (transformers and mlx-lm's server do the same)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(f"message {i} must be a mapping with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in _plain(message, f"message {i}").items() if v is not None}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_arguments(c, f"message {i}: tool_calls[{j}]")
                                     for j, c in enumerate(message["tool_calls"])]
        out.append(message)
    return out


# ---- the environment -----------------------------------------------------------------

def _environment(max_chars: int):
    """transformers' chat-template environment, plus a clock check at the start of every block the
    compiled template runs (`_render_bounded`'s time bound) and size checks on the operations that can
    build a huge value in one step (``*``, ``**``, and calls or filters given a huge width)."""
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(what: str):
        raise _Refused(f"{what} would exceed {max_chars} characters")

    class TickingCodeGenerator(CodeGenerator):
        def blockvisit(self, nodes, frame):  # each loop body, macro body, if branch, the template itself
            self.writeline("environment.tick()")
            super().blockvisit(nodes, frame)

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})
        code_generator_class = TickingCodeGenerator

        @staticmethod
        def tick():
            deadline, seconds = _DEADLINE.get()
            if time.monotonic() > deadline:
                raise _Refused(f"rendering took more than {seconds:g} s")

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > max_chars:
                        too_big("a repetition")
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right * math.log10(abs(left)) > max_chars:  # its digits
                    too_big("a power")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            if any(isinstance(a, int) and a > max_chars for a in (*args, *kwargs.values())):
                too_big(f"a call of {getattr(__obj, '__name__', 'a function')}")
            return super().call(__context, __obj, *args, **kwargs)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(), loopcontrols])

    def widths_checked(name: str):
        plain = env.filters[name]

        def checked(value, *args, **kwargs):
            if any(isinstance(a, int) and a > max_chars for a in (*args, *kwargs.values())):
                too_big(f"the {name} filter")
            return plain(value, *args, **kwargs)
        return checked

    for name in ("center", "indent", "wordwrap", "truncate"):
        env.filters[name] = widths_checked(name)
    env.filters["tojson"] = _tojson
    env.globals.update(_template_globals())
    return env


def _generation_tag():
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the assistant's tokens for
    training masks): rendered as its body, as transformers renders it."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson`: no HTML escaping, and json.dumps' options."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_globals() -> dict:
    """transformers' globals: raise_exception, strftime_now, a restricted dict, a namespace without `_` names."""
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # Jinja's signature trick, so namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the name {name!r}")

    return {"raise_exception": raise_exception, "strftime_now": lambda fmt: datetime.now().strftime(fmt),
            "dict": TemplateDict(), "namespace": Namespace}


@lru_cache(maxsize=64)
def _compiled(source: str, max_chars: int):
    env = _environment(max_chars)
    return env.from_string(source), env


# ---- bounded rendering -------------------------------------------------------------------

def _render_bounded(template, context: dict, max_seconds: float, max_chars: int) -> str:
    """`template` rendered with `context`, streamed, refusing output past `max_chars` characters and
    work past `max_seconds` (every block the template runs, each loop iteration and macro call
    included, checks the clock: see `_environment`), so loops that print nothing are bounded too."""
    deadline = time.monotonic() + max_seconds
    token = _DEADLINE.set((deadline, max_seconds))
    parts, size = [], 0
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise _Refused(f"its output exceeds {max_chars} characters")
            parts.append(chunk)
    finally:
        _DEADLINE.reset(token)
    return "".join(parts)


class ChatTemplate:
    """A Jinja chat template and where it came from (`origin`, the file its errors name).

    `source` is one template, or named templates (``{"default": ..., "tool_use": ...}``) of which
    `render` picks ``tool_use`` when tools are given and ``default`` otherwise (transformers'
    rule). The template compiles at once: a syntax error is a `ChatTemplateError` here.
    """

    def __init__(self, source: Union[str, Mapping[str, str]], origin: PathLike,
                 max_seconds: float = MAX_RENDER_SECONDS, max_chars: int = MAX_RENDER_CHARS):
        self.origin = str(origin)
        self.templates = {"default": source} if isinstance(source, str) else dict(source)
        if not self.templates or not all(isinstance(t, str) for t in self.templates.values()):
            raise ChatTemplateError(f"{self.origin}: a chat template must be a string, or named strings")
        self.max_seconds, self.max_chars = max_seconds, max_chars
        for name in self.templates:
            self._compile(name)

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, names={sorted(self.templates)})"

    @property
    def source(self) -> str:
        """The text of the template used without tools (``default``, else the only one)."""
        return self.templates.get("default") or next(iter(self.templates.values()))

    @cached_property
    def supports_tools(self) -> bool:
        """Whether a template refers to the ``tools`` variable (a ``tool_use`` one, or the default)."""
        import jinja2.meta

        return any("tools" in jinja2.meta.find_undeclared_variables(self._compile(name)[1].parse(text))
                   for name, text in self.templates.items())

    @classmethod
    def from_file(cls, path: PathLike, **bounds) -> "ChatTemplate":
        """The template in a Jinja file (as ``--chat-template FILE`` names one)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ChatTemplateError(f"{path}: a chat template must be UTF-8 text") from None
        except OSError as e:
            raise ChatTemplateError(f"{path}: cannot read the chat template ({e.strerror or e})") from None
        return cls(text, path, **bounds)

    def _compile(self, name: str):
        import jinja2

        try:
            return _compiled(self.templates[name], self.max_chars)
        except jinja2.TemplateSyntaxError as e:
            label = "" if name == "default" else f" {name!r}"
            raise ChatTemplateError(f"{self.origin}: the chat template{label} is not valid Jinja "
                                    f"(line {e.lineno}: {one_line(e.message or e)})") from None

    def _select(self, tools) -> str:
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ChatTemplateError(f"{self.origin}: the named chat templates {sorted(self.templates)} include no "
                                "'default'")

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping]] = None,
               documents: Optional[Sequence[Mapping]] = None, add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the template writes it (text; special tokens as their text).

        `tools` are JSON-schema objects (``{"type": "function", "function": {...}}``), `documents`
        objects; `kwargs` become template variables (the tokenizer passes its special tokens,
        bos_token, eos_token, ..., this way). A message's tool calls may carry their arguments as a
        JSON string. Raises `ChatTemplateError` naming the template's file when it refuses the
        conversation (``raise_exception``), breaks the sandbox's rules, fails, or goes past its bounds;
        `PromptError` for messages that are not JSON data.
        """
        import jinja2

        name = self._select(tools)
        template, _env = self._compile(name)
        context = {"messages": prepare_messages(messages), "tools": _plain(tools, "tools"),
                   "documents": _plain(documents, "documents"), "add_generation_prompt": add_generation_prompt,
                   **_plain(kwargs, "chat template arguments")}
        where = f"{self.origin}: the chat template"
        try:
            return _render_bounded(template, context, self.max_seconds, self.max_chars)
        except _Refused as e:
            raise ChatTemplateError(f"{where} was stopped: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{where} did something its sandbox forbids ({one_line(e)})") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined values
            raise ChatTemplateError(f"{where} refused the messages: {one_line(e)}") from None
        except (MemoryError, RecursionError) as e:
            raise ChatTemplateError(f"{where} was stopped: {type(e).__name__}") from None
        except Exception as e:  # noqa: BLE001 - any failure of template code is the template's
            raise ChatTemplateError(f"{where} failed: {type(e).__name__}: {one_line(e)}") from None


# ---- which template a folder has -----------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatTemplateError(f"{path}: a chat template must be UTF-8 text") from None
    except OSError as e:
        raise ChatTemplateError(f"{path}: cannot read the chat template ({e.strerror or e})") from None


def _named_templates(value: Any, path: Path) -> Union[str, dict[str, str]]:
    """tokenizer_config.json's ``chat_template``: a string, or a list of ``{"name", "template"}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(f"{path}: 'chat_template' must be a string or a list of {{\"name\", \"template\"}} "
                            f"objects, got {one_line(json.dumps(value), 80)}")


def read_tokenizer_config(folder: PathLike) -> dict:
    """`folder`'s tokenizer_config.json as a dict ({} when there is none); unreadable: a one-line error."""
    return read_json_object(Path(folder) / TOKENIZER_CONFIG, TokenizerError)


def read_folder_template(folder: PathLike, config: Optional[Mapping[str, Any]] = None,
                         **bounds) -> Optional[ChatTemplate]:
    """The chat template `folder` ships (see the module docstring), or None. `config`: the folder's
    tokenizer_config.json when the caller has read it already (`read_tokenizer_config`)."""
    folder = Path(folder)
    config = read_tokenizer_config(folder) if config is None else config
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        named = {p.stem: _read_text(p) for p in sorted((folder / EXTRA_CHAT_TEMPLATES).glob("*.jinja"))}
        return ChatTemplate({**named, "default": _read_text(jinja_file)}, jinja_file, **bounds)
    if config and config.get("chat_template") is not None:
        path = folder / TOKENIZER_CONFIG
        return ChatTemplate(_named_templates(config["chat_template"], path), path, **bounds)
    return None
