"""Latent shards (the format: README.md, "Formats"): writing them byte-reproducibly, the manifest, and the checked reader.

`{shard}.tar` holds per sample `{key}.latent.npy` (float16 (C, H/8, W/8) posterior mean, unscaled), optionally
`latent_std`, `latent_flip`, `mask` (loss mask), `inpaint_mask` + `masked_latent` (inpainting variants) and
`text_emb` (.npy), `{key}.txt` and `{key}.json` (bucket, original_size, crop, scores, url). Beside it
`{shard}.parquet` (key, bucket, caption) and `{shard}.stats.json` (the completion marker, written last).
`manifest.json` describes the folder.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from latentmill.curate.npyio import LATENT_DTYPE, checked_npy, npy_bytes
from latentmill.curate.shardchecksum import KINDS, UNLISTED, HashingReader, HashingWriter, recorded
from latentmill.curate.storage import atomic_path, is_remote, location, make_folder, write_json
from latentmill.errors import InputError, warn

MANIFEST = "manifest.json"


class LatentShardWriter:
    """Collects samples in any order and writes the tar (in key order, fixed tar metadata: same input, same
    bytes) and the parquet atomically.

    A sample's files go to an anonymous spill file as they are added, so memory holds only a small index
    per sample, whatever the shard's size. Keys longer than a ustar name takes get a PAX header; a key
    added twice keeps its first sample (`duplicates` counts the rest).
    """

    FILE_ORDER = (
        "latent.npy",
        "latent_std.npy",
        "latent_flip.npy",
        "mask.npy",
        "inpaint_mask.npy",
        "masked_latent.npy",
        "text_emb.npy",
        "txt",
        "json",
    )

    def __init__(self, folder: Path, shard: str):
        import tempfile

        self.folder, self.shard = location(folder), shard
        make_folder(self.folder)
        self._spill = tempfile.TemporaryFile(  # gone if we are killed; beside the output on disk
            dir=None if is_remote(self.folder) else self.folder, prefix=f".{shard}.spill-"
        )
        self._index: dict[str, list[tuple[str, int, int]]] = {}  # key -> [(ext, offset, size)]
        self._rows: dict[str, dict] = {}
        self.duplicates = 0

    @property
    def rows(self) -> list[dict]:
        return [self._rows[key] for key in sorted(self._rows)]

    def add(
        self,
        key: str,
        latent: np.ndarray,
        caption: str,
        meta: dict,
        std: np.ndarray | None = None,
        flipped: np.ndarray | None = None,
        text_emb: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        inpaint: tuple | None = None,
    ) -> None:
        if key in self._index:
            self.duplicates += 1
            return
        files = {"latent.npy": npy_bytes(latent.astype(LATENT_DTYPE))}
        if std is not None:
            files["latent_std.npy"] = npy_bytes(std.astype(LATENT_DTYPE))
        if flipped is not None:
            files["latent_flip.npy"] = npy_bytes(flipped.astype(LATENT_DTYPE))
        if text_emb is not None:
            files["text_emb.npy"] = npy_bytes(text_emb.astype(LATENT_DTYPE))
        if mask is not None:
            files["mask.npy"] = npy_bytes(mask.astype(LATENT_DTYPE))
        if inpaint is not None:  # (K masks (K, 1, h, w), K masked images' latents (K, C, h, w))
            files["inpaint_mask.npy"] = npy_bytes(inpaint[0].astype(LATENT_DTYPE))
            files["masked_latent.npy"] = npy_bytes(inpaint[1].astype(LATENT_DTYPE))
        files["txt"] = (caption or "").encode("utf-8")
        files["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        entries = []
        for ext in self.FILE_ORDER:
            if ext in files:
                entries.append((ext, self._spill.tell(), len(files[ext])))
                self._spill.write(files[ext])
        self._index[key] = entries
        self._rows[key] = {
            "key": key,
            "bucket_width": meta["bucket"][0],
            "bucket_height": meta["bucket"][1],
            "caption": caption or "",
        }

    def close(self) -> dict:
        """Write `{shard}.tar` and `{shard}.parquet`; return the tar's digests and size ({"xxh3_128",
        "sha256", "bytes"})."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tar_path = self.folder / f"{self.shard}.tar"
        with atomic_path(tar_path) as tmp:
            with (
                open(tmp, "wb") as raw,
                tarfile.open(
                    fileobj=(hashing := HashingWriter(raw)), mode="w", format=tarfile.PAX_FORMAT
                ) as tar,
            ):
                for key in sorted(self._index):
                    for ext, offset, size in self._index[key]:
                        self._spill.seek(offset)
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = size, 0, 0o444
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(self._spill.read(size)))
            tar_bytes = tmp.stat().st_size
        self._spill.close()
        schema = pa.schema(
            [
                ("key", pa.string()),
                ("bucket_width", pa.int32()),
                ("bucket_height", pa.int32()),
                ("caption", pa.string()),
            ]
        )
        with atomic_path(self.folder / f"{self.shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), tmp)
        return hashing.hexdigests() | {"bytes": tar_bytes}


def is_url(spec: str | Path) -> bool:
    """Not a local path: an object store URL (s3://, gs://), http(s):// or a webdataset pipe: command."""
    return is_remote(spec) or str(spec).startswith("pipe:")


def _through_gopen(spec) -> bool:
    return str(spec).startswith(("pipe:", "http://", "https://"))


def open_stream(spec: str | Path):
    """A binary stream of a local file, an object (s3://, gs:// through fsspec), or an http(s)/pipe: URL
    (webdataset's gopen)."""
    if _through_gopen(spec):
        from webdataset import gopen

        return gopen(str(spec), "rb")
    return location(spec).open("rb")


def join(folder, name: str):
    """`folder/name` for a folder given as a path, an object store URL or an http(s) prefix."""
    if _through_gopen(folder):
        return f"{str(folder).rstrip('/')}/{name}"
    return location(folder) / name


def read_manifest(folder: str | Path) -> dict:
    """`folder/manifest.json`; `folder` may be an object store URL or an http(s) prefix (read through gopen)."""
    where = join(folder, MANIFEST)
    if not _through_gopen(where) and not where.exists():
        raise InputError(
            f"{where}: no manifest. Latent folders are made by `latentmill encode`; "
            f"if that run was interrupted, run it again to finish."
        )
    try:
        with open_stream(where) as stream:
            manifest = json.loads(stream.read())
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"{where}: cannot read the manifest ({err}).") from None
    check_manifest(manifest, where)
    return manifest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape(value) -> bool:
    return isinstance(value, list) and 0 < len(value) <= 4 and all(_positive_int(v) for v in value)


