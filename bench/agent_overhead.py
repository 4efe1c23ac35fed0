"""Agent CPU and memory under typical endpoint load; prints JSON.

Runs a real `ringfence server run` and a real `ringfence-agent run` (all sensors on, process
sensor on the proc connector, file sensor on a temp dir, flows on) on loopback, then drives a
typical load for --seconds (default 60): ~50 execs/s, ~200 file events/s in the watched dir,
~100 new TCP flows/s to a loopback listener. In the same run it measures the idle agent over
the same length as the floor. Reports agent CPU (% of one core) and RSS, and the ratio.
Targets: <= 2 % of one core and <= 50 MB RSS under load.

Usage: .venv/bin/python bench/agent_overhead.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def load(seconds: float, watched: str, port: int, execs: int, files: int, flows: int) -> None:
    """The load generator (its own process, so its CPU is not the agent's)."""
    deadline = time.monotonic() + seconds
    tick = 0.1
    n = 0
    while time.monotonic() < deadline:
        start = time.monotonic()
        for _ in range(max(1, execs // 10)):
            subprocess.run(["/bin/true", f"load-{n}"], check=False)
            n += 1
        for i in range(max(1, files // 10)):
            path = os.path.join(watched, f"f{(n + i) % 50}.txt")
            with open(path, "w") as f:
                f.write(f"{n} {i}\n")
        for _ in range(max(1, flows // 10)):
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"x")
        time.sleep(max(0.0, tick - (time.monotonic() - start)))


def listener(port_holder: list[int], stop: threading.Event) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    srv.settimeout(0.2)
    port_holder.append(srv.getsockname()[1])
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
            conn.close()
        except OSError:
            continue
    srv.close()


def sample(proc: psutil.Process, seconds: float) -> dict[str, float]:
    """CPU (% of one core, averaged over the window) and RSS peak/mean of proc + children."""
    t0 = proc.cpu_times()
    wall0 = time.monotonic()
    rss: list[int] = []
    while time.monotonic() - wall0 < seconds:
        rss.append(proc.memory_info().rss)
        time.sleep(0.5)
    t1 = proc.cpu_times()
    wall = time.monotonic() - wall0
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    return {"cpu_percent_of_one_core": round(100 * cpu / wall, 2),
            "rss_peak_mb": round(max(rss) / 2**20, 1),
            "rss_mean_mb": round(sum(rss) / len(rss) / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--flows", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rf-bench-overhead-"))
    data, state, watched = work / "server", work / "agent", work / "watched"
    watched.mkdir()
    rf, agent_bin = str(BIN / "ringfence"), str(BIN / "ringfence-agent")
    subprocess.run([rf, "server", "init", "--data-dir", str(data)], check=True,
                   capture_output=True)
    server = subprocess.Popen([rf, "server", "run", "--data-dir", str(data), "--listen",
                               "127.0.0.1:0", "--enroll", "127.0.0.1:0", "--admin",
                               "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    agent = None
    stop = threading.Event()
    try:
        run_file = data / "run" / "server.json"
        _wait(run_file.exists, 30, "server start")
        ports = json.loads(run_file.read_text())
        token = subprocess.run([rf, "token", "create", "--data-dir", str(data)], check=True,
                               capture_output=True, text=True).stdout.strip()
        subprocess.run([agent_bin, "enroll", "--server", f"127.0.0.1:{ports['enroll_port']}",
                        "--token", token, "--ca", str(data / "pki" / "ca.pem"), "--tls-name",
                        "localhost", "--state-dir", str(state)], check=True, capture_output=True)
        config = work / "agent.toml"
        config.write_text(f'[sensors.file]\npaths = ["{watched}"]\n[sensors.network]\n'
                          'dns = false\n[isolation]\nbackend = "fake"\n')
        agent = subprocess.Popen([agent_bin, "run", "--state-dir", str(state), "--config",
                                  str(config)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        proc = psutil.Process(agent.pid)
        time.sleep(5)  # start-up (imports, first scans) is not steady state
        idle = sample(proc, args.seconds)
        port: list[int] = []
        threading.Thread(target=listener, args=(port, stop), daemon=True).start()
        _wait(lambda: port, 5, "listener")
        gen = multiprocessing.Process(target=load, args=(args.seconds + 1, str(watched), port[0],
                                                         args.execs, args.files, args.flows))
        gen.start()
        time.sleep(0.5)
        loaded = sample(proc, args.seconds)
        gen.join()
        result = {
            "benchmark": "agent_overhead",
            "seconds": args.seconds,
            "load": {"execs_per_s": args.execs, "file_events_per_s": args.files,
                     "new_flows_per_s": args.flows},
            "idle_agent_floor": idle,
            "agent_under_load": loaded,
            "cpu_ratio_load_over_idle": round(loaded["cpu_percent_of_one_core"]
                                              / max(idle["cpu_percent_of_one_core"], 0.01), 2),
            "targets": {"cpu_percent_of_one_core_max": 2.0, "rss_mb_max": 50},
            "meets_cpu_target": loaded["cpu_percent_of_one_core"] <= 2.0,
            "meets_rss_target": loaded["rss_peak_mb"] <= 50,
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        stop.set()
        for p in (agent, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
