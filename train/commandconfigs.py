"""The configurations of the commands that read a finished run: `export`, `sample` and `merge`."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import StageConfig, opt
from latentmill.train.schedule import SAMPLER_NAMES


@dataclass
class ExportConfig(StageConfig):
    """`latentmill export`: a run's last checkpoint as a diffusers pipeline folder, or a LoRA run's adapter."""

    SECTION = "export"
    format: str = opt(
        "auto",
        "pipeline: a StableDiffusionPipeline folder; diffusers: the LoRA file load_lora_weights reads; "
        "kohya: the lora_unet_... file of sd-scripts, ComfyUI and A1111; single-file: the whole model in one "
        ".safetensors in the original SD layout (A1111, ComfyUI, from_single_file); embedding: a textual-inversion "
        "token as learned_embeds.safetensors (diffusers) and NAME.safetensors (A1111) (auto: diffusers for "
        "LoRA runs, embedding for textual inversion alone, else pipeline).",
        choices=("auto", "pipeline", "diffusers", "kohya", "single-file", "embedding"),
    )
    ema: bool = opt(True, "Export the EMA weights (--no-ema: the raw ones).")
    vae: str | None = opt(
        None, "VAE for the pipeline (default: the one the latents were made with).", model=True
    )
    overwrite: bool = opt(
        False, "Replace an existing output file (a folder's files are replaced as written)."
    )


@dataclass
class SampleConfig(StageConfig):
    """`latentmill sample`: images from a run's last checkpoint or a diffusers pipeline folder."""

    SECTION = "sample"
    prompts: list[str] = opt(factory=list, help="A prompt (repeatable): one image each.", flag="--prompt")
    sampler: str | None = opt(
        None,
        "The sampler, diffusers' scheduler: ddim, euler, euler-a (Euler ancestral), dpm++2m-karras (DPM++ 2M with "
        "Karras sigmas), unipc; the flow-matching families (sd3, flux) their own euler (default: the family's: "
        "ddim, or euler).",
        choices=SAMPLER_NAMES,
        since="0.4",
    )
    sampler_steps: int = opt(20, "Denoising steps.", low=1, old=("--steps",))
    guidance: float = opt(5.0, "Classifier-free guidance scale.")
    seed: int = opt(0, "Seed of the starting noise: image j of a prompt is drawn from seed + j.")
    seeds: list[int] | None = opt(
        None,
        "One seed per --prompt, comma-separated (3,7): prompt i's images are drawn from seeds[i], seeds[i] + 1, ... "
        "(default: every prompt from --seed).",
        separated=True,
        since="0.4",
    )
    width: int | None = opt(None, "Image width in px (default: the training resolution).", low=1)
    height: int | None = opt(None, "Image height in px (default: the training resolution).", low=1)
    count: int = opt(1, "Images per prompt.", low=1)
    negative_prompt: str = opt("", "What guidance steers away from (default: the empty caption).")
    text_encoder: str | None = opt(
        None,
        "For a run trained on caption states stored in its shards: the text encoder that made them (default: "
        "the one its latents' manifest names).",
        model=True,
    )

    add: bool = opt(
        False,
        "--to-folder: add these images to the folder's sets (default: the folder holds this set alone; the files "
        "of any other set are removed first).",
        since="0.4",
    )

    def check_more(self) -> None:
        if not self.prompts:
            raise InputError("sample: give at least one --prompt.")
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise InputError(
                f"sample --seeds: {len(self.seeds)} seed(s) for {len(self.prompts)} --prompt(s); give one per prompt."
            )
        if (self.width is None) != (self.height is None):
            raise InputError("sample: give both --width and --height, or neither (the training resolution).")

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width else None


@dataclass
class MergeConfig(StageConfig):
    """`latentmill merge`: a weighted sum or add-difference of two runs, or a LoRA adapter baked in."""

    SECTION = "merge"
    alpha: float | None = opt(
        None,
        "Weight of B (weighted sum), of B - BASE (add difference), or of the adapter (--lora; default 1).",
    )
    base: str | None = opt(None, "Add difference: A + alpha * (B - BASE).", path=True)
    lora: str | None = opt(
        None,
        "A LoRA run: bake its adapter into A (default: the base it was trained on) at scale alpha.",
        path=True,
    )
    ema: bool = opt(True, "Merge the EMA weights (--no-ema: the raw ones).")
    force: bool = opt(
        False,
        "--lora: bake the adapter into a base it was not trained on (its weights' fingerprint differs).",
    )
    config_from: str | None = opt(
        None,
        "The run whose configuration the merged run takes (default: the first of A, B, BASE that is a run).",
        path=True,
    )
