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

from latentmill.devices import resolve_device_precision, torch_dtype
from latentmill.errors import InputError
from latentmill.train.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    training_files,
    truncate_log,
)
from latentmill.train.conditioning import text_conditioning
from latentmill.train.config import TrainConfig
from latentmill.train.data import TrainingData, latent_sets
from latentmill.train.latentspace import to_unet_space
from latentmill.train.models import build_unet
from latentmill.train.objective import Objective
from latentmill.train.weights import FullWeights, LoraWeights


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
    from latentmill.train.schedule import training_scheduler

    # --- setup ------------------------------------------------------------------------------------
    config.validate()
    rank, world = _distributed()
    device, precision = resolve_device_precision(
        config.device, config.precision
    )  # fp16 is refused by validate()
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    autocast_dtype = torch_dtype(precision)
    run = Path(config.output)
    # the latent folders (a mixture, DreamBooth's class images beside), read before anything is written:
    # bad input leaves no run folder
    sets = latent_sets(config.sources())
    data = TrainingData(
        sets,
        config.mix,
        config.class_data,
        batch_size=config.batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world,
        mode=config.mode,
        shuffle_buffer=config.shuffle_buffer,
        flip=config.flip,
        workers=_loader_workers(config, device, min(len(shards) for _, shards in sets) // world),
        pin_memory=device.startswith("cuda"),
    )
    manifest = data.manifest
    encode_text, text_width, encode_prompts = text_conditioning(
        config, manifest, data.folder, device, precision
    )
    if config.vae:
        from latentmill.curate.latentshards import check_vae
        from latentmill.curate.vae import load_vae

        check_vae(manifest, load_vae(config.vae).fingerprint, data.folder)
    sample_size = manifest["resolution"] // manifest["downsample_factor"]
    unet = build_unet(
        config.model,
        manifest["latent_channels"],
        text_width,
        sample_size,
        config.seed,
        config.size_conditioning,
    ).to(device)
    run.mkdir(parents=True, exist_ok=True)
    if config.init_from:
        _init_from(unet, Path(config.init_from))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.startswith("cuda"):
        unet.to(memory_format=torch.channels_last)
    # what trains: the whole U-Net, or LoRA adapters on the frozen one (EMA and checkpoints alike)
    weights = (
        LoraWeights(
            unet,
            config.lora_rank,
            config.lora_alpha or config.lora_rank,
            config.lora_targets,
            config.seed,
            base=config.init_from or config.model,
        )
        if config.lora_rank
        else FullWeights(unet)
    )
    params = weights.params
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.startswith("cuda"),
    )
    objective = Objective(
        training_scheduler(config.prediction),
        config.prediction,
        config.min_snr_gamma,
        config.noise_offset,
        config.size_conditioning,
        device,
    )
    start = 0
    if checkpoints(run) and not config.resume:
        raise InputError(
            f"{run} already has checkpoints (last: {checkpoints(run)[-1].name}): pass --resume to continue "
            f"that run, or give a new -o."
        )
    if config.resume and not checkpoints(run):
        raise InputError(
            f"--resume: {run} has no checkpoints to resume from. Check -o, or drop --resume to start a new run."
        )
    if rank == 0:
        remove_stale_temporaries(run)
    if config.resume:
        _check_same_kind_of_run(run, config)
    resume_from = (
        latest_checkpoint(run, training_files(weights.files), fallback=True) if config.resume else None
    )
    if resume_from:
        state = load_checkpoint(resume_from, weights, optimizer)
        start = state["step"]
        data.load_state_dict(state["loader"])
        if rank == 0:
            truncate_log(run, start)
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    if config.compile:
        model = torch.compile(model)
    scale, shift = manifest["scaling_factor"], manifest.get("shift_factor") or 0.0

    def prepared(batch: dict, generator) -> tuple:
        """(latents in the U-Net's space, caption states with dropout, metas) on the device."""
        latents = to_unet_space(batch["latents"].to(device, non_blocking=True), scale, shift)
        return latents, encode_text(batch, generator), batch["meta"]

    log = open(run / "log.jsonl", "a") if rank == 0 else None  # noqa: SIM115 - open for the whole run
    board = _tensorboard(run) if rank == 0 else None
    metrics: dict = {}
    # the loss and the gradient norm stay on the device; the host reads them back on logging and
    # checkpoint steps only, so it can queue the next step while the device works
    first_bad = torch.full((2,), -1.0, device=device)  # (step, loss) of the first non-finite loss
    recent_keys: dict[int, list[str]] = {}
    interval_samples, interval_start = 0, time.perf_counter()

    try:  # the log and TensorBoard writers are closed on every way out: the end, an error, Ctrl-C
        # --- the loop: one optimizer step per iteration --------------------------------------------------
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * _lr_factor(step, config)
            total_loss, keys = torch.zeros((), device=device), []
            for micro in range(config.grad_accum):
                batch, class_batch = data.next()
                generator = torch.Generator().manual_seed(
                    hash((config.seed, step, micro, rank)) & (2**62 - 1)
                )
                sync = micro == config.grad_accum - 1 or world == 1
                context = model.no_sync() if not sync and world > 1 else _nullcontext()
                with (
                    context,
                    torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=precision != "fp32"),
                ):
                    instance = prepared(batch, generator)
                    class_images = prepared(class_batch, generator) if class_batch is not None else None
                    loss = objective.step_loss(
                        model, instance, class_images, config.prior_loss_weight, generator
                    )
                    loss = loss / config.grad_accum
                    loss.backward()
                total_loss += loss.detach()
                interval_samples += len(batch["keys"])
                keys += batch["keys"]
            recent_keys[step + 1] = keys
            first_bad = torch.where(
                (first_bad[0] < 0) & ~torch.isfinite(total_loss),
                torch.stack([torch.tensor(step + 1.0, device=device), total_loss.float()]),
                first_bad,
            )
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            weights.update_ema(config.ema_decay, step)

            logging = (step + 1) % config.log_every == 0 or step == start
            checkpointing = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            if not (logging or checkpointing):
                continue
            _stop_on_nonfinite(
                first_bad, recent_keys, run
            )  # before any checkpoint could save damaged weights
            recent_keys.clear()
            elapsed = time.perf_counter() - interval_start
            metrics = {
                "step": step + 1,
                "loss": total_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "samples_per_s": interval_samples * world / max(elapsed, 1e-9),
                "epoch": data.epoch,
            }
            interval_samples, interval_start = 0, time.perf_counter()
            if log and logging:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if board:
                    for name in ("loss", "lr", "grad_norm", "samples_per_s"):
                        board.add_scalar(f"train/{name}", metrics[name], step + 1)
            if progress and logging:
                progress(metrics)
            if rank == 0 and encode_prompts and config.sample_every and (step + 1) % config.sample_every == 0:
                with weights.ema_unet() as ema:
                    _sample_grid(run, step + 1, ema, encode_prompts, manifest, config)
            if checkpointing:
                if rank == 0:
                    save_checkpoint(
                        run,
                        step + 1,
                        weights,
                        optimizer,
                        data.state_dict(),
                        asdict(config),
                        config.keep_checkpoints,
                    )
                if world > 1:
                    torch.distributed.barrier()
    finally:
        if log:
            log.close()
        if board:
            board.close()
    ranks = run / "ranks"
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": world,
                "steps": config.steps - start,
                "shards": data.my_shards,
                "skipped": data.skipped_total(),
            }
        )
    )
    return metrics | {
        "skipped": data.skipped_total(),
        "rank": rank,
        "world_size": world,
        "shards": data.my_shards,
    }


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


