"""Detection end to end: a real server and a real agent (process sensor "auto": netlink when
root, else psutil polling), real commands on this machine, alerts through the `ringfence` CLI.

Attack-like commands raise the shipped rules' alerts; ordinary commands (ls, a compiler run)
raise none; alerts are acknowledged and closed with audit entries; the alert log verifies;
hunts find history; a first-seen executable raises a baseline alert that names its numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proto import ringfence_pb2 as pb
from server.app import RunConfig, start
from server.detection.baselines import BaselineConfig
from server.detection.engine import DetectionConfig
from server.fleet import init_server
from server.pki import ServerPaths
from tests.integration.fleet import (
    Fleet,
    agent_config,
    cli,
    quiet_sensors,
    running_agent,
    wait_for,
)


@contextlib.contextmanager
def detecting_fleet(base: Path, detection: DetectionConfig) -> Iterator[Fleet]:
    data_dir = base / "server"
    init_server(data_dir, ["localhost", "127.0.0.1"])
    server = start(RunConfig(data_dir=data_dir, listen="127.0.0.1:0", admin="127.0.0.1:0",
                             enroll="127.0.0.1:0", detection=detection))
    try:
        yield Fleet(data_dir, server, ServerPaths(data_dir))
    finally:
        server.stop(grace_s=1.0)


def _alerts(fleet: Fleet, *extra: str) -> list[dict[str, Any]]:
    out = cli("alerts", "--json", "--data-dir", str(fleet.data_dir), *extra).stdout
    alerts: list[dict[str, Any]] = json.loads(out)
    return alerts


def _launches(fleet: Fleet, agent_id: str, pids: set[int]) -> list[tuple[int, pb.Event]]:
    """Stored launch events of the given processes or their children."""
    out = []
    for row in fleet.store.query_events(agent_id, kind="process", limit=100_000):
        event = pb.Event.FromString(row.data)
        p = event.process.process
        if event.process.activity_id == 1 and (p.pid in pids or p.ppid in pids):
            out.append((row.seq, event))
    return out


def _run(*argv: str, stdin_for_s: float = 0.0, cwd: Path | None = None) -> int:
    """Run a command and return its pid; with stdin_for_s its stdin stays open that long, so
    commands that read it (cat -, base64 -d) live long enough for a polling sensor."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=cwd)
    time.sleep(stdin_for_s)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    return proc.pid


def _ls_and_gcc(launches: list[tuple[int, pb.Event]]) -> bool:
    """Both an ls and a gcc driver (gcc resolves to e.g. x86_64-linux-gnu-gcc-12) recorded."""
    names = [os.path.basename(e.process.process.exe) for _, e in launches]
    return b"ls" in names and any(b"gcc" in n for n in names)


