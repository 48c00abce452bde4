"""One way to open a finished (or stopped) run for what comes after training: `sample`, `export`, `merge`
and `--init-from` all read a run's last checkpoint through `load_run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from latentmill.curate.records import read_record
from latentmill.curate.storage import is_remote, location
from latentmill.errors import InputError, warn
from latentmill.train.checkpoint import (
    LATENTS_MANIFEST,
    checkpoints,
    is_lora,
    latest_checkpoint,
    unet_kind,
    weights_needed,
)
from latentmill.train.runinputs import InputPaths, input_paths


@dataclass
class Run:
    path: Path
    checkpoint: Path  # its last intact checkpoint folder
    state: dict  # state.json: step, loader position, the TrainConfig it was trained with
    use_ema: bool
    paths: InputPaths = field(
        default=None
    )  # how the recorded input paths are found from where the run is now

    def __post_init__(self):
        if self.paths is None:
            self.paths = input_paths(self.path, self.state)

    @property
    def config(self) -> dict:
        """The settings it was trained with, each recorded path where it is now (train/runinputs.py)."""
        return self.paths.config(self.state["config"])

    @property
    def is_lora(self) -> bool:
        return is_lora(self.checkpoint)

    @property
    def adapter(self) -> dict:
        """A LoRA run's adapter.json: rank, alpha, targets, base, base_fingerprint (a textual-inversion run's
        frozen_unet.json: base, base_fingerprint)."""
        name = "frozen_unet.json" if unet_kind(self.checkpoint) == "frozen" else "adapter.json"
        record = self._record(name)
        return record | {"base": self.paths.find(record.get("base"))}

    def text_file(self, name: str) -> dict | None:
        """token.json or text_adapter.json where the run trained part of its text encoder, else None."""
        return self._record(name) if (self.checkpoint / name).exists() else None

    def _record(self, name: str, **fields) -> dict:
        fix = f"delete {self.checkpoint} to use the checkpoint before it, or train again"
        return read_record(self.checkpoint / name, fix=fix, fields=fields)

    def text_tensors(self, stem: str) -> dict:
        """embeddings or text_lora tensors (EMA or raw, as the run was opened)."""
        from safetensors.torch import load_file

        return load_file(self.checkpoint / f"{stem}{'_ema' if self.use_ema else ''}.safetensors")

    @property
    def weights_file(self) -> Path:
        if self.is_lora:
            return self.checkpoint / ("lora_ema.safetensors" if self.use_ema else "lora.safetensors")
        return self.checkpoint / ("ema.safetensors" if self.use_ema else "unet.safetensors")

    def adapter_weights(self) -> dict:
        """A LoRA run's adapter tensors (peft names: <module>.lora_A.weight, <module>.lora_B.weight)."""
        from safetensors.torch import load_file

        return load_file(self.weights_file)

    def weights(self, lora_scale: float = 1.0) -> dict:
        """The U-Net's weights; for a LoRA run, its base with the adapter baked in at `lora_scale`."""
        from safetensors.torch import load_file

        if unet_kind(self.checkpoint) == "frozen":
            return self.base_weights()
        if not self.is_lora:
            return load_file(self.weights_file)
        from latentmill.train.lora import merge_lora

        return merge_lora(self.base_weights(), self.adapter_weights(), self.adapter["alpha"], lora_scale)

    def base_weights(self, force: bool = True) -> dict:
        """A LoRA run's base U-Net weights (its --model folder, or its --init-from run's), checked against
        the fingerprint the adapter was trained on (`check_base`)."""
        adapter = self.adapter
        base = adapter["base"]
        if isinstance(base, str) and Path(base).is_absolute():  # a folder, not a model id: it must be there
            base = self.paths.require(
                base,
                "the base its weights were trained on",
                f"bake the adapter into it where it is now: `latentmill merge --lora {self.path} NEW_PLACE -o "
                f"BAKED`, then use BAKED",
            )
        if Path(base).is_dir() and checkpoints(Path(base)):
            state = load_run(base, True, "the adapter's base run").weights()
        else:
            from latentmill.train.families import family_of

            what = f"{self.path}: its LoRA adapter was trained on {base}, which is not"
            state = family_of(self.config.get("family")).pretrained(base, what).state_dict()
        self.check_base(state, base, force)
        return state

    def check_base(self, state: dict, name, force: bool) -> None:
        """U-Net weights `state` (named `name`) against the base the adapter records: a different base is an
        InputError naming both fingerprints, or with `force` a warning."""
        from latentmill.curate.fingerprints import weights_fingerprint

        found, trained = weights_fingerprint(state), self.adapter.get("base_fingerprint")
        if found == trained:
            return
        message = (
            f"{name}: not the weights the LoRA adapter in {self.path} was trained on (fingerprint {found}; "
            f"the adapter's base {self.adapter['base']} had {trained})."
        )
        if not force:
            raise InputError(
                f"{message} Baked in, it makes a model nobody trained: give the base it was trained on, or "
                f"--force to merge anyway."
            )
        warn(message)

    def unet_config(self) -> dict:
        return self._record("unet_config.json")

    def unet(self):
        """The denoiser, built by the run's family from the saved config, with the checkpoint's (EMA) weights."""
        from latentmill.train.families import family_of

        unet = family_of(self.config.get("family")).from_config(self.unet_config())
        unet.load_state_dict(self.weights())
        return unet.eval()

    def manifest(self) -> dict:
        """The manifest of the latents it was trained on (VAE, scaling, resolution; the first folder's for
        a mixture, the subject's for DreamBooth: they share them): the copy in the checkpoint, so that the
        run needs no latents to sample or export; a run from before the copy reads it from the latents."""
        import json

        copy = self.checkpoint / LATENTS_MANIFEST
        if copy.exists():
            manifest = read_record(copy, fix=f"delete {self.checkpoint} to use the checkpoint before it")
        else:
            from latentmill.curate.latentshards import read_manifest
            from latentmill.train.loader import expand_shards

            config = self.state["config"]
            source = (config.get("instance") or (config.get("shards") or [None])[0]) or ""
            if not is_remote(source) and not any(c in source for c in "{*?"):
                source = self.paths.require(
                    source, "the latent folder it trained on", "copy it back beside the run"
                )
            manifest = read_manifest(location(expand_shards([source])[0]).parent)
        encoded = dict(manifest.get("encode_config") or {})
        if encoded.get("vae"):
            encoded["vae"] = self.paths.find(encoded["vae"])
        return json.loads(json.dumps(manifest)) | {"encode_config": encoded}


