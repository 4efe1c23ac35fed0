"""Isolation latency benchmark: how long from "the admin API accepted the isolate command" to
"the agent reported the isolation confirmed", and the same for release, with a real server
and a real agent (nftables backend) in throwaway network namespaces. Prints JSON.

Baseline in the same run: the bare `nft -f` apply of the same ruleset, timed inside the
endpoint namespace the way the agent runs it (one subprocess per apply). Run as root; it
builds its own namespaces (198.18.0.0/15, 2001:db8::/32 only) and always removes them.

Each command starts from an idle agent (`--settle-ms` pause first): the triage snapshot an
isolation triggers runs after the result and would otherwise be measured as part of the next
command. Latency = server-side `updated_ns` of the command when it reached `succeeded` minus the
client's clock when the Isolate/Release call returned (same host clock), so the client's
polling interval does not inflate it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isolation import CollectorEndpoint, Policy, plan
from isolation.lab import LabError, Topology, topology

BIN = Path(sys.executable).parent
AGENT_TOML = """\
[isolation]
backend = "nftables"
[sensors.process]
mode = "off"
[sensors.file]
enabled = false
[sensors.network]
enabled = false
[session]
heartbeat_interval_s = 5.0
"""

# Runs inside the collector namespace: drives the admin API and times each command.
CLIENT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from proto import ringfence_pb2 as pb
from server.pki import Identity
from server.rpc import AdminClient, ServerAddress
identity_path, agent_id, cycles, tls_name = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
settle_s = float(sys.argv[6])
FINAL = {"succeeded", "failed", "rejected", "expired"}
client = AdminClient(ServerAddress("127.0.0.1:8444", tls_name),
                     Identity.from_pem(open(identity_path, "rb").read()))

def timed(call):
    status = call()
    accepted_ns = time.time_ns()
    deadline = time.monotonic() + 30
    while status.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.002)
        status = client.get_command(status.command_id)
    if status.status != "succeeded":
        raise SystemExit(f"{status.action} ended {status.status}: {status.message}")
    return (status.updated_ns - accepted_ns) / 1e6

out = {"isolate_ms": [], "release_ms": []}
for i in range(cycles):
    time.sleep(settle_s)
    out["isolate_ms"].append(timed(lambda: client.isolate(pb.IsolateRequest(
        host=agent_id, reason=f"bench cycle {i}", dhcp=True, confirm_deadline_s=20))))
    time.sleep(settle_s)
    out["release_ms"].append(timed(lambda: client.release(pb.ReleaseRequest(
        host=agent_id, reason=f"bench cycle {i}"))))
print(json.dumps(out))
"""

# Runs inside the endpoint namespace: the floor, one `nft -f -` subprocess per apply.
FLOOR = r"""
import json, subprocess, sys, time
script, cycles = sys.stdin.read(), int(sys.argv[1])
reset = "add table inet ringfence\ndelete table inet ringfence\n"
times = []
for _ in range(cycles):
    t0 = time.perf_counter()
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
    times.append((time.perf_counter() - t0) * 1e3)
    subprocess.run(["nft", "-f", "-"], input=reset, text=True, check=True)
print(json.dumps(times))
"""


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(p: float) -> float:
        # Nearest-rank percentile: never interpolates below an observed value.
        index = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return round(ordered[index], 2)

    return {"p50": pick(50), "p95": pick(95), "p99": pick(99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


def run_lab(topo: Topology, work: Path, cycles: int, settle_s: float) -> dict[str, Any]:
    c = topo["collector"]
    data, state, toml = work / "server", work / "agent", work / "agent.toml"
    ringfence, agent_bin = str(BIN / "ringfence"), str(BIN / "ringfence-agent")
    topo.run("collector", ringfence, "server", "init", "--data-dir", str(data), "--address",
             c.ipv4, "--address", c.ipv6, timeout=60)
    server = topo.spawn("collector", [ringfence, "server", "run", "--data-dir", str(data),
                                      "--listen", "[::]:8443", "--enroll", "[::]:8442",
                                      "--admin", "127.0.0.1:8444"], log=work / "server.log")
    for port in (8442, 8443, 8444):
        topo.wait_port("collector", port, timeout_s=30, proc=server)
    token = topo.run("collector", ringfence, "token", "create", "--data-dir", str(data),
                     timeout=60).stdout.strip()
    toml.write_text(AGENT_TOML)
    topo.run("endpoint", agent_bin, "enroll", "--server", f"{c.ipv4}:8442", "--token", token,
             "--ca", str(data / "pki" / "ca.pem"), "--state-dir", str(state), "--config",
             str(toml), timeout=60)
    agent_id = json.loads((state / "enrollment.json").read_text())["agent_id"]
    topo.spawn("endpoint", [agent_bin, "run", "--state-dir", str(state), "--config", str(toml)],
               log=work / "agent.log")
    end = time.monotonic() + 30
    while "session established" not in (work / "agent.log").read_text():
        if time.monotonic() > end:
            raise LabError("the agent did not connect")
        time.sleep(0.1)
    identity = data / "responders" / "admin.identity.pem"
    if not identity.exists():
        raise LabError(f"admin identity {identity} not found")
    result = topo.run("collector", sys.executable, "-c", CLIENT, str(REPO), str(identity),
                      agent_id, str(cycles), c.ipv4, str(settle_s),
                      timeout=60 + cycles * (10 + 2 * settle_s))
    measured: dict[str, Any] = json.loads(result.stdout)
    policy = Policy(collectors=(CollectorEndpoint(c.ipv4, 8443), CollectorEndpoint(c.ipv6, 8443)),
                    dhcp=True, confirm_deadline_s=20)
    floor = topo.run("endpoint", sys.executable, "-c", FLOOR, str(cycles),
                     stdin=plan(policy).nft_script, timeout=60 + cycles)
    measured["nft_apply_ms"] = json.loads(floor.stdout)
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--settle-ms", type=float, default=500,
                        help="pause before each command, so each one starts from an idle agent "
                             "(the post-isolation triage snapshot of the previous command has "
                             "finished); default 500")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"error": "run as root: the benchmark builds network namespaces"}))
        return 2
    if not 1 <= args.cycles <= 1000:
        parser.error("--cycles must be within 1..1000")
    work = Path(tempfile.mkdtemp(prefix="rf-bench-iso-"))
    try:
        with topology(["collector", "endpoint"], prefix="rfb") as topo:
            measured = run_lab(topo, work, args.cycles, args.settle_ms / 1000)
    except (LabError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        stderr = getattr(e, "stderr", "") or ""
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "stderr": stderr[-2000:],
                          "work": str(work)}))
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    iso, rel, floor = (percentiles(measured[k])
                       for k in ("isolate_ms", "release_ms", "nft_apply_ms"))
    report = {
        "benchmark": "isolation_latency",
        "cycles": args.cycles,
        "settle_ms": args.settle_ms,
        "isolate_ms": iso,
        "release_ms": rel,
        "baseline_nft_apply_ms": {"p50": floor["p50"], "p99": floor["p99"]},
        "ratio_isolate_p50_to_nft_p50": round(iso["p50"] / floor["p50"], 2),
        "ratio_release_p50_to_nft_p50": round(rel["p50"] / floor["p50"], 2),
        "target_p99_ms": 100,
        "isolate_p99_met": iso["p99"] < 100,
        "release_p99_met": rel["p99"] < 100,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
