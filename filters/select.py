"""`select`: apply rules to the score parquets; write `selection/{shard}.parquet` (key, keep, reason), the
funnel, and one histogram per score with its threshold marked. Scores are never recomputed: change the
rules and run again."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.funnel import format_funnel, funnel_steps
from latentmill.curate.names import check_column, inside
from latentmill.curate.storage import (
    atomic_path,
    is_remote,
    location,
    make_folder,
    parquet_schema,
    publish_folder,
    read_parquet,
    write_json,
)
from latentmill.errors import InputError, invariant, nothing_left
from latentmill.filters.rules import PRESETS, Rule, derived_columns
from latentmill.schema import StageConfig, opt

THRESHOLDS = {  # option -> the rule it stands for (the rule is named after the option)
    "min_aesthetic": "aesthetic >= {}",
    "max_pwatermark": "pwatermark <= {}",
    "max_punsafe": "punsafe <= {}",
    "min_similarity": "clip_similarity >= {}",
    "min_side": "min_side >= {}",
    "min_area": "area >= {}",
    "max_aspect": "aspect <= {}",
}
NON_SCORE = {"key", "url", "caption", "error", "original_width", "original_height"}


@dataclass
class SelectConfig(StageConfig):
    """The rules of `select`, in the order they run: the preset's, the thresholds', then each `where`."""

    SECTION = "select"
    RUNTIME = ("plots", "dedup")
    preset: str | None = opt(None, "Published cuts.", choices=tuple(PRESETS))
    min_aesthetic: float | None = opt(None, "Minimum aesthetic score.")
    max_pwatermark: float | None = opt(None, "Maximum watermark probability.")
    max_punsafe: float | None = opt(None, "Maximum unsafe probability.")
    min_similarity: float | None = opt(
        None, "Minimum CLIP image-caption cosine (LAION used 0.28 on ViT-B/32)."
    )
    min_side: int | None = opt(None, "Minimum decoded smaller side, px.", low=1)
    min_area: int | None = opt(None, "Minimum decoded area, px.", low=1)
    max_aspect: float | None = opt(None, "Maximum long/short side ratio.", low=1.0)
    where: list[str] = opt(
        factory=list, help='A rule such as "aesthetic >= 6 and pwatermark < 0.5" (repeatable).'
    )
    dedup: str | None = opt(
        None,
        "A `latentmill dedup` folder: its duplicates are dropped with the reason `duplicate` (after every "
        "other rule).",
        path=True,
    )
    plots: bool = opt(True, "Draw one histogram PNG per score with its threshold marked.")

    def rule_specs(self) -> list[tuple[str, str]]:
        """(name, expression) of every rule, in order."""
        specs = list(PRESETS[self.preset]) if self.preset else []
        specs += [
            (key, template.format(getattr(self, key)))
            for key, template in THRESHOLDS.items()
            if getattr(self, key) is not None
        ]
        return specs + [(expression.strip(), expression) for expression in self.where]


def select(scores: str | Path, output: str | Path, config: SelectConfig | None = None) -> dict:
    """Select from every score shard; return the funnel (rows dropped by each rule, in order). The whole
    selection is written anew and swapped in, with its lineage record (selection/lineage.json)."""

    from latentmill.curate.lineage import make_record, record_path
    from latentmill.curate.storage import temporary_name, write_json

    config = (config or SelectConfig()).validate()
    scores, output = location(scores), location(output)
    shards = sorted(p for p in scores.glob("*.parquet") if (scores / f"{p.stem}.stats.json").exists())
    if not shards:
        raise InputError(
            f"{scores}: no finished score shards ({{shard}}.parquet with {{shard}}.stats.json). "
            f"Run `latentmill score` first."
        )
    known = sorted(
        set(derived_columns({c: np.zeros(1) for c in parquet_schema(shards[0]).names if c not in NON_SCORE}))
        | {"width", "height"}
    )
    rules = [Rule(name, expression, known) for name, expression in config.rule_specs()]
    if config.dedup:
        rules.append(DuplicateRule(config.dedup))
    # written whole beside the output (in a local folder for an object store), then swapped in
    held = None
    if is_remote(output):
        from latentmill.curate.scratch import new_folder

        held = new_folder("tmp", f"selection for {output}")
        tmp = held.path / "selection"
    else:
        tmp = temporary_name(output)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        funnel = _select_into(tmp, output, shards, rules, config.plots)
        record = make_record("select", config, inputs={"scores": scores, "dedup": config.dedup})
        write_json(record_path(tmp), record)  # what this selection was made from
        _swap_in(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on failure the previous selection stays as it was
        if held:
            held.release(remove=True)
    if funnel["input"] and not funnel["kept"]:
        drops = {step["rule"]: step["dropped"] for step in funnel["steps"]}
        raise nothing_left(f"select {scores} (loosen the thresholds)", funnel["input"], drops)
    return funnel


class DuplicateRule:
    """Drops the keys a dedup folder marks as duplicates of another image."""

    name = "duplicate"

    def __init__(self, folder: str | Path):
        from latentmill.filters.dedup import duplicate_keys

        self.expression = f"duplicate in {folder}"
        self.keys = duplicate_keys(folder)

    def passes(self, columns: dict) -> np.ndarray:
        keys = columns["key"]
        return np.fromiter((key not in self.keys for key in keys), dtype=bool, count=len(keys))


def _swap_in(new: Path, final) -> None:
    """Replace the folder `final` with `new`: two renames, the old selection removed only after. In an
    object store: the new files sent (identical ones left alone), the lineage record last, stale ones
    removed."""
    if is_remote(final):
        publish_folder(new, final)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _numeric(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _select_into(output: Path, final: Path, shards: list[Path], rules: list, plots: bool) -> dict:
    """Write the selection into `output`, the funnel naming its plots where they will be: under `final`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dropped = {"error": 0} | {r.name: 0 for r in rules}
    values: dict[str, list] = {}
    total = kept_total = 0
    for shard in shards:
        try:
            table = read_parquet(shard)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(
                f"{shard}: cannot be read as parquet ({str(err)[:120]}). Score that shard again: delete "
                f"{shard.stem}.stats.json beside it and re-run `latentmill score`."
            ) from None
        missing = [c for c in ("key", "error") if c not in table.column_names]
        if missing:
            raise InputError(
                f"{shard}: no {' or '.join(repr(c) for c in missing)} column: not a score shard written by "
                f"`latentmill score`. Score that shard again (delete {shard.stem}.stats.json and re-run)."
            )
        for c in table.column_names:  # a column name becomes a histogram's file name
            check_column(c, str(shard), "score column")
        columns = {  # the numbers rules can test; text columns (a carried licence, say) are left out
            c: table.column(c).to_numpy(zero_copy_only=False)
            for c in table.column_names
            if c not in NON_SCORE and _numeric(table.schema.field(c).type)
        }
        columns = derived_columns({c: np.asarray(v, dtype=float) for c, v in columns.items()})
        for c, v in columns.items():
            values.setdefault(c, []).append(v)
        columns["key"] = table.column("key").to_numpy(zero_copy_only=False)  # for the duplicate rule
        n = table.num_rows
        reason = np.full(n, "", dtype=object)
        alive = table.column("error").is_null().to_numpy(zero_copy_only=False).copy()
        reason[~alive] = ["error:" + e for e in table.column("error").to_numpy(zero_copy_only=False)[~alive]]
        dropped["error"] += int((~alive).sum())
        for rule in rules:
            fails = alive & ~rule.passes(columns)
            reason[fails] = rule.name
            dropped[rule.name] += int(fails.sum())
            alive &= ~fails
        total += n
        kept_total += int(alive.sum())
        with atomic_path(output / shard.name) as tmp:
            pq.write_table(
                pa.table(
                    {
                        "key": table.column("key"),
                        "keep": pa.array(alive),
                        "reason": pa.array(list(reason), pa.string()),
                    }
                ),
                tmp,
            )
    steps = funnel_steps(total, dropped)
    funnel = {
        "input": total,
        "steps": steps,
        "kept": kept_total,
        "rules": [{"name": r.name, "expression": r.expression} for r in rules],
    }
    invariant(
        steps[-1]["remaining"] == kept_total,
        f"select funnel ends at {steps[-1]['remaining']}, kept {kept_total}",
    )
    if plots:
        funnel["plots"] = [
            str(final / "plots" / p.name) for p in plot_histograms(values, rules, output / "plots")
        ]
    write_json(output / "funnel.json", funnel)
    return funnel


