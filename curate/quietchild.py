"""A tool's own chatter kept out of latentmill's output: while `quiet()` is open, whatever is written to
file descriptors 1 and 2 (by this process, its threads and the processes it starts: img2dataset's
"check your bandwidth with bwm-ng", its per-worker success lines and tqdm bars) goes to a log file, and
latentmill's own progress bar, drawn on the terminal the command started with, shows shards done and
images per second from the files the tool writes. The figures are summarised in latentmill's own summary
afterwards; the log is named when the tool fails."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def quiet(log: Path, total: int | None, desc: str, unit: str, done: Callable[[], int]) -> Iterator[Path]:
    """Send fds 1 and 2 to `log` (appended) while the block runs; a bar of `done()` out of `total` on the
    original stderr, refreshed every second. Restored however the block ends."""
    from tqdm import tqdm

    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    stop = threading.Event()
    with open(log, "ab") as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=terminal)

        def follow():
            while not stop.wait(1.0):
                try:
                    bar.n = done()
                    bar.refresh()
                except OSError:  # a listing that failed this once: the next one counts
                    continue

        watcher = threading.Thread(target=follow, name="latentmill-progress", daemon=True)
        watcher.start()
        try:
            yield log
        finally:
            stop.set()
            watcher.join(timeout=5)
            bar.close()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()
