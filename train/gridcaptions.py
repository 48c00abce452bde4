"""The prompts and seeds of a grid PNG, kept in its text (`save_grid` in train/sampling.py writes them,
the report reads them back: this module imports no torch)."""

from __future__ import annotations

from pathlib import Path

GRID_TEXT_KEY = "latentmill:samples"  # the PNG text chunk of a grid: [{"prompt", "seed"}, ...], one per image


def grid_captions(path: str | Path) -> list[dict] | None:
    """The prompts and seeds a grid PNG records (save_grid), or None for a grid without them."""
    import io
    import json

    from PIL import Image

    try:  # by its bytes: a grid in an object store too (the report of s3://... work folders)
        data = path.read_bytes() if hasattr(path, "read_bytes") else Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            text = image.text.get(GRID_TEXT_KEY) if hasattr(image, "text") else None
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None
