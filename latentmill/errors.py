"""The project's exceptions, importable from every package (they import nothing of latentmill).

- `InputError`: bad input or configuration; the command line prints its message and exits 2.
- `TrainingFailed`: training went wrong on good input (a non-finite loss); exit 1, with what to try.
- `InternalError`: an invariant of latentmill's own broke (a bug, not the user's input); exit 1.
"""


class InputError(Exception):
    """Bad input or configuration: the message names the file, column, key or option, and the fix."""


class TrainingFailed(Exception):
    """Training failed on valid input (e.g. the loss stopped being finite): exit code 1, not 2."""


class InternalError(Exception):
    """An invariant of latentmill's own does not hold: a bug to report, not bad input."""


def invariant(holds: bool, message: str) -> None:
    """Raise InternalError when `holds` is false (unlike `assert`, this survives `python -O`)."""
    if not holds:
        raise InternalError(f"{message} (this is a bug in latentmill: please report it with the command)")


class LatentmillWarning(UserWarning):
    """Something the user should know that does not stop the work (an old spelling, a fallback taken)."""


def warn(message: str) -> None:
    """The one route for warnings: Python's `warnings`, shown by the command line as `Warning: ...`."""
    import warnings

    warnings.warn(message, LatentmillWarning, stacklevel=2)
