"""The report's learned tokens: for each textual-inversion run, the vocabulary words nearest each of its
token's vectors by cosine (train/textexport.py `nearest_words`), from the last checkpoint's EMA vectors."""

from __future__ import annotations

from latentmill.curate.records import read_record
from latentmill.layout import Layout
from latentmill.reporthtml import Markup, concat, html

NEAREST = 8


def token_section(lay: Layout) -> Markup | None:
    """A table per textual-inversion run (token, vector, nearest words with their cosine), or None."""
    from safetensors.torch import load_file

    from latentmill.train.checkpoint import checkpoints
    from latentmill.train.textexport import nearest_words

    tables = []
    for run in lay.run_folders():
        found = checkpoints(run)
        if not found or not (found[-1] / "token.json").exists():
            continue
        fix = f"delete {found[-1]} (the run's checkpoint before it is used) or train again"
        token = read_record(found[-1] / "token.json", fix=fix, fields={"token": str, "text_encoder": str})
        vectors = load_file(found[-1] / "embeddings_ema.safetensors")[token["token"]]
        rows = concat(
            html("<tr><td>{}</td><td>{}</td></tr>", i, ", ".join(f"{w} ({c:.2f})" for w, c in words))
            for i, words in enumerate(nearest_words(token["text_encoder"], vectors, NEAREST))
        )
        tables.append(
            html(
                "<p>{}: <code>{}</code> (started from <code>{}</code>, step {})</p>"
                "<table><tr><th>vector</th><th>nearest words (cosine)</th></tr>{}</table>",
                run.name,
                token["token"],
                token["init_word"],
                found[-1].name.split("-")[-1].lstrip("0"),
                rows,
            )  # fmt: skip
        )
    return concat(tables) or None
