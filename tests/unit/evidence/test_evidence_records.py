"""Checkpoints, acquisition records and key files: sign/verify, strict parsing, file modes."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from evidence_testkit import AGENT_ID, acquisition, agent_key, other_key

from evidence.acquisition import verify_acquisition
from evidence.checkpoint import (
    Checkpoint,
    parse_checkpoint_payload,
    sign_checkpoint,
    verify_checkpoint,
)
from evidence.dsse import ACQUISITION_TYPE, CHECKPOINT_TYPE, sign_envelope
from evidence.errors import EvidenceIOError, FormatError, PayloadTypeError, SignatureError
from evidence.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
)

CP = Checkpoint(AGENT_ID, 7, bytes(range(32)), 123)


def test_checkpoint_roundtrip() -> None:
    assert verify_checkpoint(sign_checkpoint(CP, agent_key()), agent_key().public_key(),
                             AGENT_ID) == CP


def test_checkpoint_wrong_agent_key_and_id() -> None:
    env = sign_checkpoint(CP, other_key())
    with pytest.raises(SignatureError):
        verify_checkpoint(env, agent_key().public_key())
    with pytest.raises(FormatError, match="agent-0002"):
        verify_checkpoint(sign_checkpoint(CP, agent_key()), agent_key().public_key(),
                          "agent-0002")


def test_checkpoint_envelope_of_other_type_rejected() -> None:
    env = sign_envelope(ACQUISITION_TYPE, b"{}", agent_key())
    with pytest.raises(PayloadTypeError):
        verify_checkpoint(env, agent_key().public_key())


@pytest.mark.parametrize("mutation", [
    {"seq": 0}, {"seq": True}, {"head": "AB" * 32}, {"head": "ab"}, {"version": 2},
    {"type": "other"}, {"agent_id": ""}, {"extra": 1},
])
def test_checkpoint_payload_strict(mutation: dict[str, object]) -> None:
    obj = {"type": "ringfence.checkpoint", "version": 1, "agent_id": AGENT_ID, "seq": 1,
           "head": "ab" * 32, "time_ns": 5}
    parse_checkpoint_payload(json.dumps(obj).encode())  # the baseline parses
    obj.update(mutation)
    signed = sign_envelope(CHECKPOINT_TYPE, json.dumps(obj).encode(), agent_key())
    with pytest.raises(FormatError):
        verify_checkpoint(signed, agent_key().public_key())


def test_acquisition_roundtrip_with_non_utf8_path() -> None:
    rec = verify_acquisition(acquisition(b"data", path=b"/tmp/\xff\xfe"), agent_key().public_key(),
                             AGENT_ID)
    assert rec.path == b"/tmp/\xff\xfe" and rec.path_display == "/tmp/\\xff\\xfe"
    assert rec.size == 4


def test_acquisition_display_must_match_raw_path() -> None:
    payload = json.loads(base64.b64decode(json.loads(acquisition(b"data"))["payload"]))
    payload["path_display"] = "/etc/shadow"
    env = sign_envelope(ACQUISITION_TYPE, json.dumps(payload).encode(), agent_key())
    with pytest.raises(FormatError, match="path_display"):
        verify_acquisition(env, agent_key().public_key())


def test_private_key_file_is_0600_and_not_overwritten(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "agent.key"
    save_private_key(key, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    with pytest.raises(EvidenceIOError):
        save_private_key(generate_private_key(), path)
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())


def test_public_key_pem_and_raw_roundtrip(tmp_path: Path) -> None:
    pub = generate_private_key().public_key()
    save_public_key(pub, tmp_path / "k.pub")
    assert key_id(load_public_key(tmp_path / "k.pub")) == key_id(pub)
    assert key_id(public_key_from_bytes(public_key_bytes(pub))) == key_id(pub)
    with pytest.raises(FormatError):
        public_key_from_bytes(b"\x00" * 31)
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n")
    with pytest.raises(FormatError):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(FormatError):
        load_private_key(tmp_path / "k.pub")
