"""The validation loss (`train --eval-every N`): the denoising loss on held-out latents at fixed timesteps with
fixed noise, so two evaluations of the same weights give the same number and two runs on the same held-out
set are comparable.

The held-out set is `encode --validation-share`'s `validation/` folder beside the first training folder,
or `--eval-shards`; its first `--eval-samples` samples in key order are read once, in memory. Each is
noised with its own noise (seeded by its key) at 8 evenly spaced timesteps (62, 187, ..., 937); the loss is
the plain mean squared error of the prediction target (no min-SNR weighting, no caption dropout, the
posterior mean), averaged over samples and timesteps. Measured with the raw and the EMA weights: no
sampler, no decoding.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from latentmill.errors import InputError

BATCH = 16


def eval_folder(config, sets: list) -> str | None:
    """Where the validation loss is measured: --eval-shards, or the validation/ folder beside the first
    training folder when it has a manifest; None when neither (refused unless --eval-prompts gives
    --eval-every something else to measure)."""
    from latentmill.curate.latentshards import MANIFEST, join
    from latentmill.curate.validationsplit import VALIDATION

    if config.eval_shards:
        return config.eval_shards
    beside = join(sets[0][0], VALIDATION)
    try:
        if join(beside, MANIFEST).exists():
            return str(beside)
    except (AttributeError, OSError):  # an http(s) prefix: only --eval-shards names it
        pass
    if config.eval_prompts:  # CLIP score and FID only
        return None
    raise InputError(
        f"--eval-every {config.eval_every}: {sets[0][0]} has no held-out latents beside it ({beside}); encode "
        f"with `latentmill encode --validation-share 0.01`, or name a latent folder with --eval-shards."
    )


class ValidationSet:
    """The held-out samples, batched by bucket, each with its fixed noise."""

    def __init__(self, folder: str, train_manifest: dict, limit: int, device: str):
        from latentmill.curate.latentshards import iter_latent_shard, read_manifest
        from latentmill.train.data import check_same_latent_space
        from latentmill.train.loader import expand_shards

        self.folder, self.device = folder, device
        self.manifest = read_manifest(folder)
        check_same_latent_space([train_manifest, self.manifest], ["the training folder", folder])
        samples = [
            s for shard in expand_shards(folder) for s in iter_latent_shard(shard, self.manifest, verify=True)
        ]
        samples = sorted(samples, key=lambda s: s["key"])[:limit]
        if not samples:
            raise InputError(
                f"--eval-every: {folder} holds no samples; hold out a larger --validation-share."
            )
        buckets: dict[tuple, list] = {}
        for sample in samples:
            buckets.setdefault(tuple(sample["meta"]["bucket"]), []).append(sample)
        self.batches = [
            group[i : i + BATCH] for _, group in sorted(buckets.items()) for i in range(0, len(group), BATCH)
        ]
        self.count = len(samples)

    @staticmethod
    def noise(sample: dict) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(f"val-noise/{sample['key']}".encode()).digest()[:8], "big") >> 1
        return torch.randn(sample["latent"].shape, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def loss(self, unet, objective, encode_prompts, inpainting: bool) -> float:
        """The mean loss of `unet` over the samples and the fixed timesteps."""
        from latentmill.train.inpainting import conditioning
        from latentmill.train.latentspace import to_unet_space

        scale, shift = self.manifest["scaling_factor"], self.manifest.get("shift_factor") or 0.0
        total, count = 0.0, 0
        for batch in self.batches:
            latents = torch.from_numpy(np.stack([s["latent"] for s in batch]).astype(np.float32))
            latents = to_unet_space(latents, scale, shift).to(self.device)
            noise = torch.stack([self.noise(s) for s in batch]).to(self.device)
            if "text_emb" in batch[0]:
                text = torch.from_numpy(np.stack([s["text_emb"] for s in batch]).astype(np.float32))
            else:
                text = encode_prompts([s["caption"] for s in batch])[0]
            text = text.to(self.device)
            metas = [s["meta"] for s in batch]
            inpaint = None
            if inpainting:  # each sample's first stored variant
                masks = torch.from_numpy(np.stack([s["inpaint_mask"][0] for s in batch]).astype(np.float32))
                masked = torch.from_numpy(np.stack([s["masked_latent"][0] for s in batch]).astype(np.float32))
                inpaint = conditioning(masks, masked, scale, shift).to(self.device)
            for level in objective.fixed_levels(len(batch), self.device):
                error = objective.error(unet, latents, text, metas, noise, level, inpaint)
                total += float(error.mean(dim=(1, 2, 3)).sum())
                count += len(batch)
        return total / count

    def measure(self, weights, objective, encode_prompts, inpainting: bool) -> dict:
        """{"val_loss": raw weights, "val_loss_ema": EMA weights}."""
        raw = self.loss(weights.unet, objective, encode_prompts, inpainting)
        with weights.ema_unet() as ema:
            averaged = self.loss(ema, objective, encode_prompts, inpainting)
        return {"val_loss": raw, "val_loss_ema": averaged}


def validation_set(config, sets: list, manifest: dict, device: str, rank: int) -> ValidationSet | None:
    """The held-out set rank 0 measures on, when --eval-every is on."""
    if not config.eval_every:
        return None
    folder = eval_folder(config, sets)  # every rank checks: a missing folder stops them all
    return ValidationSet(folder, manifest, config.eval_samples, device) if rank == 0 and folder else None
