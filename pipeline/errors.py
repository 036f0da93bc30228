"""The two ways a run ends badly, mapped to exit codes by the CLI (see DESIGN.md, Exit codes)."""


class EdgeError(Exception):
    """A failure the user can act on; its message is the one line the CLI prints."""

    exit_code = 1


class BadInput(EdgeError):
    """Bad usage or bad input: wrong option, missing or malformed file. Exit code 2."""

    exit_code = 2


class StageFailed(EdgeError):
    """A stage ran and failed, or a budget was missed. Exit code 1."""

    exit_code = 1
