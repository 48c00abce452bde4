"""The captions a textual-inversion run trains with: each sample's caption with the new token in place of a
`--placeholder` word, or captions drawn from templates (`--ti-templates object|style`), as the textual
inversion paper's code made them ("a photo of a {}", "a painting in the style of {}")."""

from __future__ import annotations

import re

import torch

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def token_names(token: str, vectors: int) -> list[str]:
    """The tokenizer entries of a token of `vectors` vectors, named as diffusers' load_textual_inversion
    names them: `<tok>`, `<tok>_1`, `<tok>_2`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def expand_token(text: str, token: str, vectors: int) -> str:
    """`text` with the token spelled as all its vectors (what diffusers' maybe_convert_prompt does)."""
    if vectors == 1:
        return text
    return re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ".join(token_names(token, vectors)), text)


def ti_captions(captions: list[str], config, generator: torch.Generator) -> list[str]:
    """The captions a step trains on: with --placeholder, each caption with the token in place of that word
    (a caption without the word gets the token in front); else one template per sample, drawn from the
    step's generator, with the token in it. Multi-vector tokens are spelled out."""
    token = config.textual_inversion
    if config.placeholder is not None:
        word = re.compile(rf"\b{re.escape(config.placeholder)}\b")
        made = [word.sub(token, c) if word.search(c) else f"{token} {c}".strip() for c in captions]
    else:
        templates = TEMPLATES[config.ti_templates or "object"]
        picks = torch.randint(len(templates), (len(captions),), generator=generator).tolist()
        made = [templates[i].format(token) for i in picks]
    return [expand_token(c, token, config.vectors) for c in made]


def ti_prompts(config) -> list[str]:
    """Sample-grid prompts of a textual-inversion run that left --sample-prompt at its default: the first
    templates of its kind with the token."""
    templates = TEMPLATES[config.ti_templates or "object"]
    return [templates[i].format(config.textual_inversion) for i in (0, 1, 9, 12)]
