"""Golden vectors: the byte formats agents, collectors and verifiers must agree on forever.
If one of these fails, the code drifted from a published format; do not regenerate casually
(see vectors/regenerate_evidence_vectors.py)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from evidence_testkit import agent_key, make_bundle, read_members, server_key

from evidence.chain import GENESIS_HASH, ChainVerifier
from evidence.checkpoint import Checkpoint, checkpoint_payload, sign_checkpoint, verify_checkpoint
from evidence.dsse import CHECKPOINT_TYPE, MANIFEST_TYPE, pae, verify_envelope
from evidence.keys import key_id

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def test_chain_heads() -> None:
    vec = load("chain.json")
    assert bytes.fromhex(vec["genesis"]) == GENESIS_HASH
    verifier, head = ChainVerifier(), GENESIS_HASH
    for seq, (event_hex, head_hex) in enumerate(zip(vec["events_hex"], vec["heads_hex"],
                                                    strict=True), start=1):
        event = bytes.fromhex(event_hex)
        assert verifier.feed(seq, event).hex() == head_hex
        head = hashlib.sha256(head + event).digest()  # independent recomputation
        assert head.hex() == head_hex


def test_dsse_pae() -> None:
    vec = load("dsse_pae.json")
    assert bytes.fromhex(vec[0]["pae_hex"]) == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    for case in vec:
        assert pae(case["payload_type"], bytes.fromhex(case["payload_hex"])).hex() == case["pae_hex"]


def test_checkpoint_payload_and_signature() -> None:
    vec = load("checkpoint.json")
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vec["seed_hex"]))
    assert key_id(key.public_key()) == vec["key_id"]
    fields = vec["checkpoint"]
    cp = Checkpoint(fields["agent_id"], fields["seq"], bytes.fromhex(fields["head_hex"]),
                    fields["time_ns"])
    assert checkpoint_payload(cp).decode() == vec["payload"]
    # Ed25519 is deterministic, so the whole envelope is a golden value.
    assert sign_checkpoint(cp, key).decode() == vec["envelope"]
    assert verify_checkpoint(vec["envelope"].encode(), key.public_key()) == cp
    envelope = json.loads(vec["envelope"])
    signature = base64.b64decode(envelope["signatures"][0]["sig"])
    key.public_key().verify(signature, pae(CHECKPOINT_TYPE, vec["payload"].encode()))


def test_bundle_manifest() -> None:
    vec = load("manifest.json")
    members = dict(read_members(make_bundle()))
    assert members["manifest.json"].decode() == vec["manifest"]
    assert members["manifest.dsse.json"].decode() == vec["envelope"]
    verified = verify_envelope(vec["envelope"].encode(), MANIFEST_TYPE,
                               [server_key().public_key()])
    manifest = json.loads(verified.payload)
    assert manifest["media_type"] == MANIFEST_TYPE and manifest["format_version"] == 1
    assert manifest["agent"]["key_id"] == key_id(agent_key().public_key())
    for member in manifest["members"]:
        data = members[member["name"]]
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (member["sha256"], member["size"])
