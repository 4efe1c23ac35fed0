"""Spool recovery: flipped bits, truncated tails, garbage, a damaged marker, and real SIGKILLs."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.spool import HEADER_BYTES, RecordKind, Spool, SpoolConfig, SpoolRecord

NEVER = 3600.0
REPO = Path(__file__).resolve().parents[3]
DATA = 100
FRAME = HEADER_BYTES + DATA


def chain(n: int) -> list[SpoolRecord]:
    out, head = [], bytes(32)
    for seq in range(1, n + 1):
        data = bytes([seq % 256]) * DATA
        head = hashlib.sha256(head + data).digest()
        out.append(SpoolRecord(RecordKind.EVENT, seq, head, data))
    return out


def write_spool(d: Path, n: int = 10, segment_bytes: int = 1 << 20) -> list[SpoolRecord]:
    recs = chain(n)
    with Spool(d, SpoolConfig(segment_bytes=segment_bytes, fsync_interval_s=NEVER)) as sp:
        for r in recs:
            sp.append(r)
    return recs


def only_segment(d: Path) -> Path:
    (seg,) = d.glob("*.seg")
    return seg


def flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def read_all(sp: Spool) -> list[SpoolRecord]:
    return sp.read_durable(0, 1 << 30, 1 << 40)


def test_clean_reopen_reports_nothing(tmp_path: Path) -> None:
    recs = write_spool(tmp_path)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.clean and rep.records_intact == 10 and rep.segments_scanned == 1
        assert read_all(sp) == recs


@pytest.mark.parametrize("index", [0, 4, 9])
def test_flipped_data_bit_skips_exactly_that_record(tmp_path: Path, index: int) -> None:
    recs = write_spool(tmp_path)
    flip(only_segment(tmp_path), index * FRAME + HEADER_BYTES + 17, bit=3)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.corrupt_skipped == 1 and rep.records_intact == 9
        assert rep.torn_bytes_truncated == 0 and rep.torn_tails == 0
        (span,) = rep.corrupt
        assert span.seq == index + 1 and span.offset == index * FRAME and span.length == FRAME
        assert read_all(sp) == recs[:index] + recs[index + 1 :]
        assert sp.stats().corrupt_skipped == 1
        assert sp.last_seq == 10


# Header offsets: magic, version, kind, flags, seq, chain hash, length (low and high byte), crc.
@pytest.mark.parametrize(
    ("offset", "bit"),
    [(0, 0), (4, 1), (5, 2), (6, 4), (8, 0), (20, 5), (48, 0), (51, 7), (53, 6)],
)
def test_flipped_header_bit_skips_exactly_that_record(
    tmp_path: Path, offset: int, bit: int
) -> None:
    recs = write_spool(tmp_path)
    flip(only_segment(tmp_path), 4 * FRAME + offset, bit)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.corrupt_skipped == 1 and rep.records_intact == 9 and rep.torn_tails == 0
        assert rep.corrupt[0].offset == 4 * FRAME and rep.corrupt[0].length == FRAME
        assert read_all(sp) == recs[:4] + recs[5:]


@pytest.mark.parametrize("cut", [1, 30, FRAME - HEADER_BYTES, FRAME - 10, FRAME - 1])
def test_truncated_tail_is_cut_and_counted(tmp_path: Path, cut: int) -> None:
    recs = write_spool(tmp_path)
    seg = only_segment(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - cut)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.torn_tails == 1 and rep.torn_bytes_truncated == FRAME - cut
        assert rep.corrupt_skipped == 0 and rep.records_intact == 9
        assert seg.stat().st_size == 9 * FRAME
        assert read_all(sp) == recs[:9]
        assert sp.last_event == (9, recs[8].chain_hash)
        # Once the torn frame's magic survives, its seq counts as used: skipping beats reusing.
        assert sp.last_seq == (10 if FRAME - cut >= 4 else 9)
        nxt = SpoolRecord(RecordKind.EVENT, sp.last_seq + 1, bytes(32), b"next")
        sp.append(nxt)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        assert sp.recovery.clean
        assert read_all(sp) == recs[:9] + [nxt]


@pytest.mark.parametrize(("bit", "expected_last"), [(0, 11), (1, 8), (7 + 8 * 5, 10)])
def test_damaged_last_frame_seq_is_never_reused(
    tmp_path: Path, bit: int, expected_last: int
) -> None:
    """The last frame (seq 10) is complete but its seq field took a bit flip."""
    write_spool(tmp_path)
    flip(only_segment(tmp_path), 9 * FRAME + 8 + bit // 8, bit % 8)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        assert sp.recovery.corrupt_skipped == 1 and sp.recovery.records_intact == 9
        # 11: believed (close); 8 is below the intact seq 9 and 2**45 + 10 is absurd: both
        # fall back to "the intact seq plus one".
        assert sp.last_seq == max(expected_last, 10)


def test_garbage_between_records_is_one_corrupt_span(tmp_path: Path) -> None:
    recs = write_spool(tmp_path)
    seg = only_segment(tmp_path)
    raw = seg.read_bytes()
    junk = b"RFSr" + random.Random(1).randbytes(33)  # even a fake magic does not fool the scan
    seg.write_bytes(raw[: 3 * FRAME] + junk + raw[3 * FRAME :])
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.corrupt_skipped == 1 and rep.records_intact == 10
        assert rep.corrupt[0].length == len(junk) and rep.corrupt[0].seq is None
        assert read_all(sp) == recs


def test_damage_in_one_segment_does_not_stop_the_scan(tmp_path: Path) -> None:
    recs = write_spool(tmp_path, n=30, segment_bytes=5 * FRAME)
    segs = sorted(tmp_path.glob("*.seg"))
    assert len(segs) == 6
    flip(segs[1], FRAME + HEADER_BYTES)  # seq 7
    os.truncate(segs[-1], 5 * FRAME - 7)  # torn tail: seq 30
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        rep = sp.recovery
        assert rep.segments_scanned == 6 and rep.records_intact == 28
        assert rep.corrupt_skipped == 1 and rep.corrupt[0].seq == 7
        assert rep.corrupt[0].segment == segs[1].name
        assert rep.torn_tails == 1 and rep.torn_bytes_truncated == FRAME - 7
        assert read_all(sp) == recs[:6] + recs[7:29]


def test_damaged_ack_marker_resends_rather_than_loses(tmp_path: Path) -> None:
    recs = write_spool(tmp_path, n=20, segment_bytes=5 * FRAME)
    with Spool(tmp_path, SpoolConfig(segment_bytes=5 * FRAME, fsync_interval_s=NEVER)) as sp:
        sp.ack(7)
    flip(tmp_path / "acked.bin", 9)
    with Spool(tmp_path, SpoolConfig(segment_bytes=5 * FRAME, fsync_interval_s=NEVER)) as sp:
        assert sp.recovery.marker_damaged and not sp.recovery.clean
        assert sp.acked_seq == 0
        assert read_all(sp) == recs[5:]  # segment 1..5 was deleted by the ack


def test_damage_after_open_is_skipped_once_at_read(tmp_path: Path) -> None:
    recs = write_spool(tmp_path)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        flip(only_segment(tmp_path), 2 * FRAME + HEADER_BYTES + 1)
        assert read_all(sp) == recs[:2] + recs[3:]
        assert read_all(sp) == recs[:2] + recs[3:]
        assert sp.stats().corrupt_skipped == 1


CHILD = r"""
import hashlib, sys
from pathlib import Path
from agent.spool import RecordKind, Spool, SpoolConfig, SpoolRecord

