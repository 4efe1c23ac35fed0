"""Cut tracked connections that an isolation rule set does not allow, via `conntrack`.

Parsing and the allow decision are pure (`parse_flows`, `is_allowed`); `cut_connections`
runs `conntrack -L`/`-D`. It does not change firewall rules.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from isolation._run import Runner
from isolation.errors import CommandError, ConntrackUnavailableError
from isolation.plan import RuleSet

logger = logging.getLogger(__name__)

MAX_FLOWS = 100_000


@dataclass(frozen=True)
class Flow:
    """The original-direction tuple of one conntrack entry."""

    family: str  # "ip" or "ip6"
    l4: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0


def parse_flows(text: str) -> list[Flow]:
    """Parse `conntrack -L -o extended` output; lines that are not entries are skipped."""
    flows: list[Flow] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] not in ("ipv4", "ipv6"):
            continue
        values: dict[str, str] = {}
        for f in fields:
            key, sep, value = f.partition("=")
            if sep and key not in values:  # first occurrence = original direction
                values[key] = value
        if "src" not in values or "dst" not in values:
            continue
        flows.append(
            Flow(
                family="ip" if fields[0] == "ipv4" else "ip6",
                l4=fields[2],
                src=ipaddress.ip_address(values["src"]).compressed,
                dst=ipaddress.ip_address(values["dst"]).compressed,
                sport=int(values.get("sport", "0")),
                dport=int(values.get("dport", "0")),
            )
        )
        if len(flows) >= MAX_FLOWS:
            break
    return flows


def is_allowed(flow: Flow, ruleset: RuleSet) -> bool:
    """Whether both directions of `flow` pass `ruleset`, whichever end is local.

    Loopback flows (and flows from an address to itself) are always allowed, as the rules
    accept everything on `lo`.
    """
    src, dst = ipaddress.ip_address(flow.src), ipaddress.ip_address(flow.dst)
    if src.is_loopback or dst.is_loopback or src == dst:
        return True
    f, p = flow.family, flow.l4
    local_initiated = ruleset.accepts(
        "output", f, flow.src, flow.dst, p, flow.sport, flow.dport, original=True
    ) and ruleset.accepts("input", f, flow.dst, flow.src, p, flow.dport, flow.sport)
    remote_initiated = ruleset.accepts(
        "input", f, flow.src, flow.dst, p, flow.sport, flow.dport, original=True
    ) and ruleset.accepts("output", f, flow.dst, flow.src, p, flow.dport, flow.sport)
    return local_initiated or remote_initiated


def cut_connections(runner: Runner, ruleset: RuleSet) -> int:
    """Delete every tracked flow `ruleset` does not allow; return the number deleted.

    Raises ConntrackUnavailableError when the conntrack tool is missing or listing fails.
    """
    flows: list[Flow] = []
    for family in ("ipv4", "ipv6"):
        try:
            listed = runner.run("conntrack", "-L", "-f", family, "-o", "extended")
        except CommandError as e:
            raise ConntrackUnavailableError(
                f"cannot list connections with conntrack: {e.message}", backend="conntrack"
            ) from e
        flows.extend(parse_flows(listed.stdout))
    cut = 0
    for flow in flows:
        if is_allowed(flow, ruleset):
            continue
        argv = [
            "conntrack",
            "-D",
            "-f",
            "ipv4" if flow.family == "ip" else "ipv6",
            "-p",
            flow.l4,
            "-s",
            flow.src,
            "-d",
            flow.dst,
        ]
        if flow.l4 in ("tcp", "udp", "sctp", "dccp", "udplite"):
            argv += ["--sport", str(flow.sport), "--dport", str(flow.dport)]
        try:
            result = runner.run(*argv, check=False)
        except CommandError as e:
            raise ConntrackUnavailableError(
                f"conntrack -D failed: {e.message}", backend="conntrack"
            ) from e
        if result.returncode == 0:
            cut += 1
            logger.info(
                "cut %s %s %s:%d -> %s:%d",
                flow.family,
                flow.l4,
                flow.src,
                flow.sport,
                flow.dst,
                flow.dport,
            )
        else:
            # Usually the entry expired between listing and deleting.
            logger.debug("conntrack -D found nothing for %s: %s", flow, result.stderr.strip())
    return cut
