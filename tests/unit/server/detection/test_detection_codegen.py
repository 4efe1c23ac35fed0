"""The generated per-category matchers against the reference closures: exactly the same
matches, in the same order, for the pack's test events, the benchmark mix and randomized
events built from the rules' own needles (so that many of them match)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from sigma.conditions import ConditionFieldEqualsValueExpression
from sigma.types import SigmaString

from proto import ringfence_pb2 as pb
from server.detection.fields import RINGFENCE_FIELDS, DNSCache, observe
from server.detection.sigma import (
    CompiledRule,
    RuleIndex,
    facts_of,
    load_pack,
    load_yaml,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "bench"))
import detection as bench  # type: ignore[import-not-found]  # noqa: E402 - bench mix


@pytest.fixture(scope="module")
def index() -> RuleIndex:
    return RuleIndex([r for r in load_pack() if isinstance(r, CompiledRule)])


def _same(index: RuleIndex, category: str, record: dict[str, str | int]) -> list[str]:
    reference = [r.info.rule_id for r in index.match_reference(category, facts_of(record))]
    generated = [r.info.rule_id for r in index.match_generated(category, facts_of(record))]
    assert generated == reference, (category, record)
    return reference


def _needles(index: RuleIndex) -> dict[str, list[str]]:
    """The literal text of every string value the rules compare, by record field."""
    out: dict[str, set[str]] = {}

    def walk(node: object) -> None:
        if isinstance(node, ConditionFieldEqualsValueExpression):
            values = getattr(node.value, "values", [node.value])
            for v in values:
                if isinstance(v, SigmaString):
                    text = "".join(p for p in v.s if isinstance(p, str))
                    if text:
                        out.setdefault(node.field, set()).add(text)
        for a in getattr(node, "args", ()):
            walk(a)
    for rule in index.rules:
        for tree in rule.trees:
            walk(tree)
    return {k: sorted(v) for k, v in out.items()}


def _process(exe: str, *argv: str, parent: str = "/usr/bin/bash") -> pb.Event:
    e = pb.Event(seq=1, time_ns=1, agent_id="a")
    e.process.activity_id = 1
    p = e.process.process
    p.exe, p.cwd, p.user, p.pid = exe.encode(), b"/root", "root", 100
    p.argv.extend(a.encode() for a in argv)
    e.process.parent_process.exe, e.process.parent_process.pid = parent.encode(), 5
    return e


def test_pack_test_events_and_bench_mix(index: RuleIndex) -> None:
    events = [_process("/usr/bin/base64", "base64", "-d"),
              _process("/usr/bin/cat", "cat", "/etc/sudoers"),
              _process("/usr/bin/crontab", "crontab", "-l"),
              _process("/dev/shm/payload", "/dev/shm/payload"),
              _process("/usr/bin/ls", "ls", "-la", "/tmp"),
              _process("/usr/bin/python3", "python3", "-m", "pytest", "-q")]
    for ip, port, direction in (("203.0.113.9", 4444, 2), ("10.1.2.3", 4444, 2),
                                ("203.0.113.9", 4444, 1), ("198.51.100.7", 443, 2)):
        e = pb.Event(seq=1, time_ns=1, agent_id="a")
        n = e.network
        n.activity_id, n.protocol, n.direction_id = 1, "tcp", direction
        n.dst_endpoint.ip, n.dst_endpoint.port = ip, port
        n.src_endpoint.ip, n.src_endpoint.port = "10.0.0.5", 40000
        events.append(e)
    events += [pb.Event.FromString(b) for b in bench._events("a", 1, 3000)]
    dns = DNSCache()
    dns.learn("tunnel.eu.ngrok.com", ["198.51.100.7"])
    matched = 0
    for e in events:
        observed = observe(e, dns)
        assert observed is not None
        matched += bool(_same(index, observed.category, observed.record))
    assert matched >= 3000 // bench.ATTACK_EVERY + 4


def test_randomized_events_built_from_the_rules_needles(index: RuleIndex) -> None:
    rng = random.Random(20261128)
    needles = _needles(index)
    noise = ["/usr/bin/ls", " -la ", "/tmp/", "x", "", "A", "/", ".sh", " ", "root",
             "10.0.0.1", "8.8.8.8", "192.168.1.1", "4444", "443", "true", "false"]

    def text(field: str) -> str:
        parts = [rng.choice(needles.get(field, noise) if rng.random() < 0.7 else noise)
                 for _ in range(rng.randint(1, 4))]
        out = (" " if rng.random() < 0.5 else "").join(parts)
        return out.upper() if rng.random() < 0.2 else out
    categories = sorted({r.info.category for r in index.rules})
    matched = 0
    for _ in range(20_000):
        category = rng.choice(categories)
        record: dict[str, str | int] = {}
        for field in sorted(RINGFENCE_FIELDS[category]):
            if rng.random() < 0.75:
                record[field] = text(field)
        matched += bool(_same(index, category, record))
    assert matched > 1000, matched


def test_every_modifier_rule_matches_the_same(index: RuleIndex) -> None:
    detections = [
        "  s:\n    CommandLine|contains|all: ['--payload', 'abc']\n  condition: s",
        "  s:\n    Image|endswith|cased: '/Evil'\n  condition: s",
        "  s:\n    Image|re: '^/tmp/[a-z]/E'\n  condition: s",
        "  s:\n    Image|re|i: '^/tmp/[a-z]/e'\n  condition: s",
        "  s:\n    CommandLine|base64offset|contains: 'echo hi'\n  condition: s",
        "  s:\n    Image: '/tmp/?/evil'\n  condition: s",
        "  s:\n    ParentImage|exists: true\n  condition: s",
        "  s:\n    ParentCommandLine|exists: false\n  condition: s",
        "  s:\n    User: null\n  condition: s",
        "  s:\n    - 'payload='\n  condition: s",
        "  s:\n    CommandLine|fieldref|contains: Image\n  condition: s",
        "  s:\n    ProcessId|gt: 50\n  condition: s",
        "  s:\n    Image|endswith: '/evil'\n  f:\n    User: root\n  condition: s and not f",
        "  s_1:\n    Image|endswith: '/nope'\n  s_2:\n    CommandLine|windash|contains: '/c'\n"
        "  condition: 1 of s_*",
    ]
    rules = []
    for num, detection in enumerate(detections, start=1):
        [rule] = load_yaml(RULE.format(num=num, detection=detection), "test")
        assert isinstance(rule, CompiledRule), (detection, rule)
        rules.append(rule)
    custom = RuleIndex(rules)
    events = [_process("/tmp/x/Evil", "/tmp/x/evil", "--Payload=ZWNobyBoaQ==", "-c", "AbC"),
              _process("/tmp/x/evil", "evil", "/c"), _process("/usr/bin/nope", "nope")]
    seen = set()
    for e in events:
        observed = observe(e)
        assert observed is not None
        seen.update(_same(custom, observed.category, observed.record))
    assert len(seen) >= len(rules) - 2, seen


RULE = """
title: Test {num}
id: 0b7a6f5e-0000-4000-8000-{num:012d}
status: test
author: ringfence tests
logsource: {{category: process_creation, product: linux}}
detection:
{detection}
level: high
"""


@pytest.mark.parametrize("seed", range(3))
def test_eager_launch_fields_equal_the_lazy_ones(seed: int) -> None:
    """event_fields computes a launch's common fields at once; each must be what the lazy
    extractor of the same field gives (parents present or not, empty and non-UTF-8 values)."""
    from server.detection.fields import _PROCESS, event_fields

    rng = random.Random(seed)
    words = [b"", b"bash", b"-c", b"caf\xc3\xa9", b"\xff\xfe", b"/tmp/x y", b"\xc3", b"\xa9z",
             b"\xe2\x82", b"\xac"]
    for i in range(300):
        e = pb.Event(seq=i + 1)
        a = e.process
        a.activity_id = 1
        a.process.exe = rng.choice([b"", b"/usr/bin/curl", b"/tmp/\xff"])
        a.process.argv.extend(rng.choice(words) for _ in range(rng.randrange(4)))
        a.process.user = rng.choice(["", "root", "deploy"])
        a.process.exe_sha256 = rng.choice(["", "ab" * 32])
        if rng.random() < 0.7:
            a.parent_process.pid = rng.choice([0, 42])
            a.parent_process.exe = rng.choice([b"", b"/usr/bin/bash"])
            a.parent_process.argv.extend(rng.choice(words) for _ in range(rng.randrange(3)))
        found = event_fields(e)
        assert found is not None and found.category == "process_creation"
        for name, extract in _PROCESS.items():
            assert found.raw[name] == extract(a), (name, e)
