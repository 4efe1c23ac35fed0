"""Firewall backends and the one place that picks one: `select_backend`.

nftables is the default, iptables the fallback, fake is for tests. Selection only probes
availability; it applies nothing.
"""

from __future__ import annotations

import logging

from isolation.backends.base import FirewallBackend, Snapshot, Verified
from isolation.backends.fake import FakeBackend
from isolation.backends.iptables import IptablesBackend
from isolation.backends.nftables import NftablesBackend
from isolation.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[FirewallBackend]] = {
    "nftables": NftablesBackend,
    "iptables": IptablesBackend,
    "fake": FakeBackend,
}


def select_backend(preferred: str | None, netns: str | None) -> FirewallBackend:
    """Return the `preferred` backend, or the first available of nftables, iptables.

    An explicitly preferred backend that is unavailable is an error, never a silent fallback.
    """
    if preferred is not None:
        cls = BACKENDS.get(preferred)
        if cls is None:
            raise BackendUnavailableError(
                f"unknown firewall backend {preferred!r} (known: {sorted(BACKENDS)})",
                backend=preferred,
            )
        backend = cls(netns)
        if not backend.available():
            raise BackendUnavailableError(
                f"backend {preferred} is not available here", backend=preferred
            )
        return backend
    for name in ("nftables", "iptables"):
        backend = BACKENDS[name](netns)
        if backend.available():
            logger.info("selected firewall backend %s", name)
            return backend
        logger.warning("firewall backend %s unavailable", name)
    raise BackendUnavailableError("neither nftables nor iptables is available", backend="none")


__all__ = [
    "BACKENDS",
    "FakeBackend",
    "FirewallBackend",
    "IptablesBackend",
    "NftablesBackend",
    "Snapshot",
    "Verified",
    "select_backend",
]
