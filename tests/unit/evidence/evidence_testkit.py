"""Test helpers for the evidence suite: a JSON event codec (no protobuf), fixed keys, and a
generator of honest agent chains with checkpoints. Not a test module itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evidence.acquisition import AcquisitionRecord, sign_acquisition
from evidence.bundle import EventInfo
from evidence.chain import GENESIS_HASH, link
from evidence.checkpoint import Checkpoint, sign_checkpoint
from evidence.keys import private_key_from_seed

AGENT_SEED = bytes(range(32))
SERVER_SEED = bytes(range(32, 64))
OTHER_SEED = bytes(range(64, 96))
AGENT_ID = "agent-0001"


def agent_key() -> Ed25519PrivateKey:
    return private_key_from_seed(AGENT_SEED)


def server_key() -> Ed25519PrivateKey:
    return private_key_from_seed(SERVER_SEED)


def other_key() -> Ed25519PrivateKey:
    return private_key_from_seed(OTHER_SEED)


def make_event(seq: int, agent_id: str = AGENT_ID, time_ns: int | None = None,
               gap: tuple[int, int] | None = None, note: str = "") -> bytes:
    body: dict[str, Any] = {"seq": seq, "agent_id": agent_id,
                            "time_ns": 1_700_000_000_000_000_000 + seq * 1000
                            if time_ns is None else time_ns,
                            "kind": "gap" if gap else "process", "note": note or f"event {seq}"}
    if gap is not None:
        body["gap"] = list(gap)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class JSONCodec:
    """EventCodec over JSON-encoded fake events (the server's codec would parse protobuf)."""

    def describe(self, event_bytes: bytes) -> EventInfo:
        obj = json.loads(event_bytes)
        gap = obj.get("gap")
        return EventInfo(obj["seq"], obj["agent_id"], obj["time_ns"],
                         (gap[0], gap[1]) if gap else None)

    def render(self, event_bytes: bytes) -> Mapping[str, Any]:
        obj = json.loads(event_bytes)
        return {"seq": obj["seq"], "time_ns": obj["time_ns"], "kind": obj["kind"],
                "note": obj["note"]}


@dataclass
class AgentChain:
    """An honest agent's chain: events, heads and signed checkpoints."""

    events: list[tuple[int, bytes]] = field(default_factory=list)
    heads: dict[int, bytes] = field(default_factory=dict)
    checkpoints: list[bytes] = field(default_factory=list)
    head: bytes = GENESIS_HASH

    def append(self, seq: int, event_bytes: bytes) -> None:
        self.head = link(self.head, event_bytes)
        self.heads[seq] = self.head
        self.events.append((seq, event_bytes))

    def checkpoint(self, key: Ed25519PrivateKey | None = None, agent_id: str = AGENT_ID) -> bytes:
        seq = self.events[-1][0]
        env = sign_checkpoint(Checkpoint(agent_id, seq, self.head, 1_700_000_000_000_000_000
                                         + seq * 1000 + 1), key or agent_key())
        self.checkpoints.append(env)
        return env


def honest_chain(n: int, every: int = 10, gap_at: int | None = None) -> AgentChain:
    """n events with seq 1..n (plus a dropped range before `gap_at` when given)."""
    chain = AgentChain()
    seq = 0
    for i in range(1, n + 1):
        if gap_at is not None and i == gap_at:
            first = seq + 1
            seq += 3  # three seqs dropped
            chain.append(seq + 1, make_event(seq + 1, gap=(first, seq)))
            seq += 1
        else:
            seq += 1
            chain.append(seq, make_event(seq))
        if i % every == 0 or i == n:
            chain.checkpoint()
    return chain


def acquisition(content: bytes, key: Ed25519PrivateKey | None = None,
                agent_id: str = AGENT_ID, path: bytes = b"/etc/passwd\xff") -> bytes:
    rec = AcquisitionRecord(agent_id=agent_id, command_id="cmd-1", path=path,
                            sha256=hashlib.sha256(content).hexdigest(), size=len(content),
                            mode=0o100644, uid=0, gid=0, mtime_ns=1, acquired_ns=2)
    return sign_acquisition(rec, key or agent_key())
