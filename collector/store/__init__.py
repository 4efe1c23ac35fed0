"""Storage backends of the collector, and `open_store`: the one place that picks a backend.

A PostgreSQL URL (`postgresql://...`) selects `collector.store.postgresql`; anything else is a
path to the embedded SQLite database. Callers use only the `collector.store.base.Store`
interface.
"""

from __future__ import annotations

from pathlib import Path

from collector.store.base import Store


def is_store_url(text: str) -> bool:
    """Whether `text` names a database server rather than a SQLite file."""
    return text.startswith(("postgresql://", "postgres://"))


def open_store(url_or_path: str | Path, migrate: bool = False, pool_size: int = 8) -> Store:
    """Open the store named by a PostgreSQL URL or a SQLite path.

    `migrate` applies pending PostgreSQL schema migrations first (SQLite creates its schema
    itself); without it a PostgreSQL schema behind this release raises StoreUnavailable.
    """
    if isinstance(url_or_path, str) and is_store_url(url_or_path):
        # Imported here so SQLite-only deployments never load psycopg.
        from collector.store.postgresql import PostgreSQLStore

        return PostgreSQLStore(url_or_path, pool_size=pool_size, migrate=migrate)
    from collector.store.sqlite import SQLiteStore

    return SQLiteStore(Path(url_or_path))
