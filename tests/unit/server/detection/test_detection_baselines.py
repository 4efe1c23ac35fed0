"""Behaviour baselines on synthetic histories: each model fires on its anomaly with the
numbers in the explanation, stays quiet on normal activity and while learning, and its state
survives a restart (rows saved and loaded)."""

from __future__ import annotations

from pathlib import Path

from server.detection.baselines import Anomaly, BaselineConfig, Baselines
from server.detection.store import SQLiteDetectionStore

NS = 1_000_000_000
HOUR = 3600 * NS
T0 = 1_700_000_000 * NS - (1_700_000_000 * NS) % (24 * HOUR)    # midnight UTC
A = "agent-a"

QUIET: dict[str, object] = {"learning_s": 3600.0, "rare_pair_min_launches": 10**9,
                            "destination_min_known": 10**9, "user_min_launches": 10**9,
                            "burst_min_minutes": 10**9}


def _config(**overrides: object) -> BaselineConfig:
    return BaselineConfig(**{**QUIET, **overrides})  # type: ignore[arg-type]


def launch(exe: str, parent: str = "/usr/bin/bash", user: str = "alice",
           sha: str = "") -> dict[str, str]:
    out = {"process.exe": exe, "parent_process.exe": parent, "process.user": user}
    if sha:
        out["process.exe_sha256"] = sha
    return out


def _learn(b: Baselines, events: list[tuple[int, dict[str, str]]],
           category: str = "process_creation", agent: str = A) -> list[Anomaly]:
    out: list[Anomaly] = []
    for t, raw in events:
        out.extend(b.observe(agent, category, raw, t))
    return out


def test_learning_period_suppresses_alerts_then_first_seen_exe_fires() -> None:
    b = Baselines(_config())
    history = [(T0 + i * 60 * NS, launch(f"/usr/bin/tool{i % 5}", sha=f"{i % 5:064x}"))
               for i in range(120)]                                   # two hours, five tools
    anomalies = _learn(b, history)
    assert anomalies == []                  # new tools in the first hour: still learning
    assert _learn(b, [(T0 + 3 * HOUR, launch("/usr/bin/tool1", sha=f"{1:064x}"))]) == []
    [a] = _learn(b, [(T0 + 3 * HOUR, launch("/tmp/dropper", sha="f" * 64))])
    assert a.model == "first_seen_exe" and a.severity == "medium"
    assert "never seen on this host (5 executables known here)" in a.detail
    assert "nor anywhere in the fleet (5 known in the fleet)" in a.detail
    # Known elsewhere in the fleet, new here: quiet by default, low when configured.
    assert _learn(b, [(T0, launch("/usr/bin/x", sha="e" * 64))], agent="agent-b") == []
    assert _learn(b, [(T0 + 3 * HOUR, launch("/usr/bin/x", sha="e" * 64))]) == []
    loud = Baselines(_config(alert_new_to_host=True))
    _learn(loud, history)
    _learn(loud, [(T0, launch("/usr/bin/x", sha="e" * 64))], agent="agent-b")
    [a] = _learn(loud, [(T0 + 3 * HOUR, launch("/usr/bin/x", sha="e" * 64))])
    assert a.severity == "low" and "seen 1 times elsewhere in the fleet" in a.detail


def test_rare_parent_child_pair() -> None:
    b = Baselines(_config(rare_pair_min_launches=100))
    normal = [(T0 + i * 60 * NS, launch("/usr/bin/ls" if i % 2 else "/usr/bin/cat"))
              for i in range(200)]
    assert _learn(b, normal) == []
    assert _learn(b, [(T0 + 4 * HOUR, launch("/usr/bin/ls"))]) == []
    [a] = _learn(b, [(T0 + 4 * HOUR, launch("/usr/bin/bash", parent="/usr/sbin/nginx"))])
    assert a.model == "rare_parent_child"
    assert "/usr/sbin/nginx -> /usr/bin/bash was seen 0 times in 201 launches" in a.detail
    # Too little history: quiet.
    young = Baselines(_config(rare_pair_min_launches=100))
    _learn(young, normal[:50])
    assert _learn(young, [(T0 + 4 * HOUR, launch("/usr/bin/bash", "/usr/sbin/nginx"))]) == []