MANIFEST_SCHEMA = {  # key -> (check, what it must be)
    "latent_channels": (_positive_int, "a positive integer"),
    "downsample_factor": (_positive_int, "a positive integer"),
    "resolution": (_positive_int, "a positive integer"),
    "scaling_factor": (lambda v: _finite(v) and v != 0, "a finite non-zero number"),
    "shift_factor": (lambda v: v is None or _finite(v), "a finite number or null"),
    "buckets": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(_shape(b) and len(b) == 2 for b in v),
        "a list of [width, height]",
    ),
    "vae": (
        lambda v: isinstance(v, dict) and isinstance(v.get("fingerprint"), str),
        "an object with a fingerprint",
    ),
    "encode_config": (lambda v: isinstance(v, dict), "an object"),
    "inpainting": (
        lambda v: v is None or (isinstance(v, dict) and _positive_int(v.get("variants"))),
        "null or {variants}",
    ),
    "text_encoder": (
        lambda v: v is None or (isinstance(v, dict) and _shape(v.get("shape"))),
        "null or an object with a shape",
    ),
}


def check_manifest(manifest, location) -> None:
    """The keys readers use, with their types: a tampered or foreign manifest is an InputError naming the key."""
    if not isinstance(manifest, dict):
        raise InputError(f"{location}: not a latentmill manifest (a JSON object is expected).")
    for key, (check, what) in MANIFEST_SCHEMA.items():
        if key not in manifest and key not in ("shift_factor", "inpainting"):  # absent in older manifests
            raise InputError(
                f"{location}: no {key!r}; not a complete latentmill manifest. Re-run `latentmill encode` "
                f"into this folder to rewrite it."
            )
        if key in manifest and not check(manifest[key]):
            raise InputError(f"{location}: {key!r} is {json.dumps(manifest[key])[:80]}, expected {what}.")


