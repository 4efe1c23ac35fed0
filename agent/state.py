"""Where the agent keeps its identity and state on disk, and how it writes it safely.

It names the files under the state directory and reads/writes the small JSON state; it does
not generate keys or talk to the server (agent.enroll does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/ringfence")


class StateError(Exception):
    """The state directory is missing, incomplete or unreadable; the message says what to do."""


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class AgentPaths:
    root: Path

    @property
    def tls_key(self) -> Path:
        return self.root / "tls.key"

    @property
    def certificate(self) -> Path:
        return self.root / "agent.pem"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def identity_key(self) -> Path:
        """Ed25519 key that signs the agent's checkpoints and acquisition records."""
        return self.root / "identity.key"

    @property
    def enrollment(self) -> Path:
        return self.root / "enrollment.json"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def isolation(self) -> Path:
        return self.root / "isolation"

    @property
    def commands(self) -> Path:
        return self.root / "commands.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"


@dataclass(frozen=True)
class Enrollment:
    """What enrollment established: who we are and where the collector is."""

    agent_id: str
    server_host: str           # host the agent enrolled against (and connects to)
    collector_port: int
    tls_name: str              # name the server certificate must carry
    command_public_key: str    # hex of the raw Ed25519 key that signs commands (pinned)
    # Collector nodes (HOST:PORT) to try in order, rotating on failure; empty = the enrolled
    # one. Lets an agent move to another node of a cluster when its node dies.
    collectors: tuple[str, ...] = ()

    @property
    def collector_target(self) -> str:
        """HOST:PORT of the collector, an IPv6 address in brackets (`[2001:db8::1]:8443`)."""
        host = self.server_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.collector_port}"

    @property
    def collector_targets(self) -> tuple[str, ...]:
        """Every collector to try, in order."""
        return self.collectors or (self.collector_target,)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=2).encode()

    @classmethod
    def load(cls, paths: AgentPaths) -> Enrollment:
        try:
            raw: dict[str, Any] = json.loads(paths.enrollment.read_text())
        except FileNotFoundError as e:
            raise StateError(f"this agent is not enrolled ({paths.enrollment} missing): run "
                             "`ringfence-agent enroll --server HOST:PORT --token TOKEN --ca "
                             "CA.pem` first") from e
        except (OSError, ValueError) as e:
            raise StateError(f"{paths.enrollment} is unreadable: {e}") from e
        collectors = raw.get("collectors", [])
        if not isinstance(collectors, list) or not all(isinstance(c, str) for c in collectors):
            raise StateError(f"{paths.enrollment}: collectors must be a list of HOST:PORT")
        return cls(str(raw["agent_id"]), str(raw["server_host"]), int(raw["collector_port"]),
                   str(raw["tls_name"]), str(raw["command_public_key"]), tuple(collectors))
