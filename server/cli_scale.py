"""CLI commands for running at scale: `ringfence server migrate` and `ringfence loadgen`.

Entry point only, registered by server.cli: parses flags and hands over to the store
(migrations) or server.loadgen. Errors are raised as the package errors server.cli prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from collector.store import is_store_url
from collector.store.base import Store
from collector.store.sqlite import SQLiteStore
from server.fleet import load_config
from server.pki import ServerPaths
from server.storage import STORE_FILE, record_store

EXIT_OK = 0


def cmd_server_migrate(args: argparse.Namespace) -> int:
    from collector.store.postgresql import PostgreSQLStore, redact

    if not is_store_url(args.store):
        raise ValueError("--store must be a postgresql:// URL (SQLite needs no migration)")
    store = PostgreSQLStore(args.store, migrate=True)
    try:
        version = store.schema_version()
        print(f"store {redact(args.store)}: schema at version {version}"
              + (f" (applied {', '.join(map(str, store.applied))})" if store.applied
                 else " (already current)"))
        if args.data_dir:
            paths = ServerPaths(Path(args.data_dir))
            load_config(paths)  # fails clearly when the directory is not initialized
            copied = _copy_responders(paths, store)
            record_store(paths, args.store)
            print(f"{args.data_dir} now uses this store (recorded in {paths.root / STORE_FILE}); "
                  f"{copied} responder identities copied into it")
    finally:
        store.close()
    return EXIT_OK


def _copy_responders(paths: ServerPaths, target: Store) -> int:
    """Responder identities made by `server init` / `responder create` before the switch live
    in the data dir's SQLite store; the shared store needs them to authenticate responders."""
    if not paths.database.exists():
        return 0
    source = SQLiteStore(paths.database)
    copied = 0
    try:
        for row in source.responders():
            if target.responder_by_fingerprint(row.cert_fingerprint) is None:
                target.add_responder(row)
                copied += 1
    finally:
        source.close()
    return copied


def cmd_loadgen(args: argparse.Namespace) -> int:
    from server.loadgen import LoadConfig, run_loadgen

    config = LoadConfig(collector=args.server, agents=args.agents, rate=args.rate,
                        duration_s=args.duration, enroll=args.enroll or "",
                        token=args.token or "", ca=Path(args.ca) if args.ca else None,
                        data_dir=Path(args.data_dir) if args.data_dir else None,
                        heartbeat_s=args.heartbeat, tls_name=args.tls_name or "localhost",
                        connect_concurrency=args.connect_concurrency,
                        processes=args.processes)
    report = run_loadgen(config)
    print(json.dumps(report, indent=2, sort_keys=True))
    return EXIT_OK


def register(sub: Any, server: Any) -> None:
    """Add `server migrate` (to the `server` group) and `loadgen` (top level)."""
    p = server.add_parser("migrate", help="create or upgrade the PostgreSQL schema")
    p.add_argument("--store", required=True, help="postgresql://USER@HOST:PORT/DB URL")
    p.add_argument("--data-dir", help="also make this data directory use the store (copies "
                   "its responder identities, records the URL)")
    p.set_defaults(func=cmd_server_migrate)

    p = sub.add_parser("loadgen", help="simulate many agents against a collector (benchmarks)")
    p.add_argument("--server", required=True, help="collector HOST:PORT")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--rate", type=float, default=100.0, help="events per second, all agents")
    p.add_argument("--duration", type=float, default=30.0, help="seconds")
    p.add_argument("--heartbeat", type=float, default=30.0, help="heartbeat interval, seconds")
    p.add_argument("--enroll", help="enrollment HOST:PORT (with --token and --ca)")
    p.add_argument("--token", help="enrollment token with at least --agents uses")
    p.add_argument("--ca", help="fleet CA certificate (PEM)")
    p.add_argument("--data-dir", help="server data dir: make a token there instead of --token")
    p.add_argument("--tls-name", help="name in the server certificate (default localhost)")
    p.add_argument("--connect-concurrency", type=int, default=64,
                   help="enrollments and session opens in flight at once")
    p.add_argument("--processes", type=int, default=0,
                   help="worker processes (default: one per 2500 agents)")
    p.set_defaults(func=cmd_loadgen)
