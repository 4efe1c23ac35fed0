"""Capability gates for marked tests.

A test marked `root`, `netns`, `nftables`, `iptables`, `postgres` or `browser` needs something a
developer's machine may lack. Outside CI it is skipped with the reason; under CI=true a missing
capability fails the test, so CI can never go green by skipping what it must run.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.cache
def _missing(capability: str) -> str | None:
    """Return why `capability` is unavailable, or None when it is there."""
    if capability == "root":
        return None if os.geteuid() == 0 else "needs root"
    if capability == "netns":
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "iproute2 `ip` not installed"
        name = f"rf-probe-{os.getpid()}"
        try:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            return f"cannot create a network namespace: {e.stderr.decode(errors='replace').strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return None
    if capability == "nftables":
        return None if shutil.which("nft") else "nft (nftables) not installed"
    if capability == "iptables":
        ok = shutil.which("iptables-restore") and shutil.which("ip6tables-restore")
        return None if ok else "iptables-restore/ip6tables-restore not installed"
    if capability == "postgres":
        dsn = os.environ.get("RINGFENCE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
        try:
            with socket.create_connection(("127.0.0.1", 5432), timeout=2):
                return None
        except OSError as e:
            return f"no PostgreSQL server answers for {dsn}: {e}"
    if capability == "browser":
        return None if shutil.which("chromium") else "chromium not installed"
    return None


CAPABILITY_MARKS = ("root", "netns", "nftables", "iptables", "postgres", "browser")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in CAPABILITY_MARKS:
        if item.get_closest_marker(mark) is None:
            continue
        reason = _missing(mark)
        if reason is None:
            continue
        if IN_CI:
            pytest.fail(f"CI=true and capability `{mark}` is missing: {reason}", pytrace=False)
        pytest.skip(f"{mark}: {reason}")
