"""`latentmill sample --to-folder`: images as folder/NNNNNN.png with their prompt in NNNNNN.txt, what
`latentmill images pack` reads (DreamBooth's class images).

The folder holds sets, a set being one call's prompts, count and settings. A call replaces the folder's
sets with its own (the old files removed first), or with `add` puts its set after them; a call whose set
is already there continues it (a stopped call, run again, keeps what it made and makes the rest). The
index beside the images (.latentmill-samples.json) says which set, prompt and seed made each file; image
k of a set is drawn from seed + k alone, so `latentmill sample --prompt P --seed S` draws it again. Files
this command did not write are never taken as its own, nor overwritten."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from latentmill.curate.pack import SAMPLE_INDEX
from latentmill.errors import InputError

FORMAT = "latentmill-samples/2"
_REPLACING = ".latentmill-replacing"  # the replaced set's files while they are removed


def sample_to_folder(
    source: str | Path,
    prompts: list[str],
    folder: str | Path,
    count: int = 1,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    batch_size: int = 4,
    progress=None,
    text_encoder: str | None = None,
    negative: str = "",
    add: bool = False,
    method: str | None = None,
) -> tuple[int, int]:
    """`count` images of each prompt into `folder` (see the module); returns (images of this set in the
    folder, images made by this call)."""
    from latentmill.curate.lineage import model_fingerprint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / _REPLACING, ignore_errors=True)  # a replacement killed midway: finish removing
    index = _read_index(folder)
    settings = [model_fingerprint(str(source)), steps, guidance, list(size or []), negative, method]
    jobs = [prompt for prompt in prompts for _ in range(count)]
    set_id = _digest([*settings, jobs, seed])
    sets = {s["id"]: s for s in index["sets"]}
    if set_id not in sets:
        first = 0 if not add else 1 + max((int(n) for n in index["files"]), default=-1)
        sets[set_id] = {"id": set_id, "first": first, "prompts": list(prompts), "count": count, "seed": seed}
        sets[set_id] |= {"source": str(source), "steps": steps, "guidance": guidance, "negative": negative}
        sets[set_id] |= {"sampler": method or "default"}
    if not add:  # the folder holds this set alone: every other set's files go first
        _remove_sets(folder, index, keep=set_id)
    index["sets"] = [s for s in sets.values() if s["id"] == set_id or add]
    first = sets[set_id]["first"]
    names = [f"{first + k:06d}" for k in range(len(jobs))]
    foreign = [n for n in names if (folder / f"{n}.png").exists() and n not in index["files"]]
    if foreign:
        raise InputError(
            f"{folder}: {foreign[0]}.png was not written by `latentmill sample`; give an empty folder (or one "
            f"this command filled) to --to-folder."
        )
    _write_index(folder, index)
    make, made = None, 0
    for start in range(0, len(jobs), batch_size):
        chunk = range(start, min(start + batch_size, len(jobs)))
        wanted = {k: _digest([*settings, jobs[k], seed + k]) for k in chunk}
        todo = [
            k
            for k in chunk
            if (index["files"].get(names[k]) or {}).get("key") != wanted[k]
            or not (folder / f"{names[k]}.png").exists()
        ]
        if todo:
            from latentmill.train.sampling import sampler

            make = make or sampler(source, text_encoder=text_encoder, negative=negative, method=method)
            images = make(
                [jobs[k] for k in todo], seed, steps, guidance, size, seeds=[seed + k for k in todo]
            )
            for k, image in zip(todo, images, strict=True):
                _write_image(folder, names[k], jobs[k], image)
                index["files"][names[k]] = {
                    "set": set_id,
                    "key": wanted[k],
                    "prompt": jobs[k],
                    "seed": seed + k,
                }
                made += 1
            _write_index(folder, index)
        if progress:
            progress(len(chunk))
    return len(jobs), made


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _read_index(folder: Path) -> dict:
    """The folder's index; one from before sets ({name: key}) counts as one set that no call continues."""
    from latentmill.curate.records import read_optional

    path = folder / SAMPLE_INDEX
    fix = f"delete {path} and the images beside it, or give another --to-folder"
    found = read_optional(path, fix=fix) or {}
    if found.get("format") == FORMAT:
        return {
            "format": FORMAT,
            "sets": list(found.get("sets") or []),
            "files": dict(found.get("files") or {}),
        }
    files = {name: {"set": "earlier", "key": key} for name, key in found.items() if isinstance(key, str)}
    sets = [{"id": "earlier", "first": 0}] if files else []
    return {"format": FORMAT, "sets": sets, "files": files}


def _write_index(folder: Path, index: dict) -> None:
    from latentmill.curate.storage import write_json

    write_json(folder / SAMPLE_INDEX, index)


def _remove_sets(folder: Path, index: dict, keep: str) -> None:
    """Every file of the sets but `keep` out of the folder, first moved aside together (then the index
    without them is written, then they are deleted): a folder never shows two sets mixed."""
    gone = [name for name, entry in index["files"].items() if entry.get("set") != keep]
    if not gone:
        return
    aside = folder / _REPLACING
    aside.mkdir(exist_ok=True)
    for name in gone:
        for suffix in (".png", ".txt"):
            if (folder / f"{name}{suffix}").exists():
                (folder / f"{name}{suffix}").rename(aside / f"{name}{suffix}")
        del index["files"][name]
    _write_index(folder, index)
    shutil.rmtree(aside)


def _write_image(folder: Path, name: str, prompt: str, image) -> None:
    from PIL import Image

    from latentmill.curate.storage import atomic_path

    (folder / f"{name}.txt").write_text(prompt + "\n")
    with atomic_path(folder / f"{name}.png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
