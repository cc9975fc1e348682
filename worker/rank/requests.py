"""Turning a worker request's proto fields into checked domain values (shared by both roles).

Owns: the prompt (text or ids -> checked token ids), the sampling parameters, the transfer token,
and the incremental detokenizer that streams text without splitting a character.
"""

from __future__ import annotations

from typing import Sequence

from pdmesh.common.v1 import common_pb2
from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason
from pdmesh.worker.engine.protocol import Engine, SamplingParams
from pdmesh.worker.v1 import worker_pb2

DEFAULT_MAX_NEW_TOKENS = 16
MIN_TOKEN_BYTES, MAX_TOKEN_BYTES = 16, 64


def prompt_ids(engine: Engine, prompt: worker_pb2.Prompt) -> list[int]:
    """Token ids of the prompt; INVALID_ARGUMENT if empty, out of vocabulary or too long."""
    kind = prompt.WhichOneof("kind")
    if kind == "text" and prompt.text:
        ids = engine.tokenizer.encode(prompt.text)
    elif kind == "token_ids" and prompt.token_ids.ids:
        ids = list(prompt.token_ids.ids)
        vocab = engine.tokenizer.vocab_size
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise InvalidArgument(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})",
                                  reason=Reason.TOKEN_OUT_OF_VOCABULARY, metadata={"token_id": bad[0], "vocab_size": vocab})
    else:
        raise InvalidArgument("the prompt is empty: set prompt.text or prompt.token_ids", reason=Reason.EMPTY_PROMPT)
    if len(ids) >= engine.max_seq_len:
        raise InvalidArgument(f"the prompt has {len(ids)} tokens; this model takes at most "
                              f"{engine.max_seq_len - 1}", reason=Reason.PROMPT_TOO_LONG,
                              metadata={"prompt_tokens": len(ids), "max_seq_len": engine.max_seq_len})
    return ids


def max_new_tokens(engine: Engine, sampling: common_pb2.SamplingParams, prompt_len: int) -> int:
    """The token budget, clipped to what the model's context leaves (at least 1)."""
    wanted = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if wanted > 1 << 20:
        raise InvalidArgument(f"max_new_tokens {wanted} is absurd", reason=Reason.INVALID_SAMPLING_PARAMS,
                              metadata={"max_new_tokens": wanted})
    return max(1, min(wanted, engine.max_seq_len - prompt_len))


def sampling_params(sampling: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p or 1.0, seed=sampling.seed)


def stop_ids(engine: Engine, sampling: common_pb2.SamplingParams) -> frozenset[int]:
    return frozenset() if sampling.ignore_eos else frozenset(engine.tokenizer.eos_ids)


def transfer_token(token: bytes) -> bytes:
    if not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
        raise InvalidArgument(
            f"transfer_token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} random bytes shared by the "
            f"prefill and decode requests, got {len(token)}", reason=Reason.INVALID_TRANSFER_TOKEN)
    return token


class Detokenizer:
    """Streams text for a growing list of ids, holding back an unfinished character."""

    def __init__(self, engine: Engine) -> None:
        self._tokenizer = engine.tokenizer
        self._ids: list[int] = []
        self._sent = 0

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent:], len(text)
        return piece

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        piece, self._sent = text[self._sent:], len(text)
        return piece
