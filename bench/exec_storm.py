"""Exec-storm benchmark: spawn short-lived /bin/true processes (unique argv markers) as fast as
possible and count how many launches the netlink process sensor captured with full exe and
argv, against a psutil-polling baseline (100 ms) capturing concurrently. Prints JSON.

Each sensor runs in its own child process so its CPU time and peak RSS are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, sys.argv[3])
from agent.sensors.config import ProcessSensorConfig
from agent.sensors.process_netlink import NetlinkProcessSensor
from agent.sensors.process_psutil import PsutilProcessSensor

kind, prefix = sys.argv[1], sys.argv[2].encode()
true_exe = os.path.realpath("/bin/true").encode()
seen, lock = set(), threading.Lock()
events = [0]

def emit(ev):
    events[0] += 1
    if ev.WhichOneof("body") != "process" or ev.process.activity_id != 1:
        return
    p = ev.process.process
    if p.exe == true_exe and len(p.argv) == 2 and p.argv[1].startswith(prefix):
        with lock:
            seen.add(p.argv[1])

if kind == "netlink":
    sensor = NetlinkProcessSensor(ProcessSensorConfig())
else:
    sensor = PsutilProcessSensor(ProcessSensorConfig(poll_interval_s=0.1))
sensor.start(emit)
t0, c0 = time.monotonic(), os.times()
print("ready", flush=True)
sys.stdin.readline()
t1, c1 = time.monotonic(), os.times()
sensor.stop()
cpu = (c1.user - c0.user) + (c1.system - c0.system)
print(json.dumps({"captured": len(seen), "events": events[0], "cpu_s": cpu, "wall_s": t1 - t0,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "stats": sensor.stats()}), flush=True)
"""


def _child(kind: str, prefix: str, root: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, prefix, root],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise SystemExit(f"{kind} sensor child failed to start: {line!r}")
    return proc


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate("stop\n", timeout=60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0, help="storm duration (default 20)")
    ap.add_argument("--drain", type=float, default=2.0, help="wait for sensors afterwards")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = f"rfstorm-{uuid.uuid4().hex[:8]}-"
    netlink = _child("netlink", prefix, root)
    baseline = _child("psutil", prefix, root)
    spawned = 0
    true_exe = "/bin/true"
    t_end = time.monotonic() + args.seconds
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        pid = os.posix_spawn(true_exe, [true_exe, f"{prefix}{spawned}"], os.environ)
        os.waitpid(pid, 0)
        spawned += 1
    storm_s = time.monotonic() - t0
    time.sleep(args.drain)
    nl, ps = _finish(netlink), _finish(baseline)

    def summary(r: dict[str, Any]) -> dict[str, Any]:
        return {"captured": r["captured"], "capture_ratio": round(r["captured"] / spawned, 4)
                if spawned else 0.0,
                "cpu_percent_of_one_core": round(100.0 * r["cpu_s"] / r["wall_s"], 1),
                "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1),
                "events": r["events"], "lost": r["stats"].get("lost", 0)}

    print(json.dumps({
        "benchmark": "exec_storm",
        "seconds": round(storm_s, 2),
        "spawned": spawned,
        "spawn_rate_per_s": round(spawned / storm_s, 1),
        "netlink": summary(nl),
        "psutil_100ms_baseline": summary(ps),
        "target": {"capture_ratio": 1.0, "cpu_percent_of_one_core_below": 100.0},
    }, indent=2))


if __name__ == "__main__":
    main()
