"""Latent shard checksums: recorded while a shard is written, checked while it is read.

Each shard's manifest entry records two digests of the tar's bytes: `sha256` (for people and other tools)
and `xxh3_128`, which the training loader recomputes as the shard streams past (about 15 GB/s against
sha256's 1.2, so it costs the loader a few percent at most: BENCHMARKS.md). A manifest written before
`xxh3_128` existed is checked with its `sha256`.
"""

from __future__ import annotations

import hashlib

FAST = "xxh3_128"
KINDS = (FAST, "sha256")  # in the order a reader prefers them
UNLISTED = ("unlisted", "")  # a tar the manifest's shard table does not name


def new_digest(kind: str):
    if kind == FAST:
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(kind)


class HashingWriter:
    """A write-only file that hashes what passes through it (a tar's digests without reading it back)."""

    def __init__(self, raw):
        self.raw = raw
        self.digests = {kind: new_digest(kind) for kind in KINDS}

    def write(self, data) -> int:
        for digest in self.digests.values():
            digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def hexdigests(self) -> dict[str, str]:
        return {kind: digest.hexdigest() for kind, digest in self.digests.items()}


class HashingReader:
    """A read-only stream that hashes what is read from it; `finish()` reads the rest (the tar's end-of-archive
    padding a streaming tar reader leaves unread) and says whether the digest is the expected one."""

    def __init__(self, raw, kind: str, expected: str):
        self.raw, self.kind, self.expected = raw, kind, expected
        self.digest = new_digest(kind)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str | None:
        """None when the bytes match; otherwise what differs, for a message."""
        while self.read(1 << 20):  # the rest, hashed on the way
            pass
        found = self.digest.hexdigest()
        if found == self.expected:
            return None
        return f"{self.kind} {found[:12]}… differs from the manifest's {self.expected[:12]}…"


def recorded(manifest: dict, shard: str) -> tuple[str, str] | None:
    """(kind, digest) the manifest records for the shard named `shard` (its file name without `.tar`);
    UNLISTED when its shard table does not name it; None when the manifest keeps no shard table or no
    digest (an old or hand-made folder: nothing to check against)."""
    table = manifest.get("shards")
    if not isinstance(table, dict):
        return None
    entry = table.get(shard)
    if not isinstance(entry, dict):
        return UNLISTED
    for kind in KINDS:
        if isinstance(entry.get(kind), str):
            return kind, entry[kind]
    return None
