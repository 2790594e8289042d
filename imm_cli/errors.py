"""Two kinds of failure the CLI maps to exit codes (the core raises them, never exits)."""


class InputError(ValueError):
    """Bad usage or input (a file, a flag, a run folder): exit code 2, one line, nothing written."""


class RunError(RuntimeError):
    """Something failed while running (non-finite loss, a device error): exit code 1."""
