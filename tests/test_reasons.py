"""The catalogue of error reasons (pdmesh/reasons.py) is the one vocabulary of failures.

Checked here, without running anything: the proto enum and the catalogue list the same reasons
with the same code and meaning; no product code names a reason as a string literal; every error
raised with a catalogue reason has the reason's code; every error class's default reason too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest

from pdmesh import errors
from pdmesh.common.v1 import error_reason_pb2
from pdmesh.reasons import PROTO_PREFIX, Reason
from pdmesh.worker.kv import shm_pool  # noqa: F401 - defines an error class of its own

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pdmesh", "server", "router", "worker", "testkit", "bench")
PROTO = ROOT / "protos/pdmesh/common/v1/error_reason.proto"
CODE_NAMES = {c.name for c in grpc.StatusCode}


def _source_files():
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not path.name.endswith("_pb2.py") and not path.name.endswith("_pb2_grpc.py"):
                yield path


def _error_classes() -> dict[str, type[errors.PdmeshError]]:
    found, todo = {}, [errors.PdmeshError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_the_proto_enum_lists_each_reason_with_its_code_and_meaning():
    text = PROTO.read_text()
    for reason in Reason:
        entry = f"  // {reason.code.name}: {reason.meaning}.\n  {PROTO_PREFIX}{reason.value} = {reason.proto};"
        assert entry in text, f"{reason.value}: the proto's entry differs from the catalogue's"
    numbers = [v.number for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values]
    assert len(numbers) == len(set(numbers)) == len(Reason) + 1


def test_every_grpc_error_code_has_its_default_reason():
    for code in grpc.StatusCode:
        if code != grpc.StatusCode.OK:
            assert Reason(code.name).code == code


def test_error_classes_default_to_a_reason_of_their_code():
    for cls in _error_classes().values():
        assert isinstance(cls.default_reason, Reason), cls
        assert cls.default_reason.code == cls.code, cls


def test_no_reason_is_a_string_literal_in_the_code():
    specific = set(Reason.__members__) - CODE_NAMES  # code names are also grpc.StatusCode names
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(sorted(specific, key=len, reverse=True)))
    found = []
    for path in _source_files():
        if path.name == "reasons.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "reason" and isinstance(node.value, ast.Constant):
                found.append(f"{path.relative_to(ROOT)}:{node.value.lineno} reason={node.value.value!r}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and pattern.fullmatch(repr(node.value)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, "use the catalogue's members (pdmesh.reasons.Reason):\n" + "\n".join(found)


def _raised_reasons(tree: ast.AST, classes: dict[str, type]):
    """(class, Reason member, line) of every `SomeError(..., reason=Reason.X)` in the tree."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in classes:
            continue
        for kw in node.keywords:
            value = kw.value
            if kw.arg == "reason" and isinstance(value, ast.Attribute) and getattr(value.value, "id", "") == "Reason":
                yield classes[name], Reason[value.attr], node.lineno


def test_errors_are_raised_with_reasons_of_their_code():
    classes = _error_classes()
    wrong, seen = [], 0
    for path in _source_files():
        for cls, reason, line in _raised_reasons(ast.parse(path.read_text()), classes):
            seen += 1
            if cls is not errors.PdmeshError and reason.code != cls.code:
                wrong.append(f"{path.relative_to(ROOT)}:{line} {cls.__name__} ({cls.code.name}) with "
                             f"{reason.value} ({reason.code.name})")
    assert seen > 100  # the scan finds the raise sites
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", ["INSTANCE_DRAINING", "KV_POOL_EXHAUSTED"])
def test_a_reason_from_the_wire_is_the_member(name):
    err = errors.PdmeshError.from_status_proto(
        errors.Unavailable("m", reason=name).to_status_proto())
    assert err.reason is Reason[name] and err.reason == name
    assert Reason[name].proto == error_reason_pb2.ErrorReason.Value(PROTO_PREFIX + name)
