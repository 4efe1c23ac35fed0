"""Test helper: a throwaway PostgreSQL schema per use, so parallel runs and reruns never collide.

The server comes from RINGFENCE_TEST_PG_DSN (default: the local trust-auth server). Each schema
is named rf_test_<pid>_<n>_<random> and dropped afterwards; the yielded URL selects it through
the libpq `options=-csearch_path=...` parameter, so every connection (test, server subprocess)
lands in it, and tags connections with it as application_name so cleanup can end them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import psycopg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_counter = itertools.count()


def base_dsn() -> str:
    return os.environ.get("RINGFENCE_TEST_PG_DSN", DEFAULT_DSN)


def with_search_path(dsn: str, schema: str) -> str:
    separator = "&" if "?" in dsn else "?"
    # application_name tags every connection of this schema, so cleanup can end them.
    return (f"{dsn}{separator}options={quote(f'-csearch_path={schema}')}"
            f"&application_name={schema}")


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """Yield a PostgreSQL URL whose search_path is a fresh, empty schema."""
    name = f"rf_test_{os.getpid()}_{next(_counter)}_{secrets.token_hex(3)}"
    with psycopg.connect(base_dsn(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield with_search_path(base_dsn(), name)
    finally:
        with psycopg.connect(base_dsn(), autocommit=True, connect_timeout=5) as conn:
            # Sessions of a killed server may still hold locks; end them so DROP cannot hang.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "pid <> pg_backend_pid() AND application_name = %s", (name,))
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
