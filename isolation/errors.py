"""The isolation package's exception tree; every failure the package raises is one of these.

It defines errors only; it does not log or decide what a caller tolerates::

    IsolationError                 root: catch this to catch everything from isolation/
    ├── InvalidRequestError        the request or data is bad; retrying will not help
    │   ├── PolicyError            a policy failed validation (field, value)
    │   └── StateError             the action is not valid in the current state (state, action)
    └── BackendError               the firewall backend or the OS failed (backend)
        ├── CommandError           a command failed or timed out (argv, returncode, stderr)
        ├── BackendUnavailableError  the backend's tools or kernel support are missing
        ├── ConntrackUnavailableError  connections could not be cut: conntrack missing/failed
        ├── DriftError             the applied rules differ from the plan (kind, expected, found)
        └── StateStoreError        persisted isolation state could not be read/written (path)
"""

from __future__ import annotations


class IsolationError(Exception):
    """Root of every error raised by the isolation package."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(IsolationError):
    """The caller's request or data is bad; nothing was changed."""


class PolicyError(InvalidRequestError):
    """A policy failed validation; `field` names the offending field (dotted path)."""

    def __init__(self, message: str, *, field: str, value: object = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.value = value


class StateError(InvalidRequestError):
    """The requested action is not valid in the controller's current state."""

    def __init__(self, message: str, *, state: str, action: str) -> None:
        super().__init__(message)
        self.state = state
        self.action = action


class BackendError(IsolationError):
    """The firewall backend or the operating system failed."""

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(message)
        self.backend = backend


class CommandError(BackendError):
    """An external command failed, could not be started, or timed out."""

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        argv: tuple[str, ...],
        returncode: int | None,
        stderr: str,
    ) -> None:
        super().__init__(message, backend=backend)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class BackendUnavailableError(BackendError):
    """The backend cannot work here (tool missing, kernel support missing)."""


class ConntrackUnavailableError(BackendError):
    """Existing connections could not be cut because conntrack is missing or failed."""


class DriftError(BackendError):
    """The rules in force differ from the plan.

    `kind` is "missing" (our table/chains are gone) or "altered" (present but different);
    `found` is the normalized listing read back (None when missing) and `diff` a unified diff.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        kind: str,
        expected_sha256: str,
        found: str | None,
        diff: str,
    ) -> None:
        super().__init__(message, backend=backend)
        self.kind = kind
        self.expected_sha256 = expected_sha256
        self.found = found
        self.diff = diff


class StateStoreError(BackendError):
    """Persisted isolation state could not be written or read back."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message, backend="state-store")
        self.path = path
