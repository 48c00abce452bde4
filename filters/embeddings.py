"""Where the CLIP embeddings live: `embeddings/{shard}.npy` beside `scores/{shard}.parquet` (float16, rows
in the parquet's order). `score --save-embeddings` writes them there; dedup and fit-head read them there."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.storage import location
from latentmill.errors import InputError


def embeddings_folder(scores: str | Path) -> Path:
    """The embeddings folder of a scores folder: its sibling `embeddings/`."""
    return location(scores).parent / "embeddings"


def scores_folder(embeddings: str | Path) -> Path:
    """The scores folder of an embeddings folder: its sibling `scores/`."""
    return location(embeddings).parent / "scores"


def embeddings_path(score_shard: str | Path) -> Path:
    """The embeddings file of one score shard."""
    score_shard = location(score_shard)
    return embeddings_folder(score_shard.parent) / f"{score_shard.stem}.npy"


MAX_WIDTH = 1 << 16  # no CLIP model's embedding is wider


def checked_embeddings(path, rows: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(rows, width) of an embeddings file, from its .npy header alone: a 2-d float array (float16, 32 or
    64; not complex, not text, not pickled objects) with at least one column, `rows` rows and `width`
    columns when given, and all its bytes present. Anything else is an InputError naming the file."""
    import numpy as np

    path = location(path)
    what = f"{path}: not an embeddings file written by `latentmill score --save-embeddings`"
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except (ValueError, SyntaxError, TypeError, EOFError, OSError) as err:
        raise InputError(f"{what} ({str(err).splitlines()[0][:120] or type(err).__name__}).") from None
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise InputError(
            f"{what}: its values are {'pickled Python objects' if dtype.kind == 'O' else dtype}, expected "
            f"float16 or float32."
        )
    if len(shape) != 2 or not 0 < shape[1] <= MAX_WIDTH:
        raise InputError(
            f"{what}: shape {list(shape)}, expected (images, width) with a width of 1 to {MAX_WIDTH}."
        )
    if size != offset + shape[0] * shape[1] * dtype.itemsize:
        raise InputError(
            f"{path}: {size - offset:,} bytes of data for {dtype}{list(shape)} "
            f"({shape[0] * shape[1] * dtype.itemsize:,} expected): cut off or padded. Score that shard again."
        )
    if rows is not None and shape[0] != rows:
        raise InputError(
            f"{path}: {shape[0]} rows for the {rows} keys of its score shard; score that shard again."
        )
    if width is not None and shape[1] != width:
        raise InputError(
            f"{path}: {shape[1]}-d embeddings, but the other shards' are {width}-d (another CLIP model?); "
            f"score every shard with the same model."
        )
    return shape[0], shape[1]
