"""Evidence reads written once for both SQL backends.

The SQLite and PostgreSQL stores differ in connections, transactions and bulk writes, not in
how events, checkpoints and integrity alerts are read back. `EvidenceReads` holds those
queries, written with `{p}` for the backend's parameter placeholder; a backend supplies
`_PLACEHOLDER` and `_query`. It writes nothing and opens no connection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from collector.store.base import CheckpointRow, EventRow, IntegrityAlertRow

EVENT_COLS = "agent_id, seq, time_ns, kind, data, chain_hash, received_ns"
PAGE_ROWS = 5000


def event_row(row: Sequence[Any]) -> EventRow:
    return EventRow(row[0], row[1], row[2], row[3], bytes(row[4]), bytes(row[5]), row[6])


class EvidenceReads:
    """Read queries of the Store interface shared by the SQL backends."""

    _PLACEHOLDER: str  # "?" (sqlite3) or "%s" (psycopg)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.format(p=self._PLACEHOLDER, cols=EVENT_COLS)

    @staticmethod
    def _time_bounds(sql: str, args: list[Any], since_ns: int, until_ns: int) -> str:
        if since_ns:
            sql += " AND time_ns >= {p}"
            args.append(since_ns)
        if until_ns:
            sql += " AND time_ns <= {p}"
            args.append(until_ns)
        return sql

    def query_events(self, agent_id: str, since_ns: int = 0, until_ns: int = 0, kind: str = "",
                     limit: int = 1000, after_seq: int = 0) -> Iterator[EventRow]:
        args: list[Any] = [agent_id, after_seq]
        sql = self._time_bounds("SELECT {cols} FROM events WHERE agent_id = {p} AND seq > {p}",
                                args, since_ns, until_ns)
        if kind:
            sql += " AND kind = {p}"
            args.append(kind)
        sql += " ORDER BY seq LIMIT {p}"
        args.append(limit)
        return iter([event_row(r) for r in self._query(self._sql(sql), args)])

    def previous_event(self, agent_id: str, seq: int) -> EventRow | None:
        rows = self._query(self._sql("SELECT {cols} FROM events WHERE agent_id = {p} AND "
                                     "seq < {p} ORDER BY seq DESC LIMIT 1"), (agent_id, seq))
        return event_row(rows[0]) if rows else None

    def last_seq_in_range(self, agent_id: str, since_ns: int = 0, until_ns: int = 0) -> int:
        args: list[Any] = [agent_id]
        sql = self._time_bounds("SELECT COALESCE(MAX(seq), 0) FROM events WHERE agent_id = {p}",
                                args, since_ns, until_ns)
        return int(self._query(self._sql(sql), args)[0][0])

    def events_by_seq(self, agent_id: str, first_seq: int, last_seq: int) -> Iterator[EventRow]:
        # Paged so a million-event bundle never sits in memory at once.
        sql = self._sql("SELECT {cols} FROM events WHERE agent_id = {p} AND seq > {p} "
                        f"AND seq <= {{p}} ORDER BY seq LIMIT {PAGE_ROWS}")
        after = first_seq - 1
        while after < last_seq:
            rows = self._query(sql, (agent_id, after, last_seq))
            if not rows:
                return
            for r in rows:
                yield event_row(r)
            after = rows[-1][1]

    def checkpoints(self, agent_id: str, first_seq: int = 0,
                    last_seq: int = 2**63 - 1) -> list[CheckpointRow]:
        rows = self._query(self._sql(
            "SELECT agent_id, seq, head, time_ns, envelope FROM checkpoints "
            "WHERE agent_id = {p} AND seq >= {p} AND seq <= {p} ORDER BY seq"),
            (agent_id, first_seq, last_seq))
        return [CheckpointRow(r[0], r[1], bytes(r[2]), r[3], bytes(r[4])) for r in rows]

    def alerts(self, agent_id: str | None = None) -> list[IntegrityAlertRow]:
        sql = "SELECT agent_id, kind, seq, detail, time_ns FROM integrity_alerts"
        args: tuple[Any, ...] = ()
        if agent_id is not None:
            sql += " WHERE agent_id = {p}"
            args = (agent_id,)
        return [IntegrityAlertRow(*r) for r in self._query(self._sql(sql + " ORDER BY id"),
                                                           args)]

    def alert_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._query(
            "SELECT agent_id, COUNT(*) FROM integrity_alerts GROUP BY agent_id")}
