"""Test helpers for the evidence suite: a JSON event codec (no protobuf), fixed keys, and a
generator of honest agent chains with checkpoints. Not a test module itself."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evidence import _canonical
from evidence.acquisition import AcquisitionRecord, sign_acquisition
from evidence.bundle import EventInfo, TrustSet, build_bundle
from evidence.chain import GENESIS_HASH, link
from evidence.checkpoint import Checkpoint, sign_checkpoint
from evidence.dsse import MANIFEST_TYPE, sign_envelope
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

    def render(self, event_bytes: bytes) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Bundle surgery: rewrite members the way an attacker (or a compromised server) would.
# ---------------------------------------------------------------------------------------------



FRAME = struct.Struct(">QI")
FILE_CONTENT = b"#!/bin/sh\necho pwned\n"
CUSTODY = [{"time_ns": 1_700_000_000_000_000_000, "actor": "alice", "action": "requested",
            "reason": "IR-42 suspected intrusion"},
           {"time_ns": 1_700_000_000_000_000_001, "actor": "server", "action": "assembled"}]


def trust() -> TrustSet:
    return TrustSet.of([server_key().public_key()], [agent_key().public_key()])


def make_bundle(chain: AgentChain | None = None, **overrides: Any) -> bytes:
    chain = chain or honest_chain(40, every=10)
    sha = hashlib.sha256(FILE_CONTENT).hexdigest()
    kwargs: dict[str, Any] = {
        "case_id": "case-42", "host": {"agent_id": AGENT_ID, "hostname": "web-01"},
        "agent_key": agent_key().public_key(), "events": chain.events, "checkpoints": chain.checkpoints,
        "server_key": server_key(), "codec": JSONCodec(),
        "files": {sha: (FILE_CONTENT, acquisition(FILE_CONTENT))}, "custody": CUSTODY,
        "bundle_id": "bundle-0001", "created_ns": 1_700_000_000_500_000_000}
    kwargs.update(overrides)
    out = io.BytesIO()
    build_bundle(out, **kwargs)
    return out.getvalue()


def read_members(bundle: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(bundle)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def write_members(members: Iterable[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def replace(members: list[tuple[str, bytes]], name: str, data: bytes) -> list[tuple[str, bytes]]:
    assert any(n == name for n, _ in members), name
    return [(n, data if n == name else d) for n, d in members]


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while pos < len(data):
        seq, length = FRAME.unpack_from(data, pos)
        frames.append((seq, data[pos + 12:pos + 12 + length]))
        pos += 12 + length
    return frames


def frames_bytes(frames: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(FRAME.pack(seq, len(b)) + b for seq, b in frames)


def resign(members: list[tuple[str, bytes]],
           mutate: Callable[[dict[str, Any]], None] | None = None,
           key: Ed25519PrivateKey | None = None) -> list[tuple[str, bytes]]:
    """Recompute the manifest over the members as they now are, and sign it again: what a
    compromised server could do. Only agent signatures and pinned keys can catch it."""
    manifest = json.loads(dict(members)["manifest.json"])
    body = [(n, d) for n, d in members if n not in ("manifest.json", "manifest.dsse.json")]
    manifest["members"] = [{"name": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                           for n, d in body]
    if mutate is not None:
        mutate(manifest)
    raw = _canonical.dumps(manifest)
    return body + [("manifest.json", raw),
                   ("manifest.dsse.json", sign_envelope(MANIFEST_TYPE, raw, key or server_key()))]


class RenderFailsAt(JSONCodec):
    """A JSONCodec whose render() raises for one seq (module level: worker processes import it)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def render(self, event_bytes: bytes) -> dict[str, Any]:
        if json.loads(event_bytes)["seq"] == self.seq:
            raise ValueError("unrenderable")
        return super().render(event_bytes)
