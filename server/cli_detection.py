"""`ringfence rules`, `ringfence hunt` and `ringfence alerts`: the detection commands.

Rules are managed on the server host (`--data-dir`; the running server picks changes up within
seconds); alerts and hunts go through the admin API like every responder command. Entry point
code only: parsing, printing, one-line errors.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from proto import ringfence_pb2 as pb
from server.detection import RuleError
from server.detection.engine import build_ruleset
from server.detection.fields import FIELD_MAPPING, unmappable_reason
from server.detection.records import SEVERITIES, CustomRule
from server.detection.service import open_detection_store
from server.detection.sigma import CompiledRule, LoadedRule, UnsupportedRule, load_file, load_pack

EXIT_OK, EXIT_FAIL = 0, 1
FOLLOW_POLL_S = 1.0


def _cli() -> Any:
    # server.cli imports this module to register the commands; import it back lazily.
    import server.cli
    return server.cli


def _rule_dict(rule: LoadedRule, disabled: bool = False) -> dict[str, Any]:
    info = rule.info
    out: dict[str, Any] = {
        "id": info.rule_id, "title": info.title, "level": info.level,
        "category": info.category, "author": info.author, "source": info.source,
        "fields": list(info.sigma_fields),
        "state": ("unsupported" if isinstance(rule, UnsupportedRule) else
                  "disabled" if disabled else "enabled")}
    if isinstance(rule, UnsupportedRule):
        out["reason"] = rule.reason
    return out


# -- rules ----------------------------------------------------------------------------------------

def _ruleset_rows(args: argparse.Namespace) -> list[tuple[LoadedRule, bool]]:
    pack = load_pack()
    if not args.data_dir:
        return [(r, False) for r in pack]
    dstore = open_detection_store(Path(args.data_dir))
    try:
        return list(build_ruleset(pack, dstore.custom_rules(), dstore.disabled_rules()).loaded)
    finally:
        dstore.close()


def cmd_rules_list(args: argparse.Namespace) -> int:
    rows = [_rule_dict(r, off) for r, off in _ruleset_rows(args)]
    if args.unsupported:
        rows = [r for r in rows if r["state"] == "unsupported"]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    for r in rows:
        line = f"{r['state']:<11} {r['level']:<13} {r['category']:<19} {r['id'][:36]:<36} {r['title']}"
        print(line)
        if "reason" in r:
            print(f"{'':<11} reason: {r['reason']}")
    counts = {s: sum(1 for r in rows if r["state"] == s)
              for s in ("enabled", "disabled", "unsupported")}
    print(f"\n{len(rows)} rules: {counts['enabled']} enabled, {counts['disabled']} disabled, "
          f"{counts['unsupported']} unsupported")
    return EXIT_OK


def cmd_rules_test(args: argparse.Namespace) -> int:
    rules = load_file(Path(args.file))
    report = []
    for rule in rules:
        category = rule.info.category
        mapping = FIELD_MAPPING.get(category, {})
        fields = {f: mapping.get(f) for f in rule.info.sigma_fields}
        entry = _rule_dict(rule)
        entry["mapping"] = {f: m for f, m in fields.items() if m}
        entry["unmapped"] = {f: unmappable_reason(f, category)
                             for f, m in fields.items() if m is None}
        report.append(entry)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for entry in report:
            print(f"{entry['title']} ({entry['id']}), {entry['category']}, level "
                  f"{entry['level']}:")
            for field, target in entry["mapping"].items():
                print(f"  {field:<20} -> {target}")
            for field, reason in entry["unmapped"].items():
                print(f"  {field:<20} cannot be mapped: {reason}")
            if entry["state"] == "unsupported":
                print(f"  UNSUPPORTED: {entry['reason']}")
            else:
                print("  ok: the rule loads and ringfence can evaluate it")
    return EXIT_OK if all(e["state"] != "unsupported" for e in report) else EXIT_FAIL


def _audit_local(args: argparse.Namespace, action: str, target: str, reason: str) -> None:
    """Rule changes made on the server host are audited like admin API actions."""
    store = _cli()._open_store(args)
    try:
        store.append_audit(time.time_ns(), f"local:{getpass.getuser()}", "admin", action,
                           target, reason, "allowed")
    finally:
        store.close()


def cmd_rules_add(args: argparse.Namespace) -> int:
    path = Path(args.file)
    rules = load_file(path)
    bad = [r for r in rules if isinstance(r, UnsupportedRule)]
    if bad:
        raise RuleError(str(path), f"rule {bad[0].info.title} is unsupported: {bad[0].reason}; "
                                   "`ringfence rules test FILE` shows what to change")
    dstore = open_detection_store(Path(args.data_dir))
    try:
        _cli()._open_store(args).close()    # the data dir must hold an initialized server
        text = path.read_text()
        for rule in rules:
            dstore.add_rule(CustomRule(rule.info.rule_id, text, time.time_ns(),
                                       f"local:{getpass.getuser()}"))
            _audit_local(args, "rules_add", rule.info.rule_id, args.reason or str(path))
            print(f"rule {rule.info.rule_id} ({rule.info.title}) added; a running server "
                  "applies it within seconds")
    finally:
        dstore.close()
    return EXIT_OK


def cmd_rules_enable(args: argparse.Namespace, disabled: bool) -> int:
    rows = _ruleset_rows(args)
    wanted = args.rule.lower()
    hits = [r for r, _ in rows if wanted in (r.info.rule_id.lower(), r.info.title.lower(),
                                             Path(r.info.source).stem.lower())]
    if len(hits) != 1:
        raise RuleError(args.rule, "no such rule; see `ringfence rules list`" if not hits else
                        "several rules have that name; use the rule id")
    rule_id = hits[0].info.rule_id
    dstore = open_detection_store(Path(args.data_dir))
    try:
        dstore.set_rule_disabled(rule_id, disabled, f"local:{getpass.getuser()}", time.time_ns())
    finally:
        dstore.close()
    _audit_local(args, "rules_disable" if disabled else "rules_enable", rule_id, args.reason)
    print(f"rule {rule_id} ({hits[0].info.title}) {'disabled' if disabled else 'enabled'}")
    return EXIT_OK


# -- hunt -----------------------------------------------------------------------------------------

def cmd_hunt(args: argparse.Namespace) -> int:
    cli = _cli()
    path = Path(args.rule)
    request = pb.HuntRequest(since_ns=cli.parse_time(args.since), until_ns=cli.parse_time(
        args.until), hosts=[h for spec in args.hosts or [] for h in spec.split(",") if h],
        limit=args.limit)
    if path.suffix in (".yml", ".yaml") or path.is_file():
        request.rule_yaml = path.read_text()
    else:
        request.rule = args.rule
    with cli._client(args) as client:
        response = client.hunt(request)
    rows = [{"agent_id": m.agent_id, "hostname": m.hostname, "seq": m.seq,
             "time": cli.fmt_time(m.time_ns), "time_ns": m.time_ns, "detail": m.detail}
            for m in response.matches]
    if args.json:
        print(json.dumps({"rule_id": response.rule_id, "title": response.title,
                          "events_scanned": response.events_scanned,
                          "truncated": response.truncated, "matches": rows},
                         indent=2, sort_keys=True))
        return EXIT_OK
    for r in rows:
        print(f"{r['time']}  {r['hostname']:<20} #{r['seq']:<8} {r['detail']}")
    print(f"\n{response.title}: {len(rows)} matches in {response.events_scanned} events"
          + (" (truncated: raise --limit)" if response.truncated else ""))
    return EXIT_OK


# -- alerts ---------------------------------------------------------------------------------------

def alert_dict(a: pb.Alert) -> dict[str, Any]:
    fmt = _cli().fmt_time
    return {"alert_id": a.alert_id, "agent_id": a.agent_id, "hostname": a.hostname,
            "source": a.source, "rule_id": a.rule_id, "title": a.title,
            "severity": a.severity, "detail": a.detail, "count": a.count,
            "status": a.status, "status_reason": a.status_reason,
            "status_actor": a.status_actor, "raised": fmt(a.raised_ns),
            "raised_ns": a.raised_ns, "first_event_ns": a.first_event_ns,
            "last_event_ns": a.last_event_ns,
            "events": [{"agent_id": e.agent_id, "seq": e.seq} for e in a.events],
            "hash": a.hash}


def _print_alert_line(a: pb.Alert) -> None:
    fmt = _cli().fmt_time
    count = f" x{a.count}" if a.count > 1 else ""
    print(f"{a.alert_id:>6} {fmt(a.raised_ns)} {a.severity:<13} {a.status:<12} "
          f"{a.hostname[:20]:<20} {a.title}{count}")


def cmd_alerts(args: argparse.Namespace) -> int:
    cli = _cli()
    if args.action in ("ack", "close"):
        if args.alert_id is None:
            raise cli.CLIError(f"say which alert: `ringfence alerts {args.action} ID --reason "
                               "...`")
        status = "acknowledged" if args.action == "ack" else "closed"
        with cli._client(args) as client:
            alert = client.update_alert(pb.UpdateAlertRequest(
                alert_id=args.alert_id, status=status, reason=args.reason or ""))
        if args.json:
            print(json.dumps(alert_dict(alert), indent=2, sort_keys=True))
        else:
            print(f"alert {alert.alert_id} {alert.status}: {alert.title}")
        return EXIT_OK
    request = pb.ListAlertsRequest(host=args.host or "", min_severity=args.severity or "",
                                   status=args.status or "", limit=args.limit,
                                   verify=args.action == "verify")
    with cli._client(args) as client:
        response = client.list_alerts(request)
        if args.action == "verify":
            if response.verified:
                print(f"alert log verified: {response.log_records} records, chain intact, "
                      "every alert agrees with it")
                return EXIT_OK
            print(f"alert log FAILED verification: {response.verify_error}")
            return EXIT_FAIL
        alerts = list(response.alerts)
        if args.json and not args.follow:
            print(json.dumps([alert_dict(a) for a in alerts], indent=2, sort_keys=True))
            return EXIT_OK
        for a in alerts:
            if args.json:
                print(json.dumps(alert_dict(a), sort_keys=True), flush=True)
            else:
                _print_alert_line(a)
        if not args.follow:
            if not alerts and not args.json:
                print("no alerts match")
            return EXIT_OK
        last = max((a.alert_id for a in alerts), default=0)
        deadline = time.monotonic() + args.follow_timeout if args.follow_timeout else None
        sys.stdout.flush()
        while deadline is None or time.monotonic() < deadline:
            time.sleep(FOLLOW_POLL_S)
            request.after_id = last
            for a in client.list_alerts(request).alerts:
                last = max(last, a.alert_id)
                if args.json:
                    print(json.dumps(alert_dict(a), sort_keys=True), flush=True)
                else:
                    _print_alert_line(a)
                    sys.stdout.flush()
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    add_connection = _cli()._add_connection

    rules = sub.add_parser("rules", help="Sigma detection rules").add_subparsers(
        dest="rules_command", required=True)
    p = rules.add_parser("list", help="rules in force, disabled and unsupported (with reasons)")
    p.add_argument("--data-dir", help="include this server's custom and disabled rules")
    p.add_argument("--unsupported", action="store_true", help="only the unsupported rules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_list)
    p = rules.add_parser("test", help="validate a Sigma rule file and show its field mapping")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_test)
    p = rules.add_parser("add", help="add a Sigma rule file to the server's rules")
    p.add_argument("file")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--reason", help="why (goes into the audit log)")
    p.set_defaults(func=cmd_rules_add)
    for name, disabled in (("disable", True), ("enable", False)):
        p = rules.add_parser(name, help=f"{name} a rule (by id, title or file name)")
        p.add_argument("rule")
        p.add_argument("--data-dir", required=True)
        p.add_argument("--reason", required=disabled, default="",
                       help="why (goes into the audit log)")
        p.set_defaults(func=lambda a, d=disabled: cmd_rules_enable(a, d))

    p = sub.add_parser("hunt", help="run a Sigma rule over stored history")
    p.add_argument("rule", help="a rule file (.yml), or the id, title or file name of a rule")
    p.add_argument("--since", help="15m, 2h, ISO 8601 or epoch seconds")
    p.add_argument("--until")
    p.add_argument("--hosts", action="append", help="host names or agent ids, comma-separated "
                                                   "(default: every host)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    add_connection(p)
    p.set_defaults(func=cmd_hunt)

    p = sub.add_parser("alerts", help="detection alerts: list, follow, ack, close, verify")
    p.add_argument("action", nargs="?", choices=["ack", "close", "verify"])
    p.add_argument("alert_id", nargs="?", type=int)
    p.add_argument("--reason", help="why (required for ack and close)")
    p.add_argument("--host")
    p.add_argument("--severity", choices=SEVERITIES, help="this severity or higher")
    p.add_argument("--status", choices=["new", "acknowledged", "closed", "open"])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--follow", action="store_true", help="keep printing new alerts")
    p.add_argument("--follow-timeout", type=float, default=0,
                   help="stop following after this many seconds (default: until interrupted)")
    p.add_argument("--json", action="store_true")
    add_connection(p)
    p.set_defaults(func=cmd_alerts)


__all__ = ["CompiledRule", "register"]
