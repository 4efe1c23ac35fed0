"""The `ringfence-agent` command line: `enroll`, `run`, `status`, `--version`.

Entry point only: parses flags, configures logging, builds the config once and hands it to
agent.enroll or agent.runtime. Errors reach the user as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from agent.rpc import TransportError
from agent.state import AgentPaths, Enrollment, StateError

logger = logging.getLogger("ringfence.agent")


def version_text() -> str:
    frozen = "one-file binary" if getattr(sys, "frozen", False) else "python package"
    return (f"ringfence-agent {__version__} ({frozen}; Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()})")


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll_agent

    config = load_config(Path(args.config) if args.config else DEFAULT_CONFIG_PATH,
                         Path(args.state_dir) if args.state_dir else None)
    ca_pem = Path(args.ca).read_bytes()
    enrollment = enroll_agent(AgentPaths(config.state_dir), args.server, args.token, ca_pem,
                              args.tls_name)
    print(f"enrolled: agent id {enrollment.agent_id}; state in {config.state_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime import Agent

    config = load_config(Path(args.config) if args.config else DEFAULT_CONFIG_PATH,
                         Path(args.state_dir) if args.state_dir else None)
    paths = AgentPaths(config.state_dir)
    agent = Agent(config, paths, Enrollment.load(paths))
    stop = threading.Event()
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start(stop)
    print(f"ringfence-agent {agent.agent_id} running (sensors: "
          f"{', '.join(f'{k}={v}' for k, v in sorted(agent.sensor_modes().items()))})",
          flush=True)
    stopping.wait()
    logger.info("stopping")
    agent.stop(stop)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config) if args.config else DEFAULT_CONFIG_PATH,
                         Path(args.state_dir) if args.state_dir else None)
    paths = AgentPaths(config.state_dir)
    enrollment = Enrollment.load(paths)
    isolation_file = paths.isolation / "isolation.json"
    print(json.dumps({"agent_id": enrollment.agent_id,
                      "server": enrollment.collector_target,
                      "isolated": isolation_file.exists()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfence-agent",
                                     description="ringfence endpoint agent")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", help="state directory (default /var/lib/ringfence)")
        p.add_argument("--config", help=f"TOML config (default {DEFAULT_CONFIG_PATH})")

    p = sub.add_parser("enroll", help="enroll this host with a token")
    p.add_argument("--server", required=True, help="enrollment HOST:PORT of the server")
    p.add_argument("--token", required=True)
    p.add_argument("--ca", required=True, help="the fleet CA certificate (PEM)")
    p.add_argument("--tls-name", help="name in the server certificate, if not HOST")
    common(p)
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser("run", help="run the agent")
    common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="show enrollment and isolation state")
    common(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TransportError as e:
        print(f"ringfence-agent: the server refused or could not be reached: {e.message}",
              file=sys.stderr)
        return 1
    except (ConfigError, StateError, ValueError) as e:
        print(f"ringfence-agent: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"ringfence-agent: {e.filename}: no such file", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
