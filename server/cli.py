"""The `ringfence` command line: server set-up and run, tokens, responders, and the responder
commands that talk to the admin API.

Entry point only: it parses arguments, builds frozen configs, configures logging, and prints.
Every error reaches the user as one line saying what to do, with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.logs import LOG_FORMATS, configure_logging
from collector.store.base import NotFound, Store, StoreError
from collector.store.sqlite import token_digest
from evidence.bundle import TrustSet, report_to_dicts, verify_bundle
from evidence.errors import BundleVerificationError, EvidenceError
from evidence.keys import load_public_key, public_key_from_bytes
from proto import ringfence_pb2 as pb
from server import cli_scale, cli_ux
from server.admin import InvalidRequest
from server.cli_packaging import register as register_packaging_commands
from server.cli_ux import EXIT_EPILOG, print_table
from server.codec import ProtoEventCodec, parse_event
from server.detection import DetectionError
from server.export import summary, to_jsonl, to_ocsf, to_timesketch
from server.fleet import (
    TOKEN_ID_HEX,
    FleetError,
    create_responder,
    create_token,
    init_server,
    load_config,
    parse_duration,
    token_id,
)
from server.pki import CertificateAuthority, Identity, PKIError, ServerPaths
from server.rpc import AdminClient, ClientError, ServerAddress
from server.storage import StorageConfigError, open_server_store

logger = logging.getLogger("ringfence")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = cli_ux.EXIT_OK, cli_ux.EXIT_FAIL, cli_ux.EXIT_USAGE
FINAL = frozenset({"succeeded", "failed", "rejected", "expired"})


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class ServerNotRunning(CLIError):
    """No running server was found for a data directory (exit status 3)."""


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ringfence {version('ringfence')}"
    except PackageNotFoundError:
        return "ringfence (source tree, not installed)"


def parse_time(text: str | None) -> int:
    """'15m' (ago), an ISO 8601 time, or epoch seconds -> epoch ns; None/'' -> 0."""
    if not text:
        return 0
    try:
        return time.time_ns() - parse_duration(text) * 1_000_000_000
    except ValueError:
        pass
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text)
    except ValueError as e:
        raise CLIError(f"{text!r} is not a time: use 15m, 2h, 7d, an ISO 8601 time or epoch "
                       "seconds") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp() * 1e9)


def fmt_time(ns: int) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


# -- server-side commands --------------------------------------------------------------------------

def cmd_server_init(args: argparse.Namespace) -> int:
    identity = init_server(Path(args.data_dir), args.address or [],
                           collector_port=args.collector_port, enroll_port=args.enroll_port)
    paths = ServerPaths(Path(args.data_dir))
    if args.json:
        _print_json({"data_dir": str(args.data_dir), "ca_certificate": str(paths.ca_cert),
                     "signing_public_key": str(paths.signing_public),
                     "admin_identity": str(identity)})
        return EXIT_OK
    print(f"fleet initialized in {args.data_dir}")
    print(f"  CA certificate (give to agents): {paths.ca_cert}")
    print(f"  server signing key (public):     {paths.signing_public}")
    print(f"  admin responder identity:        {identity}")
    return EXIT_OK


def cmd_server_run(args: argparse.Namespace) -> int:
    from server.app import RunConfig, start

    data_dir = Path(args.data_dir)
    fleet = load_config(ServerPaths(data_dir))
    config = RunConfig(
        data_dir=data_dir, listen=args.listen or f"0.0.0.0:{fleet.collector_port}",
        admin=args.admin, enroll=args.enroll or f"0.0.0.0:{fleet.enroll_port}",
        store=args.store or "", max_sessions=args.max_sessions,
        advertise=tuple(args.advertise or ()), console=_console_address(args),
        console_url=args.console_url or "")
    running = start(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d: shutting down (grace %.0f s)", signum, 5.0)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"ringfence server running: enroll :{running.ports['enroll']}, collector "
          f":{running.ports['collector']}, admin {config.admin.rsplit(':', 1)[0]}:"
          f"{running.ports['admin']}" + (f", console http://{config.console.rsplit(':', 1)[0]}:"
                                         f"{running.ports['console']}" if config.console
                                         else ""), flush=True)
    stop.wait()
    running.stop()
    return EXIT_OK


def _console_address(args: argparse.Namespace) -> str | None:
    """--console HOST:PORT, 'off', or by default the admin API's host on port 8445 (port 0,
    any free port, when the admin API itself was given port 0, as tests do)."""
    if args.console == "off":
        return None
    if args.console:
        return str(args.console)
    host, _, port = args.admin.rpartition(":")
    return f"{host}:{0 if port == '0' else 8445}"


def cmd_console_login(args: argparse.Namespace) -> int:
    with _client(args) as client:
        login = client.console_login()
    if args.json:
        _print_json({"url": login.url, "expires_ns": login.expires_ns,
                     "expires": fmt_time(login.expires_ns), "actor": login.actor,
                     "role": login.role})
        return EXIT_OK
    print(login.url)
    print(f"one-time login for {login.actor} ({login.role}); open it before "
          f"{fmt_time(login.expires_ns)} UTC, it works once", file=sys.stderr)
    return EXIT_OK


def _open_store(args: argparse.Namespace) -> Store:
    paths = ServerPaths(Path(args.data_dir))
    load_config(paths)  # fails clearly when the directory is not initialized
    return open_server_store(paths)


def cmd_token_create(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        ttl = parse_duration(args.ttl)
        token = create_token(store, uses=args.uses, ttl_s=ttl)
    finally:
        store.close()
    if args.json:
        _print_json({"token": token, "token_id": token_id(token), "uses": args.uses,
                     "ttl_s": ttl})
        return EXIT_OK
    # stdout carries only the token (scripts capture it); the id to revoke it by goes to stderr.
    print(token)
    print(f"token id {token_id(token)} (revoke with `ringfence token revoke {token_id(token)}`)",
          file=sys.stderr)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        if args.token.startswith("rft_"):
            store.revoke_token(token_digest(args.token))
            revoked = token_id(args.token)
        else:
            revoked = store.revoke_token_by_id(args.token).hex()[:TOKEN_ID_HEX]
    except NotFound as e:
        raise CLIError(f"{e}; nothing was revoked") from e
    finally:
        store.close()
    if args.json:
        _print_json({"token_id": revoked, "revoked": True})
        return EXIT_OK
    print(f"token {revoked} revoked: it can no longer enroll agents")
    return EXIT_OK


def cmd_agent_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.revoke_agent(args.host, args.reason)
    if args.json:
        _print_json({"agent_id": response.agent_id, "revoked": True,
                     "session_closed": response.session_closed})
        return EXIT_OK
    print(f"agent {response.agent_id} revoked: its certificate is refused from now on"
          + ("; its live session was closed" if response.session_closed else ""))
    return EXIT_OK


def cmd_responder_create(args: argparse.Namespace) -> int:
    paths = ServerPaths(Path(args.data_dir))
    store = _open_store(args)
    try:
        path = create_responder(store, paths, CertificateAuthority.load(paths), args.name,
                                args.role)
    finally:
        store.close()
    if args.json:
        _print_json({"name": args.name, "role": args.role, "identity": str(path)})
        return EXIT_OK
    print(f"responder {args.name} ({args.role}) identity: {path}")
    return EXIT_OK


# -- responder commands (admin API) ----------------------------------------------------------------

def _client(args: argparse.Namespace) -> AdminClient:
    if args.server and args.identity:
        identity = Identity.from_pem(Path(args.identity).read_bytes())
        target = args.server
        tls_name = args.tls_name or target.rsplit(":", 1)[0]
    elif args.data_dir:
        paths = ServerPaths(Path(args.data_dir))
        fleet = load_config(paths)
        run = paths.root / "run" / "server.json"
        try:
            target = json.loads(run.read_text())["admin"]
        except FileNotFoundError as e:
            raise ServerNotRunning(f"no running server found for {paths.root}: start it with "
                           f"`ringfence server run --data-dir {paths.root}`") from e
        identity = Identity.from_pem(Path(args.identity or
                                          paths.responder_identity("admin")).read_bytes())
        tls_name = args.tls_name or fleet.addresses[0]
        if args.server:
            target = args.server
    else:
        raise CLIError("say where the server is: --data-dir DIR, or --server HOST:PORT "
                       "--identity FILE")
    return AdminClient(ServerAddress(target, tls_name), identity)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def host_dict(h: pb.Host) -> dict[str, Any]:
    return {"agent_id": h.agent_id, "hostname": h.hostname, "online": h.online,
            "last_seen": fmt_time(h.last_seen_ns), "last_seen_ns": h.last_seen_ns,
            "agent_version": h.agent_version, "last_seq": h.last_seq,
            "integrity_alerts": h.integrity_alerts, "open_alerts": h.open_alerts,
            "isolation": {"state": h.isolation_state or "none",
                          "changed": fmt_time(h.isolation_changed_ns),
                          "changed_ns": h.isolation_changed_ns, "reason": h.isolation_reason},
            "sensors": dict(h.sensors), "os": h.os, "addresses": list(h.addresses),
            "revoked": h.revoked}


def cmd_hosts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        hosts = client.list_hosts()
    if args.json:
        _print_json([host_dict(h) for h in hosts])
        return EXIT_OK
    if not hosts:
        print("no hosts enrolled yet: `ringfence token create`, then `ringfence-agent enroll`")
        return EXIT_OK
    print_table(["HOSTNAME", "AGENT ID", "STATE", "LAST SEEN (UTC)", "SEQ", "ISOLATION",
                 "ALERTS", "INTEGRITY"],
                [(h.hostname, h.agent_id, "online" if h.online else "offline",
                  fmt_time(h.last_seen_ns), h.last_seq, h.isolation_state or "none",
                  h.open_alerts, h.integrity_alerts or "ok") for h in hosts])
    return EXIT_OK


FOLLOW_POLL_S = 1.0


def cmd_events(args: argparse.Namespace) -> int:
    request = pb.QueryEventsRequest(host=args.host, since_ns=parse_time(args.since),
                                    until_ns=parse_time(args.until), kind=args.kind or "",
                                    limit=args.limit)
    fmt = "jsonl" if args.json and args.format == "text" else args.format
    render: Callable[[pb.Event, str], dict[str, Any]] = {
        "ocsf": to_ocsf, "timesketch": to_timesketch}.get(fmt, to_jsonl)
    writer = cli_ux.CSVEvents(sys.stdout) if fmt == "csv" else None

    def emit(stored: pb.StoredEvent) -> None:
        event = parse_event(stored.event)
        if fmt == "text":
            print(f"{fmt_time(event.time_ns)} #{stored.seq:<7} "
                  f"{event.WhichOneof('body') or '?':<11} {summary(event)}", flush=args.follow)
        elif writer is not None:
            writer.write(event, stored.agent_id, stored.chain_hash)
        else:
            row = render(event, stored.agent_id)
            if fmt == "jsonl":
                row = {**row, "chain_hash": stored.chain_hash}
            print(json.dumps(row, sort_keys=True), flush=args.follow)

    last = 0
    with _client(args) as client:
        for stored in client.query_events(request):
            emit(stored)
            last = max(last, stored.seq)
        if not args.follow:
            return EXIT_OK
        # Follow: poll for events after the last one shown, until Ctrl-C or --follow-timeout.
        deadline = time.monotonic() + args.follow_timeout if args.follow_timeout else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(FOLLOW_POLL_S)
            request = pb.QueryEventsRequest(host=args.host, kind=args.kind or "",
                                            limit=args.limit, after_seq=last)
            for stored in client.query_events(request):
                emit(stored)
                last = max(last, stored.seq)
    return EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    """All of a host's events in a time range as a Timesketch JSONL import file."""
    out = Path(args.output)
    tmp = out.with_name(out.name + ".partial")
    count = 0
    last = 0
    since, until = parse_time(args.since), parse_time(args.until)
    with _client(args) as client, tmp.open("w", encoding="utf-8") as f, \
            cli_ux.status_spinner(f"exporting {args.host}", not args.json) as update:
        while True:  # pages of at most PAGE events, bounded by the host's stored history
            page = 0
            for stored in client.query_events(pb.QueryEventsRequest(
                    host=args.host, since_ns=since, until_ns=until, limit=TIMELINE_PAGE,
                    after_seq=last)):
                f.write(cli_ux.timesketch_line(parse_event(stored.event), stored.agent_id,
                                               stored.chain_hash) + "\n")
                last = stored.seq
                page += 1
            count += page
            update(f"{count} events")
            if page < TIMELINE_PAGE:
                break
    tmp.replace(out)
    if args.json:
        _print_json({"host": args.host, "output": str(out), "events": count,
                     "format": "timesketch-jsonl"})
    else:
        print(f"{count} events of {args.host} written to {out} (Timesketch JSONL: import with "
              f"`timesketch_importer` or the web upload)")
    return EXIT_OK


