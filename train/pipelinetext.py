"""The text encoders of a family's diffusers pipeline folder (SDXL: CLIP-L and CLIP-G; SD3: CLIP-L, CLIP-G
and T5; Flux: CLIP-L and T5), loaded from disk or the local Hugging Face cache and never downloaded, and the
tiny ones (`sdxl-text-tiny`, `sd3-text-tiny`, `flux-text-tiny`) written from configs with seeded random weights for tests and the demo.

The families run these through their pipeline's own `encode_prompt` (train/families), so the states a run
trains on are the ones the exported pipeline computes at generation time.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentmill.errors import InputError

TINY = {"sdxl-text-tiny": "sdxl", "sd3-text-tiny": "sd3", "flux-text-tiny": "flux"}
TINY_VERSION = 2  # in the cached folder's name: a change to the tiny configs writes them anew
TINY_T5_TOKENS = 32  # the tiny T5 tokenizer's max length (SD3 reads 256 T5 tokens, Flux dev 512)


def load_parts(spec: str, parts: dict[str, str], optional: tuple = (), what: str = "--text-encoder"):
    """{component: loaded} for `parts` ({component folder: transformers class name}) of pipeline folder or
    model id `spec`; an `optional` component that is absent is None (SD3 without T5)."""
    import transformers

    path = tiny_folder(spec) if spec in TINY else Path(spec)
    local = path.exists()
    found = {}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per component is noise here
    try:
        return _load(path, spec, local, parts, optional, what, found)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _load(path, spec, local, parts, optional, what, found):
    import transformers

    for component, class_name in parts.items():
        if local and not (path / component).is_dir():
            if component in optional:
                found[component] = None
                continue
            raise InputError(
                f"{what} {spec}: no {component}/ in it ({class_name}); give the family's diffusers pipeline "
                f"folder (it has {', '.join(parts)})."
            )
        try:
            found[component] = getattr(transformers, class_name).from_pretrained(
                str(path), subfolder=component, local_files_only=True
            )
        except (OSError, ValueError) as err:
            if component in optional and not local:
                found[component] = None
                continue
            fetch = f" Fetch it first: `hf download {spec}`." if not local and spec.count("/") == 1 else ""
            raise InputError(
                f"{what} {spec}: cannot load {component} ({class_name}) from the local files "
                f"({str(err).splitlines()[0][:160]}).{fetch}"
            ) from None
    return found


def tiny_folder(spec: str) -> Path:
    from latentmill.curate.scratch import root

    return write_tiny_text(root() / f"model-{spec}-{TINY_VERSION}", TINY[spec])


def write_tiny_text(folder: str | Path, family: str) -> Path:
    """A family's text encoders and tokenizers with tiny random weights (seeded), in its pipeline's layout:
    sdxl -> text_encoder (CLIPTextModel, 32-d) and text_encoder_2 (CLIPTextModelWithProjection, 48-d); sd3 -> text_encoder, text_encoder_2 (CLIPTextModelWithProjection, 32-d, projecting to 32) and
    text_encoder_3 (T5EncoderModel, 64-d); flux -> text_encoder (CLIPTextModel, 32-d) and text_encoder_2
    (T5EncoderModel, 64-d); each with its tokenizer (letters and digits)."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from latentmill.curate.storage import atomic_path

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    clip = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    t5 = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with atomic_path(folder) as tmp:
        torch.manual_seed(0)
        if family == "sdxl":
            CLIPTextModel(CLIPTextConfig(**clip)).save_pretrained(tmp / "text_encoder")
            # CLIP-G is wider than CLIP-L, as in SDXL (1280 and 768): single-file readers tell them apart so
            wide = clip | {"hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}
            CLIPTextModelWithProjection(CLIPTextConfig(**wide)).save_pretrained(tmp / "text_encoder_2")
            names = {"tokenizer": "clip", "tokenizer_2": "clip"}
        elif family == "sd3":
            CLIPTextModelWithProjection(CLIPTextConfig(**clip)).save_pretrained(tmp / "text_encoder")
            CLIPTextModelWithProjection(CLIPTextConfig(**clip)).save_pretrained(tmp / "text_encoder_2")
            T5EncoderModel(t5).save_pretrained(tmp / "text_encoder_3")
            names = {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"}
        else:
            CLIPTextModel(CLIPTextConfig(**clip)).save_pretrained(tmp / "text_encoder")
            T5EncoderModel(t5).save_pretrained(tmp / "text_encoder_2")
            names = {"tokenizer": "clip", "tokenizer_2": "t5"}
        for name, kind in names.items():
            (_clip_tokenizer if kind == "clip" else _t5_tokenizer)(tmp / name)
        (tmp / "model_index.json").write_text(json.dumps({"latentmill": f"tiny {family} text encoders"}))
    return folder


def _letters() -> str:
    return "abcdefghijklmnopqrstuvwxyz0123456789"


def _clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _letters():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    ).save_pretrained(folder)


def _t5_tokenizer(folder: Path) -> None:
    """A T5TokenizerFast over a unigram vocabulary of letters and digits (with and without the word-start
    mark), T5's special tokens (<pad> 0, </s> 1, <unk> 2) and its `... </s>` template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _letters()] + [("\u2581" + c, -2.5) for c in _letters()]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=TINY_T5_TOKENS,
    ).save_pretrained(folder)
