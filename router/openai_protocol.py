"""OpenAI request bodies -> a checked `Job`: the `GenerateRequest` the gRPC API takes, plus what the
HTTP front door does itself (stop strings, streaming, the routing extension).

Supported, as OpenAI defines them: `model` (must name the served model: 404 otherwise),
`prompt` (completions: a string, a list of token ids, or a list holding one of these),
`messages` (chat: roles system/developer/user/assistant, text content), `max_tokens`
(chat also `max_completion_tokens`; default 16 for completions, the context's end for chat),
`temperature` (0..2, default 1), `top_p` (0..1], `n` (1..16), `stop` (a string or up to 4),
`seed` (drawn at random when absent and sampling), `stream`, `stream_options.include_usage`, `user`.
Parameters the engine cannot honour are accepted only at the value that changes nothing
(`NEUTRAL`: `presence_penalty` 0, `logprobs` null/false, `echo` false, ...); any other value, and
any parameter not listed, is a 400 that names it (`UNSUPPORTED_PARAMETER`), never ignored.

Extensions in the body: `ignore_eos` (as vLLM and SGLang take it: generate past the end of
sequence, to exactly the token budget), `routed_dp_rank` (pin the prefill DP rank), `omit_rank_hint` (with
it: tell only the prefill, see router.proto), `return_routing` (each choice then carries a
`pdmesh` object: room, instances, ranks, rank path, TTFT).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

from pdmesh.errors import InvalidArgument, NotFound
from pdmesh.reasons import Reason
from pdmesh.router.chat_template import ROLES, ChatFormatter
from pdmesh.router.service import MAX_SAMPLES
from pdmesh.router.v1 import router_pb2
from pdmesh.worker.v1 import worker_pb2

COMPLETION, CHAT = "text_completion", "chat.completion"
#: max_new_tokens for "until the context ends": the workers clip it to what the model leaves.
TO_CONTEXT_END = 1 << 20
MAX_STOPS = 4
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "stream_options", "user", "ignore_eos", "routed_dp_rank", "omit_rank_hint", "return_routing"}
FIELDS = {COMPLETION: COMMON | {"prompt"}, CHAT: COMMON | {"messages", "max_completion_tokens"}}
#: Parameters the engine cannot honour: accepted only where the value asks for nothing.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "logit_bias": lambda v: not v,
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "parallel_tool_calls": lambda v: v is None,
}


@dataclass(frozen=True)
class Job:
    """One checked request: what to send to Generate and what to do with its answer."""

    kind: str
    model: str
    request: router_pb2.GenerateRequest
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_routing: bool = False

    @property
    def n(self) -> int:
        return self.request.n or 1


def bad(param: str, message: str, reason: str = Reason.INVALID_PARAMETER) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"param": param})


def parse(kind: str, body: Any, served_model: str, chat: ChatFormatter | None = None) -> Job:
    """A completion (`kind` COMPLETION) or chat (CHAT) body -> `Job`; InvalidArgument / NotFound."""
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    _refuse_unsupported(kind, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the name GET /v1/models lists")
    if model != served_model:
        raise NotFound(f"model {model!r} is not served here; this router serves {served_model!r}",
                       reason=Reason.MODEL_NOT_FOUND, metadata={"param": "model", "model": model})
    if kind == COMPLETION:
        prompt, default_max = _completion_prompt(body.get("prompt")), 16
    else:
        prompt = worker_pb2.Prompt(text=(chat or ChatFormatter()).render(_messages(body.get("messages"))))
        default_max = TO_CONTEXT_END
    request = router_pb2.GenerateRequest(prompt=prompt, n=_int(body, "n", 1, MAX_SAMPLES, 1))
    _sampling(kind, body, request, default_max)
    rank = _int(body, "routed_dp_rank", 0, (1 << 32) - 1, None)
    if rank is not None:
        request.routed_dp_rank = rank
    request.omit_rank_hint = _bool(body, "omit_rank_hint")
    stream = _bool(body, "stream")
    return Job(kind, model, request, stop=_stops(body.get("stop")), stream=stream,
               include_usage=_stream_options(body, stream), return_routing=_bool(body, "return_routing"))


def _refuse_unsupported(kind: str, body: dict) -> None:
    for name, value in body.items():
        if name in FIELDS[kind]:
            continue
        check = NEUTRAL.get(name)
        if check is None:
            raise bad(name, f"parameter {name!r} is not supported by this server", Reason.UNSUPPORTED_PARAMETER)
        if not check(value):
            raise bad(name, f"{name}={value!r} is not supported: the engine cannot do it (only the "
                      "value that asks for nothing is accepted)", Reason.UNSUPPORTED_PARAMETER)


def _sampling(kind: str, body: dict, request: router_pb2.GenerateRequest, default_max: int) -> None:
    sampling = request.sampling
    max_name = "max_completion_tokens" if kind == CHAT and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    sampling.max_new_tokens = _int(body, max_name, 1, TO_CONTEXT_END, default_max)
    sampling.temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p", "top_p must be greater than 0 and at most 1")
    sampling.top_p = top_p
    sampling.ignore_eos = _bool(body, "ignore_eos")
    seed = _int(body, "seed", 0, (1 << 64) - 1, None)
    sampling.seed = seed if seed is not None else (secrets.randbits(63) if sampling.temperature > 0 else 0)


def _int(body: dict, name: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(name, f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return bool(value)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "stop must be a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    return tuple(dict.fromkeys(stops))


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "stream_options takes only include_usage", Reason.UNSUPPORTED_PARAMETER)
    return _bool(options, "include_usage")


def _completion_prompt(value: Any) -> worker_pb2.Prompt:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return worker_pb2.Prompt(text=value)
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool)
                                                 and 0 <= i < 1 << 32 for i in value):
        return worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=value))
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad("prompt", "one prompt per request: send each prompt as its own request",
                  Reason.UNSUPPORTED_PARAMETER)
    raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"messages[{i}]", f"messages[{i}] needs a role, one of {', '.join(ROLES)}")
        extra = [k for k, v in message.items() if k not in ("role", "content", "name") and v is not None]
        if extra:
            raise bad(f"messages[{i}].{extra[0]}", f"messages[{i}].{extra[0]} is not supported",
                      Reason.UNSUPPORTED_PARAMETER)
        entry = {"role": message["role"], "content": _content(i, message.get("content"))}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        messages.append(entry)
    return messages


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise bad(f"messages[{i}].content", "only text content parts are supported", Reason.UNSUPPORTED_PARAMETER)
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
