"""Firewall isolation as a library: pure policy -> ruleset planning, backends (nftables,
iptables, fake), apply/verify/restore and conntrack cutting. Standard library only; it knows
nothing of grpc, proto or the agent's session."""

from isolation.backends import FirewallBackend, Snapshot, Verified, select_backend
from isolation.errors import (
    BackendError,
    BackendUnavailableError,
    CommandError,
    ConntrackUnavailableError,
    DriftError,
    InvalidRequestError,
    IsolationError,
    PolicyError,
    StateError,
    StateStoreError,
)
from isolation.plan import RuleSet, plan
from isolation.policy import AllowRule, CollectorEndpoint, Policy
from isolation.verify import verify

__all__ = [
    "AllowRule",
    "BackendError",
    "BackendUnavailableError",
    "CollectorEndpoint",
    "CommandError",
    "ConntrackUnavailableError",
    "DriftError",
    "FirewallBackend",
    "InvalidRequestError",
    "IsolationError",
    "Policy",
    "PolicyError",
    "RuleSet",
    "Snapshot",
    "StateError",
    "StateStoreError",
    "Verified",
    "plan",
    "select_backend",
    "verify",
]
