"""Enrollment packages: one file that holds everything an endpoint needs to enroll.

A package is a small JSON document (media type ENROLL_PACKAGE_TYPE) with the enrollment
address(es) of the server, the fleet CA certificate, an optional TLS name and a token. The
server writes it (`ringfence enroll-package create`, mode 0600); the agent reads it
(`ringfence-agent enroll --package FILE`) and tries each address in order until one answers.
It is a bearer secret for as long as its token lives: whoever holds the file can enroll.

This module only encodes and decodes the format and drives `agent.enroll`; it issues no tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.enroll import enroll_agent
from agent.rpc import Refused, TransportError
from agent.state import AgentPaths, Enrollment, write_atomic

logger = logging.getLogger(__name__)

ENROLL_PACKAGE_TYPE = "application/vnd.ringfence.enroll-package.v1+json"
MAX_PACKAGE_BYTES = 64 * 1024
MAX_SERVERS = 16


class EnrollPackageError(ValueError):
    """The package file is unreadable or malformed; the message says what to do."""


@dataclass(frozen=True)
class EnrollPackage:
    servers: tuple[str, ...]      # enrollment HOST:PORT, tried in order
    ca_pem: bytes                 # the fleet CA certificate the server must chain to
    token: str                    # enrollment token (bearer secret)
    tls_name: str | None = None   # name in the server certificate, when not the HOST
    expires_ns: int = 0           # when the token expires (informational; the server decides)

    def __post_init__(self) -> None:
        if not self.servers or len(self.servers) > MAX_SERVERS:
            raise EnrollPackageError(f"an enrollment package names 1..{MAX_SERVERS} servers")
        for server in self.servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise EnrollPackageError(f"server {server!r} is not HOST:PORT")
        if not self.token.startswith("rft_"):
            raise EnrollPackageError("the package holds no enrollment token (rft_...)")
        if b"-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise EnrollPackageError("the package holds no PEM CA certificate")

    def to_json(self) -> bytes:
        return json.dumps({"type": ENROLL_PACKAGE_TYPE, "servers": list(self.servers),
                           "ca_pem": self.ca_pem.decode("ascii"), "token": self.token,
                           "tls_name": self.tls_name, "expires_ns": self.expires_ns},
                          sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> EnrollPackage:
        if len(data) > MAX_PACKAGE_BYTES:
            raise EnrollPackageError(f"enrollment package is {len(data)} bytes, limit is "
                                     f"{MAX_PACKAGE_BYTES}: is this the right file?")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise EnrollPackageError(f"enrollment package is not JSON ({e}): create one with "
                                     "`ringfence enroll-package create`") from e
        if not isinstance(raw, dict) or raw.get("type") != ENROLL_PACKAGE_TYPE:
            raise EnrollPackageError(f"not a ringfence enrollment package (type must be "
                                     f"{ENROLL_PACKAGE_TYPE})")
        servers, ca, token = raw.get("servers"), raw.get("ca_pem"), raw.get("token")
        tls_name, expires = raw.get("tls_name"), raw.get("expires_ns", 0)
        if (not isinstance(servers, list) or not all(isinstance(s, str) for s in servers)
                or not isinstance(ca, str) or not isinstance(token, str)
                or not (tls_name is None or isinstance(tls_name, str))
                or not isinstance(expires, int)):
            raise EnrollPackageError("enrollment package fields have the wrong types "
                                     "(servers: list of HOST:PORT, ca_pem, token: strings)")
        return cls(tuple(servers), ca.encode("ascii", errors="replace"), token, tls_name,
                   expires)


def write_package(path: Path, package: EnrollPackage) -> None:
    """Write `package` to `path` with mode 0600 (it holds a bearer token)."""
    write_atomic(path, package.to_json(), mode=0o600)


def read_package(path: Path) -> EnrollPackage:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PACKAGE_BYTES + 1)
    except FileNotFoundError as e:
        raise EnrollPackageError(f"{path}: no such enrollment package") from e
    except OSError as e:
        raise EnrollPackageError(f"cannot read enrollment package {path}: {e.strerror}") from e
    return EnrollPackage.from_json(data)


def enroll_with_package(paths: AgentPaths, package: EnrollPackage) -> Enrollment:
    """Enroll against the first of the package's servers that can be reached.

    A server that refuses (bad or used token) ends the attempt: the token is the same for every
    address, so trying the next one would only burn time. Unreachable servers are skipped.
    """
    failures: list[str] = []
    for server in package.servers:
        try:
            return enroll_agent(paths, server, package.token, package.ca_pem, package.tls_name)
        except Refused:
            raise
        except TransportError as e:
            logger.warning("enrollment server %s unreachable: %s", server, e.message)
            failures.append(f"{server}: {e.message}")
    raise TransportError("UNAVAILABLE", "no server in the enrollment package answered ("
                         + "; ".join(failures) + ")")
