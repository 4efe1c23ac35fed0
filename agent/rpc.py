"""The agent's gRPC face: the Enroll call and the Session stream to the collector.

This is the only agent module that talks gRPC; it turns `grpc.RpcError` into `TransportError`
(retry later) or `Refused` (the server said no: do not hammer it). Session logic lives in
agent.session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from proto import ringfence_pb2 as pb
from proto import ringfence_pb2_grpc as pb_grpc
from proto.limits import UNARY_DEADLINE_S, client_options

logger = logging.getLogger(__name__)

# Status codes that mean "you, agent, are not allowed": retrying the same way will not help.
REFUSAL_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})


class TransportError(Exception):
    """The collector could not be reached or the stream broke; retry with backoff."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Refused(TransportError):
    """The server refused us (bad token, revoked certificate, rejected batch)."""


def _translate(e: grpc.RpcError) -> TransportError:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or str(e)
    name = code.name if code is not None else "UNKNOWN"
    if code in REFUSAL_CODES:
        return Refused(name, details)
    return TransportError(name, details)


@dataclass(frozen=True)
class Endpoint:
    target: str        # host:port
    tls_name: str      # name the server certificate must carry


def _channel(endpoint: Endpoint, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    options: list[tuple[str, int | str]] = list(client_options())
    options.append(("grpc.ssl_target_name_override", endpoint.tls_name))
    return grpc.secure_channel(endpoint.target, credentials, options=options)


def enroll(endpoint: Endpoint, ca_pem: bytes, request: pb.EnrollRequest) -> pb.EnrollResponse:
    """Call Enroll over server-authenticated TLS (the agent has no certificate yet)."""
    channel = _channel(endpoint, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    try:
        return pb_grpc.EnrollmentStub(channel).Enroll(request, timeout=UNARY_DEADLINE_S)
    except grpc.RpcError as e:
        raise _translate(e) from e
    finally:
        channel.close()


class SessionTransport:
    """A mutual-TLS channel to the collector that can open Session streams.

    Given several endpoints (collector nodes of a cluster) it stays on one while it works and
    moves to the next, round robin, after a stream or connection attempt fails, so an agent
    whose node died resumes on another node at its next reconnect.
    """

    def __init__(self, endpoint: Endpoint | Sequence[Endpoint], ca_pem: bytes, key_pem: bytes,
                 cert_pem: bytes) -> None:
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
        self._endpoints = [endpoint] if isinstance(endpoint, Endpoint) else list(endpoint)
        if not self._endpoints:
            raise ValueError("a session transport needs at least one collector endpoint")
        self._index = 0
        self._failed = False
        self._channel: grpc.Channel | None = None
        self._call: Any = None

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint the current (or next) stream uses."""
        return self._endpoints[self._index]

    def open(self, outbound: Iterator[pb.AgentMessage]) -> Iterator[pb.ServerMessage]:
        """Start a Session; iterate the result for server messages (raises TransportError)."""
        self.close()
        if self._failed and len(self._endpoints) > 1:
            self._index = (self._index + 1) % len(self._endpoints)
            logger.info("trying the next collector: %s", self.endpoint.target)
        self._failed = False
        self._channel = _channel(self.endpoint, self._credentials)
        stub = pb_grpc.CollectorStub(self._channel)
        call = stub.Session(outbound, wait_for_ready=False)
        self._call = call
        return self._iterate(call)

    def _iterate(self, call: Any) -> Iterator[pb.ServerMessage]:
        try:
            yield from call
        except grpc.RpcError as e:
            self._failed = True
            raise _translate(e) from e

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        self.cancel()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
