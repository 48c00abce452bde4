"""The training configuration: one dataclass, the source of `latentmill train`'s options and the recipe's
`train:` keys, saved beside every checkpoint. The options of one feature are a section of their own
(train/settings: launch, flow matching, LoRA, textual inversion, DreamBooth, inpainting, evaluation), each
with its checks; `TrainConfig` inherits them, so every key stays flat, as flags and recipes spell it."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import StageConfig, opt
from latentmill.train.settings import SECTIONS
from latentmill.train.settings.evaluation import SAMPLE_PROMPTS

# train/families FAMILIES (named here: the config loads without torch)
FAMILY_NAMES = ("sd-unet", "sdxl", "sd3", "flux")

__all__ = ["FAMILY_NAMES", "SAMPLE_PROMPTS", "TrainConfig"]


@dataclass(kw_only=True)  # `output` has no default and follows the sections' fields
class TrainConfig(*SECTIONS, StageConfig):
    SECTION = "train"
    RUNTIME = (
        "output",
        "shards",
        "resume",
        "init_from",
        "workers",
        "cache_dir",
        "cache_limit",
        "strict",
        "launcher",
        "ray_address",
        "ray_timeout",
        "ray_scale_wait",
        "num_workers",
        "gpus_per_worker",
        "max_failures",
        "device",
        "compile",
        "gradient_checkpointing",
        "steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "sample_prompts",
        "sample_steps",
        "sample_sampler",
        "sample_negative_prompt",
        "epochs",
        "report_to",
        "eval_every",
        "eval_shards",
        "eval_samples",
        "eval_prompts",
        "eval_reference",
        "eval_features",
    )
    output: str = opt(help="Run folder (checkpoints, log.jsonl).", cli=False)
    shards: list[str] = opt(
        factory=list,
        help="Latent folders (or brace patterns, shard files, URLs); several folders are mixed (see mix).",
        cli=False,
    )
    model: str | None = opt(
        None,
        "tiny, sd15, sd2-base (a new U-Net of that architecture, random weights), or a pretrained diffusers "
        "pipeline or U-Net folder or model id.",
        model=True,
    )
    family: str | None = opt(
        None,
        "The model family (train/families): sd-unet, the Stable Diffusion U-Nets (1.x, 2.x, tiny; SDXL-shaped with "
        "--size-conditioning, one text encoder); sdxl, SDXL's U-Net with both its CLIPs and micro-conditioning "
        "(tiny-sdxl); sd3, SD3/3.5's MMDiT (tiny-sd3); flux, Flux.1 dev and schnell (tiny-flux, "
        "tiny-flux-schnell). Default: --model's (a tiny config's, or a pipeline folder's model_index.json).",
        choices=FAMILY_NAMES,
        since="0.4",
    )
    text_encoder: str | None = opt(
        None,
        "openclip:NAME[:PRETRAINED] or a pipeline folder; default: text_emb in the shards (sd-unet), --model's "
        "pipeline folder or the tiny config's tiny encoders (sdxl, sd3, flux).",
        model=True,
    )
    text_states: str | None = opt(
        None,
        "Text states stored by `latentmill encode-text` for the latent folder (sdxl, sd3, flux): the run reads each "
        "caption's states from there instead of running the text encoders at every step.",
        path=True,
        since="0.4",
    )
    vae: str | None = opt(
        None,
        "VAE for sample grids and export; checked against the one the latents were made with "
        "(default: the manifest's).",
        model=True,
    )
    steps: int = opt(1000, "Optimizer steps.", low=1)
    report_to: str = opt(
        "tensorboard",
        "Where metrics and sample grids go besides log.jsonl: tensorboard (RUN/tensorboard), wandb (project "
        "latentmill; WANDB_MODE=offline keeps it local; WANDB_* variables apply) or none.",
        choices=("tensorboard", "wandb", "none"),
    )
    epochs: int | None = opt(
        None,
        "Train for this many passes over the data instead of --steps: steps = epochs x samples / "
        "(batch size x grad accum x ranks), rounded up.",
        low=1,
    )
    batch_size: int = opt(16, "Per rank and micro-step.", low=1)
    grad_accum: int = opt(1, "Micro-steps per optimizer step.", low=1)
    learning_rate: float = opt(1e-4, "AdamW learning rate.", low=0.0, low_open=True, old=("--lr",))
    weight_decay: float = opt(1e-2, "AdamW weight decay.", low=0.0)
    warmup_steps: int | None = opt(
        None,
        "Linear warm-up steps (default: 100, or a tenth of the run's steps when the run is shorter than 1,000).",
        low=0,
    )
    schedule: str = opt("constant", "Learning rate after warm-up.", choices=("constant", "cosine"))
    max_grad_norm: float = opt(1.0, "Gradient norm clip.", low=0.0, low_open=True)
    prediction: str = opt("epsilon", "What the U-Net predicts.", choices=("epsilon", "v_prediction"))
    min_snr_gamma: float | None = opt(5.0, "Min-SNR loss weighting (0: off).", low=0.0)
    noise_offset: float = opt(0.0, "Noise offset (darker darks, brighter brights).", low=0.0)
    caption_dropout: float = opt(
        0.1, "Share of captions replaced by the empty one (for classifier-free guidance).", low=0.0, high=1.0
    )
    shuffle_tags: bool = opt(
        False, "Shuffle each caption's comma-separated tags at every step (with --text-encoder)."
    )
    keep_tags: int = opt(
        0, "Tags at the front of a caption kept in place by --shuffle-tags and --tag-dropout.", low=0
    )
    tag_dropout: float = opt(
        0.0, "Chance that each tag (but the kept ones) is left out of a caption at a step.", low=0.0, high=1.0
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
    flip: bool = opt(True, "Use the stored flipped latents (encode --flip) half of the time.")
    seed: int = opt(0, "Seed of the weights, the noise and the data order.")
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
    mix: list[float] | None = opt(
        None,
        "Weights of several latent folders, comma-separated (0.8,0.2): each batch comes from one folder, "
        "drawn with these odds (default: in proportion to their sizes).",
        separated=True,
    )
    repeats: list[int] | None = opt(
        None,
        "Times each latent folder is seen per pass, comma-separated (10,1), as kohya's NAME_N folders: "
        "folders are drawn in proportion to size x repeats (not with --mix).",
        separated=True,
    )

    @classmethod
    def option_fields(cls) -> list:
        """The run's own options first, then each section's, in `SECTIONS`' order (as `train --help` lists them)."""
        owner = {name: i + 1 for i, section in enumerate(SECTIONS) for name in section.__annotations__}
        return sorted(super().option_fields(), key=lambda field: owner.get(field.name, 0))

    def __post_init__(self):
        if isinstance(self.shards, str):  # one folder, as recipes and older checkpoints give it
            self.shards = [self.shards]

    def sources(self) -> list[str]:
        """The latent sets this run trains on: SHARDS, or the DreamBooth --instance folder."""
        return [self.instance] if self.instance else list(self.shards)

    def check_more(self) -> None:
        """The rules between settings: the run's own, then each section's (train/settings)."""
        self._check_run()
        for section in SECTIONS:
            section.check_section(self)

    def _check_run(self) -> None:
        from latentmill.train.models import UNET_CONFIGS

        if not self.model:
            raise InputError(
                f"train: give --model: {', '.join(UNET_CONFIGS)}, tiny-sdxl, tiny-sd3, tiny-flux (a new denoiser of "
                f"that architecture, random weights: `tiny` for a first look on a CPU), or a pretrained diffusers "
                f"pipeline, U-Net or transformer folder or model id (fine-tuning)."
            )
        if not self.sources():
            raise InputError(
                "no latents to train on: give a latent folder (SHARDS), or --instance for DreamBooth."
            )
        if self.repeats and self.mix:
            raise InputError(
                "train: give --repeats or --mix, not both (repeats weigh folders by size x repeats)."
            )
        # one weight per folder is checked where shard files are grouped into folders (train/data.py)
        if self.mix is not None and (any(w < 0 for w in self.mix) or sum(self.mix) <= 0):
            raise InputError(f"{self.name('mix')} {self.mix}: weights are >= 0 and not all 0.")
        if self.text_states and (
            self.shuffle_tags or self.tag_dropout or len(self.sources()) > 1 or self.class_data
        ):
            raise InputError(
                f"{self.name('text_states')}: stored states are of one latent folder's captions as they are; "
                f"--shuffle-tags, --tag-dropout, a mixture and DreamBooth's class images need the text encoders "
                f"on the device (leave out --text-states)."
            )
        if (self.shuffle_tags or self.tag_dropout) and not self.text_encoder:
            raise InputError(
                "train: --shuffle-tags and --tag-dropout change caption text, which needs --text-encoder (captions "
                "encoded as they train); latents encoded with --text-encoder hold fixed caption embeddings."
            )

    @property
    def warmup(self) -> int:
        """The warm-up steps: --warmup-steps, or 100 (a tenth of a run shorter than 1,000 steps)."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    @property
    def trains_text(self) -> bool:
        """Whether part of the text encoder trains (a textual-inversion token, text-encoder LoRA)."""
        return bool(self.textual_inversion or self.lora_text_encoder)

    def validate(self) -> TrainConfig:
        self.check_precision()
        return super().validate()
