"""The agent's opt-in Prometheus endpoint (`[metrics] listen`), scraped from a real agent
streaming to a real server: names, labels, and values that move with what the agent does."""

from __future__ import annotations

import dataclasses
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ConfigError, MetricsConfig, load_config
from agent.metrics import AgentMetrics, AgentSnapshot, MetricsError
from tests.integration.fleet import (
    agent_config,
    quiet_sensors,
    running_agent,
    running_fleet,
    wait_for,
)


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("ringfence_agent_"), family.name
        for sample in family.samples:
            assert not {"pid", "path", "agent_id"} & set(sample.labels), sample
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_agent_metrics_endpoint(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.enroll(tmp_path / "agent")
        config = dataclasses.replace(agent_config(tmp_path / "agent",
                                                  quiet_sensors(process="psutil")),
                                     metrics=MetricsConfig(listen="127.0.0.1:0"))
        with running_agent(config) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            assert agent.metrics_port > 0
            marker = f"rf-metrics-{uuid.uuid4().hex[:8]}"
            proc = subprocess.Popen(["sh", "-c", "sleep 2", marker])
            try:
                samples = wait_for(lambda: (s := scrape(agent.metrics_port)).get(
                    "ringfence_agent_events_total", {}).get((("sensor", "process"),)) and s,
                    what="process events counted")
            finally:
                proc.kill()
                proc.wait()
            assert samples["ringfence_agent_collector_connected"][()] == 1
            assert samples["ringfence_agent_spool_bytes"][()] > 0
            assert samples["ringfence_agent_isolation_state"][(("state", "none"),)] == 1
            assert samples["ringfence_agent_isolation_state"][(("state", "isolated"),)] == 0
            port = agent.metrics_port
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_dropped_events_are_counted_by_sensor() -> None:
    metrics = AgentMetrics(lambda: AgentSnapshot(10, 1, "isolated", False))
    metrics.recorded("file", 7)
    metrics.recorded("file", 0)
    metrics.recorded("file", 0)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode())}
    dropped = {tuple(s.labels.items()): s.value for s in
               families["ringfence_agent_events_dropped"].samples if s.name.endswith("_total")}
    assert dropped == {(("sensor", "file"),): 2}
    state = {s.labels["state"]: s.value for s in
             families["ringfence_agent_isolation_state"].samples}
    assert state["isolated"] == 1 and state["none"] == 0


def test_metrics_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9101"\n')
    assert load_config(path).metrics.listen == "127.0.0.1:9101"
    assert load_config(None).metrics.listen is None
    path.write_text('[metrics]\nport = 9101\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(path)
    with pytest.raises(MetricsError, match="IP:PORT"):
        AgentMetrics(lambda: AgentSnapshot(0, 0, "none", False)).serve("localhost:9101")
