"""The project's exceptions, importable from every package (they import nothing of latentmill).

- `InputError`: bad input or configuration; the command line prints its message and exits 2.
- `TrainingFailed`: training went wrong on good input (a non-finite loss); exit 1, with what to try.
"""


class InputError(Exception):
    """Bad input or configuration: the message names the file, column, key or option, and the fix."""


class TrainingFailed(Exception):
    """Training failed on valid input (e.g. the loss stopped being finite): exit code 1, not 2."""


class LatentmillWarning(UserWarning):
    """Something the user should know that does not stop the work (an old spelling, a fallback taken)."""


def warn(message: str) -> None:
    """The one route for warnings: Python's `warnings`, shown by the command line as `Warning: ...`."""
    import warnings

    warnings.warn(message, LatentmillWarning, stacklevel=2)
