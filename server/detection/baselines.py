"""Behaviour baselines (UEBA for hosts and users): first-seen executables, rare parent -> child
pairs, new outbound destinations, unusual hours and parents for a user, activity bursts.

Each model is a count or a running statistic kept per host (or per host and user, or per
fleet) and learned from every event; once a host's learning period has passed, an event that
breaks a model yields an Anomaly that names the model and the numbers that made it one. State
is plain rows (server.detection.records.BaselineRow) so it survives restarts; this module does
no IO: the engine loads the rows and saves the dirty ones.

Every event touches several counters, so the counting is kept cheap: a counter is a
[count, first_ns, last_ns, dirty] list bumped in place, a changed row is queued once until the
next save rather than on every bump, scope strings are built once per host and user, and the
per-host burst statistics live in a small object that is turned into JSON only when saved.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.detection.records import BaselineRow

NS = 1_000_000_000
MODELS = ("first_seen_exe", "rare_parent_child", "new_destination", "user_unusual_hour",
          "user_unusual_parent", "activity_burst")


@dataclass(frozen=True)
class BaselineConfig:
    """Thresholds of the behaviour models (all configurable; defaults suit a real fleet)."""

    enabled: bool = True
    # A host is learning (no anomaly alerts, only counting) for this long after detection
    # first saw it, in the host's own event time.
    learning_s: float = 7 * 86400.0
    # first_seen_exe: an executable SHA-256 never seen on this host and never in the fleet.
    # With alert_new_to_host, one known elsewhere in the fleet but new here alerts too (low).
    alert_new_to_host: bool = False
    # rare_parent_child: a pair seen at most max_count times among at least min_launches
    # launches on the host.
    rare_pair_max_count: int = 0
    rare_pair_min_launches: int = 200
    # new_destination: an outbound IP or queried domain new for the host (which must already
    # know min_known destinations), or new for an executable that knows min_known.
    destination_min_known: int = 20
    # user_unusual_hour / user_unusual_parent: once the user has min_launches launches on the
    # host, an hour holding at most max_fraction of them, or a parent never seen for them.
    user_min_launches: int = 200
    user_hour_max_fraction: float = 0.01
    user_parent_max_count: int = 0
    timezone_offset_h: int = 0           # hours are counted in UTC + this offset
    # activity_burst: events in one minute above max(min_events, mean + sigmas * sd) of the
    # host's own per-minute rate (EWMA with weight alpha), after min_minutes of history.
    burst_sigmas: float = 6.0
    burst_min_events: int = 500
    burst_min_minutes: int = 60
    burst_alpha: float = 0.05
    # Bound on distinct keys remembered per model and scope (older ones stay, new ones are not
    # added beyond it, which makes the model quieter, never louder).
    max_keys_per_scope: int = 100_000

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> BaselineConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown baseline settings {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        return cls(**raw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Anomaly:
    model: str
    severity: str
    title: str
    detail: str                          # the explanation, with the numbers
    dedup_key: str
    numbers: dict[str, float | int | str] = field(default_factory=dict)


_Key = tuple[str, str, str]
_HOURS = tuple(str(h) for h in range(24))


class _Burst:
    """The per-minute rate of one host (saved as JSON in the value of its burst row)."""

    __slots__ = ("alerted", "count", "last_ns", "mean", "minute", "minutes", "var")

    def __init__(self, state: dict[str, Any], last_ns: int) -> None:
        self.minute: int = state["minute"]
        self.count: int = state["count"]
        self.mean: float = state["mean"]
        self.var: float = state["var"]
        self.minutes: int = state["minutes"]
        self.alerted: int = state["alerted"]
        self.last_ns = last_ns

    def state(self) -> dict[str, Any]:
        return {"minute": self.minute, "count": self.count, "mean": self.mean,
                "var": self.var, "minutes": self.minutes, "alerted": self.alerted}


class FieldSource(Protocol):
    """An event's fields as models read them: a dict of text, or fields computed lazily."""

    def get(self, name: str, default: str, /) -> str: ...


