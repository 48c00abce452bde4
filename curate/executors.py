"""Executors for the shard stages (score, encode, dedup's passes): the same atomic per-shard work, in this
process or on a Ray cluster.

A stage is a picklable object with `setup()` (load the models once per worker), `process(shard, state)`
(one input shard -> its outputs and stats, atomically) and `stats_path(shard)` (the stats file written
last: a shard whose stats file exists is done and is skipped).
`local` runs the shards here, one after the other, with one model. `ray` starts one actor per GPU (or
`actors` CPU actors, spread over the nodes), each holding its model, hands shards out as actors free
up, retries a shard that failed up to `shard_retries` times on another actor, and lets Ray restart an
actor whose process or node died (the shard it held is retried on the restarted actor).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from latentmill.curate.raycluster import scale_wait_field, timeout_field
from latentmill.curate.storage import location, set_options
from latentmill.curate.storage import options as storage_options
from latentmill.schema import StageConfig, opt


class ShardStage(Protocol):
    def setup(self): ...
    def process(self, shard: Path, state) -> dict: ...
    def stats_path(self, shard: Path) -> Path: ...

    # optional: `damaged(shard, stats) -> str | None`, what is wrong with a done shard's outputs (checked
    # against its stats file), so a re-run redoes it instead of trusting the marker; and `teardown(state)`,
    # what setup() opened closed (a pool's processes and shared memory) before the process holding it ends


def teardown(stage: ShardStage, state) -> None:
    if hasattr(stage, "teardown"):
        stage.teardown(state)


def done_shards(stage: ShardStage, shards: list[Path]) -> dict[str, dict]:
    """The stats of the shards that are done: a stats file, and (where the stage checks) outputs that match
    it. A done shard whose outputs are gone or damaged is redone, with a warning naming what is wrong."""
    from latentmill.curate.records import read_record
    from latentmill.errors import warn

    done = {}
    for shard in shards:
        marker = stage.stats_path(shard)
        if not marker.exists():
            continue
        stats = read_record(marker, dict, f"remove {marker.name} and run again: the shard is redone")
        problem = stage.damaged(shard, stats) if hasattr(stage, "damaged") else None
        if problem:
            warn(f"{shard.stem}: {problem}; encoding it again.")
            continue
        done[shard.stem] = stats
    return done


@dataclass
class ExecutorConfig(StageConfig):
    """Where the shard stages (score, encode) run: the recipe's `executor:` section, the --executor options."""

    SECTION = "executor"
    RUNTIME = ("kind", "ray_address", "ray_timeout", "ray_scale_wait", "actors", "shard_retries")
    kind: str = opt(
        "local",
        "Run shards here, or on a Ray cluster (an actor per GPU holding the model).",
        choices=("local", "ray"),
        flag="--executor",
    )
    ray_address: str | None = opt(
        None,
        "Ray: the cluster ('auto', ray://HOST:10001); default: Ray on 127.0.0.1.",
        old=("--address",),
        old_key="address",
    )
    ray_timeout: float = timeout_field()
    ray_scale_wait: float = scale_wait_field()
    actors: int | None = opt(None, "Ray: actors (default: one per GPU, or 2 on CPUs).", low=1)
    shard_retries: int = opt(2, "Ray: retries of a failed shard on another actor.", low=0, old_key="retries")

    def check_more(self) -> None:
        if self.kind == "ray" and self.ray_address:  # before the stage loads a model or writes a file
            from latentmill.curate.raycluster import checked_address

            checked_address(self.ray_address, "--ray-address", self.ray_timeout)


def run_shards(
    stage: ShardStage, shards: list[Path], executor: ExecutorConfig, progress=None, local_state=None
) -> dict[str, dict]:
    """Process every shard not yet done; return the stats of all shards by name. `local_state`: models the
    caller already loaded, used by the local executor instead of `stage.setup()`."""
    executor.validate()
    results = done_shards(stage, shards)
    todo = [s for s in shards if s.stem not in results]
    if progress:
        for stats in results.values():
            progress(stats)
    if not todo:
        return results
    if executor.kind == "local":
        state = local_state if local_state is not None else stage.setup()
        try:
            for shard in todo:
                results[shard.stem] = stage.process(shard, state)
                if progress:
                    progress(results[shard.stem])
        finally:
            if local_state is None:  # set up here: closed here
                teardown(stage, state)
        return results
    return results | _run_on_ray(stage, todo, executor, progress)


