"""The Typer app: thin commands that check input, call one library function and print.

Started as a program (the `imm` script, `python -m imm_cli.cli.app`, torchrun), Ctrl-C while the
imports run (a second or more: torch, matplotlib) exits 130 with one line instead of a traceback;
`app.main` hands Ctrl-C back to Python once it runs.
"""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):  # pragma: no cover - exercised in a real process
    _os.write(2, b"interrupted\n")
    _os._exit(130)


# "-m": this package is being imported as the target of `python -m` (runpy sets the real argv[0] later)
if (_os.path.basename(_sys.argv[0] if _sys.argv else "") in ("imm", "-m")
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
