"""Checkpoints without pickle: safetensors for the U-Net, the EMA and the optimizer's tensors, JSON for
the rest (step, loader position, config). Written to a temporary folder, then renamed: atomic."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from latentmill.curate.storage import temporary_name
from latentmill.errors import InputError, TrainingFailed, warn
from latentmill.schema import check_saved
from latentmill.train.config import TrainConfig
from latentmill.train.resumeconfig import RESUME_MAY_CHANGE, resume_differences

LATENTS_MANIFEST = "latents.json"  # the manifest of the latents trained on: sample and export need no latents
STATE_FILES = ("optimizer.safetensors", "optimizer.json", "state.json", "unet_config.json")


def training_files(weight_files: tuple[str, ...]) -> tuple[str, ...]:
    """The files a checkpoint needs to resume from: the weights' (full or LoRA) and the state's."""
    return weight_files + STATE_FILES


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.contiguous()
        for index, entries in state["state"].items()
        for name, value in entries.items()
        if hasattr(value, "shape")
    }
    scalars = {
        f"{index}.{name}": value
        for index, entries in state["state"].items()
        for name, value in entries.items()
        if not hasattr(value, "shape")
    }
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    run: Path,
    step: int,
    weights,
    optimizer,
    loader_state: dict,
    config: dict,
    keep: int,
    changes: list[dict] = (),
    manifest: dict | None = None,
    resumed_at: list[int] = (),
) -> Path:
    """Write `weights` (FullWeights or LoraWeights: their safetensors files and small JSON files), the
    optimizer and state.json (step, loader position, config, the settings changed on resume and the step
    they changed at; its paths absolute, and where the run was written: train/runinputs.py) and the latents'
    `manifest` into checkpoints/step-NNNNNNN, atomically; keep the last `keep`."""
    from safetensors.torch import save_file

    from latentmill.train.runinputs import recorded_state

    folder = run / "checkpoints" / f"step-{step:07d}"
    tmp = temporary_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state in weights.tensors().items():
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / name))
    for name, text in weights.extra().items():
        (tmp / name).write_text(text)
    tensors, rest = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(rest))
    state = {"step": step, "loader": loader_state, "config": config, "changes": list(changes)}
    state["resumed_at"] = list(resumed_at)
    (tmp / "state.json").write_text(json.dumps(recorded_state(state, run), indent=2))
    if manifest is not None:  # its VAE, where a folder, absolute as the run's own paths
        from latentmill.train.runinputs import absolute

        encoded = dict(manifest.get("encode_config") or {})
        encoded["vae"] = absolute(encoded.get("vae"))
        manifest = dict(manifest) | {"encode_config": encoded}
        (tmp / LATENTS_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    (tmp / "unet_config.json").write_text(json.dumps(dict(weights.unet.config), default=list, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoints(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").exists()) if folder.exists() else []


STARTED = "started.json"  # a run's settings as it started: what --resume takes before the first checkpoint


def last_state(run: Path) -> dict | None:
    """state.json of the run's newest checkpoint (step, config); for a run stopped before its first
    checkpoint, step 0 and the settings it started with (RUN/started.json); None for no run."""
    from latentmill.curate.records import read_record
    from latentmill.curate.storage import location

    found = checkpoints(location(run))
    for folder in reversed(found):  # a damaged newest one: resume falls back past it (and says so)
        if damage(folder, ("state.json",)) is None:
            from latentmill.train.runinputs import input_paths

            state = json.loads((folder / "state.json").read_text())
            check_saved(TrainConfig, state["config"], folder / "state.json", _REMOVE.format(folder=folder))
            return state | {"config": input_paths(location(run), state).config(state["config"])}
    if found:
        newest = found[-1] / "state.json"
        read_record(newest, fields={"step": int, "config": dict}, fix=_REMOVE.format(folder=found[-1]))
        raise InputError(
            f"{newest}: not the state latentmill writes. Fix: {_REMOVE.format(folder=found[-1])}."
        )
    started = location(run) / STARTED
    if not started.exists():
        return None
    fix = f"delete {started} and train {run} again without --resume (it stopped before its first checkpoint)"
    return {"step": 0, "config": check_saved(TrainConfig, read_record(started, fix=fix), started, fix)}


_REMOVE = "delete {folder} (with no intact checkpoint left, the run starts over)"


def record_start(run: Path, config: TrainConfig, sets: list) -> None:
    """What a new run keeps as it starts: RUN/lineage.json (the settings that shape the weights, the latent
    folders and the models it starts from, by content: latentmill.curate.lineage) and RUN/started.json (its
    settings: a run killed before its first checkpoint resumes from step 0 with them)."""
    from dataclasses import asdict

    from latentmill.curate.lineage import make_record, record_path
    from latentmill.curate.storage import write_json
    from latentmill.train.runinputs import absolute, recorded_config

    inputs = {f"latents[{i}]": absolute(str(folder)) for i, (folder, _) in enumerate(sets)}
    models = {"model": config.model, "text_encoder": config.text_encoder, "vae": config.vae}
    models["init_from"] = config.init_from
    models = {key: absolute(value) for key, value in models.items()}
    write_json(record_path(run), make_record("train", config, inputs=inputs, models=models))
    write_json(run / STARTED, recorded_config(asdict(config)))


def remove_stale_temporaries(run: Path) -> list[Path]:
    """Remove the temporary folders of checkpoints whose writer was killed before the rename."""
    folder = run / "checkpoints"
    stale = sorted(folder.glob(".step-*.tmp-*")) if folder.exists() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    return stale


def damage(folder: Path, needed: tuple[str, ...]) -> str | None:
    """What is wrong with a checkpoint folder (a missing, empty or cut-off file), or None if intact."""
    for name in needed:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            data_size = path.stat().st_size
            if name.endswith(".safetensors"):
                with open(path, "rb") as f:
                    head = f.read(8)
                    if len(head) < 8:
                        return f"{name} is cut off"
                    (header,) = struct.unpack("<Q", head)
                    if header > data_size:
                        return f"{name} is cut off"
                    meta = json.loads(f.read(header))
                ends = [v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"]
                if 8 + header + max(ends, default=0) > data_size:
                    return f"{name} is cut off"
            else:
                value = json.loads(path.read_text())
                if not isinstance(value, dict) or (name == "state.json" and not _a_state(value)):
                    return f"{name} is not what latentmill writes there"
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            OverflowError,
            RecursionError,
            struct.error,
        ):
            return f"{name} is unreadable"
    return None


def _a_state(state: dict) -> bool:
    step = state.get("step")
    return (
        isinstance(step, int)
        and not isinstance(step, bool)
        and step >= 0
        and isinstance(state.get("config"), dict)
    )


def latest_checkpoint(run: Path, needed: tuple[str, ...], fallback: bool = False) -> Path | None:
    """The newest checkpoint of `run` (None if it has none). A damaged newest one is an InputError naming
    the file, or, with `fallback` (resuming), skipped with a warning for the newest intact one."""
    found = checkpoints(run)
    newest_problem = None
    for folder in reversed(found):
        problem = damage(folder, needed)
        if problem is None:
            return folder
        if not fallback:
            older = [f.name for f in found if f != folder]
            raise InputError(
                f"{folder}: damaged checkpoint ({problem}). Delete that folder to use the previous one"
                f"{f' ({older[-1]})' if older else ''}."
            )
        warn(f"{folder}: damaged checkpoint ({problem}); falling back to the previous one.")
        newest_problem = newest_problem or problem
    if found:
        raise InputError(f"{run}: every checkpoint is damaged (newest: {found[-1].name}: {newest_problem}).")
    return None


def is_lora(folder: Path) -> bool:
    """Whether a checkpoint holds LoRA adapters (adapter.json) rather than a whole U-Net."""
    return (folder / "adapter.json").exists()


def unet_kind(folder: Path) -> str:
    """What a checkpoint holds of the U-Net: lora (adapters on a base), frozen (its base as it was: textual
    inversion alone) or full (the whole U-Net)."""
    if is_lora(folder):
        return "lora"
    return "frozen" if (folder / "frozen_unet.json").exists() else "full"


def weights_needed(use_ema: bool, kind: str = "full") -> tuple[str, ...]:
    """The files export, sample and merge read from a checkpoint (`kind` as `unet_kind` gives it)."""
    if kind == "lora":
        weights = ("lora_ema.safetensors" if use_ema else "lora.safetensors", "adapter.json")
    elif kind == "frozen":
        weights = ("frozen_unet.json",)
    else:
        weights = ("ema.safetensors" if use_ema else "unet.safetensors",)
    return weights + ("unet_config.json", "state.json")


def truncate_log(run: Path, step: int) -> None:
    """Drop `log.jsonl` lines past `step` (written after the checkpoint a resume starts from) and a cut-off
    last line, so a resumed run's log has each step once."""
    path = run / "log.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        later = (
            isinstance(entry, dict) and isinstance(entry.get("step"), (int, float)) and entry["step"] > step
        )
        if not later:
            kept.append(line)
    from latentmill.curate.storage import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


