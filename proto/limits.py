"""Numbers both ends of the wire must agree on: message sizes and keepalive timing.

Part of the wire contract, like ringfence.proto; holds constants only and imports nothing.
"""

# Largest gRPC message either side accepts. A batch of events plus framing fits well inside.
MAX_MESSAGE_BYTES = 16 << 20
# Largest single serialized Event (a 1 MiB command line fits, with room for the rest).
MAX_EVENT_BYTES = 4 << 20
# Events per EventBatch the collector accepts.
MAX_EVENTS_PER_BATCH = 20_000
# Highest seq an event may carry: stores keep seq as a signed 64-bit integer.
MAX_SEQ = 2**63 - 1
# File acquisition chunk size.
FILE_CHUNK_BYTES = 1 << 20

# Keepalive: the agent pings every KEEPALIVE_TIME_MS; the server permits pings that often and
# never less than MIN_PING_INTERVAL_MS apart, so neither side treats the other as abusive.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000

# Unary call deadline for enrollment and admin calls (seconds).
UNARY_DEADLINE_S = 15.0


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def client_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect backoff is the agent's own (jittered, capped); keep gRPC's short so it
        # does not add a hidden second layer of waiting.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