TIMELINE_PAGE = 10_000


def cmd_integrity(args: argparse.Namespace) -> int:
    with _client(args) as client:
        alerts = client.integrity(args.host)
    rows = [{"agent_id": a.agent_id, "kind": a.kind, "seq": a.seq, "detail": a.detail,
             "time": fmt_time(a.time_ns)} for a in alerts]
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no integrity alerts: every stored event verified against the agent's chain")
    else:
        print_table(["TIME (UTC)", "AGENT", "KIND", "SEQ", "DETAIL"],
                    [(r["time"], r["agent_id"], r["kind"], r["seq"], r["detail"])
                     for r in rows])
    return EXIT_OK


def _parse_allow(text: str) -> pb.AllowRule:
    """CIDR[:PORT][/tcp|/udp][@in|@out|@both]; IPv6 with a port as [CIDR]:PORT."""
    direction = "both"
    if "@" in text:
        text, direction = text.rsplit("@", 1)
    protocol = "any"
    for proto in ("tcp", "udp"):
        if text.endswith("/" + proto):
            text, protocol = text[: -len(proto) - 1], proto
    port = 0
    if text.startswith("["):
        cidr, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        cidr, port_text = text.split(":")
        port = int(port_text)
    else:
        cidr = text
    if port and protocol == "any":
        protocol = "tcp"
    return pb.AllowRule(cidr=cidr, protocol=protocol, port=port, direction=direction)


