"""What a training run is made of, built once before its first step: where it runs, its data, the family's
conditioning and denoiser, what of it trains, the optimizer and the step it resumes from.

`set_up` reads top to bottom in the order things are checked: everything that can refuse the run (the data,
the family's latent space, the VAE, the resume point, the reporting) does so before the run folder is
touched, so bad input leaves no run folder behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from latentmill.devices import resolve_device_precision
from latentmill.train.checkpoint import (
    check_resume_point,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    loader_state_of,
    record_start,
    remove_stale_temporaries,
    training_files,
    truncate_log,
)
from latentmill.train.config import TrainConfig
from latentmill.train.data import TrainingData, latent_sets, loader_workers, shard_cache
from latentmill.train.families import family_of
from latentmill.train.inpainting import check_inpainting_data, conditioning, grid_examples
from latentmill.train.latentspace import to_unet_space
from latentmill.train.remoterun import RunMirror
from latentmill.train.resumeconfig import resume_differences
from latentmill.train.runinputs import absolute
from latentmill.train.runlog import check_reporting
from latentmill.train.runs import init_from
from latentmill.train.texttraining import TrainableText
from latentmill.train.validation import ValidationSet, validation_set
from latentmill.train.weights import FrozenUnet, FullWeights, LoraWeights, WithText, param_groups


@dataclass(kw_only=True)
class Training:
    """What the loop works with, built by `set_up`: where it runs, the data, what trains, the objective."""

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
    model: torch.nn.Module  # the denoiser, wrapped in DDP and torch.compile where asked
    start: int = 0  # the first step to run (0, or the resumed checkpoint's step)
    changes: list | None = (
        None  # settings changed on resume: {step, key, from, to}, kept in every later state.json
    )
    resumed_at: list = ()  # the steps the run was resumed at, kept in every later state.json (the report)
    mirror: RunMirror | None = None  # the run folder is in an object store: `run` is its local copy
    examples: dict | None = None  # an inpainting run's sample-grid inputs (train/inpainting.py)
    text: TrainableText | None = None  # the text encoder, where part of it trains
    validation: ValidationSet | None = None  # rank 0's held-out latents (--eval-every)

    def prepared(self, batch: dict, generator) -> tuple:
        """(latents in the denoiser's space, caption states with dropout, metas, the loss mask or None, the
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


def set_up(config: TrainConfig, mirror: RunMirror | None) -> Training:
    """Everything the loop needs, checked before the run folder is touched where it can be."""
    rank, world = distributed()
    device, precision = _device(config, world)
    run = _local_run_folder(config, mirror, world)
    # the latent folders (a mixture, DreamBooth's class images beside), read before anything is written
    sets = latent_sets(config.sources())
    family = family_of(config.family)  # the denoiser, its conditioning, its objective and its sampler
    data = _training_data(config, sets, rank, world, device, _text_states(config, family, sets), family)
    manifest = data.manifest
    validation = validation_set(config, sets, manifest, device, rank)  # --eval-every's held-out latents
    if config.epochs:
        per_step = config.batch_size * config.grad_accum * world
        config = replace(config, steps=data.steps_of_epochs(config.epochs, per_step))
    family.check_latents(manifest, manifest["buckets"])
    text = TrainableText(config, device, config.seed) if config.trains_text else None
    encode_text, text_width, encode_prompts = family.conditioning(
        config, manifest, data.folder, device, precision, text
    )
    _check_vae(config, manifest, data.folder)
    denoiser = family.build(config, manifest, text_width).to(device)
    check_resume_point(run, config)
    check_reporting(config)
    _start_run_folder(run, config, sets, mirror, rank)  # from here on, the run folder exists
    _prepare_denoiser(denoiser, config, device)
    weights = _what_trains(config, denoiser, text)
    optimizer = torch.optim.AdamW(
        param_groups(weights, config.learning_rate, config.text_encoder_lr),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.startswith("cuda"),
    )
    objective = family.objective(config, device)
    start, changes, resumed_at = _resume_point(config, run, weights, optimizer, data, rank, world)
    examples = None
    if config.inpainting and rank == 0 and config.sample_every and encode_prompts:
        examples = grid_examples(data.loaders[0].shards[0], manifest, min(4, len(config.sample_prompts)))
    return Training(
        config=config,
        run=run,
        rank=rank,
        world=world,
        device=device,
        precision=precision,
        data=data,
        manifest=manifest,
        encode_text=encode_text,
        encode_prompts=encode_prompts,
        weights=weights,
        optimizer=optimizer,
        objective=objective,
        model=_wrapped(denoiser, config, world),
        start=start,
        changes=changes,
        resumed_at=resumed_at,
        mirror=mirror,
        examples=examples,
        text=text,
        validation=validation,
    )


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def _device(config: TrainConfig, world: int) -> tuple[str, str]:
    device, precision = resolve_device_precision(config.device, config.precision)  # fp16: refused by validate
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device, precision


def _local_run_folder(config: TrainConfig, mirror: RunMirror | None, world: int) -> Path:
    """The run folder, or for a run in an object store its local copy, pulled by each node's first rank."""
    if mirror and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        mirror.pull()  # held by this process: a second trainer of the URL here is refused
    if mirror and world > 1:
        torch.distributed.barrier()  # the node's other ranks use the copy its rank 0 pulled
    return mirror.local if mirror else Path(config.output)


def _text_states(config: TrainConfig, family, sets):
    """--text-states: the stored states, checked to be this family's, of its text encoders, for every shard."""
    if not config.text_states:
        return None
    from latentmill.errors import InputError
    from latentmill.train.families.pipelinetext import PipelineText
    from latentmill.train.textstates import TextStateShards

    if not isinstance(family, PipelineText):
        raise InputError(
            f"--text-states: the {family.name} family reads caption states stored in its latent shards (`encode "
            f"--text-encoder`) or runs its text encoder; text-state folders are for sdxl, sd3 and flux."
        )
    states = TextStateShards(config.text_states)
    states.check_fits(family.name, family.text_spec(config), sets[0][1])
    return states


def _training_data(
    config: TrainConfig, sets, rank: int, world: int, device: str, text_states, family
) -> TrainingData:
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
        text_states=text_states,
        stored_text=family.reads_stored_text(config),
    )
    if config.masked_loss:
        data.check_masks([name for name, _ in sets])
    if config.inpainting:
        check_inpainting_data(data.manifests, data.names)
    return data


