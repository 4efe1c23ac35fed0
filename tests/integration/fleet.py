"""Test helpers: a real ringfence server (real gRPC, real TLS from `server init`, real SQLite)
on loopback port 0, and real agents enrolled against it, run in-process or as subprocesses."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, IsolationConfig
from agent.runtime import Agent
from agent.sensors.config import SensorsConfig
from agent.state import AgentPaths, Enrollment
from agent.enroll import enroll_agent
from agent.spool import SpoolConfig
from agent.chain import ChainConfig
from agent.session import SessionConfig
from collector.store.sqlite import SQLiteStore
from server.app import RunConfig, RunningServer, start
from server.fleet import create_token, init_server
from server.pki import Identity, ServerPaths
from server.rpc import AdminClient, ServerAddress

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Fleet:
    data_dir: Path
    server: RunningServer
    paths: ServerPaths

    @property
    def store(self) -> SQLiteStore:
        return self.server.store

    def token(self, uses: int = 1, ttl_s: int = 3600) -> str:
        return create_token(self.store, uses=uses, ttl_s=ttl_s)

    @property
    def enroll_target(self) -> str:
        return f"127.0.0.1:{self.server.ports['enroll']}"

    @property
    def collector_target(self) -> str:
        return f"127.0.0.1:{self.server.ports['collector']}"

    def admin(self, name: str = "admin") -> AdminClient:
        identity = Identity.from_pem(self.paths.responder_identity(name).read_bytes())
        return AdminClient(ServerAddress(f"127.0.0.1:{self.server.ports['admin']}", "localhost"),
                           identity)

    def enroll(self, state_dir: Path, token: str | None = None) -> Enrollment:
        return enroll_agent(AgentPaths(state_dir), self.enroll_target, token or self.token(),
                            self.paths.ca_cert.read_bytes(), "localhost")


@contextlib.contextmanager
def running_fleet(base: Path, addresses: tuple[str, ...] = ("localhost", "127.0.0.1"),
                  advertise: tuple[str, ...] = (),
                  console: str | None = None) -> Iterator[Fleet]:
    data_dir = base / "server"
    init_server(data_dir, list(addresses))
    server = start(RunConfig(data_dir=data_dir, listen="127.0.0.1:0", admin="127.0.0.1:0",
                             enroll="127.0.0.1:0", advertise=advertise, console=console))
    try:
        yield Fleet(data_dir, server, ServerPaths(data_dir))
    finally:
        server.stop(grace_s=1.0)


class NullControl:
    """A collector control plane that does nothing (tests of the collector on its own)."""

    def agent_connected(self, *a: object) -> None: ...

    def agent_disconnected(self, *a: object) -> None: ...

    def events_stored(self, *a: object) -> None: ...

    def hold_ingest_s(self, agent_id: str) -> float:
        return 0.0

    def command_result(self, *a: object) -> None: ...

    def file_chunk(self, *a: object) -> None: ...


def quiet_sensors(process: str = "off") -> SensorsConfig:
    """Sensors for tests: only what the test needs, so runs stay small and deterministic."""
    return SensorsConfig.from_dict({"process": {"mode": process, "poll_interval_s": 0.1},
                                    "file": {"enabled": False},
                                    "network": {"enabled": False}})


def agent_config(state_dir: Path, sensors: SensorsConfig | None = None,
                 isolation: IsolationConfig | None = None,
                 checkpoint_interval_s: float = 0.5) -> AgentConfig:
    return AgentConfig(state_dir=state_dir, spool=SpoolConfig(fsync_interval_s=0.05),
                       chain=ChainConfig(checkpoint_interval_s=checkpoint_interval_s),
                       session=SessionConfig(backoff_initial_s=0.1, backoff_max_s=1.0,
                                             heartbeat_interval_s=1.0),
                       isolation=isolation or IsolationConfig(backend="fake"),
                       sensors=sensors or quiet_sensors())


@contextlib.contextmanager
def running_agent(config: AgentConfig) -> Iterator[Agent]:
    paths = AgentPaths(config.state_dir)
    agent = Agent(config, paths, Enrollment.load(paths))
    stop = threading.Event()
    agent.start(stop)
    try:
        yield agent
    finally:
        agent.stop(stop)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def cli(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `ringfence` console script."""
    result = subprocess.run([str(BIN / "ringfence"), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"ringfence {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def agent_cli(*args: str, timeout: float = 60,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "ringfence-agent"), *args], capture_output=True,
                            text=True, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"ringfence-agent {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def events_json(data_dir: Path, host: str, *extra: str) -> list[dict[str, Any]]:
    out = cli("events", host, "--data-dir", str(data_dir), "--json", *extra).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
