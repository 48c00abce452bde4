"""A run folder in an object store (`train -o s3://bucket/runs/NAME`), trained through a local working copy.

`pull()` brings what a resume needs (the run's small files and its newest complete checkpoint) into a local
folder named after the URL (a node's local rank 0 pulls; its other ranks share the copy); the loop works
there exactly as on disk.
`push()` sends what changed back: each checkpoint's files with its state.json last (a checkpoint in the
store is complete or absent: `checkpoints()` takes only folders holding state.json), then log.jsonl and the
other files, and removes the checkpoints the run no longer keeps. Files that did not change are not sent.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from pathlib import Path

from latentmill.curate.scratch import Held, hold, new_folder, remove_links, run_folder
from latentmill.curate.storage import is_remote, location, remove, write_bytes
from latentmill.errors import warn

STATE = "state.json"


class RunMirror:
    """A run folder in a store and its local working copy.

    The trainer's copy is `SCRATCH/run-DIGEST/NAME` (`curate/scratch.py`: a private folder named from the
    run's normalised URL, so the next run on the URL reuses what a killed one pulled), held by one process:
    a second trainer of the same URL on this machine is refused, naming the first's host and PID. Readers
    (export, sample, merge, the Ray driver's checks) take `read_copy()` instead: a fresh folder of their own,
    removed when they end."""

    def __init__(self, url: str, local: Path | None = None):
        self.remote = location(str(url).rstrip("/"))  # the URL's segments checked there: no '..', '.', '//'
        self.url = str(self.remote)
        self.folder = run_folder(self.url) if local is None else Path(local).parent
        self.local = self.folder / self.remote.name if local is None else Path(local)
        self._working_copy = local is None  # the trainer's: held while it is used
        self._held: Held | None = None

    def acquire(self) -> RunMirror:
        """Take the working copy for this process (`FolderInUse` when another live process has it)."""
        if self._held is None:
            self._held = hold(self.folder, f"run {self.url}")
            remove_links(self.folder)  # none is ever made there; should one appear, it is never followed
        return self

    def release(self, remove_copy: bool = False) -> None:
        """Give the working copy up; `remove_copy` once the store holds everything (a finished run)."""
        if self._held is not None:
            self._held.release(remove=remove_copy)
            self._held = None

    def _remote_files(self) -> list[str]:
        """Names relative to the run folder of every object under it (names that would not stay inside a
        local folder, with '..' or empty segments, are left out with a warning)."""
        fs, root = self.remote.fs, self.remote.path.rstrip("/") + "/"
        try:
            fs.invalidate_cache()
            found = sorted(f[len(root) :] for f in fs.find(root) if f.startswith(root))
        except FileNotFoundError:
            return []
        names = []
        for name in found:
            if any(part in ("", ".", "..") for part in name.split("/")):
                warn(f"{self.url}/{name}: an object name with '..', '.' or '//' in it; not copied.")
                continue
            names.append(name)
        return names

    def remote_checkpoints(self) -> list[str]:
        """The checkpoints of the run in the store that are complete (hold state.json), oldest first."""
        names = self._remote_files()
        return sorted(
            {n.split("/")[1] for n in names if n.startswith("checkpoints/") and n.endswith("/" + STATE)}
        )

    def pull(self) -> Path:
        """The local working copy, holding the run's files and its newest complete checkpoint."""
        if self._working_copy:
            self.acquire()
        names = self._remote_files()
        complete = self.remote_checkpoints()
        newest = complete[-1] if complete else None
        wanted = set(
            n for n in names if not n.startswith("checkpoints/") or (n.split("/") + [""])[1] == newest
        )
        self.local.mkdir(parents=True, exist_ok=True)
        remove_links(self.local)
        for here, _, files in os.walk(self.local, followlinks=False):  # the store is the truth: drop the rest
            for file in files:
                path = Path(here) / file
                if str(path.relative_to(self.local)) not in wanted:
                    path.unlink()
        for name in sorted(wanted):
            target = self.local / name
            if _same_content(target, self.remote / name):  # a copy from an earlier pull of this run
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
            (self.remote / name).fs.get_file((self.remote / name).path, str(tmp))
            os.replace(tmp, target)
        return self.local

    def push(self, only: list[str] | None = None) -> None:
        """Send the local files that differ from the store's (or only the names in `only`): checkpoint
        files before their state.json, then the rest; drop checkpoints the local copy no longer has."""
        local_files = sorted(
            str(p.relative_to(self.local))
            for p in self.local.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.local).parts)
        )
        if only is not None:
            local_files = [n for n in local_files if n in only]
        order = sorted(local_files, key=lambda n: (not n.startswith("checkpoints/"), n.endswith(STATE), n))
        for name in order:
            write_bytes(self.remote / name, (self.local / name).read_bytes())
        if only is None:
            kept = {n.split("/")[1] for n in local_files if n.startswith("checkpoints/")}
            stale = {n.split("/")[1] for n in self._remote_files() if n.startswith("checkpoints/")} - kept
            for name in sorted(stale):  # its state.json first: from then on it is absent, not half there
                remove(self.remote / "checkpoints" / name / STATE)
                remove(self.remote / "checkpoints" / name)


def mirror_of(output: str) -> RunMirror | None:
    return RunMirror(output) if is_remote(output) else None


def read_copy(url: str) -> Path:
    """A local copy of the run at `url` (its files and newest complete checkpoint) for a command that only
    reads it: a fresh private folder of this process, removed when it ends."""
    held = new_folder("tmp", f"copy of run {url}")
    atexit.register(held.release, True)
    mirror = RunMirror(url, local=held.path / location(str(url).rstrip("/")).name)
    return mirror.pull()


def _same_content(local: Path, remote) -> bool:
    """The local file holds the object's bytes: same size and its MD5 equal to the object's ETag (S3's
    ETag of a single-part upload). Anything else (a multipart ETag, a store without ETags) is fetched
    again: a stale copy must never stand in for the store's file."""
    if not local.exists():
        return False
    info = remote.fs.info(remote.path)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if not etag or "-" in etag or int(info.get("size") or -1) != local.stat().st_size:
        return False
    digest = hashlib.md5(usedforsecurity=False)
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == etag
