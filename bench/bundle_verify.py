"""Benchmark: build and offline-verify a bundle of N events (default 1,000,000) and compare
verification with a bare Python SHA-256 chain loop over the same bytes in the same run.

Prints one JSON object. Uses a tiny inline struct-based codec, so no protobuf is needed.
Usage: .venv/bin/python bench/bundle_verify.py [--events N] [--checkpoint-every K]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evidence.bundle import EventInfo, TrustSet, build_bundle, verify_bundle
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


def floor_loop(events: list[bytes]) -> bytes:
    head = GENESIS_HASH
    for b in events:
        head = hashlib.sha256(head + b).digest()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--event-size", type=int, default=256)
    args = parser.parse_args()
    n = args.events

    agent_key = private_key_from_seed(b"\x01" * 32)
    server_key = private_key_from_seed(b"\x02" * 32)
    events = make_events(n, args.event_size)

    t = time.perf_counter()
    floor_head = floor_loop(events)
    floor_s = time.perf_counter() - t

    checkpoints, head = [], GENESIS_HASH
    for seq, b in enumerate(events, start=1):
        head = hashlib.sha256(head + b).digest()
        if seq % args.checkpoint_every == 0 or seq == n:
            checkpoints.append(sign_checkpoint(Checkpoint(AGENT_ID, seq, head, BASE_NS), agent_key))
    assert head == floor_head

    t = time.perf_counter()
    last = verify_chain((seq, b, None) for seq, b in enumerate(events, start=1))
    chain_s = time.perf_counter() - t
    assert last == (n, floor_head)

    def stream() -> Iterator[tuple[int, bytes]]:
        return ((seq, b) for seq, b in enumerate(events, start=1))

    codec = BenchCodec()
    trust = TrustSet.of([server_key.public_key()], [agent_key.public_key()])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bundle.zip")
        t = time.perf_counter()
        build_bundle(path, case_id="bench", host={"agent_id": AGENT_ID, "hostname": "bench"},
                     agent_key=agent_key.public_key(), events=stream(), checkpoints=checkpoints,
                     server_key=server_key, codec=codec,
                     custody=[{"time_ns": BASE_NS, "actor": "bench", "action": "requested"}])
        build_s = time.perf_counter() - t
        bundle_bytes = os.path.getsize(path)
        t = time.perf_counter()
        verified = verify_bundle(path, trust, codec)
        verify_s = time.perf_counter() - t
        t = time.perf_counter()
        verify_bundle(path, trust, None)
        verify_nocodec_s = time.perf_counter() - t
    assert verified.event_count == n

    floor_rate = n / floor_s
    verify_rate = n / verify_s
    print(json.dumps({
        "benchmark": "bundle_verify",
        "events": n,
        "event_bytes": args.event_size,
        "checkpoints": len(checkpoints),
        "bundle_bytes": bundle_bytes,
        "build_events_per_s": round(n / build_s),
        "verify_events_per_s": round(verify_rate),
        "verify_no_codec_events_per_s": round(n / verify_nocodec_s),
        "chain_verify_events_per_s": round(n / chain_s),
        "floor_bare_sha256_loop_events_per_s": round(floor_rate),
        "ratio_verify_to_floor": round(verify_rate / floor_rate, 3),
        "ratio_verify_no_codec_to_floor": round(n / verify_nocodec_s / floor_rate, 3),
        "ratio_chain_verify_to_floor": round(n / chain_s / floor_rate, 3),
        "target_ratio": 0.5,
        "notes": "verify = full offline verification incl. codec describe/render of every "
                 "event and events.jsonl regeneration; no_codec skips the codec; chain = "
                 "evidence.chain.verify_chain alone; floor = bare hashlib loop, same bytes",
    }, indent=2))


if __name__ == "__main__":
    main()
