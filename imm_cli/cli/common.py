"""What every command shares: stderr console, --json on stdout, one-line errors and exit codes."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from imm_cli.errors import InputError, RunError
from imm_cli.runs import json_safe

console = Console(stderr=True)  # tables and progress: stdout is kept for --json


def fail(message: str, code: int) -> None:
    """One line on stderr (never wrapped; brackets in paths or key lists are text, not markup), then exit."""
    one_line = " ".join(str(message).split())
    console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be created or written (one line, exit 2).

    Checks the path itself (a file is not a folder), every existing ancestor (a file in the path
    makes mkdir fail later) and write permission on the nearest existing folder. Creates nothing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} is a file, not a folder")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"{flag} {out}: {blocker} is a file, not a folder")
    nearest = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: {nearest} is not writable")


def handle_errors(fn: Callable) -> Callable:
    """Map library errors to one line and an exit code (IMM_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except InputError as e:
            fail(str(e), 2)
        except RunError as e:
            fail(str(e), 1)
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("IMM_DEBUG"):
                raise
            first = (str(e).splitlines() or [""])[0]
            fail(f"{e.__class__.__name__}: {first} (IMM_DEBUG=1 shows the traceback)", 1)

    return wrapper


_clean = json_safe  # the name the commands use


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(_clean(doc), indent=2) + "\n")
    sys.stdout.flush()


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def parse_list(text: str, kind, flag: str) -> list:
    """'256,512' -> [256, 512]; a bad item is an input error naming the flag."""
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} must be a comma-separated list of {kind.__name__} values (got {text!r})") from None
    if not items:
        raise InputError(f"{flag} is empty")
    return items
