"""Fleet set-up and membership: `server init`, enrollment tokens, agent enrollment, responders.

It creates the data directory's key material, turns a valid token plus CSR into an agent
certificate, and issues responder identities. It holds no network code (server.rpc serves
Enroll) and grants no admin permissions beyond recording a responder's role.

Exceptions:

    FleetError               root
    +-- EnrollmentRefused    token, CSR or facts not acceptable (opaque to the peer)
    +-- AlreadyInitialized   `server init` on a directory that already holds a fleet
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from collector.peer import AGENT_URI_PREFIX
from collector.store.base import AgentRecord, ResponderRow, Store, TokenRejected
from collector.store.sqlite import SQLiteStore, token_digest
from evidence.keys import generate_private_key, key_id, save_private_key, save_public_key
from proto import ringfence_pb2 as pb
from server.pki import (
    CertificateAuthority,
    PKIError,
    ServerPaths,
    cert_pem,
    fingerprint,
    issue_responder_identity,
    new_tls_key,
    tls_key_pem,
    write_secret,
)

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL_S = 24 * 3600
MAX_HOSTNAME = 253
_DURATION = re.compile(r"^(\d+)([smhd]?)$")


class FleetError(Exception):
    """Root of fleet set-up and membership errors."""


class EnrollmentRefused(FleetError):
    """Enrollment was refused; `reason` is for the local log, the peer gets a generic message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AlreadyInitialized(FleetError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    """What `server init` decided and `server run` reads back (DATA/server.json)."""

    addresses: tuple[str, ...]       # names/addresses agents use to reach the collector
    collector_port: int = 8443
    enroll_port: int = 8442


def parse_duration(text: str) -> int:
    """'90', '90s', '15m', '12h', '7d' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 12h, 7d)")
    value, unit = int(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def init_server(data_dir: Path, addresses: list[str], collector_port: int = 8443,
                enroll_port: int = 8442) -> Path:
    """Create the fleet CA, server certificate, signing key and an admin identity.

    Returns the path of the admin responder identity file.
    """
    paths = ServerPaths(data_dir)
    if paths.ca_key.exists():
        raise AlreadyInitialized(f"{data_dir} already holds a ringfence fleet; refusing to "
                                 "overwrite its keys")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)
    addresses = addresses or ["localhost", "127.0.0.1"]
    ca = CertificateAuthority.create()
    ca.save(paths)
    server_key = new_tls_key()
    write_secret(paths.server_key, tls_key_pem(server_key))
    write_secret(paths.server_cert, cert_pem(ca.issue_server(addresses, server_key)))
    signing = generate_private_key()
    save_private_key(signing, paths.signing_key)
    save_public_key(signing.public_key(), paths.signing_public)
    paths.signing_public.chmod(0o600)
    write_secret(paths.config, json.dumps({"addresses": addresses,
                                           "collector_port": collector_port,
                                           "enroll_port": enroll_port}).encode())
    store = SQLiteStore(paths.database)
    try:
        identity = create_responder(store, paths, ca, "admin", "admin")
    finally:
        store.close()
    paths.database.chmod(0o600)
    logger.info("initialized fleet in %s (signing key %s)", data_dir,
                key_id(signing.public_key()))
    return identity


def load_config(paths: ServerPaths) -> ServerConfig:
    try:
        raw = json.loads(paths.config.read_text())
    except FileNotFoundError as e:
        raise FleetError(f"{paths.root} is not a ringfence data directory: run "
                         f"`ringfence server init --data-dir {paths.root}`") from e
    return ServerConfig(tuple(raw["addresses"]), int(raw.get("collector_port", 8443)),
                        int(raw.get("enroll_port", 8442)))


def create_responder(store: Store, paths: ServerPaths, ca: CertificateAuthority, name: str,
                     role: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise FleetError("responder names are 1-64 letters, digits, '.', '_' or '-'")
    if role not in ("viewer", "responder", "admin"):
        raise FleetError("role must be viewer, responder or admin")
    identity = issue_responder_identity(ca, name)
    store.add_responder(ResponderRow(name, role, fingerprint(
        x509.load_pem_x509_certificate(identity.cert_pem)), time.time_ns()))
    path = paths.responder_identity(name)
    write_secret(path, identity.to_pem())
    return path


TOKEN_ID_HEX = 12


def token_id(token: str) -> str:
    """The short id a token is named by in logs and `token revoke`: a prefix of its stored
    hash, so it reveals nothing of the token and needs no extra column."""
    return token_digest(token).hex()[:TOKEN_ID_HEX]


def create_token(store: Store, uses: int = 1, ttl_s: int = DEFAULT_TOKEN_TTL_S) -> str:
    """A new enrollment token; only its hash is stored, so print it now or lose it."""
    if uses < 1:
        raise FleetError("a token needs at least one use")
    token = "rft_" + secrets.token_urlsafe(24)
    now = time.time_ns()
    store.add_token(token_digest(token), now, now + ttl_s * 1_000_000_000, uses)
    return token


class Enrollment:
    """Turns a token + CSR + identity key into an agent certificate and a fleet record."""

    def __init__(self, store: Store, ca: CertificateAuthority, command_public_key: bytes,
                 collector_port: int) -> None:
        self._store = store
        self._ca = ca
        self._command_public_key = command_public_key
        self._collector_port = collector_port

    def enroll(self, request: pb.EnrollRequest) -> pb.EnrollResponse:
        if len(request.identity_public_key) != 32:
            raise EnrollmentRefused("identity key is not a raw 32-byte Ed25519 key")
        host = request.host
        if not host.hostname or len(host.hostname) > MAX_HOSTNAME:
            raise EnrollmentRefused("host facts must name a hostname of at most 253 characters")
        try:
            self._store.consume_token(token_digest(request.token), time.time_ns())
        except TokenRejected as e:
            raise EnrollmentRefused(f"token rejected: {e.reason}") from e
        agent_id = str(uuid.uuid4())
        try:
            cert = self._ca.issue_from_csr(request.csr_pem, AGENT_URI_PREFIX + agent_id)
        except PKIError as e:
            raise EnrollmentRefused(str(e)) from e
        self._store.register_agent(AgentRecord(
            agent_id=agent_id, hostname=host.hostname, os=host.os[:200], kernel=host.kernel[:200],
            machine_id=host.machine_id[:64], addresses=tuple(a[:64] for a in host.addresses[:32]),
            agent_version=host.agent_version[:64],
            identity_key=bytes(request.identity_public_key), cert_fingerprint=fingerprint(cert),
            enrolled_ns=time.time_ns()))
        logger.info("enrolled agent %s for host %s", agent_id, host.hostname)
        return pb.EnrollResponse(agent_id=agent_id, certificate_pem=cert_pem(cert),
                                 ca_pem=cert_pem(self._ca.cert),
                                 command_public_key=self._command_public_key,
                                 collector_port=self._collector_port)