def payload(seq):
    return seq.to_bytes(8, "big") * (seq * 7 % 40 + 1)

sp = Spool(Path(sys.argv[1]), SpoolConfig(segment_bytes=8192, fsync_interval_s=0.02))
ev = sp.last_event
seq, head = sp.last_seq, (ev[1] if ev else bytes(32))
print("R", seq, flush=True)
while True:
    seq += 1
    data = payload(seq)
    head = hashlib.sha256(head + data).digest()
    sp.append(SpoolRecord(RecordKind.EVENT, seq, head, data))
    if seq % 97 == 0:
        sp.append(SpoolRecord(RecordKind.CHECKPOINT, seq, head, b"ckpt", True))
    if seq % 50 == 0:
        sp.flush()
        print("D", seq, flush=True)
    if seq % 300 == 0:
        sp.ack(seq - 100)
"""


def payload(seq: int) -> bytes:
    return seq.to_bytes(8, "big") * (seq * 7 % 40 + 1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_append_always_recovers_contiguously(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prev_last_event: tuple[int, bytes] | None = None
    durable_claims = 0
    for _round in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert child.stdout is not None
        ready = child.stdout.readline().split()
        assert ready and ready[0] == "R", child.stderr.read() if child.stderr else ""
        assert int(ready[1]) >= (prev_last_event[0] if prev_last_event else 0)
        time.sleep(rng.uniform(0.01, 0.2))
        child.send_signal(signal.SIGKILL)
        out, _err = child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL
        flushed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("D ")]
        max_flushed = max(flushed, default=0)
        durable_claims += len(flushed)

        with Spool(tmp_path, SpoolConfig(segment_bytes=8192, fsync_interval_s=NEVER)) as sp:
            rep = sp.recovery
            assert rep.corrupt_skipped == 0 and not rep.marker_damaged
            assert sp.last_seq >= max_flushed  # whatever flush() promised is there
            recs = sp.read_durable(sp.acked_seq, 1 << 30, 1 << 40)
            events = [r for r in recs if r.kind is RecordKind.EVENT]
            assert sp.last_event is not None
            last_ev = sp.last_event[0]
            assert [r.seq for r in events] == list(range(sp.acked_seq + 1, last_ev + 1))
            # At most one seq (a torn frame's) is skipped, never reused.
            assert last_ev <= sp.last_seq <= last_ev + 1
            assert rep.torn_tails <= 1
            for r in recs:
                if r.kind is RecordKind.CHECKPOINT:
                    assert r.seq % 97 == 0 and r.data == b"ckpt"
            for a, b in itertools.pairwise(events):
                assert b.data == payload(b.seq)
                assert b.chain_hash == hashlib.sha256(a.chain_hash + b.data).digest()
            if events:
                assert sp.last_event == (events[-1].seq, events[-1].chain_hash)
            assert sp.last_event is not None
            if prev_last_event is not None:
                assert sp.last_event[0] >= prev_last_event[0]
            prev_last_event = sp.last_event
    assert durable_claims > 0
