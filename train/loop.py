"""The training loop, top to bottom: setup (train/runsetup.py), then one optimizer step per iteration.

Every random draw of a step (noise, timesteps, caption dropout) comes from a generator seeded by
(seed, step, micro-step, rank), and the loader's position is saved with each checkpoint, so a resumed
run repeats an uninterrupted one exactly (bit-exact on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, replace

import torch

from latentmill.devices import torch_dtype
from latentmill.errors import warn
from latentmill.train.checkpoint import save_checkpoint, stop_on_nonfinite
from latentmill.train.config import TrainConfig
from latentmill.train.remoterun import RunMirror, mirror_of
from latentmill.train.runlog import RunLog, rank_report
from latentmill.train.runsetup import Training, set_up
from latentmill.train.samplegrid import sample_grid
from latentmill.train.texttraining import average_gradients


def _lr_factor(step: int, config: TrainConfig) -> float:
    warmup = config.warmup
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def train(config: TrainConfig, progress=None, log=None, evaluate=None, steps_known=None) -> dict:
    """Train a U-Net on latent shards into `config.output`; return the last step's metrics. `log`: where
    to say what a resumed run does (resuming from step N of M, or nothing left to train). `evaluate`: at
    --eval-every steps, rank 0 calls it with the EMA U-Net, the prompt encoder and the manifest for more
    numbers to log (latentmill/evaluation.py `TrainingEval`: CLIP score, FID). `steps_known(steps)`: told the
    steps --epochs come to, once the data is read (a progress bar's total)."""
    config.validate()
    if not config.family:  # --model's (a tiny config's, a pipeline folder's), recorded as such
        from latentmill.train.families import infer_family

        config = replace(config, family=infer_family(config.model))
    mirror = mirror_of(config.output)  # a run in an object store trains through a local copy
    try:
        return _train(config, mirror, progress, log, evaluate, steps_known)
    finally:
        if mirror:  # given up on every way out (a finished run has removed it already)
            mirror.release()


def _train(config: TrainConfig, mirror: RunMirror | None, progress, log, evaluate, steps_known) -> dict:
    t = set_up(config, mirror)  # train/runsetup.py
    config = t.config  # with --epochs: the steps they come to
    if steps_known and config.epochs:
        steps_known(config.steps)
    if t.rank == 0 and not config.resume and config.warmup >= config.steps > 1:
        warn(
            f"--warmup-steps {config.warmup_steps} is not shorter than the run ({config.steps} steps): the learning "
            f"rate never reaches --learning-rate {config.learning_rate:g}; give --warmup-steps (e.g. "
            f"{max(0, config.steps // 10)})."
        )
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
            total_loss, keys, terms = torch.zeros((), device=device), [], {}
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
                    losses = t.objective.step_losses(
                        t.model, instance, class_images, config.prior_loss_weight, generator
                    )
                    loss = losses.pop("loss") / config.grad_accum
                    loss.backward()
                total_loss += loss.detach()
                for name, term in losses.items():  # DreamBooth's instance and prior terms, logged apart
                    terms[name] = terms.get(name, 0.0) + term.detach() / config.grad_accum
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

            # each cadence on its own step multiples, and all of them at the last step
            last = step + 1 == config.steps
            evaluating = bool(config.eval_every) and ((step + 1) % config.eval_every == 0 or last)
            sampling = bool(config.sample_every) and ((step + 1) % config.sample_every == 0 or last)
            logging = (step + 1) % config.log_every == 0 or step == t.start or evaluating or last
            checkpointing = (step + 1) % config.checkpoint_every == 0 or last
            if not (logging or checkpointing or sampling):
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
                **{name: term.item() for name, term in terms.items()},
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
            if sampling and t.rank == 0 and t.encode_prompts:  # every rank took this branch: no rank waits
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
            manifest=t.manifest,
            resumed_at=t.resumed_at,
        )
        if t.mirror:
            t.mirror.push()
    if t.world > 1:
        torch.distributed.barrier()
