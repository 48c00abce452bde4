"""The fingerprint of a model's weights: a short sha256 that changes when any weight changes, and stays the
same wherever the weights are stored (a moved folder, another file name, an fp16 copy of fp32 values).

It is what manifests, runs and adapters record of the models they were made with (the VAE, the text
encoder, a LoRA's base), so a folder made with one model is never read as if made with another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping


def weights_fingerprint(state: Mapping, config: dict | None = None) -> str:
    """sha256 of the architecture `config` (when given) and every tensor's name and values (as float32),
    in name order; its first 16 hex digits."""
    digest = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
