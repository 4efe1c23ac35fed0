"""Host isolation end to end with real processes in throwaway network namespaces.

`ringfence server run` runs in the collector namespace (198.18.0.1, 2001:db8::1), a real
`ringfence-agent run` with the nftables backend in the endpoint namespace (.2), an attacker
(.3: echo on tcp 4444, a fake resolver on udp 53) and an allowlisted peer (.4: echo on tcp 22
and 5555). Responder commands are the `ringfence` CLI run inside the collector namespace
(admin API on 127.0.0.1 there). Rules are only ever applied in the endpoint's namespace; every
namespace and process is removed afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from isolation.lab import (
    CONNECT,
    ECHO_SERVER,
    Topology,
    hold_exchange,
    python_argv,
    start_hold,
    topology,
)
from proto import ringfence_pb2 as pb
from tests.integration.fleet import BIN

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.nftables, pytest.mark.timeout(150)]

FAIL_TIMEOUT = "0.7"
TRANSITION = pb.IsolationActivity.Transition.Name
AGENT_TOML = """\
[isolation]
backend = "nftables"
[sensors.process]
mode = "psutil"
poll_interval_s = 0.5
[sensors.file]
enabled = false
[sensors.network]
enabled = false
[spool]
fsync_interval_s = 0.05
[chain]
checkpoint_interval_s = 0.5
[session]
heartbeat_interval_s = 1.0
backoff_initial_s = 0.1
backoff_max_s = 1.0
"""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Lab:
    """A running server + agent in a topology, and CLI helpers run in the collector ns."""

    topo: Topology
    tmp: Path
    collector_address: str
    data: Path = field(init=False)
    state: Path = field(init=False)
    agent: subprocess.Popen[str] | None = None
    agent_id: str = ""

    def __post_init__(self) -> None:
        self.data = self.tmp / "server"
        self.state = self.tmp / "agent"

    def cli(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = self.topo.run("collector", str(BIN / "ringfence"), *args, check=False,
                               timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ringfence {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def admin(self, *args: str, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A responder command against the running server as the admin identity."""
        return self.cli(*args, "--data-dir", str(self.data), check=check, timeout=timeout)

    def host(self) -> dict[str, Any]:
        hosts = json.loads(self.admin("hosts", "--json").stdout)
        return next(h for h in hosts if h["agent_id"] == self.agent_id)

    def events(self, kind: str = "") -> list[dict[str, Any]]:
        extra = ["--kind", kind] if kind else []
        out = self.admin("events", self.agent_id, "--json", "--limit", "100000", *extra).stdout
        return sorted((json.loads(line) for line in out.splitlines() if line.strip()),
                      key=lambda e: int(e["seq"]))

    def isolation_events(self, command_id: str = "") -> list[tuple[str, dict[str, Any]]]:
        return [(TRANSITION(e["transition"]), e) for e in self.events("isolation")
                if not command_id or e.get("command_id") == command_id]

    def start_agent(self) -> None:
        self.agent = self.topo.spawn(
            "endpoint", [str(BIN / "ringfence-agent"), "run", "--state-dir", str(self.state),
                         "--config", str(self.tmp / "agent.toml")],
            log=self.tmp / "agent.log")

    def ruleset(self) -> str:
        return self.topo.run("endpoint", "nft", "list", "ruleset").stdout

    def table_present(self) -> bool:
        return self.topo.run("endpoint", "nft", "list", "table", "inet", "ringfence",
                             check=False).returncode == 0

    def reaches(self, src: str, addr: str, port: int, udp: bool = False) -> bool:
        args = [addr, str(port), FAIL_TIMEOUT] + (["udp"] if udp else [])
        return self.topo.python(src, CONNECT, *args).returncode == 0

    def logs(self) -> str:
        text = ""
        for name in ("server.log", "agent.log"):
            path = self.tmp / name
            if path.exists():
                text += f"--- {name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-60:]) + "\n"
        return text


