"""The project's exceptions, importable from every package (they import nothing of latentmill).

- `InputError`: bad input or configuration; the command line prints its message and exits 2.
- `TrainingFailed`: training went wrong on good input (a non-finite loss); exit 1, with what to try.
- `InternalError`: an invariant of latentmill's own broke (a bug, not the user's input); exit 1.
- `NothingLeft`: a stage ran, but every input was refused or failed (every URL a private address, every
  download a 404, every image dropped); exit 3, with the reasons and the fix. Its outputs are written.
"""


class InputError(Exception):
    """Bad input or configuration: the message names the file, column, key or option, and the fix."""


class TrainingFailed(Exception):
    """Training failed on valid input (e.g. the loss stopped being finite): exit code 1, not 2."""


class NothingLeft(Exception):
    """Every input of a stage was refused or failed: nothing to hand to the next stage (exit code 3)."""


# what the main reasons for dropping everything mean, and what to do about them
FIXES = {
    "private_address": "private, loopback or link-local hosts are refused; allow one with --allow-host HOST[:PORT]",
    "invalid_url": "not http(s) URLs; check --url-col",
}


def nothing_left(what: str, total: int, reasons: dict[str, int]) -> NothingLeft:
    """The NothingLeft error for `total` inputs all dropped, naming the reasons by count, with their fixes."""
    counted = sorted(((n, r) for r, n in reasons.items() if n), reverse=True)
    parts = [f"{reason} {n:,}" + (f" ({FIXES[reason]})" if reason in FIXES else "") for n, reason in counted]
    return NothingLeft(f"{what}: none of {total:,} left: {'; '.join(parts) or 'no reason recorded'}.")


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
