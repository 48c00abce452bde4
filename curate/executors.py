"""Executors for the shard stages (score, encode): the same atomic per-shard work, in this process or
on a Ray cluster.

A stage is a picklable object with `setup()` (load the models once per worker), `process(shard, state)`
(one input shard -> its outputs and stats, atomically) and `done(shard)` (its stats file exists).
`local` runs the shards here, one after the other, with one model. `ray` starts one actor per GPU (or
`actors` CPU actors), each holding its model, hands shards out as actors free up, and retries a failed
shard up to `retries` times on another free actor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from latentmill.curate.errors import InputError


class ShardStage(Protocol):
    def setup(self): ...
    def process(self, shard: Path, state) -> dict: ...
    def stats_path(self, shard: Path) -> Path: ...


@dataclass
class ExecutorConfig:
    kind: str = "local"  # or "ray"
    address: str | None = None  # ray: "auto", ray://host:10001; None: start Ray on 127.0.0.1
    actors: int | None = None  # ray: default one per GPU in the cluster, or 2 CPU actors without GPUs
    retries: int = 2


def run_shards(stage: ShardStage, shards: list[Path], executor: ExecutorConfig, progress=None,
               local_state=None) -> dict[str, dict]:
    """Process every shard not yet done; return the stats of all shards by name. `local_state`: models the
    caller already loaded, used by the local executor instead of `stage.setup()`."""
    if executor.kind not in ("local", "ray"):
        raise InputError(f"--executor {executor.kind!r}: use local or ray.")
    results = {s.stem: json.loads(stage.stats_path(s).read_text()) for s in shards if stage.stats_path(s).exists()}
    todo = [s for s in shards if s.stem not in results]
    if progress:
        for stats in results.values():
            progress(stats)
    if not todo:
        return results
    if executor.kind == "local":
        state = local_state if local_state is not None else stage.setup()
        for shard in todo:
            results[shard.stem] = stage.process(shard, state)
            if progress:
                progress(results[shard.stem])
        return results
    return results | _run_on_ray(stage, todo, executor, progress)


def _run_on_ray(stage: ShardStage, shards: list[Path], executor: ExecutorConfig, progress) -> dict[str, dict]:
    import ray

    started_here = False
    if not ray.is_initialized():
        if executor.address:
            ray.init(address=executor.address)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
            started_here = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = executor.actors or gpus or 2
        options = {"num_gpus": 1} if gpus else {"num_cpus": 1}

        @ray.remote
        class StageActor:
            def __init__(self, stage):
                self.stage, self.state = stage, stage.setup()

            def process(self, shard):
                return self.stage.process(Path(shard), self.state)

        actors = [StageActor.options(**options).remote(stage) for _ in range(min(count, len(shards)))]
        queue = [(str(s), 0) for s in shards]
        running: dict = {}
        results: dict[str, dict] = {}
        failures: dict[str, str] = {}
        idle = list(actors)
        while queue or running:
            while queue and idle:
                shard, attempt = queue.pop(0)
                actor = idle.pop()
                running[actor.process.remote(shard)] = (shard, attempt, actor)
            finished, _ = ray.wait(list(running), num_returns=1)
            shard, attempt, actor = running.pop(finished[0])
            idle.append(actor)
            try:
                stats = ray.get(finished[0])
            except Exception as err:  # a shard failed on its actor: retry elsewhere, then report
                if attempt < executor.retries:
                    queue.append((shard, attempt + 1))
                else:
                    failures[shard] = str(err).splitlines()[-1][:200]
                continue
            results[Path(shard).stem] = stats
            if progress:
                progress(stats)
        if failures:
            listed = "; ".join(f"{k}: {v}" for k, v in failures.items())
            raise RuntimeError(f"{len(failures)} shard(s) failed after {executor.retries} retries ({listed}). "
                               f"Run the same command again to retry them; finished shards are kept.")
        return results
    finally:
        if started_here:
            ray.shutdown()