def test_new_outbound_destination_for_host_and_process() -> None:
    b = Baselines(_config(destination_min_known=3))

    def flow(ip: str, exe: str = "/usr/bin/curl", outbound: bool = True) -> dict[str, str]:
        return {"dst_endpoint.ip": ip, "dst_endpoint.port": "443", "process.exe": exe,
                "connection.initiated": "true" if outbound else "false"}
    history = [(T0 + i * 60 * NS, flow(f"198.51.100.{i % 4}")) for i in range(100)]
    assert _learn(b, history, "network_connection") == []
    assert _learn(b, [(T0 + 2 * HOUR, flow("198.51.100.2"))], "network_connection") == []
    assert _learn(b, [(T0 + 2 * HOUR, flow("127.0.0.1"))], "network_connection") == []
    assert _learn(b, [(T0 + 2 * HOUR, flow("203.0.113.50", outbound=False))],
                  "network_connection") == []
    [a] = _learn(b, [(T0 + 2 * HOUR, flow("203.0.113.9"))], "network_connection")
    assert a.model == "new_destination" and "203.0.113.9:443" in a.detail
    assert "it knew 4 destinations" in a.detail
    # Domains from DNS queries count as destinations too.
    _learn(b, [(T0 + i * NS, {"query.hostname": f"d{i}.example."}) for i in range(5)],
           "dns_query")
    [a] = _learn(b, [(T0 + 2 * HOUR, {"query.hostname": "evil.example"})], "dns_query")
    assert "evil.example (domain)" in a.detail
    # A destination the host knows but this process never used (after its own history).
    # (wget has no history of its own yet: quiet.)
    assert _learn(b, [(T0 + 2 * HOUR, flow("198.51.100.1", exe="/usr/bin/wget"))],
                  "network_connection") == []
    for i in range(4):
        _learn(b, [(T0 + 2 * HOUR, flow(f"198.51.100.{i}", exe="/usr/bin/python3"))],
               "network_connection")
    [a] = _learn(b, [(T0 + 2 * HOUR, flow("203.0.113.9", exe="/usr/bin/python3"))],
                 "network_connection")
    assert "/usr/bin/python3 never contacted 203.0.113.9:443" in a.detail


def test_user_unusual_hour_and_parent() -> None:
    b = Baselines(_config(user_min_launches=100, user_hour_max_fraction=0.02))
    # alice works 09:00-17:00 UTC from bash, for five days.
    history = [(T0 + d * 24 * HOUR + (9 + i % 8) * HOUR + i * NS, launch("/usr/bin/vim"))
               for d in range(5) for i in range(40)]
    assert _learn(b, history) == []
    assert _learn(b, [(T0 + 6 * 24 * HOUR + 10 * HOUR, launch("/usr/bin/vim"))]) == []
    [a] = _learn(b, [(T0 + 6 * 24 * HOUR + 3 * HOUR, launch("/usr/bin/vim"))])
    assert a.model == "user_unusual_hour"
    assert "0 of alice's 201 launches on this host were in that hour (0.0%" in a.detail
    [a] = _learn(b, [(T0 + 6 * 24 * HOUR + 11 * HOUR, launch("/usr/bin/id",
                                                             parent="/usr/sbin/apache2"))])
    assert a.model == "user_unusual_parent" and "from /usr/sbin/apache2" in a.detail
    # Another user with the same hours is judged on their own history (none yet): quiet.
    assert _learn(b, [(T0 + 6 * 24 * HOUR + 3 * HOUR, launch("/usr/bin/vim", user="bob"))]) == []


