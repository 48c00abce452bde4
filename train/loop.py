"""The training loop, top to bottom: setup, then one optimizer step per iteration.

Every random draw of a step (noise, timesteps, caption dropout) comes from a generator seeded by
(seed, step, micro-step, rank), and the loader's position is saved with each checkpoint, so a resumed
run repeats an uninterrupted one exactly (bit-exact on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from latentmill.devices import resolve_device_precision, torch_dtype
from latentmill.train.checkpoint import (
    check_resume_point,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    loader_state_of,
    record_start,
    remove_stale_temporaries,
    save_checkpoint,
    stop_on_nonfinite,
    training_files,
    truncate_log,
)
from latentmill.train.config import TrainConfig
from latentmill.train.data import TrainingData, latent_sets, loader_workers, shard_cache
from latentmill.train.families import family_of
from latentmill.train.inpainting import check_inpainting_data, conditioning, grid_examples
from latentmill.train.latentspace import to_unet_space
from latentmill.train.remoterun import RunMirror, mirror_of
from latentmill.train.resumeconfig import resume_differences
from latentmill.train.runlog import RunLog, check_reporting, rank_report
from latentmill.train.runs import init_from
from latentmill.train.samplegrid import sample_grid
from latentmill.train.texttraining import TrainableText, average_gradients
from latentmill.train.validation import ValidationSet, validation_set
from latentmill.train.weights import FrozenUnet, FullWeights, LoraWeights, WithText, param_groups


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


@dataclass
class Training:
    """What the loop works with, built by `_set_up`: where it runs, the data, what trains, the objective."""

    config: TrainConfig
    run: Path
    rank: int
    world: int
    device: str
    precision: str
    data: TrainingData
    manifest: dict
    encode_text: Callable  # (batch, generator) -> caption states, with caption dropout
    encode_prompts: Callable | None  # prompts -> (states, empty state), for sample grids
    weights: FullWeights | LoraWeights | FrozenUnet | WithText
    optimizer: torch.optim.Optimizer
    objective: object  # the family's (train/families): loss, error, fixed_levels, step_loss
    model: torch.nn.Module  # the U-Net, wrapped in DDP and torch.compile where asked
    start: int  # the first step to run (0, or the resumed checkpoint's step)
    changes: list  # settings changed on resume: {step, key, from, to}, kept in every later state.json
    mirror: RunMirror | None = None  # the run folder is in an object store: `run` is its local copy
    examples: dict | None = None  # an inpainting run's sample-grid inputs (train/inpainting.py)
    text: TrainableText | None = None  # the text encoder, where part of it trains
    validation: ValidationSet | None = None  # rank 0's held-out latents (--eval-every)

    def prepared(self, batch: dict, generator) -> tuple:
        """(latents in the U-Net's space, caption states with dropout, metas, the loss mask or None, the
        inpainting conditioning or None) on the device."""
        scale, shift = self.manifest["scaling_factor"], self.manifest.get("shift_factor") or 0.0
        latents = to_unet_space(batch["latents"].to(self.device, non_blocking=True), scale, shift)
        mask = batch.get("mask") if self.config.masked_loss else None  # class images may have none
        mask = mask.to(self.device, non_blocking=True) if mask is not None else None
        inpaint = None
        if self.config.inpainting:
            inpaint = conditioning(batch["inpaint_mask"], batch["masked_latent"], scale, shift)
            inpaint = inpaint.to(self.device, non_blocking=True)
        return latents, self.encode_text(batch, generator), batch["meta"], mask, inpaint


def train(config: TrainConfig, progress=None, log=None, evaluate=None) -> dict:
    """Train a U-Net on latent shards into `config.output`; return the last step's metrics. `log`: where
    to say what a resumed run does (resuming from step N of M, or nothing left to train). `evaluate`: at
    --eval-every steps, rank 0 calls it with the EMA U-Net, the prompt encoder and the manifest for more
    numbers to log (latentmill/evaluation.py `TrainingEval`: CLIP score, FID)."""
    config.validate()
    if not config.family:  # --model's (a tiny config's, a pipeline folder's), recorded as such
        from latentmill.train.families import infer_family

        config = replace(config, family=infer_family(config.model))
    mirror = mirror_of(config.output)  # a run in an object store trains through a local copy
    try:
        return _train(config, mirror, progress, log, evaluate)
    finally:
        if mirror:  # given up on every way out (a finished run has removed it already)
            mirror.release()


def _train(config: TrainConfig, mirror: RunMirror | None, progress, log, evaluate) -> dict:
    t = _set_up(config, mirror)
    config = t.config  # with --epochs: the steps they come to
    if log and t.rank == 0 and config.epochs:
        log(f"{config.epochs} epoch(s) of the data: {config.steps} steps")
    if config.resume and log and t.rank == 0:
        for change in t.changes:
            if change["step"] == t.start:
                log(f"{change['key']}: {change['from']!r} -> {change['to']!r} from step {t.start} on")
        if t.start < config.steps:
            log(f"resuming {t.run} from step {t.start} of {config.steps}")
    if t.start >= config.steps:
        if log and t.rank == 0:
            log(
                f"{t.run} is at step {t.start} of {config.steps}: nothing to train (give a larger --steps to go on)"
            )
        return {"step": t.start, "finished_before": True} | _finish(t)
    device, world = t.device, t.world
    autocast = dict(
        device_type=device.split(":")[0], dtype=torch_dtype(t.precision), enabled=t.precision != "fp32"
    )
    metrics: dict = {}
    # the loss and the gradient norm stay on the device; the host reads them back on logging and
    # checkpoint steps only, so it can queue the next step while the device works
    first_bad = torch.full((2,), -1.0, device=device)  # (step, loss) of the first non-finite loss
    recent_keys: dict[int, list[str]] = {}
    interval_samples, interval_start = 0, time.perf_counter()

    with RunLog(t.run, t.rank, config) as run_log:  # closed on every way out: the end, an error, Ctrl-C
        for step in range(t.start, config.steps):
            for group in t.optimizer.param_groups:
                group["lr"] = group.get("base_lr", config.learning_rate) * _lr_factor(step, config)
            total_loss, keys = torch.zeros((), device=device), []
            for micro in range(config.grad_accum):
                batch, class_batch = t.data.next()
                generator = torch.Generator().manual_seed(
                    hash((config.seed, step, micro, t.rank)) & (2**62 - 1)
                )
                last_micro = micro == config.grad_accum - 1
                ddp = isinstance(t.model, torch.nn.parallel.DistributedDataParallel)
                no_sync = t.model.no_sync() if ddp and not last_micro else contextlib.nullcontext()
                with no_sync, torch.autocast(**autocast):
                    instance = t.prepared(batch, generator)
                    class_images = t.prepared(class_batch, generator) if class_batch is not None else None
                    loss = t.objective.step_loss(
                        t.model, instance, class_images, config.prior_loss_weight, generator
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
            if t.text is not None and world > 1:
                average_gradients(t.text.params, world)  # DDP averages the U-Net's only
            grad_norm = torch.nn.utils.clip_grad_norm_(t.weights.params, config.max_grad_norm)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.weights.update_ema(config.ema_decay, step)

            evaluating = bool(config.eval_every) and (step + 1) % config.eval_every == 0
            logging = (step + 1) % config.log_every == 0 or step == t.start or evaluating
            checkpointing = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            if not (logging or checkpointing):
                continue
            # before any checkpoint could save damaged weights
            stop_on_nonfinite(first_bad, recent_keys, t.run, metrics.get("loss"))
            recent_keys.clear()
            elapsed = time.perf_counter() - interval_start
            metrics = {
                "step": step + 1,
                "loss": total_loss.item(),
                "lr": t.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "samples_per_s": interval_samples * world / max(elapsed, 1e-9),
                "epoch": t.data.epoch,
            }
            if skipped := t.data.skipped_total():  # damaged shards and samples this rank did not train on
                metrics["skipped"] = skipped
            if evaluating and t.validation:  # rank 0: the held-out loss, raw and EMA weights
                metrics |= t.validation.measure(t.weights, t.objective, t.encode_prompts, config.inpainting)
            if evaluating and evaluate and t.rank == 0:
                with t.weights.ema_unet() as ema:
                    metrics |= evaluate(ema, t.encode_prompts, t.manifest, config)
            interval_samples, interval_start = 0, time.perf_counter()
            if logging:
                run_log.write(metrics)
                if progress:
                    progress(metrics)
            if (
                t.rank == 0
                and t.encode_prompts
                and config.sample_every
                and (step + 1) % config.sample_every == 0
            ):
                with t.weights.ema_unet() as ema:
                    grid = sample_grid(t.run, step + 1, ema, t.encode_prompts, t.manifest, config, t.examples)
                run_log.image(step + 1, grid)
            if checkpointing:
                _checkpoint(t, step + 1)
    return metrics | _finish(t)


def _finish(t: Training) -> dict:
    """This rank's report (RUN/ranks/rank-N.json); then a run in a store has sent everything and its
    working copy is removed (a failed or killed run keeps it, held by nobody, for the next run on the URL
    to reuse)."""
    report = rank_report(t)
    if t.mirror is not None:
        if t.world > 1:
            torch.distributed.barrier()  # no rank of this node still uses the copy
        t.mirror.release(remove_copy=True)
    return report


def _set_up(config: TrainConfig, mirror: RunMirror | None) -> Training:
    """Everything the loop needs, checked before the run folder is touched where it can be: the device,
    the data, the text conditioning, the U-Net and what of it trains, the optimizer, the resume point."""
    rank, world = _distributed()
    device, precision = resolve_device_precision(config.device, config.precision)  # fp16: refused by validate
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    run = mirror.local if mirror else Path(config.output)
    if mirror and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        mirror.pull()  # held by this process: a second trainer of the URL here is refused
    if mirror and world > 1:
        torch.distributed.barrier()  # the node's other ranks use the copy its rank 0 pulled
    # the latent folders (a mixture, DreamBooth's class images beside), read before anything is written:
    # bad input leaves no run folder
    sets = latent_sets(config.sources())
    data = TrainingData(
        sets,
        config.mix,
        config.class_data,
        repeats=config.repeats,
        batch_size=config.batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world,
        mode=config.mode,
        shuffle_buffer=config.shuffle_buffer,
        flip=config.flip,
        workers=loader_workers(config.workers, device, min(len(shards) for _, shards in sets) // world),
        pin_memory=device.startswith("cuda"),
        cache=shard_cache(config, sets),
        strict=config.strict,
    )
    manifest = data.manifest
    if config.masked_loss:
        data.check_masks([name for name, _ in sets])
    if config.inpainting:
        check_inpainting_data(data.manifests, data.names)
    validation = validation_set(config, sets, manifest, device, rank)  # --eval-every's held-out latents
    if config.epochs:
        config = replace(
            config, steps=data.steps_of_epochs(config.epochs, config.batch_size * config.grad_accum * world)
        )
    family = family_of(config.family)  # the denoiser, its conditioning, its objective and its sampler
    family.check_latents(manifest, manifest["buckets"])
    text = TrainableText(config, device, config.seed) if config.trains_text else None
    encode_text, text_width, encode_prompts = family.conditioning(
        config, manifest, data.folder, device, precision, text
    )
    if config.vae:
        from latentmill.curate.latentshards import check_vae
        from latentmill.curate.vae import load_vae

        check_vae(manifest, load_vae(config.vae).fingerprint, data.folder)
    unet = family.build(config, manifest, text_width).to(device)
    check_resume_point(run, config)
    check_reporting(config)
    run.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not config.resume:
        record_start(run, config, sets)
        if mirror:  # in the store at once: a run killed before its first checkpoint resumes from there
            mirror.push(only=["lineage.json", "started.json"])
    if config.init_from:
        init_from(unet, config.init_from)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.startswith("cuda"):
        unet.to(memory_format=torch.channels_last)
    # what trains: the whole U-Net, LoRA adapters on the frozen one, or none of it (textual inversion); and
    # of the text encoder, a new token's vectors and/or adapters (EMA and checkpoints alike)
    base = config.init_from or config.model
    if config.lora_rank:
        alpha = config.lora_alpha or config.lora_rank
        weights = LoraWeights(unet, config.lora_rank, alpha, config.lora_targets, config.seed, base=base)
    else:
        weights = FrozenUnet(unet, base) if config.textual_inversion else FullWeights(unet)
    if text is not None:
        weights = WithText(weights, text)
    optimizer = torch.optim.AdamW(
        param_groups(weights, config.learning_rate, config.text_encoder_lr),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.startswith("cuda"),
    )
    objective = family.objective(config, device)
    start, changes = 0, []
    if rank == 0:
        remove_stale_temporaries(run)
    if rank == 0 and not checkpoints(run):  # a new run, or one stopped before its first checkpoint
        truncate_log(run, 0)
    if config.resume and checkpoints(run):
        state = load_checkpoint(
            latest_checkpoint(run, training_files(weights.files), fallback=True), weights, optimizer
        )
        start = state["step"]
        _, allowed = resume_differences(state.get("config") or {}, config)
        changes = list(state.get("changes") or []) + [{"step": start} | change for change in allowed]
        data.load_state_dict(loader_state_of(state["loader"], rank, world))
        if rank == 0:
            truncate_log(run, start)
    unet_trains = any(p.requires_grad for p in unet.parameters())
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 and unet_trains else unet
    if config.compile:
        model = torch.compile(model)
    examples = None
    if config.inpainting and rank == 0 and config.sample_every and encode_prompts:
        examples = grid_examples(data.loaders[0].shards[0], manifest, min(4, len(config.sample_prompts)))
    return Training(
        config,
        run,
        rank,
        world,
        device,
        precision,
        data,
        manifest,
        encode_text,
        encode_prompts,
        weights,
        optimizer,
        objective,
        model,
        start,
        changes,
        mirror,
        examples,
        text,
        validation,
    )


def _checkpoint(t: Training, step: int) -> None:
    """Rank 0 saves weights, optimizer, loader position and config atomically; every rank waits for it."""
    loader = t.data.state_dict()
    if t.world > 1:  # every rank reads its own shards: each one's position is kept
        positions = [None] * t.world
        torch.distributed.all_gather_object(positions, loader)
        loader = {"ranks": positions}
    if t.rank == 0:
        save_checkpoint(
            t.run,
            step,
            t.weights,
            t.optimizer,
            loader,
            asdict(t.config),
            t.config.keep_checkpoints,
            t.changes,
        )
        if t.mirror:
            t.mirror.push()
    if t.world > 1:
        torch.distributed.barrier()