def _wait(client: AdminClient, status: pb.CommandStatus, timeout_s: float) -> pb.CommandStatus:
    deadline = time.monotonic() + timeout_s
    with cli_ux.status_spinner(f"{status.action} {status.agent_id[:8]}") as update:
        while status.status not in FINAL and time.monotonic() < deadline:
            time.sleep(0.1)
            status = client.get_command(status.command_id)
            detail = json.loads(status.detail_json or "{}")
            done = detail.get("files_done") if isinstance(detail, dict) else None
            update(status.status + (f", {done} files" if done is not None else ""))
    return status


def _report_command(args: argparse.Namespace, status: pb.CommandStatus) -> int:
    if getattr(args, "json", False):
        _print_json({"command_id": status.command_id, "agent_id": status.agent_id,
                     "action": status.action, "status": status.status,
                     "message": status.message,
                     "detail": json.loads(status.detail_json or "{}")})
    else:
        print(f"{status.action} {status.agent_id}: {status.status}"
              + (f" - {status.message}" if status.message else "")
              + f" (command {status.command_id})")
    if getattr(args, "wait", False):
        return EXIT_OK if status.status == "succeeded" else EXIT_FAIL
    return EXIT_OK


def cmd_isolate(args: argparse.Namespace) -> int:
    try:
        allow = [_parse_allow(a) for a in args.allow or []]
    except ValueError as e:
        raise CLIError(f"--allow must look like 198.51.100.0/24:22/tcp or [2001:db8::/32]:443: "
                       f"{e}") from e
    request = pb.IsolateRequest(host=args.host, reason=args.reason, allow=allow,
                                dns=args.dns or [], dhcp=not args.no_dhcp,
                                confirm_deadline_s=args.confirm_deadline)
    with _client(args) as client:
        status = client.isolate(request)
        if args.wait:
            status = _wait(client, status, args.timeout)
    return _report_command(args, status)


