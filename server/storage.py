"""Which store a server data directory uses, recorded once, opened by every command.

The data directory always holds keys, PKI and the filesystem blob store. Events and metadata
live in DATA/ringfence.db (SQLite, the default) unless `ringfence server migrate --store URL
--data-dir DATA` recorded a PostgreSQL URL in DATA/store.json (mode 0600: the URL may carry a
password). `--store` on `server run` overrides the record. Backend choice itself is
`collector.store.open_store`'s.
"""

from __future__ import annotations

import json
import logging

from collector.store import is_store_url, open_store
from collector.store.base import Store
from server.pki import ServerPaths, write_secret

logger = logging.getLogger(__name__)

STORE_FILE = "store.json"


class StorageConfigError(Exception):
    """DATA/store.json is unreadable or names something that is not a store URL."""


def recorded_store(paths: ServerPaths) -> str:
    """The store URL recorded for the data directory, or "" for the SQLite default."""
    path = paths.root / STORE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        raise StorageConfigError(f"{path} is unreadable: {e}") from e
    url = raw.get("store", "") if isinstance(raw, dict) else ""
    if not isinstance(url, str) or (url and not is_store_url(url)):
        raise StorageConfigError(f"{path} does not hold a postgresql:// store URL")
    return url


def record_store(paths: ServerPaths, url: str) -> None:
    write_secret(paths.root / STORE_FILE, json.dumps({"store": url}).encode())


def store_location(paths: ServerPaths, override: str = "") -> str:
    return override or recorded_store(paths) or str(paths.database)


def open_server_store(paths: ServerPaths, override: str = "", migrate: bool = False,
                      pool_size: int = 8) -> Store:
    return open_store(store_location(paths, override), migrate=migrate, pool_size=pool_size)
