"""Text states as their own shard set, keyed like the latents: `latentmill encode-text LATENTS -o STATES`.

For the families whose text encoders are their pipeline's own (SDXL, SD3, Flux), the states of each caption
(T5-XXL's alone are 512 x 4096 values) can be computed once instead of at every step: one `NAME.tar` per
latent shard `NAME.tar`, holding per sample `KEY.<tensor>.npy` (float16 by default) for each conditioning
tensor the family's pipeline makes (`prompt_embeds`, `pooled`, ...), in the latent shard's key order, and
`NAME.json` (the digest of the shard's keys and captions, the completion marker, written last). The folder's
`manifest.json` names the family, the text encoders, the T5 length and each tensor's shape and dtype;
`empty.safetensors` holds the empty caption's states (caption dropout). A shard whose captions changed is
encoded again; the latents are not touched. `train --text-states STATES` joins the two by key
(`TextStateShards.join`) and conditions on the stored states instead of running the encoders.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.errors import InputError
from latentmill.schema import StageConfig, opt
from latentmill.train.config import FAMILY_NAMES

FORMAT = "latentmill-text-states"
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
DTYPES = ("float16", "float32")


@dataclass(kw_only=True)
class TextStatesConfig(StageConfig):
    SECTION = "encode_text"
    RUNTIME = ("device", "batch_size")
    model: str = opt(
        help="The model the states are for: its pipeline folder or model id (its text encoders are run), or a "
        "tiny config (tiny-sdxl, tiny-sd3, tiny-flux: the tiny text encoders).",
        model=True,
    )
    text_encoder: str | None = opt(
        None, "A pipeline folder with the text encoders to run instead of --model's.", model=True
    )
    family: str | None = opt(None, "The model family (default: --model's).", choices=FAMILY_NAMES)
    max_sequence_length: int | None = opt(
        None, "T5 tokens per caption (default: the family's, as `train` uses: SD3 77, Flux 512).", low=1
    )
    dtype: str = opt("float16", "How the states are stored (float16: half the bytes).", choices=DTYPES)
    batch_size: int = opt(16, "Captions encoded at once.", low=1)
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")


def same_place(spec: str) -> str:
    """A model spec as compared: a local folder by its absolute path, anything else as given."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


def caption_digest(samples: list[tuple[str, str]]) -> str:
    """The digest of a shard's (key, caption) pairs, in order: what its text states were made from."""
    return hashlib.sha256(json.dumps(samples, ensure_ascii=False).encode()).hexdigest()


def _text_family(config: TextStatesConfig):
    from latentmill.train.families import family_of, infer_family
    from latentmill.train.families.pipelinetext import PipelineText

    family = family_of(config.family or infer_family(config.model))
    if not isinstance(family, PipelineText):
        raise InputError(
            f"encode-text --model {config.model}: the {family.name} family stores its caption states in the latent "
            f"shards (`latentmill encode --text-encoder`); text-state shards are for sdxl, sd3 and flux."
        )
    return family


def _captions(shard: str, manifest: dict) -> list[tuple[str, str]]:
    from latentmill.curate.latentshards import iter_latent_shard

    return [(s["key"], s["caption"]) for s in iter_latent_shard(shard, manifest, verify=True)]


def _write_tar(path: Path, keys: list[str], states: dict[str, np.ndarray]) -> None:
    """The states in key order, with fixed tar metadata (the same states, the same bytes)."""
    from latentmill.curate.npyio import npy_bytes

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(keys):
            for name in sorted(states):
                data = npy_bytes(np.ascontiguousarray(states[name][i]))
                info = tarfile.TarInfo(f"{key}.{name}.npy")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def encode_text_states(latents: str, output: str | Path, config: TextStatesConfig, progress=None) -> dict:
    """Text-state shards for every latent shard of `latents` into `output`; returns {shards, encoded,
    skipped, captions}. Resumable: a shard whose `NAME.json` records the same captions is kept."""
    import torch
    from safetensors.torch import save_file

    from latentmill.curate.latentshards import read_manifest
    from latentmill.curate.storage import atomic_path, remove_stale_temporaries, write_json
    from latentmill.devices import resolve_device_precision
    from latentmill.train.loader import expand_shards
    from latentmill.train.namedstates import Conditioning

    config.validate()
    family = _text_family(config)
    shards = expand_shards(latents)
    latent_manifest = read_manifest(Path(shards[0]).parent)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output, recursive=False)
    spec = family.text_spec(config)  # the fields `train` reads by the same names
    device, precision = resolve_device_precision(config.device, "auto")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pipe = family.text_pipeline(spec, device, dtype)
    max_tokens = family.max_sequence_length(pipe, config)

    def states(captions: list[str]) -> Conditioning:
        with torch.inference_mode():
            return family.encode_prompts(pipe, captions, device, max_tokens).float().cpu()

    empty = states([""])
    manifest = {
        "format": FORMAT,
        "version": 1,
        "family": family.name,
        "text_encoder": same_place(spec),
        "max_sequence_length": max_tokens,
        "tensors": {
            name: {"shape": shape, "dtype": config.dtype} for name, (shape, _) in empty.shapes().items()
        },
        "latents": str(Path(shards[0]).parent),
        "vae": latent_manifest.get("encode_config", {}).get("vae"),
    }
    _check_same_settings(output, manifest)
    with atomic_path(output / EMPTY) as tmp:
        save_file({name: t.contiguous() for name, t in empty.items()}, str(tmp))
    write_json(output / MANIFEST, manifest)
    totals = {"shards": len(shards), "encoded": 0, "skipped": 0, "captions": 0}
    np_dtype = np.float16 if config.dtype == "float16" else np.float32
    for shard in shards:
        name = Path(str(shard)).stem
        samples = _captions(shard, latent_manifest)
        digest = caption_digest(samples)
        marker = output / f"{name}.json"
        if marker.exists() and (output / f"{name}.tar").exists():
            if json.loads(marker.read_text()).get("captions_digest") == digest:
                totals["skipped"] += 1
                continue
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(samples), config.batch_size):
            batch = states([caption for _, caption in samples[start : start + config.batch_size]])
            for tensor_name, tensor in batch.items():
                parts.setdefault(tensor_name, []).append(tensor.numpy().astype(np_dtype))
            if progress:
                progress(batch.batch)
        arrays = {n: np.concatenate(p) for n, p in parts.items()}
        with atomic_path(output / f"{name}.tar") as tmp:
            _write_tar(tmp, [key for key, _ in samples], arrays)
        write_json(marker, {"captions_digest": digest, "count": len(samples), "shard": str(shard)})
        totals["encoded"] += 1
        totals["captions"] += len(samples)
    return totals