def test_activity_burst_against_the_hosts_own_rate() -> None:
    b = Baselines(_config(burst_min_minutes=30, burst_min_events=50, burst_sigmas=6.0))
    events: list[tuple[int, dict[str, str]]] = []
    for minute in range(120):                           # ~10 launches a minute
        for i in range(8 + minute % 5):
            events.append((T0 + minute * 60 * NS + i * NS, launch("/usr/bin/ls")))
    assert [a for a in _learn(b, events) if a.model == "activity_burst"] == []
    storm = [(T0 + 125 * 60 * NS + i * 10_000_000, launch("/usr/bin/ls")) for i in range(400)]
    bursts = [a for a in _learn(b, storm) if a.model == "activity_burst"]
    assert len(bursts) == 1                             # once per minute, not per event
    assert "the host's rate is" in bursts[0].detail and "threshold max(50" in bursts[0].detail
    numbers = bursts[0].numbers
    assert float(numbers["events_in_minute"]) > float(numbers["threshold"])
    # A busier minute inside the normal spread stays quiet.
    calm = Baselines(_config(burst_min_minutes=30, burst_min_events=50))
    _learn(calm, events)
    normal = [(T0 + 130 * 60 * NS + i * NS, launch("/usr/bin/ls")) for i in range(14)]
    assert [a for a in _learn(calm, normal) if a.model == "activity_burst"] == []


def test_baselines_survive_a_restart(tmp_path: Path) -> None:
    store = SQLiteDetectionStore(tmp_path / "detection.sqlite")
    b = Baselines(_config())
    _learn(b, [(T0 + i * 60 * NS, launch(f"/usr/bin/t{i % 3}", sha=f"{i % 3:064x}"))
               for i in range(90)])
    store.save_state(b.dirty_rows(), {A: 90})
    store.close()
    store = SQLiteDetectionStore(tmp_path / "detection.sqlite")
    restarted = Baselines(_config(), store.baselines())
    assert store.cursors() == {A: 90}
    assert not restarted.learning(A, T0 + 2 * HOUR)
    assert _learn(restarted, [(T0 + 2 * HOUR, launch("/usr/bin/t1", sha=f"{1:064x}"))]) == []
    [a] = _learn(restarted, [(T0 + 2 * HOUR, launch("/tmp/new", sha="a" * 64))])
    assert "3 executables known here" in a.detail
    store.close()


def test_changed_rows_are_saved_once_per_flush_with_the_burst_state() -> None:
    config = _config(burst_min_minutes=30, burst_min_events=50, burst_sigmas=6.0)
    b = Baselines(config)
    events = [(T0 + minute * 60 * NS + i * NS, launch("/usr/bin/ls"))
              for minute in range(40) for i in range(10)]
    _learn(b, events)
    rows = b.dirty_rows()
    keys = [(r.model, r.scope, r.key) for r in rows]
    assert len(keys) == len(set(keys))                  # each changed row once, not per bump
    [burst] = [r for r in rows if r.model == "burst"]
    assert burst.count == 39 and burst.last_ns == events[-1][0] and '"minutes": 39' in burst.value
    [host] = [r for r in rows if r.model == "host"]
    assert host.count == len(events)
    assert b.dirty_rows() == []                         # nothing changed since
    _learn(b, [(T0 + 40 * 60 * NS, launch("/usr/bin/ls"))])
    assert {r.model for r in b.dirty_rows()} == {"burst", "host", "launches", "pair",
                                                 "user_launches", "user_hour", "user_parent"}
    # A restart from the saved rows (past learning) keeps the rate: a storm stands out.
    restarted = Baselines(config, rows)
    storm = [(T0 + 65 * 60 * NS + i * 10_000_000, launch("/usr/bin/ls")) for i in range(400)]
    assert len([a for a in _learn(restarted, storm) if a.model == "activity_burst"]) == 1
