"""The report's learned tokens: for each textual-inversion run, the vocabulary words nearest each of its
token's vectors by cosine (train/textexport.py `nearest_words`), from the last checkpoint's EMA vectors."""

from __future__ import annotations

import html
import json

from latentmill.layout import Layout

NEAREST = 8


def token_section(lay: Layout) -> str | None:
    """A table per textual-inversion run (token, vector, nearest words with their cosine), or None."""
    from safetensors.torch import load_file

    from latentmill.train.checkpoint import checkpoints
    from latentmill.train.textexport import nearest_words

    tables = []
    for run in lay.run_folders():
        found = checkpoints(run)
        if not found or not (found[-1] / "token.json").exists():
            continue
        token = json.loads((found[-1] / "token.json").read_text())
        vectors = load_file(found[-1] / "embeddings_ema.safetensors")[token["token"]]
        rows = "".join(
            f"<tr><td>{i}</td><td>{', '.join(f'{html.escape(w)} ({c:.2f})' for w, c in words)}</td></tr>"
            for i, words in enumerate(nearest_words(token["text_encoder"], vectors, NEAREST))
        )
        tables.append(
            f"<p>{html.escape(run.name)}: <code>{html.escape(token['token'])}</code> (started from "
            f"<code>{html.escape(token['init_word'])}</code>, step {found[-1].name.split('-')[-1].lstrip('0')})</p>"
            f"<table><tr><th>vector</th><th>nearest words (cosine)</th></tr>{rows}</table>"
        )
    return "".join(tables) or None
