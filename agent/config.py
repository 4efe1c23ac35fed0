"""Agent configuration: a TOML file (default /etc/ringfence/agent.toml), every key optional.

It parses and validates into frozen dataclasses once at start; defaults work with no file. It
does not read the state directory (agent.state does).

    state_dir = "/var/lib/ringfence"
    [spool]     max_bytes, segment_bytes, fsync_interval_s
    [chain]     checkpoint_every, checkpoint_interval_s
    [session]   heartbeat_interval_s, backoff_max_s, max_unacked_records
    [isolation] backend ("nftables" | "iptables" | auto), netns (tests only)
    [collect]   max_file_bytes
    [metrics]   listen = "127.0.0.1:9101" serves Prometheus /metrics there (default: off)
    [sensors]   see agent.sensors.config
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.chain import ChainConfig
from agent.actions.collect import DEFAULT_MAX_FILE_BYTES
from agent.session import SessionConfig
from agent.sensors.config import SensorsConfig
from agent.spool import SpoolConfig
from agent.state import DEFAULT_STATE_DIR

DEFAULT_CONFIG_PATH = Path("/etc/ringfence/agent.toml")


class ConfigError(Exception):
    """The configuration file is unreadable or names an unknown or invalid key."""


@dataclass(frozen=True)
class IsolationConfig:
    backend: str | None = None        # None: nftables, else iptables (selected in one place)
    netns: str | None = None          # run firewall commands in this namespace (tests, demo)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None         # IP:PORT for Prometheus /metrics; None = no listener


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    sensors: SensorsConfig = field(default_factory=SensorsConfig)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _section(cls: type[Any], raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{name}]: {e}") from e


def load_config(path: Path | None, state_dir: Path | None = None) -> AgentConfig:
    """Read `path` (missing default file = defaults), then apply a --state-dir override."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_PATH:
                raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
    known = {"state_dir", "spool", "chain", "session", "isolation", "collect", "sensors",
             "metrics"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(known)}")
    collect = raw.get("collect", {})
    try:
        sensors = SensorsConfig.from_dict(raw.get("sensors", {}))
    except ValueError as e:
        raise ConfigError(f"[sensors]: {e}") from e
    return AgentConfig(
        state_dir=state_dir or Path(raw.get("state_dir", DEFAULT_STATE_DIR)),
        spool=_section(SpoolConfig, raw.get("spool"), "spool"),
        chain=_section(ChainConfig, raw.get("chain"), "chain"),
        session=_section(SessionConfig, raw.get("session"), "session"),
        isolation=_section(IsolationConfig, raw.get("isolation"), "isolation"),
        sensors=sensors,
        max_file_bytes=int(collect.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES)),
        metrics=_section(MetricsConfig, raw.get("metrics"), "metrics"),
    )