def loader_state_of(saved: dict, rank: int, world: int) -> dict:
    """This rank's loader position in a checkpoint's state.json (a run of many ranks keeps each one's)."""
    if "ranks" not in saved:
        if world > 1:
            raise InputError(
                f"--resume: the checkpoint was written by one process; resume it with one, not {world}."
            )
        return saved
    if len(saved["ranks"]) != world:
        raise InputError(
            f"--resume: the checkpoint was written by {len(saved['ranks'])} ranks, this run has {world}: the "
            f"shards split by rank, so resume with {len(saved['ranks'])} (torchrun --nproc-per-node, "
            f"--num-workers)."
        )
    return saved["ranks"][rank]


def load_checkpoint(folder: Path, weights, optimizer) -> dict:
    """Load weights (FullWeights or LoraWeights) and optimizer state in place; return state.json."""
    from safetensors.torch import load_file

    weights.load(folder)
    tensors = load_file(folder / "optimizer.safetensors")
    from latentmill.curate.records import read_record

    fix = _REMOVE.format(folder=folder)
    rest = read_record(folder / "optimizer.json", fix=fix, fields={"scalars": dict, "param_groups": list})
    state: dict = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    return read_record(folder / "state.json", fix=fix, fields={"step": int, "config": dict})


def check_resume_point(run: Path, config: TrainConfig) -> None:
    """A run folder with checkpoints is continued only with --resume, and --resume needs checkpoints of
    the same kind of run."""
    if checkpoints(run) and not config.resume:
        raise InputError(
            f"{run} already has checkpoints (last: {checkpoints(run)[-1].name}): pass --resume to continue "
            f"that run, or give a new -o."
        )
    if config.resume and not checkpoints(run) and not (run / STARTED).exists():
        raise InputError(
            f"--resume: {run} has no checkpoints to resume from. Check -o, or drop --resume to start a new run."
        )
    if config.resume:
        _check_same_run(run, config)