@contextlib.contextmanager
def running_lab(tmp_path: Path, family: str, advertise: str | None = None) -> Iterator[Lab]:
    with topology(["collector", "endpoint", "attacker", "peer"]) as topo:
        c = topo["collector"]
        address = c.ipv4 if family == "ipv4" else c.ipv6
        lab = Lab(topo, tmp_path, address)
        for host, port in (("endpoint", 2222), ("attacker", 4444), ("peer", 22),
                           ("peer", 5555)):
            topo.spawn(host, python_argv(ECHO_SERVER, str(port)))
        topo.spawn("attacker", python_argv(ECHO_SERVER, "53", "udp"))
        lab.cli("server", "init", "--data-dir", str(lab.data), "--address", c.ipv4,
                "--address", c.ipv6)
        run = ["server", "run", "--data-dir", str(lab.data), "--listen", "[::]:8443",
               "--enroll", "[::]:8442", "--admin", "127.0.0.1:8444"]
        if advertise:
            run += ["--advertise", advertise]
        server = topo.spawn("collector", [str(BIN / "ringfence"), *run],
                            log=tmp_path / "server.log")
        try:
            for port in (8442, 8443, 8444):
                topo.wait_port("collector", port, timeout_s=20, proc=server)
            for host, port in (("endpoint", 2222), ("attacker", 4444), ("peer", 22),
                               ("peer", 5555)):
                topo.wait_port(host, port)
            token = lab.cli("token", "create", "--data-dir", str(lab.data)).stdout.strip()
            bracketed = address if family == "ipv4" else f"[{address}]"
            (tmp_path / "agent.toml").write_text(AGENT_TOML)
            topo.run("endpoint", str(BIN / "ringfence-agent"), "enroll", "--server",
                     f"{bracketed}:8442", "--token", token, "--ca",
                     str(lab.data / "pki" / "ca.pem"), "--state-dir", str(lab.state),
                     "--config", str(tmp_path / "agent.toml"), timeout=30)
            lab.agent_id = json.loads((lab.state / "enrollment.json").read_text())["agent_id"]
            lab.start_agent()
            wait_until(lambda: lab.host()["online"], 30, "the agent to come online")
            yield lab
        except BaseException:
            print(lab.logs())
            raise


def tcp_listens_dual_stack(lab: Lab) -> None:
    """The collector listener bound to [::] accepts IPv4 and IPv6 TCP connections."""
    code = ("import socket,sys\n"
            "for a in sys.argv[1:]:\n"
            "    socket.create_connection((a, 8443), timeout=2).close()\n")
    c = lab.topo["collector"]
    assert lab.topo.python("endpoint", code, c.ipv4, c.ipv6).returncode == 0


def assert_open(lab: Lab) -> None:
    for fam in ("ipv4", "ipv6"):
        a, e = getattr(lab.topo["attacker"], fam), getattr(lab.topo["endpoint"], fam)
        assert lab.reaches("endpoint", a, 4444), f"endpoint -> attacker ({fam})"
        assert lab.reaches("attacker", e, 2222), f"attacker -> endpoint ({fam})"
        assert lab.reaches("endpoint", a, 53, udp=True), f"DNS to attacker ({fam})"


def assert_isolated(lab: Lab) -> None:
    for fam in ("ipv4", "ipv6"):
        a, e = (getattr(lab.topo[h], fam) for h in ("attacker", "endpoint"))
        assert not lab.reaches("endpoint", a, 4444), f"new endpoint -> attacker ({fam})"
        # Only the agent's own sessions to the collector are allowed, not the reverse.
        assert not lab.reaches("collector", e, 2222), f"new collector -> endpoint ({fam})"
        assert not lab.reaches("attacker", e, 2222), f"new attacker -> endpoint ({fam})"
        assert not lab.reaches("endpoint", a, 53, udp=True), f"DNS to attacker ({fam})"


