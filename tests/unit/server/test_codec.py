"""ProtoEventCodec and the events.jsonl rendering: golden lines (bundles already issued must keep
verifying), the fast renderer against the generic reference, and the strict prefix decoder
against full protobuf parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonl_samples import AGENT, samples

from evidence.bundle import render_line
from proto import ringfence_pb2 as pb
from server.codec import ProtoEventCodec

VECTORS = Path(__file__).parent / "vectors"


def _golden() -> list[tuple[bytes, bytes]]:
    vec = json.loads((VECTORS / "jsonl_rendering.json").read_text())
    assert vec["agent_id"] == AGENT
    return [(bytes.fromhex(c["event_hex"]), c["line"].encode("ascii")) for c in vec["cases"]]


def test_golden_vector_covers_every_body_kind() -> None:
    kinds = {pb.Event.FromString(data).WhichOneof("body") for data, _ in _golden()}
    assert kinds == {f.name for f in pb.Event.DESCRIPTOR.oneofs_by_name["body"].fields} | {None}


@pytest.mark.parametrize("data,line", _golden(), ids=lambda v: "" if isinstance(v, bytes) else v)
def test_rendering_equals_golden_line(data: bytes, line: bytes) -> None:
    assert render_line(ProtoEventCodec(), data) == line


def test_golden_vector_is_what_the_samples_serialize_to() -> None:
    assert [e.SerializeToString(deterministic=True) for e in samples()] == [
        data for data, _ in _golden()]
