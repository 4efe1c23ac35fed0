"""Golden-file tests for plan(): nftables and iptables renderings of a policy matrix.

Regenerate with RINGFENCE_UPDATE_GOLDEN=1 (then review the diff); otherwise files are compared.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isolation import AllowRule, CollectorEndpoint, Policy, plan

GOLDEN = Path(__file__).parent / "golden"
C4 = CollectorEndpoint("198.18.0.1", 8443)
C6 = CollectorEndpoint("2001:db8::1", 8443)

MATRIX: dict[str, Policy] = {
    "v4_only": Policy(collectors=(C4,)),
    "v6_only": Policy(collectors=(C6,)),
    "dual_stack": Policy(collectors=(C4, C6)),
    "dual_stack_dns": Policy(collectors=(C4, C6), dns_resolvers=("198.18.0.53", "2001:db8::53")),
    "v4_no_dhcp": Policy(collectors=(C4,), dhcp=False),
    "v6_no_dhcp_dns": Policy(collectors=(C6,), dhcp=False, dns_resolvers=("2001:db8::53",)),
    "allowlist": Policy(
        collectors=(C4, C6),
        allow=(
            AllowRule("198.18.10.0/24", "tcp", 22, "in"),
            AllowRule("198.18.11.5/32", "udp", 514, "out"),
            AllowRule("2001:db8:12::/48", "tcp", 443, "both"),
            AllowRule("2001:db8:13::/64", "any", 0, "both"),
            AllowRule("198.18.14.0/24", "udp", 0, "out"),
        ),
    ),
}


def render(policy: Policy) -> str:
    rs = plan(policy)
    return (
        f"# policy {rs.policy_json}\n# sha256 {rs.sha256}\n"
        f"#### nft -f\n{rs.nft_script}"
        f"#### iptables-restore\n{rs.iptables_v4}"
        f"#### ip6tables-restore\n{rs.iptables_v6}"
    )


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_golden(name: str) -> None:
    path = GOLDEN / f"{name}.txt"
    text = render(MATRIX[name])
    if os.environ.get("RINGFENCE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; rerun with RINGFENCE_UPDATE_GOLDEN=1"


def test_deterministic_and_order_independent() -> None:
    a = MATRIX["allowlist"]
    b = Policy(collectors=tuple(reversed(a.collectors)), allow=tuple(reversed(a.allow)))
    assert plan(a) == plan(b)
    assert plan(a).sha256 == plan(b).sha256
    assert plan(a).text == plan(a).nft_script


def test_no_blanket_established_accept() -> None:
    # Connection state is only ever used together with a specific peer address and port.
    for policy in MATRIX.values():
        rs = plan(policy)
        for line in rs.nft_script.splitlines():
            if "ct state" in line:
                assert " saddr " in line or " daddr " in line, line
                assert " sport " in line or " dport " in line, line
        for line in (rs.iptables_v4 + rs.iptables_v6).splitlines():
            if "ctstate" in line:
                assert " -s " in line or " -d " in line, line
                assert "--sport" in line or "--dport" in line, line
        assert all(r.peer for r in rs.rules if r.reply_only)


def test_reply_direction_needs_an_opened_flow() -> None:
    rs = plan(MATRIX["v4_only"])
    assert not rs.accepts("input", "ip", "198.18.0.1", "198.18.0.2", "tcp", 8443, 22, original=True)
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.0.1", "tcp", 40000, 8443, original=True)


def test_every_chain_drops_by_default_and_script_is_atomic_replacement() -> None:
    rs = plan(MATRIX["dual_stack"])
    lines = rs.nft_script.splitlines()
    assert lines[:3] == [
        "add table inet ringfence",
        "delete table inet ringfence",
        "table inet ringfence {",
    ]
    for hook in ("input", "forward", "output"):
        assert f"type filter hook {hook} priority filter; policy drop;" in rs.nft_script
    for chain in ("RINGFENCE-IN", "RINGFENCE-FWD", "RINGFENCE-OUT"):
        assert f"-A {chain} -m comment --comment rf-drop -j DROP" in rs.iptables_v4


def test_collector_both_directions_only() -> None:
    rs = plan(MATRIX["v4_only"])
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.0.1", "tcp", 40000, 8443)
    assert rs.accepts("input", "ip", "198.18.0.1", "198.18.0.2", "tcp", 8443, 40000)
    assert not rs.accepts("input", "ip", "198.18.0.1", "198.18.0.2", "tcp", 40000, 22)
    assert not rs.accepts("output", "ip", "198.18.0.2", "198.18.0.9", "tcp", 40000, 8443)
    assert not rs.accepts("output", "ip", "198.18.0.2", "198.18.0.1", "udp", 40000, 8443)
    assert not rs.accepts("forward", "ip", "198.18.0.1", "198.18.0.2", "tcp", 8443, 40000)


def test_dns_only_when_listed() -> None:
    assert "dport 53" not in plan(MATRIX["dual_stack"]).nft_script
    rs = plan(MATRIX["dual_stack_dns"])
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.0.53", "udp", 5000, 53)
    assert rs.accepts("output", "ip6", "2001:db8::2", "2001:db8::53", "tcp", 5000, 53)
    assert not rs.accepts("output", "ip", "198.18.0.2", "198.18.0.99", "udp", 5000, 53)


def test_dhcp_and_router_discovery_follow_the_flag() -> None:
    on, off = plan(MATRIX["v4_only"]), plan(MATRIX["v4_no_dhcp"])
    assert "udp sport 68 udp dport 67" in on.nft_script
    assert "udp sport 546 udp dport 547" in on.nft_script
    assert "nd-router-solicit" in on.nft_script
    assert "udp dport 67" not in off.nft_script
    assert "nd-router" not in off.nft_script
    # Neighbour discovery is needed for IPv6 to work at all: always there.
    assert "nd-neighbor-solicit ip6 hoplimit 255" in off.nft_script


def test_allow_directions() -> None:
    rs = plan(MATRIX["allowlist"])
    # in: peers connect to our port 22
    assert rs.accepts("input", "ip", "198.18.10.7", "198.18.0.2", "tcp", 50000, 22)
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.10.7", "tcp", 22, 50000)
    assert not rs.accepts("output", "ip", "198.18.0.2", "198.18.10.7", "tcp", 50000, 22)
    # out: we send to their udp 514
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.11.5", "udp", 5000, 514)
    assert not rs.accepts("input", "ip", "198.18.11.5", "198.18.0.2", "udp", 5000, 514)
    # both
    assert rs.accepts("output", "ip6", "2001:db8::2", "2001:db8:12::1", "tcp", 5000, 443)
    assert rs.accepts("input", "ip6", "2001:db8:12::1", "2001:db8::2", "tcp", 5000, 443)
    # any protocol, any port
    assert rs.accepts("input", "ip6", "2001:db8:13::9", "2001:db8::2", "icmpv6", 0, 0)
    # udp any port, tcp not
    assert rs.accepts("output", "ip", "198.18.0.2", "198.18.14.3", "udp", 1, 2)
    assert not rs.accepts("output", "ip", "198.18.0.2", "198.18.14.3", "tcp", 1, 2)
