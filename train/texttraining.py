"""The text encoder when part of it trains: a textual-inversion token (`--textual-inversion`), LoRA adapters
on its attention (and MLP) layers (`--lora-text-encoder`), or both with the U-Net's LoRA (pivotal tuning).

The new token's vectors are a parameter of their own (`TokenTable`): the encoder's embedding table is
never handed to the optimizer, so every other row stays bit-identical by construction (no restoring after
each step, no weight decay touching them). Checkpoint files: `embeddings.safetensors` (+ `_ema`) and
`token.json`; `text_lora.safetensors` (+ `_ema`) and `text_adapter.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentmill.errors import InputError
from latentmill.train.runinputs import absolute

TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")


class TokenTable(torch.nn.Module):
    """A token embedding with new rows: `base` (frozen, untouched) for every id but `ids`, whose vectors
    are the trained parameter `vectors` (N, width)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.vectors = torch.nn.Parameter(vectors.clone().float())
        slot = torch.full((max(base.num_embeddings, max(ids) + 1),), -1, dtype=torch.long)
        slot[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)
        self.ids = list(ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[input_ids]
        old = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        new = self.vectors[slot.clamp(min=0)].to(old.dtype)
        return torch.where((slot >= 0)[..., None], new, old)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as one tensor (rows grown to hold the new ids), for export."""
        rows = self.slot.shape[0]
        table = torch.zeros((rows, self.base.embedding_dim), dtype=self.base.weight.dtype)
        table[: self.base.num_embeddings] = self.base.weight.detach().cpu()
        table[torch.tensor(self.ids)] = self.vectors.detach().cpu().to(table.dtype)
        return table


def text_lora_targets(model, targets: str) -> list[str]:
    suffixes = TEXT_ATTENTION + (TEXT_MLP if targets == "attention+mlp" else ())
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    ]


def add_token(tokenizer, model, token: str, vectors: int, init_word: str) -> list[int]:
    """Add the token's entries to `tokenizer` and a TokenTable to `model`, its vectors copied from the
    init word's token embeddings (cycled when the word has fewer tokens than vectors); return their ids."""
    from latentmill.train.ticaptions import token_names

    context = int(getattr(tokenizer, "model_max_length", 77) or 77)
    room = max(1, (min(context, 4096) - 2) // 2)  # the other half stays for the caption's own words
    if vectors > room:
        raise InputError(
            f"--vectors {vectors}: the text encoder reads {context} tokens (start and end among them), and "
            f"every caption must keep room for its own words beside the token's vectors: give at most {room} "
            f"(1 to 8 is usual)."
        )
    names = token_names(token, vectors)
    vocabulary = tokenizer.get_vocab()
    taken = [n for n in names if n in vocabulary]
    if taken:
        raise InputError(
            f"--textual-inversion {token}: {taken[0]!r} is already in the tokenizer's vocabulary, so it would not "
            f"be a new word; pick a token it does not know (e.g. '<{token.strip('<>')}-1>')."
        )
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not init_ids:
        raise InputError(f"--init-word {init_word!r}: the tokenizer makes no tokens of it; give a word.")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    base = model.get_input_embeddings()
    start = base.weight.detach()[[init_ids[i % len(init_ids)] for i in range(vectors)]]
    model.set_input_embeddings(TokenTable(base, ids, start))
    return ids


class TrainableText:
    """A pipeline's CLIPTextModel and tokenizer with what of them trains; `encode` keeps the graph."""

    def __init__(self, config, device: str, seed: int = 0):
        from latentmill.curate.fingerprints import weights_fingerprint
        from latentmill.curate.textencoder import clip_text_parts

        self.model, self.tokenizer = clip_text_parts(config.text_encoder)
        self.model.eval().requires_grad_(False)
        self.fingerprint = weights_fingerprint(self.model.state_dict())
        self.context = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self.width = int(self.model.config.hidden_size)
        self.device = device
        self.token, self.lora = None, None
        self.lora_params: list[torch.nn.Parameter] = []
        if config.lora_text_encoder:  # first: peft freezes every parameter that is not an adapter's
            from peft import LoraConfig

            alpha = config.lora_alpha or config.lora_rank
            targets = text_lora_targets(self.model, config.text_encoder_targets)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.model.add_adapter(
                    LoraConfig(
                        r=config.lora_rank,
                        lora_alpha=alpha,
                        init_lora_weights="gaussian",
                        target_modules=targets,
                    )
                )
            self.lora = {
                "rank": config.lora_rank,
                "alpha": alpha,
                "targets": config.text_encoder_targets,
                "base": absolute(config.text_encoder),
                "base_fingerprint": self.fingerprint,
            }
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.lora_names = [n.replace(".default.", ".") for n, _ in named]
            self.lora_params = [p for _, p in named]
        if config.textual_inversion:
            ids = add_token(
                self.tokenizer, self.model, config.textual_inversion, config.vectors, config.init_word
            )
            self.token = {
                "token": config.textual_inversion,
                "vectors": config.vectors,
                "ids": ids,
                "init_word": config.init_word,
                "text_encoder": config.text_encoder,
            }
        self.model.to(device)
        self.params = self.lora_params + ([self.table.vectors] if self.token else [])
        self.ema = [p.detach().clone() for p in self.params]

    @property
    def table(self) -> TokenTable:
        return self.model.get_input_embeddings()

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, context, width) hidden states, with the graph to the trained parameters."""
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.context, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device, non_blocking=True)
        return self.model(tokens).last_hidden_state

    # --- what the checkpoints hold ---------------------------------------------------------------------

    @property
    def files(self) -> tuple[str, ...]:
        files = ("embeddings.safetensors", "embeddings_ema.safetensors", "token.json") if self.token else ()
        if self.lora:
            files += ("text_lora.safetensors", "text_lora_ema.safetensors", "text_adapter.json")
        return files

    def update_ema(self, decay: float, step: int) -> None:
        from latentmill.train.weights import _lerp_ema

        _lerp_ema(self.ema, self.params, decay, step)

    def _split(self, tensors: list) -> tuple[dict, dict]:
        lora = dict(zip(self.lora_names, tensors[: len(self.lora_params)], strict=True)) if self.lora else {}
        token = {self.token["token"]: tensors[-1]} if self.token else {}
        return lora, token

    def tensors(self) -> dict[str, dict]:
        out = {}
        for suffix, tensors in (("", self.params), ("_ema", self.ema)):
            lora, token = self._split(tensors)
            if self.lora:
                out[f"text_lora{suffix}.safetensors"] = lora
            if self.token:
                out[f"embeddings{suffix}.safetensors"] = token
        return out

    def extra(self) -> dict[str, str]:
        out = {"token.json": json.dumps(self.token, indent=2)} if self.token else {}
        if self.lora:
            out["text_adapter.json"] = json.dumps(self.lora, indent=2)
        return out

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        for suffix, targets in (("", self.params), ("_ema", self.ema)):
            saved = {}
            if self.lora:
                saved |= load_file(folder / f"text_lora{suffix}.safetensors")
            if self.token:
                saved |= load_file(folder / f"embeddings{suffix}.safetensors")
            names = (self.lora_names if self.lora else []) + ([self.token["token"]] if self.token else [])
            for name, target in zip(names, targets, strict=True):
                target.copy_(saved[name])


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the text side's gradients over the ranks (DDP wraps the U-Net only)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
