"""The local scratch space latentmill owns: `$TMPDIR/latentmill-UID/`, private to this user.

Everything latentmill keeps on local disk for a store's sake lives in it, one folder each:
- `run-DIGEST/NAME`: the working copy of a run folder in an object store (`train -o s3://…`), named from
  the run's normalised URL, so the next run on that URL reuses what a killed one pulled;
- `cache-…`: a training run's shard cache (`train/shardcache.py`, when no --cache-dir is given);
- `tmp-…`: temporaries of uploads and downloads (`curate/storage.py`).

The root is made with mode 0700 and checked to be a folder owned by this user, not a link: on a shared
machine no other user can plant a link or a file in it, so nothing latentmill deletes or writes there can
be aimed elsewhere. Each folder holds `.lock`, flocked by the process that uses it and naming its host and
PID: a second process is refused (`FolderInUse`), and a folder whose lock nobody holds belongs to a
process that is gone. `sweep()` (as a command starts) removes the caches and temporaries of such
processes; a dead run's working copy stays for the next run on its URL until `latentmill cache --clear`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from latentmill.errors import InputError

LOCK = ".lock"
KINDS = ("run", "cache", "tmp")  # run- working copies are kept for reuse; the others are swept
_swept = False


class FolderInUse(InputError):
    """Another live process holds the folder."""


def root() -> Path:
    """`$TMPDIR/latentmill-UID`, made private (0700) on first use and checked every time: a folder of
    this user's, not a link, that nobody else may write into."""
    global _swept
    path = Path(tempfile.gettempdir()) / f"latentmill-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise InputError(
            f"{path}: cannot make latentmill's scratch folder ({err.strerror}). Set TMPDIR to a folder you may write."
        ) from None
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to user id {info.st_uid}, not to you ({os.geteuid()})"
    elif info.st_mode & 0o077:
        problem = f"may be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    if problem:
        raise InputError(
            f"{path}: latentmill's scratch folder {problem}, so it cannot be trusted with your files. "
            f"Remove it if it is yours (latentmill makes it anew, private), or set TMPDIR to another folder."
        )
    if not _swept:
        _swept = True
        sweep(path)
    return path


@dataclass
class Held:
    """A scratch folder this process holds: its lock stays taken until `release()` or the process ends."""

    path: Path
    _fd: int | None = None

    def release(self, remove: bool = False) -> None:
        if remove:
            _remove_tree(self.path)
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def hold(path: Path, what: str) -> Held:
    """Take `path` (a folder directly under `root()`, made if absent) for this process; `what` (a URL, a
    purpose) is recorded in its lock for `latentmill cache --list` and the refusal of a second process."""
    base = root()
    if path.parent != base:
        raise ValueError(f"{path}: not a folder of {base}")
    deadline = time.monotonic() + 2.0  # a sweeper's or `cache --clear`'s look at the lock takes a moment
    while True:
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise InputError(f"{path}: not a folder of yours; remove it (latentmill makes it anew).")
        fd = _locked(path)
        if fd is not None and os.fstat(fd).st_nlink:
            break  # taken, and not a lock a remover unlinked meanwhile
        if fd is not None:
            os.close(fd)
            continue
        if time.monotonic() > deadline:
            holder = holder_of(path) or {}
            raise FolderInUse(
                f"{what}: its local copy {path} is in use by another process (host {holder.get('host', '?')}, "
                f"PID {holder.get('pid', '?')}). Wait for it to finish or stop it; two processes never share one."
            )
        time.sleep(0.05)
    record = {"host": os.uname().nodename, "pid": os.getpid(), "what": what, "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return Held(path, fd)


def _locked(path: Path) -> int | None:
    """An fd of `path/.lock` holding its flock, or None when another process holds it. A lock file that does
    not exist yet is made already locked (under another name, then renamed), so no process ever sees an
    unlocked lock file of a live holder."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        fresh = path / f".lock-{os.getpid()}-{time.monotonic_ns()}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.link(fresh, lock)  # fails when another process made one first: then try for that one
        except FileExistsError:
            os.close(fd)
            os.unlink(fresh)
            return _locked(path)
        os.unlink(fresh)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return None
    return fd


def new_folder(kind: str, what: str) -> Held:
    """A fresh folder `KIND-…` under the root, held by this process (a cache, a temporary)."""
    assert kind in KINDS
    return hold(Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root())), what)


def run_folder(url: str) -> Path:
    """The folder a remote run's working copy lives in, named from its normalised URL."""
    return root() / f"run-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def holder_of(path: Path) -> dict | None:
    """What the lock of `path` records (host, pid, what, since), or None when it records nothing readable."""
    try:
        record = json.loads((path / LOCK).read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_held(path: Path) -> bool:
    """A live process holds the folder's lock (a folder without a lock counts as held while it is new:
    its maker is between mkdtemp and the lock)."""
    fd = _take_if_free(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def _take_if_free(path: Path) -> int | None:
    """An fd holding the folder's lock when no live process holds it (so it can be removed with nobody
    taking it meanwhile), else None."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if time.time() - os.lstat(path).st_mtime < 60:
            return None
        return os.open(path, os.O_RDONLY)  # an old folder that never had a lock: nobody's
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_if_free(path: Path) -> bool:
    """Remove the folder when no live process holds it, holding its lock while it goes."""
    fd = _take_if_free(path)
    if fd is None:
        return False
    try:
        (path / LOCK).unlink(missing_ok=True)  # first: a process waiting for it sees an unlinked lock
        _remove_tree(path)
    finally:
        os.close(fd)
    return True


def folders(base: Path | None = None) -> list[dict]:
    """Every folder in the scratch space: {path, kind, bytes, held, host, pid, what}."""
    base = base or root()
    found = []
    for path in sorted(base.iterdir()):
        kind = path.name.split("-", 1)[0]
        if kind not in KINDS or path.is_symlink() or not path.is_dir():
            continue
        holder = holder_of(path) or {}
        found.append(
            {"path": str(path), "kind": kind, "bytes": _size(path), "held": is_held(path)}
            | {k: holder.get(k) for k in ("host", "pid", "what")}
        )
    return found


def sweep(base: Path | None = None) -> int:
    """Remove the caches and temporaries whose process is gone; return how many."""
    removed = 0
    for entry in folders(base or root()):
        if entry["kind"] != "run" and not entry["held"]:
            removed += _remove_if_free(Path(entry["path"]))
    return removed


def clear() -> tuple[int, int, list[dict]]:
    """Remove every folder no live process holds: (folders removed, bytes freed, the held ones kept)."""
    removed = freed = 0
    kept = []
    for entry in folders():
        if entry["held"] or not _remove_if_free(Path(entry["path"])):
            kept.append(entry)
            continue
        removed, freed = removed + 1, freed + entry["bytes"]
    return removed, freed, kept


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _remove_tree(path: Path) -> None:
    """rmtree never follows a link: a link in the folder goes, its target stays."""
    shutil.rmtree(path, ignore_errors=True)


def remove_links(folder: Path) -> int:
    """Delete every symbolic link under `folder` (the links themselves), so nothing written or deleted
    there afterwards can reach outside it. Returns how many."""
    removed = 0
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                os.unlink(path)
                removed += 1
    return removed


class temporary_folder:
    """`with temporary_folder(what) as folder:` a fresh held `tmp-…` folder, removed on the way out (and,
    should this process be killed, by the next command's `sweep()`)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> Path:
        self.held = new_folder("tmp", self.what)
        return self.held.path

    def __exit__(self, *exc) -> None:
        self.held.release(remove=True)
