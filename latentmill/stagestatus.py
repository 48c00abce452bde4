"""How far each stage of a work folder got, read from its files (`latentmill status`): the stage table's
`status` entries. Each takes (layout, the stage's row) and returns (done, detail)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from latentmill.curate.records import NUMBER, read_record
from latentmill.layout import Layout

if TYPE_CHECKING:
    from latentmill.stages import Stage


AGAIN = "run the stage again with --overwrite (or delete the file and run it again)"


def count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


def prefilter_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    if not lay.kept_funnel.exists():
        return "no", ""
    f = read_record(lay.kept_funnel, fix=AGAIN, fields={"kept_rows": int, "input_rows": int})
    return "yes", f"{f['kept_rows']:,} of {f['input_rows']:,} rows kept"


def download_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    detail = ""
    if lay.download_summary.exists():
        s = read_record(lay.download_summary, fix=AGAIN, fields={"success": int, "failed": int})
        detail = f"{s['success']:,} images, {s['failed']:,} failed"
    return f"{count(lay.images, '*_stats.json')} shards", detail


def shard_status(pattern: str) -> Callable[[Layout, Stage], tuple[str, str]]:
    """Done shards (files matching `pattern` in the stage's first output folder) of the image shards."""
    return lambda lay, stage: (
        f"{count(getattr(lay, stage.outputs[0]), pattern)}/{count(lay.images, '*.tar')} shards",
        "",
    )


def fit_head_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    heads = sorted(p.stem for p in lay.heads.glob("*.safetensors")) if lay.heads.exists() else []
    return f"{len(heads)} head(s)", ", ".join(heads)


def dedup_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    funnel = lay.dedup / "funnel.json"
    if not funnel.exists():
        return "no", ""
    f = read_record(funnel, fix=AGAIN, fields={"duplicates": int, "groups": int})
    return "yes", f"{f['duplicates']:,} duplicates in {f['groups']:,} groups"


def select_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    done, _ = shard_status("*.parquet")(lay, stage)
    if not lay.select_funnel.exists():
        return done, ""
    f = read_record(lay.select_funnel, fix=AGAIN, fields={"kept": int, "input": int})
    return done, f"{f['kept']:,} of {f['input']:,} kept"


def encode_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    parts, done = [], []
    for resolution, folder in lay.latent_folders().items():
        done.append(f"{count(folder, '*.stats.json')}/{count(lay.images, '*.tar')}")
        if (folder / "manifest.json").exists():
            manifest = read_record(folder / "manifest.json", fix=AGAIN, fields={"samples": int})
            parts.append(f"{manifest['samples']:,} latents at {resolution} px")
    return (", ".join(done) + " shards") if done else "no", "; ".join(parts)


def train_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    from latentmill.train.checkpoint import last_state

    parts = []
    for run in lay.run_folders():
        state = last_state(run)
        if state:
            steps = state["config"].get("steps")
            parts.append(f"{run.name} step {state['step']}/{steps if _is_count(steps) else '?'}")
    return ("yes" if parts else "no"), "; ".join(parts)


def _is_count(value) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)


def export_status(lay: Layout, stage: Stage) -> tuple[str, str]:
    return ("yes", str(lay.export)) if (lay.export / "model_index.json").exists() else ("no", "")
