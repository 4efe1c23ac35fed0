"""SensorsConfig defaults and from_dict validation."""

from __future__ import annotations

import pytest

from agent.sensors.base import SensorConfigError
from agent.sensors.config import DEFAULT_WATCH_PATHS, SensorsConfig


def test_defaults_work_without_config() -> None:
    cfg = SensorsConfig.from_dict({})
    assert cfg == SensorsConfig()
    assert cfg.file.paths == DEFAULT_WATCH_PATHS and "/etc/cron.d" in cfg.file.paths
    assert cfg.file.hash_max_bytes == 64 * 1024 * 1024
    assert cfg.process.mode == "auto" and cfg.network.dns and cfg.network.flows


def test_from_dict_overrides() -> None:
    cfg = SensorsConfig.from_dict({
        "process": {"mode": "psutil", "poll_interval_s": 2},
        "file": {"paths": ["/srv"], "exclude": ["*.log"], "debounce_ms": 50},
        "network": {"dns": False},
    })
    assert cfg.process.mode == "psutil" and cfg.process.poll_interval_s == 2.0
    assert cfg.file.paths == ("/srv",) and cfg.file.exclude == ("*.log",)
    assert cfg.network.dns is False and cfg.network.flows is True
    assert SensorsConfig.from_dict({"process": {"recv_nice": 5}}).process.recv_nice == 5


@pytest.mark.parametrize("table,key", [
    ({"procss": {}}, "procss"),
    ({"file": {"pathz": []}}, "file.pathz"),
    ({"file": {"paths": "/etc"}}, "file.paths"),
    ({"file": {"debounce_ms": -1}}, "file.debounce_ms"),
    ({"file": {"debounce_ms": True}}, "file.debounce_ms"),
    ({"network": {"dns": "yes"}}, "network.dns"),
    ({"network": {"poll_interval_s": 0}}, "network.poll_interval_s"),
    ({"process": {"mode": "ebpf"}}, "process.mode"),
    ({"process": []}, "process"),
    ({"process": {"recv_nice": -21}}, "process.recv_nice"),
])
def test_bad_keys_and_types_are_named(table: dict[str, object], key: str) -> None:
    with pytest.raises(SensorConfigError) as info:
        SensorsConfig.from_dict(table)
    assert info.value.key == key


def test_config_is_frozen() -> None:
    cfg = SensorsConfig()
    with pytest.raises(AttributeError):
        cfg.process.mode = "off"  # type: ignore[misc]
