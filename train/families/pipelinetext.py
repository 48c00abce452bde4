"""Conditioning through a diffusers pipeline's own text encoders (SDXL's two CLIPs; SD3's CLIP-L, CLIP-G and
T5; Flux's CLIP-L and T5): loaded by train/pipelinetext.py from --text-encoder, --model's pipeline folder or,
for a tiny config, the tiny ones; run frozen on the device through the pipeline's `encode_prompt`, so a run
trains on the states its exported pipeline computes. The family says which parts (`text_parts`), how its
pipeline encodes (`encode_prompts`) and how many T5 tokens (`max_sequence_length`)."""

from __future__ import annotations

import torch

from latentmill.errors import InputError
from latentmill.train.namedstates import Conditioning


class PipelineText:
    name = ""
    pipeline_class = ""
    text_parts: dict[str, str] = {}  # the pipeline's text components -> transformers class names
    optional_text: tuple = ()
    tiny_text = ""  # the tiny text encoders' spec (train/pipelinetext.py)
    tiny_configs: dict[str, dict] = {}
    denoiser_component = "transformer"  # the pipeline's name for the denoiser (SDXL's: unet)

    def reads_stored_text(self, config) -> bool:
        return False  # its own text encoders, or --text-states: never a shard's text_emb

    def text_spec(self, config) -> str:
        """The text encoders: --text-encoder, else --model's pipeline folder, else (a tiny model) the tiny ones."""
        if config.text_encoder:
            return config.text_encoder
        return self.tiny_text if config.model in self.tiny_configs else config.model

    def text_spec_of(self, config: dict) -> str:
        """The same for a run's saved config."""
        if config.get("text_encoder"):
            return config["text_encoder"]
        return self.tiny_text if config.get("model") in self.tiny_configs else config.get("model")

    def text_pipeline(self, spec: str, device: str, dtype=torch.float32):
        """The family's pipeline with only its text encoders and tokenizers, for its `encode_prompt`."""
        import diffusers

        from latentmill.train.pipelinetext import load_parts

        parts = load_parts(spec, self.text_parts, self.optional_text)
        for component, module in parts.items():
            if isinstance(module, torch.nn.Module):
                parts[component] = module.to(device, dtype).eval().requires_grad_(False)
        cls = getattr(diffusers, self.pipeline_class)
        pipe = cls(**{self.denoiser_component: None, "vae": None, "scheduler": None}, **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, pipe, prompts: list[str], device: str, max_tokens: int) -> Conditioning:
        raise NotImplementedError

    def max_sequence_length(self, pipe, config) -> int:
        return 77  # CLIP's (SDXL has no T5)

    def conditioning(self, config, manifest: dict, folder, device: str, precision: str, text=None):
        """(encode(batch, generator) -> Conditioning with caption dropout to the empty caption, the text
        widths, prompts(texts) -> (states, empty states)): the text encoders run on the device, frozen."""
        from latentmill.train.conditioning import caption_variants

        if text is not None:
            raise InputError(
                f"--family {self.name}: training its text encoders (--lora-text-encoder, --textual-inversion) is "
                f"not supported yet; train the denoiser (or LoRA on it) with the text encoders frozen."
            )
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        loaded = {}

        def states(captions):
            if not loaded:  # with --text-states, only for sample grids and validation prompts
                loaded["pipe"] = pipe = self.text_pipeline(self.text_spec(config), device, dtype)
                loaded["max_tokens"] = self.max_sequence_length(pipe, config)
            with torch.inference_mode():
                return self.encode_prompts(
                    loaded["pipe"], list(captions), device, loaded["max_tokens"]
                ).float()

        if getattr(
            config, "text_states", None
        ):  # train/textstates.py: each caption's states stored, joined to its latents
            from latentmill.train.textstates import TextStateShards

            empty = Conditioning(TextStateShards(config.text_states).empty()).to(device).float()

            def encode(batch, generator):
                stored = Conditioning(batch["text_states"]).to(device, non_blocking=True).float()
                drop = torch.rand(stored.batch, generator=generator) < config.caption_dropout
                return stored.where(drop, empty)
        else:
            empty = states([""])

            def encode(batch, generator):
                captions = caption_variants(batch["captions"], config, generator)
                drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
                return states(captions).where(drop, empty)

        def prompts(texts):
            return states(texts).cpu(), empty.cpu()

        widths = {
            name: tensor.shape[-1] for name, tensor in empty.items() if name in ("prompt_embeds", "pooled")
        }
        return encode, widths, prompts

    def prompt_encoder(self, source, config: dict, manifest: dict, given: str | None):
        """texts -> Conditioning on the host, with the text encoders the run trained with (or `given`)."""
        from types import SimpleNamespace

        pipe = self.text_pipeline(given or self.text_spec_of(config), "cpu")
        max_tokens = self.max_sequence_length(pipe, SimpleNamespace(**config))

        def encode(texts):
            with torch.inference_mode():
                return self.encode_prompts(pipe, list(texts), "cpu", max_tokens).float()

        return encode
