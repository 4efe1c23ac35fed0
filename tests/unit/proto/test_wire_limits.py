"""Both ends of the wire agree: the server permits the pings the client sends, message
limits match, and the event/batch limits fit inside a message."""

from __future__ import annotations

from proto import limits


def test_keepalive_settings_match() -> None:
    server = dict(limits.server_options())
    client = dict(limits.client_options())
    # The client never pings more often than the server tolerates.
    assert client["grpc.keepalive_time_ms"] >= server[
        "grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_permit_without_calls"] == 1
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        assert server[key] == client[key] == limits.MAX_MESSAGE_BYTES
    # gRPC's own reconnect backoff stays below the agent's cap (no hidden second layer).
    assert client["grpc.max_reconnect_backoff_ms"] <= 30_000


def test_size_limits_nest() -> None:
    assert limits.MAX_EVENT_BYTES < limits.MAX_MESSAGE_BYTES
    assert limits.FILE_CHUNK_BYTES < limits.MAX_MESSAGE_BYTES
    assert 0 < limits.UNARY_DEADLINE_S <= 60
