"""Spool basics: append, durability boundary, rotation, ack, reopen, bound and read batching."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from agent.spool import (
    HEADER_BYTES,
    RecordKind,
    Spool,
    SpoolClosed,
    SpoolConfig,
    SpoolFull,
    SpoolRecord,
    SpoolRecordError,
)

# No background flush during a test unless the test asks for it.
NEVER = 3600.0


def chain(n: int, start: int = 1, size: int = 100, head: bytes = bytes(32)) -> list[SpoolRecord]:
    out = []
    for seq in range(start, start + n):
        data = seq.to_bytes(8, "big") * (size // 8) + b"e" * (size % 8)
        head = hashlib.sha256(head + data).digest()
        out.append(SpoolRecord(RecordKind.EVENT, seq, head, data))
    return out


def checkpoint(ev: SpoolRecord, priority: bool = True) -> SpoolRecord:
    return SpoolRecord(RecordKind.CHECKPOINT, ev.seq, ev.chain_hash, b"ckpt-%d" % ev.seq, priority)


def read_all(sp: Spool, after: int = 0) -> list[SpoolRecord]:
    return sp.read_durable(after, 1 << 30, 1 << 40)


def segment_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.seg"))


def test_roundtrip_rotation_ack_and_deletion(tmp_path: Path) -> None:
    cfg = SpoolConfig(segment_bytes=4096, fsync_interval_s=NEVER)
    recs = chain(200)
    with Spool(tmp_path, cfg) as sp:
        for r in recs:
            sp.append(r)
            if r.seq % 50 == 0:
                sp.append(checkpoint(r))
        sp.flush()
        got = read_all(sp)
        expected = []
        for r in recs:
            expected.append(r)
            if r.seq % 50 == 0:
                expected.append(checkpoint(r))
        assert got == expected
        files = segment_files(tmp_path)
        assert len(files) == sp.stats().segments > 5
        # Names are the first seq in each segment, in order.
        firsts = [int(f[:20]) for f in files]
        assert firsts[0] == 1 and firsts == sorted(firsts)

        sp.ack(120)
        assert sp.acked_seq == 120
        left = segment_files(tmp_path)
        assert len(left) < len(files)
        # Every deleted segment held only seqs <= 120; the oldest kept one holds seq 121.
        kept_first = int(left[0][:20])
        assert kept_first <= 121
        later_firsts = [f for f in firsts if f > kept_first]
        assert later_firsts == [int(f[:20]) for f in left[1:]]
        assert read_all(sp, 120) == [r for r in expected if r.seq > 120]
        st = sp.stats()
        assert st.pending_records == len([r for r in expected if r.seq > 120])
        assert st.records >= st.pending_records
        assert st.bytes_used == sum((tmp_path / f).stat().st_size for f in left)
        assert st.bytes_unsynced == 0


def test_read_durable_never_returns_unflushed(tmp_path: Path) -> None:
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        recs = chain(10)
        for r in recs[:5]:
            sp.append(r)
        assert read_all(sp) == []
        assert sp.stats().bytes_unsynced == 5 * (HEADER_BYTES + 100)
        sp.flush()
        for r in recs[5:]:
            sp.append(r)
        assert read_all(sp) == recs[:5]
        assert sp.stats().durable_seq == 5
        sp.flush()
        assert read_all(sp) == recs


def test_background_flusher_makes_data_durable(tmp_path: Path) -> None:
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=0.05)) as sp:
        recs = chain(3)
        for r in recs:
            sp.append(r)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sp.stats().durable_seq < 3:
            time.sleep(0.01)
        assert read_all(sp) == recs


def test_ack_and_last_event_survive_reopen(tmp_path: Path) -> None:
    cfg = SpoolConfig(segment_bytes=2048, fsync_interval_s=NEVER)
    recs = chain(60)
    with Spool(tmp_path, cfg) as sp:
        for r in recs:
            sp.append(r)
        sp.append(checkpoint(recs[-1]))
        assert sp.last_event == (60, recs[-1].chain_hash)
        sp.flush()
        sp.ack(30)
    with Spool(tmp_path, cfg) as sp:
        assert sp.recovery.clean
        assert sp.acked_seq == 30
        assert sp.last_seq == 60
        assert sp.last_event == (60, recs[-1].chain_hash)
        assert sp.recovery.last_record is not None
        assert sp.recovery.last_record.kind is RecordKind.CHECKPOINT
        assert read_all(sp, sp.acked_seq) == recs[30:] + [checkpoint(recs[-1])]


def test_chain_position_survives_when_every_segment_is_acked(tmp_path: Path) -> None:
    cfg = SpoolConfig(segment_bytes=512, fsync_interval_s=NEVER)
    recs = chain(20)
    with Spool(tmp_path, cfg) as sp:
        for r in recs:
            sp.append(r)
        sp.flush()
        sp.ack(20)
    # Simulate the newest segment vanishing too (e.g. rotated but never written).
    for f in tmp_path.glob("*.seg"):
        f.unlink()
    with Spool(tmp_path, cfg) as sp:
        assert sp.last_seq == 20
        assert sp.last_event == (20, recs[-1].chain_hash)
        assert sp.acked_seq == 20
        with pytest.raises(SpoolRecordError):
            sp.append(chain(1, start=19)[0])
        nxt = chain(1, start=21, head=recs[-1].chain_hash)[0]
        sp.append(nxt)
        sp.flush()
        assert read_all(sp, 20) == [nxt]


def test_ack_is_cumulative_and_clamped_to_durable(tmp_path: Path) -> None:
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        for r in chain(10):
            sp.append(r)
        sp.ack(5)  # nothing durable yet
        assert sp.acked_seq == 0
        sp.flush()
        sp.ack(50)
        assert sp.acked_seq == 10
        sp.ack(3)
        assert sp.acked_seq == 10


def test_spool_full_refuses_telemetry_and_reserve_takes_priority(tmp_path: Path) -> None:
    frame = HEADER_BYTES + 100
    cfg = SpoolConfig(
        max_bytes=20 * frame,
        priority_reserve_bytes=5 * frame,
        segment_bytes=5 * frame,
        fsync_interval_s=NEVER,
    )
    recs = chain(40)
    with Spool(tmp_path, cfg) as sp:
        for r in recs[:15]:
            assert sp.would_accept(100)
            sp.append(r)
        assert not sp.would_accept(100)
        assert sp.would_accept(100, priority=True)
        with pytest.raises(SpoolFull) as ei:
            sp.append(recs[15])
        assert ei.value.dropped_seq == 16 and not ei.value.priority
        assert ei.value.used == 15 * frame and ei.value.limit == 15 * frame
        assert sp.last_seq == 15  # the refused record left no trace

        prio = [SpoolRecord(RecordKind.EVENT, r.seq, r.chain_hash, r.data, True) for r in recs]
        for r in prio[15:20]:
            sp.append(r)
        assert not sp.would_accept(100, priority=True)
        with pytest.raises(SpoolFull) as ei:
            sp.append(prio[20])
        assert ei.value.priority and ei.value.dropped_seq == 21
        st = sp.stats()
        assert st.dropped_refused == 2
        assert st.bytes_used == 20 * frame

        sp.flush()
        sp.ack(10)  # frees the two oldest segments
        assert sp.stats().bytes_used == 10 * frame
        assert sp.would_accept(100)
        sp.append(recs[20])
        sp.flush()
        assert [r.seq for r in read_all(sp, 10)] == list(range(11, 22))


def test_rejects_bad_records(tmp_path: Path) -> None:
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        r = chain(1, start=5)[0]
        with pytest.raises(SpoolRecordError):
            sp.append(SpoolRecord(RecordKind.EVENT, 5, b"short", b""))
        with pytest.raises(SpoolRecordError):
            sp.append(SpoolRecord(RecordKind.EVENT, 0, bytes(32), b""))
        sp.append(r)
        with pytest.raises(SpoolRecordError) as ei:
            sp.append(chain(1, start=4)[0])
        assert isinstance(ei.value, ValueError) and ei.value.seq == 4
        sp.append(checkpoint(r))  # same seq is allowed
    with pytest.raises(SpoolClosed):
        sp.append(chain(1, start=6)[0])


def test_batches_respect_limits_and_keep_a_seq_together(tmp_path: Path) -> None:
    recs = chain(10, size=100)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        for r in recs:
            sp.append(r)
            if r.seq == 3:
                sp.append(checkpoint(r))
        sp.flush()
        assert [r.seq for r in sp.read_durable(0, 2, 1 << 20)] == [1, 2]
        # Limit reached at event 3, but its checkpoint comes along.
        b = sp.read_durable(2, 1, 1 << 20)
        assert [(r.kind, r.seq) for r in b] == [(RecordKind.EVENT, 3), (RecordKind.CHECKPOINT, 3)]
        # max_bytes counts data bytes; one record is always returned.
        assert [r.seq for r in sp.read_durable(3, 100, 250)] == [4, 5]
        assert [r.seq for r in sp.read_durable(5, 100, 1)] == [6]
        # A checkpoint for seq == after_seq is not returned again on a fresh read.
        assert [r.seq for r in sp.read_durable(3, 100, 1 << 20)] == [4, 5, 6, 7, 8, 9, 10]
        assert sp.read_durable(10, 100, 1 << 20) == []
        assert sp.read_durable(0, 0, 1 << 20) == []


def test_checkpoint_appended_after_its_event_was_read_is_not_skipped(tmp_path: Path) -> None:
    recs = chain(3)
    with Spool(tmp_path, SpoolConfig(fsync_interval_s=NEVER)) as sp:
        for r in recs:
            sp.append(r)
        sp.flush()
        assert read_all(sp) == recs
        sp.append(checkpoint(recs[-1]))
        nxt = chain(1, start=4, head=recs[-1].chain_hash)[0]
        sp.append(nxt)
        sp.flush()
        assert read_all(sp, 3) == [checkpoint(recs[-1]), nxt]
        assert read_all(sp, 4) == []


def test_concurrent_appenders_and_reader(tmp_path: Path) -> None:
    """Several appenders and one reader/acker: every record arrives exactly once, in order."""
    cfg = SpoolConfig(segment_bytes=16 << 10, fsync_interval_s=0.01)
    total = 4000
    lock = threading.Lock()
    counter = iter(range(1, total + 1))
    with Spool(tmp_path, cfg) as sp:

        def appender() -> None:
            while True:
                with lock:  # seq assignment and append are ordered, as in the agent's chain
                    seq = next(counter, None)
                    if seq is None:
                        return
                    sp.append(SpoolRecord(RecordKind.EVENT, seq, bytes(32), b"%d" % seq))

        threads = [threading.Thread(target=appender) for _ in range(3)]
        for t in threads:
            t.start()
        got: list[int] = []
        deadline = time.monotonic() + 30
        while len(got) < total and time.monotonic() < deadline:
            batch = sp.read_durable(got[-1] if got else 0, 100, 1 << 20)
            got.extend(r.seq for r in batch)
            if got:
                sp.ack(got[-1])
        for t in threads:
            t.join()
        assert got == list(range(1, total + 1))
        assert sp.stats().pending_records == 0


def test_segments_acked_but_not_deleted_before_a_crash_go_at_open(tmp_path: Path) -> None:
    cfg = SpoolConfig(segment_bytes=5 * (HEADER_BYTES + 100), fsync_interval_s=NEVER)
    recs = chain(20)
    with Spool(tmp_path, cfg) as sp:
        for r in recs:
            sp.append(r)
        sp.flush()
        saved = {p.name: p.read_bytes() for p in tmp_path.glob("*.seg")}
        sp.ack(12)
    for name, raw in saved.items():  # as if the process died between marker and unlink
        (tmp_path / name).write_bytes(raw)
    assert len(segment_files(tmp_path)) == 4
    with Spool(tmp_path, cfg) as sp:
        assert sp.recovery.clean and sp.recovery.segments_scanned == 4
        assert segment_files(tmp_path) == sorted(saved)[2:]
        assert read_all(sp, sp.acked_seq) == recs[12:]
        assert sp.stats().pending_records == 8