def cmd_release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.release(pb.ReleaseRequest(host=args.host, reason=args.reason))
        if args.wait:
            status = _wait(client, status, args.timeout)
    return _report_command(args, status)


def cmd_collect(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.collect(pb.CollectRequest(host=args.host, paths=args.paths,
                                                  reason=args.reason or ""))
        if args.wait:
            status = _wait(client, status, args.timeout)
    return _report_command(args, status)


def cmd_triage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.triage(pb.TriageRequest(host=args.host, reason=args.reason or ""))
        if args.wait:
            status = _wait(client, status, args.timeout)
    return _report_command(args, status)


def cmd_bundle_create(args: argparse.Namespace) -> int:
    request = pb.CreateBundleRequest(host=args.host, case_id=args.case,
                                     since_ns=parse_time(args.since),
                                     until_ns=parse_time(args.until),
                                     with_files=args.with_files, reason=args.reason or "")
    out = Path(args.output) if args.output else None
    bundle_id = ""
    tmp: Path | None = None
    with _client(args) as client:
        chunks = client.create_bundle(request)
        handle = None
        size = 0
        try:
            with cli_ux.byte_progress("downloading bundle", enabled=not args.json) as progress:
                for chunk in chunks:
                    if handle is None:
                        bundle_id = chunk.bundle_id
                        out = out or Path(f"ringfence-bundle-{bundle_id}.zip")
                        tmp = out.with_name(out.name + ".partial")
                        handle = tmp.open("wb")
                    handle.write(chunk.data)
                    size += len(chunk.data)
                    progress.advance(len(chunk.data))
        finally:
            if handle is not None:
                handle.close()
    if tmp is None or out is None:
        raise CLIError("the server sent no bundle data; check the server log")
    tmp.replace(out)
    if args.json:
        _print_json({"bundle_id": bundle_id, "output": str(out), "bytes": size,
                     "case_id": args.case})
        return EXIT_OK
    print(f"bundle {bundle_id} written to {out} ({size} bytes); verify it with "
          f"`ringfence bundle verify {out}`")
    return EXIT_OK


def _trust_from(args: argparse.Namespace, path: Path) -> TrustSet:
    """Pinned keys: --trust files (server and agent public keys, PEM), or the data dir's."""
    server_keys = []
    agent_keys = []
    for key_path in args.trust or []:
        server_keys.append(load_public_key(key_path))
    for key_path in args.trust_agent or []:
        agent_keys.append(load_public_key(key_path))
    if args.data_dir:
        paths = ServerPaths(Path(args.data_dir))
        server_keys.append(load_public_key(paths.signing_public))
        store = open_server_store(paths)
        try:
            agent_keys.extend(public_key_from_bytes(a.identity_key) for a in store.list_agents())
        finally:
            store.close()
    if not server_keys:
        raise CLIError("pin the server key: --trust SERVER_KEY.pub (from the server's "
                       "pki/signing.pub), or --data-dir DIR on the server itself")
    if not agent_keys:
        raise CLIError("pin the agent key: --trust-agent AGENT_KEY.pub (exported with "
                       "`ringfence agent key HOST`), or --data-dir DIR on the server itself")
    return TrustSet.of(server_keys, agent_keys)


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    path = Path(args.file)
    trust = _trust_from(args, path)
    try:
        verified = verify_bundle(path, trust, ProtoEventCodec())
    except BundleVerificationError as e:
        report = report_to_dicts(e.report)
        if args.json:
            _print_json({"ok": False, "report": report})
        else:
            for row in report:
                print(f"{'ok  ' if row['ok'] else 'FAIL'}  {row['member']}: {row['reason']}")
            failed = [r for r in report if not r["ok"]]
            print(f"\nbundle {path} FAILED verification: {len(failed)} check(s) failed")
        return EXIT_FAIL
    report = report_to_dicts(verified.report)
    if args.json:
        _print_json({"ok": True, "bundle_id": verified.manifest.bundle_id,
                     "case_id": verified.manifest.case_id, "events": verified.event_count,
                     "seq": [verified.start_seq + 1, verified.end_seq],
                     "checkpoints": len(verified.checkpoints), "files": len(verified.files),
                     "report": report})
    else:
        for row in report:
            print(f"ok    {row['member']}: {row['reason']}")
        print(f"\nbundle {verified.manifest.bundle_id} (case {verified.manifest.case_id}) "
              f"verified: {verified.event_count} events, seq {verified.start_seq + 1}.."
              f"{verified.end_seq}, {len(verified.checkpoints)} agent-signed checkpoints, "
              f"{len(verified.files)} files")
    return EXIT_OK


def cmd_agent_key(args: argparse.Namespace) -> int:
    from evidence.keys import public_key_pem

    store = _open_store(args)
    try:
        agent = store.find_agent(args.host)
    finally:
        store.close()
    pem = public_key_pem(public_key_from_bytes(agent.identity_key)).decode()
    if args.json:
        _print_json({"agent_id": agent.agent_id, "hostname": agent.hostname,
                     "public_key_pem": pem})
        return EXIT_OK
    sys.stdout.write(pem)
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.audit()
    if args.verify:
        if response.verified:
            print(f"audit log verified: {len(response.records)} records, chain intact")
            return EXIT_OK
        print(f"audit log FAILED verification: {response.verify_error}")
        return EXIT_FAIL
    rows = [{"seq": r.seq, "time": fmt_time(r.time_ns), "actor": r.actor, "role": r.role,
             "action": r.action, "target": r.target, "reason": r.reason, "outcome": r.outcome,
             "hash": r.hash} for r in response.records]
    if args.json:
        _print_json({"verified": response.verified, "verify_error": response.verify_error,
                     "records": rows})
    else:
        print_table(["SEQ", "TIME (UTC)", "ACTOR", "ROLE", "ACTION", "TARGET", "OUTCOME",
                     "REASON"],
                    [(r["seq"], r["time"], r["actor"], r["role"], r["action"], r["target"],
                      r["outcome"], r["reason"]) for r in rows])
        print("chain: " + ("verified" if response.verified else
                           f"BROKEN - {response.verify_error}"))
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------------

def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="server data directory (finds the server and admin identity)")
    p.add_argument("--server", help="admin API HOST:PORT")
    p.add_argument("--identity", help="responder identity file (PEM: key, certificate, CA)")
    p.add_argument("--tls-name", help="name in the server certificate, if not the host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfence", description=(
        "ringfence: forensics and isolation for Linux fleets (server and responder CLI)"),
        epilog=EXIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json (one object per line, for log shippers)")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="set up and run the server").add_subparsers(
        dest="server_command", required=True)
    p = server.add_parser("init", help="create the fleet CA, server keys and an admin identity")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--address", action="append",
                   help="name or IP agents use to reach the server (repeatable; default "
                        "localhost and 127.0.0.1)")
    p.add_argument("--collector-port", type=int, default=8443)
    p.add_argument("--enroll-port", type=int, default=8442)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_server_init)
    p = server.add_parser("run", help="run the enrollment, collector and admin listeners")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--listen", help="collector HOST:PORT (default 0.0.0.0:8443)")
    p.add_argument("--admin", default="127.0.0.1:8444", help="admin API HOST:PORT")
    p.add_argument("--enroll", help="enrollment HOST:PORT (default 0.0.0.0:8442)")
    p.add_argument("--advertise", action="append",
                   help="collector address isolated agents must still reach (default: the "
                        "addresses given to `server init`)")
    p.add_argument("--console", help="web console and /metrics HOST:PORT (default: the admin "
                                     "host, port 8445), or 'off'")
    p.add_argument("--console-url", help="base URL printed in console login links, when the "
                                         "console sits behind a proxy")
    p.add_argument("--store", help="postgresql://... URL of a shared store (default: the one "
                   "recorded by `server migrate`, else DATA/ringfence.db)")
    p.add_argument("--max-sessions", type=int, default=10_000,
                   help="agent streams this node holds at once; more are refused with "
                        "RESOURCE_EXHAUSTED (default 10000)")
    p.set_defaults(func=cmd_server_run)
    cli_scale.register(sub, server)

    console = sub.add_parser("console", help="the web console").add_subparsers(
        dest="console_command", required=True)
    p = console.add_parser("login", help="print a one-time console login URL for your identity")
    _add_connection(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_console_login)

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="token_command", required=True)
    p = token.add_parser("create", help="print a new enrollment token")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--uses", type=int, default=1)
    p.add_argument("--ttl", default="24h", help="lifetime, e.g. 30m, 24h, 7d")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_create)
    p = token.add_parser("revoke", help="revoke an enrollment token so it enrolls no more agents")
    p.add_argument("token", help="the token itself, or its id (hex, as printed at creation)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_revoke)

    responder = sub.add_parser("responder", help="responder identities").add_subparsers(
        dest="responder_command", required=True)
    p = responder.add_parser("create", help="issue a responder identity with a role")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["viewer", "responder", "admin"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_responder_create)

    agent = sub.add_parser("agent", help="agent records").add_subparsers(
        dest="agent_command", required=True)
    p = agent.add_parser("key", help="print an agent's evidence-signing public key (PEM)")
    p.add_argument("host")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_agent_key)
    p = agent.add_parser("revoke", help="revoke an agent: refuse its certificate, end its session")
    p.add_argument("host", help="agent id or hostname")
    p.add_argument("--reason", required=True)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_agent_revoke)

    p = sub.add_parser("hosts", help="list the fleet")
    _add_connection(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hosts)

    p = sub.add_parser("events", help="query a host's stored events")
    p.add_argument("host", help="agent id or hostname")
    _add_connection(p)
    p.add_argument("--since", help="15m, 2h, ISO 8601 or epoch seconds")
    p.add_argument("--until")
    p.add_argument("--kind", choices=["process", "file", "network", "dns", "lifecycle",
                                      "isolation", "gap", "sensor_loss", "acquisition",
                                      "command", "triage", "response"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--format", default="text",
                   choices=["text", "jsonl", "ocsf", "timesketch", "csv"])
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new events as they arrive (Ctrl-C to stop)")
    p.add_argument("--follow-timeout", type=float, default=0,
                   help="stop following after this many seconds (default: never)")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("timeline", help="export a host's events as a Timesketch JSONL file")
    p.add_argument("host", help="agent id or hostname")
    p.add_argument("-o", "--output", required=True, help="FILE.jsonl to write")
    p.add_argument("--since", help="15m, 2h, ISO 8601 or epoch seconds")
    p.add_argument("--until")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_timeline)

    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(func=lambda a: print(cli_ux.bash_completion(build_parser())) or EXIT_OK)

    p = sub.add_parser("integrity", help="integrity alerts of a host (or all hosts)")
    p.add_argument("host", nargs="?", default="")
    _add_connection(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_integrity)

    p = sub.add_parser("isolate", help="cut a host off the network (keeps the collector)")
    p.add_argument("host")
    p.add_argument("--reason", required=True)
    p.add_argument("--allow", action="append",
                   help="CIDR[:PORT][/tcp|/udp][@in|@out|@both] kept reachable (repeatable)")
    p.add_argument("--dns", action="append", help="resolver IP kept reachable (repeatable)")
    p.add_argument("--no-dhcp", action="store_true", help="block DHCP too")
    p.add_argument("--confirm-deadline", type=int, default=20,
                   help="seconds the agent has to reach the collector through the new rules "
                        "before it reverts (default 20)")
    p.add_argument("--wait", action="store_true", help="wait until isolation is confirmed")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_isolate)

    p = sub.add_parser("release", help="lift isolation, restoring the previous firewall state")
    p.add_argument("host")
    p.add_argument("--reason", required=True)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("collect", help="acquire files from a host (hashed and agent-signed)")
    p.add_argument("host")
    p.add_argument("paths", nargs="+")
    p.add_argument("--reason")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("triage", help="record a volatile-state snapshot of a host")
    p.add_argument("host")
    p.add_argument("--reason")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_triage)

    bundle = sub.add_parser("bundle", help="evidence bundles").add_subparsers(
        dest="bundle_command", required=True)
    p = bundle.add_parser("create", help="build a signed evidence bundle for a case")
    p.add_argument("host")
    p.add_argument("--case", required=True)
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--with-files", action="store_true")
    p.add_argument("--reason")
    p.add_argument("-o", "--output")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_bundle_create)
    p = bundle.add_parser("verify", help="verify a bundle offline against pinned keys")
    p.add_argument("file")
    p.add_argument("--trust", action="append", help="pinned server public key (PEM)")
    p.add_argument("--trust-agent", action="append", help="pinned agent public key (PEM)")
    p.add_argument("--data-dir", help="on the server: pin its key and its agents' keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bundle_verify)

    p = sub.add_parser("audit", help="the hash-chained audit log of responder actions")
    p.add_argument("action", nargs="?", choices=["verify"])
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=lambda a: cmd_audit(argparse.Namespace(**{**vars(a),
                                                                 "verify": a.action == "verify"})))
    # Imported here: server.cli_incident builds on this module's helpers.
    from server.cli_incident import register as register_incident
    register_incident(sub)
    register_packaging_commands(sub)
    from server.cli_detection import register as register_detection
    register_detection(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    try:
        return int(args.func(args))
    except ClientError as e:
        print(f"ringfence: {e}", file=sys.stderr)
        return cli_ux.exit_code_for(e.code)
    except ServerNotRunning as e:
        print(f"ringfence: {e}", file=sys.stderr)
        return cli_ux.EXIT_UNREACHABLE
    except DetectionError as e:
        print(f"ringfence: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (CLIError, ClientError, FleetError, PKIError, InvalidRequest, EvidenceError,
            StoreError, StorageConfigError, ValueError) as e:
        print(f"ringfence: {e}", file=sys.stderr)
        return EXIT_FAIL
    except FileNotFoundError as e:
        print(f"ringfence: {e.filename}: no such file", file=sys.stderr)
        return cli_ux.EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return cli_ux.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
