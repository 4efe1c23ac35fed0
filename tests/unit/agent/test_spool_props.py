"""Property test: random appends, flushes, acks, reads and reopens keep the spool's invariants."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.spool import HEADER_BYTES, RecordKind, Spool, SpoolConfig, SpoolFull, SpoolRecord

CFG = SpoolConfig(
    max_bytes=40 * (HEADER_BYTES + 150),
    priority_reserve_bytes=8 * (HEADER_BYTES + 150),
    segment_bytes=6 * (HEADER_BYTES + 150),
    fsync_interval_s=3600.0,
)


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-prop-"))
        self.sp = Spool(self.dir, CFG)
        self.model: list[SpoolRecord] = []  # every accepted record, in order
        self.durable = 0  # how many of them are fsynced
        self.acked = 0
        self.last_event: tuple[int, bytes] | None = None
        self.seq = 0

    def teardown(self) -> None:
        self.sp.close()
        shutil.rmtree(self.dir)

    @rule(
        checkpoint=st.booleans(),
        priority=st.booleans(),
        size=st.integers(0, 300),
        fill=st.integers(0, 255),
    )
    def append(self, checkpoint: bool, priority: bool, size: int, fill: int) -> None:
        if checkpoint and self.last_event is None:
            return
        kind = RecordKind.CHECKPOINT if checkpoint else RecordKind.EVENT
        seq = self.seq if checkpoint else self.seq + 1
        head = self.last_event[1] if checkpoint and self.last_event else bytes([fill]) * 32
        rec = SpoolRecord(kind, seq, head, bytes([fill]) * size, priority)
        expected = self.sp.would_accept(size, priority)
        try:
            self.sp.append(rec)
        except SpoolFull as e:
            event("refused")
            assert not expected
            assert e.dropped_seq == seq and e.priority == priority
            return
        assert expected
        self.model.append(rec)
        self.seq = seq
        if kind is RecordKind.EVENT:
            self.last_event = (seq, head)

    @rule()
    def flush(self) -> None:
        self.sp.flush()
        self.durable = len(self.model)

    @precondition(lambda self: self.durable > 0)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        top = self.model[self.durable - 1].seq
        k = data.draw(st.integers(0, top + 3))
        self.sp.ack(k)
        self.acked = max(self.acked, min(k, top))

    @rule()
    def reopen(self) -> None:
        self.sp.close()
        self.durable = len(self.model)
        self.sp = Spool(self.dir, CFG)
        assert self.sp.recovery.clean

    @rule(max_records=st.integers(1, 7), max_bytes=st.integers(0, 700))
    def read_in_batches(self, max_records: int, max_bytes: int) -> None:
        got: list[SpoolRecord] = []
        after = self.acked
        while True:
            batch = self.sp.read_durable(after, max_records, max_bytes)
            if not batch:
                break
            # Each record after the first fits both limits, unless it shares the seq of the
            # record before it (an event and its checkpoints stay in one batch).
            used = 0
            for i, r in enumerate(batch):
                if i and r.seq != batch[i - 1].seq:
                    assert i < max_records and used + len(r.data) <= max_bytes
                used += len(r.data)
            got.extend(batch)
            after = batch[-1].seq
        self.check_read(got)

    def check_read(self, got: list[SpoolRecord]) -> None:
        durable = self.model[: self.durable]
        expected = [r for r in durable if r.seq > self.acked]
        # A checkpoint for seq == acked may lead, if it was appended after its event was read.
        lead = [r for r in got if r.seq <= self.acked]
        assert all(r.seq == self.acked and r.kind is RecordKind.CHECKPOINT for r in lead)
        assert got[len(lead) :] == expected

    @invariant()
    def consistent(self) -> None:
        st_ = self.sp.stats()
        assert st_.bytes_used <= CFG.max_bytes
        assert self.sp.last_seq == self.seq
        assert self.sp.last_event == self.last_event
        assert self.sp.acked_seq == self.acked
        assert st_.pending_records == len([r for r in self.model if r.seq > self.acked])
        assert st_.corrupt_skipped == 0 and st_.torn_bytes_truncated == 0
        self.check_read(self.sp.read_durable(self.acked, 1 << 30, 1 << 40))


TestSpoolMachine = SpoolMachine.TestCase
TestSpoolMachine.settings = settings(
    max_examples=100,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