def test_attack_commands_raise_pack_alerts_and_ordinary_commands_do_not(tmp_path: Path) -> None:
    config = DetectionConfig(dedup_window_s=600, baselines=BaselineConfig(enabled=False))
    marker = uuid.uuid4().hex[:12]
    shm = Path(f"/dev/shm/rf-{marker}")
    fake_crontab = tmp_path / "bin" / "crontab"
    fake_crontab.parent.mkdir()
    shutil.copy("/bin/bash", fake_crontab)
    with detecting_fleet(tmp_path, config) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        agent_id = enrollment.agent_id
        with running_agent(agent_config(tmp_path / "agent", quiet_sensors("auto"))) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            try:
                # Attack-like activity; each command lives ~1.5 s.
                attacks = {
                    _run("base64", "-d", stdin_for_s=1.5),
                    _run("cat", "-", "/etc/sudoers", stdin_for_s=1.5),
                    _run("cat", "-", "/etc/sudoers", stdin_for_s=1.5),
                    _run(str(fake_crontab), "-l", "-c", f"sleep 1.5 # {marker}"),
                }
                shutil.copy("/bin/sleep", shm)
                attacks.add(_run(str(shm), "1.5"))
                # Ordinary activity, repeated until the sensor has recorded it. (Relative
                # paths: Sigma matches ignore case, and "pytest-of-root" contains "-R", which
                # a discovery rule looks for in ls command lines.)
                src = tmp_path / "hello.c"
                src.write_text("int main(void) { return 0; }\n")
                quiet: set[int] = set()
                ordinary: list[tuple[int, pb.Event]] = []
                for _ in range(10):
                    quiet.add(_run("ls", "-la", ".", cwd=tmp_path))
                    quiet.add(_run("gcc", "-O1", "-o", "hello", "hello.c", cwd=tmp_path))
                    ordinary = _launches(fleet, agent_id, quiet)
                    if _ls_and_gcc(ordinary):
                        break
                    time.sleep(0.5)
            finally:
                shm.unlink(missing_ok=True)

            expected = {
                "Decode Base64 Encoded Text": "base64",
                "Access of Sudoers File Content": "cat",
                "Crontab Enumeration": "crontab",
                "Process Execution From Shared Memory Directory": "sleep copy",
            }

            def raised() -> dict[str, dict[str, Any]] | None:
                mine = {}
                launches = {s for s, _ in _launches(fleet, agent_id, attacks)}
                for alert in _alerts(fleet, "--host", agent_id):
                    if any(e["seq"] in launches for e in alert["events"]):
                        mine[alert["title"]] = alert
                return mine if set(expected) <= set(mine) else None
            mine = wait_for(raised, timeout=60, interval=0.5,
                            what="alerts for every attack command")

        for title, alert in mine.items():
            if title in expected:
                assert alert["source"] == "sigma"
                assert alert["agent_id"] == agent_id and alert["status"] == "new"
                assert alert["detail"].startswith(f'Sigma rule "{title}"')
        # The two sudoers reads come from the same process tree: one alert, counted twice.
        assert mine["Access of Sudoers File Content"]["count"] >= 2
        # Ordinary commands were recorded and linked to no alert at all.
        assert _ls_and_gcc(ordinary)
        ordinary_seqs = {s for s, _ in ordinary}
        every = _alerts(fleet, "--host", agent_id)
        assert not [a for a in every if any(e["seq"] in ordinary_seqs for e in a["events"])]

        # Hosts show the open alert count.
        hosts = json.loads(cli("hosts", "--json", "--data-dir", str(fleet.data_dir)).stdout)
        assert hosts[0]["open_alerts"] == len([a for a in every if a["status"] != "closed"])

        # Acknowledge and close, with reasons; both are audited; the alert log verifies.
        alert_id = str(mine["Crontab Enumeration"]["alert_id"])
        refused = cli("alerts", "close", alert_id, "--data-dir", str(fleet.data_dir),
                      check=False)
        assert refused.returncode == 1 and "--reason" in refused.stderr
        cli("alerts", "ack", alert_id, "--reason", "IR-7 triage", "--data-dir",
            str(fleet.data_dir))
        cli("alerts", "close", alert_id, "--reason", "IR-7: test activity", "--data-dir",
            str(fleet.data_dir))
        closed = _alerts(fleet, "--status", "closed")
        assert [(a["alert_id"], a["status_reason"], a["status_actor"]) for a in closed] == [
            (int(alert_id), "IR-7: test activity", "admin")]
        audit = json.loads(cli("audit", "--json", "--data-dir", str(fleet.data_dir)).stdout)
        updates = [r for r in audit["records"] if r["action"] == "update_alert"]
        assert [r["outcome"] for r in updates] == ["refused: no reason given",
                                                   "allowed: acknowledged", "allowed: closed"]
        assert "chain intact" in cli("alerts", "verify", "--data-dir",
                                     str(fleet.data_dir)).stdout

        # A retro-hunt over stored history finds the crontab listing by rule name.
        hunt = json.loads(cli("hunt", "proc_creation_lnx_crontab_enumeration", "--json",
                              "--hosts", agent_id, "--data-dir", str(fleet.data_dir)).stdout)
        assert hunt["title"] == "Crontab Enumeration"
        assert any(marker in m["detail"] for m in hunt["matches"])
        assert hunt["events_scanned"] > 0

        # Tampering with a stored alert is caught by verification.
        with contextlib.closing(sqlite3.connect(fleet.data_dir / "detection.sqlite",
                                                timeout=10)) as db:
            db.execute("UPDATE alerts SET severity = 'critical' WHERE alert_id = ?", (int(alert_id),))
            db.commit()
        broken = cli("alerts", "verify", "--data-dir", str(fleet.data_dir), check=False)
        assert broken.returncode == 1
        assert f"alert {alert_id} was altered after it was raised" in broken.stdout


def test_first_seen_executable_raises_an_explained_baseline_alert(tmp_path: Path) -> None:
    # A short learning period so the test host leaves it quickly; only this model matters.
    config = DetectionConfig(baselines=BaselineConfig(
        learning_s=0.5, rare_pair_min_launches=10**9, destination_min_known=10**9,
        user_min_launches=10**9, burst_min_minutes=10**9))
    marker = uuid.uuid4().hex[:12]
    novel = tmp_path / f"novel-{marker}"
    with detecting_fleet(tmp_path, config) as fleet:
        enrollment = fleet.enroll(tmp_path / "agent")
        with running_agent(agent_config(tmp_path / "agent", quiet_sensors("auto"))) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            wait_for(lambda: fleet.store.chain_state(enrollment.agent_id).last_seq > 0,
                     what="first events")
            time.sleep(1.0)    # past the learning period
            # A copy of sleep with extra bytes: an executable no host has ever run.
            novel.write_bytes(Path("/bin/sleep").read_bytes() + marker.encode())
            novel.chmod(0o755)
            _run(str(novel), "1.5")

            def alert() -> dict[str, Any] | None:
                for a in _alerts(fleet, "--host", enrollment.agent_id, "--limit", "10000"):
                    if a["rule_id"] == "first_seen_exe" and marker in a["title"]:
                        return a
                return None
            found = wait_for(alert, timeout=60, interval=0.5, what="first-seen alert")
        assert found["source"] == "baseline" and found["severity"] == "medium"
        assert "baseline first_seen_exe" in found["detail"]
        assert "never seen on this host" in found["detail"]
        assert "nor anywhere in the fleet" in found["detail"]
        # Baselines are persisted: the executable is now known in the detection database.
        rows = fleet.server.detection.dstore.baselines() if fleet.server.detection else []
        assert any(r.model == "exe" and r.scope == "*" for r in rows)
