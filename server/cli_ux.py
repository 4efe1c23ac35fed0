"""Presentation for the `ringfence` CLI: exit codes, tables, progress, shell completion and
timeline exports (CSV, Timesketch JSONL). No argument parsing and no admin calls; server.cli
decides what to show, this module decides how.

Tables are drawn with rich on a terminal and as plain aligned columns (no borders, no colours,
no wrapping) when stdout is a pipe, so scripts can still cut them. Progress goes to stderr and
only on a terminal.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, Protocol

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from proto import ringfence_pb2 as pb
from server.export import summary, to_jsonl, to_timesketch

# Exit statuses; the help epilog lists them, scripts may rely on them.
EXIT_OK = 0
EXIT_FAIL = 1            # the request failed or was refused (bad input, verification failed,
#                          a command that did not succeed)
EXIT_USAGE = 2           # the command line itself is wrong (argparse)
EXIT_UNREACHABLE = 3     # no running server / the admin API cannot be reached
EXIT_UNAUTHENTICATED = 4  # the identity is not (or no longer) a responder identity
EXIT_DENIED = 5          # authenticated, but the role does not allow the action
EXIT_NOT_FOUND = 6       # a named file does not exist
EXIT_INTERRUPTED = 130

EXIT_EPILOG = """\
exit status:
  0    success
  1    the request failed or was refused (bad input, verification failed, a command that
       did not succeed); the message says what to change
  2    the command line is wrong (see --help of the subcommand)
  3    the server cannot be reached: start it (`ringfence server run`) or check --server
  4    not authenticated: the identity is not a current responder identity (ask an admin
       for a new one with `ringfence responder create`)
  5    permission denied: your role does not allow this (viewer < responder < admin)
  6    a named file does not exist
  130  interrupted (Ctrl-C)

logging: human-readable on stderr by default; --log-format json for log shippers.
completion: eval "$(ringfence completion bash)"
"""

_GRPC_EXIT = {
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "DEADLINE_EXCEEDED": EXIT_UNREACHABLE,
    "UNAUTHENTICATED": EXIT_UNAUTHENTICATED,
    "PERMISSION_DENIED": EXIT_DENIED,
}


def exit_code_for(grpc_code: str) -> int:
    """The exit status for an admin call that failed with this gRPC status name."""
    return _GRPC_EXIT.get(grpc_code, EXIT_FAIL)


# -- tables ----------------------------------------------------------------------------------------

def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]], title: str = "",
                out: IO[str] | None = None) -> None:
    stream = out or sys.stdout
    terminal = stream.isatty()
    console = Console(file=stream, highlight=False, soft_wrap=False,
                      width=None if terminal else 10_000, no_color=not terminal,
                      force_terminal=terminal)
    table = Table(*columns, box=box.SIMPLE_HEAD if terminal else None,
                  title=title or None, show_edge=terminal, pad_edge=False,
                  header_style="bold" if terminal else "")
    for row in rows:
        table.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    console.print(table)


# -- progress --------------------------------------------------------------------------------------

class ByteProgress(Protocol):
    def advance(self, n: int) -> None: ...


class _Silent:
    def advance(self, n: int) -> None:
        pass


class _RichBytes:
    def __init__(self, progress: Progress, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def byte_progress(description: str, total: int | None = None,
                  enabled: bool = True) -> Iterator[ByteProgress]:
    """Bytes received so far, on stderr, when stderr is a terminal; silent otherwise."""
    if not (enabled and sys.stderr.isatty()):
        yield _Silent()
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as progress:
        yield _RichBytes(progress, progress.add_task(description, total=total))


@contextmanager
def status_spinner(description: str, enabled: bool = True) -> Iterator[Any]:
    """A spinner with a changing status line on stderr (terminal only); yields update(text)."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda text: None
        return
    console = Console(file=sys.stderr)
    with console.status(description) as status:
        yield lambda text: status.update(f"{description}: {text}")


# -- exports ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("agent_id", "seq", "time", "time_ns", "kind", "severity_id", "summary",
               "chain_hash")


class CSVEvents:
    """Events as CSV rows with fixed columns (spreadsheet-friendly; the full fields are in
    --format jsonl)."""

    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.writer(out)
        self._writer.writerow(CSV_COLUMNS)

    def write(self, event: pb.Event, agent_id: str, chain_hash: str) -> None:
        row = to_jsonl(event, agent_id)
        self._writer.writerow([agent_id, event.seq, row["time"], event.time_ns, row["kind"],
                               event.severity_id, summary(event), chain_hash])


def timesketch_line(event: pb.Event, agent_id: str, chain_hash: str) -> str:
    """One line of a Timesketch JSONL import (message, datetime, timestamp_desc required)."""
    row = to_timesketch(event, agent_id)
    row["chain_hash"] = chain_hash
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


# -- shell completion ------------------------------------------------------------------------------

def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...],
          out: dict[tuple[str, ...], list[str]]) -> None:
    words: list[str] = []
    for action in parser._actions:
        words.extend(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                words.append(name)
                _walk(child, path + (name,), out)
        elif action.choices and not action.option_strings:
            words.extend(str(c) for c in action.choices)
    out[path] = sorted(set(words))


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for `parser`: subcommands and their long options."""
    table: dict[tuple[str, ...], list[str]] = {}
    _walk(parser, (), table)
    cases = []
    for path, words in sorted(table.items(), key=lambda kv: -len(kv[0])):
        key = " ".join(path)
        cases.append(f'    "{key}") words="{" ".join(words)}" ;;')
    prog = parser.prog
    func = "_" + prog.replace("-", "_")
    return f"""# bash completion for {prog}; load with: eval "$({prog} completion bash)"
{func}() {{
  local cur path w i words
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  path=""
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    [[ "$w" == -* ]] && continue
    case "$path${{path:+ }}$w" in
{chr(10).join('      "' + ' '.join(p) + '") path="' + ' '.join(p) + '" ;;' for p in table if p)}
    esac
  done
  case "$path" in
{chr(10).join(cases)}
    *) words="" ;;
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F {func} {prog}
"""
