"""Verified ingest: recompute each agent's hash chain from the bytes received, then store them.

This is where "hash what you store, store what you hashed" is enforced. It decides what a batch
means for the chain (new, duplicate, fork, explained loss, unexplained gap, checkpoint
mismatch) and records every anomaly as an integrity alert; it does no networking and no SQL.

Exceptions:

    IngestError                 root: the batch was refused and nothing of it was stored
    +-- MalformedBatch          bytes that are not a valid Event, or violate limits
    +-- IdentityMismatch        an event claims to come from another agent
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from google.protobuf.message import DecodeError

from collector.store.base import (
    AgentRecord,
    ChainState,
    CheckpointRow,
    EventRow,
    IngestResult,
    IntegrityAlertRow,
    Store,
)
from evidence.chain import GENESIS_HASH, link
from evidence.checkpoint import Checkpoint, verify_checkpoint
from evidence.errors import EvidenceError
from evidence.keys import public_key_from_bytes
from proto import ringfence_pb2 as pb
from proto.limits import MAX_EVENT_BYTES, MAX_EVENTS_PER_BATCH, MAX_SEQ

logger = logging.getLogger(__name__)



class IngestError(Exception):
    """A batch was refused; nothing of it was stored."""


class MalformedBatch(IngestError):
    def __init__(self, agent_id: str, index: int, reason: str) -> None:
        super().__init__(f"event {index} of the batch is malformed: {reason}")
        self.agent_id = agent_id
        self.index = index
        self.reason = reason


class IdentityMismatch(IngestError):
    def __init__(self, agent_id: str, claimed: str) -> None:
        super().__init__("an event names a different agent than the connection's certificate")
        self.agent_id = agent_id
        self.claimed = claimed


class DecodedEvent(NamedTuple):
    """One validated event of a batch (a NamedTuple: built once per event on the hot path)."""

    seq: int
    data: bytes
    event: pb.Event
    kind: str


def decode_batch(agent_id: str, events: Sequence[bytes]) -> list[DecodedEvent]:
    """Parse and validate a batch without storing anything; raise on the first bad event."""
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise MalformedBatch(agent_id, len(events), f"more than {MAX_EVENTS_PER_BATCH} events")
    decoded: list[DecodedEvent] = []
    append = decoded.append
    from_string = pb.Event.FromString
    prev_seq = 0
    for index, data in enumerate(events):
        if len(data) > MAX_EVENT_BYTES:
            raise MalformedBatch(agent_id, index, f"larger than {MAX_EVENT_BYTES} bytes")
        try:
            event = from_string(data)
        except DecodeError as e:
            raise MalformedBatch(agent_id, index, "not a valid Event message") from e
        kind = event.WhichOneof("body")
        seq = event.seq
        if seq == 0 or kind is None:
            raise MalformedBatch(agent_id, index, "missing seq or body")
        if seq > MAX_SEQ:
            raise MalformedBatch(agent_id, index, f"seq above {MAX_SEQ}")
        if event.agent_id != agent_id:
            raise IdentityMismatch(agent_id, event.agent_id)
        if seq <= prev_seq:
            raise MalformedBatch(agent_id, index, "seq does not increase within the batch")
        prev_seq = seq
        append(DecodedEvent(seq, data, event, kind))
    return decoded


class Ingestor:
    """Verifies and stores batches for agents; keeps each agent's chain head in the store."""

    def __init__(self, store: Store, clock: Callable[[], int] = time.time_ns) -> None:
        self._store = store
        self._clock = clock

    def ingest(self, agent: AgentRecord, events: Sequence[bytes],
               checkpoints: Sequence[bytes] = ()) -> tuple[IngestResult, list[DecodedEvent]]:
        """Verify one batch against the stored chain and commit it atomically.

        Returns what was stored and the decoded new events (for the control plane). Raises
        IngestError for a batch that must be refused, StoreUnavailable when storage fails.
        """
        agent_id = agent.agent_id
        decoded = decode_batch(agent_id, events)
        now = self._clock()
        state = self._store.chain_state(agent_id)
        last_seq, head = state.last_seq, (state.head or GENESIS_HASH)
        new_rows: list[EventRow] = []
        fork_rows: list[EventRow] = []
        alerts: list[IntegrityAlertRow] = []
        heads: dict[int, bytes] = {}
        duplicates = 0

        def alert(kind: str, seq: int, detail: str) -> None:
            logger.warning("integrity alert for agent %s: %s at seq %d: %s",
                           agent_id, kind, seq, detail)
            alerts.append(IntegrityAlertRow(agent_id, kind, seq, detail, now))

        # Re-sent events (seq at or below the stored head) are compared with what is stored,
        # fetched in one range query rather than one lookup per event.
        resent = [d.seq for d in decoded if d.seq <= last_seq]
        stored_data = ({r.seq: r.data for r in self._store.events_by_seq(
            agent_id, resent[0], resent[-1])} if resent else {})
        add_row = new_rows.append
        for d in decoded:
            if d.seq <= last_seq:
                if stored_data.get(d.seq) == d.data:
                    duplicates += 1
                    continue
                # Same seq, different bytes: a fork. Keep both versions, never overwrite.
                fork_rows.append(EventRow(agent_id, d.seq, d.event.time_ns, d.kind, d.data,
                                          link(head, d.data), now))
                alert("fork", d.seq, "a second, different event arrived for an already stored "
                      "seq; both versions are kept")
                continue
            if d.seq > last_seq + 1:
                first_missing, last_missing = last_seq + 1, d.seq - 1
                gap = d.event.gap if d.kind == "gap" else None
                if gap is not None and (gap.first_seq, gap.last_seq) == (first_missing,
                                                                        last_missing):
                    alert("recorded_loss", d.seq,
                          f"agent dropped {last_missing - first_missing + 1} events "
                          f"(seq {first_missing}..{last_missing}): {gap.reason}")
                else:
                    alert("gap", d.seq, f"events seq {first_missing}..{last_missing} never "
                          "arrived and no gap record names them; the chain cannot be verified "
                          "across them")
            elif d.kind == "gap":
                alert("malformed_gap", d.seq, "a gap record that names no missing seqs")
            head = link(head, d.data)
            if checkpoints:
                heads[d.seq] = head
            last_seq = d.seq
            add_row(EventRow(agent_id, d.seq, d.event.time_ns, d.kind, d.data, head, now))

        # Everything stored is new except the re-sent duplicates and forks skipped above.
        if len(new_rows) == len(decoded):
            new_events = decoded
        else:
            stored_seqs = {r.seq for r in new_rows}
            new_events = [d for d in decoded if d.seq in stored_seqs]
        checkpoint_rows, anchor = self._checkpoints(agent, checkpoints, heads, alert, alerts)
        if anchor is not None:
            head = self._reanchor(new_rows, anchor, alert)
        chain = ChainState(last_seq, head)
        self._store.commit_batch(new_rows, fork_rows, checkpoint_rows, alerts, chain)
        return IngestResult(len(new_rows), duplicates, chain), new_events

    def _checkpoints(self, agent: AgentRecord, envelopes: Sequence[bytes],
                     heads: dict[int, bytes], alert: Callable[[str, int, str], None],
                     batch_alerts: Sequence[IntegrityAlertRow],
                     ) -> tuple[list[CheckpointRow], Checkpoint | None]:
        """Verify the batch's checkpoints; return the rows to store and, when the chain was
        broken by an unexplained gap, the latest signed checkpoint to re-anchor it on."""
        rows: list[CheckpointRow] = []
        anchor: Checkpoint | None = None
        if not envelopes:
            return rows, anchor
        key = public_key_from_bytes(agent.identity_key)
        for envelope in envelopes:
            try:
                cp = verify_checkpoint(envelope, key, expected_agent_id=agent.agent_id)
            except EvidenceError as e:
                alert("bad_signature", 0, f"a checkpoint failed verification: {e}")
                continue
            expected = heads.get(cp.seq)
            if expected is None:
                stored = self._store.stored_event(agent.agent_id, cp.seq)
                expected = stored.chain_hash if stored is not None else None
            if expected is None:
                alert("checkpoint_unanchored", cp.seq,
                      "a checkpoint names a seq the collector has not stored")
                continue
            if expected != cp.head:
                if cp.seq in heads and self._broken_by_gap(agent.agent_id, cp.seq,
                                                           batch_alerts):
                    # The bytes before this point include an unexplained gap, so our head
                    # cannot match; the agent's signature vouches for its head. Continue the
                    # chain from it instead of failing every later checkpoint too.
                    anchor = cp
                    rows.append(CheckpointRow(agent.agent_id, cp.seq, cp.head, cp.time_ns,
                                              envelope))
                    continue
                alert("checkpoint_mismatch", cp.seq, "the agent-signed head differs from the "
                      "head recomputed from the stored bytes")
                continue
            rows.append(CheckpointRow(agent.agent_id, cp.seq, cp.head, cp.time_ns, envelope))
        return rows, anchor

    def _broken_by_gap(self, agent_id: str, seq: int,
                       batch_alerts: Sequence[IntegrityAlertRow]) -> bool:
        """Whether an unexplained gap at or before `seq` has not been re-anchored since."""
        history = [*self._store.alerts(agent_id), *batch_alerts]
        last_gap = max((a.seq for a in history if a.kind == "gap" and a.seq <= seq), default=0)
        last_anchor = max((a.seq for a in history if a.kind == "chain_reanchored"), default=0)
        return last_gap > last_anchor

    @staticmethod
    def _reanchor(rows: list[EventRow], anchor: Checkpoint,
                  alert: Callable[[str, int, str], None]) -> bytes:
        """Give the anchored event the agent-signed head and relink the events after it."""
        head = anchor.head
        for i, row in enumerate(rows):
            if row.seq == anchor.seq:
                rows[i] = row._replace(chain_hash=head)
            elif row.seq > anchor.seq:
                head = link(head, row.data)
                rows[i] = row._replace(chain_hash=head)
        alert("chain_reanchored", anchor.seq,
              "after the unexplained gap the collector could not verify events up to this "
              "seq; from here the chain continues from the agent-signed checkpoint head")
        return head
