"""`imm`: train a byte-level GPT with an Implicit Memory Module and measure its memory."""

from __future__ import annotations

import os
import signal
import sys

import typer

from imm_cli.cli import compare as compare_cmd
from imm_cli.cli import store as store_cmd
from imm_cli.cli import needle as needle_cmd
from imm_cli.cli import recall as recall_cmd
from imm_cli.cli import report as report_cmd
from imm_cli.cli import train as train_cmd
from imm_cli.cli import usage as usage_cmd
from imm_cli.cli.common import clean_text

app = typer.Typer(
    name="imm",
    help="Train a small byte-level GPT with an Implicit Memory Module, and measure what the memory stores and recalls.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"imm {version('imm')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("imm (not installed: no version recorded)")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print the installed version and exit.")) -> None:
    """Train a small byte-level GPT with an Implicit Memory Module, and measure what the memory stores and recalls.

    Every command prints rich tables on stderr; --json prints one JSON document on stdout.
    Exit codes: 0 success, 2 bad usage or input, 1 failure at run time, 130 interrupted.
    """


app.command("train")(train_cmd.train)
app.command("store")(store_cmd.store)
app.command("usage")(usage_cmd.usage)
app.command("recall")(recall_cmd.recall)
app.command("needle")(needle_cmd.needle)
app.command("compare")(compare_cmd.compare)
app.command("sweep")(__import__("imm_cli.cli.sweep", fromlist=["sweep"]).sweep)
app.command("report")(report_cmd.report)


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors become one line and exit code 2, never a usage box or traceback.

    Exceptions are matched by shape (exit_code, format_message), not by class, because typer has
    moved its click exceptions between releases.
    """
    from imm_cli.cli import _interrupted_while_starting

    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        try:  # the imports are done: Ctrl-C is a KeyboardInterrupt again (see imm_cli/cli/__init__.py)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread
            pass
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="imm", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except KeyboardInterrupt:  # outside a command (parsing, exiting): the same one line as inside
        sys.stderr.write("interrupted\n")
        code = 130
    except Exception as e:  # noqa: BLE001
        name = type(e).__name__
        exit_code = getattr(e, "exit_code", None)
        if name == "Abort":
            sys.stderr.write("interrupted\n")
            code = 130
        elif name == "NoArgsIsHelpError":  # bare `imm` or `imm train`-less group: the help, not an error
            sys.stderr.write(e.format_message().rstrip() + "\n")
            code = exit_code if isinstance(exit_code, int) else 2
        elif hasattr(e, "format_message") and isinstance(exit_code, int):
            sys.stderr.write("error: " + clean_text(_plain_words(" ".join(e.format_message().split()))) + "\n")  # one line, always
            code = exit_code
        elif isinstance(exit_code, int):
            code = exit_code
        else:
            if os.environ.get("IMM_DEBUG"):
                raise
            sys.stderr.write(f"error: {name}: {clean_text((str(e).splitlines() or [''])[0])} (IMM_DEBUG=1 shows the traceback)\n")
            code = 1
    if os.environ.get("IMM_NO_EXIT"):
        return code
    sys.exit(code)


# typer validates flag values with pydantic, whose messages read like a validation library's
PLAIN = {"Value error, ": "", "Input should be a valid integer, unable to parse string as an integer": "not a whole number",
         "Input should be a valid number, unable to parse string as a number": "not a number",
         "Input should be a valid integer, got a number with a fractional part": "not a whole number"}


def _plain_words(message: str) -> str:
    for theirs, ours in PLAIN.items():
        message = message.replace(theirs, ours)
    return message


if __name__ == "__main__":
    main()
