"""Checkpoints without pickle: safetensors for the U-Net, the EMA and the optimizer's tensors, JSON for
the rest (step, loader position, config). Written to a temporary folder, then renamed: atomic."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.contiguous() for index, entries in state["state"].items()
               for name, value in entries.items() if hasattr(value, "shape")}
    scalars = {f"{index}.{name}": value for index, entries in state["state"].items()
               for name, value in entries.items() if not hasattr(value, "shape")}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(run: Path, step: int, unet, ema, optimizer, loader_state: dict, config: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    folder = run / "checkpoints" / f"step-{step:07d}"
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    tensors, rest = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(rest))
    (tmp / "state.json").write_text(json.dumps({"step": step, "loader": loader_state, "config": config}, indent=2))
    (tmp / "unet_config.json").write_text(json.dumps(dict(unet.config), default=list, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoints(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").exists()) if folder.exists() else []


def load_checkpoint(folder: Path, unet, ema, optimizer) -> dict:
    """Load weights and optimizer state in place; return state.json."""
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(folder / "unet.safetensors"))
    ema.load_state_dict(load_file(folder / "ema.safetensors"))
    tensors = load_file(folder / "optimizer.safetensors")
    rest = json.loads((folder / "optimizer.json").read_text())
    state: dict = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    return json.loads((folder / "state.json").read_text())
