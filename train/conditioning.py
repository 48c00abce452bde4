"""What the U-Net is conditioned on: caption states (from a frozen text encoder, or stored in the shards)
with caption dropout to the empty caption, and SDXL-style size and crop conditions."""

from __future__ import annotations

import torch

from latentmill.errors import InputError, warn
from latentmill.train.config import TrainConfig


def size_condition(text: torch.Tensor, metas: list[dict]) -> dict:
    """SDXL's added conditions: the pooled caption, and (original h, w, crop top, left, target h, w) per sample."""
    return {"text_embeds": text.mean(dim=1), "time_ids": time_ids(metas, text.dtype, text.device)}


def time_ids(metas: list[dict], dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning per sample, from what encode recorded: (original h, w, crop top, left,
    target h, w), the order of StableDiffusionXLPipeline's `_get_add_time_ids`."""
    rows = [
        [
            m["original_size"][1],
            m["original_size"][0],
            m["crop"][0],
            m["crop"][1],
            m["bucket"][1],
            m["bucket"][0],
        ]
        for m in metas
    ]
    return torch.tensor(rows, dtype=dtype, device=device)


def caption_variants(captions: list[str], config: TrainConfig, generator: torch.Generator) -> list[str]:
    """Each caption's comma-separated tags as this step sees them: the first `keep_tags` in place, each
    other tag left out with chance `tag_dropout`, the rest shuffled with `shuffle_tags` (kohya's
    keep_tokens, caption_tag_dropout_rate, shuffle_caption). Draws come from the step's generator, so a
    resumed run sees the same captions; with neither option, captions pass unchanged and nothing is drawn."""
    if not (config.shuffle_tags or config.tag_dropout):
        return list(captions)
    out = []
    for caption in captions:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[: config.keep_tags], tags[config.keep_tags :]
        if config.tag_dropout:
            draws = torch.rand(len(rest), generator=generator).tolist()
            rest = [tag for tag, draw in zip(rest, draws, strict=True) if draw >= config.tag_dropout]
        if config.shuffle_tags:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        out.append(", ".join(kept + rest))
    return out


def text_conditioning(config: TrainConfig, manifest: dict, folder, device: str, precision: str, text=None):
    """(encode(batch, generator) -> (B, tokens, width) text states on `device` with caption dropout to the
    empty caption's states, width, prompts encoder for sample grids or None). `text`: a text encoder that
    partly trains (train/texttraining.py), encoded with the graph kept."""
    if text is not None:
        return _trained_text(config, text)

    def dropout(states, empty, generator):
        drop = (torch.rand(states.shape[0], generator=generator) < config.caption_dropout).to(device)
        return torch.where(drop[:, None, None], empty, states)

    if config.text_encoder:
        from latentmill.curate.textencoder import load_text_encoder

        # on the U-Net's device, in bf16 on CUDA: a CPU text tower would take longer than the U-Net step
        encoder = load_text_encoder(
            config.text_encoder, device, dtype="bf16" if precision == "bf16" else "fp32"
        )
        empty = encoder.encode_tensor([""])[0].float()  # once

        def encode(batch, generator):
            captions = caption_variants(batch["captions"], config, generator)
            return dropout(encoder.encode_tensor(captions).float(), empty, generator)

        def prompts(texts):
            return encoder.encode_tensor(list(texts)).float().cpu(), empty.cpu()

        return encode, encoder.width, prompts
    info = manifest.get("text_encoder")
    if not info:
        raise InputError(
            "the latent shards hold no caption embeddings: give --text-encoder (openclip:NAME or a "
            "pipeline folder), or encode with `latentmill encode --text-encoder ...`."
        )
    empty = _stored_empty_caption(info, folder).to(device)

    def stored(batch, generator):
        return dropout(batch["text_emb"].to(device, non_blocking=True).float(), empty, generator)

    return stored, info["shape"][1], None


def _stored_empty_caption(info: dict, folder) -> torch.Tensor:
    """The empty caption's embedding that `encode --text-encoder` stored beside the shards."""
    import io

    import numpy as np

    from latentmill.curate.latentshards import join, open_stream

    if not info.get("empty"):
        warn(
            "these latents were encoded before the empty caption's embedding was stored: caption dropout "
            "uses zeros. Re-encode with `latentmill encode --text-encoder ...` to drop to the empty caption."
        )
        return torch.zeros(info["shape"])
    location = join(folder, info["empty"])
    try:
        with open_stream(location) as stream:
            array = np.load(io.BytesIO(stream.read()), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(
            f"{location}: cannot read the empty caption's embedding ({err}); the manifest names it. "
            f"Copy it with the shards, or re-encode."
        ) from None
    if list(array.shape) != list(info["shape"]):
        raise InputError(
            f"{location}: the empty caption's embedding is {list(array.shape)}, the manifest says "
            f"{info['shape']}."
        )
    return torch.from_numpy(array.astype(np.float32))


def _trained_text(config: TrainConfig, text):
    """Conditioning through a text encoder that trains: the empty caption is encoded with the rest (its
    states change as the encoder does); textual inversion's captions have the token in them."""
    from latentmill.train.ticaptions import expand_token, ti_captions

    def encode(batch, generator):
        captions = caption_variants(batch["captions"], config, generator)
        if config.textual_inversion and not batch.get("prior"):  # class images keep their captions
            captions = ti_captions(captions, config, generator)
        drop = (torch.rand(len(captions), generator=generator) < config.caption_dropout).tolist()
        return text.encode(["" if d else c for c, d in zip(captions, drop, strict=True)]).float()

    @torch.no_grad()
    def prompts(texts):
        if config.textual_inversion:
            texts = [expand_token(t, config.textual_inversion, config.vectors) for t in texts]
        return text.encode(list(texts)).float().cpu(), text.encode([""])[0].float().cpu()

    return encode, text.width, prompts
