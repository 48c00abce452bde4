"""The training configuration: one dataclass, the source of `latentmill train`'s options and the recipe's
`train:` keys, saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.configs import StageConfig, opt
from latentmill.curate.errors import InputError

SAMPLE_PROMPTS = [
    "a photograph of a cat",
    "a red circle on a blue background",
    "a landscape with mountains",
    "an astronaut",
]


@dataclass
class TrainConfig(StageConfig):
    SECTION = "train"
    shards: str = opt(help="Folder, brace pattern or list of latent shards.", cli=False)
    output: str = opt(help="Run folder (checkpoints, log.jsonl).", cli=False)
    model: str = opt("tiny", "tiny, sd15, sd2-base, or a pretrained diffusers folder or id.")
    text_encoder: str | None = opt(
        None, "openclip:NAME[:PRETRAINED] or a pipeline folder; default: text_emb in the shards."
    )
    vae: str | None = opt(
        None,
        "VAE for sample grids and export; checked against the one the latents were made with "
        "(default: the manifest's).",
    )
    steps: int = opt(1000, "Optimizer steps.", low=1)
    batch_size: int = opt(16, "Per rank and micro-step.", low=1)
    grad_accum: int = opt(1, "Micro-steps per optimizer step.", low=1)
    learning_rate: float = opt(1e-4, "AdamW learning rate.", low=0.0, low_open=True, old=("--lr",))
    weight_decay: float = opt(1e-2, "AdamW weight decay.", low=0.0)
    warmup_steps: int = opt(100, "Linear warm-up steps.", low=0)
    schedule: str = opt("constant", "Learning rate after warm-up.", choices=("constant", "cosine"))
    max_grad_norm: float = opt(1.0, "Gradient norm clip.", low=0.0, low_open=True)
    prediction: str = opt("epsilon", "What the U-Net predicts.", choices=("epsilon", "v_prediction"))
    min_snr_gamma: float | None = opt(5.0, "Min-SNR loss weighting (0: off).", low=0.0)
    noise_offset: float = opt(0.0, "Noise offset (darker darks, brighter brights).", low=0.0)
    caption_dropout: float = opt(
        0.1, "Share of captions replaced by the empty one (for classifier-free guidance).", low=0.0, high=1.0
    )
    size_conditioning: bool = opt(False, "SDXL-style conditioning on each image's original size and crop.")
    ema_decay: float = opt(
        0.9999, "EMA decay of the weights that are sampled and exported.", low=0.0, high=1.0
    )
    mode: str = opt(
        "resampled",
        "resampled: endless shuffled shards; epoch: each sample once per epoch.",
        choices=("resampled", "epoch"),
    )
    shuffle_buffer: int = opt(256, "Samples in the shuffle buffer.", low=1)
    workers: int | None = opt(
        None,
        "Loader processes per rank reading shards (default: up to 4 on CUDA, with pinned memory; 0 on CPU).",
        low=0,
    )
    flip: bool = opt(True, "Use the stored flipped latents (encode --flip) half of the time.")
    seed: int = opt(0, "Seed of the weights, the noise and the data order.")
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    precision: str = opt(
        "auto",
        "auto: bf16 on CUDA, fp32 on CPU. (No fp16: it would need a gradient scaler.)",
        choices=("auto", "bf16", "fp32"),
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass (less memory, slower)."
    )
    compile: bool = opt(False, "torch.compile the U-Net.")
    log_every: int = opt(10, "Read the loss back from the device and log it every N steps.", low=1)
    checkpoint_every: int = opt(500, "Steps between checkpoints.", low=1)
    keep_checkpoints: int = opt(3, "Checkpoints kept (older ones are deleted).", low=1)
    resume: bool = opt(
        False,
        "Continue the run in -o from its last checkpoint, exactly (without it, a run with "
        "checkpoints is refused).",
    )
    init_from: str | None = opt(
        None, "Start from another run's EMA weights (e.g. 256 px, then 512).", path=True
    )
    sample_every: int = opt(0, "Write a sample grid of the sample prompts every N steps (0: never).", low=0)
    sample_prompts: list[str] = opt(
        factory=lambda: list(SAMPLE_PROMPTS),
        flag="--sample-prompt",
        help="A prompt of the sample grids (repeatable).",
    )
    sample_steps: int = opt(20, "DDIM steps of the sample grids.", low=1)

    def validate(self) -> TrainConfig:
        if self.precision == "fp16":
            raise InputError(
                f"{self.name('precision')} = 'fp16': fp16 training needs a gradient scaler, which this "
                f"loop does not have; use bf16 on CUDA (as fast, no scaler needed) or fp32 on CPU."
            )
        return super().validate()


@dataclass
class ExportConfig(StageConfig):
    """`latentmill export`: a run's last checkpoint as a diffusers pipeline folder."""

    SECTION = "export"
    ema: bool = opt(True, "Export the EMA weights (--no-ema: the raw ones).")
    vae: str | None = opt(None, "VAE for the pipeline (default: the one the latents were made with).")
