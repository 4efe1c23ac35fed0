"""Check that the rules in force still match a plan (drift detection); raises, never returns a
bool. It reads state through a backend and changes nothing."""

from __future__ import annotations

from isolation.backends.base import FirewallBackend, Verified
from isolation.plan import RuleSet


def verify(backend: FirewallBackend, ruleset: RuleSet) -> Verified:
    """Return the verified listing, or raise DriftError (kind "missing" or "altered", with the
    listing found and a unified diff) or BackendError when the state cannot be read."""
    return backend.verify(ruleset)
