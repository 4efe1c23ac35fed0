"""CommandGate: signed-command verification and replay protection, with real Ed25519 keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import (
    CLOCK_SKEW_NS,
    COMMAND_FORMAT,
    MAX_COMMAND_BYTES,
    CommandGate,
    CommandRejected,
)
from evidence.dsse import COMMAND_TYPE, MANIFEST_TYPE, sign_envelope
from evidence.keys import generate_private_key

AGENT = "agent-1"
NOW = 1_700_000_000 * 1_000_000_000
HOUR = 3600 * 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


def payload(seq: int, command_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": COMMAND_FORMAT, "command_id": command_id or f"cmd-{seq}", "agent_id": AGENT,
        "seq": seq, "action": "isolate", "params": {"reason": "r"}, "issued_ns": NOW,
        "expires_ns": NOW + HOUR}
    body.update(overrides)
    return body


def signed(body: dict[str, Any], key: Ed25519PrivateKey,
           payload_type: str = COMMAND_TYPE) -> bytes:
    return sign_envelope(payload_type, json.dumps(body, sort_keys=True).encode(), key)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_private_key()


def gate(tmp_path: Path, key: Ed25519PrivateKey, clock: Clock | None = None) -> CommandGate:
    return CommandGate(AGENT, key.public_key(), tmp_path / "commands.json", clock or Clock())


def run(g: CommandGate, envelope: bytes) -> None:
    """What the executor does with an accepted command: mark started, then done."""
    command = g.verify(envelope)
    g.mark_started(command)
    g.mark_done(command, "succeeded", "ok", "{}")


def rejected(g: CommandGate, envelope: bytes) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        g.verify(envelope)
    return info.value


def test_valid_command_is_returned(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    command = gate(tmp_path, key).verify(signed(payload(1), key))
    assert (command.command_id, command.agent_id, command.seq, command.action) == (
        "cmd-1", AGENT, 1, "isolate")
    assert command.params == {"reason": "r"}


def test_replay_of_an_executed_command_is_rejected(tmp_path: Path, key: Ed25519PrivateKey
                                                   ) -> None:
    g = gate(tmp_path, key)
    envelope = signed(payload(1), key)
    run(g, envelope)
    e = rejected(g, envelope)
    assert e.reason.startswith("replayed") and e.command_id == "cmd-1" and e.seq == 1
    prior = g.prior_result("cmd-1")
    assert prior is not None and prior.status == "succeeded"


def test_replay_is_rejected_after_an_agent_restart(tmp_path: Path, key: Ed25519PrivateKey
                                                   ) -> None:
    envelope = signed(payload(1), key)
    run(gate(tmp_path, key), envelope)
    restarted = gate(tmp_path, key)  # state persisted under the state dir
    assert restarted.last_seq == 1
    assert rejected(restarted, envelope).reason.startswith("replayed")


def test_started_but_unfinished_command_is_never_run_twice(tmp_path: Path,
                                                           key: Ed25519PrivateKey) -> None:
    g = gate(tmp_path, key)
    envelope = signed(payload(1), key)
    g.mark_started(g.verify(envelope))  # crash before it finished
    assert rejected(gate(tmp_path, key), envelope).reason.startswith("replayed")


def test_out_of_sequence_command_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    g = gate(tmp_path, key)
    run(g, signed(payload(5), key))
    for seq in (5, 4, 1):  # new ids, old or equal sequence numbers
        e = rejected(g, signed(payload(seq, command_id=f"new-{seq}"), key))
        assert e.reason.startswith("out of sequence") and e.seq == seq
    assert g.verify(signed(payload(6), key)).seq == 6


def test_expired_command_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = Clock()
    g = gate(tmp_path, key, clock)
    envelope = signed(payload(1), key)
    clock.now = NOW + HOUR  # exactly at expiry: expired
    assert rejected(g, envelope).reason == "expired"


def test_command_from_the_future_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    g = gate(tmp_path, key)
    body = payload(1, issued_ns=NOW + CLOCK_SKEW_NS + 1, expires_ns=NOW + 2 * HOUR)
    assert "future" in rejected(g, signed(body, key)).reason
    ok = payload(2, issued_ns=NOW + CLOCK_SKEW_NS, expires_ns=NOW + 2 * HOUR)
    assert g.verify(signed(ok, key)).seq == 2


def test_command_for_another_agent_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    e = rejected(gate(tmp_path, key), signed(payload(1, agent_id="agent-2"), key))
    assert e.reason == "addressed to another agent" and e.command_id == "cmd-1"


def test_wrong_key_is_rejected_before_parsing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    e = rejected(gate(tmp_path, key), signed(payload(1), generate_private_key()))
    assert e.reason.startswith("signature check failed")
    assert e.command_id == ""  # nothing from an unverified payload is trusted


def test_tampered_payload_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    envelope = json.loads(signed(payload(1), key))
    forged = signed(payload(1, action="release"), key)
    envelope["payload"] = json.loads(forged)["payload"]  # someone else's payload, our signature
    e = rejected(gate(tmp_path, key), json.dumps(envelope).encode())
    assert e.reason.startswith("signature check failed")


def test_wrong_payload_type_is_rejected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    e = rejected(gate(tmp_path, key), signed(payload(1), key, MANIFEST_TYPE))
    assert e.reason.startswith("signature check failed")


def test_oversized_and_malformed_commands_are_rejected(tmp_path: Path,
                                                       key: Ed25519PrivateKey) -> None:
    g = gate(tmp_path, key)
    big = payload(1, params={"reason": "x" * MAX_COMMAND_BYTES})
    assert rejected(g, signed(big, key)).reason.startswith("signature check failed")
    missing = payload(1)
    del missing["seq"]
    assert rejected(g, signed(missing, key)).reason.startswith("malformed command")
    other_format = payload(1, format="ringfence.command.v0")
    assert rejected(g, signed(other_format, key)).reason.startswith("malformed command")
    assert rejected(g, b"not an envelope").reason.startswith("signature check failed")
    assert g.last_seq == 0  # nothing was accepted along the way
