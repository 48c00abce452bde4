"""What checking each shard's checksum as it streams costs the latent loader.

    python bench/bench_checksum.py --images 512 --rounds 5

The loader hashes every shard's bytes as it reads them (xxh3_128) and holds a shard's samples until the
digest matches the manifest's. The baseline is the same shards under a manifest without digests, which
the loader reads unchecked. Both read the same 512 px samples (with flipped latents and posterior std, the
most bytes per sample the loader decodes) from the page cache, in the training process, alternately, and
the ratio is the median of the paired rounds. A second pair does the same with sha256, what the manifest
also records, to show why the loader does not use it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from bench.bench_loader import OUT, epoch_rate, make_latents


def with_manifest(source: Path, target: Path, keep: tuple[str, ...]) -> Path:
    """A copy of `source` (tars linked, not copied) whose manifest records only the digests in `keep`."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for tar in source.glob("*.tar"):
        (target / tar.name).symlink_to(tar.resolve())
    manifest = json.loads((source / "manifest.json").read_text())
    for entry in manifest["shards"].values():
        for kind in ("xxh3_128", "sha256"):
            if kind not in keep:
                entry.pop(kind, None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def main() -> None:
    from latentmill.train.loader import expand_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    source = OUT / f"latents-{args.images}"
    if not (source / "manifest.json").exists() or "xxh3_128" not in (source / "manifest.json").read_text():
        shutil.rmtree(source, ignore_errors=True)
        make_latents(source, args.images)
    folders = {
        "unchecked": with_manifest(source, OUT / "checksum-none", ()),
        "xxh3_128": with_manifest(source, OUT / "checksum-xxh3", ("xxh3_128",)),
        "sha256": with_manifest(source, OUT / "checksum-sha256", ("sha256",)),
    }
    shards = {name: expand_shards(str(folder)) for name, folder in folders.items()}
    epoch_rate(shards["unchecked"], 0)  # warms the page cache
    rates: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(args.rounds):
        for name in folders:
            rates[name].append(epoch_rate(shards[name], 0)["samples_per_s"])
    results = {f"{name}_samples_per_s": statistics.median(r) for name, r in rates.items()}
    for name in ("xxh3_128", "sha256"):
        ratios = [checked / plain for checked, plain in zip(rates[name], rates["unchecked"], strict=True)]
        results[f"{name}_over_unchecked"] = round(statistics.median(ratios), 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
