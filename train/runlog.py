"""Where a run's metrics and sample grids go: RUN/log.jsonl always (rank 0), and TensorBoard or Weights &
Biases as `--report-to` says."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from latentmill.errors import InputError
from latentmill.train.config import TrainConfig


class RunLog:
    """Rank 0's metrics: one JSON line per logged step in RUN/log.jsonl, and the same scalars and the
    sample grids in TensorBoard (RUN/tensorboard) or Weights & Biases, as --report-to says. Other ranks
    write nothing."""

    def __init__(self, run: Path, rank: int, config: TrainConfig):
        self.run, self.rank, self.config = run, rank, config
        self.file = self.board = self.wandb = None

    def __enter__(self):
        if self.rank != 0:
            return self
        self.file = open(self.run / "log.jsonl", "a")  # noqa: SIM115 - closed in __exit__
        if self.config.report_to == "tensorboard":
            self.board = _tensorboard(self.run)
        elif self.config.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(  # WANDB_PROJECT and WANDB_DIR, where set, as wandb users expect
                project=os.environ.get("WANDB_PROJECT") or "latentmill",
                name=self.run.name,
                dir=os.environ.get("WANDB_DIR") or str(self.run),
                config=asdict(self.config),
            )
        return self

    def write(self, metrics: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        scalars = {f"train/{k}": metrics[k] for k in ("loss", "lr", "grad_norm", "samples_per_s")}
        scalars |= {
            f"validation/{k}": metrics[k]
            for k in ("val_loss", "val_loss_ema", "clip_score", "fid", "kid")
            if isinstance(metrics.get(k), (int, float))
        }
        if self.board:
            for name, value in scalars.items():
                self.board.add_scalar(name, value, metrics["step"])
        if self.wandb:
            self.wandb.log(scalars, step=metrics["step"])

    def image(self, step: int, path: Path) -> None:
        """A sample grid, beside its PNG in RUN/samples/."""
        import numpy as np
        from PIL import Image

        if self.board:
            self.board.add_image(
                "samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC"
            )
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def __exit__(self, *exc):
        for writer in (self.file, self.board, self.wandb):
            if writer is not None:
                writer.close() if writer is not self.wandb else writer.finish()
        return False


def check_reporting(config: TrainConfig) -> None:
    if config.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError(
                "--report-to wandb: Weights & Biases is not installed: `pip install wandb` (or --report-to "
                "tensorboard)."
            ) from None


def _tensorboard(run: Path):
    """A TensorBoard writer into RUN/tensorboard (None when tensorboard is not installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tensorboard"))


def rank_report(t) -> dict:
    """What this rank trained on (RUN/ranks/rank-N.json): its shards, steps and skipped samples."""
    report = {
        "skipped": t.data.skipped_total(),
        "rank": t.rank,
        "world_size": t.world,
        "shards": t.data.my_shards,
    }
    ranks = t.run / "ranks"
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{t.rank}.json").write_text(json.dumps(report | {"steps": t.config.steps - t.start}))
    if t.mirror:  # the end of the run: everything to the store (each other rank: its report)
        t.mirror.push(None if t.rank == 0 else [f"ranks/rank-{t.rank}.json"])
    return report
