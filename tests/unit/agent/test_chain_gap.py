"""The agent chain names a sustained spool-full loss with one gap record, written when
telemetry fits again or before a priority event, not one gap record per dropped event."""

from __future__ import annotations

from pathlib import Path

from agent.chain import ChainConfig, EvidenceChain
from agent.spool import Spool, SpoolConfig
from evidence.keys import private_key_from_seed
from proto import ringfence_pb2 as pb


# Room for about 40 telemetry events of 3 KB, and a reserve for priority records.
SMALL_SPOOL = SpoolConfig(max_bytes=256 << 10, segment_bytes=32 << 10, fsync_interval_s=0.05,
                          priority_reserve_bytes=128 << 10)


def _chain(spool: Spool) -> EvidenceChain:
    return EvidenceChain("agent-1", private_key_from_seed(b"\x01" * 32), spool,
                         ChainConfig(checkpoint_every=10_000))


def _telemetry(i: int) -> pb.Event:
    return pb.Event(process=pb.ProcessActivity(activity_id=1, process=pb.Process(
        pid=i, name="filler", argv=[b"x" * 3000])))


def test_sustained_loss_is_one_gap_before_the_next_priority_event(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", SMALL_SPOOL) as spool:
        chain = _chain(spool)
        results = [chain.record(_telemetry(i)) for i in range(200)]
        dropped = [i + 1 for i, seq in enumerate(results) if seq == 0]
        assert len(dropped) > 50 and dropped == list(range(dropped[0], 201))
        seq = chain.record(pb.Event(lifecycle=pb.AgentLifecycle(
            kind=pb.AgentLifecycle.SENSOR_STATUS, message="resumed")))
        assert seq == 202
        spool.flush()
        records = spool.read_durable(dropped[0] - 1, 100, 1 << 20)
    events = [pb.Event.FromString(r.data) for r in records if r.seq > dropped[0] - 1]
    kinds = [(e.seq, e.WhichOneof("body")) for e in events]
    assert kinds == [(201, "gap"), (202, "lifecycle")]
    gap = events[0].gap
    assert (gap.first_seq, gap.last_seq) == (dropped[0], 200)
    assert dict(gap.dropped_by_kind) == {"process": len(dropped)}


def test_a_periodic_flush_does_not_split_a_loss_while_the_spool_is_still_full(
        tmp_path: Path) -> None:
    """The housekeeping flush used to write the gap from the priority reserve in the middle
    of a storm, so the next drop started a second range (a flaky hardening test showed it)."""
    with Spool(tmp_path / "spool", SMALL_SPOOL) as spool:
        chain = _chain(spool)
        results = [chain.record(_telemetry(i)) for i in range(100)]
        chain.flush_gap()                          # still full: the gap waits
        results += [chain.record(_telemetry(i)) for i in range(100, 200)]
        dropped = [i + 1 for i, seq in enumerate(results) if seq == 0]
        assert len(dropped) > 50 and dropped == list(range(dropped[0], 201))
        spool.flush()
        spool.ack(dropped[0] - 1)                  # the collector took everything stored
        chain.flush_gap()                          # space returned: one gap, whole range
        spool.flush()
        records = spool.read_durable(dropped[0] - 1, 100, 1 << 20)
    gaps = [pb.Event.FromString(r.data).gap for r in records
            if pb.Event.FromString(r.data).WhichOneof("body") == "gap"]
    assert [(g.first_seq, g.last_seq) for g in gaps] == [(dropped[0], 200)]