def _check_same_settings(output: Path, manifest: dict) -> None:
    path = output / MANIFEST
    if not path.exists():
        return
    old = json.loads(path.read_text())
    keys = ("family", "text_encoder", "max_sequence_length", "tensors")
    changed = [k for k in keys if old.get(k) != manifest[k]]
    if changed:
        raise InputError(
            f"{output}: its text states were made with other settings ({', '.join(f'{k}: {old.get(k)!r}' for k in changed)}"
            f"); give another -o, or remove the folder to make them again."
        )


class TextStateShards:
    """A text-state folder as `train --text-states` reads it: its manifest, the empty caption's states, and
    the states of each latent shard's samples, joined by key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise InputError(
                f"--text-states {folder}: no {MANIFEST}; make the folder with `latentmill encode-text LATENTS -o "
                f"{folder} --model MODEL`."
            )
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}: not valid JSON ({err}); make the folder again with `latentmill encode-text`."
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{path}: not a text-state manifest (format {self.manifest.get('format')!r}).")

    def check_fits(self, family: str, spec: str, shards: list[str]) -> None:
        """The states were made for this family with these text encoders, and cover every latent shard."""
        made = self.manifest
        if made["family"] != family:
            raise InputError(
                f"--text-states {self.folder}: states of the {made['family']} family's text encoders, and this run "
                f"trains {family}; make them with `latentmill encode-text` for its --model."
            )
        if same_place(made["text_encoder"]) != same_place(spec):
            raise InputError(
                f"--text-states {self.folder}: made with the text encoders of {made['text_encoder']}, and this run's "
                f"are {spec}'s; give --text-encoder {made['text_encoder']} or make the states again."
            )
        missing = [s for s in shards if not (self.folder / f"{Path(str(s)).stem}.json").exists()]
        if missing:
            raise InputError(
                f"--text-states {self.folder}: no states for {missing[0]}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; run `latentmill encode-text "
                f"{Path(str(missing[0])).parent} -o {self.folder} --model ...` (it encodes only what is missing)."
            )

    def empty(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.folder / EMPTY))

    def _states(self, shard: str) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        from latentmill.curate.npyio import checked_npy

        tensors = self.manifest["tensors"]
        path = self.folder / f"{Path(str(shard)).stem}.tar"
        current, files = None, {}
        try:
            with tarfile.open(path, "r|") as tar:
                for member in tar:
                    key, _, rest = member.name.partition(".")
                    name = rest.removesuffix(".npy")
                    if key != current and current is not None:
                        yield current, files
                        files = {}
                    current = key
                    if name not in tensors:
                        raise InputError(
                            f"{path}: sample {key} has {member.name}, not a tensor its manifest lists."
                        )
                    spec = tensors[name]
                    files[name] = checked_npy(
                        tar.extractfile(member).read(),
                        tuple(spec["shape"]),
                        f"{path}: sample {key} {name}",
                        "(manifest)",
                        dtype=spec["dtype"],
                    )
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InputError(
                f"{path}: cannot be read ({err}); make it again with `latentmill encode-text`."
            ) from None
        if current is not None:
            yield current, files

    def join(self, shard: str, samples: Iterator[dict]) -> Iterator[dict]:
        """The latent shard's samples, each with its `text_states` (the same key, the same order)."""
        states = self._states(shard)
        for sample in samples:
            for key, found in states:
                if key == sample["key"]:
                    sample["text_states"] = found
                    break
            else:
                raise InputError(
                    f"{self.folder}: no text states for sample {sample['key']} of {shard} (its captions changed "
                    f"since?); run `latentmill encode-text` again to bring the folder up to date."
                )
            yield sample
