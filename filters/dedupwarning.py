"""`dedup`'s check of its own result: most of a set marked duplicates is what embeddings that cannot tell
pictures apart give, not what real image sets hold; the warning names the scores' CLIP and the likely cause."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.lineage import record_path
from latentmill.curate.records import read_record

# more than this share of a set marked duplicates is not what real image sets hold (LAION-2B's SemDeDup
# share is about a third at a loose threshold); it is what embeddings that cannot tell pictures apart give
IMPLAUSIBLE_SHARE = 0.5


def implausible_share(funnel: dict, scores: Path) -> str | None:
    """A warning naming the likely cause when most of the set is marked duplicates, else None."""
    if funnel["input"] < 10 or funnel["duplicates"] <= IMPLAUSIBLE_SHARE * funnel["input"]:
        return None
    record = record_path(scores)
    settings = ((read_record(record) if record.exists() else None) or {}).get("settings") or {}
    model, weights = settings.get("clip_model"), settings.get("pretrained")
    untrained = bool(model) and weights in (None, "none")
    shown = (
        "random weights" if untrained else ("a checkpoint file" if "content:" in str(weights) else weights)
    )
    made = f" (the scores' CLIP: {model}, {shown})"
    cause = (
        "embeddings of an untrained CLIP (random weights: every picture looks alike)"
        if untrained
        else "embeddings that cannot tell these pictures apart (an untrained or tiny CLIP), or a --threshold too low"
    )
    return (
        f"dedup: {funnel['duplicates']:,} of {funnel['input']:,} images "
        f"({funnel['duplicates'] / funnel['input']:.0%}) marked duplicates at cosine >= {funnel['threshold']}"
        f"{made if model else ''}: far more than real image sets hold. Likely cause: {cause}. Score with a "
        f"pretrained CLIP (the default, `latentmill score`) or raise --threshold before `select --dedup` drops them."
    )
