"""Checkpoint merging, as the usual mergers do it: weighted sum, and add-difference with a third model.

weighted sum:    C = (1 - alpha) * A + alpha * B
add difference:  C = A + alpha * (B - base)
Inputs are run folders (their last checkpoint's EMA or raw weights) or `.safetensors` files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from latentmill.curate.errors import InputError
from latentmill.train.checkpoint import checkpoints
from latentmill.train.runs import load_run


def _source(path: Path, use_ema: bool):
    """(weights file, the run it belongs to or None for a bare .safetensors file)."""
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise InputError(f"{path}: no such weights file.")
        return path, None
    loaded = load_run(path, use_ema)
    return loaded.weights_file, loaded


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
    from safetensors.torch import load_file, save_file

    sources = [_source(Path(p), use_ema) for p in (a, b, *([base] if base else []))]
    paths = [path for path, _ in sources]
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
    weights = [load_file(p) for p in paths]
    keys = set(weights[0])
    for path, w in zip(paths[1:], weights[1:], strict=True):
        if set(w) != keys or any(w[k].shape != weights[0][k].shape for k in keys):
            raise InputError(
                f"{path}: its tensors do not match {paths[0]}'s (different architectures cannot merge)."
            )
    merged = {}
    for key in sorted(keys):
        x, y = weights[0][key].double(), weights[1][key].double()
        value = x + alpha * (y - weights[2][key].double()) if base else (1 - alpha) * x + alpha * y
        merged[key] = value.to(weights[0][key].dtype).contiguous()
    output = Path(output)
    if checkpoints(output):
        raise InputError(
            f"{output} already holds a run ({checkpoints(output)[-1].name}); merge into a new folder."
        )
    recipe = {
        "a": str(a),
        "b": str(b),
        "base": str(base) if base else None,
        "alpha": alpha,
        "method": "add_difference" if base else "weighted_sum",
        "config_from": str(donor.path),
    }
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / "checkpoints" / donor.checkpoint.name
    folder.mkdir(parents=True)
    save_file(merged, str(folder / "ema.safetensors"))
    save_file(merged, str(folder / "unet.safetensors"))
    shutil.copy(donor.checkpoint / "unet_config.json", folder / "unet_config.json")
    state = dict(donor.state) | {"merge": recipe}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / "merge.json").write_text(json.dumps(recipe, indent=2))
    if output.exists():  # an empty or stale folder (no checkpoints): replaced
        shutil.rmtree(output)
    os.replace(tmp, output)
    return output
