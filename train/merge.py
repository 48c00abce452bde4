"""Checkpoint merging, as the usual mergers do it: weighted sum, and add-difference with a third model.

weighted sum:    C = (1 - alpha) * A + alpha * B
add difference:  C = A + alpha * (B - base)
LoRA:            C = base + alpha * (rank-scaled B @ A of each adapted layer)
Inputs are run folders (their last checkpoint's EMA or raw weights; a LoRA run's base with its adapter
baked in), diffusers U-Net or pipeline folders (for a LoRA's base), or `.safetensors` files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from latentmill.curate.storage import is_remote, location, publish_folder, temporary_name
from latentmill.errors import InputError
from latentmill.train.checkpoint import LATENTS_MANIFEST, checkpoints
from latentmill.train.runinputs import recorded_state
from latentmill.train.runs import Run, load_run


def _source(path: Path, use_ema: bool) -> tuple[dict, Run | None]:
    """(U-Net weights, the run they come from or None for a .safetensors file or a diffusers folder)."""
    from safetensors.torch import load_file

    if is_remote(path):  # a run in an object store
        loaded = load_run(path, use_ema)
        return loaded.weights(), loaded
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise InputError(f"{path}: no such weights file.")
        return load_file(path), None
    if (
        path.is_dir()
        and not checkpoints(path)
        and ((path / "unet").is_dir() or (path / "config.json").exists())
    ):
        from latentmill.train.models import load_pretrained_unet

        return load_pretrained_unet(path, f"{path}: not").state_dict(), None
    loaded = load_run(path, use_ema)
    return loaded.weights(), loaded


def merge(
    a: str | Path,
    b: str | Path,
    output: str | Path,
    alpha: float,
    base: str | Path | None = None,
    use_ema: bool = True,
    config_from: str | Path | None = None,
) -> Path:
    """Merge U-Net weights into `output`: a complete run (one checkpoint with weights, U-Net config and
    state.json) that `export`, `sample` and `--init-from` accept. The merged run takes its configuration
    (text encoder, latents, prediction type) from `config_from`, else from the first input that is a run.
    Written whole, then renamed."""
    inputs = [p if is_remote(p) else Path(p) for p in (a, b, *([base] if base else []))]
    sources = [_source(p, use_ema) for p in inputs]
    donor = (
        load_run(config_from, use_ema, "--config-from")
        if config_from
        else next((run for _, run in sources if run is not None), None)
    )
    if donor is None:
        raise InputError(
            f"{a}, {b}: both are bare .safetensors files; give --config-from RUN, the run whose "
            f"configuration (text encoder, latents, prediction) the merged run takes."
        )
    weights = [w for w, _ in sources]
    keys = set(weights[0])
    for path, w in zip(inputs[1:], weights[1:], strict=True):
        if set(w) != keys or any(w[k].shape != weights[0][k].shape for k in keys):
            raise InputError(
                f"{path}: its tensors do not match {inputs[0]}'s (different architectures cannot merge)."
            )
    merged = {}
    for key in sorted(keys):
        x, y = weights[0][key].double(), weights[1][key].double()
        value = x + alpha * (y - weights[2][key].double()) if base else (1 - alpha) * x + alpha * y
        merged[key] = value.to(weights[0][key].dtype).contiguous()
    recipe = {
        "a": str(a),
        "b": str(b),
        "base": str(base) if base else None,
        "alpha": alpha,
        "method": "add_difference" if base else "weighted_sum",
        "config_from": str(donor.path),
    }
    return _write_run(output if is_remote(output) else Path(output), merged, donor, recipe)


def merge_lora_run(
    adapter: str | Path,
    output: str | Path,
    alpha: float = 1.0,
    base: str | Path | None = None,
    use_ema: bool = True,
    force: bool = False,
) -> Path:
    """Bake a LoRA run's adapter into its base (or into `base`: a run, a diffusers folder or a .safetensors
    file) at scale `alpha`: a complete run of full weights, trained-on configuration kept. A base whose
    fingerprint is not the one the adapter was trained on is refused, unless `force`."""
    from latentmill.train.lora import merge_lora

    run = load_run(adapter, use_ema, "--lora")
    if not run.is_lora:
        raise InputError(
            f"--lora {adapter}: not a LoRA run (no adapter.json in {run.checkpoint.name}); merge whole "
            f"runs as A and B instead."
        )
    if base:
        base_weights = _source(base if is_remote(base) else Path(base), use_ema)[0]
        run.check_base(base_weights, base, force)
    else:
        base_weights = run.base_weights(force)
    merged = merge_lora(base_weights, run.adapter_weights(), run.adapter["alpha"], alpha)
    recipe = {
        "lora": str(adapter),
        "base": str(base or run.adapter["base"]),
        "alpha": alpha,
        "method": "lora",
        "config_from": str(run.path),
    }
    return _write_run(output if is_remote(output) else Path(output), merged, run, recipe)


TEXT_FILES = (
    "token.json",
    "embeddings.safetensors",
    "embeddings_ema.safetensors",
    "text_adapter.json",
    "text_lora.safetensors",
    "text_lora_ema.safetensors",
)


def _write_run(output: Path, merged: dict, donor: Run, recipe: dict) -> Path:
    """A complete run in `output` (one checkpoint: weights, U-Net config, state.json, and the donor's
    trained text-encoder files), written whole, then renamed. A LoRA donor's configuration loses its U-Net
    LoRA settings: the merged run is a whole U-Net."""
    from safetensors.torch import save_file

    if is_remote(output):  # made here whole, then sent (state.json last)
        if location(output).exists():
            raise InputError(f"{output} already holds files; merge into a new folder.")
        from latentmill.curate.scratch import temporary_folder

        with temporary_folder(f"merge into {output}") as folder:
            made = _write_run(folder / location(output).name, merged, donor, recipe)
            publish_folder(made, output, last=("state.json",))
        return location(output)
    if checkpoints(output):
        raise InputError(
            f"{output} already holds a run ({checkpoints(output)[-1].name}); merge into a new folder."
        )
    tmp = temporary_name(output)
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / "checkpoints" / donor.checkpoint.name
    folder.mkdir(parents=True)
    merged = {k: v.contiguous() for k, v in merged.items()}
    save_file(merged, str(folder / "ema.safetensors"))
    save_file(merged, str(folder / "unet.safetensors"))
    shutil.copy(donor.checkpoint / "unet_config.json", folder / "unet_config.json")
    for name in TEXT_FILES:  # what the donor trained of its text encoder (a token, adapters) comes along
        if (donor.checkpoint / name).exists():
            shutil.copy(donor.checkpoint / name, folder / name)
    config = dict(donor.config) | {"lora_rank": 0, "lora_alpha": None}
    state = dict(donor.state) | {"config": config, "merge": recipe}
    (folder / "state.json").write_text(json.dumps(recorded_state(state, output), indent=2))
    try:  # the latents' manifest comes along where the donor has it (sample and export need no latents)
        (folder / LATENTS_MANIFEST).write_text(json.dumps(donor.manifest(), indent=2))
    except InputError:
        pass  # a donor whose latents are gone or unnamed: the merged run reads them where it is used
    (tmp / "merge.json").write_text(json.dumps(recipe, indent=2))
    if output.exists():  # an empty or stale folder (no checkpoints): replaced
        shutil.rmtree(output)
    os.replace(tmp, output)
    return output
