"""Several collector nodes on one PostgreSQL store: real `ringfence server run` processes sharing
a data dir (keys) and a throwaway schema; commands cross nodes by LISTEN/NOTIFY; an agent moves
to the other node when its node is SIGKILLed, with every event stored exactly once."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.enroll import enroll_agent
from agent.state import AgentPaths, Enrollment
from collector.store import open_store
from collector.store.base import Store
from proto import ringfence_pb2 as pb
from server.fleet import init_server
from server.pki import ServerPaths
from tests.integration.fleet import (
    BIN,
    REPO,
    agent_config,
    cli,
    running_agent,
    wait_for,
)
from tests.integration.pg import pg_schema

pytestmark = pytest.mark.postgres

PORTS_LINE = re.compile(r"enroll :(\d+), collector :(\d+), admin [^:]+:(\d+)")


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    enroll: int
    collector: int
    admin: int

    def admin_args(self, data: Path) -> list[str]:
        return ["--server", f"127.0.0.1:{self.admin}", "--identity",
                str(ServerPaths(data).responder_identity("admin")), "--tls-name", "localhost"]


def start_node(data: Path, url: str, log: Path) -> Node:
    out = log.open("wb")
    proc = subprocess.Popen(
        [str(BIN / "ringfence"), "server", "run", "--data-dir", str(data), "--store", url,
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--enroll", "127.0.0.1:0"],
        stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    out.close()

    def ports() -> re.Match[str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"node exited ({proc.returncode}):\n{log.read_text()}")
        return PORTS_LINE.search(log.read_text())
    m = wait_for(ports, timeout=30, what="a collector node to start")
    return Node(proc, int(m.group(1)), int(m.group(2)), int(m.group(3)))


@contextlib.contextmanager
def cluster(tmp_path: Path, nodes: int = 2) -> Iterator[tuple[Path, str, list[Node]]]:
    data = tmp_path / "server"
    init_server(data, ["localhost", "127.0.0.1"])
    with pg_schema() as url:
        out = cli("server", "migrate", "--store", url, "--data-dir", str(data)).stdout
        assert "1 responder identities copied" in out
        started: list[Node] = []
        try:
            for i in range(nodes):
                started.append(start_node(data, url, tmp_path / f"node{i}.log"))
            yield data, url, started
        finally:
            for node in started:
                if node.proc.poll() is None:
                    node.proc.send_signal(signal.SIGTERM)
            for node in started:
                try:
                    node.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout=10)


def enroll_on(data: Path, node: Node, state: Path, collectors: list[Node]) -> Enrollment:
    token = cli("token", "create", "--data-dir", str(data)).stdout.split()[0]
    assert token.startswith("rft_")
    enroll_agent(AgentPaths(state), f"127.0.0.1:{node.enroll}", token,
                 ServerPaths(data).ca_cert.read_bytes(), "localhost")
    # The agent knows every node, tried in order: it starts on the first.
    record = json.loads(AgentPaths(state).enrollment.read_text())
    record["collectors"] = [f"127.0.0.1:{n.collector}" for n in collectors]
    AgentPaths(state).enrollment.write_text(json.dumps(record))
    return Enrollment.load(AgentPaths(state))


def hosts(data: Path, node: Node) -> list[dict[str, object]]:
    return list(json.loads(cli("hosts", "--json", *node.admin_args(data)).stdout))


def test_isolate_through_node_b_reaches_an_agent_on_node_a(tmp_path: Path) -> None:
    with cluster(tmp_path) as (data, url, (node_a, node_b)):
        enrollment = enroll_on(data, node_a, tmp_path / "agent", [node_a, node_b])
        with running_agent(agent_config(tmp_path / "agent")) as agent:
            wait_for(agent.session.connected.is_set, what="session")
            assert agent.session._transport.endpoint.target.endswith(f":{node_a.collector}")
            # Node B holds no session, yet knows from the store that the agent is online.
            wait_for(lambda: [h["online"] for h in hosts(data, node_b)] == [True],
                     what="node B to see the agent online")
            result = cli("isolate", enrollment.agent_id, "--reason", "IR-1 cross-node",
                         "--wait", "--timeout", "30", "--json", *node_b.admin_args(data))
            status = json.loads(result.stdout)
            assert status["status"] == "succeeded", status
            # The result the agent gave node A is visible through node B's admin API.
            row = json.loads(cli("hosts", "--json", *node_b.admin_args(data)).stdout)[0]
            assert row["isolation"]["state"] == "isolated"
            released = json.loads(cli("release", enrollment.agent_id, "--reason", "IR-1 done",
                                      "--wait", "--timeout", "30", "--json",
                                      *node_b.admin_args(data)).stdout)
            assert released["status"] == "succeeded", released
        # Both nodes wrote to one audit chain, and it verifies.
        audit = cli("audit", "verify", *node_a.admin_args(data), check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        store = open_store(url)
        try:
            actions = [r.action for r in store.audit_rows()]
            assert "isolate" in actions and "release" in actions
        finally:
            store.close()


def _emitter(state: Path, status: Path, rate: float, duration: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.emitter", "--state-dir",
                             str(state), "--status", str(status), "--rate", str(rate),
                             "--duration", str(duration), "--drain-timeout", "90"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _status(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _check_exactly_once(store: Store, agent_id: str) -> list[pb.Event]:
    rows = list(store.events_by_seq(agent_id, 1, 2**62))
    seqs = [r.seq for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "stored seqs are not contiguous from 1"
    assert store.forks(agent_id) == []
    assert store.alerts(agent_id) == []
    return [pb.Event.FromString(r.data) for r in rows]


def test_node_sigkill_mid_stream_agent_moves_and_nothing_is_lost_or_duplicated(
        tmp_path: Path) -> None:
    with cluster(tmp_path) as (data, url, (node_a, node_b)):
        state = tmp_path / "agent"
        enrollment = enroll_on(data, node_a, state, [node_a, node_b])
        status = tmp_path / "status.json"
        emitter = _emitter(state, status, rate=1000.0, duration=8.0)
        try:
            wait_for(lambda: int(_status(status).get("acked", 0)) > 500, timeout=30,
                     what="acks flowing to node A")
            node_a.proc.send_signal(signal.SIGKILL)
            node_a.proc.wait(timeout=10)
            killed_at = int(_status(status)["seq"])
            wait_for(lambda: emitter.poll() is not None, timeout=120, interval=0.25,
                     what="the agent to drain through node B and stop")
            assert emitter.returncode == 0, emitter.stderr.read() if emitter.stderr else ""
        finally:
            if emitter.poll() is None:
                emitter.kill()
                emitter.wait(timeout=10)
        final = _status(status)
        assert final.get("done") is True
        assert int(final["seq"]) > killed_at, "the agent kept emitting after the kill"
        store = open_store(url)
        try:
            events = _check_exactly_once(store, enrollment.agent_id)
            assert len(events) == int(final["seq"]) == int(final["acked"])
            synthetic = sum(1 for e in events if e.WhichOneof("body") == "process")
            assert synthetic == int(final["emitted"])
        finally:
            store.close()
        # Node B's view: the agent's session (now ended) was owned by node B, not the dead A.
        assert all(h["online"] is False for h in hosts(data, node_b))


def test_agent_rotates_to_the_next_endpoint_after_a_failure(tmp_path: Path) -> None:
    """Transport-level rotation, without a cluster: a dead first endpoint is skipped."""
    with cluster(tmp_path, nodes=1) as (data, _url, (node,)):
        state = tmp_path / "agent"
        enroll_on(data, node, state, [node])
        record = json.loads(AgentPaths(state).enrollment.read_text())
        # A port nothing listens on first, then the real node.
        record["collectors"] = ["127.0.0.1:1", f"127.0.0.1:{node.collector}"]
        AgentPaths(state).enrollment.write_text(json.dumps(record))
        started = time.monotonic()
        with running_agent(agent_config(state)) as agent:
            wait_for(agent.session.connected.is_set, what="session via the second endpoint")
            assert agent.session._transport.endpoint.target == f"127.0.0.1:{node.collector}"
        assert time.monotonic() - started < 15
