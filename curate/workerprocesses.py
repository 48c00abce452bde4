"""How latentmill starts every worker process of a command (the DataLoader workers of `score` and of the
training loader, `encode`'s prepare pool, the shard cache's fetchers): from a fork server, never by forking
the command itself.

A forked child inherits the parent's open object-store clients (fsspec's S3 filesystem refuses to run in
one: "not fork-safe") and the state of its threads (the event loop of s3fs, the shard cache's fetchers,
torch's pools), which is what made DataLoader workers crash on a store. A fork server is a clean process
started once per command, before any of that exists; each worker is forked from it and gets its dataset
pickled, so a store path arrives as a URL and opens its own client in the worker. Where there is no fork
server (Windows), workers are spawned, which gives the same guarantee more slowly."""

from __future__ import annotations

import multiprocessing

# imported once by the fork server, so that each worker forked from it starts in milliseconds
PRELOAD = [
    "torch",
    "numpy",
    "PIL.Image",
    "latentmill.train.loader",
    "latentmill.filters.score",
    "latentmill.curate.prepare",
    # score's DataLoader workers unpickle open_clip's preprocessing: imported here once, not for 5 s in every
    # worker of every shard (the demo's score stage 33 s -> 9 s on 2 cores, BENCHMARKS.md)
    "open_clip",
]

_context = None


def worker_context():
    """The multiprocessing context for every data worker: the fork server where the platform has one."""
    global _context
    if _context is None:
        _keep_temporaries_in_scratch()
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


class Environment:
    """The command's environment variables as they are when its workers start, given to each worker (a
    DataLoader's worker_init_fn, a pool's initializer): the fork server keeps the environment it started
    with, so credentials or an endpoint set after it (AWS_*, HF_*, a library caller's os.environ) would
    otherwise never reach a worker."""

    def __init__(self, then: dict | None = None):
        import os

        self.variables = dict(os.environ) if then is None else then
        self.command = os.getpid()  # the process whose workers these are

    def __call__(self, *_):
        import os

        for name in set(os.environ) - set(self.variables):
            del os.environ[name]
        os.environ.update(self.variables)
        end_with(self.command)


def end_with(command: int) -> None:
    """This worker ends when `command` (the process that asked for it) ends: a command killed with SIGKILL
    leaves no pool or loader worker waiting forever on its queue. (The fork server cannot do it: every worker
    holds its lifeline, so the server lives as long as they do.) A daemon thread waits on the command's
    pidfd (Linux), or looks every second where there is none."""
    import os
    import threading

    if command == os.getpid():
        return  # called in the command itself (workers=0)

    def watch():
        import select
        import time

        try:
            handle = os.pidfd_open(command)
        except (AttributeError, OSError):
            handle = None
        if handle is not None:
            select.select([handle], [], [])
        else:
            while True:
                try:
                    os.kill(command, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="latentmill-end-with-command", daemon=True).start()


def worker_environment() -> Environment:
    return Environment()


def _keep_temporaries_in_scratch() -> None:
    """multiprocessing's own temporary folder (the fork server's socket) inside latentmill's scratch folder,
    not at `$TMPDIR/pymp-*`: a killed command's is then swept by the next one like any other temporary."""
    from multiprocessing import process

    from latentmill.curate.scratch import new_folder

    config = process.current_process()._config  # where multiprocessing.util.get_temp_dir keeps its folder
    if config.get("tempdir") is None:
        held = new_folder("tmp", "multiprocessing's temporaries")
        if len(str(held.path)) > 80:  # a socket's path must fit in 108 bytes: multiprocessing's default
            held.release(True)
            return
        config["tempdir"] = str(held.path)
        import atexit

        atexit.register(held.release, True)
