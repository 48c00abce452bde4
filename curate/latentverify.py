"""`latentmill latents verify`: every shard of a latent folder (on disk or in a store) against its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from latentmill.curate.latentshards import MANIFEST, iter_latent_shard, read_manifest
from latentmill.curate.names import check_stem
from latentmill.curate.shardchecksum import KINDS, new_digest
from latentmill.curate.storage import location
from latentmill.errors import InputError


def _digest_problems(path, entry: dict) -> list[str]:
    """Every digest the manifest records for one tar (sha256, xxh3_128), computed in one pass."""
    kinds = [kind for kind in KINDS if kind in entry] or ["sha256"]
    digests = {kind: new_digest(kind) for kind in kinds}
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(block)
    return [
        f"{kind} {digest.hexdigest()[:12]}… differs from the manifest's {str(entry.get(kind))[:12]}…"
        for kind, digest in digests.items()
        if digest.hexdigest() != entry.get(kind)
    ]


def _total_problems(manifest: dict, recorded: dict) -> list[str]:
    """The manifest's totals against its own shard table: `samples` and `per_bucket` must add up."""
    counts = [entry.get("samples") if isinstance(entry, dict) else None for entry in recorded.values()]
    if not all(isinstance(n, int) for n in counts):
        return [f"{MANIFEST}: a shard's 'samples' is not a whole number"]
    problems = []
    if manifest.get("samples") != sum(counts):
        problems.append(
            f"{MANIFEST}: 'samples' is {manifest.get('samples')}, but its shards add up to {sum(counts)}"
        )
    per_bucket = manifest.get("per_bucket")
    if not isinstance(per_bucket, dict) or not all(isinstance(n, int) for n in per_bucket.values()):
        problems.append(f"{MANIFEST}: 'per_bucket' is not a table of bucket -> sample count")
    elif sum(per_bucket.values()) != sum(counts):
        problems.append(
            f"{MANIFEST}: 'per_bucket' adds up to {sum(per_bucket.values())}, its shards to {sum(counts)}"
        )
    return problems


def verify_latents(folder: str | Path, progress=None) -> dict:
    """Check every shard of a latent folder against its manifest: present, the recorded digests (sha256,
    xxh3_128), the recorded sample count, every sample readable and of the manifest's shape, and the
    manifest's totals against its shard table. Returns
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
        path = folder / f"{check_stem(name, str(folder / MANIFEST), 'shard name')}.tar"
        if not isinstance(entry, dict):
            problems.append(f"{MANIFEST}: the entry of shard {name} is {json.dumps(entry)[:40]}, not a table")
            continue
        if not path.exists():
            problems.append(f"{path.name}: missing")
            continue
        problems += [f"{path.name}: {p}" for p in _digest_problems(path, entry)]
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
    problems += _total_problems(manifest, recorded)
    return {"shards": len(recorded), "samples": samples, "problems": problems}
