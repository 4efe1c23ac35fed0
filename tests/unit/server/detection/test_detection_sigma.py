"""Sigma rules: the shipped pack loads (counts and unsupported reasons asserted), the field
mapping, and the evaluator's modifiers against real pySigma parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto import ringfence_pb2 as pb
from server.detection import RuleError
from server.detection.fields import DNSCache, observe
from server.detection.sigma import (
    PACK_DIR,
    CompiledRule,
    RuleIndex,
    UnsupportedRule,
    facts_of,
    load_pack,
    load_yaml,
)

# Computed once from the pack and checked by reading every unsupported reason below: these
# rules really use data ringfence does not record.
EXPECTED_SUPPORTED = 131
EXPECTED_UNSUPPORTED = {
    "file_event_lnx_persistence_sudoers_files.yml": "Image: file events are not attributed",
    "file_event_lnx_wget_download_file_in_tmp_dir.yml": "Image: file events are not attributed",
    "proc_creation_lnx_omigod_scx_runasprovider_executescript.yml": "LogonId: the audit login",
    "proc_creation_lnx_omigod_scx_runasprovider_executeshellcommand.yml":
        "LogonId: the audit login",
}


def test_every_shipped_rule_loads_or_is_unsupported_with_a_reason() -> None:
    files = sorted(PACK_DIR.rglob("*.yml"))
    rules = load_pack()
    assert len(rules) == len(files) == EXPECTED_SUPPORTED + len(EXPECTED_UNSUPPORTED)
    supported = [r for r in rules if isinstance(r, CompiledRule)]
    unsupported = {Path(r.info.source).name: r.reason for r in rules
                   if isinstance(r, UnsupportedRule)}
    assert len(supported) == EXPECTED_SUPPORTED
    assert set(unsupported) == set(EXPECTED_UNSUPPORTED)
    for name, reason in unsupported.items():
        assert EXPECTED_UNSUPPORTED[name] in reason, (name, reason)
    # Attribution survives: every shipped rule names its author.
    assert all(r.info.author for r in rules)
    assert {r.info.category for r in supported} == {"process_creation", "file_event",
                                                    "network_connection"}
    assert (PACK_DIR / "LICENSE.md").is_file() and (PACK_DIR / "README.md").is_file()


def _process(exe: str, *argv: str, parent: str = "/usr/bin/bash", cwd: str = "/root",
             user: str = "root", parent_argv: tuple[str, ...] = ()) -> pb.Event:
    e = pb.Event(seq=1, time_ns=1, agent_id="a")
    e.process.activity_id = 1
    p = e.process.process
    p.exe, p.cwd, p.user, p.pid = exe.encode(), cwd.encode(), user, 100
    p.argv.extend(a.encode() for a in argv)
    e.process.parent_process.exe = parent.encode()
    e.process.parent_process.pid = 5
    e.process.parent_process.argv.extend(a.encode() for a in parent_argv)
    return e


@pytest.fixture(scope="module")
def index() -> RuleIndex:
    return RuleIndex([r for r in load_pack() if isinstance(r, CompiledRule)])


def _titles(index: RuleIndex, event: pb.Event, dns: DNSCache | None = None) -> set[str]:
    observed = observe(event, dns)
    assert observed is not None
    return {r.info.title for r in index.match(observed.category, facts_of(observed.record))}


@pytest.mark.parametrize("event,title", [
    (_process("/usr/bin/base64", "base64", "-d"), "Decode Base64 Encoded Text"),
    (_process("/usr/bin/cat", "cat", "/etc/sudoers"), "Access of Sudoers File Content"),
    (_process("/usr/bin/crontab", "crontab", "-l"), "Crontab Enumeration"),
    (_process("/dev/shm/payload", "/dev/shm/payload"),
     "Process Execution From Shared Memory Directory"),
])
def test_pack_rules_match_real_attack_commands(index: RuleIndex, event: pb.Event,
                                               title: str) -> None:
    assert title in _titles(index, event)


def test_ordinary_commands_match_nothing(index: RuleIndex) -> None:
    for event in (_process("/usr/bin/ls", "ls", "-la", "/tmp"),
                  _process("/usr/bin/gcc", "gcc", "-O2", "-o", "hello", "hello.c"),
                  _process("/usr/bin/python3", "python3", "-m", "pytest", "-q")):
        assert _titles(index, event) == set()


def test_network_rules_use_ports_cidr_and_dns_names(index: RuleIndex) -> None:
    def flow(ip: str, port: int, outbound: bool = True) -> pb.Event:
        e = pb.Event(seq=1, time_ns=1, agent_id="a")
        n = e.network
        n.activity_id, n.protocol, n.direction_id = 1, "tcp", 2 if outbound else 1
        n.dst_endpoint.ip, n.dst_endpoint.port = ip, port
        n.src_endpoint.ip, n.src_endpoint.port = "10.0.0.5", 40000
        return e
    callback = "Potentially Suspicious Malware Callback Communication - Linux"
    assert callback in _titles(index, flow("203.0.113.9", 4444))
    assert callback not in _titles(index, flow("10.1.2.3", 4444))        # filtered by cidr
    assert callback not in _titles(index, flow("203.0.113.9", 4444, outbound=False))
    dns = DNSCache()
    q = pb.Event(seq=2, time_ns=2, agent_id="a")
    q.dns.activity_id, q.dns.hostname = 2, "tunnel.eu.ngrok.com"
    q.dns.answers.append("198.51.100.7")
    observe(q, dns)
    titles = _titles(index, flow("198.51.100.7", 443), dns)
    assert any("Ngrok" in t for t in titles), titles


RULE = """
title: Test {name}
id: 0b7a6f5e-0000-4000-8000-{num:012d}
status: test
author: ringfence tests
logsource: {{category: process_creation, product: linux}}
detection:
{detection}
level: high
"""


def _one(detection: str, num: int = 1) -> CompiledRule:
    [rule] = load_yaml(RULE.format(name=num, num=num, detection=detection), "test")
    assert isinstance(rule, CompiledRule), rule
    return rule


def _matches(rule: CompiledRule, event: pb.Event) -> bool:
    observed = observe(event)
    assert observed is not None
    return rule.matches(facts_of(observed.record))


def test_modifiers() -> None:
    ev = _process("/tmp/x/Evil", "evil", "--Payload=ZWNobyBoaQ==", "-c", "AbC")
    cases = {
        "  s:\n    CommandLine|contains|all: ['--payload', 'abc']\n  condition: s": True,
        "  s:\n    CommandLine|contains|all: ['--payload', 'nope']\n  condition: s": False,
        "  s:\n    Image|startswith: '/TMP/'\n  condition: s": True,
        "  s:\n    Image|endswith|cased: '/evil'\n  condition: s": False,
        "  s:\n    Image|re: '^/tmp/[a-z]/E'\n  condition: s": True,
        "  s:\n    Image|re: '^/tmp/[a-z]/e'\n  condition: s": False,
        "  s:\n    Image|re|i: '^/tmp/[a-z]/e'\n  condition: s": True,
        "  s:\n    CommandLine|base64offset|contains: 'echo hi'\n  condition: s": True,
        "  s:\n    Image: '/tmp/?/evil'\n  condition: s": True,
        "  s:\n    ParentImage|exists: true\n  condition: s": True,
        "  s:\n    ParentCommandLine|exists: true\n  condition: s": False,
        "  s:\n    User: null\n  condition: s": False,
        "  s:\n    - 'payload='\n  condition: s": True,
        "  s:\n    Image|endswith: '/evil'\n  f:\n    User: root\n  condition: s and not f":
            False,
        "  s_1:\n    Image|endswith: '/nope'\n  s_2:\n    CommandLine|windash|contains: '/c'\n"
        "  condition: 1 of s_*": True,
    }
    for num, (detection, expected) in enumerate(cases.items(), start=1):
        assert _matches(_one(detection, num), ev) is expected, detection


def test_unmappable_field_and_bad_rules_are_explained() -> None:
    [rule] = load_yaml(RULE.format(name=1, num=1, detection=(
        "  s:\n    LogonId: 0\n    Image|endswith: '/x'\n  condition: s")), "t")
    assert isinstance(rule, UnsupportedRule)
    assert rule.unmapped_fields == ("LogonId",)
    [rule] = load_yaml(RULE.format(name=1, num=1, detection=(
        "  s:\n    Image|endswith: '%tools%'\n  condition: s")).replace(
        "process_creation", "driver_load"), "t")
    assert isinstance(rule, UnsupportedRule) and "driver_load" in rule.reason
    with pytest.raises(RuleError):
        load_yaml("title: x\ndetection: [1, 2", "t")
    with pytest.raises(RuleError):
        load_yaml("just: a mapping\n", "t")
