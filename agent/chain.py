"""The agent's evidence chain: assign seq, serialize once, hash-link, spool, checkpoint.

Every event the agent records passes through `EvidenceChain.record`, which is the only place
an Event is serialized. When the spool cannot take telemetry, the event is dropped *before* it
gets a chain position, its seq is consumed, and a signed Gap event later names the exact range
dropped. It does not send anything (agent.session does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.spool import RecordKind, Spool, SpoolError, SpoolFull, SpoolRecord
from evidence.chain import GENESIS_HASH, link
from evidence.checkpoint import Checkpoint, sign_checkpoint
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

# Bodies that must never be dropped for lack of spool space: they are the record of what the
# agent and responders did, and of what was lost.
PRIORITY_KINDS = frozenset({"lifecycle", "isolation", "gap", "sensor_loss", "acquisition",
                            "command", "triage"})

# seq and agent_id are set after the size check; a varint seq and the id add at most this.
_SEQ_SLACK_BYTES = 64


@dataclass(frozen=True)
class ChainConfig:
    checkpoint_every: int = 1000          # sign a checkpoint after this many events ...
    checkpoint_interval_s: float = 10.0   # ... or this many seconds, whichever comes first


@dataclass
class _PendingGap:
    first_seq: int
    last_seq: int
    first_time_ns: int
    last_time_ns: int
    kinds: Counter[str] = field(default_factory=Counter)
    last_bytes: int = 0          # size of the last dropped event: what must fit again


class ChainError(Exception):
    """The chain could not record an event (the spool failed for a priority record)."""


class EvidenceChain:
    """Thread-safe writer of the agent's hash chain into the spool."""

    def __init__(self, agent_id: str, key: Ed25519PrivateKey, spool: Spool,
                 config: ChainConfig = ChainConfig(),
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._agent_id = agent_id
        self._key = key
        self._spool = spool
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        last = spool.last_event
        # Resume: seq never goes back (the spool remembers every seq it may have sent), the
        # head continues from the last durable event, so a restart never forks the chain.
        self._seq = spool.last_seq
        self._event_seq, self._head = last if last else (0, GENESIS_HASH)
        self._pending_gap: _PendingGap | None = None
        if self._seq > self._event_seq:
            # Seqs the spool lost at recovery (torn or corrupt records): name them.
            now = clock()
            self._pending_gap = _PendingGap(self._event_seq + 1, self._seq, now, now,
                                            Counter({"unknown (spool recovery)": self._seq -
                                                     self._event_seq}))
        self._since_checkpoint = 0
        self._checkpointed_seq = self._event_seq
        self._last_checkpoint_mono = time.monotonic()
        self.dropped = 0

    @property
    def head(self) -> tuple[int, bytes]:
        with self._lock:
            return self._event_seq, self._head

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def record(self, event: pb.Event) -> int:
        """Give `event` the next seq, serialize it once, link and spool it.

        Returns the seq, or 0 when telemetry was dropped because the spool is full (the drop is
        named by a Gap event as soon as space returns). Raises ChainError when a priority event
        cannot be spooled.
        """
        kind = event.WhichOneof("body") or ""
        priority = kind in PRIORITY_KINDS
        with self._lock:
            if not event.time_ns:
                event.time_ns = self._clock()
            if self._pending_gap is not None and (
                    priority or self._spool.would_accept(event.ByteSize() + _SEQ_SLACK_BYTES)):
                # Name the loss once telemetry fits again (or before a priority event), not
                # after every dropped event: one gap record per drop would drain the priority
                # reserve during a storm and split one loss into many ranges.
                self._write_gap()
            self._seq += 1
            event.seq = self._seq
            event.agent_id = self._agent_id
            data = event.SerializeToString(deterministic=True)
            if not priority and not self._spool.would_accept(len(data)):
                self._drop(self._seq, event.time_ns, kind, len(data))
                return 0
            try:
                self._append(self._seq, data, priority)
            except SpoolFull:
                self._drop(self._seq, event.time_ns, kind, len(data))
                return 0
            seq = self._seq
            if self._since_checkpoint >= self._config.checkpoint_every:
                self._checkpoint()
            return seq

    def _append(self, seq: int, data: bytes, priority: bool) -> None:
        head = link(self._head, data)
        try:
            self._spool.append(SpoolRecord(RecordKind.EVENT, seq, head, data, priority))
        except SpoolFull:
            raise
        except SpoolError as e:
            if priority:
                raise ChainError(f"cannot spool event {seq}: {e}") from e
            raise SpoolFull(seq, len(data), priority, 0, 0) from e
        self._head = head
        self._event_seq = seq
        self._since_checkpoint += 1

    def _drop(self, seq: int, time_ns: int, kind: str, size: int) -> None:
        self.dropped += 1
        gap = self._pending_gap
        if gap is None:
            logger.warning("spool full: dropping telemetry from seq %d on; a gap record will "
                           "name the range", seq)
            gap = self._pending_gap = _PendingGap(seq, seq, time_ns, time_ns)
        gap.last_seq = seq
        gap.last_time_ns = time_ns
        gap.last_bytes = size
        gap.kinds[kind] += 1

    def _write_gap(self) -> None:
        """Write the Gap event for the pending dropped range, if the spool has room."""
        gap = self._pending_gap
        assert gap is not None
        event = pb.Event(seq=self._seq + 1, time_ns=self._clock(), agent_id=self._agent_id,
                         severity_id=3, gap=pb.Gap(
                             first_seq=gap.first_seq, last_seq=gap.last_seq,
                             first_time_ns=gap.first_time_ns, last_time_ns=gap.last_time_ns,
                             reason="spool full" if "unknown (spool recovery)" not in gap.kinds
                             else "records lost in spool recovery",
                             dropped_by_kind=dict(gap.kinds)))
        data = event.SerializeToString(deterministic=True)
        if not self._spool.would_accept(len(data), priority=True):
            return
        self._seq += 1
        self._append(self._seq, data, True)
        logger.warning("recorded a gap: seq %d..%d dropped (%d events)", gap.first_seq,
                       gap.last_seq, gap.last_seq - gap.first_seq + 1)
        self._pending_gap = None

    def flush_gap(self) -> None:
        """Write a pending gap once the last dropped event would fit again (called
        periodically, so a loss is named even when no further event comes). While telemetry
        is still dropped the gap waits: writing it from the priority reserve in the middle of
        a storm would split one loss into several ranges (the next event starts a new one)."""
        with self._lock:
            gap = self._pending_gap
            if gap is not None and self._spool.would_accept(gap.last_bytes + _SEQ_SLACK_BYTES):
                self._write_gap()

    def checkpoint(self, force: bool = False) -> bool:
        """Sign a checkpoint of the current head if events arrived since the last one and the
        interval has passed (or `force`). Returns whether one was written."""
        with self._lock:
            due = (time.monotonic() - self._last_checkpoint_mono
                   >= self._config.checkpoint_interval_s)
            if self._event_seq > self._checkpointed_seq and (force or due):
                self._checkpoint()
                return True
            return False

    def _checkpoint(self) -> None:
        cp = Checkpoint(self._agent_id, self._event_seq, self._head, self._clock())
        envelope = sign_checkpoint(cp, self._key)
        self._spool.append(SpoolRecord(RecordKind.CHECKPOINT, cp.seq, cp.head, envelope, True))
        self._since_checkpoint = 0
        self._checkpointed_seq = cp.seq
        self._last_checkpoint_mono = time.monotonic()
