"""Frozen text encoders for caption embeddings: open_clip's text tower or a pipeline's CLIPTextModel.

Specs: `openclip:NAME[:PRETRAINED]` (an open_clip model name, with a pretrained tag or a local checkpoint
file; `openclip:latentmill-tiny` is a tiny config shipped here, random weights), or a local diffusers
pipeline folder (`text_encoder/` + `tokenizer/`) or transformers CLIP text model folder (`clip-tiny`: a
tiny random one, made on first use, for tests and the demo). The embedding
is the per-token hidden state after the final layer norm: (context_length, width), what a U-Net's
cross-attention reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.fingerprints import weights_fingerprint
from latentmill.devices import torch_dtype
from latentmill.errors import InputError

CONFIG_DIR = Path(__file__).parent / "model_configs"
# short names for the configs shipped here: a tiny ViT (tests) and a tiny ModifiedResNet at 128 px, whose
# random convolutional features keep enough texture statistics for a fitted head to find something (the demo)
ALIASES = {"tiny": "latentmill-tiny", "tiny-rn": "latentmill-tiny-rn"}


def model_name(name: str) -> str:
    """An open_clip model name, with latentmill's short aliases resolved (`tiny` -> `latentmill-tiny`)."""
    return ALIASES.get(name, name)


def register_model_configs() -> None:
    """Make open_clip aware of the configs shipped with latentmill (latentmill-tiny, latentmill-tiny-rn)."""
    import open_clip

    if not set(ALIASES.values()) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


@dataclass
class TextEncoder:
    name: str
    fingerprint: str
    context_length: int
    width: int
    _encode: object  # captions -> (N, context_length, width) tensor on the encoder's device

    def encode(self, captions: list[str]) -> np.ndarray:
        """(N, context_length, width) float32 hidden states, on the host."""
        return self._encode(captions).float().cpu().numpy()

    def encode_tensor(self, captions: list[str]):
        """The same as a tensor left on the encoder's device (in its dtype): for a trainer on that device."""
        return self._encode(captions)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "shape": [self.context_length, self.width],
        }


def _load_open_clip(spec: str, device: str, seed: int, dtype: str = "fp32") -> TextEncoder:
    import open_clip
    import torch

    register_model_configs()
    name, _, pretrained = spec.partition(":")
    name = model_name(name)
    if name not in open_clip.list_models():
        raise InputError(
            f"--text-encoder openclip:{name}: unknown open_clip model. Known: latentmill-tiny, latentmill-tiny-rn, "
            f"ViT-L-14-quickgelu, ViT-H-14, ... (`python -c 'import open_clip; print(open_clip.list_models())'`)."
        )
    torch.manual_seed(seed)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        raise InputError(
            f"open_clip weights '{pretrained}' for {name} could not be loaded ({str(err).splitlines()[0][:160]}). "
            f"Offline, pass a local checkpoint file: --text-encoder openclip:{name}:/path/to/open_clip_model.safetensors."
        ) from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    text_modules = torch.nn.ModuleList([model.token_embedding, model.transformer, model.ln_final])
    fingerprint = weights_fingerprint(text_modules.state_dict())  # of the stored weights, before any cast
    model.to(torch_dtype(dtype))

    def encode(captions: list[str]):
        tokens = tokenizer(captions).to(device, non_blocking=True)
        with torch.inference_mode():
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
            x = model.transformer(x, attn_mask=model.attn_mask)
            return model.ln_final(x)

    return TextEncoder(
        name=f"openclip:{spec}",
        fingerprint=fingerprint,
        context_length=int(model.positional_embedding.shape[0]),
        width=int(model.ln_final.weight.shape[0]),
        _encode=encode,
    )


def clip_text_parts(spec: str):
    """(CLIPTextModel, CLIPTokenizer) of a pipeline folder (text_encoder/ and tokenizer/), a CLIP text model
    folder, or `clip-tiny`; never downloads. What the frozen encoder, the trained text side and the exports
    all load."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = text_encoder_folder(spec)
    text_dir = path / "text_encoder" if (path / "text_encoder").exists() else path
    token_dir = path / "tokenizer" if (path / "tokenizer").exists() else path
    try:
        model = CLIPTextModel.from_pretrained(text_dir, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(token_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(
            f"--text-encoder {spec}: no CLIP text model found ({str(err).splitlines()[0][:160]}). Give a diffusers "
            f"pipeline folder (text_encoder/ and tokenizer/) or openclip:NAME[:PRETRAINED]."
        ) from None
    return model, tokenizer


def _load_transformers(spec: str, device: str, dtype: str = "fp32") -> TextEncoder:
    import torch

    model, tokenizer = clip_text_parts(spec)
    model = model.to(device).eval().requires_grad_(False)

    # tokenizers saved without model_max_length report a huge sentinel: the position table is the real limit
    context_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)

    fingerprint = weights_fingerprint(model.state_dict())
    model.to(torch_dtype(dtype))

    def encode(captions: list[str]):
        tokens = tokenizer(
            captions, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device, non_blocking=True)
        with torch.inference_mode():
            return model(tokens).last_hidden_state

    return TextEncoder(
        name=spec,
        fingerprint=fingerprint,
        context_length=context_length,
        width=int(model.config.hidden_size),
        _encode=encode,
    )


TINY_CLIP = "clip-tiny"  # a tiny random CLIPTextModel pipeline folder, made on demand (tests, the demo)


def write_tiny_clip_pipeline(folder: str | Path) -> Path:
    """Write text_encoder/ (a 32-d, 2-layer CLIPTextModel, seeded) and tokenizer/ (letters) into `folder`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentmill.curate.storage import atomic_path

    folder = Path(folder)
    if (folder / "tokenizer" / "tokenizer_config.json").exists():
        return folder
    with atomic_path(folder) as tmp:
        torch.manual_seed(0)
        CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=2,
                num_hidden_layers=2,
                vocab_size=1000,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ).save_pretrained(tmp / "text_encoder")
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for c in "abcdefghijklmnopqrstuvwxyz0123456789":
            vocab[c] = len(vocab)
            vocab[c + "</w>"] = len(vocab)
        (tmp / "tokenizer").mkdir(parents=True)
        (tmp / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(
            str(tmp / "tokenizer" / "vocab.json"), str(tmp / "tokenizer" / "merges.txt"), model_max_length=77
        ).save_pretrained(tmp / "tokenizer")
    return folder


def text_encoder_folder(spec: str) -> Path:
    """The local folder behind a pipeline-style spec (`clip-tiny` is made on first use)."""
    if spec == TINY_CLIP:
        from latentmill.curate.scratch import root

        return write_tiny_clip_pipeline(root() / "model-clip-tiny")
    return Path(spec)


def load_text_encoder(spec: str, device: str = "cpu", seed: int = 0, dtype: str = "fp32") -> TextEncoder:
    """Load a frozen text encoder from `spec` (see the module docstring) onto `device`, in `dtype` (fp32, bf16,
    fp16; the fingerprint is always of the stored weights)."""
    if spec.startswith("openclip:"):
        return _load_open_clip(spec[len("openclip:") :], device, seed, dtype)
    if spec == TINY_CLIP or Path(spec).exists():
        return _load_transformers(str(text_encoder_folder(spec)), device, dtype)
    raise InputError(
        f"--text-encoder {spec}: give openclip:NAME[:PRETRAINED] or a local pipeline folder "
        f"(with text_encoder/ and tokenizer/)."
    )
