"""What the flow-matching transformer families (SD3.5, Flux.1) share: a diffusers transformer built from a
named tiny config or loaded from a pipeline folder or model id in the local cache (never downloaded), its
text encoders run on the device through the pipeline's own `encode_prompt` (named states: train/namedstates.py),
the flow-matching objective (train/flowmatching.py), an Euler sampler with the pipeline's scheduler, and the
export as the family's diffusers pipeline. A family module gives what differs: its configs, its forward call
(`predict`), how its pipeline encodes a prompt, and its scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentmill.errors import InputError
from latentmill.train.families.pipelinetext import PipelineText
from latentmill.train.latentspace import starting_noise, to_images
from latentmill.train.namedstates import Conditioning


class FlowFamily(PipelineText):
    name = ""
    patch_size = 2
    transformer_class = ""  # diffusers class name
    tiny_configs: dict[str, dict] = {}  # --model names -> transformer config (latent channels filled in)
    default_shift = 3.0  # the training sigmas' shift (--flow-shift)
    default_scheduler: dict = {}  # FlowMatchEulerDiscreteScheduler's config the family's pipeline samples with
    lora_prefix = "transformer"  # diffusers' LoRA file keys: transformer.<module>.lora_A.weight

    # -- the denoiser ---------------------------------------------------------------------------------------
    def fresh(self, spec: str, channels: int, text_shape: dict) -> dict:
        """The transformer config of tiny `spec` for `channels`-channel latents and these text widths."""
        raise NotImplementedError

    def build(self, config, manifest: dict, text_shape: dict):
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        channels = manifest["latent_channels"]
        if config.model in self.tiny_configs:
            torch.manual_seed(config.seed)
            model = cls(**self.fresh(config.model, channels, text_shape))
        else:
            model = self.pretrained(config.model)
            self.check_fits(model, config.model, channels, text_shape)
        return model

    def pretrained(self, spec: str, what: str = "--model"):
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        path = Path(spec)
        try:
            return cls.from_pretrained(
                spec,
                subfolder="transformer" if (path / "transformer").exists() or not path.exists() else None,
                local_files_only=True,
            )
        except (OSError, ValueError) as err:
            fetch = (
                f" Fetch it first: `hf download {spec}`."
                if not path.exists() and spec.count("/") == 1
                else ""
            )
            raise InputError(
                f"{what} {spec}: no {self.transformer_class} found locally ({str(err).splitlines()[0][:160]}); "
                f"give a {self.name} pipeline folder (with transformer/) or one of {', '.join(self.tiny_configs)}."
                f"{fetch}"
            ) from None

    def check_fits(self, model, spec: str, channels: int, text_shape: dict) -> None:
        """A pretrained transformer against the latents' channels and the text encoders' widths."""
        if self.latent_channels(model) != channels:
            raise InputError(
                f"--model {spec} ({self.name}) denoises {self.latent_channels(model)}-channel latents; the shards "
                f"hold {channels}-channel latents. Encode with the family's VAE (e.g. --vae {spec})."
            )
        wanted = self.text_widths(model)
        if wanted != text_shape:
            raise InputError(
                f"--model {spec} ({self.name}) reads text states {wanted}; the text encoders give {text_shape}. "
                f"Give the text encoders of its own pipeline (--text-encoder {spec})."
            )

    def latent_channels(self, model) -> int:
        return model.config.in_channels

    def text_widths(self, model) -> dict:
        return {
            "prompt_embeds": model.config.joint_attention_dim,
            "pooled": model.config.pooled_projection_dim,
        }

    def from_config(self, saved: dict):
        import diffusers

        return getattr(diffusers, self.transformer_class).from_config(saved)

    def check_latents(self, manifest: dict, buckets) -> None:
        """16-channel latents (the family's VAE's), every bucket a multiple of the VAE's factor x the patch
        size (the transformer's tokens)."""
        if manifest["latent_channels"] != 16:
            vae = (manifest.get("encode_config") or {}).get("vae")
            raise InputError(
                f"the shards hold {manifest['latent_channels']}-channel latents (VAE {vae}); {self.name} "
                f"denoises the 16-channel latents of its VAE. Encode them with its VAE (`latentmill encode "
                f"--vae MODEL_FOLDER`, or --vae tiny16 for a tiny model)."
            )
        step = manifest["downsample_factor"] * self.patch_size
        for width, height in buckets:
            if width % step or height % step:
                raise InputError(
                    f"the shards hold a {width}x{height} bucket; {self.name} takes images whose sides are "
                    f"multiples of {step} (VAE factor {manifest['downsample_factor']} x patch {self.patch_size}). "
                    f"Encode with `latentmill encode --step {step}` (or a multiple of it)."
                )

    # -- the objective ---------------------------------------------------------------------------------------
    def objective(self, config, device: str):
        from latentmill.train.flowmatching import FlowMatching

        return FlowMatching(
            predict=lambda model, noisy, timesteps, text, metas, inpaint: self.predict(
                model, noisy, timesteps, text, config.guidance_scale
            ),
            shift=config.flow_shift if config.flow_shift is not None else self.default_shift,
            density=config.timestep_density,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            weighting=config.loss_weighting,
            dynamic_shift=config.dynamic_shift,
            patch_size=self.patch_size,
            device=device,
        )

    def predict(self, model, noisy, timesteps, text: Conditioning, guidance: float) -> torch.Tensor:
        """The transformer's velocity prediction (B, C, h, w) at `timesteps` in [0, 1000]; `guidance`: the
        value a guidance-distilled model (Flux.1 dev) is told (others ignore it)."""
        raise NotImplementedError

    # -- sampling --------------------------------------------------------------------------------------------
    def sampling_scheduler(self, config: dict):
        """The scheduler of the base model's pipeline folder where the run started from one, else the
        family's own (`default_scheduler`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        base = Path(str(config.get("model") or ""))
        if (base / "scheduler" / "scheduler_config.json").exists():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        return FlowMatchEulerDiscreteScheduler(**self.default_scheduler)

    def set_timesteps(self, scheduler, steps: int, latents: torch.Tensor):
        scheduler.set_timesteps(steps)

    def guided(self, model, latents, t, text: Conditioning, empty: Conditioning, guidance: float):
        """One step's prediction with classifier-free guidance (the conditional and unconditional batch in one
        forward pass)."""
        n = latents.shape[0]
        both = Conditioning.cat([empty.expand(n), text])
        prediction = self.predict(model, torch.cat([latents, latents]), t.expand(2 * n), both, guidance)
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    @torch.no_grad()
    def generate(
        self,
        model,
        text_states: Conditioning,
        empty_state: Conditioning,
        vae,
        scaling_factor: float,
        shift_factor: float,
        size: tuple[int, int],
        steps: int = 20,
        guidance: float = 5.0,
        seed: int = 0,
        prediction: str = "epsilon",  # (the DDPM families' option; flow matching predicts the velocity)
        inpaint=None,
        seeds: list[int] | None = None,
        config: dict | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """(N, H, W, 3) uint8 images: Euler steps of the family's scheduler from seeded noise (`sampler`:
        euler, the one flow matching's families have)."""
        check_flow_sampler(sampler, self.name)
        device = next(model.parameters()).device
        n = text_states.batch
        factor = 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (self.out_channels(model), size[1] // factor, size[0] // factor)
        latents = starting_noise(shape, n, seed, seeds)
        latents = latents.to(device)
        text, empty = text_states.to(device), empty_state.to(device)
        scheduler = self.sampling_scheduler(config or {})
        self.set_timesteps(scheduler, steps, latents)
        for t in scheduler.timesteps:
            velocity = self.guided(model, latents, t.to(device), text, empty, guidance)
            latents = scheduler.step(velocity, t, latents).prev_sample
        return to_images(latents, vae, scaling_factor, shift_factor)

    def out_channels(self, model) -> int:
        return model.config.out_channels

    # -- export ----------------------------------------------------------------------------------------------
    def kohya_lora(self, lora: dict, alpha: float, loaded) -> dict:
        from latentmill.errors import InputError

        raise InputError(
            f"export --format kohya: sd-scripts has no {self.name} LoRA layout that diffusers reads back; export "
            f"with --format diffusers (pytorch_lora_weights.safetensors, which diffusers and ComfyUI load)."
        )

    def pipeline(self, loaded, vae: str | None = None):
        """The run as the family's diffusers pipeline: its transformer, the latents' VAE (or `vae`), the text
        encoders it trained with, the scheduler it samples with."""
        import diffusers

        from latentmill.curate.vae import load_vae
        from latentmill.train.pipelinetext import load_parts

        config, manifest = loaded.config, loaded.manifest()
        vae_model = load_vae(vae or manifest["encode_config"]["vae"]).model
        # the pipeline decodes with its VAE's factors: the ones these latents were scaled by
        vae_model.register_to_config(
            scaling_factor=manifest["scaling_factor"], shift_factor=manifest.get("shift_factor")
        )
        parts = load_parts(self.text_spec_of(config), self.text_parts, self.optional_text)
        cls = getattr(diffusers, self.pipeline_class)
        return cls(
            transformer=loaded.unet(), vae=vae_model, scheduler=self.sampling_scheduler(config), **parts
        )


def check_flow_sampler(sampler: str | None, family: str) -> None:
    from latentmill.train.schedule import FLOW_SAMPLERS, SAMPLERS

    if sampler not in (None, *FLOW_SAMPLERS):
        raise InputError(
            f"--sampler {sampler}: the {family} family samples with its own Euler (--sampler euler); "
            f"{', '.join(SAMPLERS)} are the U-Net families' (sd-unet, sdxl)."
        )
