"""Reading a selection folder (`selection/{shard}.parquet`: key, keep, reason) for the stages after it."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.storage import location, read_parquet
from latentmill.errors import InputError


def kept_keys(selection: str | Path | None, shard: str) -> set[str] | None:
    """The keys to keep in `shard`, or None when there is no selection (everything is kept)."""
    if selection is None:
        return None
    path = location(selection) / f"{shard}.parquet"
    if not path.exists():
        raise InputError(
            f"{path}: the selection has no file for image shard {shard}. "
            f"Run `latentmill select` over every score shard, or leave out --selection."
        )
    table = read_parquet(path)
    missing = {"key", "keep"} - set(table.column_names)
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; a selection needs key, keep, reason."
        )
    return {
        k
        for k, keep in zip(table.column("key").to_pylist(), table.column("keep").to_pylist(), strict=True)
        if keep
    }


def check_selection(selection: str | Path | None, shards: list[str]) -> None:
    """Every shard's selection file there and readable (an InputError naming the first that is not)."""
    for shard in shards if selection is not None else []:
        kept_keys(selection, shard)