def _check_same_run(run: Path, config: TrainConfig) -> None:
    """--resume continues the run as it was configured: a setting that differs from the saved one is
    refused by name, except the few RESUME_MAY_CHANGE (recorded when the run resumes)."""
    try:
        saved = last_state(run)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged newest checkpoint: the fallback deals with it
    refused, _ = resume_differences(saved, config)
    if refused:
        raise InputError(
            f"--resume: {run} was trained with other settings ({'; '.join(refused)}). Resume with the run's "
            f"settings (leave those options out: the saved ones are used), or start a new run with another -o. "
            f"On resume only {', '.join(RESUME_MAY_CHANGE)} may change."
        )


def stop_on_nonfinite(first_bad, recent_keys: dict, run: Path, last_finite) -> None:
    """Raise with the step and the batch keys where the loss first stopped being finite, if it did."""
    step, loss = first_bad.tolist()
    if step < 0:
        return
    keys = recent_keys.get(int(step), [])
    last = checkpoints(run)[-1].name if checkpoints(run) else "none yet"
    raise TrainingFailed(
        f"the loss is {loss} at step {int(step)} (last finite loss logged: {last_finite}); batch keys: "
        f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}. The last good checkpoint stays: {last}. "
        f"To try: check those samples with `latentmill latents verify`, lower --learning-rate, keep "
        f"--max-grad-norm on, or train in fp32 (--precision fp32); then --resume."
    )
