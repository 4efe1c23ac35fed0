"""The protobuf side of evidence: how the server and the offline verifier read event bytes.

`evidence` treats events as opaque bytes; this codec tells it each event's seq, agent and gap
range, and renders the derived `events.jsonl` line. It parses; it never re-encodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import DecodeError

from evidence.bundle import EventInfo
from evidence.errors import FormatError
from proto import ringfence_pb2 as pb
from server.export import jsonl_line, to_jsonl

_new_tuple = tuple.__new__
_from_string = pb.Event.FromString


def parse_event(event_bytes: bytes) -> pb.Event:
    try:
        return pb.Event.FromString(event_bytes)
    except DecodeError as e:
        raise FormatError("event bytes are not a valid ringfence Event") from e


class ProtoEventCodec:
    """EventCodec for ringfence.v1.Event bytes.

    The verifier calls describe() then render() on the same bytes object; the parsed message
    is kept for that one object (compared by identity, and bytes are immutable), so each event
    is parsed once instead of twice.
    """

    def __init__(self) -> None:
        self._last_bytes: bytes | None = None
        self._last_event = pb.Event()

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the verifier's rendering workers with every chunk: leave the cache behind.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last_bytes = None
        self._last_event = pb.Event()

    def _parse(self, event_bytes: bytes) -> pb.Event:
        if event_bytes is self._last_bytes:
            return self._last_event
        event = parse_event(event_bytes)
        self._last_bytes, self._last_event = event_bytes, event
        return event

    def describe(self, event_bytes: bytes) -> EventInfo:
        # The verifier describes each event first, so parse here without the cache check.
        try:
            event = _from_string(event_bytes)
        except DecodeError as e:
            raise FormatError("event bytes are not a valid ringfence Event") from e
        self._last_bytes, self._last_event = event_bytes, event
        gap = None
        if event.HasField("gap"):
            g = event.gap
            gap = (g.first_seq, g.last_seq)
        # tuple.__new__ skips EventInfo's generated Python-level __new__: this runs once per
        # verified event, and the fields are already in order.
        return _new_tuple(EventInfo, (event.seq, event.agent_id, event.time_ns, gap))

    def render(self, event_bytes: bytes) -> Mapping[str, Any]:
        event = self._parse(event_bytes)
        return to_jsonl(event, event.agent_id)

    def render_canonical(self, event_bytes: bytes) -> str | None:
        """Canonical JSON of render(), written directly for the common kinds (else None)."""
        event = self._parse(event_bytes)
        return jsonl_line(event, event.agent_id)
