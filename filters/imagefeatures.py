"""Image features for FID-style comparisons, and the image sets they are taken of.

Feature spaces (`--features`):
- `clip:MODEL[:PRETRAINED]`: an open_clip image tower's normalised embedding (FID in CLIP space, which
  follows human judgement better than Inception's; no extra weights beyond the CLIP model; `clip:tiny-rn`
  offline with random weights).
- `inception:WEIGHTS`: the standard FID: pytorch-fid's InceptionV3 (2048-d pool features) with its
  published weights file `pt_inception-2015-12-05-6726825d.pth`, given as a path (nothing is downloaded).
- `dinov2:FOLDER`: a transformers Dinov2Model folder (its CLS token).

Every image is resized to the extractor's square input the clean-fid way: the whole image (no crop), each
channel as a float image with PIL's antialiased bicubic filter, not rounded back to 8 bits, then scaled as
the extractor expects.

Image sets: a folder of image shards (`.tar`), a folder of pictures (png, jpg, webp), or a `.npz` of stored
statistics (`mu`, `sigma`, `space`). Statistics of a set are cached by the set's content and the space, so
re-evaluating against the same reference costs only the new images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.errors import InputError, warn

PICTURES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class FeatureSpace:
    spec: str
    size: int  # the square input side
    dim: int
    _embed: object  # list of PIL images -> (N, dim) numpy

    def features(self, images, batch: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch):
            chunk = [resized(im, self.size) for im in images[start : start + batch]]  # float32, 0-255
            out.append(np.asarray(self._embed(chunk), np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def resized(image, size: int) -> np.ndarray:
    """float32 (size, size, 3) in [0, 255]: the whole image, each channel resized as a float image with PIL's
    antialiased bicubic filter and not rounded back to 8 bits (clean-fid's "clean" resize)."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"), np.float32)
    channels = [
        np.asarray(Image.fromarray(pixels[..., c]).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


def _to_tensor(batch: list[np.ndarray], mean, std):
    import torch

    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def feature_space(spec: str, device: str = "cpu") -> FeatureSpace:
    kind, _, rest = spec.partition(":")
    if kind == "clip":
        return _clip_space(spec, rest or "tiny-rn", device)
    if kind == "inception":
        return _inception_space(spec, rest, device)
    if kind == "dinov2":
        return _dinov2_space(spec, rest, device)
    raise InputError(
        f"--features {spec!r}: use clip:MODEL[:PRETRAINED], inception:WEIGHTS_FILE or dinov2:FOLDER."
    )


def _clip_space(spec: str, rest: str, device: str) -> FeatureSpace:
    import torch

    from latentmill.filters.clip import load_clip

    name, _, pretrained = rest.partition(":")
    clip = load_clip(name, pretrained or None, device)
    normalize = next(t for t in clip.preprocess.transforms if type(t).__name__ == "Normalize")

    def embed(batch):
        return clip.embed_images(_to_tensor(batch, normalize.mean, normalize.std)).numpy()

    with torch.inference_mode():
        dim = embed([np.zeros((clip.image_size, clip.image_size, 3), np.uint8)]).shape[1]
    return FeatureSpace(spec, clip.image_size, dim, embed)


def _inception_space(spec: str, weights: str, device: str) -> FeatureSpace:
    import torch

    if not weights or not Path(weights).is_file():
        raise InputError(
            f"--features {spec}: the standard FID needs pytorch-fid's Inception weights as a file (nothing is "
            f"downloaded): fetch pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases and give "
            f"--features inception:/path/to/it; or use --features clip:MODEL, which needs no other weights."
        )
    model = inception_from_file(weights).to(device).eval()

    def embed(batch):
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().to(device) / 255
            return model(x)[:, :, 0, 0].cpu().numpy()

    return FeatureSpace(spec, 299, 2048, embed)


def inception_from_file(path: str):
    """pytorch-fid's FID InceptionV3 up to its 2048-d pool features, with the weights of `path` (the layout
    of pytorch-fid's published file). Input: (N, 3, 299, 299) in [0, 1], scaled to [-1, 1] as it does."""
    import pickle

    import torch

    net = _fid_inception_skeleton()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(
            f"{path}: not pytorch-fid's Inception weights ({str(err).splitlines()[0][:160]})."
        ) from None
    blocks = torch.nn.Sequential(*_blocks_of(net))

    class FidInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            return self.blocks(2 * x - 1)

    return FidInception()


def _fid_inception_skeleton():
    """The FID Inception network without weights (what pytorch-fid's fid_inception_v3 builds before it
    downloads its file)."""
    try:
        from pytorch_fid import inception as fid
    except ImportError:
        raise InputError("--features inception needs pytorch-fid: pip install 'latentmill[fid]'.") from None
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    return net


def _blocks_of(net):
    import torch

    return [
        torch.nn.Sequential(
            net.Conv2d_1a_3x3,
            net.Conv2d_2a_3x3,
            net.Conv2d_2b_3x3,
            torch.nn.MaxPool2d(kernel_size=3, stride=2),
        ),
        torch.nn.Sequential(
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(kernel_size=3, stride=2)
        ),
        torch.nn.Sequential(
            net.Mixed_5b,
            net.Mixed_5c,
            net.Mixed_5d,
            net.Mixed_6a,
            net.Mixed_6b,
            net.Mixed_6c,
            net.Mixed_6d,
            net.Mixed_6e,
        ),
        torch.nn.Sequential(
            net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))
        ),
    ]


def _dinov2_space(spec: str, folder: str, device: str) -> FeatureSpace:
    import torch

    try:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(folder, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as err:
        raise InputError(
            f"--features {spec}: no DINOv2 model found locally ({str(err).splitlines()[0][:120]}); give a "
            f"transformers Dinov2Model folder (e.g. facebook/dinov2-base, downloaded first)."
        ) from None
    size = 224

    def embed(batch):
        with torch.inference_mode():
            x = _to_tensor(batch, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to(device)
            return model(pixel_values=x).last_hidden_state[:, 0].float().cpu().numpy()

    return FeatureSpace(spec, size, int(model.config.hidden_size), embed)


# --- image sets and their cached statistics ----------------------------------------------------------


def load_images(spec: str) -> list:
    """The pictures of an image set: a folder of image shards or of picture files (RGB PIL images, in name
    order). Pictures that do not decode (undecodable, truncated, past the pixel bound) are skipped and
    counted as score skips them: one warning with the counts and the first file."""
    from collections import Counter

    from latentmill.curate.imageshards import ImageDecodeError, decode_image

    path = Path(spec)
    if not path.is_dir():
        raise InputError(f"{spec}: not a folder of images or image shards (nor a .npz of statistics).")
    shards = sorted(path.glob("*.tar"))
    if shards:
        from latentmill.curate.imageshards import iter_image_shard

        pictures = (
            (f"{shard.name}:{s.key}", s.image_bytes)
            for shard in shards
            for s in iter_image_shard(shard, key_order=True)
        )
    else:
        files = [p for p in sorted(path.iterdir()) if p.suffix.lower() in PICTURES and p.is_file()]
        pictures = ((p.name, p.read_bytes()) for p in files)
    images, skipped, first = [], Counter(), None
    for name, data in pictures:
        try:
            images.append(decode_image(data))
        except ImageDecodeError as err:
            skipped[err.reason] += 1
            first = first or f"{name} ({err.reason})"
    if skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        warn(
            f"{spec}: skipped {sum(skipped.values())} picture(s) that do not decode ({counts}; first: {first})."
        )
    if not images:
        raise InputError(f"{spec}: no images (image shards or {', '.join(PICTURES)} files that decode).")
    return images


def set_fingerprint(spec: str) -> str:
    """A digest of an image set's files (names and bytes): the cache key of its statistics."""
    import xxhash

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(spec).iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(xxhash.xxh3_128_hexdigest(file.read_bytes()).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("LATENTMILL_CACHE") or Path.home() / ".cache" / "latentmill") / "eval-stats"


def set_features(spec: str, space: FeatureSpace) -> tuple[np.ndarray | None, dict]:
    """(features, stats {mu, sigma, count, space}) of an image set; a `.npz` gives its stored statistics
    only (features None: no KID against it). Folders' statistics are cached by content and space."""
    from latentmill.curate.records import read_arrays

    if spec.endswith(".npz"):
        fix = "give the .npz that `latentmill eval` cached for the reference set, or the reference images"
        stored = read_arrays(spec, {"mu": 1, "sigma": 2, "count": 0, "space": 0}, fix=fix)
        check_statistics(spec, stored, fix)
        if str(stored["space"]) != space.spec:
            raise InputError(
                f"{spec}: statistics in feature space {str(stored['space'])!r}, not {space.spec!r}; compare "
                f"sets in one space (--features {str(stored['space'])})."
            )
        return None, {"mu": stored["mu"], "sigma": stored["sigma"], "count": int(stored["count"])}
    images = load_images(spec)
    key = hashlib.sha256(json.dumps([set_fingerprint(spec), space.spec, space.size]).encode()).hexdigest()[
        :24
    ]
    cached = cache_dir() / f"{key}.npz"
    if cached.exists():
        try:
            stored = read_arrays(cached, {"features": 2, "mu": 1, "sigma": 2})
            check_statistics(cached, stored, "")
            return stored["features"], {
                "mu": stored["mu"],
                "sigma": stored["sigma"],
                "count": len(stored["features"]),
            }
        except InputError as err:  # a cache: computed again (and written anew) rather than refused
            warn(f"{err} Computing the statistics again.")
    features = space.features(images)
    from latentmill.filters.frechet import statistics

    mu, sigma = statistics(features)
    save_statistics(cached, features, mu, sigma, space.spec)
    return features, {"mu": mu, "sigma": sigma, "count": len(features)}


def check_statistics(path, stored: dict, fix: str) -> None:
    """mu (d,) and sigma (d, d) of one dimension d, finite: what statistics() writes."""
    mu, sigma = stored["mu"], stored["sigma"]
    fix = fix or f"delete {path} (computed again)"
    if sigma.shape != (len(mu), len(mu)) or mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise InputError(
            f"{path}: mu {mu.shape} and sigma {sigma.shape} are not statistics of one space. Fix: {fix}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{path}: statistics that are not finite. Fix: {fix}.")


def save_statistics(path: Path, features, mu, sigma, space: str) -> None:
    from latentmill.curate.storage import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=features, mu=mu, sigma=sigma, count=len(features), space=space)