def load_run(run: str | Path, use_ema: bool = True, what: str = "") -> Run:
    """The run's last intact checkpoint with the files sample/export/merge need; `what` names the option in
    messages (e.g. "--init-from")."""
    name = f"{what} {run}".strip()
    if is_remote(run):  # a run in an object store: its newest complete checkpoint, copied here
        from latentmill.train.remoterun import read_copy

        run = read_copy(str(run))
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{name}: not a run folder.")
    found = checkpoints(run)
    found = latest_checkpoint(run, weights_needed(use_ema, unet_kind(found[-1]) if found else "full"))
    if not found:
        raise InputError(
            f"{name}: no checkpoints. Train first (`latentmill train ... -o {run}`), or give a run "
            f"made by `latentmill merge`."
        )
    fix = f"delete {found} to use the checkpoint before it, or train again"
    return Run(run, found, read_record(found / "state.json", fix=fix, fields={"config": dict}), use_ema)


def init_from(unet, run: Path) -> None:
    """`train --init-from RUN`: the run's EMA weights into `unet`, which must have its architecture."""
    weights = load_run(run, use_ema=True, what="--init-from").weights()
    try:
        unet.load_state_dict(weights)
    except RuntimeError as err:
        raise InputError(
            f"--init-from {run}: its U-Net does not match --model's "
            f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})."
        ) from None
