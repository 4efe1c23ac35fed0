"""ProtoEventCodec and the events.jsonl rendering: golden lines (bundles already issued must keep
verifying), the fast renderer against the generic reference, and the strict prefix decoder
against full protobuf parsing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from jsonl_samples import AGENT, samples

from evidence import _canonical
from evidence.bundle import render_line
from proto import ringfence_pb2 as pb
from server import export
from server.codec import ProtoEventCodec
from server.export import to_jsonl, to_jsonl_generic

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


# ------------------------------------------------------------------- fast rows = generic rows

_RANDOM_BYTES = [b"", b"/usr/bin/bash", b"\xff\xfe", b"a\x00b", "\u00e9\u2603".encode(), b"\\x41"]
_RANDOM_TEXT = ["", "root", "\u00fc\u2603", "a\"b\\c", "\x01\x7f"]


def _random_message(msg: Any, rng: random.Random, depth: int = 0, every: bool = False) -> None:
    """Set a random subset (`every`: all) of `msg`'s fields to random values."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for field in msg.DESCRIPTOR.fields:
        if (not every and rng.random() < 0.3) or field.containing_oneof is not None:
            continue
        repeated = field.is_repeated
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue  # maps only occur in bodies the generic walk renders
            if not repeated and depth < 2:
                _random_message(getattr(msg, field.name), rng, depth + 1, every)
            continue
        values: list[Any]
        if field.type == F.TYPE_BYTES:
            values = _RANDOM_BYTES
        elif field.type == F.TYPE_STRING:
            values = _RANDOM_TEXT
        elif field.type == F.TYPE_BOOL:
            values = [False, True]
        elif field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
            values = [0, 1, 2 ** 64 - 1, 1_700_000_000_000_000_000]
        elif field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            values = [0, -1, 2 ** 63 - 1, -(2 ** 63), 1_700_000_000_000_000_000]
        elif field.type in (F.TYPE_INT32, F.TYPE_SINT32):
            values = [0, -9, 2 ** 31 - 1]
        elif field.type == F.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
        else:
            values = [0, 1, 2 ** 32 - 1]
        if every:
            values = [v for v in values if v] or values
        if repeated:
            count = rng.randrange(1 if every else 0, 4)
            getattr(msg, field.name).extend(rng.choice(values) for _ in range(count))
        else:
            setattr(msg, field.name, rng.choice(values))


@pytest.mark.parametrize("kind", ["process", "file", "network", "dns"])
def test_fast_rows_equal_generic_rows_on_random_events(kind: str) -> None:
    rng = random.Random(f"jsonl-{kind}")
    codec = ProtoEventCodec()
    for i in range(400):
        event = pb.Event(seq=i + 1, time_ns=rng.choice([0, -1, 1_700_000_000_123_456_789,
                                                        1_700_000_000_000_000_000 + i]),
                         agent_id=rng.choice(["", "a", AGENT]), severity_id=rng.randrange(7))
        body = getattr(event, kind)
        body.SetInParent()
        _random_message(body, rng)
        fast, generic = to_jsonl(event, event.agent_id), to_jsonl_generic(event, event.agent_id)
        assert fast == generic
        assert list(fast) == sorted(fast)  # keys inserted sorted: the encoder's cheap case
        data = event.SerializeToString(deterministic=True)
        assert render_line(codec, data) == _canonical.dumps(generic) + b"\n"


def test_fast_rows_cover_every_field_of_their_messages() -> None:
    # A field added to the proto but not to the hand-written rows would silently vanish from
    # events.jsonl; with every field set, the generic row names each one.
    rng = random.Random("cover")
    for kind in export._FAST_ROWS:
        for _ in range(20):
            event = pb.Event(seq=7, time_ns=1, agent_id="a", severity_id=2)
            _random_message(getattr(event, kind), rng, every=True)
            generic = to_jsonl_generic(event, "a")
            assert to_jsonl(event, "a") == generic, kind
    assert {f.name for f in pb.Process.DESCRIPTOR.fields} == set(export._PROCESS_FIELDS)


def test_no_fast_body_field_collides_with_a_row_key() -> None:
    row_keys = {"agent_id", "seq", "time", "time_ns", "severity_id", "kind"}
    for kind in export._FAST_ROWS:
        names = {f.name for f in getattr(pb.Event(), kind).DESCRIPTOR.fields}
        assert not names & row_keys, kind


def test_canonical_lines_equal_the_encoded_rows() -> None:
    rng = random.Random("lines")
    events = samples()
    for kind in export._FAST_ROWS:
        for _ in range(100):
            event = pb.Event(seq=rng.randrange(1, 2 ** 40), time_ns=rng.randrange(-2 ** 62, 2 ** 62),
                             agent_id=rng.choice(_RANDOM_TEXT))
            _random_message(getattr(event, kind), rng, every=rng.random() < 0.5)
            events.append(event)
    for event in events:
        line = export.jsonl_line(event, event.agent_id)
        expected = _canonical.ENCODER.encode(to_jsonl_generic(event, event.agent_id))
        if event.WhichOneof("body") in export._FAST_ROWS:
            assert line == expected
        else:
            assert line is None  # the codec falls back to encoding render()


def test_describe_reports_seq_agent_time_and_gap_range() -> None:
    from evidence.bundle import EventInfo
    from evidence.errors import FormatError

    codec = ProtoEventCodec()
    for data, _ in _golden():
        event = pb.Event.FromString(data)
        gap = (event.gap.first_seq, event.gap.last_seq) if event.HasField("gap") else None
        info = codec.describe(data)
        assert type(info) is EventInfo
        assert info == EventInfo(event.seq, event.agent_id, event.time_ns, gap)
    assert codec.describe(samples()[11].SerializeToString()).gap == (12, 13)
    with pytest.raises(FormatError):
        codec.describe(b"\x0a\xff")


def test_codec_pickles_without_its_parse_cache() -> None:
    import pickle

    codec = ProtoEventCodec()
    data, line = _golden()[0]
    codec.describe(data)
    copy = pickle.loads(pickle.dumps(codec))
    assert copy._last_bytes is None
    assert render_line(copy, data) == line
