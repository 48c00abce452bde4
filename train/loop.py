"""The training loop, top to bottom: setup, then one optimizer step per iteration.

Every random draw of a step (noise, timesteps, caption dropout) comes from a generator seeded by
(seed, step, micro-step, rank), and the loader's position is saved with each checkpoint, so a resumed
run repeats an uninterrupted one exactly (bit-exact on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from latentmill.curate.errors import InputError
from latentmill.train.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from latentmill.train.config import TrainConfig
from latentmill.train.loader import LatentLoader, LoaderState, expand_shards
from latentmill.train.models import build_unet


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def train(config: TrainConfig, progress=None) -> dict:
    """Train a U-Net on latent shards into `config.output`; return the last step's metrics."""
    from diffusers import DDPMScheduler

    # --- setup ------------------------------------------------------------------------------------
    rank, world = _distributed()
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    precision = config.precision if config.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    run = Path(config.output)
    run.mkdir(parents=True, exist_ok=True)

    loader = LatentLoader(expand_shards(config.shards), config.batch_size, seed=config.seed, rank=rank,
                          world_size=world, mode=config.mode, shuffle_buffer=config.shuffle_buffer, flip=config.flip,
                          workers=config.workers)
    manifest = loader.manifest
    encode_text, text_width, encode_prompts = _text_conditioning(config, manifest, device)
    if config.vae:
        from latentmill.curate.latentshards import check_vae
        from latentmill.curate.vae import load_vae

        check_vae(manifest, load_vae(config.vae).fingerprint, Path(loader.shards[0]).parent)
    sample_size = manifest["resolution"] // manifest["downsample_factor"]
    unet = build_unet(config.model, manifest["latent_channels"], text_width, sample_size, config.seed,
                      config.size_conditioning).to(device)
    if config.init_from:
        _init_from(unet, Path(config.init_from))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.startswith("cuda"):
        unet.to(memory_format=torch.channels_last)
    ema = _copy(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=device.startswith("cuda"))
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type=config.prediction)
    alphas = noise_schedule.alphas_cumprod.to(device)
    start = 0
    if checkpoints(run) and not config.resume:
        raise InputError(f"{run} already has checkpoints (last: {checkpoints(run)[-1].name}): pass --resume to continue "
                         f"that run, or give a new -o.")
    if checkpoints(run):
        state = load_checkpoint(checkpoints(run)[-1], unet, ema, optimizer)
        start, loader.state = state["step"], LoaderState(**state["loader"])
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    if config.compile:
        model = torch.compile(model)
    scale, shift = manifest["scaling_factor"], manifest.get("shift_factor") or 0.0
    batches = iter(loader)
    log = open(run / "log.jsonl", "a") if rank == 0 else None  # noqa: SIM115 - open for the whole run
    board = _tensorboard(run) if rank == 0 else None
    metrics: dict = {}

    # --- the loop: one optimizer step per iteration --------------------------------------------------
    for step in range(start, config.steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, config)
        total_loss, samples, keys = 0.0, 0, []
        for micro in range(config.grad_accum):
            batch = next(batches)
            generator = torch.Generator().manual_seed(hash((config.seed, step, micro, rank)) & (2**62 - 1))
            latents = ((batch["latents"] - shift) * scale).to(device)
            b = latents.shape[0]
            text = encode_text(batch, generator)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (b,), generator=generator).to(device)
            noisy = noise_schedule.add_noise(latents, noise, timesteps)
            target = noise if config.prediction == "epsilon" else noise_schedule.get_velocity(latents, noise, timesteps)
            sync = micro == config.grad_accum - 1 or world == 1
            context = model.no_sync() if not sync and world > 1 else _nullcontext()
            extra = {"added_cond_kwargs": size_condition(text, batch["meta"])} if config.size_conditioning else {}
            with context, torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=precision != "fp32"):
                prediction = model(noisy, timesteps, encoder_hidden_states=text, **extra).sample
                loss_per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if config.min_snr_gamma:
                    snr = alphas[timesteps] / (1 - alphas[timesteps])
                    weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr if config.prediction == "epsilon" else snr + 1)
                    loss_per_sample = loss_per_sample * weight
                loss = loss_per_sample.mean() / config.grad_accum
                loss.backward()
            total_loss += loss.item()
            samples += b
            keys += batch["keys"]
        if not math.isfinite(total_loss):
            last = checkpoints(run)[-1].name if checkpoints(run) else "none yet"
            raise InputError(f"the loss is {total_loss} at step {step + 1}; batch keys: {', '.join(keys[:8])}"
                             f"{' ...' if len(keys) > 8 else ''}. The last good checkpoint stays: {last}.")
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _update_ema(ema, unet, config.ema_decay, step)

        metrics = {"step": step + 1, "loss": total_loss, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "samples_per_s": samples * world / (time.perf_counter() - started),
                   "epoch": loader.state.epoch}
        if log and ((step + 1) % config.log_every == 0 or step == start):
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if board:
                for name in ("loss", "lr", "grad_norm", "samples_per_s"):
                    board.add_scalar(f"train/{name}", metrics[name], step + 1)
        if progress:
            progress(metrics)
        if rank == 0 and encode_prompts and config.sample_every and (step + 1) % config.sample_every == 0:
            _sample_grid(run, step + 1, ema, encode_prompts, manifest, config)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            if rank == 0:
                save_checkpoint(run, step + 1, unet, ema, optimizer, asdict(loader.state), asdict(config),
                                config.keep_checkpoints)
            if world > 1:
                torch.distributed.barrier()
    if log:
        log.close()
    if board:
        board.close()
    ranks = run / "ranks"
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "steps": config.steps - start,
                                                         "shards": loader.my_shards, "skipped": loader.skipped_total()}))
    return metrics | {"skipped": loader.skipped_total(), "rank": rank, "world_size": world, "shards": loader.my_shards}


