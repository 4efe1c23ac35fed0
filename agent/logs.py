"""Logging set-up for the two entry points (`ringfence`, `ringfence-agent`): human-readable
lines by default, one JSON object per line with `--log-format json` for log shippers.

Only entry points call `configure_logging`; modules just use `logging.getLogger(__name__)`.
The JSON form carries the formatted message and the standard record fields, nothing else, so it
can carry no more than the text form does (no keys, tokens or evidence payloads are logged).
"""

from __future__ import annotations

import datetime
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(verbose: bool, fmt: str = "text") -> None:
    """Log to stderr at INFO (DEBUG when verbose) in `fmt` ("text" or "json")."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
