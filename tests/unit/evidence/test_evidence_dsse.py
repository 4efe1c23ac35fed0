"""DSSE v1: PAE per the spec, signing, and every way verification must fail closed."""

from __future__ import annotations

import base64
import json

import pytest
from evidence_testkit import agent_key, other_key, server_key

from evidence.dsse import (
    CHECKPOINT_TYPE,
    MANIFEST_TYPE,
    pae,
    sign_envelope,
    verify_envelope,
)
from evidence.errors import FormatError, PayloadTypeError, SignatureError, TrustError
from evidence.keys import key_id

PAYLOAD = b'{"hello":"world"}'


def env(payload: bytes = PAYLOAD, ptype: str = CHECKPOINT_TYPE) -> bytes:
    return sign_envelope(ptype, payload, agent_key())


def edit(envelope: bytes, **changes: object) -> bytes:
    obj = json.loads(envelope)
    obj.update(changes)
    return json.dumps(obj).encode()


def test_pae_matches_spec_example() -> None:
    # protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")


def test_pae_counts_utf8_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"") == b"DSSEv1 3 t\xc3\xa9 0 "


def test_roundtrip_returns_payload_and_keyid() -> None:
    v = verify_envelope(env(), CHECKPOINT_TYPE, [agent_key().public_key()])
    assert v.payload == PAYLOAD and v.payload_type == CHECKPOINT_TYPE
    assert v.keyid == key_id(agent_key().public_key())
    assert json.loads(env())["signatures"][0]["keyid"] == v.keyid


def test_mapping_trust_uses_recomputed_key_ids() -> None:
    v = verify_envelope(env(), CHECKPOINT_TYPE, {"label": agent_key().public_key()})
    assert v.keyid == key_id(agent_key().public_key())


def test_untrusted_key() -> None:
    with pytest.raises(SignatureError, match="untrusted") as info:
        verify_envelope(env(), CHECKPOINT_TYPE, [server_key().public_key()])
    assert info.value.keyid == key_id(agent_key().public_key())


def test_wrong_key_claiming_trusted_keyid() -> None:
    forged = sign_envelope(CHECKPOINT_TYPE, PAYLOAD, other_key())
    sig = json.loads(forged)["signatures"][0]["sig"]
    lying = edit(forged, signatures=[{"keyid": key_id(agent_key().public_key()), "sig": sig}])
    with pytest.raises(SignatureError, match="invalid signature"):
        verify_envelope(lying, CHECKPOINT_TYPE, [agent_key().public_key()])


def test_signature_without_keyid_tries_trusted_keys() -> None:
    sig = json.loads(env())["signatures"][0]["sig"]
    anon = edit(env(), signatures=[{"sig": sig}])
    assert verify_envelope(anon, CHECKPOINT_TYPE, [server_key().public_key(),
                                                    agent_key().public_key()]).payload == PAYLOAD


def test_empty_trust_set_fails_closed() -> None:
    with pytest.raises(TrustError):
        verify_envelope(env(), CHECKPOINT_TYPE, [])
    with pytest.raises(TrustError):
        verify_envelope(env(), CHECKPOINT_TYPE, {})


def test_zero_signatures_fail_closed() -> None:
    with pytest.raises(SignatureError, match="no signatures"):
        verify_envelope(edit(env(), signatures=[]), CHECKPOINT_TYPE, [agent_key().public_key()])


def test_wrong_payload_type_checked_after_signature() -> None:
    with pytest.raises(PayloadTypeError) as info:
        verify_envelope(env(), MANIFEST_TYPE, [agent_key().public_key()])
    assert info.value.actual == CHECKPOINT_TYPE
    # A type edit breaks the signature first: PAE covers the type.
    with pytest.raises(SignatureError):
        verify_envelope(edit(env(), payloadType=MANIFEST_TYPE), MANIFEST_TYPE,
                        [agent_key().public_key()])


def test_tampered_payload() -> None:
    tampered = edit(env(), payload=base64.b64encode(b'{"hello":"World"}').decode())
    with pytest.raises(SignatureError, match="invalid signature"):
        verify_envelope(tampered, CHECKPOINT_TYPE, [agent_key().public_key()])


def test_oversized_envelope() -> None:
    big = env(b"x" * 2000)
    with pytest.raises(FormatError, match="limit"):
        verify_envelope(big, CHECKPOINT_TYPE, [agent_key().public_key()], max_size=1000)


@pytest.mark.parametrize("bad", [
    b"not json", b"[]", b'{"payload":"AA==","payloadType":"x"}',
    b'{"payload":"AA==","payloadType":"x","signatures":[],"extra":1}',
    b'{"payload":"!!!","payloadType":"x","signatures":[{"sig":"AA=="}]}',
    b'{"payload":"AA==","payloadType":1,"signatures":[{"sig":"AA=="}]}',
    b'{"payload":"AA==","payloadType":"x","signatures":[{"sig":"A"}]}',
    b'{"payload":"AA==","payloadType":"x","signatures":["AA=="]}',
    b'{"payload":"AA==","payload":"AA==","payloadType":"x","signatures":[{"sig":"AA=="}]}',
    b'\xff\xfe',
])
def test_malformed_envelopes(bad: bytes) -> None:
    with pytest.raises(FormatError):
        verify_envelope(bad, CHECKPOINT_TYPE, [agent_key().public_key()])