def isolate(lab: Lab, reason: str, *extra: str, check: bool = True
            ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = lab.admin("isolate", lab.agent_id, "--reason", reason, "--wait", "--json",
                       "--timeout", "60", *extra, check=check, timeout=90)
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def release(lab: Lab, reason: str) -> dict[str, Any]:
    result = lab.admin("release", lab.agent_id, "--reason", reason, "--wait", "--json",
                       "--timeout", "60", timeout=90)
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def streams_new_events(lab: Lab) -> None:
    """The agent keeps streaming: a process started now shows up on the server."""
    marker = f"rf-e2e-{uuid.uuid4().hex[:12]}"
    proc = lab.topo.spawn("endpoint", ["sh", "-c", "sleep 3", marker])
    try:
        wait_until(lambda: any(marker in json.dumps(e) for e in lab.events("process")), 30,
                   "a process event from after isolation", interval=0.5)
    finally:
        lab.topo.kill(proc)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_isolate_and_release_with_real_server_and_agent(tmp_path: Path, family: str) -> None:
    with running_lab(tmp_path, family) as lab:
        topo = lab.topo
        tcp_listens_dual_stack(lab)
        before = lab.ruleset()
        assert "ringfence" not in before
        assert_open(lab)
        held = [start_hold(topo, "endpoint", getattr(topo["attacker"], f), 4444)
                for f in ("ipv4", "ipv6")]
        held.append(start_hold(topo, "attacker", getattr(topo["endpoint"], family), 2222))
        assert [hold_exchange(h) for h in held] == ["ok"] * 3

        reason = f"e2e {family}: suspected compromise"
        p = topo["peer"]
        result, status = isolate(lab, reason, "--allow", f"{p.ipv4}/32:22/tcp@out",
                                 "--allow", f"[{p.ipv6}/128]:22/tcp@out")
        assert result.returncode == 0 and status["status"] == "succeeded", result.stdout
        assert status["message"].startswith("isolation confirmed")
        command_id = status["command_id"]

        host = lab.host()
        assert host["isolation"]["state"] == "isolated"
        assert host["isolation"]["reason"] == reason and host["isolation"]["changed_ns"] > 0

        # The chain holds requested/applied/verified/confirmed, with the applied ruleset.
        def confirmed_chain() -> list[tuple[str, dict[str, Any]]]:
            found = lab.isolation_events(command_id)
            return found if "CONFIRMED" in [t for t, _ in found] else []

        chain = wait_until(confirmed_chain, 15, "the confirmed isolation event")
        names = [t for t, _ in chain]
        assert names == ["REQUESTED", "APPLIED", "VERIFIED", "CONFIRMED"], names
        applied = chain[1][1]
        assert len(applied["ruleset_sha256"]) == 64 and applied["backend"] == "nftables"
        assert "table inet ringfence" in applied["ruleset"]
        assert "policy drop" in applied["ruleset"]
        assert f"daddr {lab.collector_address} tcp dport 8443" in applied["ruleset"]
        # No blanket established-accept: every reply rule is scoped to an allowed peer.
        replies = [ln for ln in applied["ruleset"].splitlines() if "ct state established" in ln]
        assert replies and all(" saddr " in ln for ln in replies), replies
        assert all(e["ruleset_sha256"] == applied["ruleset_sha256"] for _, e in chain)
        in_force = topo.run("endpoint", "nft", "list", "table", "inet", "ringfence").stdout
        assert [ln.strip() for ln in in_force.splitlines() if ln.strip()] == \
            applied["ruleset"].splitlines()

        # The attacker is cut off in both directions and both families; DNS too; the
        # established connections opened before isolation are dead.
        assert [hold_exchange(h).startswith("fail") for h in held] == [True] * 3
        assert_isolated(lab)
        for fam in ("ipv4", "ipv6"):
            peer = getattr(topo["peer"], fam)
            assert lab.reaches("endpoint", peer, 22), f"allowlisted peer ({fam})"
            assert not lab.reaches("endpoint", peer, 5555), f"peer port not allowed ({fam})"
        streams_new_events(lab)

        rel = release(lab, f"e2e {family}: cleaned up")
        assert rel["status"] == "succeeded", rel
        assert lab.host()["isolation"]["state"] == "none"
        assert lab.ruleset() == before
        assert_open(lab)

        # A refused request (no reason) is audited too.
        refused = lab.admin("isolate", lab.agent_id, "--reason", " ", check=False)
        assert refused.returncode == 1 and "reason" in refused.stderr
        audit = json.loads(lab.admin("audit", "--json").stdout)
        assert audit["verified"]
        rows = [(r["actor"], r["action"], r["target"], r["reason"], r["outcome"])
                for r in audit["records"] if r["action"] in ("isolate", "release")]
        assert ("admin", "isolate", lab.agent_id, reason,
                f"allowed: issued command {command_id}") in rows
        assert ("admin", "release", lab.agent_id, f"e2e {family}: cleaned up",
                f"allowed: issued command {rel['command_id']}") in rows
        assert ("admin", "isolate", lab.agent_id, " ", "refused: no reason given") in rows


def _set_command_status(lab: Lab, command_id: str, status: str) -> None:
    """Make the server believe a finished command is still undelivered, so it redelivers
    the same signed envelope when the agent reconnects: a replay over the real session."""
    db = sqlite3.connect(lab.data / "ringfence.db", timeout=10)
    try:
        with db:
            db.execute("UPDATE commands SET status = ? WHERE command_id = ?",
                       (status, command_id))
    finally:
        db.close()


@pytest.mark.slow
def test_isolation_survives_agent_kill_reapplies_before_connecting_and_heals_drift(
        tmp_path: Path) -> None:
    with running_lab(tmp_path, "ipv4") as lab:
        before = lab.ruleset()
        reason = "e2e: crash and drift"
        result, status = isolate(lab, reason)
        assert result.returncode == 0 and status["status"] == "succeeded", result.stdout
        command_id = status["command_id"]

        # SIGKILL: isolation stays in force without the agent.
        assert lab.agent is not None
        _set_command_status(lab, command_id, "sent")
        lab.topo.kill(lab.agent)
        assert lab.table_present()
        assert_isolated(lab)
        last_seq = max(int(e["seq"]) for e in lab.events())

        lab.start_agent()
        wait_until(lambda: lab.host()["online"], 30, "the restarted agent")
        # Answered again from the agent's record, not executed again.
        wait_until(lambda: _command_status(lab, command_id) == "succeeded", 15,
                   "the redelivered command to be answered")

        def reapplied() -> list[dict[str, Any]]:
            return [e for t, e in lab.isolation_events(command_id)
                    if t == "REAPPLIED" and int(e["seq"]) > last_seq]

        again = wait_until(reapplied, 15, "the re-applied isolation event")[0]
        assert again["reason"] == "resumed from disk"
        starts = [e for e in lab.events("lifecycle") if int(e["seq"]) > last_seq
                  and "resuming after seq" in e.get("message", "")]
        assert starts and int(starts[0]["seq"]) < int(again["seq"])
        # Nothing but start-up records between START and the re-applied isolation: the rules
        # were back in force before the agent connected, ran a sensor or took a command.
        between = {int(e["seq"]) for e in lab.events()
                   if int(starts[0]["seq"]) < int(e["seq"]) < int(again["seq"])}
        startup = {int(e["seq"]) for e in lab.events("sensor_loss")}
        assert between <= startup, between
        assert lab.host()["isolation"]["state"] == "isolated"
        assert_isolated(lab)
        transitions = [t for t, _ in lab.isolation_events(command_id)]
        assert transitions.count("REQUESTED") == 1, transitions
        commands = [e for e in lab.events("command") if e.get("command_id") == command_id]
        assert [c["outcome"] for c in commands] == ["accepted", "succeeded"], commands

        # Drift: deleting the table is healed within 5 s and recorded.
        lab.topo.run("endpoint", "nft", "delete", "table", "inet", "ringfence")
        removed = time.monotonic()
        wait_until(lab.table_present, 5, "the table to be re-applied", interval=0.05)
        assert time.monotonic() - removed < 5
        drift = wait_until(lambda: [e for t, e in lab.isolation_events(command_id)
                                    if t == "DRIFT"], 15, "the drift event")
        assert drift[0]["reason"].startswith("missing")
        assert_isolated(lab)

        assert release(lab, "e2e: done")["status"] == "succeeded"
        assert lab.ruleset() == before


def _command_status(lab: Lab, command_id: str) -> str:
    db = sqlite3.connect(lab.data / "ringfence.db", timeout=10)
    try:
        row = db.execute("SELECT status FROM commands WHERE command_id = ?",
                         (command_id,)).fetchone()
    finally:
        db.close()
    return str(row[0]) if row else ""


@pytest.mark.slow
def test_policy_that_blocks_the_collector_is_rolled_back(tmp_path: Path) -> None:
    # The server advertises an address that is not the collector: the pushed policy does not
    # allow the real one, so the agent cannot confirm and must revert by itself.
    with running_lab(tmp_path, "ipv6", advertise="198.18.0.250") as lab:
        before = lab.ruleset()
        started = time.monotonic()
        result, status = isolate(lab, "e2e: bad policy", "--confirm-deadline", "5",
                                 check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert status["status"] == "failed"
        assert status["message"] == "collector session not re-established within 5 s"
        assert time.monotonic() - started < 60
        assert lab.ruleset() == before
        host = wait_until(lambda: (h := lab.host())["isolation"]["state"] == "failed" and h,
                          15, "host state failed")
        assert "not re-established" in host["isolation"]["reason"]
        names = [t for t, _ in lab.isolation_events(status["command_id"])]
        assert names[-2:] == ["RESTORED", "FAILED"], names
        assert_open(lab)
        # A responder without the role is refused, and that is audited as well.
        created = lab.cli("responder", "create", "watcher", "--role", "viewer", "--data-dir",
                          str(lab.data)).stdout
        identity = created.rsplit("identity: ", 1)[1].strip()
        denied = lab.admin("release", lab.agent_id, "--reason", "e2e: not allowed",
                           "--identity", identity, check=False)
        assert denied.returncode == 5 and "responder" in denied.stderr, denied.stderr
        audit = json.loads(lab.admin("audit", "--json").stdout)["records"]
        rows = [(r["actor"], r["action"], r["target"], r["reason"], r["outcome"]) for r in audit]
        assert ("admin", "isolate", lab.agent_id, "e2e: bad policy",
                f"allowed: issued command {status['command_id']}") in rows
        assert ("watcher", "release", lab.agent_id, "e2e: not allowed", "denied") in rows
