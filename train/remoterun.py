"""A run folder in an object store (`train -o s3://bucket/runs/NAME`), trained through a local working copy.

`pull()` brings what a resume needs (the run's small files and its newest complete checkpoint) into a local
folder named after the URL, so every rank on a machine shares it; the loop works there exactly as on disk.
`push()` sends what changed back: each checkpoint's files with its state.json last (a checkpoint in the
store is complete or absent: `checkpoints()` takes only folders holding state.json), then log.jsonl and the
other files, and removes the checkpoints the run no longer keeps. Files that did not change are not sent.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from latentmill.curate.storage import is_remote, location, remove, write_bytes

STATE = "state.json"


class RunMirror:
    def __init__(self, url: str, local: str | os.PathLike | None = None):
        self.remote = location(url)
        digest = hashlib.sha256(str(self.remote).encode()).hexdigest()[:16]
        # named as the run (exports and messages use the run's name), under a folder of its URL
        root = Path(tempfile.gettempdir()) / f"latentmill-run-{digest}"
        self.local = Path(local) if local else root / self.remote.name
        self.local.mkdir(parents=True, exist_ok=True)

    def _remote_files(self) -> list[str]:
        """Names relative to the run folder of every object under it."""
        fs, root = self.remote.fs, self.remote.path.rstrip("/") + "/"
        try:
            fs.invalidate_cache()
            return sorted(f[len(root) :] for f in fs.find(root) if f.startswith(root))
        except FileNotFoundError:
            return []

    def pull(self) -> Path:
        """The local working copy, holding the run's files and its newest complete checkpoint."""
        names = self._remote_files()
        complete = sorted(
            {n.split("/")[1] for n in names if n.startswith("checkpoints/") and n.endswith("/" + STATE)}
        )
        newest = complete[-1] if complete else None
        wanted = [n for n in names if not n.startswith("checkpoints/") or (n.split("/") + [""])[1] == newest]
        for path in sorted(self.local.rglob("*"), reverse=True):  # the store is the truth: drop the rest
            name = str(path.relative_to(self.local))
            if path.is_file() and name not in wanted:
                path.unlink()
        for name in wanted:
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
