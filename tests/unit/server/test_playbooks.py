"""Playbooks against a real Admin and store with synthetic alerts: matching, the never-act
list, the rate limit, kill needing a process, and audit attribution to the playbook."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.alerting import AlertHub, AlertNotice
from server.containment import Containment
from server.playbooks import PlaybookConfig, PlaybookConfigError, PlaybookEngine
from tests.unit.server.incident_kit import AGENT_ID, HOSTNAME, make_admin


def alert(n: int, severity: str = "high", rule: str = "Reverse shell", pid: int = 0,
          hostname: str = HOSTNAME) -> AlertNotice:
    return AlertNotice(str(n), AGENT_ID, rule, severity, "bash -i to a remote host",
                       1_700_000_000_000_000_000 + n, seq=n, pid=pid, hostname=hostname)


def config(**extra: object) -> PlaybookConfig:
    raw = {"playbook": [{"name": "contain-shells", "hosts": ["web-*"],
                         "rules": ["Reverse shell"], "min_severity": "high",
                         "actions": ["triage", "isolate", "kill"]}]}
    raw.update(extra)
    return PlaybookConfig.from_dict(raw)


def test_matching_alert_runs_actions_attributed_to_the_playbook(tmp_path: Path) -> None:
    admin, store = make_admin(tmp_path)
    engine = PlaybookEngine(config(), admin, Containment(admin, store))
    hub = AlertHub()
    hub.register(engine)
    engine.start()
    try:
        hub.alert_raised(alert(1, pid=0))
        assert engine.drain(10)
    finally:
        engine.stop()
    rows = [(r.actor, r.action, r.outcome) for r in store.audit_rows()]
    assert rows[0][:2] == ("playbook:contain-shells", "triage")
    assert rows[0][2].startswith("allowed: issued command")
    assert rows[1][:2] == ("playbook:contain-shells", "isolate")
    assert rows[2] == ("playbook:contain-shells", "kill", "skipped: the alert names no process")
    assert all(r.reason.startswith("playbook contain-shells: alert 1") for r in
               store.audit_rows())
    agent = store.get_agent(AGENT_ID)
    assert agent is not None and agent.isolation_state == "pending"


@pytest.mark.parametrize("a", [alert(2, severity="medium"), alert(3, rule="Other"),
                               alert(4, hostname="db-01")])
def test_non_matching_alerts_do_nothing(tmp_path: Path, a: AlertNotice) -> None:
    admin, store = make_admin(tmp_path)
    assert PlaybookEngine(config(), admin, Containment(admin, store)).handle(a) == []
    assert store.audit_rows() == []


def test_never_list_and_rate_limit(tmp_path: Path) -> None:
    admin, store = make_admin(tmp_path)
    protected = PlaybookEngine(config(never=["web-01"]), admin, Containment(admin, store))
    assert protected.handle(alert(5)) == ["contain-shells: skipped (protected host)"]
    assert store.audit_rows()[-1].outcome.startswith("skipped: host is on the never")
    now = [0.0]
    limited = PlaybookEngine(config(max_actions_per_hour=2), admin, Containment(admin, store),
                             clock=lambda: now[0])
    outcomes = limited.handle(alert(6))
    assert outcomes[2] == "contain-shells: kill rate-limited"
    assert store.audit_rows()[-1].outcome.startswith("skipped: rate limit of 2")
    now[0] = 3600.0
    assert limited.handle(alert(7))[0].startswith("contain-shells: triage issued")


def test_bad_config_is_refused() -> None:
    with pytest.raises(PlaybookConfigError, match="actions"):
        PlaybookConfig.from_dict({"playbook": [{"name": "x", "actions": ["reboot"]}]})
    with pytest.raises(PlaybookConfigError, match="name"):
        PlaybookConfig.from_dict({"playbook": [{"actions": ["triage"]}]})
