"""Errors of the targeted containment actions (agent/actions: kill, quarantine, block, users).

    ActionError            root
    +-- ActionRefused      the request does not fit the host (no such process, pid reused,
    |                      protected account, file missing): nothing was changed
    +-- ActionFailed       the OS failed part-way; `detail` says what was and was not changed
"""

from __future__ import annotations


class ActionError(Exception):
    """Root of containment action errors; the message is reported to the responder."""

    def __init__(self, message: str, detail: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class ActionRefused(ActionError):
    """The action does not apply to the host as it is now; nothing was changed."""


class ActionFailed(ActionError):
    """The operating system failed while acting; `detail` records what was changed."""