def _pick(idle: deque, avoid):
    """An idle actor, another than `avoid` (the one a shard just failed on) when there is one."""
    for _ in range(len(idle)):
        actor = idle.popleft()
        if actor is not avoid or not idle:
            return actor
        idle.append(actor)
    return idle.popleft()


def _retry_or_fail(
    queue: deque, failures: dict, shard: str, attempt: int, actor, retries: int, why: str
) -> None:
    if attempt < retries:
        queue.append((shard, attempt + 1, actor))
    else:
        failures[shard] = why


def _last_line(err: BaseException) -> str:
    return ((str(err).strip().splitlines() or [type(err).__name__])[-1])[:200]


def _run_on_ray(stage: ShardStage, shards: list[Path], executor: ExecutorConfig, progress) -> dict[str, dict]:
    """Ray's own fault tolerance handles lost processes and nodes: an actor whose process or node dies is
    restarted (on any node with room, `max_restarts`) and the shard it held is retried there
    (`max_task_retries`). A shard that raises on a live actor is handed to another actor (a bad GPU, a
    full disk), up to `shard_retries` times. Each result carries the id of the node that made it."""
    import ray

    from latentmill.curate.raycluster import check_fits, connect, fits, stderr_line

    started_here = connect(executor.ray_address, "--ray-address", executor.ray_timeout)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        need = {"GPU": 1} if gpus else {"CPU": 1}
        if executor.actors:  # asked for: all of them must be placed, or the extra ones would wait forever
            check_fits(
                executor.actors, need, f"--actors {executor.actors}", "Give fewer --actors, or add nodes.",
                executor.ray_scale_wait, log=stderr_line,
            )  # fmt: skip
        count = executor.actors or gpus or max(1, min(2, fits(need)))
        options = {
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
            "scheduling_strategy": "SPREAD",  # across nodes first: a lost node takes fewer actors with it
            "max_restarts": executor.shard_retries + 1,
            "max_task_retries": executor.shard_retries,
        }

        @ray.remote
        class StageActor:
            """Holds the stage's models; reads each shard from its URL and writes the outputs itself
            (nothing here assumes the driver's disk)."""

            def __init__(self, stage, storage_options):
                set_options(storage_options)
                self.stage, self.state = stage, stage.setup()

            def process(self, shard):
                stats = self.stage.process(location(shard), self.state)
                return stats | {"node": ray.get_runtime_context().get_node_id()}

            def close(self):
                teardown(self.stage, self.state)  # the pool and its shared memory, before the actor ends

        live = [
            StageActor.options(**options).remote(stage, storage_options())
            for _ in range(min(count, len(shards)))
        ]
        idle = deque(live)
        queue = deque((str(s), 0, None) for s in shards)  # (shard, attempt, the actor it failed on)
        running: dict = {}
        results: dict[str, dict] = {}
        failures: dict[str, str] = {}
        while queue or running:
            while queue and idle:
                shard, attempt, failed_on = queue.popleft()
                actor = _pick(idle, failed_on)
                running[actor.process.remote(shard)] = (shard, attempt, actor)
            if not running:  # shards left and no live actor to run them
                failures.update({s: "no live actor left" for s, _, _ in queue})
                break
            finished, _ = ray.wait(list(running), num_returns=1)
            shard, attempt, actor = running.pop(finished[0])
            try:
                stats = ray.get(finished[0])
            except ray.exceptions.RayActorError as err:  # died more often than Ray restarts it
                live.remove(actor)
                failures[shard] = f"its actor died ({_last_line(err)})"
                continue
            except Exception as err:  # the shard failed on a live actor: retry it on another one, then report
                idle.append(actor)
                _retry_or_fail(
                    queue, failures, shard, attempt, actor, executor.shard_retries, _last_line(err)
                )
                continue
            idle.append(actor)
            results[Path(shard).stem] = stats
            if progress:
                progress(stats)
        try:
            ray.get([actor.close.remote() for actor in live], timeout=60)
        except Exception:  # an actor that died or hangs: it ends with the cluster's cleanup
            pass
        if failures:
            listed = "; ".join(f"{k}: {v}" for k, v in failures.items())
            raise RuntimeError(
                f"{len(failures)} shard(s) failed after {executor.shard_retries} retries ({listed}). "
                f"Run the same command again to retry them; finished shards are kept."
            )
        return results
    finally:
        if started_here:
            ray.shutdown()
