"""Chat requests -> a prompt, through the model's own chat template (no torch).

    from pdmesh.chat import apply_chat_template
    text = apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = apply_chat_template(messages, model="smollm2", tokenize=True)

The template is the model folder's `chat_template.jinja` (or `tokenizer_config.json`'s
`chat_template`), rendered as transformers renders it: a sandboxed Jinja2 environment with
`trim_blocks` and `lstrip_blocks`, the loop-control extension, `raise_exception`, `tojson` and
`strftime_now`, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
The text form is what a `Prompt.text` carries: the ranks encode it with the model's tokenizer,
which reads the template's special tokens (`<|im_start|>`, ...) as the special ids. `tokenize=True`
gives those ids directly (encoded without adding a BOS of the tokenizer's own, as transformers
does), for a `Prompt.token_ids`. Templates and tokenizers are loaded once per process and model
(a render then costs tens of microseconds).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from pdmesh.errors import InvalidArgument
from pdmesh.models import DEFAULT_MODEL, resolve_model
from pdmesh.reasons import Reason

ROLES = ("system", "user", "assistant", "tool")


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.INVALID_CHAT_MESSAGES)


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts of `{"role", "content"}` with a known role and string content, or INVALID_ARGUMENT."""
    if isinstance(messages, (str, bytes)) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _bad(f"message {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _bad(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _bad(f"message {i} needs string content, got {type(content).__name__}")
        checked.append(dict(message))
    return checked


class ChatTemplate:
    """The chat template and special tokens of one model folder."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        source = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        if not isinstance(source, str) or not source:
            raise InvalidArgument(f"the model in {folder} has no chat template; send a plain prompt",
                                  reason=Reason.NO_CHAT_TEMPLATE, metadata={"path": folder})
        self.folder = folder
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template = _environment().from_string(source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        checked = check_messages(messages)
        try:
            return self._template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise _bad(f"the chat template failed on these messages: {exc}") from None

    def token_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        return list(_tokenizer(str(self.folder)).encode(text, add_special_tokens=False).ids)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # transformers' serialized AddedToken
        return str(value.get("content", ""))
    return value or ""


def _raise(message: str) -> None:
    raise _bad(f"the chat template refused the messages: {message}")


@functools.cache
def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.cache
def _tokenizer(folder: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


@functools.lru_cache(maxsize=32)
def chat_template(model: str = DEFAULT_MODEL, cache_dir: str | None = None) -> ChatTemplate:
    """The ChatTemplate of `model` (resolved once per process: a request pays only the render)."""
    return ChatTemplate(resolve_model(model, cache_dir))


def apply_chat_template(messages: Sequence[Mapping[str, Any]], *, model: str = DEFAULT_MODEL,
                        cache_dir: str | Path | None = None, tokenize: bool = False,
                        add_generation_prompt: bool = True) -> str | list[int]:
    """The prompt for `messages` under `model`'s chat template: text, or token ids if `tokenize`.

    `model` is what `--model` takes (a name, a Hugging Face folder or a .gguf file); a named
    model not yet converted is converted into the cache first (seconds, once).
    """
    template = chat_template(model, None if cache_dir is None else str(cache_dir))
    if tokenize:
        return template.token_ids(messages, add_generation_prompt)
    return template.render(messages, add_generation_prompt)
