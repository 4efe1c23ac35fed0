"""Enrollment records that name several collector nodes: round trip, defaults, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.rpc import Endpoint, SessionTransport
from agent.state import AgentPaths, Enrollment, StateError


def _write(tmp_path: Path, **extra: object) -> AgentPaths:
    paths = AgentPaths(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths.enrollment.write_text(json.dumps({
        "agent_id": "a1", "server_host": "2001:db8::1", "collector_port": 8443,
        "tls_name": "ir.example.net", "command_public_key": "00" * 32, **extra}))
    return paths


def test_without_collectors_the_enrolled_target_is_the_only_one(tmp_path: Path) -> None:
    enrollment = Enrollment.load(_write(tmp_path))
    assert enrollment.collectors == ()
    assert enrollment.collector_targets == ("[2001:db8::1]:8443",)


def test_collectors_are_tried_in_the_recorded_order_and_survive_a_round_trip(
        tmp_path: Path) -> None:
    paths = _write(tmp_path, collectors=["10.0.0.2:8443", "10.0.0.1:8443"])
    enrollment = Enrollment.load(paths)
    assert enrollment.collector_targets == ("10.0.0.2:8443", "10.0.0.1:8443")
    paths.enrollment.write_bytes(enrollment.to_json())
    assert Enrollment.load(paths) == enrollment


@pytest.mark.parametrize("bad", ["10.0.0.1:8443", [8443], {"a": "b"}])
def test_malformed_collectors_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(StateError, match="collectors"):
        Enrollment.load(_write(tmp_path, collectors=bad))


def test_transport_needs_an_endpoint_and_starts_on_the_first() -> None:
    with pytest.raises(ValueError):
        SessionTransport([], b"", b"", b"")
    ends = [Endpoint("127.0.0.1:1", "localhost"), Endpoint("127.0.0.1:2", "localhost")]
    assert SessionTransport(ends, b"", b"", b"").endpoint == ends[0]
