"""Run an external command, optionally inside a named network namespace, with a timeout.

Only the backends and conntrack use it. It never retries and never interprets output beyond
turning failures into `CommandError`.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from isolation.errors import CommandError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Runner:
    """Runs argv in `netns` (via `ip netns exec NAME`) or in the caller's own namespace (None).

    Production agents run with netns=None in their own namespace; tests and the demo pass the
    name of a throwaway namespace.
    """

    backend: str
    netns: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        if self.netns is None:
            return argv
        return ("ip", "netns", "exec", self.netns, *argv)

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> Result:
        """Run the command; raise CommandError when it cannot start, times out, or (with
        `check`) exits non-zero."""
        full = self.argv(tuple(argv))
        logger.debug("running %s", full)
        try:
            proc = subprocess.run(
                full,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except FileNotFoundError as e:
            raise CommandError(
                f"{full[0]} not found",
                backend=self.backend,
                argv=full,
                returncode=None,
                stderr=str(e),
            ) from e
        except subprocess.TimeoutExpired as e:
            raise CommandError(
                f"{' '.join(argv)} timed out after {self.timeout_s} s",
                backend=self.backend,
                argv=full,
                returncode=None,
                stderr="",
            ) from e
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(
                f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[:500]}",
                backend=self.backend,
                argv=full,
                returncode=proc.returncode,
                stderr=proc.stderr,
            )
        return result