def check_vae(manifest: dict, fingerprint: str, folder: str | Path) -> None:
    """Refuse latents made with another VAE than the one expected (stale latent caches)."""
    made_with = manifest["vae"]["fingerprint"]
    if made_with != fingerprint:
        raise InputError(
            f"{folder}: these latents were made with VAE {manifest['vae']['name']!r} (fingerprint {made_with}), "
            f"but this run uses fingerprint {fingerprint}. Re-encode with `latentmill encode --vae ...` into a new "
            f"folder, or use the VAE the latents were made with."
        )


def iter_latent_shard(
    path: str | Path, manifest: dict, errors: dict | None = None, stream=None, verify: bool = False
) -> Iterator[dict]:
    """Samples of one latent shard (a path or a URL), each checked against the manifest: shape
    (C, bucket_h/8, bucket_w/8), float16.

    Yields dicts with key, latent (and latent_std / latent_flip / text_emb when stored), caption, meta.
    A sample that fails a check raises InputError, or, when `errors` is given, is skipped and counted
    there (reason -> count); so is a damaged tar (what follows the damage is lost). `stream`: the shard's
    bytes already opened (a cached copy of a remote shard), read and closed here.

    `verify`: the shard's bytes are hashed as they stream and its samples held back until the digest
    matches the manifest's (curate/shardchecksum.py): a shard changed since encode wrote it, or one the
    manifest does not list, yields nothing (counted as checksum_mismatch / unlisted_shard, with a
    warning), or raises when `errors` is None.
    """
    channels = manifest["latent_channels"]
    factor = manifest["downsample_factor"]
    buckets = {tuple(b) for b in manifest["buckets"]}

    def finish(key, files):
        meta = json.loads(files.get("json", b"{}"))
        bucket = tuple(meta.get("bucket", ()))
        if bucket not in buckets:
            raise InputError(
                f"{path}: sample {key} has bucket {list(bucket)}, not in the manifest's bucket list."
            )
        sample = {"key": key, "caption": files.get("txt", b"").decode("utf-8"), "meta": meta}
        for name in ("latent", "latent_std", "latent_flip"):
            if f"{name}.npy" in files:
                expected = (channels, bucket[1] // factor, bucket[0] // factor)
                sample[name] = checked_npy(
                    files[f"{name}.npy"],
                    expected,
                    f"{path}: sample {key} {name}",
                    f"for bucket {list(bucket)} (manifest)",
                )
        if "mask.npy" in files:
            sample["mask"] = checked_npy(
                files["mask.npy"],
                (1, bucket[1] // factor, bucket[0] // factor),
                f"{path}: sample {key} mask",
                f"for bucket {list(bucket)} (manifest)",
            )
        variants = (manifest.get("inpainting") or {}).get("variants", 0)
        if variants:  # inpainting data: K masks and K masked latents, both required
            h, w = bucket[1] // factor, bucket[0] // factor
            for name, shape in (
                ("inpaint_mask", (variants, 1, h, w)),
                ("masked_latent", (variants, channels, h, w)),
            ):
                if f"{name}.npy" not in files:
                    raise InputError(
                        f"{path}: sample {key} has no {name}.npy (the manifest says {variants} variants)."
                    )
                sample[name] = checked_npy(
                    files[f"{name}.npy"], shape, f"{path}: sample {key} {name}", "(manifest)"
                )
        if "text_emb.npy" in files:
            expected = tuple((manifest.get("text_encoder") or {}).get("shape", ()))
            sample["text_emb"] = checked_npy(
                files["text_emb.npy"],
                expected,
                f"{path}: sample {key} text_emb",
                "(the manifest's text encoder shape)",
            )
        if "latent" not in sample:
            raise InputError(f"{path}: sample {key} has no latent.npy.")
        return sample

    def checked(key, files) -> dict | Exception:
        try:
            return finish(key, files)
        except (InputError, ValueError, OSError) as err:
            return err

    def passed(items) -> Iterator[dict]:
        """The samples; each one that failed a check raised, or counted in `errors`."""
        for item in items:
            if not isinstance(item, Exception):
                yield item
            elif errors is None:
                raise item
            else:
                reason = "bad_sample" if isinstance(item, InputError) else "unreadable_sample"
                errors[reason] = errors.get(reason, 0) + 1

    def samples(opened) -> Iterator[dict]:
        current, files = None, {}
        with tarfile.open(fileobj=opened, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current and current is not None:
                    yield checked(current, files)
                    files = {}
                current = key
                files[ext] = tar.extractfile(member).read()
        if current is not None:
            yield checked(current, files)

    expected = recorded(manifest, str(path).rsplit("/", 1)[-1].removesuffix(".tar")) if verify else None
    if expected == UNLISTED:
        _refuse_shard(path, errors, "unlisted_shard", "is not in the manifest's shard table")
        return
    try:
        with stream or open_stream(path) as opened:
            if expected is None:
                yield from passed(samples(opened))
                return
            reader = HashingReader(opened, *expected)
            held = list(samples(reader))  # nothing leaves before the whole shard is vouched for
            problem = reader.finish()
    except (tarfile.TarError, EOFError) as err:
        _refuse_shard(path, errors, "damaged_shard", f"is a damaged tar ({err})")
        return
    if problem:
        _refuse_shard(path, errors, "checksum_mismatch", f"changed since encode wrote it: {problem}")
        return
    yield from passed(held)


def _refuse_shard(path, errors: dict | None, reason: str, what: str) -> None:
    """A shard that must not be read: an InputError (errors is None), else counted under `reason` with a
    warning."""
    message = (
        f"{path} {what}. `latentmill latents verify` lists every damaged shard; re-encode the folder "
        f"(`latentmill encode`) to rewrite them."
    )
    if errors is None:
        raise InputError(message)
    errors[reason] = errors.get(reason, 0) + 1
    warn(f"{message} Skipped ({reason}); with `train --strict` it stops the run.")


def write_manifest(folder: Path, header: dict, shard_stats: dict[str, dict]) -> dict:
    """Aggregate the per-shard stats into `manifest.json` (per-bucket and per-shard counts, checksums)."""
    per_bucket: dict[str, int] = {}
    for stats in shard_stats.values():
        for bucket, count in stats["per_bucket"].items():
            per_bucket[bucket] = per_bucket.get(bucket, 0) + count
    manifest = header | {
        "samples": sum(s["written"] for s in shard_stats.values()),
        "per_bucket": dict(sorted(per_bucket.items())),
        "shards": {
            name: {"samples": s["written"]} | {k: s[k] for k in KINDS if k in s}
            for name, s in sorted(shard_stats.items())
        },
    }
    if any("empty_masks" in s for s in shard_stats.values()):  # loss masks zero everywhere (--alpha-mask)
        manifest["empty_masks"] = sum(s.get("empty_masks", 0) for s in shard_stats.values())
    write_json(folder / MANIFEST, manifest)
    return manifest
