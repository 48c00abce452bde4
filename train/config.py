"""The training configuration: one dataclass, the source of `latentmill train`'s options and the recipe's
`train:` keys, saved beside every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.curate.raycluster import scale_wait_field
from latentmill.errors import InputError
from latentmill.schema import StageConfig, opt

# train/families FAMILIES (named here: the config loads without torch)
FAMILY_NAMES = ("sd-unet", "sdxl", "sd3", "flux")

SAMPLE_PROMPTS = [
    "a photograph of a cat",
    "a red circle on a blue background",
    "a landscape with mountains",
    "an astronaut",
]


@dataclass
class TrainConfig(StageConfig):
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
    warmup_steps: int = opt(100, "Linear warm-up steps.", low=0)
    schedule: str = opt("constant", "Learning rate after warm-up.", choices=("constant", "cosine"))
    max_grad_norm: float = opt(1.0, "Gradient norm clip.", low=0.0, low_open=True)
    prediction: str = opt("epsilon", "What the U-Net predicts.", choices=("epsilon", "v_prediction"))
    min_snr_gamma: float | None = opt(5.0, "Min-SNR loss weighting (0: off).", low=0.0)
    noise_offset: float = opt(0.0, "Noise offset (darker darks, brighter brights).", low=0.0)
    flow_shift: float | None = opt(
        None,
        "Flow-matching families: the shift of the training sigmas (default: the family's, SD3 3.0, Flux 1.0 as "
        "diffusers' scripts train).",
        low=0.0,
        low_open=True,
        since="0.4",
    )
    timestep_density: str = opt(
        "logit_normal",
        "Flow-matching families: how noise levels are drawn (SD3 paper): logit_normal, mode or uniform.",
        choices=("logit_normal", "mode", "uniform"),
        since="0.4",
    )
    logit_mean: float = opt(0.0, "--timestep-density logit_normal: its mean.", since="0.4")
    logit_std: float = opt(
        1.0, "--timestep-density logit_normal: its std.", low=0.0, low_open=True, since="0.4"
    )
    mode_scale: float = opt(1.29, "--timestep-density mode: its scale.", since="0.4")
    loss_weighting: str = opt(
        "none",
        "Flow-matching families: SD3's loss weighting by noise level: none, sigma_sqrt or cosmap.",
        choices=("none", "sigma_sqrt", "cosmap"),
        since="0.4",
    )
    dynamic_shift: bool = opt(
        False,
        "Flow-matching families: move each sample's sigma by its image's token count (Flux's resolution-dependent "
        "shift) instead of --flow-shift.",
        since="0.4",
    )
    guidance_scale: float = opt(
        3.5,
        "Guidance-distilled families (Flux.1 dev): the guidance value the transformer is told while training.",
        low=0.0,
        since="0.4",
    )
    max_sequence_length: int | None = opt(
        None,
        "Transformer families: T5 tokens per caption (default: SD3 77, as diffusers' training script; Flux 512; "
        "at most the tokenizer's length).",
        low=1,
        since="0.4",
    )
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
    workers: int | None = opt(
        None,
        "Loader processes per rank reading shards (default: up to 4 on CUDA, with pinned memory; 0 on CPU).",
        low=0,
    )
    cache_dir: str | None = opt(
        None,
        "Shards in an object store (s3://…): the local folder their copies stream through "
        "(default: a temporary folder of the run).",
        path=True,
    )
    cache_limit: str = opt(
        "50GB",
        "Shards in an object store: the most the cache folder holds; the least recently read shards are "
        "evicted first.",
    )
    masked_loss: bool = opt(
        False, "Weight each sample's loss by its mask (encode --alpha-mask), over its mean.", since="0.2"
    )
    strict: bool = opt(
        False,
        "Stop at the first damaged latent shard or sample (bytes changed since encode, a broken tar) instead "
        "of skipping it with a warning and counting it in log.jsonl.",
    )
    launcher: str = opt(
        "local",
        "local: this process (many GPUs: start it with torchrun); ray: Ray Train workers across a cluster.",
        choices=("local", "ray"),
    )
    ray_address: str | None = opt(None, "--launcher ray: the cluster ('auto', HOST:6379); default: Ray here.")
    ray_timeout: float = opt(
        30.0,
        "Ray: seconds to wait for the cluster to answer before giving up with exit 2.",
        low=1.0,
        since="0.3",
    )
    ray_scale_wait: float = scale_wait_field()
    num_workers: int = opt(1, "--launcher ray: training workers (one per GPU), across the nodes.", low=1)
    gpus_per_worker: float = opt(
        0.0, "--launcher ray: GPUs each worker takes (0: CPU workers, gloo).", low=0.0
    )
    max_failures: int = opt(
        2, "--launcher ray: times a lost worker or node restarts the workers from the last checkpoint.", low=0
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
    lora_rank: int = opt(
        0, "LoRA: train rank-R adapters on the frozen --model instead of the whole U-Net (0: off).", low=0
    )
    lora_alpha: float | None = opt(
        None, "LoRA: the adapters' updates are scaled by alpha / rank (default: alpha = rank).", low=0.0
    )
    lora_targets: str = opt(
        "attention",
        "LoRA: the layers that get adapters: attention (q, k, v, out), attention+ff, or all-linear.",
        choices=("attention", "attention+ff", "all-linear"),
    )
    lora_text_encoder: bool = opt(
        False,
        "LoRA: adapters on the text encoder's attention layers too (needs --text-encoder PIPELINE_FOLDER).",
        since="0.2",
    )
    text_encoder_targets: str = opt(
        "attention",
        "--lora-text-encoder: the text encoder's layers that get adapters: attention (q, k, v, out) or "
        "attention+mlp.",
        choices=("attention", "attention+mlp"),
        since="0.2",
    )
    text_encoder_lr: float | None = opt(
        None,
        "Learning rate of the text encoder's adapters and of a --textual-inversion token (default: "
        "--learning-rate).",
        low=0.0,
        low_open=True,
        since="0.2",
    )
    inpainting: bool = opt(
        False,
        "Train an inpainting U-Net on latents encoded with --mask-variants: its input is the noisy latents, "
        "the mask and the masked image's latents; a 4-channel --model gets the extra conv_in channels "
        "zero-initialised, a 9-channel inpainting model trains as it is.",
        since="0.2",
    )
    textual_inversion: str | None = opt(
        None,
        "Textual inversion: add this token (e.g. '<my-cat>') to the tokenizer and train only its embedding "
        "(with --lora-rank: pivotal tuning, the adapters too). Needs --text-encoder PIPELINE_FOLDER.",
        since="0.2",
    )
    init_word: str | None = opt(
        None, "--textual-inversion: the word whose embedding the new token's vectors start from.", since="0.2"
    )
    vectors: int = opt(1, "--textual-inversion: embedding vectors of the new token.", low=1, since="0.2")
    placeholder: str | None = opt(
        None,
        "--textual-inversion: the word of each caption the token takes the place of (default: the "
        "--ti-templates captions).",
        since="0.2",
    )
    ti_templates: str | None = opt(
        None,
        "--textual-inversion: captions made from the original paper's templates ('a photo of a {}') instead "
        "of the samples' captions: object or style (the default without --placeholder: object).",
        choices=("object", "style"),
        since="0.2",
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
    instance: str | None = opt(
        None, "DreamBooth: the subject's latent folder (instead of SHARDS), with --class-data.", path=True
    )
    class_data: str | None = opt(
        None,
        "DreamBooth prior preservation: latents of the subject's class; each step adds their weighted loss.",
        path=True,
    )
    prior_loss_weight: float = opt(1.0, "DreamBooth: weight of the class images' loss.", low=0.0)
    sample_every: int = opt(0, "Write a sample grid of the sample prompts every N steps (0: never).", low=0)
    sample_prompts: list[str] = opt(
        factory=lambda: list(SAMPLE_PROMPTS),
        flag="--sample-prompt",
        help="A prompt of the sample grids (repeatable).",
    )
    sample_steps: int = opt(20, "DDIM steps of the sample grids.", low=1)
    eval_every: int = opt(
        0,
        "Every N steps, the validation loss: the denoising loss on held-out latents at 8 fixed timesteps with "
        "fixed noise (raw and EMA weights), logged as val_loss (0: never).",
        low=0,
        since="0.2",
    )
    eval_shards: str | None = opt(
        None,
        "Latents the validation loss is measured on (default: the validation/ folder `encode "
        "--validation-share` made beside the first training folder).",
        since="0.2",
    )
    eval_samples: int = opt(
        128,
        "The most held-out samples the validation loss uses (128: about 3% of training time at --eval-every 1000, BENCHMARKS.md).",
        low=1,
        since="0.2",
    )
    eval_prompts: str | None = opt(
        None,
        "With --eval-every: also generate one image per prompt of this file (EMA weights, fixed seed) on rank 0 "
        "and log their CLIP score (and FID/KID against --eval-reference).",
        path=True,
        since="0.2",
    )
    eval_reference: str | None = opt(
        None,
        "--eval-prompts: the reference images (or .npz statistics) of FID and KID.",
        path=True,
        since="0.2",
    )
    eval_features: str = opt(
        "clip:ViT-L-14-quickgelu:openai",
        "--eval-prompts: the CLIP model of the score and the feature space of FID/KID (clip:MODEL[:PRETRAINED]; "
        "see `latentmill eval`).",
        since="0.2",
    )

    def __post_init__(self):
        if isinstance(self.shards, str):  # one folder, as recipes and older checkpoints give it
            self.shards = [self.shards]

    def sources(self) -> list[str]:
        """The latent sets this run trains on: SHARDS, or the DreamBooth --instance folder."""
        return [self.instance] if self.instance else list(self.shards)

    def check_more(self) -> None:
        from latentmill.train.configrules import check_rules

        check_rules(self)

    @property
    def trains_text(self) -> bool:
        """Whether part of the text encoder trains (a textual-inversion token, text-encoder LoRA)."""
        return bool(self.textual_inversion or self.lora_text_encoder)

    def validate(self) -> TrainConfig:
        if self.precision == "fp16":
            raise InputError(
                f"{self.name('precision')} = 'fp16': fp16 training needs a gradient scaler, which this "
                f"loop does not have; use bf16 on CUDA (as fast, no scaler needed) or fp32 on CPU."
            )
        return super().validate()
