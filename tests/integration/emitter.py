"""Test-only telemetry source: runs the real agent runtime (spool, chain, session) in this
process and records synthetic process events at a fixed rate, instead of real sensors.

    python -m tests.integration.emitter --state-dir DIR --status FILE --rate 5000 --duration 10

It writes a JSON status file (seq, acked seq, rss) every 0.2 s so a test can watch it from
outside, and SIGKILL it at any moment. After `--duration` seconds it stops emitting, waits (at
most --drain-timeout) until the collector acknowledged everything, stops the agent cleanly and
writes a final status with "done": true. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from agent.runtime import Agent
from agent.spool import SpoolConfig
from agent.state import AgentPaths, Enrollment
from proto import ringfence_pb2 as pb
from tests.integration.fleet import agent_config


def _status(path: Path, agent: Agent, **extra: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"seq": agent.chain.seq, "acked": agent.spool.acked_seq,
                               "dropped": agent.chain.dropped,
                               "rss": psutil.Process().memory_info().rss, "pid": os.getpid(),
                               **extra}))
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--rate", type=float, default=5000.0, help="events per second")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of emission")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--spool-max-bytes", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = Path(args.state_dir)
    config = agent_config(state)
    if args.spool_max_bytes:
        config = type(config)(**{**config.__dict__, "spool": SpoolConfig(
            max_bytes=args.spool_max_bytes, segment_bytes=max(args.spool_max_bytes // 8, 4096),
            priority_reserve_bytes=args.spool_max_bytes // 4, fsync_interval_s=0.05)})
    paths = AgentPaths(state)
    agent = Agent(config, paths, Enrollment.load(paths))
    stop = threading.Event()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    agent.start(stop)
    status = Path(args.status)
    # Emit in 10 ms ticks so the rate is steady rather than bursty.
    tick_s = 0.01
    per_tick = max(1, round(args.rate * tick_s))
    started = time.monotonic()
    next_status = 0.0
    emitted = 0
    template = pb.Event(severity_id=1)
    proc = template.process
    proc.activity_id, proc.source = 1, "synthetic"
    proc.process.name, proc.process.uid = "synthetic", 1000
    proc.process.exe = b"/usr/bin/synthetic"
    while not stopping.is_set():
        now = time.monotonic()
        if now - started >= args.duration:
            break
        for _ in range(per_tick):
            event = pb.Event()
            event.CopyFrom(template)
            event.process.process.pid = 100_000 + emitted % 1_000_000
            agent.chain.record(event)
            emitted += 1
        if now >= next_status:
            _status(status, agent, emitted=emitted, phase="emitting")
            next_status = now + 0.2
        delay = started + (emitted / per_tick) * tick_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    deadline = time.monotonic() + args.drain_timeout
    while (agent.spool.acked_seq < agent.chain.seq and time.monotonic() < deadline
           and not stopping.is_set()):
        _status(status, agent, emitted=emitted, phase="draining")
        time.sleep(0.2)
    agent.stop(stop)
    _status(status, agent, emitted=emitted, phase="stopped", done=True,
            elapsed_s=time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
