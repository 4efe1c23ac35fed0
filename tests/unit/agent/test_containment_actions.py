"""Agent containment actions on real processes and temp files (no root needed): the kill
identity check, quarantine refusals and tamper detection on restore, /etc/shadow parsing."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from agent.actions.errors import ActionFailed, ActionRefused
from agent.actions.kill import ProcessIdentity, boot_time_ns, identity_mismatch, kill_process
from agent.actions.kill import read_identity
from agent.actions.quarantine import Vault
from agent.actions.users import parse_shadow


def test_identity_mismatch_rules() -> None:
    found = ProcessIdentity(42, 1_000_000_000_000, "/usr/bin/sleep")
    assert identity_mismatch(ProcessIdentity(42, 1_000_000_000_000, "/usr/bin/sleep"),
                             found) == ""
    assert identity_mismatch(ProcessIdentity(42, 1_000_005_000_000, ""), found) == ""
    assert "reused" in identity_mismatch(ProcessIdentity(42, 1_000_020_000_000, ""), found)
    assert "reused" in identity_mismatch(ProcessIdentity(42, 0, "/usr/bin/bash"), found)
    assert "no start time" in identity_mismatch(ProcessIdentity(42, 0, ""), found)


def test_kill_refuses_wrong_identity_and_kills_right_one() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        me = read_identity(proc.pid, boot_time_ns())
        with pytest.raises(ActionRefused, match="reused"):
            kill_process(ProcessIdentity(proc.pid, me.start_time_ns - 10**9, me.exe), False)
        assert proc.poll() is None
        report = kill_process(ProcessIdentity(proc.pid, me.start_time_ns, me.exe), False)
        assert proc.wait(timeout=5) == -9
        assert report.exited == [proc.pid]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_refuses_itself_init_and_missing() -> None:
    with pytest.raises(ActionRefused):
        kill_process(ProcessIdentity(1, 1, "/sbin/init"), False)
    with pytest.raises(ActionRefused, match="agent itself"):
        kill_process(ProcessIdentity(os.getpid(), 1, "x"), False)
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ActionRefused, match="already exited"):
        kill_process(ProcessIdentity(proc.pid, 1, "/usr/bin/true"), False)


def test_quarantine_and_restore_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "evil.sh"
    target.write_bytes(b"#!/bin/sh\n")
    target.chmod(0o755)
    os.utime(target, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_002))
    vault = Vault(tmp_path / "state" / "quarantine")
    record = vault.quarantine(str(target), "cmd1", 1 << 20)
    assert not target.exists()
    blob = tmp_path / "state" / "quarantine" / f"{record.quarantine_id}.bin"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o400
    assert record.sha256 == hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    vault.restore(record.quarantine_id)
    assert target.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert target.stat().st_mtime_ns == 1_500_000_000_000_000_002
    with pytest.raises(ActionRefused, match="no quarantined file"):
        vault.restore(record.quarantine_id)


def test_quarantine_refusals(tmp_path: Path) -> None:
    vault = Vault(tmp_path / "q")
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ActionRefused, match="symbolic link"):
        vault.quarantine(str(tmp_path / "link"), "c", 100)
    with pytest.raises(ActionRefused, match="not a regular file"):
        vault.quarantine(str(tmp_path), "c", 100)
    with pytest.raises(ActionRefused, match="no such file"):
        vault.quarantine(str(tmp_path / "missing"), "c", 100)
    with pytest.raises(ActionRefused, match="cap"):
        vault.quarantine(str(tmp_path / "real"), "c", 0)
    with pytest.raises(ActionRefused, match="absolute"):
        vault.quarantine("relative", "c", 100)
    with pytest.raises(ActionRefused, match="not a quarantine id"):
        vault.restore("../../etc/passwd")
    assert (tmp_path / "real").read_bytes() == b"x"     # refusals changed nothing


def test_restore_detects_a_tampered_vault_copy(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"original")
    vault = Vault(tmp_path / "q")
    record = vault.quarantine(str(target), "c", 100)
    blob = tmp_path / "q" / f"{record.quarantine_id}.bin"
    blob.chmod(0o600)
    blob.write_bytes(b"tampered")
    with pytest.raises(ActionFailed, match="not restored"):
        vault.restore(record.quarantine_id)
    assert not target.exists()
    assert not list(tmp_path.glob(".ringfence-restore-*"))


def test_parse_shadow() -> None:
    text = "root:*:19000:0:99999:7:::\nbob:!$6$x$y:19000:0:99999:7::0:\n"
    entry = parse_shadow(text, "bob")
    assert (entry.password, entry.expire) == ("!$6$x$y", "0")
    assert parse_shadow(text, "root").expire == ""
    with pytest.raises(ActionRefused):
        parse_shadow(text, "alice")