def _check_vae(config: TrainConfig, manifest: dict, folder) -> None:
    """--vae is the VAE the latents were made with."""
    if config.vae:
        from latentmill.curate.latentshards import check_vae
        from latentmill.curate.vae import load_vae

        check_vae(manifest, load_vae(config.vae).fingerprint, folder)


def _start_run_folder(run: Path, config: TrainConfig, sets, mirror: RunMirror | None, rank: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not config.resume:
        record_start(run, config, sets)
        if mirror:  # in the store at once: a run killed before its first checkpoint resumes from there
            mirror.push(only=["lineage.json", "started.json"])


def _prepare_denoiser(denoiser: torch.nn.Module, config: TrainConfig, device: str) -> None:
    if config.init_from:
        init_from(denoiser, config.init_from)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if device.startswith("cuda"):
        denoiser.to(memory_format=torch.channels_last)


def _what_trains(config: TrainConfig, denoiser: torch.nn.Module, text: TrainableText | None):
    """The whole denoiser, LoRA adapters on the frozen one, or none of it (textual inversion); and of the
    text encoder, a new token's vectors and/or adapters (EMA and checkpoints alike)."""
    base = absolute(config.init_from or config.model)  # recorded absolute: the run opens from anywhere
    if config.lora_rank:
        alpha = config.lora_alpha or config.lora_rank
        weights = LoraWeights(denoiser, config.lora_rank, alpha, config.lora_targets, config.seed, base=base)
    else:
        weights = FrozenUnet(denoiser, base) if config.textual_inversion else FullWeights(denoiser)
    return WithText(weights, text) if text is not None else weights


def _resume_point(config: TrainConfig, run: Path, weights, optimizer, data, rank: int, world: int):
    """(the first step to run, the settings changed on resume so far, the steps resumed at): 0 and none for
    a new run; a resumed one loads its last checkpoint (weights, optimizer, each rank's loader position)."""
    start, changes, resumed_at = 0, [], []
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
        resumed_at = [*(state.get("resumed_at") or []), start]
        data.load_state_dict(loader_state_of(state["loader"], rank, world))
        if rank == 0:
            truncate_log(run, start)
    return start, changes, resumed_at


def _wrapped(denoiser: torch.nn.Module, config: TrainConfig, world: int) -> torch.nn.Module:
    """DDP across ranks where any of the denoiser trains; torch.compile where asked."""
    trains = any(p.requires_grad for p in denoiser.parameters())
    model = torch.nn.parallel.DistributedDataParallel(denoiser) if world > 1 and trains else denoiser
    return torch.compile(model) if config.compile else model
