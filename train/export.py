"""Export a run as a diffusers `StableDiffusionPipeline` folder (EMA weights by default), or a LoRA run's
adapter as the file diffusers or kohya-style tools load."""

from __future__ import annotations

from pathlib import Path

from latentmill.errors import InputError


def export_pipeline(
    run: str | Path, output: str | Path, use_ema: bool = True, vae: str | None = None
) -> Path:
    """Write `output` so that `StableDiffusionPipeline.from_pretrained(output)` loads and runs."""
    output = Path(output)
    pipeline_of_run(run, use_ema, vae).save_pretrained(output)
    return output


def export_single_file(run: str | Path, output: Path, use_ema: bool = True, vae: str | None = None) -> Path:
    """The whole model (U-Net, VAE, text encoder) as one .safetensors file in the original Stable
    Diffusion layout (train/singlefile.py), what A1111, ComfyUI and diffusers' `from_single_file` load."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from latentmill.curate.storage import atomic_path
    from latentmill.train.singlefile import to_single_file

    pipeline = pipeline_of_run(run, use_ema, vae)
    sd = StableDiffusionPipeline | StableDiffusionInpaintPipeline | StableDiffusionXLPipeline
    if not isinstance(pipeline, sd):
        raise InputError(
            f"--format single-file: {run} is a {type(pipeline).__name__}; the single-file layout latentmill "
            f"writes is Stable Diffusion's and SDXL's. Export it as a pipeline folder (--format pipeline) or its LoRA."
        )
    target = export_target(Path(run), output, "single-file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        second = getattr(pipeline, "text_encoder_2", None)  # SDXL's CLIP-G
        save_file(to_single_file(pipeline.unet, pipeline.vae, pipeline.text_encoder, second), str(tmp))
    return target


def pipeline_of_run(run: str | Path, use_ema: bool = True, vae: str | None = None):
    """A run as its family's diffusers pipeline (train/families: StableDiffusionPipeline,
    StableDiffusion3Pipeline, FluxPipeline), with the VAE the latents were made with, or `vae`."""
    from latentmill.train.families import family_of
    from latentmill.train.runs import load_run

    loaded = load_run(Path(run), use_ema)
    return family_of(loaded.config.get("family")).pipeline(loaded, vae)


def export_format(format: str, lora: bool, token: bool = False) -> str:
    """`auto` resolved: the adapter file (diffusers) for a LoRA run, the embedding files for textual
    inversion alone, else a pipeline folder."""
    if format != "auto":
        return format
    return "diffusers" if lora else "embedding" if token else "pipeline"


def export_target(run: Path, output: Path, format: str) -> Path:
    """What an export writes, and what shows it done: the pipeline's model_index.json, diffusers' LoRA
    file in OUTPUT, or kohya's or the single file (OUTPUT if it ends in .safetensors, else
    OUTPUT/RUN_NAME.safetensors)."""
    from latentmill.train.lora import DIFFUSERS_FILE

    if format == "pipeline":
        return output / "model_index.json"
    if format == "diffusers":
        return output / DIFFUSERS_FILE
    if format == "embedding":
        from latentmill.train.textexport import DIFFUSERS_EMBEDDINGS

        return output / DIFFUSERS_EMBEDDINGS
    return output if output.suffix == ".safetensors" else output / f"{run.name}.safetensors"


def check_output(run: Path, output: Path, format: str, overwrite: bool) -> None:
    """Before any work: -o that is a file where a folder is written, or an existing file, refused."""
    target = export_target(run, output, format)
    if output.exists() and not output.is_dir() and target != output:
        raise InputError(
            f"-o {output}: a file, and --format {format} writes a folder; give a folder (or, for one file, a name "
            f"ending in .safetensors)."
        )
    if target.exists() and not target.is_dir() and target.suffix == ".safetensors" and not overwrite:
        raise InputError(f"-o {output}: {target} exists. Give --overwrite to replace it, or another -o.")
    if target.is_dir():
        raise InputError(f"-o {output}: {target} is a folder; give another -o.")


def export_run(
    run: str | Path,
    output: str | Path,
    format: str = "auto",
    use_ema: bool = True,
    vae=None,
    overwrite: bool = False,
) -> Path:
    """`latentmill export`: a pipeline folder, or for a LoRA run (by default) its adapter file. The run
    and the output may be in an object store (read from a local copy; written locally, then sent)."""
    from latentmill.curate.storage import is_remote
    from latentmill.train.runs import load_run

    if is_remote(run):
        from latentmill.train.remoterun import read_copy

        run = read_copy(str(run))
    if is_remote(output):
        return _export_to_store(run, output, format, use_ema, vae)

    loaded = load_run(run, use_ema)
    format = export_format(format, loaded.is_lora, bool(loaded.text_file("token.json")))
    check_output(Path(run), Path(output), format, overwrite)
    if format == "embedding":
        from latentmill.train.textexport import export_embeddings

        return export_embeddings(loaded, Path(output))
    if format == "pipeline":
        return export_pipeline(run, output, use_ema, vae)
    if format == "single-file":
        return export_single_file(run, Path(output), use_ema, vae)
    if not loaded.is_lora:
        raise InputError(
            f"--format {format}: {run} trained the whole U-Net, not a LoRA adapter; export it as a "
            f"pipeline (--format pipeline), or train with --lora-rank."
        )
    return export_lora(loaded, Path(output), format)


def _export_to_store(run, output, format: str, use_ema: bool, vae):
    from latentmill.curate.scratch import temporary_folder
    from latentmill.curate.storage import location, publish_folder, upload

    output = location(output)
    with temporary_folder(f"export to {output}") as folder:
        local = folder / output.name
        made = export_run(run, local, format, use_ema, vae, overwrite=True)
        if local.is_dir():
            publish_folder(local, output, last=("model_index.json", "lineage.json"))
        else:
            upload(made, output)
            return output
        return output / made.relative_to(local) if made != local else output


def export_lora(loaded, output: Path, format: str) -> Path:
    """The adapter in diffusers' or kohya's format at `export_target`; written to a temporary name, then
    renamed."""
    from safetensors.torch import save_file

    from latentmill.curate.storage import atomic_path
    from latentmill.train.families import family_of
    from latentmill.train.lora import kohya_metadata, to_diffusers, to_kohya

    family = family_of(loaded.config.get("family"))
    adapter, tensors = loaded.adapter, loaded.adapter_weights()
    target = export_target(loaded.path, output, format)
    text = loaded.text_file("text_adapter.json")  # the text encoder's adapters go in the same file
    text_tensors = {}
    if text:
        from latentmill.train.textexport import text_lora_keys

        text_tensors = text_lora_keys(loaded.text_tensors("text_lora"))  # text_model.encoder.layers...
    # made before anything is written: a layout the family has not refuses with nothing left behind
    if format == "diffusers":
        out = to_diffusers(tensors, adapter["alpha"], prefix=family.lora_prefix)
        if text:
            out |= to_diffusers(text_tensors, text["alpha"], prefix="text_encoder")
        metadata = {"format": "pt"}
    else:
        out = family.kohya_lora(tensors, adapter["alpha"], loaded)
        if text:
            out |= to_kohya(text_tensors, text["alpha"], prefix="lora_te_")
        metadata = kohya_metadata(adapter["rank"], adapter["alpha"], adapter["base"])
    if loaded.text_file("token.json"):  # pivotal tuning: the token's files beside the adapter's
        from latentmill.train.textexport import export_embeddings

        export_embeddings(loaded, target.parent)
    with atomic_path(target) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    return target
    with atomic_path(target) as tmp:
        save_file(
            family.kohya_lora(tensors, adapter["alpha"], loaded)
            | (to_kohya(text_tensors, text["alpha"], prefix="lora_te_") if text else {}),
            str(tmp),
            metadata=kohya_metadata(adapter["rank"], adapter["alpha"], adapter["base"]),
        )
    return target
