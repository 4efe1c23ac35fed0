"""Real isolation inside throwaway network namespaces: nftables (default) and iptables.

Hosts: collector (198.18.0.1, 2001:db8::1, echo on tcp 8443), endpoint (.2, isolated; echo on
tcp 2222), attacker (.3; echo on tcp 4444 and a fake resolver on udp 53), peer (.4,
allowlisted for tcp 22 out; also echo on 5555). Rules are only ever applied in the endpoint's
namespace; every namespace is deleted afterwards, also on failure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import (
    CONNECT,
    ECHO_SERVER,
    Topology,
    hold_exchange,
    python_argv,
    start_hold,
    topology,
)

from agent.actions.isolation import IsolationController, IsolationTransition
from isolation import AllowRule, CollectorEndpoint, Policy, plan, select_backend
from isolation.backends import FirewallBackend

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.nftables, pytest.mark.timeout(120)]

COLLECTOR_PORT = 8443
FAIL_TIMEOUT = "0.7"
# An unrelated table that must survive isolation and release untouched. Its chain uses
# conntrack, as most real hosts' firewalls do, so connections opened before isolation are
# tracked and must be cut.
UNRELATED = """table inet unrelated {
\tset keep {
\t\ttype ipv4_addr
\t\telements = { 198.19.0.1 }
\t}

\tchain track {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tct mark 0x00000001 accept
\t}

\tchain track_out {
\t\ttype filter hook output priority raw; policy accept;
\t\tct mark 0x00000001 accept
\t}
}
"""


def policy(topo: Topology, deadline_s: float = 5.0) -> Policy:
    c = topo["collector"]
    p = topo["peer"]
    return Policy(
        collectors=(
            CollectorEndpoint(c.ipv4, COLLECTOR_PORT),
            CollectorEndpoint(c.ipv6, COLLECTOR_PORT),
        ),
        allow=(
            AllowRule(f"{p.ipv4}/32", "tcp", 22, "out"),
            AllowRule(f"{p.ipv6}/128", "tcp", 22, "out"),
        ),
        confirm_deadline_s=deadline_s,
    )


def reaches(topo: Topology, src: str, addr: str, port: int, udp: bool = False) -> bool:
    args = [addr, str(port), FAIL_TIMEOUT] + (["udp"] if udp else [])
    return topo.python(src, CONNECT, *args).returncode == 0


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology(["collector", "endpoint", "attacker", "peer"]) as t:
        servers = [
            ("collector", COLLECTOR_PORT),
            ("endpoint", 2222),
            ("attacker", 4444),
            ("peer", 22),
            ("peer", 5555),
        ]
        for host, port in servers:
            t.spawn(host, python_argv(ECHO_SERVER, str(port)))
        t.spawn("attacker", python_argv(ECHO_SERVER, "53", "udp"))
        for host, port in servers:
            t.wait_port(host, port)
        yield t


def ruleset_listing(topo: Topology) -> str:
    return topo.run("endpoint", "nft", "list", "ruleset").stdout


def controller(
    topo: Topology, backend: FirewallBackend, tmp_path: Path, events: list[IsolationTransition]
) -> IsolationController:
    c = topo["collector"]

    def healthy() -> bool:
        # A new session to the collector through the new rules, as the agent's would be.
        return reaches(topo, "endpoint", c.ipv4, COLLECTOR_PORT)

    return IsolationController(backend, tmp_path, events.append, healthy, poll_interval_s=0.1)


def assert_open(topo: Topology) -> None:
    for fam in ("ipv4", "ipv6"):
        a = getattr(topo["attacker"], fam)
        assert reaches(topo, "endpoint", a, 4444), f"endpoint -> attacker {fam}"
        assert reaches(topo, "attacker", getattr(topo["endpoint"], fam), 2222)


def assert_isolated(topo: Topology) -> None:
    """The isolation matrix every backend must satisfy, IPv4 and IPv6."""
    for fam in ("ipv4", "ipv6"):
        c, a, p, e = (getattr(topo[h], fam) for h in ("collector", "attacker", "peer", "endpoint"))
        assert not reaches(topo, "endpoint", a, 4444), f"new endpoint -> attacker ({fam})"
        assert not reaches(topo, "attacker", e, 2222), f"new attacker -> endpoint ({fam})"
        assert not reaches(topo, "endpoint", a, 53, udp=True), f"DNS to attacker ({fam})"
        assert reaches(topo, "endpoint", c, COLLECTOR_PORT), f"new collector session ({fam})"
        assert reaches(topo, "endpoint", p, 22), f"allowlisted peer tcp 22 ({fam})"
        assert not reaches(topo, "endpoint", p, 5555), f"peer port not allowlisted ({fam})"
        # The collector's address may not open connections to the endpoint either.
        assert not reaches(topo, "collector", e, 2222), f"collector -> endpoint ({fam})"


def test_nftables_isolate_and_release(topo: Topology, tmp_path: Path) -> None:
    topo.run("endpoint", "nft", "-f", "-", stdin=UNRELATED)
    before = ruleset_listing(topo)
    assert "unrelated" in before
    assert_open(topo)
    held = {
        (dst, fam): start_hold(
            topo,
            "endpoint",
            getattr(topo[dst], fam),
            COLLECTOR_PORT if dst == "collector" else 4444,
        )
        for dst in ("collector", "attacker")
        for fam in ("ipv4", "ipv6")
    }
    inbound = start_hold(topo, "attacker", topo["endpoint"].ipv4, 2222)
    for proc in [*held.values(), inbound]:
        assert hold_exchange(proc) == "ok"

    backend = select_backend(None, topo["endpoint"].ns)
    assert backend.name == "nftables"
    events: list[IsolationTransition] = []
    ctl = controller(topo, backend, tmp_path, events)
    out = ctl.isolate(policy(topo), "cmd-1", "integration")
    assert out.ok, out.reason
    assert [e.transition for e in events] == ["requested", "applied", "verified", "confirmed"]
    assert out.connections_cut is not None and out.connections_cut >= 3
    rs = plan(policy(topo))
    assert events[1].listing == backend.expected_listing(rs)
    assert backend.verify(rs).ruleset_sha256 == rs.sha256
    assert "unrelated" in ruleset_listing(topo)

    # Established sessions: attacker's die (both directions), collector's survive.
    for fam in ("ipv4", "ipv6"):
        assert hold_exchange(held[("collector", fam)]) == "ok", fam
        assert hold_exchange(held[("attacker", fam)]).startswith("fail"), fam
    assert hold_exchange(inbound).startswith("fail")
    assert_isolated(topo)

    rel = ctl.release("cmd-2", "done")
    assert rel.ok and events[-1].transition == "released"
    assert ruleset_listing(topo) == before
    assert_open(topo)


def test_nftables_confirm_timeout_reverts(topo: Topology, tmp_path: Path) -> None:
    before = ruleset_listing(topo)
    events: list[IsolationTransition] = []
    backend = select_backend("nftables", topo["endpoint"].ns)
    # The management channel is never re-established: the agent must roll back by itself.
    ctl = IsolationController(backend, tmp_path, events.append, lambda: False, poll_interval_s=0.1)
    out = ctl.isolate(policy(topo, deadline_s=1.0), "cmd-3", "integration")
    assert not out.ok
    assert out.reason == "collector session not re-established within 1 s"
    assert [e.transition for e in events][-2:] == ["restored", "failed"]
    assert ruleset_listing(topo) == before
    assert_open(topo)


def test_nftables_drift_is_reapplied(topo: Topology, tmp_path: Path) -> None:
    events: list[IsolationTransition] = []
    backend = select_backend("nftables", topo["endpoint"].ns)
    ctl = controller(topo, backend, tmp_path, events)
    try:
        assert ctl.isolate(policy(topo), "cmd-4", "integration").ok
        ctl.start_drift_watch(interval_s=0.2)
        topo.run("endpoint", "nft", "delete", "table", "inet", "ringfence")
        removed = time.monotonic()
        while time.monotonic() - removed < 5 and "reapplied" not in [e.transition for e in events]:
            time.sleep(0.05)
        names = [e.transition for e in events]
        assert "drift" in names and "reapplied" in names
        assert events[names.index("drift")].reason.startswith("missing")
        assert backend.verify(plan(policy(topo))).ruleset_sha256
        assert not reaches(topo, "endpoint", topo["attacker"].ipv6, 4444)
        # An alteration (an attacker adding a blanket accept) is caught too.
        topo.run("endpoint", "nft", "insert", "rule", "inet", "ringfence", "output", "accept")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [e.transition for e in events].count("drift") < 2:
            time.sleep(0.05)
        drifts = [e for e in events if e.transition == "drift"]
        assert len(drifts) >= 2 and drifts[1].reason.startswith("altered")
    finally:
        ctl.stop()
        backend.remove()


def test_nftables_resume_after_restart(topo: Topology, tmp_path: Path) -> None:
    topo.run("endpoint", "nft", "-f", "-", stdin=UNRELATED)
    before = ruleset_listing(topo)
    backend = select_backend("nftables", topo["endpoint"].ns)
    first: list[IsolationTransition] = []
    assert controller(topo, backend, tmp_path, first).isolate(policy(topo), "cmd-5", "x").ok
    # Reboot: the kernel forgets the table; the agent restarts with a new controller.
    topo.run("endpoint", "nft", "delete", "table", "inet", "ringfence")
    assert reaches(topo, "endpoint", topo["attacker"].ipv4, 4444)
    events: list[IsolationTransition] = []
    ctl = controller(topo, backend, tmp_path, events)
    out = ctl.resume_from_disk()
    assert out is not None and out.ok
    assert [e.transition for e in events] == ["reapplied"]
    assert not reaches(topo, "endpoint", topo["attacker"].ipv4, 4444)
    assert ctl.release("cmd-6", "done").ok
    assert ruleset_listing(topo) == before


def _save(topo: Topology) -> str:
    text = ""
    for tool in ("iptables-save", "ip6tables-save"):
        out = topo.run("endpoint", tool).stdout
        text += (
            "\n".join(
                re.sub(r"\[\d+:\d+\]", "", line)
                for line in out.splitlines()
                if not line.startswith("#")
            )
            + "\n"
        )
    return text


@pytest.mark.iptables
def test_iptables_isolate_and_release(topo: Topology, tmp_path: Path) -> None:
    # A pre-existing unrelated rule in each family must survive untouched; it uses conntrack
    # (as real firewalls do), so connections opened before isolation are tracked.
    for tool, src in (("iptables", "198.19.255.1/32"), ("ip6tables", "2001:db8:ffff::1/128")):
        topo.run(
            "endpoint",
            tool,
            "-A",
            "INPUT",
            "-s",
            src,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        )
    before = _save(topo)
    held = start_hold(topo, "endpoint", topo["attacker"].ipv4, 4444)
    held_c = start_hold(topo, "endpoint", topo["collector"].ipv6, COLLECTOR_PORT)
    assert hold_exchange(held) == "ok" and hold_exchange(held_c) == "ok"

    backend = select_backend("iptables", topo["endpoint"].ns)
    events: list[IsolationTransition] = []
    ctl = controller(topo, backend, tmp_path, events)
    out = ctl.isolate(policy(topo), "cmd-7", "integration")
    assert out.ok, out.reason
    assert out.connections_cut is not None and out.connections_cut >= 1
    assert backend.verify(plan(policy(topo))).listing == events[1].listing
    # Re-applying is idempotent (no duplicated jumps).
    backend.apply(plan(policy(topo)))
    backend.verify(plan(policy(topo)))
    assert hold_exchange(held).startswith("fail")
    assert hold_exchange(held_c) == "ok"
    assert_isolated(topo)
    assert ctl.release("cmd-8", "done").ok
    assert _save(topo) == before
    assert_open(topo)


@pytest.mark.iptables
def test_iptables_drift_detected(topo: Topology, tmp_path: Path) -> None:
    backend = select_backend("iptables", topo["endpoint"].ns)
    events: list[IsolationTransition] = []
    ctl = controller(topo, backend, tmp_path, events)
    try:
        assert ctl.isolate(policy(topo), "cmd-9", "integration").ok
        topo.run("endpoint", "iptables", "-I", "RINGFENCE-OUT", "1", "-j", "ACCEPT")
        assert ctl.check_drift()
        assert [e.transition for e in events][-2:] == ["drift", "reapplied"]
        backend.verify(plan(policy(topo)))
        assert not reaches(topo, "endpoint", topo["attacker"].ipv4, 4444)
    finally:
        ctl.stop()
        backend.remove()
