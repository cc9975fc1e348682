"""What every fuzzed call must end in, and the tally of inputs tried per RPC.

The rule (DESIGN.md, "Errors"): a call ends OK or with a status that carries a
google.rpc.ErrorInfo of domain `pdmesh` and an UPPER_SNAKE reason, never UNKNOWN, INTERNAL,
UNIMPLEMENTED or DATA_LOSS, never a reason that says a process or a batch died. Bytes that do not
parse as the request type are INVALID_ARGUMENT with reason MALFORMED_REQUEST (pdmesh.malformed
turns grpc's bare UNKNOWN into that). An input the model below knows to be bad must be
INVALID_ARGUMENT exactly.

The one status without ErrorInfo that is accepted is the client's own DEADLINE_EXCEEDED, and only
for an input that may legitimately run until the caller's deadline (a well-formed prefill waits
for a decode that never comes; a decode waits for KV that is never offered) and only once the
deadline has really passed. A bad input that runs into the deadline is a hang and fails.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import grpc

from fuzz_wire import Outcome

C = grpc.StatusCode
UNTYPED_CODES = {C.UNKNOWN, C.INTERNAL, C.UNIMPLEMENTED, C.DATA_LOSS}
#: Reasons that mean something crashed rather than that the input was refused.
CRASH_REASONS = {"RANK_DIED", "INTERNAL", "UNKNOWN", "DECODE_STEP_FAILED", "RANK_START_FAILED"}
REASON = re.compile(r"^[A-Z][A-Z0-9_]*$")

#: rpc name -> outcome label -> count. Filled by `check`, printed by tests/fuzz/conftest.py.
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@dataclass(frozen=True)
class Expect:
    """What the model knows about one input: `codes` it must end in (None: any typed outcome,
    OK included), and whether it may run until the caller's deadline."""

    codes: frozenset[grpc.StatusCode] | None = None
    may_wait: bool = False
    reason: str | None = None  # the ErrorInfo reason it must carry, where the model knows it


ANY = Expect()
WAITS = Expect(may_wait=True)
INVALID = Expect(frozenset({C.INVALID_ARGUMENT}))
MALFORMED = Expect(frozenset({C.INVALID_ARGUMENT}), reason="MALFORMED_REQUEST")


def expect_parsed(request_type, data: bytes, model) -> Expect:
    """MALFORMED if `data` is not a `request_type`, else what `model(message)` says."""
    try:
        message = request_type.FromString(data)
    except Exception:  # noqa: BLE001 - exactly what the server's deserializer does
        return MALFORMED
    return model(message)


def check(rpc: str, expect: Expect, out: Outcome, timeout: float, what: object = "") -> None:
    """Assert the rule for one call and count it under `rpc`."""
    label = out.code.name if out.reason is None else f"{out.code.name}/{out.reason}"
    context = f"{rpc}: input {_short(what)} ended {out}"
    if out.ok:
        assert expect.codes is None or C.OK in expect.codes, f"{context}; expected {_names(expect.codes)}"
    elif out.reason is None:
        assert out.code == C.DEADLINE_EXCEEDED and expect.may_wait, f"untyped status: {context}"
        assert out.elapsed >= 0.9 * timeout, f"DEADLINE_EXCEEDED before the deadline: {context}"
        label = "DEADLINE_EXCEEDED (client deadline)"
    else:
        assert out.domain == "pdmesh" and REASON.match(out.reason), f"foreign ErrorInfo: {context}"
        assert out.code not in UNTYPED_CODES, f"not a typed refusal: {context}"
        assert out.reason not in CRASH_REASONS, f"something crashed: {context}"
        if expect.codes is not None:
            assert out.code in expect.codes, f"{context}; expected {_names(expect.codes)}"
        if expect.reason is not None:
            assert out.reason == expect.reason, f"{context}; expected reason {expect.reason}"
        if out.code == C.DEADLINE_EXCEEDED:
            assert expect.may_wait, f"a bad input waited until its deadline: {context}"
    TALLY[rpc][label] += 1


def count(rpc: str, label: str, n: int = 1) -> None:
    """Count inputs checked outside `check` (transfer messages, receiver fetches)."""
    TALLY[rpc][label] += n


def summary(verbose: bool = False) -> str:
    lines = []
    total = 0
    for rpc in sorted(TALLY):
        n = sum(TALLY[rpc].values())
        total += n
        top = ", ".join(f"{k} {v}" for k, v in TALLY[rpc].most_common(None if verbose else 4))
        lines.append(f"  {rpc:<44} {n:>6}  ({top})")
    lines.append(f"fuzz: {total} inputs tried over {len(TALLY)} RPCs and paths")
    return "\n".join(lines)


def _names(codes) -> str:
    return "any typed outcome" if codes is None else "/".join(sorted(c.name for c in codes))


def _short(what: object) -> str:
    text = repr(what)
    return text if len(text) < 400 else text[:400] + f"... ({len(text)} chars)"
