"""Pure, deterministic planning of an isolation `Policy` into a `RuleSet`.

`plan()` does no IO: it renders one nftables transaction for `table inet ringfence` and the
equivalent iptables-restore/ip6tables-restore inputs for the fallback backend. Applying,
reading back and verifying the rules is the backends' job (isolation.backends).

Design choices, all deliberate:

* No blanket `ct state established accept`: an attacker's established session must die, so
  both directions of every allowed flow are accepted explicitly by peer address, protocol and
  port (e.g. output to collector daddr+dport, input from collector saddr+sport). The reply
  direction additionally requires `ct state established`, scoped to that peer and port, so a
  packet spoofed from the collector's address and port cannot open a connection to a local
  service; only flows opened in the allowed direction get replies.
* Every base chain has `policy drop`; loopback is accepted; forward accepts nothing.
* IPv6 keeps working toward allowed peers: neighbour solicitation/advertisement (hop limit
  255, i.e. link-local only) and packet-too-big are always accepted; router solicitation and
  advertisement only with DHCP on (SLAAC belongs with dynamic addressing).
* The nftables text is written exactly in the form `nft list table inet ringfence` prints, so
  a read-back can be compared with the plan text after whitespace normalization.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass

from isolation.policy import AllowRule, Policy

logger = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
TABLE_NAME = "ringfence"
CHAINS = ("input", "forward", "output")
IPTABLES_CHAINS = {"input": "RINGFENCE-IN", "forward": "RINGFENCE-FWD", "output": "RINGFENCE-OUT"}
IPTABLES_HOOKS = {"input": "INPUT", "forward": "FORWARD", "output": "OUTPUT"}

# ICMPv6 types by nft name and number.
_ICMPV6 = {
    "packet-too-big": 2,
    "nd-router-solicit": 133,
    "nd-router-advert": 134,
    "nd-neighbor-solicit": 135,
    "nd-neighbor-advert": 136,
}


@dataclass(frozen=True)
class Rule:
    """One accept rule in the abstract form both renderers share.

    `peer` is matched as source address in the input chain and as destination in output.
    `family` is "ip", "ip6" or "" (both). `icmpv6_type` names an ICMPv6 type (nft spelling);
    `link_local_only` adds the hop-limit-255 check neighbour discovery requires.
    """

    chain: str
    comment: str
    family: str = ""
    loopback: bool = False
    peer: str = ""
    l4: str = ""
    sport: int = 0
    dport: int = 0
    icmpv6_type: str = ""
    link_local_only: bool = False
    reply_only: bool = False

    def matches(
        self,
        chain: str,
        family: str,
        src: str,
        dst: str,
        l4: str,
        sport: int,
        dport: int,
        *,
        original: bool = False,
    ) -> bool:
        """Whether a packet (not on loopback) would be accepted by this rule; `original` says
        the packet opens a flow, which a reply-only rule never accepts."""
        if self.loopback or chain != self.chain or (original and self.reply_only):
            return False
        if self.family and self.family != family:
            return False
        if self.peer:
            address = src if chain == "input" else dst
            net = ipaddress.ip_network(self.peer)
            ip = ipaddress.ip_address(address)
            if ip.version != net.version or ip not in net:
                return False
        if self.icmpv6_type:
            return False  # ND/PMTU messages are never tracked flows worth keeping.
        if self.l4 and self.l4 != l4:
            return False
        if self.sport and self.sport != sport:
            return False
        return not (self.dport and self.dport != dport)


@dataclass(frozen=True)
class RuleSet:
    """A planned rule set: nftables transaction text, iptables inputs, and its SHA-256.

    `nft_script` is the single `nft -f` transaction (create-if-missing, delete, define), so
    applying it is atomic and idempotent. `nft_listing` is the table definition alone, in the
    form the kernel lists it. `sha256` is the SHA-256 of `nft_script` and names the plan for
    every backend (the iptables renderings are derived deterministically from the same rules).
    """

    policy_json: str
    rules: tuple[Rule, ...]
    nft_script: str
    nft_listing: str
    iptables_v4: str
    iptables_v6: str

    @property
    def text(self) -> str:
        return self.nft_script

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.nft_script.encode()).hexdigest()

    def accepts(
        self,
        chain: str,
        family: str,
        src: str,
        dst: str,
        l4: str,
        sport: int,
        dport: int,
        *,
        original: bool = False,
    ) -> bool:
        """Whether the planned rules accept this (non-loopback) packet; with `original` the
        packet opens a new flow (reply-only rules do not count)."""
        return any(
            r.matches(chain, family, src, dst, l4, sport, dport, original=original)
            for r in self.rules
        )


def _family(address: str) -> str:
    return "ip" if ipaddress.ip_network(address, strict=False).version == 4 else "ip6"


def _allow_rules(a: AllowRule) -> list[Rule]:
    family = _family(a.cidr)
    l4 = "" if a.protocol == "any" else a.protocol
    out: list[Rule] = []
    if a.port == 0:
        # Without a port, in/out/both all mean "any packet to or from the peer": a stateless
        # filter cannot tell who initiated, and we refuse to rely on conntrack state.
        out.append(Rule("input", "rf-allow", family, peer=a.cidr, l4=l4))
        out.append(Rule("output", "rf-allow", family, peer=a.cidr, l4=l4))
        return out
    if a.direction in ("out", "both"):
        out.append(Rule("output", "rf-allow", family, peer=a.cidr, l4=l4, dport=a.port))
        out.append(
            Rule("input", "rf-allow", family, peer=a.cidr, l4=l4, sport=a.port, reply_only=True)
        )
    if a.direction in ("in", "both"):
        out.append(Rule("input", "rf-allow", family, peer=a.cidr, l4=l4, dport=a.port))
        out.append(
            Rule("output", "rf-allow", family, peer=a.cidr, l4=l4, sport=a.port, reply_only=True)
        )
    return out


def _rules(policy: Policy) -> tuple[Rule, ...]:
    rules: list[Rule] = [
        Rule("input", "rf-loopback", loopback=True),
        Rule("output", "rf-loopback", loopback=True),
    ]
    for c in policy.collectors:
        fam = _family(c.address)
        rules.append(Rule("output", "rf-collector", fam, peer=c.address, l4="tcp", dport=c.port))
        rules.append(
            Rule(
                "input",
                "rf-collector",
                fam,
                peer=c.address,
                l4="tcp",
                sport=c.port,
                reply_only=True,
            )
        )
    for r in policy.dns_resolvers:
        fam = _family(r)
        for l4 in ("udp", "tcp"):
            rules.append(Rule("output", "rf-dns", fam, peer=r, l4=l4, dport=53))
            rules.append(Rule("input", "rf-dns", fam, peer=r, l4=l4, sport=53, reply_only=True))
    if policy.dhcp:
        rules.append(Rule("output", "rf-dhcp", "ip", l4="udp", sport=68, dport=67))
        rules.append(Rule("input", "rf-dhcp", "ip", l4="udp", sport=67, dport=68))
        rules.append(Rule("output", "rf-dhcp", "ip6", l4="udp", sport=546, dport=547))
        rules.append(Rule("input", "rf-dhcp", "ip6", l4="udp", sport=547, dport=546))
    nd = ["nd-neighbor-solicit", "nd-neighbor-advert"]
    for chain in ("output", "input"):
        for t in nd:
            rules.append(
                Rule(chain, "rf-nd", "ip6", l4="icmpv6", icmpv6_type=t, link_local_only=True)
            )
    if policy.dhcp:
        rules.append(
            Rule(
                "output",
                "rf-nd",
                "ip6",
                l4="icmpv6",
                icmpv6_type="nd-router-solicit",
                link_local_only=True,
            )
        )
        rules.append(
            Rule(
                "input",
                "rf-nd",
                "ip6",
                l4="icmpv6",
                icmpv6_type="nd-router-advert",
                link_local_only=True,
            )
        )
    rules.append(Rule("input", "rf-pmtu", "ip6", l4="icmpv6", icmpv6_type="packet-too-big"))
    for a in policy.allow:
        rules.extend(_allow_rules(a))
    # Deterministic order: chain, then the order above (policy entries are already sorted).
    order = {c: i for i, c in enumerate(CHAINS)}
    return tuple(sorted(rules, key=lambda r: order[r.chain]))


def _nft_rule(r: Rule) -> str:
    parts: list[str] = []
    if r.loopback:
        parts.append('iifname "lo"' if r.chain == "input" else 'oifname "lo"')
    if r.peer:
        net = ipaddress.ip_network(r.peer)
        # nft lists a single-address network without its prefix length.
        peer = str(net.network_address) if net.num_addresses == 1 else net.compressed
        parts.append(f"{r.family} {'saddr' if r.chain == 'input' else 'daddr'} {peer}")
    if r.icmpv6_type:
        parts.append(f"icmpv6 type {r.icmpv6_type}")
        if r.link_local_only:
            parts.append("ip6 hoplimit 255")
    elif r.l4:
        if not r.peer and r.family:
            parts.append(f"meta nfproto {'ipv4' if r.family == 'ip' else 'ipv6'}")
        if r.sport:
            parts.append(f"{r.l4} sport {r.sport}")
        if r.dport:
            parts.append(f"{r.l4} dport {r.dport}")
        if not r.sport and not r.dport:
            parts.append(f"meta l4proto {r.l4}")
    if r.reply_only:
        parts.append("ct state established")
    parts.append(f'accept comment "{r.comment}"')
    return " ".join(parts)


def _nft_listing(rules: tuple[Rule, ...]) -> str:
    blocks = []
    for chain in CHAINS:
        lines = [
            f"\tchain {chain} {{",
            f"\t\ttype filter hook {chain} priority filter; policy drop;",
        ]
        lines += [f"\t\t{_nft_rule(r)}" for r in rules if r.chain == chain]
        lines.append("\t}")
        blocks.append("\n".join(lines))
    return f"table {TABLE_FAMILY} {TABLE_NAME} {{\n" + "\n\n".join(blocks) + "\n}\n"


def _ipt_rule(r: Rule, version: int) -> str | None:
    fam = "ip" if version == 4 else "ip6"
    if r.family and r.family != fam:
        return None
    parts = [f"-A {IPTABLES_CHAINS[r.chain]}"]
    if r.loopback:
        parts.append("-i lo" if r.chain == "input" else "-o lo")
    if r.peer:
        net = ipaddress.ip_network(r.peer)
        parts.append(f"{'-s' if r.chain == 'input' else '-d'} {net.with_prefixlen}")
    if r.icmpv6_type:
        parts.append(f"-p ipv6-icmp -m icmp6 --icmpv6-type {_ICMPV6[r.icmpv6_type]}")
        if r.link_local_only:
            parts.append("-m hl --hl-eq 255")
    elif r.l4:
        parts.append(f"-p {r.l4}")
        if r.sport or r.dport:
            parts.append(f"-m {r.l4}")
            if r.sport:
                parts.append(f"--sport {r.sport}")
            if r.dport:
                parts.append(f"--dport {r.dport}")
    if r.reply_only:
        parts.append("-m conntrack --ctstate ESTABLISHED")
    parts.append(f"-m comment --comment {r.comment} -j ACCEPT")
    return " ".join(parts)


def iptables_chain_lines(rules: tuple[Rule, ...], version: int) -> list[str]:
    """The `-A` lines of the dedicated chains, as `iptables-save` prints them."""
    lines: list[str] = []
    for chain in CHAINS:
        for r in rules:
            if r.chain == chain:
                line = _ipt_rule(r, version)
                if line is not None:
                    lines.append(line)
        lines.append(f"-A {IPTABLES_CHAINS[chain]} -m comment --comment rf-drop -j DROP")
    return lines


def iptables_jump_lines() -> list[str]:
    """The jumps from the built-in chains, as `iptables-save` prints them."""
    return [f"-A {IPTABLES_HOOKS[c]} -j {IPTABLES_CHAINS[c]}" for c in CHAINS]


def _iptables(rules: tuple[Rule, ...], version: int) -> str:
    lines = ["*filter"]
    lines += [f":{IPTABLES_CHAINS[c]} - [0:0]" for c in CHAINS]
    lines += [f"-F {IPTABLES_CHAINS[c]}" for c in CHAINS]
    lines += iptables_chain_lines(rules, version)
    # Jumps are inserted first in the built-in chains; the backend drops these lines when the
    # jumps already exist so that re-applying never duplicates them.
    lines += [f"-I {IPTABLES_HOOKS[c]} 1 -j {IPTABLES_CHAINS[c]}" for c in CHAINS]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def plan(policy: Policy) -> RuleSet:
    """Render `policy` into a RuleSet. Pure and deterministic: same policy, same bytes."""
    rules = _rules(policy)
    listing = _nft_listing(rules)
    script = (
        f"add table {TABLE_FAMILY} {TABLE_NAME}\n"
        f"delete table {TABLE_FAMILY} {TABLE_NAME}\n" + listing
    )
    return RuleSet(
        policy_json=policy.to_json(),
        rules=rules,
        nft_script=script,
        nft_listing=listing,
        iptables_v4=_iptables(rules, 4),
        iptables_v6=_iptables(rules, 6),
    )
