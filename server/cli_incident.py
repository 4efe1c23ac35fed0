"""`ringfence` commands of the incident workflow: targeted containment (kill, quarantine,
unquarantine, block, unblock, lock-user, unlock-user), cases (create, list, show, link, close,
report) and root-cause stories.

Entry point only, like server.cli: it parses, calls the admin API, and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from proto import ringfence_pb2 as pb
from server.cli import (
    EXIT_FAIL,
    EXIT_OK,
    CLIError,
    _add_connection,
    _client,
    _print_json,
    _report_command,
    _wait,
    fmt_time,
    parse_time,
)
from server.report import render_html, render_markdown
from server.story import render_text


def _contain(args: argparse.Namespace, request: pb.ContainRequest) -> int:
    request.host = args.host
    request.reason = args.reason
    request.case_id = args.case or ""
    with _client(args) as client:
        status = client.contain(request)
        if args.wait:
            status = _wait(client, status, args.timeout)
    return _report_command(args, status)


def cmd_kill(args: argparse.Namespace) -> int:
    start = parse_time(args.start_time) if args.start_time else 0
    return _contain(args, pb.ContainRequest(kill=pb.KillRequest(
        pid=args.pid, tree=args.tree, start_time_ns=start, exe=args.exe or "")))


def cmd_quarantine(args: argparse.Namespace) -> int:
    return _contain(args, pb.ContainRequest(quarantine=pb.QuarantineRequest(path=args.path)))


def cmd_unquarantine(args: argparse.Namespace) -> int:
    return _contain(args, pb.ContainRequest(
        unquarantine=pb.UnquarantineRequest(quarantine_id=args.id)))


def cmd_block(args: argparse.Namespace) -> int:
    if not args.ip and not args.domain:
        raise CLIError("say what to block: --ip CIDR and/or --domain NAME (repeatable)")
    return _contain(args, pb.ContainRequest(block=pb.BlockRequest(
        ips=args.ip or [], domains=args.domain or [])))


def cmd_unblock(args: argparse.Namespace) -> int:
    return _contain(args, pb.ContainRequest(unblock=pb.UnblockRequest()))


def cmd_lock_user(args: argparse.Namespace) -> int:
    return _contain(args, pb.ContainRequest(lock_user=pb.LockUserRequest(
        user=args.user, kill_sessions=args.kill_sessions)))


def cmd_unlock_user(args: argparse.Namespace) -> int:
    return _contain(args, pb.ContainRequest(unlock_user=pb.UnlockUserRequest(user=args.user)))


def _case(args: argparse.Namespace, request: pb.CaseRequest) -> dict[str, Any]:
    with _client(args) as client:
        return client.case(request)


def _print_case(doc: dict[str, Any]) -> None:
    case = doc["case"]
    print(f"{case['case_id']} [{case['severity']}] {case['status']}: {case['title']}")
    print(f"  opened {fmt_time(case['created_ns'])} by {case['created_by']}"
          + (f"; closed {fmt_time(case['closed_ns'])} by {case['closed_by']}: "
             f"{case['close_reason']}" if case["closed_ns"] else ""))
    print(f"  hosts: {', '.join(doc['hosts']) or '-'}")
    for a in doc["alerts"]:
        print(f"  alert {a['alert_id']} {a.get('severity', '')} {a.get('rule', '')}".rstrip())
    for c in doc["commands"]:
        print(f"  {c['action']:<12} {c['status']:<9} {c['agent_id']} {c['message']} "
              f"({c['command_id']})")
    for b in doc["bundles"]:
        print(f"  bundle {b['bundle_id']} sha256 {b.get('sha256', '?')}")
    for f in doc["files"]:
        print(f"  file {f.get('path', '?')} sha256 {f['sha256']}")
    for n in doc["notes"]:
        print(f"  note ({n['actor']}, {fmt_time(n['time_ns'])}): {n['note']}")


def cmd_case_create(args: argparse.Namespace) -> int:
    doc = _case(args, pb.CaseRequest(op="create", title=args.title, severity=args.severity,
                                     hosts=args.host or [], reason=args.reason or ""))
    if args.json:
        _print_json(doc)
    else:
        print(f"case {doc['case']['case_id']} created")
    return EXIT_OK


def cmd_case_list(args: argparse.Namespace) -> int:
    doc = _case(args, pb.CaseRequest(op="list"))
    if args.json:
        _print_json(doc["cases"])
        return EXIT_OK
    if not doc["cases"]:
        print("no cases yet: `ringfence case create TITLE --severity high --host HOST`")
    for c in doc["cases"]:
        print(f"{c['case_id']:<10} {c['severity']:<9} {c['status']:<7} "
              f"{fmt_time(c['created_ns'])} {c['title']}")
    return EXIT_OK


def cmd_case_show(args: argparse.Namespace) -> int:
    doc = _case(args, pb.CaseRequest(op="show", case_id=args.id))
    if args.json:
        _print_json(doc)
    else:
        _print_case(doc)
    return EXIT_OK


def cmd_case_close(args: argparse.Namespace) -> int:
    doc = _case(args, pb.CaseRequest(op="close", case_id=args.id, reason=args.reason))
    if args.json:
        _print_json(doc)
    else:
        print(f"case {args.id} closed")
    return EXIT_OK


def cmd_case_link(args: argparse.Namespace) -> int:
    links = [(kind, ref) for kind in ("alert", "host", "command", "bundle", "file", "note")
             for ref in getattr(args, kind) or []]
    if not links:
        raise CLIError("say what to link: --alert ID, --host HOST, --command ID, --bundle ID, "
                       "--file SHA256 or --note TEXT (repeatable)")
    doc: dict[str, Any] = {}
    for kind, ref in links:
        doc = _case(args, pb.CaseRequest(op="link", case_id=args.id, link_kind=kind,
                                         link_ref=ref, reason=args.reason or ""))
    if args.json:
        _print_json(doc)
    else:
        print(f"linked {len(links)} item(s) to {args.id}")
    return EXIT_OK


def cmd_case_report(args: argparse.Namespace) -> int:
    data = _case(args, pb.CaseRequest(op="report", case_id=args.id))
    out = Path(args.output)
    if out.suffix.lower() in (".html", ".htm"):
        out.write_text(render_html(data))
    elif out.suffix.lower() in (".md", ".markdown"):
        out.write_text(render_markdown(data))
    elif out.suffix.lower() == ".json":
        out.write_text(json.dumps(data, indent=2, sort_keys=True))
    else:
        raise CLIError(f"{out}: name the report .html, .md or .json")
    print(f"report for {args.id} written to {out}")
    return EXIT_OK


def cmd_story(args: argparse.Namespace) -> int:
    if not args.alert_id and not args.seq:
        raise CLIError("name an alert id or an event: ringfence story HOST ALERT_ID | --seq N")
    with _client(args) as client:
        doc = client.story(pb.StoryRequest(host=args.host, alert_id=args.alert_id or "",
                                           seq=args.seq or 0, window_s=args.window or 0))
    if args.json:
        _print_json(doc)
    else:
        print(render_text(doc, fmt_time))
    return EXIT_OK if doc["timeline"] else EXIT_FAIL


def _action(sub: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    p.add_argument("host", help="agent id or hostname")
    p.set_defaults(func=func)
    return p


def _action_tail(p: argparse.ArgumentParser, reason_required: bool = True) -> None:
    p.add_argument("--reason", required=reason_required, default="",
                   help="why (goes into the audit log and the agent's chain)")
    p.add_argument("--case", help="link this action to a case")
    p.add_argument("--wait", action="store_true", help="wait for the agent's result")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", action="store_true")
    _add_connection(p)


def register(sub: Any) -> None:
    """Add the incident workflow's commands to the `ringfence` parser."""
    p = _action(sub, "kill", "kill a process (identity re-checked on the host)", cmd_kill)
    p.add_argument("pid", type=int)
    p.add_argument("--tree", action="store_true", help="kill its descendants too")
    p.add_argument("--start-time", help="process start (ISO 8601 or epoch seconds), when no "
                                        "launch event was stored")
    p.add_argument("--exe", help="the process executable, when no launch event was stored")
    _action_tail(p)

    p = _action(sub, "quarantine", "move a file into the host's quarantine vault",
                cmd_quarantine)
    p.add_argument("path")
    _action_tail(p)
    p = _action(sub, "unquarantine", "restore a quarantined file exactly", cmd_unquarantine)
    p.add_argument("id", help="quarantine id reported by `ringfence quarantine`")
    _action_tail(p)

    p = _action(sub, "block", "drop traffic to/from addresses (no full isolation)", cmd_block)
    p.add_argument("--ip", action="append", help="address or CIDR (repeatable)")
    p.add_argument("--domain", action="append",
                   help="name resolved on the server; its addresses are blocked (repeatable)")
    _action_tail(p)
    p = _action(sub, "unblock", "remove the indicator block table", cmd_unblock)
    _action_tail(p)

    p = _action(sub, "lock-user", "lock and expire a local account", cmd_lock_user)
    p.add_argument("user")
    p.add_argument("--kill-sessions", action="store_true", help="kill the user's processes")
    _action_tail(p)
    p = _action(sub, "unlock-user", "restore a locked account exactly", cmd_unlock_user)
    p.add_argument("user")
    _action_tail(p)

    case = sub.add_parser("case", help="incident cases").add_subparsers(
        dest="case_command", required=True)
    p = case.add_parser("create", help="open a case")
    p.add_argument("title")
    p.add_argument("--severity", default="medium",
                   choices=["low", "medium", "high", "critical"])
    p.add_argument("--host", action="append", help="affected host (repeatable)")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_case_create)
    p = case.add_parser("list", help="list cases")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_case_list)
    p = case.add_parser("show", help="a case with everything linked to it")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_case_show)
    p = case.add_parser("link", help="link alerts, hosts, commands, bundles, files or notes")
    p.add_argument("id")
    for kind in ("alert", "host", "command", "bundle", "file", "note"):
        p.add_argument(f"--{kind}", action="append")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_case_link)
    p = case.add_parser("close", help="close a case")
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_case_close)
    p = case.add_parser("report", help="write the post-incident review (.html, .md or .json)")
    p.add_argument("id")
    p.add_argument("-o", "--output", required=True)
    _add_connection(p)
    p.set_defaults(func=cmd_case_report)

    p = sub.add_parser("story", help="what led to an alert or event: ancestry, files, flows")
    p.add_argument("host")
    p.add_argument("alert_id", nargs="?")
    p.add_argument("--seq", type=int, help="the event to explain instead of an alert")
    p.add_argument("--window", type=int, help="seconds to look back (default 86400)")
    p.add_argument("--json", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_story)
