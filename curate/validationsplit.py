"""The held-out validation split (`encode --validation-share S`): a sample is held out when a hash of its key
falls below S, so the split is the same on every re-run, whatever the shard count or the order. Held-out
latents go to `OUT/validation/{shard}.tar` with the same format and their own manifest, which says
`split: validation`; the trainer refuses to train on such a folder and evaluates on it (`--eval-every`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from latentmill.curate.latentshards import LatentShardWriter
from latentmill.curate.storage import write_json

VALIDATION = "validation"


def held_out(key: str, share: float) -> bool:
    """Whether `key` belongs to the validation split of share `share` (a pure function of the key)."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"latentmill-validation/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class SplitWriter:
    """A latent shard writer that sends held-out keys to the validation folder's shard of the same name."""

    def __init__(self, output: Path, shard: str, share: float):
        self.output, self.shard, self.share = output, shard, share
        self.train = LatentShardWriter(output, shard)
        self.validation = LatentShardWriter(output / VALIDATION, shard)
        self.per_bucket: Counter = Counter()

    def add(self, key: str, latent, caption: str, meta: dict, **files) -> bool:
        """Write the sample to its split; True when it was held out."""
        if not held_out(key, self.share):
            self.train.add(key, latent, caption, meta, **files)
            return False
        self.validation.add(key, latent, caption, meta, **files)
        self.per_bucket[f"{meta['bucket'][0]}x{meta['bucket'][1]}"] += 1
        return True

    @property
    def rows(self) -> list[dict]:
        return self.train.rows

    @property
    def held(self) -> int:
        return len(self.validation.rows)

    def close(self) -> dict:
        """Finish both tars; the validation shard's stats file is written before the training shard's
        (whose stats file marks the shard done). Returns the training tar's checksums."""
        checksums = self.validation.close()
        stats = {
            "shard": self.shard,
            "written": self.held,
            "per_bucket": dict(sorted(self.per_bucket.items())),
        } | checksums
        write_json(self.output / VALIDATION / f"{self.shard}.stats.json", stats)
        return self.train.close()


def validation_stats(output: Path, shards: list[str]) -> dict[str, dict]:
    """The validation shards' stats, read back for their manifest."""
    from latentmill.curate.records import read_record

    fix = "run encode again with --overwrite"
    return {
        shard: read_record(
            output / VALIDATION / f"{shard}.stats.json", fix=fix, fields={"written": int, "per_bucket": dict}
        )
        for shard in shards
        if (output / VALIDATION / f"{shard}.stats.json").exists()
    }
