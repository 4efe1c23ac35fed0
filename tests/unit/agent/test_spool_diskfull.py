"""Spool on a real full filesystem: a 1 MiB tmpfs mounted for the test."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.spool import RecordKind, Spool, SpoolConfig, SpoolDiskFull, SpoolRecord

pytestmark = pytest.mark.root

NEVER = 3600.0
CFG = SpoolConfig(segment_bytes=64 << 10, fsync_interval_s=NEVER)


def rec(seq: int) -> SpoolRecord:
    return SpoolRecord(RecordKind.EVENT, seq, seq.to_bytes(32, "big"), bytes([seq % 251]) * 1000)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt / "spool"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(sp: Spool) -> tuple[int, int]:
    """Append until the disk refuses; flush every 10. Return (last flushed, last accepted)."""
    flushed = accepted = 0
    with pytest.raises(SpoolDiskFull) as ei:
        for seq in range(1, 100_000):
            sp.append(rec(seq))
            accepted = seq
            if seq % 10 == 0:
                sp.flush()
                flushed = seq
    assert ei.value.errno == errno.ENOSPC and ei.value.op == "write"
    assert flushed > 500  # most of the 1 MiB was used
    return flushed, accepted


def test_disk_full_is_typed_and_ack_frees_it_without_loss(tiny_fs: Path) -> None:
    sp = Spool(tiny_fs, CFG)
    try:
        flushed, accepted = fill(sp)
        durable = sp.read_durable(0, 1 << 30, 1 << 40)
        assert durable == [rec(s) for s in range(1, len(durable) + 1)]
        assert flushed <= len(durable) <= accepted
        # A flush cannot succeed yet, and says why.
        with pytest.raises(SpoolDiskFull):
            sp.flush()
        # The collector acks half: segments are deleted, space returns, the buffered records
        # that were accepted before the error get written.
        sp.ack(flushed // 2)
        sp.flush()
        assert sp.read_durable(flushed // 2, 1 << 30, 1 << 40) == [
            rec(s) for s in range(flushed // 2 + 1, accepted + 1)
        ]
        sp.append(rec(accepted + 1))
    finally:
        sp.close()
    with Spool(tiny_fs, CFG) as sp:
        assert sp.recovery.clean
        assert sp.acked_seq == flushed // 2
        assert sp.read_durable(sp.acked_seq, 1 << 30, 1 << 40) == [
            rec(s) for s in range(flushed // 2 + 1, accepted + 2)
        ]


def test_disk_full_at_close_keeps_everything_flushed(tiny_fs: Path) -> None:
    sp = Spool(tiny_fs, CFG)
    flushed, _accepted = fill(sp)
    with pytest.raises(SpoolDiskFull):
        sp.close()
    with Spool(tiny_fs, CFG) as sp:
        # No torn or corrupt bytes: the failed writes were cut back to whole frames.
        assert sp.recovery.clean
        got = sp.read_durable(0, 1 << 30, 1 << 40)
        assert len(got) >= flushed
        assert got == [rec(s) for s in range(1, len(got) + 1)]


def test_disk_full_while_acking_still_frees_space(tiny_fs: Path) -> None:
    sp = Spool(tiny_fs, CFG)
    try:
        flushed, _accepted = fill(sp)
        # Fill the last free bytes so that even the small marker file cannot be written.
        pad = tiny_fs / "pad"
        with open(pad, "wb", buffering=0) as f:
            with pytest.raises(OSError) as ei:
                while True:
                    f.write(b"\0" * 512)
            assert ei.value.errno == errno.ENOSPC
        sp.ack(flushed)
        assert sp.acked_seq == flushed
        assert sp.stats().bytes_used < 200 << 10  # only the newest one or two segments remain
        sp.flush()
    finally:
        sp.close()
    with Spool(tiny_fs, CFG) as sp:
        assert sp.acked_seq == flushed and sp.recovery.clean
