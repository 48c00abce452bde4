"""What a transformer family is conditioned on, as named tensors with the batch first: the text encoders'
hidden states (`prompt_embeds`), the pooled vectors (`pooled`), and whatever else a family's denoiser reads.
The loop, the objective, validation and sampling pass a `Conditioning` through without looking inside;
the family that made it reads it by name."""

from __future__ import annotations

import torch


class Conditioning(dict):
    """{name: tensor (batch, ...)}; moves and casts like a tensor."""

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning({name: tensor.to(*args, **kwargs) for name, tensor in self.items()})

    def float(self) -> Conditioning:
        return Conditioning({name: tensor.float() for name, tensor in self.items()})

    def cpu(self) -> Conditioning:
        return self.to("cpu")

    @property
    def batch(self) -> int:
        return next(iter(self.values())).shape[0]

    def __getitem__(self, key):
        """A tensor by name; an int picks one sample, its batch dimension kept (as `states[0]` of a tensor
        picks one caption's states for the samplers' empty caption)."""
        if isinstance(key, int):
            return Conditioning({name: tensor[key].unsqueeze(0) for name, tensor in self.items()})
        return super().__getitem__(key)

    def expand(self, n: int) -> Conditioning:
        """A one-sample conditioning repeated `n` times."""
        return Conditioning({name: tensor.expand(n, *tensor.shape[1:]) for name, tensor in self.items()})

    def where(self, drop: torch.Tensor, empty: Conditioning) -> Conditioning:
        """Each sample's tensors, or the one-sample `empty` ones where `drop` (B,) is true (caption dropout)."""
        out = {}
        for name, tensor in self.items():
            mask = drop.to(tensor.device).view(-1, *([1] * (tensor.ndim - 1)))
            out[name] = torch.where(mask, empty[name].to(tensor.device, tensor.dtype), tensor)
        return Conditioning(out)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning({name: torch.cat([p[name] for p in parts]) for name in parts[0]})

    def shapes(self) -> dict:
        """{name: [shape without the batch, dtype]}: what a manifest or a message lists."""
        return {name: [list(t.shape[1:]), str(t.dtype).removeprefix("torch.")] for name, t in self.items()}