RESUME_MUST_MATCH = ("lora_rank", "lora_targets", "mix", "instance", "class_data")


def _check_same_kind_of_run(run: Path, config: TrainConfig) -> None:
    """--resume with other LoRA, mixture or DreamBooth settings than the run's is refused by name (its
    checkpoint would not fit, or its loader position would mean other batches)."""
    try:
        saved = json.loads((checkpoints(run)[-1] / "state.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged newest checkpoint: the fallback below deals with it
    defaults = TrainConfig.__dataclass_fields__
    for key in RESUME_MUST_MATCH:
        before, now = saved.get(key, defaults[key].default), getattr(config, key)
        if before != now:
            raise InputError(
                f"--resume: {run} was trained with {key} = {before!r}, this call gives {now!r}. Resume with "
                f"the run's settings, or start a new run with another -o."
            )


def _stop_on_nonfinite(first_bad: torch.Tensor, recent_keys: dict, run: Path) -> None:
    """Raise with the step and the batch keys where the loss first stopped being finite, if it did."""
    step, loss = first_bad.tolist()
    if step < 0:
        return
    keys = recent_keys.get(int(step), [])
    last = checkpoints(run)[-1].name if checkpoints(run) else "none yet"
    raise InputError(
        f"the loss is {loss} at step {int(step)}; batch keys: {', '.join(keys[:8])}"
        f"{' ...' if len(keys) > 8 else ''}. The last good checkpoint stays: {last}."
    )


def _loader_workers(config: TrainConfig, device: str, shards_per_rank: int) -> int:
    """Loader processes per rank: as given, or on CUDA several (cores shared between the node's ranks, at
    most 4, at most one per shard), on CPU none (the cores are busy with the model)."""
    if config.workers is not None:
        return config.workers
    if not device.startswith("cuda"):
        return 0
    from latentmill.curate.prepare import available_cores

    cores = available_cores()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(4, max(1, cores // ranks_here - 1), shards_per_rank)
    return workers if workers > 1 else 0


def _sample_grid(run: Path, step: int, ema, encode_prompts, manifest: dict, config: TrainConfig) -> Path:
    """A grid of the fixed prompts at a fixed seed from the EMA weights: samples/step-NNNNNNN.png."""
    from latentmill.train.sampling import generate_from_manifest, save_grid

    states, empty = encode_prompts(config.sample_prompts)
    images = generate_from_manifest(
        ema,
        states,
        empty,
        manifest,
        config.vae,
        steps=config.sample_steps,
        seed=config.seed,
        prediction=config.prediction,
    )
    return save_grid(images, run / "samples" / f"step-{step:07d}.png")


def _init_from(unet, run: Path) -> None:
    from latentmill.train.runs import load_run

    weights = load_run(run, use_ema=True, what="--init-from").weights()
    try:
        unet.load_state_dict(weights)
    except RuntimeError as err:
        raise InputError(
            f"--init-from {run}: its U-Net does not match --model's "
            f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})."
        ) from None