class Baselines:
    """All models over one shared table of counters; observe() learns and judges one event."""

    def __init__(self, config: BaselineConfig, rows: Iterable[BaselineRow] = ()) -> None:
        self.config = config
        # (model, scope, key) -> [count, first_ns, last_ns, dirty (0/1)]
        self._rows: dict[_Key, list[int]] = {}
        self._values: dict[_Key, str] = {}
        self._sizes: dict[tuple[str, str], int] = {}
        self._dirty: list[_Key] = []                          # rows whose dirty flag is 1
        self._burst_state: dict[str, _Burst] = {}             # serialized in dirty_rows()
        self._burst_touched: set[str] = set()
        self._hosts: dict[str, list[int]] = {}                # agent -> its ("host", "first") row
        self._user_scopes: dict[tuple[str, str], str] = {}
        self._exe_scopes: dict[tuple[str, str], str] = {}
        for r in rows:
            self._rows[(r.model, r.scope, r.key)] = [r.count, r.first_ns, r.last_ns, 0]
            if r.value:
                self._values[(r.model, r.scope, r.key)] = r.value
            self._sizes[(r.model, r.scope)] = self._sizes.get((r.model, r.scope), 0) + 1

    # -- state ----------------------------------------------------------------------------------
    def count(self, model: str, scope: str, key: str = "") -> int:
        row = self._rows.get((model, scope, key))
        return row[0] if row else 0

    def distinct(self, model: str, scope: str) -> int:
        return self._sizes.get((model, scope), 0)

    def _bump(self, model: str, scope: str, key: str, time_ns: int) -> None:
        k = (model, scope, key)
        row = self._rows.get(k)
        if row is None:
            size = self._sizes.get((model, scope), 0)
            if size >= self.config.max_keys_per_scope:
                return
            self._sizes[(model, scope)] = size + 1
            self._rows[k] = [1, time_ns, time_ns, 1]
            self._dirty.append(k)
            return
        row[0] += 1
        if time_ns > row[2]:
            row[2] = time_ns
        if not row[3]:
            row[3] = 1
            self._dirty.append(k)

    def dirty_rows(self) -> list[BaselineRow]:
        """Rows changed since the last call (to persist)."""
        for agent_id in self._burst_touched:
            state = self._burst_state[agent_id]
            k = ("burst", agent_id, "")
            self._values[k] = json.dumps(state.state())
            row = self._rows[k]
            row[0], row[2] = state.minutes, max(row[2], state.last_ns)
            if not row[3]:
                row[3] = 1
                self._dirty.append(k)
        self._burst_touched.clear()
        out = []
        for k in self._dirty:
            row = self._rows[k]
            row[3] = 0
            out.append(BaselineRow(k[0], k[1], k[2], row[0], row[1], row[2],
                                   self._values.get(k, "")))
        self._dirty = []
        return out

    def learning(self, agent_id: str, time_ns: int) -> bool:
        row = self._hosts.get(agent_id)
        if row is None:
            row = self._rows.get(("host", agent_id, "first"))
            if row is None:
                return True
            self._hosts[agent_id] = row
        return time_ns - row[1] < self.config.learning_s * NS

    def seen(self, agent_id: str, time_ns: int) -> None:
        """Any event of the host (also kinds no model judges): starts its learning period."""
        if self.config.enabled and ("host", agent_id, "first") not in self._rows:
            self._bump("host", agent_id, "first", time_ns)

    # -- judging --------------------------------------------------------------------------------
    def observe(self, agent_id: str, category: str, raw: FieldSource,
                time_ns: int) -> list[Anomaly]:
        """Judge one event against the host's baselines, then learn from it."""
        if not self.config.enabled:
            return []
        learning = self.learning(agent_id, time_ns)
        out: list[Anomaly] = []
        burst = self._burst(agent_id, time_ns, learning)
        if burst:
            out.append(burst)
        if category == "process_creation":
            out.extend(self._process(agent_id, raw, time_ns, learning))
        elif category in ("network_connection", "dns_query"):
            out.extend(self._destination(agent_id, category, raw, time_ns, learning))
        row = self._hosts.get(agent_id)
        if row is None:
            self._bump("host", agent_id, "first", time_ns)
        else:
            row[0] += 1
            if time_ns > row[2]:
                row[2] = time_ns
            if not row[3]:
                row[3] = 1
                self._dirty.append(("host", agent_id, "first"))
        return out

    def _process(self, agent_id: str, raw: FieldSource, time_ns: int,
                 learning: bool) -> list[Anomaly]:
        c = self.config
        out: list[Anomaly] = []
        exe = raw.get("process.exe", "")
        parent = raw.get("parent_process.exe", "")
        sha = raw.get("process.exe_sha256", "")
        if sha:
            host_known = self.count("exe", agent_id, sha)
            fleet_known = self.count("exe", "*", sha)
            if not learning and host_known == 0 and (fleet_known == 0 or c.alert_new_to_host):
                where = ("nor anywhere in the fleet" if fleet_known == 0 else
                         f"(seen {fleet_known} times elsewhere in the fleet)")
                out.append(Anomaly(
                    "first_seen_exe", "medium" if fleet_known == 0 else "low",
                    f"First-seen executable {exe}",
                    f"baseline first_seen_exe: executable {exe} with SHA-256 {sha} was never "
                    f"seen on this host ({self.distinct('exe', agent_id)} executables known "
                    f"here) {where} ({self.distinct('exe', '*')} known in the fleet)",
                    f"first_seen_exe:{agent_id}:{sha}",
                    {"host_known_executables": self.distinct("exe", agent_id),
                     "fleet_known_executables": self.distinct("exe", "*"),
                     "fleet_sightings": fleet_known}))
            self._bump("exe", agent_id, sha, time_ns)
            self._bump("exe", "*", sha, time_ns)
        if parent and exe:
            pair = f"{parent}\x00{exe}"
            seen = self.count("pair", agent_id, pair)
            launches = self.count("launches", agent_id)
            if (not learning and seen <= c.rare_pair_max_count and
                    launches >= c.rare_pair_min_launches):
                out.append(Anomaly(
                    "rare_parent_child", "low", f"Rare parent -> child: {parent} -> {exe}",
                    f"baseline rare_parent_child: {parent} -> {exe} was seen {seen} times in "
                    f"{launches} launches on this host (threshold: at most "
                    f"{c.rare_pair_max_count} after {c.rare_pair_min_launches} launches)",
                    f"rare_parent_child:{agent_id}:{pair}",
                    {"pair_count": seen, "host_launches": launches}))
            self._bump("pair", agent_id, pair, time_ns)
        self._bump("launches", agent_id, "", time_ns)
        user = raw.get("process.user", "")
        if user:
            scope = self._user_scopes.get((agent_id, user))
            if scope is None:
                if len(self._user_scopes) >= c.max_keys_per_scope:
                    self._user_scopes.clear()
                scope = self._user_scopes[(agent_id, user)] = f"{agent_id}|{user}"
            total = self.count("user_launches", scope)
            hour = int((time_ns // NS // 3600 + c.timezone_offset_h) % 24)
            at_hour = self.count("user_hour", scope, _HOURS[hour])
            if not learning and total >= c.user_min_launches:
                fraction = at_hour / total
                if fraction <= c.user_hour_max_fraction:
                    out.append(Anomaly(
                        "user_unusual_hour", "low",
                        f"User {user} active at an unusual hour ({hour:02d}:00)",
                        f"baseline user_unusual_hour: {user} launched {exe or '?'} at "
                        f"{hour:02d}:00 (UTC{c.timezone_offset_h:+d}); {at_hour} of {user}'s "
                        f"{total} launches on this host were in that hour ({fraction:.1%}; "
                        f"threshold {c.user_hour_max_fraction:.1%})",
                        f"user_unusual_hour:{scope}:{hour}",
                        {"launches_in_hour": at_hour, "user_launches": total, "hour": hour}))
                if parent:
                    by_parent = self.count("user_parent", scope, parent)
                    if by_parent <= c.user_parent_max_count:
                        out.append(Anomaly(
                            "user_unusual_parent", "low",
                            f"User {user} ran a process from an unusual parent {parent}",
                            f"baseline user_unusual_parent: {user} launched {exe or '?'} from "
                            f"{parent}, which started {by_parent} of {user}'s {total} launches "
                            f"on this host (threshold: at most {c.user_parent_max_count})",
                            f"user_unusual_parent:{scope}:{parent}",
                            {"parent_count": by_parent, "user_launches": total}))
            self._bump("user_launches", scope, "", time_ns)
            self._bump("user_hour", scope, _HOURS[hour], time_ns)
            if parent:
                self._bump("user_parent", scope, parent, time_ns)
        return out

    def _destination(self, agent_id: str, category: str, raw: FieldSource,
                     time_ns: int,
                     learning: bool) -> list[Anomaly]:
        c = self.config
        if category == "network_connection":
            if raw.get("connection.initiated", "") != "true":
                return []
            dest = raw.get("dst_endpoint.ip", "")
            try:
                address = ipaddress.ip_address(dest)
            except ValueError:
                return []
            if address.is_loopback or address.is_link_local or address.is_multicast:
                return []
            what = f"{dest}:{raw.get('dst_endpoint.port', '?')}"
        else:
            dest = raw.get("query.hostname", "").lower().rstrip(".")
            if not dest:
                return []
            what = dest
        out: list[Anomaly] = []
        exe = raw.get("process.exe", "")
        host_known = self.distinct("dest", agent_id)
        new_for_host = self.count("dest", agent_id, dest) == 0
        if not learning and new_for_host and host_known >= c.destination_min_known:
            out.append(Anomaly(
                "new_destination", "low", f"New outbound destination {what}",
                f"baseline new_destination: {what} ({'domain' if category == 'dns_query' else 'IP'}"
                f") was never contacted by this host before; it knew {host_known} destinations"
                f" (threshold: alert once at least {c.destination_min_known} are known)",
                f"new_destination:{agent_id}:{dest}", {"host_known_destinations": host_known}))
        self._bump("dest", agent_id, dest, time_ns)
        if exe:
            scope = self._exe_scopes.get((agent_id, exe))
            if scope is None:
                if len(self._exe_scopes) >= c.max_keys_per_scope:
                    self._exe_scopes.clear()
                scope = self._exe_scopes[(agent_id, exe)] = f"{agent_id}|{exe}"
            proc_known = self.distinct("dest_proc", scope)
            if (not learning and not new_for_host and self.count("dest_proc", scope, dest) == 0
                    and proc_known >= c.destination_min_known):
                out.append(Anomaly(
                    "new_destination", "low", f"New destination {what} for {exe}",
                    f"baseline new_destination: {exe} never contacted {what} before (the host "
                    f"had); it knew {proc_known} destinations (threshold: "
                    f"{c.destination_min_known})",
                    f"new_destination:{scope}:{dest}", {"process_known_destinations": proc_known}))
            self._bump("dest_proc", scope, dest, time_ns)
        return out

    def _burst(self, agent_id: str, time_ns: int, learning: bool) -> Anomaly | None:
        c = self.config
        minute = time_ns // (60 * NS)
        state = self._burst_state.get(agent_id)
        if state is None:
            k = ("burst", agent_id, "")
            raw_state = self._values.get(k)
            if raw_state is None:
                state = _Burst({"minute": minute, "count": 0, "mean": 0.0, "var": 0.0,
                                "minutes": 0, "alerted": -1}, time_ns)
                self._rows[k] = [0, time_ns, time_ns, 0]
            else:
                state = _Burst(json.loads(raw_state), time_ns)
            self._burst_state[agent_id] = state
        # The row (minutes, last time) is brought up to date when saved: dirty_rows().
        self._burst_touched.add(agent_id)
        if time_ns > state.last_ns:
            state.last_ns = time_ns
        if minute > state.minute:
            # Close the finished minute, and count idle minutes (up to an hour) as zero.
            closed = [state.count] + [0] * int(min(minute - state.minute - 1, 60))
            for x in closed:
                if state.minutes == 0:
                    state.mean, state.var = float(x), 0.0
                else:
                    delta = x - state.mean
                    state.mean += c.burst_alpha * delta
                    state.var = (1 - c.burst_alpha) * (state.var + c.burst_alpha * delta ** 2)
                state.minutes += 1
            state.minute, state.count = minute, 0
        state.count += 1
        if (learning or state.minutes < c.burst_min_minutes or state.alerted == minute or
                state.count <= c.burst_min_events):
            return None
        sd = math.sqrt(state.var)
        threshold = max(float(c.burst_min_events), state.mean + c.burst_sigmas * sd)
        if state.count <= threshold:
            return None
        state.alerted = minute
        return Anomaly(
            "activity_burst", "medium", "Burst of activity far above the host's own rate",
            f"baseline activity_burst: {state.count} events in the minute starting "
            f"{minute * 60} (epoch s); the host's rate is {state.mean:.1f}/min (sd "
            f"{sd:.1f}) over {state.minutes} minutes; threshold max("
            f"{c.burst_min_events}, mean + {c.burst_sigmas:g} sd) = {threshold:.1f}",
            f"activity_burst:{agent_id}:{minute}",
            {"events_in_minute": state.count, "mean_per_minute": round(state.mean, 2),
             "sd_per_minute": round(sd, 2), "threshold": round(threshold, 2)})
