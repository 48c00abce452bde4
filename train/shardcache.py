"""A bounded local cache of latent shards that live in an object store, with read-ahead.

Training reads each remote shard from a local copy, named by the object's URL, size and ETag (so a prefix
re-made since the last run is fetched again, never read from the copies of the old one): the shard being read and the next `ahead` ones of the
worker's order are downloaded in background threads (so the GPU does not wait on a GET), and when the
folder would grow past `limit` bytes the least recently used shards that no reader holds are evicted
(MosaicML streaming's idea). A shard file is opened before it may be evicted, and an unlinked open file
stays readable, so several loader processes can share one cache folder. Downloads land under a temporary
name and are renamed into place: a killed download never leaves a partial shard. Without --cache-dir the
folder is a `cache-…` folder of latentmill's private scratch space (`curate/scratch.py`), held by the
training process: removed when it ends, and by the next command when it was killed.

What is read, and in which order, is the same as straight from the store: the cache changes when bytes
arrive, not which, so resume stays exact.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import re
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from latentmill.curate.scratch import new_folder
from latentmill.curate.storage import file_version, location, options, set_options
from latentmill.curate.workerprocesses import worker_context, worker_environment
from latentmill.errors import InputError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int, option: str = "--cache-limit") -> int:
    """`50GB`, `512MiB`, `1e9` -> bytes; a size of at least one byte and at most 1 EB, or an InputError
    naming the option."""
    hint = f"{option} {text!r}: give a size such as 50GB, 512MiB or 1000000000"
    if isinstance(text, bool):
        raise InputError(f"{hint}.")
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(
            r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text)
        )
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise InputError(f"{hint}.")
        number = float(match.group(1))
        if not math.isfinite(number) or number * _UNITS[unit] > 10**18:
            raise InputError(f"{hint}: at most 1 EB.")
        value = int(number * _UNITS[unit])
    if value < 1:
        raise InputError(f"{hint}: at least one byte (the shard being read is kept whatever the limit).")
    if value > 10**18:
        raise InputError(f"{hint}: at most 1 EB.")
    return value


class ShardCache:
    def __init__(self, folder: str | os.PathLike | None, limit: int, ahead: int = 2):
        self.limit, self.ahead = limit, ahead
        # without a folder: a scratch folder of this run, held (and removed) by the process that made it
        self._held = new_folder("cache", "shard cache of a training run") if folder is None else None
        self.folder = self._held.path if self._held else Path(folder)
        if self._held:
            atexit.register(self._held.release, True)
        elif self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--cache-dir {folder}: a file; give a folder (made if absent).")
        else:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f"--cache-dir {folder}: cannot make it ({err.strerror}).") from None
        self._versions: dict[str, tuple[int, str]] = {}  # shard -> (size, ETag), asked once per process
        self._pool: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.downloads = 0  # shards fetched from the store by this process
        self._size_hint = 1  # the last shard's size: how many fit under the limit
        self._incoming: dict[str, int] = {}  # downloads in flight: their bytes count against the limit

    def __getstate__(self):  # loader worker processes start their own threads
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_pool", "_processes", "_pending", "_lock", "_incoming", "_held")
        }

    def __setstate__(self, state):
        self.__dict__.update(
            state, _pool=None, _processes=None, _pending={}, _lock=threading.Lock(), _incoming={}, _held=None
        )

    def version(self, shard: str) -> tuple[int, str]:
        """(size, ETag) of the shard's object in the store, asked once per process."""
        if shard not in self._versions:
            self._versions[shard] = file_version(location(shard))
        return self._versions[shard]

    def path_of(self, shard: str) -> Path:
        """The copy of this version of the shard: a copy of another (a prefix re-made) never matches."""
        size, etag = self.version(shard)
        digest = hashlib.sha256(f"{shard}\n{size}\n{etag}".encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{Path(shard).name}"

    def _cached(self, shard: str) -> bool:
        """A whole copy of the shard's current version is here (a copy of another size is removed)."""
        path = self.path_of(shard)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size == self.version(shard)[0]:
            return True
        path.unlink(missing_ok=True)
        return False

    def open(self, shard: str, upcoming: list[str] = ()):
        """An open binary file of `shard`'s bytes (downloaded unless cached); the next shards of
        `upcoming` start downloading in the background."""
        self._start(shard)  # queued before the read-ahead
        room = max(0, self.limit // max(1, self._size_hint) - 1)  # read ahead only what fits beside it
        for later in list(upcoming)[: min(self.ahead, room)]:
            self._start(later)
        for _ in range(3):  # another reader may evict it between the download and the open: fetch again
            self._start(shard).result()
            path = self.path_of(shard)
            try:
                stream = open(path, "rb")  # held open: eviction cannot take it from under the reader
            except FileNotFoundError:
                continue
            os.utime(path)  # most recently used
            return stream
        raise OSError(f"{shard}: evicted from the cache as soon as it arrived; raise --cache-limit.")

    def _start(self, shard: str) -> Future:
        self.version(shard)  # the store is asked outside the lock
        with self._lock:
            future = self._pending.get(shard)
            if future is not None and not (future.done() and not self.path_of(shard).exists()):
                return future
            if self._cached(shard):
                future = Future()
                future.set_result(None)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max(1, self.ahead), thread_name_prefix="shard-fetch")
                future = self._pool.submit(self._download, shard)
            self._pending[shard] = future
            return future

    def _download(self, shard: str) -> None:
        size = self.version(shard)[0]
        target = self.path_of(shard)
        with self._lock:
            self._size_hint = max(1, size)
            self._make_room(size, keep=target)
            self._incoming[shard] = size
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}-{threading.get_ident()}")
        try:
            self._fetcher().submit(_fetch, shard, str(tmp), options()).result()
            if tmp.stat().st_size != size:
                raise OSError(f"{shard}: changed in the store while it was fetched ({size} bytes before)")
            os.replace(tmp, target)
            self.downloads += 1
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._incoming.pop(shard, None)

    def _fetcher(self) -> ProcessPoolExecutor:
        """The processes that move the bytes: a GET in a thread of the training process would hold its
        interpreter lock for every chunk it receives, and slow the reader (bench_stream.py)."""
        with self._lock:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(
                    max(1, self.ahead),
                    mp_context=worker_context(),
                    initializer=_FetcherStart(worker_environment()),
                )
            return self._processes

    def _make_room(self, incoming: int, keep: Path) -> None:
        """Evict least recently used shards until `incoming` more bytes (and those in flight) fit under the
        limit. The shard a reader needs is fetched even when it alone is over the limit."""
        files = []
        for path in self.folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files) + sum(self._incoming.values())
        for _, size, path in sorted(files):
            if total + incoming <= self.limit:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
            self._processes = None
        if self._held:
            self._held.release(remove=True)


def _fetch(shard: str, target: str, storage_options: dict) -> None:
    """In a fetch process: one object to a local file."""
    set_options(storage_options)
    source = location(shard)
    source.fs.get_file(source.path, target)


class _FetcherStart:
    """Each fetch process: the command's environment (its store's credentials), then a lower priority: fetch
    processes yield the cores to the training process, as they only need to stay one shard ahead."""

    def __init__(self, environment):
        self.environment = environment

    def __call__(self) -> None:
        self.environment()
        try:
            os.nice(5)
        except OSError:
            pass
