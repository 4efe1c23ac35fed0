"""Parsing canned `conntrack -L -o extended` output and deciding which flows to cut."""

from __future__ import annotations

import pytest

from isolation import CollectorEndpoint, ConntrackUnavailableError, Policy, plan
from isolation._run import Runner
from isolation.conntrack import Flow, cut_connections, is_allowed, parse_flows

CANNED = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=40000 dport=8443 \
src=198.18.0.1 dst=198.18.0.2 sport=8443 dport=40000 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.3 dst=198.18.0.2 sport=41000 dport=22 \
src=198.18.0.2 dst=198.18.0.3 sport=22 dport=41000 [ASSURED] mark=0 use=1
ipv6     10 tcp      6 300 ESTABLISHED src=2001:db8::2 dst=2001:db8::3 sport=42000 dport=4444 \
src=2001:db8::3 dst=2001:db8::2 sport=4444 dport=42000 [ASSURED] mark=0 use=1
ipv4     2 udp      17 29 src=127.0.0.1 dst=127.0.0.53 sport=5000 dport=53 \
src=127.0.0.53 dst=127.0.0.1 sport=53 dport=5000 mark=0 use=1
ipv4     2 icmp     1 29 src=198.18.0.2 dst=198.18.0.3 type=8 code=0 id=7 \
src=198.18.0.3 dst=198.18.0.2 type=0 code=0 id=7 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.
"""

RS = plan(Policy(collectors=(CollectorEndpoint("198.18.0.1", 8443),)))


def test_parse_takes_original_direction() -> None:
    flows = parse_flows(CANNED)
    assert len(flows) == 5
    assert flows[0] == Flow("ip", "tcp", "198.18.0.2", "198.18.0.1", 40000, 8443)
    assert flows[2].family == "ip6"
    assert flows[4] == Flow("ip", "icmp", "198.18.0.2", "198.18.0.3", 0, 0)


def test_only_allowed_flows_are_kept() -> None:
    verdicts = [is_allowed(f, RS) for f in parse_flows(CANNED)]
    assert verdicts == [True, False, False, True, False]


def test_collector_initiated_towards_us_is_not_allowed() -> None:
    # The collector's address is allowed only as a server on its port, not as a client.
    assert not is_allowed(Flow("ip", "tcp", "198.18.0.1", "198.18.0.2", 8443, 22), RS)


def test_missing_conntrack_is_loud() -> None:
    runner = Runner("conntrack", None)
    object.__setattr__(runner, "run", _missing)
    with pytest.raises(ConntrackUnavailableError, match="conntrack"):
        cut_connections(runner, RS)


def _missing(*argv: str, stdin: str | None = None, check: bool = True) -> object:
    from isolation.errors import CommandError

    raise CommandError(
        "conntrack not found", backend="conntrack", argv=argv, returncode=None, stderr=""
    )
