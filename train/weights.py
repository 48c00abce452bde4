"""What a run trains, averages and saves: the whole U-Net (with an EMA copy), or LoRA adapters on a frozen
base (an EMA of the adapters only). The loop talks to both the same way."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch

FULL_FILES = ("unet.safetensors", "ema.safetensors")
LORA_FILES = ("lora.safetensors", "lora_ema.safetensors", "adapter.json")


@torch.no_grad()
def _lerp_ema(ema: list, params: list, decay: float, step: int) -> None:
    """One multi-tensor lerp over every parameter (one kernel launch per group, not one per tensor)."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, params, 1 - decay)


class FullWeights:
    """Every U-Net weight trains; the EMA is a second U-Net."""

    files = FULL_FILES

    def __init__(self, unet):
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False)
        self.params = list(unet.parameters())
        self._ema_params = list(self.ema.parameters())

    def update_ema(self, decay: float, step: int) -> None:
        _lerp_ema(self._ema_params, self.params, decay, step)

    def tensors(self) -> dict[str, dict]:
        return {"unet.safetensors": self.unet.state_dict(), "ema.safetensors": self.ema.state_dict()}

    def extra(self) -> dict[str, str]:
        return {}

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.unet.load_state_dict(load_file(folder / "unet.safetensors"))
        self.ema.load_state_dict(load_file(folder / "ema.safetensors"))

    @contextmanager
    def ema_unet(self):
        yield self.ema


class LoraWeights:
    """A frozen base U-Net with LoRA adapters; only the adapters train, average and get saved.

    adapter.json records the rank, alpha, targets, the base (`--model`, or the `--init-from` run) and the
    base weights' fingerprint, taken from the U-Net in memory at every checkpoint: it proves the base did
    not move, and `export`/`merge` check the base they load against it."""

    files = LORA_FILES

    def __init__(self, unet, rank: int, alpha: float, targets: str, seed: int, base: str):
        from latentmill.train.lora import adapter_names, add_lora

        self.unet = unet
        self.modules = add_lora(unet, rank, alpha, targets, seed)
        self.adapter = {"rank": rank, "alpha": alpha, "targets": targets, "base": base}
        self.names = adapter_names(unet)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]

    def update_ema(self, decay: float, step: int) -> None:
        _lerp_ema(self.ema, self.params, decay, step)

    def tensors(self) -> dict[str, dict]:
        return {
            "lora.safetensors": dict(zip(self.names, self.params, strict=True)),
            "lora_ema.safetensors": dict(zip(self.names, self.ema, strict=True)),
        }

    def extra(self) -> dict[str, str]:
        from latentmill.curate.fingerprints import weights_fingerprint
        from latentmill.train.lora import base_state

        info = self.adapter | {
            "modules": len(self.modules),
            "base_fingerprint": weights_fingerprint(base_state(self.unet)),
        }
        return {"adapter.json": json.dumps(info, indent=2)}

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        for files, targets in (("lora.safetensors", self.params), ("lora_ema.safetensors", self.ema)):
            saved = load_file(folder / files)
            for name, target in zip(self.names, targets, strict=True):
                target.copy_(saved[name])

    @contextmanager
    def ema_unet(self):
        """The U-Net with the EMA adapters swapped in (for sample grids), the trained ones back after."""
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)
        try:
            yield self.unet
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, kept)


class FrozenUnet:
    """The U-Net as it was (textual inversion alone trains the text side): nothing of it is saved but its
    base and the base's fingerprint (frozen_unet.json), which export and sample load it from."""

    files = ("frozen_unet.json",)
    params: list = []

    def __init__(self, unet, base: str):
        from latentmill.curate.fingerprints import weights_fingerprint

        self.unet = unet.requires_grad_(False)
        self.base = {"base": base, "base_fingerprint": weights_fingerprint(unet.state_dict())}

    def update_ema(self, decay: float, step: int) -> None:
        pass

    def tensors(self) -> dict[str, dict]:
        return {}

    def extra(self) -> dict[str, str]:
        return {"frozen_unet.json": json.dumps(self.base, indent=2)}

    def load(self, folder: Path) -> None:
        pass

    @contextmanager
    def ema_unet(self):
        yield self.unet


class WithText:
    """The U-Net's weights (full, LoRA or frozen) and the text encoder's trained part
    (train/texttraining.py `TrainableText`), saved, averaged and loaded together; the optimizer gets one
    group each, the text side at its own learning rate."""

    def __init__(self, unet_weights, text):
        self.unet_weights, self.text = unet_weights, text
        self.unet = unet_weights.unet
        self.files = tuple(unet_weights.files) + text.files
        self.params = list(unet_weights.params) + text.params

    def param_groups(self, lr: float, text_lr: float | None) -> list[dict]:
        groups = (
            [{"params": self.unet_weights.params, "lr": lr, "base_lr": lr}]
            if self.unet_weights.params
            else []
        )
        return groups + [{"params": self.text.params, "lr": text_lr or lr, "base_lr": text_lr or lr}]

    def update_ema(self, decay: float, step: int) -> None:
        self.unet_weights.update_ema(decay, step)
        self.text.update_ema(decay, step)

    def tensors(self) -> dict[str, dict]:
        return self.unet_weights.tensors() | self.text.tensors()

    def extra(self) -> dict[str, str]:
        return self.unet_weights.extra() | self.text.extra()

    def load(self, folder: Path) -> None:
        self.unet_weights.load(folder)
        self.text.load(folder)

    @contextmanager
    def ema_unet(self):
        """The EMA U-Net with the text side's EMA swapped in too (sample grids prompt through it)."""
        kept = [p.detach().clone() for p in self.text.params]
        with torch.no_grad():
            torch._foreach_copy_(self.text.params, self.text.ema)
        try:
            with self.unet_weights.ema_unet() as unet:
                yield unet
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.text.params, kept)


def param_groups(weights, lr: float, text_lr: float | None = None) -> list[dict]:
    """The optimizer's groups, each with the learning rate the schedule scales (`base_lr`)."""
    if isinstance(weights, WithText):
        return weights.param_groups(lr, text_lr)
    return [{"params": weights.params, "lr": lr, "base_lr": lr}]
