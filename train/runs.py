"""One way to open a finished (or stopped) run for what comes after training: `sample`, `export`, `merge`
and `--init-from` all read a run's last checkpoint through `load_run`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.errors import InputError
from latentmill.train.checkpoint import latest_checkpoint, weights_needed


@dataclass
class Run:
    path: Path
    checkpoint: Path  # its last intact checkpoint folder
    state: dict  # state.json: step, loader position, the TrainConfig it was trained with
    use_ema: bool

    @property
    def config(self) -> dict:
        return self.state["config"]

    @property
    def weights_file(self) -> Path:
        return self.checkpoint / ("ema.safetensors" if self.use_ema else "unet.safetensors")

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.weights_file)

    def unet_config(self) -> dict:
        return json.loads((self.checkpoint / "unet_config.json").read_text())

    def unet(self):
        """The U-Net, built from the saved config, with the checkpoint's (EMA) weights."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(self.unet_config())
        unet.load_state_dict(self.weights())
        return unet.eval()

    def manifest(self) -> dict:
        """The manifest of the latents it was trained on (VAE, scaling, resolution)."""
        from latentmill.curate.latentshards import read_manifest
        from latentmill.train.loader import expand_shards

        return read_manifest(Path(expand_shards(self.config["shards"])[0]).parent)


def load_run(run: str | Path, use_ema: bool = True, what: str = "") -> Run:
    """The run's last intact checkpoint with the files sample/export/merge need; `what` names the option in
    messages (e.g. "--init-from")."""
    run = Path(run)
    name = f"{what} {run}".strip()
    if not run.is_dir():
        raise InputError(f"{name}: not a run folder.")
    found = latest_checkpoint(run, weights_needed(use_ema))
    if not found:
        raise InputError(
            f"{name}: no checkpoints. Train first (`latentmill train ... -o {run}`), or give a run "
            f"made by `latentmill merge`."
        )
    return Run(run, found, json.loads((found / "state.json").read_text()), use_ema)
