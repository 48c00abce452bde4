"""What `train --resume` may change in a run's settings, and what it takes from them."""

from __future__ import annotations

from dataclasses import fields

from latentmill.train.config import TrainConfig

# where the run reads and writes: paths, not settings (a moved work folder resumes)
RESUME_PATHS = ("output", "shards", "resume", "init_from")
# what `train --resume` may change: the settings that do not shape the weights (TrainConfig.RUNTIME, which
# `run` leaves out of a run's lineage too): how long to train, how often to log, checkpoint and sample,
# where to report, the loader processes, the device, compile and gradient checkpointing. Recorded in
# state.json ("changes") with the step they changed at. Any other setting that differs from the run's is
# refused: the checkpoint, the loader position or the schedule would not fit it.
RESUME_MAY_CHANGE = tuple(key for key in TrainConfig.RUNTIME if key not in RESUME_PATHS)


def resume_differences(saved: dict, config: TrainConfig) -> tuple[list[str], list[dict]]:
    """(refused, allowed) differences between a run's saved configuration and the one given to resume it:
    refused as `key: saved -> given` lines, allowed as {key, from, to} records."""
    from dataclasses import asdict

    from latentmill.train.runinputs import recorded_config

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    # paths compared where they lead: a folder given relative to another directory is the same folder
    saved, given = recorded_config(saved), recorded_config(asdict(config))
    refused, allowed = [], []
    for f in fields(TrainConfig):
        if f.name in RESUME_PATHS:
            continue
        before = saved.get(f.name, defaults[f.name])
        now = given[f.name]
        if isinstance(before, (list, tuple)) or isinstance(now, (list, tuple)):
            before, now = list(before or []), list(now or [])
        if before == now:
            continue
        if f.name in RESUME_MAY_CHANGE:
            allowed.append({"key": f.name, "from": before, "to": now})
        else:
            flag = "--" + f.name.replace("_", "-")
            refused.append(f"{f.name} ({flag}): {before!r} -> {now!r}")
    return refused, allowed


def resumed_values(saved: dict, typed: list[str]) -> dict:
    """What `train --resume` takes from the run's saved configuration: every setting not typed on the
    command line (paths excepted: they are where the run is now)."""
    names = {f.name for f in fields(TrainConfig)} - set(typed) - set(RESUME_PATHS)
    return {key: value for key, value in saved.items() if key in names}
