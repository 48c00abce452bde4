"""The training configuration: one dataclass, saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    shards: str  # folder, brace pattern or list of latent shards
    output: str  # runs/NAME
    model: str = "tiny"  # tiny | sd15 | sd2-base | a pretrained diffusers folder or id
    text_encoder: str | None = None  # openclip:NAME[:PRETRAINED] or a pipeline folder; None: text_emb in the shards
    vae: str | None = None  # for sample grids and export (default: the manifest's)
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per rank and micro-step
    grad_accum: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    schedule: str = "constant"  # or cosine
    max_grad_norm: float = 1.0
    prediction: str = "epsilon"  # or v_prediction
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    size_conditioning: bool = False  # SDXL-style conditioning on the stored original size and crop
    ema_decay: float = 0.9999
    mode: str = "resampled"  # or epoch
    shuffle_buffer: int = 256
    workers: int | None = None  # loader processes per rank (None: several on CUDA, none on CPU; 0: in the training process)
    flip: bool = True
    seed: int = 0
    device: str = "auto"  # cuda when available
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False  # continue from the run's last checkpoint (without it, a run with checkpoints is refused)
    init_from: str | None = None  # another run: start from its (EMA) weights
    sample_every: int = 0  # 0: no sample grids
    sample_prompts: tuple[str, ...] = ("a photograph of a cat", "a red circle on a blue background",
                                       "a landscape with mountains", "an astronaut")
    sample_steps: int = 20

    def check(self) -> TrainConfig:
        """Every number in its range, named as the recipe key (train.KEY) and the flag (--key) spell it."""
        import math

        from latentmill.curate.errors import InputError

        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "checkpoint_every": 1,
                    "keep_checkpoints": 1, "sample_steps": 1, "shuffle_buffer": 1, "warmup_steps": 0, "sample_every": 0}
        if self.workers is not None:
            at_least["workers"] = 0
        between = {"caption_dropout": (0.0, 1.0), "ema_decay": (0.0, 1.0)}
        positive = ("learning_rate", "max_grad_norm")
        non_negative = ("weight_decay", "noise_offset") + (("min_snr_gamma",) if self.min_snr_gamma is not None else ())
        choices = {"precision": ("auto", "bf16", "fp32"), "mode": ("resampled", "epoch"), "schedule": ("constant", "cosine"),
                   "prediction": ("epsilon", "v_prediction")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                hint = (" (fp16 training would need a gradient scaler: use bf16 on CUDA, fp32 on CPU)"
                        if getattr(self, key) == "fp16" else "")
                raise InputError(f"train.{key} ({_flag(key)}) = {getattr(self, key)!r}: use {', '.join(allowed)}{hint}.")
        for key, low in at_least.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"train.{key} ({_flag(key)}) = {value!r}: use a whole number >= {low}.")
        for key in (*between, *positive, *non_negative):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"train.{key} ({_flag(key)}) = {value!r}: use a finite number.")
            low, high = between.get(key, (0.0, math.inf))
            if not low <= value <= high or (key in positive and value <= 0):
                bound = f"between {low} and {high}" if key in between else "> 0" if key in positive else ">= 0"
                raise InputError(f"train.{key} ({_flag(key)}) = {value!r}: use a number {bound}.")
        return self


def _flag(key: str) -> str:
    """The command-line flag of a train key (they match, but for --lr)."""
    return "--lr" if key == "learning_rate" else f"--{key.replace('_', '-')}"