def size_condition(text: torch.Tensor, metas: list[dict]) -> dict:
    """SDXL's added conditions: the pooled caption, and (original h, w, crop top, left, target h, w) per sample."""
    rows = [[m["original_size"][1], m["original_size"][0], m["crop"][0], m["crop"][1], m["bucket"][1], m["bucket"][0]]
            for m in metas]
    return {"text_embeds": text.mean(dim=1), "time_ids": torch.tensor(rows, dtype=text.dtype, device=text.device)}


def _tensorboard(run: Path):
    """A TensorBoard writer into RUN/tensorboard (None when tensorboard is not installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tensorboard"))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _copy(unet):
    import copy

    ema = copy.deepcopy(unet)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def _update_ema(ema, unet, decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)


def _sample_grid(run: Path, step: int, ema, encode_prompts, manifest: dict, config: TrainConfig) -> Path:
    """A grid of the fixed prompts at a fixed seed from the EMA weights: samples/step-NNNNNNN.png."""
    from latentmill.curate.vae import load_vae
    from latentmill.train.sampling import generate, save_grid

    states, empty = encode_prompts(config.sample_prompts)
    vae = load_vae(config.vae or manifest["encode_config"]["vae"]).model.to(next(ema.parameters()).device)
    size = (manifest["resolution"], manifest["resolution"])
    images = generate(ema, states, empty, vae, manifest["scaling_factor"], manifest.get("shift_factor") or 0.0, size,
                      steps=config.sample_steps, seed=config.seed, prediction=config.prediction)
    return save_grid(images, run / "samples" / f"step-{step:07d}.png")


def _init_from(unet, run: Path) -> None:
    from safetensors.torch import load_file

    found = checkpoints(run)
    if not found:
        raise InputError(f"--init-from {run}: no checkpoints there.")
    unet.load_state_dict(load_file(found[-1] / "ema.safetensors"))


def _text_conditioning(config: TrainConfig, manifest: dict, device: str):
    """(encode(batch, generator) -> (B, tokens, width) text states with caption dropout, width)."""
    if config.text_encoder:
        from latentmill.curate.textencoder import load_text_encoder

        encoder = load_text_encoder(config.text_encoder, "cpu")
        empty = torch.from_numpy(encoder.encode([""]))[0]

        def encode(batch, generator):
            states = torch.from_numpy(encoder.encode(batch["captions"]))
            drop = torch.rand(len(batch["captions"]), generator=generator) < config.caption_dropout
            states[drop] = empty
            return states.to(device)

        return encode, encoder.width, lambda prompts: (torch.from_numpy(encoder.encode(list(prompts))), empty)
    info = manifest.get("text_encoder")
    if not info:
        raise InputError("the latent shards hold no caption embeddings: give --text-encoder (openclip:NAME or a "
                         "pipeline folder), or encode with `latentmill encode --text-encoder ...`.")

    def stored(batch, generator):  # dropout to zeros: the empty caption's states were not stored
        states = batch["text_emb"].clone()
        drop = torch.rand(states.shape[0], generator=generator) < config.caption_dropout
        states[drop] = 0
        return states.to(device)

    return stored, info["shape"][1], None
