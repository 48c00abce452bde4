"""What a run that trained part of its text encoder gives the tools after it: the text encoder with its LoRA
baked in and the learned token added (for the pipeline export and `latentmill sample`), and the learned
token's two embedding files.

Embedding files:
- `learned_embeds.safetensors`: {TOKEN: (vectors, width)}, what diffusers' textual-inversion script writes
  and `pipe.load_textual_inversion(path)` reads (the token comes from the key).
- `NAME.safetensors`: {"emb_params": (vectors, width)}, the layout kohya's sd-scripts write and A1111 reads
  from its `embeddings/` folder (the file name is the word you type); diffusers reads it with
  `pipe.load_textual_inversion(path, token=TOKEN)`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from latentmill.errors import InputError

DIFFUSERS_EMBEDDINGS = "learned_embeds.safetensors"


def embedding_name(token: str) -> str:
    """A1111's file name for a token: `<my-cat>` -> `my-cat`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", token).strip("-.") or "embedding"


def add_learned_token(model, tokenizer, token: str, vectors: torch.Tensor) -> list[int]:
    """The token's entries added to `tokenizer`, their rows of `model`'s table (grown if need be) set."""
    from latentmill.train.ticaptions import token_names

    names = token_names(token, len(vectors))
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = model.get_input_embeddings().num_embeddings
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = vectors.to(model.get_input_embeddings().weight.dtype)
    return ids


def text_lora_keys(lora: dict, prefixed: bool = True) -> dict:
    """Text-encoder adapter names with the `text_model.` prefix the LoRA files of the ecosystem use (and
    transformers before 5 named the modules with), or without it (transformers 5's CLIPTextModel)."""
    bare = {k.removeprefix("text_model."): v for k, v in lora.items()}
    return {f"text_model.{k}": v for k, v in bare.items()} if prefixed else bare


def trained_text_model(loaded):
    """(CLIPTextModel, CLIPTokenizer) of a run: its --text-encoder with the run's text LoRA baked in and
    its learned token added."""
    from latentmill.curate.fingerprints import weights_fingerprint
    from latentmill.curate.textencoder import clip_text_parts
    from latentmill.train.lora import merge_lora

    folder = loaded.config["text_encoder"]
    model, tokenizer = clip_text_parts(folder)
    adapter = loaded.text_file("text_adapter.json")
    if adapter:
        state = model.state_dict()
        if weights_fingerprint(state) != adapter["base_fingerprint"]:
            raise InputError(
                f"{loaded.path}: its text-encoder LoRA was trained on {adapter['base']} with fingerprint "
                f"{adapter['base_fingerprint']}; {folder} now holds other weights ({weights_fingerprint(state)})."
            )
        lora = text_lora_keys(
            loaded.text_tensors("text_lora"), prefixed=any(k.startswith("text_model.") for k in state)
        )
        model.load_state_dict(merge_lora(state, lora, adapter["alpha"]))
    token = loaded.text_file("token.json")
    if token:
        add_learned_token(model, tokenizer, token["token"], loaded.text_tensors("embeddings")[token["token"]])
    return model.eval(), tokenizer


def prompt_encoder(loaded):
    """encode(prompts) -> (N, context, width) float32 states through the run's trained text encoder (a
    multi-vector token spelled out as in training), for `latentmill sample`."""
    from latentmill.train.ticaptions import expand_token

    model, tokenizer = trained_text_model(loaded)
    token = loaded.text_file("token.json")
    context = min(tokenizer.model_max_length, model.config.max_position_embeddings)

    @torch.no_grad()
    def encode(prompts: list[str]):
        if token:
            prompts = [expand_token(p, token["token"], token["vectors"]) for p in prompts]
        ids = tokenizer(
            prompts, padding="max_length", max_length=context, truncation=True, return_tensors="pt"
        )
        return model(ids.input_ids).last_hidden_state.float()

    return encode


def export_embeddings(loaded, folder: Path) -> Path:
    """The learned token as `learned_embeds.safetensors` (diffusers) and `NAME.safetensors` (A1111,
    "emb_params") in `folder`; returns the diffusers file, written last."""
    from safetensors.torch import save_file

    from latentmill.curate.storage import atomic_path

    token = loaded.text_file("token.json")
    if not token:
        raise InputError(
            f"--format embedding: {loaded.path} trained no token; train with --textual-inversion TOKEN."
        )
    vectors = loaded.text_tensors("embeddings")[token["token"]].float().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"name": embedding_name(token["token"]), "token": token["token"], "vectors": str(len(vectors))}
    with atomic_path(folder / f"{embedding_name(token['token'])}.safetensors") as tmp:
        save_file({"emb_params": vectors}, str(tmp), metadata=metadata)
    with atomic_path(folder / DIFFUSERS_EMBEDDINGS) as tmp:
        save_file({token["token"]: vectors}, str(tmp), metadata=metadata)
    return folder / DIFFUSERS_EMBEDDINGS


def nearest_words(text_encoder: str, vectors: torch.Tensor, count: int = 8) -> list[list[tuple[str, float]]]:
    """For each of a learned token's vectors, the `count` vocabulary words of `text_encoder` (a pipeline
    folder) whose embeddings are nearest by cosine: what the token has come to mean, word by word."""
    from latentmill.curate.textencoder import clip_text_parts

    model, tokenizer = clip_text_parts(text_encoder)
    table = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().float(), dim=1)
    known = torch.tensor(sorted(set(tokenizer.get_vocab().values()) & set(range(len(table)))))
    cosine = torch.nn.functional.normalize(vectors.float(), dim=1) @ table[known].T
    best = cosine.topk(min(count, len(known)), dim=1)
    return [
        [
            (tokenizer.convert_ids_to_tokens(int(known[i])).replace("</w>", ""), round(float(c), 3))
            for c, i in zip(values, indices, strict=True)
        ]
        for values, indices in zip(best.values, best.indices, strict=True)
    ]
