"""Frozen configuration for the sensors, with documented defaults and `SensorsConfig.from_dict`
to build it from a parsed TOML table. It reads no files and touches no OS state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from agent.sensors.base import SensorConfigError

logger = logging.getLogger(__name__)

DEFAULT_WATCH_PATHS: tuple[str, ...] = (
    "/etc",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/root",
    "/home",
    "/etc/cron.d",
    "/var/spool/cron",
    "/etc/systemd/system",
    "/lib/systemd/system",
)

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ProcessSensorConfig:
    """Process sensor settings."""

    enabled: bool = True
    # "auto" = netlink proc connector when it can bind, else psutil; or force one.
    mode: str = "auto"
    poll_interval_s: float = 1.0          # psutil fallback polling interval
    argv_max_bytes: int = 64 * 1024       # cap on the total argv bytes kept per process
    hash_max_bytes: int = 64 * MiB        # executables larger than this are not hashed
    hash_cache_entries: int = 4096        # LRU of (dev, ino, size, mtime_ns) -> sha256
    pid_cache_entries: int = 65536        # known processes (for ppid, parent, exit enrichment)
    queue_max: int = 8192                 # raw exec/exit records waiting for enrichment
    emit_forks: bool = False              # fork-without-exec events double the volume
    rcvbuf_bytes: int = 8 * MiB           # netlink socket receive buffer
    recv_nice: int = -20                  # nice of the netlink receive thread (needs CAP_SYS_NICE)


@dataclasses.dataclass(frozen=True)
class FileSensorConfig:
    """File sensor settings."""

    enabled: bool = True
    paths: tuple[str, ...] = DEFAULT_WATCH_PATHS
    exclude: tuple[str, ...] = ("*.swp", "*.swx", "*~", "/tmp/systemd-private-*")  # fnmatch globs
    hash_max_bytes: int = 64 * MiB        # larger files get hash_skipped_size
    debounce_ms: int = 500                # modifies of one path within this window coalesce
    queue_max: int = 16384                # raw watchdog events waiting for the worker
    rescan_max_files: int = 200000        # bound on the walk after an inotify overflow


@dataclasses.dataclass(frozen=True)
class NetworkSensorConfig:
    """Network (flows) and DNS sensor settings."""

    enabled: bool = True
    flows: bool = True
    dns: bool = True
    poll_interval_s: float = 1.0          # socket table polling interval
    max_flows: int = 65536                # flows tracked at once; more are counted as lost
    dns_queue_max: int = 4096             # captured DNS packets waiting for parsing


@dataclasses.dataclass(frozen=True)
class SensorsConfig:
    """All sensors; `SensorsConfig()` is a working default."""

    process: ProcessSensorConfig = ProcessSensorConfig()
    file: FileSensorConfig = FileSensorConfig()
    network: NetworkSensorConfig = NetworkSensorConfig()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensorsConfig:
        """Build from a parsed TOML table such as ``{"process": {"mode": "psutil"}}``.

        Raises SensorConfigError naming the key for unknown keys and wrong types.
        """
        if not isinstance(d, Mapping):
            raise SensorConfigError("sensors", "must be a table")
        sections = {"process": ProcessSensorConfig, "file": FileSensorConfig,
                    "network": NetworkSensorConfig}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise SensorConfigError(unknown[0], f"unknown key (known: {', '.join(sections)})")
        proc = _section(ProcessSensorConfig, d.get("process", {}), "process")
        if proc.mode not in ("auto", "netlink", "psutil", "off"):
            raise SensorConfigError("process.mode", "must be auto, netlink, psutil or off")
        return cls(
            process=proc,
            file=_section(FileSensorConfig, d.get("file", {}), "file"),
            network=_section(NetworkSensorConfig, d.get("network", {}), "network"),
        )


_T = TypeVar("_T")


def _section(kind: type[_T], table: Any, prefix: str) -> _T:
    if not isinstance(table, Mapping):
        raise SensorConfigError(prefix, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise SensorConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(fields)})")
        default = getattr(kind(), key)
        kwargs[key] = _coerce(f"{prefix}.{key}", default, value)
    return kind(**kwargs)


def _coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SensorConfigError(key, "must be a boolean")
        return value
    if isinstance(default, int):
        if key.endswith("_nice"):
            if isinstance(value, bool) or not isinstance(value, int) or not -20 <= value <= 19:
                raise SensorConfigError(key, "must be an integer from -20 to 19")
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SensorConfigError(key, "must be a non-negative integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SensorConfigError(key, "must be a positive number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SensorConfigError(key, "must be a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SensorConfigError(key, "must be a list of strings")
        return tuple(value)
    raise SensorConfigError(key, "unsupported type")  # pragma: no cover - all fields covered
