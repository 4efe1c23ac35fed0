"""Regenerate the golden vectors in this directory from the current code.

Running this is a FORMAT CHANGE: bundles signed years ago must still verify, so a diff in
these files needs a version bump and review, never a silent regeneration.
Usage: PYTHONPATH=. .venv/bin/python tests/unit/evidence/vectors/regenerate_evidence_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from evidence_testkit import AGENT_ID, AGENT_SEED, SERVER_SEED, agent_key, make_bundle, read_members

from evidence.chain import GENESIS_HASH, chain_head
from evidence.checkpoint import Checkpoint, checkpoint_payload, sign_checkpoint
from evidence.dsse import pae
from evidence.keys import key_id

CHAIN_EVENTS = [b"", b"\x00", b"ringfence", bytes(range(256)), b"\xff" * 300]
PAE_CASES = [("http://example.com/HelloWorld", b"hello world"),
             ("application/vnd.ringfence.checkpoint.v1+json", b"{}"),
             ("", b""), ("t\u00e9", b"\x00\x01")]


def main() -> None:
    heads, head = [], GENESIS_HASH
    for i in range(len(CHAIN_EVENTS)):
        head = chain_head(CHAIN_EVENTS[i:i + 1], head)
        heads.append(head.hex())
    write("chain.json", {"genesis": GENESIS_HASH.hex(),
                         "events_hex": [e.hex() for e in CHAIN_EVENTS], "heads_hex": heads})
    write("dsse_pae.json", [{"payload_type": t, "payload_hex": p.hex(), "pae_hex": pae(t, p).hex()}
                            for t, p in PAE_CASES])
    cp = Checkpoint(AGENT_ID, 1000, hashlib.sha256(b"head").digest(), 1_700_000_000_123_456_789)
    write("checkpoint.json", {
        "seed_hex": AGENT_SEED.hex(), "key_id": key_id(agent_key().public_key()),
        "checkpoint": {"agent_id": cp.agent_id, "seq": cp.seq, "head_hex": cp.head.hex(),
                       "time_ns": cp.time_ns},
        "payload": checkpoint_payload(cp).decode(), "envelope": sign_checkpoint(cp, agent_key()).decode()})
    members = dict(read_members(make_bundle()))
    write("manifest.json", {"server_seed_hex": SERVER_SEED.hex(),
                            "manifest": members["manifest.json"].decode(),
                            "envelope": members["manifest.dsse.json"].decode()})


def write(name: str, obj: object) -> None:
    (HERE / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
