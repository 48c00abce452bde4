"""Where the CLIP embeddings live: `embeddings/{shard}.npy` beside `scores/{shard}.parquet` (float16, rows
in the parquet's order). `score --save-embeddings` writes them there; dedup and fit-head read them there."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.storage import location


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
