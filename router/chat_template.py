"""Chat messages -> one prompt text, for the router's `/v1/chat/completions`.

The hook: `load(source)` reads a chat template from a model folder (`chat_template.jinja`, or the
`chat_template` entry of `tokenizer_config.json`, as Hugging Face ships them) or from a template
file, and returns a `ChatFormatter`. The router gets the source from `--chat-template` (env
`PDMESH_ROUTER_CHAT_TEMPLATE`); `pdmesh up --model FOLDER` passes the model's folder.

A model's template is rendered the way Hugging Face's `apply_chat_template` renders it: Jinja2 in a
sandbox, `trim_blocks` and `lstrip_blocks`, with `messages`, `add_generation_prompt=True`, the
tokenizer's `bos_token` / `eos_token` and a `raise_exception` helper. Without a template (the
random-weight presets) the fallback is plain and documented (README "OpenAI-compatible HTTP API"):

    System: <content>
    User: <content>
    Assistant: <content>
    Assistant:

one line per message ("<Role>: <content>", the role capitalized), then "Assistant:" to prompt
the answer. The rendered text goes to the workers as `prompt.text` and is tokenized there, special
tokens of the template (`<|im_start|>`, ...) matched as such. The worker's tokenizer adds what its
post-processor adds: a template that writes `{{ bos_token }}` itself, for a tokenizer that also
adds BOS, gives two (Hugging Face tokenizes chat text without special tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatFormatter:
    """Renders a list of `{"role", "content"}` messages (content already plain text)."""

    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    source: str = "fallback"

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self.template is None:
            return fallback(messages)
        return _compiled(self.template).render(
            messages=list(messages), add_generation_prompt=True, bos_token=self.bos_token,
            eos_token=self.eos_token)


def fallback(messages: Sequence[dict[str, str]]) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


_CACHE: dict[str, Any] = {}


def _compiled(template: str):
    compiled = _CACHE.get(template)
    if compiled is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InvalidArgument(f"the model's chat template refused the messages: {message}",
                                  reason=Reason.CHAT_TEMPLATE_ERROR)
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        compiled = _CACHE[template] = environment.from_string(template)
    return compiled


def _token_text(value: Any) -> str:
    """`bos_token` in tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def load(source: str | None) -> ChatFormatter:
    """The formatter for `source`: a model folder, a template file, or None (the fallback).

    A folder without a template gives the fallback; a path that does not exist, or a template
    that does not compile, is a ValueError naming the path (the router refuses to start)."""
    if not source:
        return ChatFormatter()
    path = Path(source)
    if path.is_file():
        formatter = ChatFormatter(template=path.read_text(), source=str(path))
    elif path.is_dir():
        formatter = _from_folder(path)
    else:
        raise ValueError(f"chat template source {source!r} is neither a model folder nor a file")
    if formatter.template is not None:
        try:
            _compiled(formatter.template)
        except Exception as exc:  # a jinja2.TemplateSyntaxError, named for the operator
            raise ValueError(f"the chat template of {source} does not compile: {exc}") from None
    return formatter


def _from_folder(folder: Path) -> ChatFormatter:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template, source = jinja.read_text(), str(jinja)
    else:
        source = str(config_path)
    if isinstance(template, list):  # several named templates: the "default" one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return ChatFormatter(source=f"fallback (no chat template in {folder})")
    return ChatFormatter(template=template, bos_token=_token_text(config.get("bos_token")),
                         eos_token=_token_text(config.get("eos_token")), source=source)