def plot_histograms(values: dict[str, list], rules: list[Rule], folder: Path) -> list[Path]:
    """One PNG per score column, with every threshold a rule puts on it drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    make_folder(folder)
    paths = []
    for column in sorted(values):
        if column in ("width", "height", "max_side"):
            continue
        data = np.concatenate(values[column])
        data = data[np.isfinite(data)]
        if not len(data):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.hist(data, bins=min(60, max(10, len(data) // 5)), color="#4C72B0")
        for rule in rules:
            for match in re.finditer(
                rf"\b{re.escape(column)}\s*(<=|>=|<|>|==)\s*(-?[0-9.]+)", rule.expression
            ):
                ax.axvline(float(match.group(2)), color="#C44E52", linestyle="--")
                ax.annotate(
                    f"{match.group(1)} {match.group(2)}",
                    (float(match.group(2)), ax.get_ylim()[1] * 0.9),
                    color="#C44E52",
                    fontsize=8,
                )
        ax.set_title(f"{column} ({len(data)} images)")
        ax.set_xlabel(column)
        ax.set_ylabel("images")
        fig.tight_layout()
        path = inside(folder, f"{check_column(column, 'select', 'score column')}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def format_select_funnel(funnel: dict) -> str:
    return format_funnel("scored images", funnel["input"], funnel["steps"], funnel["kept"])
