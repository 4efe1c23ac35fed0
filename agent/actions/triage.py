"""Triage snapshot: the host's volatile state, captured as evidence events.

It reads processes, connections, listening sockets, logged-in users and kernel modules with
psutil and /proc, one TriageSnapshot event per section; it changes nothing on the host.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)

MAX_PROCESSES = 20_000
MAX_CMDLINE = 4096


def _processes() -> list[dict[str, Any]]:
    rows = []
    for proc in psutil.process_iter(["pid", "ppid", "username", "exe", "cmdline", "create_time",
                                     "name"]):
        info = proc.info
        cmd = " ".join(info.get("cmdline") or [])[:MAX_CMDLINE]
        rows.append({"pid": info["pid"], "ppid": info.get("ppid"), "user": info.get("username"),
                     "exe": info.get("exe") or "", "cmdline": cmd, "name": info.get("name"),
                     "start_time": info.get("create_time")})
        if len(rows) >= MAX_PROCESSES:
            break
    return rows


def _connections(kind_listen: bool) -> list[dict[str, Any]]:
    rows = []
    for c in psutil.net_connections(kind="inet"):
        listening = c.status == psutil.CONN_LISTEN
        if listening != kind_listen:
            continue
        rows.append({"fd": c.fd, "family": int(c.family), "type": int(c.type),
                     "local": list(c.laddr) if c.laddr else None,
                     "remote": list(c.raddr) if c.raddr else None, "status": c.status,
                     "pid": c.pid})
    return rows


def _users() -> list[dict[str, Any]]:
    return [{"name": u.name, "terminal": u.terminal, "host": u.host, "started": u.started,
             "pid": u.pid} for u in psutil.users()]


def _modules() -> list[dict[str, Any]]:
    try:
        lines = Path("/proc/modules").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            rows.append({"name": parts[0], "size": int(parts[1]), "instances": int(parts[2])})
    return rows


SECTIONS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "processes": _processes,
    "connections": lambda: _connections(False),
    "listening": lambda: _connections(True),
    "users": _users,
    "modules": _modules,
}


def snapshot(command_id: str, record: Callable[[pb.Event], object]) -> dict[str, int]:
    """Record one TriageSnapshot event per section; returns the row count of each section."""
    counts: dict[str, int] = {}
    for section, read in SECTIONS.items():
        try:
            rows = read()
            document = json.dumps(rows, sort_keys=True, default=str)
        except (psutil.Error, OSError) as e:
            logger.warning("triage section %s failed: %s", section, e)
            rows, document = [], json.dumps({"error": str(e)})
        record(pb.Event(severity_id=1, triage=pb.TriageSnapshot(
            command_id=command_id, section=section, json=document)))
        counts[section] = len(rows)
    return counts
