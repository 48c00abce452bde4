"""Checkpoint merging, as the usual mergers do it: weighted sum, and add-difference with a third model.

weighted sum:    C = (1 - alpha) * A + alpha * B
add difference:  C = A + alpha * (B - base)
Inputs are run folders (their last checkpoint's EMA or raw weights) or `.safetensors` files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from latentmill.curate.errors import InputError
from latentmill.train.checkpoint import latest_checkpoint, weights_needed


def _weights_file(source: Path, use_ema: bool) -> Path:
    if source.suffix == ".safetensors":
        return source
    found = latest_checkpoint(source, weights_needed(use_ema))
    if not found:
        raise InputError(f"{source}: neither a .safetensors file nor a run with checkpoints.")
    return found / ("ema.safetensors" if use_ema else "unet.safetensors")


def merge(a: str | Path, b: str | Path, output: str | Path, alpha: float, base: str | Path | None = None,
          use_ema: bool = True) -> Path:
    """Merge U-Net weights into `output` (a run folder with one checkpoint, usable by export and --init-from)."""
    from safetensors.torch import load_file, save_file

    paths = [_weights_file(Path(p), use_ema) for p in (a, b, *([base] if base else []))]
    weights = [load_file(p) for p in paths]
    keys = set(weights[0])
    for path, w in zip(paths[1:], weights[1:], strict=True):
        if set(w) != keys or any(w[k].shape != weights[0][k].shape for k in keys):
            raise InputError(f"{path}: its tensors do not match {paths[0]}'s (different architectures cannot merge).")
    merged = {}
    for key in sorted(keys):
        x, y = weights[0][key].double(), weights[1][key].double()
        value = x + alpha * (y - weights[2][key].double()) if base else (1 - alpha) * x + alpha * y
        merged[key] = value.to(weights[0][key].dtype).contiguous()
    output = Path(output)
    folder = output / "checkpoints" / "step-0000000"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(folder / "ema.safetensors"))
    save_file(merged, str(folder / "unet.safetensors"))
    if Path(a).suffix != ".safetensors":  # carry the first run's config so export can rebuild the pipeline
        source = latest_checkpoint(Path(a), weights_needed(use_ema))
        for name in ("unet_config.json", "state.json"):
            shutil.copy(source / name, folder / name)
    recipe = {"a": str(a), "b": str(b), "base": str(base) if base else None, "alpha": alpha,
              "method": "add_difference" if base else "weighted_sum"}
    (output / "merge.json").write_text(json.dumps(recipe, indent=2))
    return output
