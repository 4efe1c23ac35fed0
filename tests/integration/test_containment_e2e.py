"""Targeted containment end to end through the `ringfence` CLI against a real server and a
real agent (in-process, psutil process sensor): kill (identity re-checked, whole tree),
quarantine and exact restore, lock and exact unlock of a throwaway local user; each recorded
in the agent's chain and the audit log. Then a case ties them together, a bundle is created
for it, a story is told, and the post-incident report is written.

Only processes, files and the user the tests create are touched; the user is always deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.fleet import (
    Fleet,
    agent_config,
    cli,
    events_json,
    quiet_sensors,
    running_agent,
    running_fleet,
    wait_for,
)

pytestmark = [pytest.mark.timeout(180)]


@dataclass
class World:
    fleet: Fleet
    agent_id: str
    tmp: Path

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--data-dir", str(self.fleet.data_dir), check=check, timeout=120)

    def action(self, *args: str) -> tuple[int, dict[str, Any]]:
        result = self.admin(*args, "--wait", "--json", "--timeout", "60", check=False)
        assert result.stdout.strip(), result.stderr
        return result.returncode, json.loads(result.stdout)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return events_json(self.fleet.data_dir, self.agent_id, "--kind", kind, "--limit",
                           "100000")

    def launch_seen(self, pid: int) -> dict[str, Any] | None:
        for e in self.events("process"):
            if e.get("process.pid") == pid and e.get("activity_id") == 1:
                return e
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("containment")
    with running_fleet(tmp) as fleet:
        state = tmp / "agent"
        enrollment = fleet.enroll(state)
        with running_agent(agent_config(state, sensors=quiet_sensors("psutil"))):
            w = World(fleet, enrollment.agent_id, tmp)
            wait_for(lambda: w.admin("hosts", "--json").stdout.count('"online": true'), 30,
                     what="agent online")
            yield w


def _spawn(*argv: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=5)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_checks_identity_then_kills_process_and_tree(world: World) -> None:
    victim = _spawn("sleep", "300")
    tree = _spawn("sh", "-c", "sleep 301 & sleep 302 & wait")
    try:
        wait_for(lambda: world.launch_seen(victim.pid), 20, what="launch event of the victim")
        # A start time that is not the process's: the agent must treat the pid as reused.
        code, status = world.action("kill", world.agent_id, str(victim.pid), "--reason",
                                    "IR: wrong identity", "--start-time", "1000000000",
                                    "--exe", "/usr/bin/sleep")
        assert code == 1 and status["status"] == "failed", status
        assert "reused" in status["message"] and "nothing was killed" in status["message"]
        assert victim.poll() is None

        code, status = world.action("kill", world.agent_id, str(victim.pid), "--reason",
                                    "IR: kill the beacon")
        assert code == 0 and status["status"] == "succeeded", status
        assert victim.wait(timeout=10) == -9
        killed = status["detail"]["killed"]
        assert [k["pid"] for k in killed] == [victim.pid]
        assert killed[0]["exe"].endswith("sleep")

        children = wait_for(lambda: len(psutil.Process(tree.pid).children()) == 2 and
                            [c.pid for c in psutil.Process(tree.pid).children()], 10,
                            what="the tree's children")
        wait_for(lambda: world.launch_seen(tree.pid), 20, what="launch event of the tree")
        code, status = world.action("kill", world.agent_id, str(tree.pid), "--tree",
                                    "--reason", "IR: kill the dropper and children")
        assert code == 0 and status["status"] == "succeeded", status
        assert sorted(k["pid"] for k in status["detail"]["killed"]) == \
            sorted([tree.pid, *children])
        assert tree.wait(timeout=10) == -9
        wait_for(lambda: all(_gone(p) for p in children), 10, what="children to die")

        # No stored launch event and no identity given: refused on the server.
        refused = world.admin("kill", world.agent_id, "4194000", "--reason", "IR: guess",
                              check=False)
        assert refused.returncode == 1 and "--start-time" in refused.stderr

        responses = wait_for(lambda: [e for e in world.events("response")
                                      if e["action"] == "kill"] or None, 15,
                             what="kill records in the chain")
        assert {e["outcome"] for e in responses} >= {"succeeded", "refused"}
        assert any(e["target"] == str(victim.pid) and e["outcome"] == "succeeded"
                   for e in responses)
        audit = json.loads(world.admin("audit", "--json").stdout)
        assert audit["verified"]
        assert any(r["action"] == "kill" and r["reason"] == "IR: kill the beacon" and
                   r["outcome"].startswith("allowed: issued command") for r in audit["records"])
    finally:
        _reap(victim)
        _reap(tree)


def _xattr_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.ringfence-probe", b"1")
        os.removexattr(path, "user.ringfence-probe")
        return True
    except OSError:
        return False


@pytest.mark.root
def test_quarantine_moves_file_into_vault_and_restores_it_exactly(world: World) -> None:
    target = world.tmp / f"dropper-{uuid.uuid4().hex[:8]}"
    content = b"#!/bin/sh\necho pwned\n" * 100
    target.write_bytes(content)
    os.chown(target, 4321, 4322)
    os.chmod(target, 0o4755)
    os.utime(target, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    with_xattr = _xattr_supported(target)
    if with_xattr:
        os.setxattr(target, "user.origin", b"dropped-by-attacker")
    before = os.lstat(target)
    digest = hashlib.sha256(content).hexdigest()

    code, status = world.action("quarantine", world.agent_id, str(target), "--reason",
                                "IR: dropper")
    assert code == 0 and status["status"] == "succeeded", status
    detail = status["detail"]
    qid = detail["quarantine_id"]
    assert detail["sha256"] == digest and detail["size"] == len(content)
    assert not os.path.lexists(target)
    vault = world.tmp / "agent" / "quarantine"
    assert stat.S_IMODE(os.stat(vault).st_mode) == 0o700
    stored = os.stat(vault / f"{qid}.bin")
    assert stat.S_IMODE(stored.st_mode) == 0o400
    assert hashlib.sha256((vault / f"{qid}.bin").read_bytes()).hexdigest() == digest

    # Restoring never overwrites what is now at the path.
    target.write_bytes(b"new file")
    code, status = world.action("unquarantine", world.agent_id, qid, "--reason", "IR: oops")
    assert code == 1 and "move it away first" in status["message"]
    target.unlink()

    code, status = world.action("unquarantine", world.agent_id, qid, "--reason",
                                "IR: false positive")
    assert code == 0 and status["status"] == "succeeded", status
    after = os.lstat(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert (after.st_uid, after.st_gid) == (4321, 4322)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o4755
    assert after.st_mtime_ns == before.st_mtime_ns
    if with_xattr:
        assert os.getxattr(target, "user.origin") == b"dropped-by-attacker"
    assert not (vault / f"{qid}.bin").exists()
    def quarantine_records() -> list[dict[str, Any]] | None:
        found = [e for e in world.events("response")
                 if e["action"] in ("quarantine", "unquarantine")
                 and (e["target"] == qid or qid in e["detail_json"])]
        return found if len(found) >= 3 else None

    records = wait_for(quarantine_records, 15, what="quarantine records in the chain")
    assert [e["outcome"] for e in records] == ["succeeded", "refused", "succeeded"]
    assert content.decode()[:10] not in "".join(e["detail_json"] for e in records)
    target.unlink()


def _shadow_line(user: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        if line.startswith(user + ":"):
            return line
    raise AssertionError(f"{user} not in /etc/shadow")


@pytest.mark.root
def test_lock_user_kills_sessions_and_unlock_restores_exactly(world: World) -> None:
    user = f"rft{uuid.uuid4().hex[:10]}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True, timeout=30)
    session: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["usermod", "-p", "$6$rftest$notarealhashnotarealhash", user],
                       check=True, timeout=30)
        before = _shadow_line(user)
        uid, gid = (int(subprocess.run(["id", flag, user], capture_output=True, text=True,
                                       check=True).stdout) for flag in ("-u", "-g"))
        session = _spawn("sleep", "303", user=uid, group=gid)
        code, status = world.action("lock-user", world.agent_id, user, "--kill-sessions",
                                    "--reason", "IR: stolen credentials")
        assert code == 0 and status["status"] == "succeeded", status
        fields = _shadow_line(user).split(":")
        assert fields[1] == "!" + before.split(":")[1] and fields[7] == "0"
        assert session.wait(timeout=10) == -9
        assert session.pid in status["detail"]["killed_pids"]

        again = world.action("lock-user", world.agent_id, user, "--reason", "IR: twice")
        assert again[0] == 1 and "already locked" in again[1]["message"]

        code, status = world.action("unlock-user", world.agent_id, user, "--reason",
                                    "IR: credentials rotated")
        assert code == 0 and status["status"] == "succeeded", status
        assert _shadow_line(user) == before
        root = world.admin("lock-user", world.agent_id, "root", "--reason", "IR: no",
                           check=False)
        assert root.returncode == 1 and "not root" in root.stderr
        records = wait_for(lambda: (found := [e for e in world.events("response")
                                              if e["target"] == user]) and len(found) >= 3
                           and found, 15, what="lock records in the chain")
        assert [e["outcome"] for e in records] == ["succeeded", "refused", "succeeded"]
    finally:
        if session is not None:
            _reap(session)
        subprocess.run(["userdel", "-f", user], capture_output=True, timeout=30)
    assert subprocess.run(["id", user], capture_output=True).returncode != 0


def test_case_links_actions_and_bundle_story_and_report(world: World) -> None:
    created = json.loads(world.admin("case", "create", "Reverse shell on web-01",
                                     "--severity", "high", "--host", world.agent_id,
                                     "--json").stdout)
    case_id = created["case"]["case_id"]
    assert created["hosts"] == [world.agent_id] and created["case"]["status"] == "open"

    parent = _spawn("sh", "-c", "sleep 304; true")
    try:
        child = wait_for(lambda: psutil.Process(parent.pid).children(), 10,
                         what="the shell's child")[0]
        launch = wait_for(lambda: world.launch_seen(child.pid), 20, what="child launch event")
        wait_for(lambda: world.launch_seen(parent.pid), 20, what="parent launch event")
        story = json.loads(world.admin("story", world.agent_id, "--seq", str(launch["seq"]),
                                       "--json").stdout)
        assert [p["pid"] for p in story["ancestry"]][-2:] == [parent.pid, child.pid]
        assert story["ancestry"][-1]["cmd_line"] == "sleep 304"
        assert story["timeline"][-1]["seq"] == launch["seq"]
        text = world.admin("story", world.agent_id, "--seq", str(launch["seq"])).stdout
        assert "process ancestry" in text and "sleep 304" in text

        code, status = world.action("kill", world.agent_id, str(parent.pid), "--tree",
                                    "--case", case_id, "--reason", "IR: contain the shell")
        assert code == 0 and status["status"] == "succeeded", status
    finally:
        _reap(parent)

    unknown = world.admin("bundle", "create", world.agent_id, "--case", "CASE-999", "-o",
                          str(world.tmp / "nope.zip"), check=False)
    assert unknown.returncode == 1 and "no case CASE-999" in unknown.stderr
    bundle_path = world.tmp / "case.zip"
    wait_for(lambda: world.admin("bundle", "create", world.agent_id, "--case", case_id, "-o",
                                 str(bundle_path), check=False).returncode == 0, 30,
             interval=1.0, what="a bundle (needs a covering checkpoint)")
    world.admin("case", "link", case_id, "--note", "beacon to 198.18.0.3 confirmed")

    shown = json.loads(world.admin("case", "show", case_id, "--json").stdout)
    assert [c["action"] for c in shown["commands"]] == ["kill"]
    assert shown["commands"][0]["status"] == "succeeded"
    assert len(shown["bundles"]) == 1
    assert shown["bundles"][0]["sha256"] == hashlib.sha256(bundle_path.read_bytes()).hexdigest()
    verified = cli("bundle", "verify", str(bundle_path), "--data-dir",
                   str(world.fleet.data_dir), "--json")
    assert json.loads(verified.stdout)["case_id"] == case_id

    refused = world.admin("case", "close", case_id, "--reason", " ", check=False)
    assert refused.returncode == 1 and "reason" in refused.stderr
    world.admin("case", "close", case_id, "--reason", "host reimaged")
    md, html_path = world.tmp / "report.md", world.tmp / "report.html"
    world.admin("case", "report", case_id, "-o", str(md))
    world.admin("case", "report", case_id, "-o", str(html_path))
    report = md.read_text()
    for section in ("## Summary", "## Timeline", "## Evidence bundles", "## What worked",
                    "## What did not work", "Time to contain", "Time to release"):
        assert section in report, section
    assert shown["bundles"][0]["sha256"] in report and "IR: contain the shell" in report
    assert "host reimaged" in report
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    late = world.admin("kill", world.agent_id, "4194001", "--case", case_id, "--start-time",
                       "1", "--exe", "/x", "--reason", "late", check=False)
    assert late.returncode == 1 and "closed" in late.stderr
    audit = json.loads(world.admin("audit", "--json").stdout)
    assert audit["verified"]
    case_rows = [(r["action"], r["outcome"].split(":")[0]) for r in audit["records"]
                 if r["target"] == case_id]
    for expected in [("case_create", "allowed"), ("case_link", "allowed"),
                     ("case_close", "refused"), ("case_close", "allowed"),
                     ("case_report", "allowed")]:
        assert expected in case_rows, (expected, case_rows)
