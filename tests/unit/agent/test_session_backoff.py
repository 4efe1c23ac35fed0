"""Reconnect backoff of agent.session: the schedule, its cap, and that a fleet of agents
reconnecting after a collector restart spreads out (deterministic: seeded RNGs, fake clock)."""

from __future__ import annotations

import random
import statistics
import threading
from collections.abc import Iterator

from agent.rpc import Refused, TransportError
from agent.session import Session, SessionConfig, backoff_delay
from proto import ringfence_pb2 as pb


def test_schedule_is_bounded_and_grows_to_the_cap() -> None:
    rng = random.Random(7)
    for attempt in range(40):
        cap = min(30.0, 0.5 * 2 ** attempt)
        for _ in range(200):
            d = backoff_delay(attempt, 0.5, 30.0, rng)
            assert 0.25 <= d <= cap
    # Deep into an outage of days the arithmetic neither overflows nor exceeds the cap.
    assert 0.25 <= backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0
    # Same seed, same schedule: the test below is reproducible.
    a = [backoff_delay(i, 0.5, 30.0, random.Random(3)) for i in range(10)]
    b = [backoff_delay(i, 0.5, 30.0, random.Random(3)) for i in range(10)]
    assert a == b


class _DownTransport:
    """A collector that is down: every open fails like a refused TCP connection."""

    def __init__(self, refuse: bool = False) -> None:
        self.opens = 0
        self.refuse = refuse

    def open(self, outbound: Iterator[pb.AgentMessage]) -> Iterator[pb.ServerMessage]:
        self.opens += 1
        if self.refuse:
            raise Refused("PERMISSION_DENIED", "revoked")
        raise TransportError("UNAVAILABLE", "connection refused")

    def cancel(self) -> None:
        pass


class _FakeClock(threading.Event):
    """A stop event whose wait() advances a virtual clock instead of sleeping."""

    def __init__(self, attempts: int) -> None:
        super().__init__()
        self.now = 0.0
        self.attempt_times: list[float] = []
        self._left = attempts

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout > 0
        self.now += timeout
        self.attempt_times.append(self.now)
        self._left -= 1
        if self._left <= 0:
            self.set()
        return self.is_set()


def _run(seed: int, attempts: int, refuse: bool = False) -> list[float]:
    clock = _FakeClock(attempts)
    session = Session(_DownTransport(refuse), spool=_NoSpool(), hello=lambda s: pb.Hello(),
                      on_command=lambda e: None, config=SessionConfig(backoff_initial_s=0.5,
                                                                       backoff_max_s=30.0),
                      rng=random.Random(seed))
    session.run(clock)
    return clock.attempt_times


class _NoSpool:
    acked_seq = 0


def test_twenty_agents_reconnecting_after_a_restart_spread_out() -> None:
    # 20 agents lose the collector at the same instant; each retries on its own schedule.
    # Look at when each makes its 6th reconnect attempt (cap 16 s by then).
    times = [_run(seed, attempts=6)[-1] for seed in range(20)]
    assert len(times) == 20
    spread = max(times) - min(times)
    assert spread > 5.0, times
    assert statistics.pstdev(times) > 2.0, times
    # No more than a quarter of the fleet lands in any one-second window.
    worst = max(sum(1 for t in times if w <= t < w + 1.0) for w in range(int(max(times)) + 1))
    assert worst <= 5, sorted(times)
    # Per agent, successive waits grow on average (exponential backoff, not a fixed interval).
    per_agent = [_run(seed, attempts=8) for seed in range(20)]
    early = statistics.mean(t[1] - t[0] for t in per_agent)
    late = statistics.mean(t[7] - t[6] for t in per_agent)
    assert late > 4 * early


def test_refused_sessions_back_off_near_the_cap_at_once() -> None:
    # A revoked agent must not hammer the collector: its first wait already uses a high
    # exponent, so on average it is far above a fresh agent's first wait.
    refused = [_run(seed, attempts=1, refuse=True)[0] for seed in range(20)]
    fresh = [_run(seed, attempts=1)[0] for seed in range(20)]
    assert statistics.mean(refused) > 5 * statistics.mean(fresh)
