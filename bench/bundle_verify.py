"""Benchmark: build and offline-verify a bundle of N events (default 1,000,000) and compare
verification with a bare Python SHA-256 chain loop over the same bytes in the same run.

Prints one JSON object. Two event formats: "bench" is a tiny struct-based stand-in codec (no
protobuf); "proto" uses real ringfence.v1 Event bytes and the server's ProtoEventCodec (what
`ringfence bundle verify` runs). Each is verified three ways:
  full     every check, including events.jsonl regenerated from events.bin and compared,
           with the default rendering workers (see evidence.verify_bundle);
  full_in_process  the same with workers=1 (everything in this process);
  core     every check but the events.jsonl regeneration (unsafe_skip_rendering): signatures,
           member digests, framing, chain, checkpoint heads and seq/agent/gap binding;
  no_codec signatures, digests, framing, chain and checkpoints only (no binding).
Repeats interleave the floor with every variant (floor, full, ..., floor, ...), so
load from other processes hits them alike; each reported rate is the median of --repeat runs
and each ratio the median of the per-round ratios to that round's floor.
Usage: .venv/bin/python bench/bundle_verify.py [--events N] [--checkpoint-every K]
       [--codec bench|proto|both] [--repeat R]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evidence.bundle import EventCodec, EventInfo, TrustSet, build_bundle, verify_bundle
from evidence.chain import GENESIS_HASH, verify_chain
from evidence.checkpoint import Checkpoint, sign_checkpoint
from evidence.keys import private_key_from_seed

AGENT_ID = "bench-agent-000001"
# Fixed header: seq, time_ns, gap_first, gap_last, kind; then agent id and a body.
HEADER = struct.Struct(">QqQQB")
KINDS = ("process", "file", "network", "dns")
BASE_NS = 1_700_000_000_000_000_000


class BenchCodec:
    """Binary stand-in for the protobuf codec: same interface, realistic work per event."""

    _agent_len = len(AGENT_ID.encode())

    def describe(self, event_bytes: bytes) -> EventInfo:
        seq, time_ns, gap_first, gap_last, _ = HEADER.unpack_from(event_bytes)
        agent = event_bytes[HEADER.size:HEADER.size + self._agent_len].decode()
        return EventInfo(seq, agent, time_ns, (gap_first, gap_last) if gap_first else None)

    def render(self, event_bytes: bytes) -> dict[str, Any]:
        seq, time_ns, _, _, kind = HEADER.unpack_from(event_bytes)
        return {"seq": seq, "time_ns": time_ns, "kind": KINDS[kind]}


def make_events(n: int, size: int) -> list[bytes]:
    agent = AGENT_ID.encode()
    filler = os.urandom(4096)
    body_len = size - HEADER.size - len(agent)
    return [HEADER.pack(seq, BASE_NS + seq * 1000, 0, 0, seq % 4) + agent
            + filler[seq % 3000:seq % 3000 + body_len] for seq in range(1, n + 1)]


def make_proto_events(n: int) -> list[bytes]:
    """Realistic process events (~250 bytes) serialized once, as the agent does."""
    from proto import ringfence_pb2 as pb

    return [pb.Event(
        seq=seq, time_ns=BASE_NS + seq * 1000, agent_id=AGENT_ID, severity_id=1,
        process=pb.ProcessActivity(
            activity_id=1, source="netlink",
            process=pb.Process(pid=1000 + seq % 30000, ppid=1, uid=0, user="root", name="bash",
                               exe=b"/usr/bin/bash", argv=[b"bash", b"-c", b"echo %d" % seq],
                               cwd=b"/root", start_time_ns=BASE_NS, exe_sha256="ab" * 32),
            parent_process=pb.Process(pid=1, name="systemd", exe=b"/usr/lib/systemd/systemd")),
    ).SerializeToString(deterministic=True) for seq in range(1, n + 1)]


def timed(fn: Any) -> tuple[float, Any]:
    """Wall time of one run of fn() and its result."""
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def floor_loop(events: list[bytes]) -> bytes:
    head = GENESIS_HASH
    for b in events:
        head = hashlib.sha256(head + b).digest()
    return head


def run(kind: str, events: list[bytes], codec: EventCodec, every: int,
        repeat: int) -> dict[str, Any]:
    n = len(events)
    agent_key = private_key_from_seed(b"\x01" * 32)
    server_key = private_key_from_seed(b"\x02" * 32)

    floor_s, floor_head = timed(lambda: floor_loop(events))

    checkpoints, head = [], GENESIS_HASH
    for seq, b in enumerate(events, start=1):
        head = hashlib.sha256(head + b).digest()
        if seq % every == 0 or seq == n:
            checkpoints.append(sign_checkpoint(Checkpoint(AGENT_ID, seq, head, BASE_NS), agent_key))
    assert head == floor_head

    chain_s, last = timed(lambda: verify_chain(
        (seq, b, None) for seq, b in enumerate(events, start=1)))
    assert last == (n, floor_head)

    def stream() -> Iterator[tuple[int, bytes]]:
        return ((seq, b) for seq, b in enumerate(events, start=1))

    trust = TrustSet.of([server_key.public_key()], [agent_key.public_key()])
    floors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bundle.zip")
        variants: dict[str, Any] = {
            "full": lambda: verify_bundle(path, trust, codec),
            "full_in_process": lambda: verify_bundle(path, trust, codec, workers=1),
            "core": lambda: verify_bundle(path, trust, codec, unsafe_skip_rendering=True),
            "no_codec": lambda: verify_bundle(path, trust, None),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        build_s, _ = timed(lambda: build_bundle(
            path, case_id="bench", host={"agent_id": AGENT_ID, "hostname": "bench"},
            agent_key=agent_key.public_key(), events=stream(), checkpoints=checkpoints,
            server_key=server_key, codec=codec,
            custody=[{"time_ns": BASE_NS, "actor": "bench", "action": "requested"}]))
        bundle_bytes = os.path.getsize(path)
        for _ in range(repeat):
            floors.append(timed(lambda: floor_loop(events))[0])
            for name, fn in variants.items():
                seconds, verified = timed(fn)
                assert verified.event_count == n and all(c.ok for c in verified.report)
                times[name].append(seconds)

    def ratio(name: str) -> float:
        # Round k's variant against the floor measured just before it.
        return round(statistics.median(f / t for f, t in zip(floors, times[name])), 3)

    floor_rate = n / statistics.median(floors)
    out: dict[str, Any] = {
        "codec": kind,
        "event_bytes_avg": round(sum(map(len, events)) / n, 1),
        "checkpoints": len(checkpoints),
        "bundle_bytes": bundle_bytes,
        "build_events_per_s": round(n / build_s),
        "floor_bare_sha256_loop_events_per_s": round(floor_rate),
        "chain_verify_events_per_s": round(n / chain_s),
    }
    for name in variants:
        out[f"verify_{name}_events_per_s"] = round(n / statistics.median(times[name]))
    for name in variants:
        out[f"ratio_{name}_to_floor"] = ratio(name)
    out["ratio_chain_verify_to_floor"] = round(floor_s / chain_s, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--event-size", type=int, default=256, help="bench codec events only")
    parser.add_argument("--codec", choices=["bench", "proto", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    # The core variant logs its unsafe_skip_rendering warning on every run; keep stdout JSON.
    logging.getLogger("evidence.bundle").setLevel(logging.ERROR)
    n = args.events
    results = []
    if args.codec in ("bench", "both"):
        results.append(run("bench", make_events(n, args.event_size), BenchCodec(),
                           args.checkpoint_every, args.repeat))
    if args.codec in ("proto", "both"):
        from server.codec import ProtoEventCodec  # bench may import server; evidence may not

        results.append(run("proto", make_proto_events(n), ProtoEventCodec(),
                           args.checkpoint_every, args.repeat))
    print(json.dumps({
        "benchmark": "bundle_verify",
        "events": n,
        "repeat": args.repeat,
        "target_ratio": 0.5,
        "results": results,
        "notes": "full = every check incl. seq/agent/gap binding and events.jsonl "
                 "regenerated and compared, default rendering workers (usable CPUs: "
                 f"{len(os.sched_getaffinity(0))}); full_in_process = the same, workers=1; core = full minus the events.jsonl regeneration "
                 "(signatures, member digests, framing, chain, checkpoints, binding); "
                 "no_codec = core without binding; chain = evidence.chain.verify_chain alone; "
                 "floor = bare hashlib loop over the same bytes, measured before each round; "
                 "rates are medians of `repeat` rounds, ratios medians of per-round ratios",
    }, indent=2))


if __name__ == "__main__":
    main()
