"""`latentmill latents verify`: every shard of a latent folder (on disk or in a store) against its manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from latentmill.curate.latentshards import MANIFEST, iter_latent_shard, read_manifest
from latentmill.curate.storage import location
from latentmill.errors import InputError


def verify_latents(folder: str | Path, progress=None) -> dict:
    """Check every shard of a latent folder against its manifest: present, the recorded sha256, and the
    recorded sample count, every sample readable and of the manifest's shape. Returns
    {"shards": n, "samples": n, "problems": ["{shard}.tar: what", ...]} (empty problems: all good)."""
    folder = location(folder)
    manifest = read_manifest(folder)
    recorded = manifest.get("shards")
    if not isinstance(recorded, dict):
        raise InputError(
            f"{folder / MANIFEST}: no per-shard table ('shards'); re-run `latentmill encode` into this folder."
        )
    problems, samples = [], 0
    for name, entry in sorted(recorded.items()):
        path = folder / f"{name}.tar"
        if not path.exists():
            problems.append(f"{path.name}: missing")
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry.get("sha256"):
            problems.append(
                f"{path.name}: sha256 {digest.hexdigest()[:12]}… differs from the manifest's "
                f"{str(entry.get('sha256'))[:12]}…"
            )
        errors: dict = {}
        count = sum(1 for _ in iter_latent_shard(path, manifest, errors))
        samples += count
        if errors:
            problems.append(
                f"{path.name}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(errors.items()))
            )
        if count != entry.get("samples"):
            problems.append(
                f"{path.name}: {count} readable samples, the manifest records {entry.get('samples')}"
            )
        if progress:
            progress(1)
    extra = sorted(p.name for p in folder.glob("*.tar") if p.stem not in recorded)
    problems += [f"{name}: not in the manifest" for name in extra]
    return {"shards": len(recorded), "samples": samples, "problems": problems}
