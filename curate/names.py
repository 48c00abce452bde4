"""Names that come from input files (a head's column, a score table's columns, a manifest's shard names)
and may become a file name, a column or a rule's identifier: checked where they enter, against a closed
character set, so that none of them can reach outside an output folder or carry markup.

Head files and score tables are shared between users as models are; a column named `../../x` or
`<img onerror=…>` is refused with exit 2 naming the file it came from, not written anywhere."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from latentmill.errors import InputError

# a column (and the histogram named after it): an identifier, as `select --where` expressions need
COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# a shard, stage or file stem: letters, digits, `_`, `-` and inner dots
STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_column(name, source: str, what: str = "column") -> str:
    """`name` if it is a column name (an identifier of at most 64 characters); else an InputError naming
    `source` (the file or option it came from)."""
    if not isinstance(name, str) or not COLUMN.fullmatch(name):
        raise InputError(
            f"{source}: {what} {_shown(name)} is not a column name: use letters, digits and _ (not first), at "
            f"most 64 characters (fit-head --column NAME names a head's column)."
        )
    return name


def check_stem(name, source: str, what: str = "name") -> str:
    """`name` if it is a plain file stem (no separators, no `..`); else an InputError naming `source`."""
    if not isinstance(name, str) or not STEM.fullmatch(name) or ".." in name:
        raise InputError(
            f"{source}: {what} {_shown(name)} is not a plain name (letters, digits, _ - and inner dots, no "
            f"'/' or '..'). The file was not written by latentmill, or it was edited: write it again."
        )
    return name


def inside(folder, name: str):
    """`folder / name`, refused unless it is a single plain entry of `folder` (a last line of defence where
    a name from a file becomes an output path)."""
    parts = PurePosixPath(name).parts
    if len(parts) != 1 or parts[0] in (".", "..") or "\\" in name or "\x00" in name:
        raise InputError(f"{folder}: refusing to write {_shown(name)}, which is not a plain name inside it.")
    return folder / name


def _shown(name) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
