"""`train --launcher ray`: the same training loop torchrun runs, as Ray Train's TorchTrainer workers.

One worker per GPU (or CPU worker with gloo), across the cluster's nodes; Ray Train starts the process
group, and each worker runs `train()` with its rank, so the shards split by rank exactly as under
torchrun. Shards and the run folder live in an object store (nothing assumes the driver's disk). When a
worker or its node is lost, Ray Train's FailureConfig starts the group again (on the nodes left) and
every worker resumes from the run's last checkpoint, exactly as `--resume` does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from latentmill.curate.storage import is_remote
from latentmill.curate.storage import options as storage_options
from latentmill.errors import InputError
from latentmill.train.config import TrainConfig


def check_launch(config: TrainConfig) -> None:
    """A run on a cluster must not assume one machine's disk: its shards and run folder are URLs."""
    local = [
        s for s in config.sources() if not is_remote(s) and not str(s).startswith(("http://", "https://"))
    ]
    if config.ray_address not in (None, "local") and (local or not is_remote(config.output)):
        where = local[0] if local else config.output
        raise InputError(
            f"--launcher ray: {where} is a local path, which the other nodes of the cluster cannot see. "
            f"Put the latent shards and the run folder (-o) in an object store (s3://bucket/…)."
        )


def launch(config: TrainConfig, log=None, progress=None) -> dict:
    """Train under Ray Train; return the step the run's last checkpoint holds. Rank 0's log lines and
    metrics reach `log` and `progress` here through a small actor (the workers' own output, and Ray's, stay
    in the cluster's logs: no per-worker chatter in the command's output)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from latentmill.curate.storage import is_remote
    from latentmill.train.checkpoint import check_resume_point
    from latentmill.train.remoterun import read_copy

    check_launch(config)
    check_resume_point(
        read_copy(config.output) if is_remote(config.output) else Path(config.output), config
    )  # refused here, not in N workers
    from latentmill.curate.raycluster import check_fits, connect, stderr_line

    started_here = connect(config.ray_address, "--ray-address", config.ray_timeout, quiet=True)
    try:
        gpus = config.gpus_per_worker
        # checked before a placement group is asked for: one that cannot be placed waits forever
        check_fits(
            config.num_workers,
            {"CPU": 1, "GPU": gpus} if gpus > 0 else {"CPU": 1},
            f"--launcher ray --num-workers {config.num_workers}",
            "Give fewer --num-workers (or --gpus-per-worker), or add nodes to the cluster.",
            config.ray_scale_wait,
            log=stderr_line,
        )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        relay = (
            ray.remote(_Relay).options(num_cpus=0, scheduling_strategy=here).remote()
        )  # lives with the driver
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "config": asdict(config),
                "storage_options": storage_options(),
                "relay": relay,
            },
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=gpus > 0,
                resources_per_worker={"GPU": gpus, "CPU": 1} if gpus > 0 else {"CPU": 1},
                # GPU workers packed (NCCL over NVLink inside a node); CPU workers spread over the nodes
                placement_strategy="PACK" if gpus > 0 else "SPREAD",
            ),
            run_config=RunConfig(failure_config=FailureConfig(max_failures=config.max_failures)),
        )
        with _following(relay, log, progress):
            trainer.fit()
        from latentmill.train.checkpoint import last_state

        state = last_state(config.output) or {}
        if log:
            log(f"Ray Train: {config.num_workers} worker(s) finished at step {state.get('step')}")
        return {"step": state.get("step"), "finished_before": True}
    finally:
        if started_here:
            ray.shutdown()


class _Relay:
    """Rank 0's log lines and latest metrics, kept for the driver to take (an actor: the workers run on
    other nodes)."""

    def __init__(self):
        self.lines, self.metrics = [], None

    def log(self, line: str) -> None:
        self.lines.append(line)

    def put(self, metrics: dict) -> None:
        self.metrics = metrics

    def take(self) -> tuple[list[str], dict | None]:
        lines, self.lines = self.lines, []
        return lines, self.metrics


@contextmanager
def _following(relay, log, progress):
    """A thread that passes the relay's lines to `log` and its metrics to `progress` every second while
    training runs (and once more at the end)."""
    import threading

    import ray

    stop = threading.Event()

    def drain():
        try:
            lines, metrics = ray.get(relay.take.remote(), timeout=10)
        except Exception:  # the relay is busy or gone this once: the next poll takes it
            return
        for line in lines:
            if log:
                log(line)
        if metrics and progress:
            progress(metrics)

    def follow():
        while not stop.wait(1.0):
            drain()

    thread = threading.Thread(target=follow, name="latentmill-ray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        drain()


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the rank Ray gave it, then the loop torchrun would run. A restart after a
    lost worker finds the checkpoints of the attempt before and resumes from the last."""
    import os

    from ray import train as ray_train

    from latentmill.curate.storage import set_options
    from latentmill.train.checkpoint import checkpoints
    from latentmill.train.loop import train
    from latentmill.train.remoterun import mirror_of

    set_options(loop_config["storage_options"])
    context = ray_train.get_context()
    os.environ.update(
        RANK=str(context.get_world_rank()),
        WORLD_SIZE=str(context.get_world_size()),
        LOCAL_RANK=str(context.get_local_rank()),
        LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
    )
    config = TrainConfig(**loop_config["config"])
    mirror = mirror_of(config.output)
    done = mirror.remote_checkpoints() if mirror else checkpoints(Path(config.output))
    resume = config.resume or bool(done)  # the driver refused a finished run without --resume
    relay = loop_config["relay"] if context.get_world_rank() == 0 else None

    def log(line):
        if relay is not None:
            relay.log.remote(str(line))

    def progress(metrics):
        if relay is not None:
            relay.put.remote({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    metrics = train(replace(config, launcher="local", resume=resume), progress=progress, log=log)
    ray_train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
