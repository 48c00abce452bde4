"""Sampling people expect: diffusers' schedulers by name, per-prompt seeds, each image's prompt and seed
under it, and `sample --to-folder` keeping one set per index (adds with --add, replaces otherwise)."""

import json

import numpy as np
import pytest
from PIL import Image

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.train.config import TrainConfig
from latentmill.train.loop import train
from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny full run of 2 steps on 64 px latents, and its export (root/export)."""
    from latentmill.train.export import export_run

    root = tmp_path_factory.mktemp("sampling")
    (root / "images").mkdir()
    make_shard(root / "images" / "00000.tar", [image_entry(f"0000{i:04d}", 96, 96, seed=i) for i in range(8)])
    encode(root / "images", root / "latents", EncodeConfig(resolution=64, vae="tiny", bucket_min_side=64))
    tiny_clip_text_pipeline(root / "text")
    config = TrainConfig(
        shards=[str(root / "latents")], output=str(root / "run"), model="tiny", text_encoder=str(root / "text"),
        steps=2, batch_size=4, checkpoint_every=2, sample_every=2, sample_steps=2, sample_sampler="euler",
        sample_prompts=["a red circle", "a blue square"],
    )  # fmt: skip
    train(config)
    export_run(root / "run", root / "export")
    return root


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("method", ["ddim", "euler", "dpm++2m-karras", "unipc"])
def test_each_sampler_is_diffusers_scheduler_as_the_exported_pipeline_runs_it(run, method):
    import torch
    from diffusers import StableDiffusionPipeline

    from latentmill.train.sampling import sampler
    from latentmill.train.schedule import with_sampler

    ours = sampler(run / "run", method=method)(["a red circle"], 0, 4, 5.0, (64, 64), seeds=[3])[0]
    pipe = StableDiffusionPipeline.from_pretrained(run / "export", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = with_sampler(pipe.scheduler, method)
    theirs = pipe(
        "a red circle", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
        generator=[torch.Generator().manual_seed(3)], output_type="np",
    ).images[0]  # fmt: skip
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    assert (
        type(pipe.scheduler).__name__
        == {
            "ddim": "DDIMScheduler",
            "euler": "EulerDiscreteScheduler",
            "dpm++2m-karras": "DPMSolverMultistepScheduler",
            "unipc": "UniPCMultistepScheduler",
        }[method]
    )
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2


def test_samplers_differ_euler_ancestral_is_seeded_and_a_flow_only_name_is_refused(run, tmp_path, run_cli):
    from latentmill.train.sampling import sampler

    images = {
        method: sampler(run / "run", method=method)(["a red circle"], 0, 4, 5.0, None, seeds=[1])[0]
        for method in ("ddim", "euler", "euler-a")
    }
    assert not np.array_equal(images["ddim"], images["euler"])
    again = sampler(run / "run", method="euler-a")(["a red circle"], 0, 4, 5.0, None, seeds=[1])[0]
    assert np.array_equal(images["euler-a"], again)
    bad = run_cli("sample", run / "run", "--prompt", "x", "--sampler", "heun", "-o", tmp_path / "x.png")
    assert bad.exit_code == 2 and "--sampler" in bad.output


def test_a_grid_has_a_row_per_prompt_with_prompt_and_seed_and_a_row_does_not_depend_on_the_others(
    run, tmp_path, run_cli
):
    from latentmill.train.sampling import grid_captions

    both = run_cli(
        "sample", run / "run", "--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "3,7",
        "--count", "2", "--sampler-steps", "2", "-o", tmp_path / "both.png",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    alone = run_cli(
        "sample", run / "run", "--prompt", "a blue square", "--seed", "7", "--count", "2", "--sampler-steps", "2",
        "-o", tmp_path / "alone.png",
    )  # fmt: skip
    assert alone.exit_code == 0, alone.output
    assert grid_captions(tmp_path / "both.png") == [
        {"prompt": "a red circle", "seed": 3},
        {"prompt": "a red circle", "seed": 4},
        {"prompt": "a blue square", "seed": 7},
        {"prompt": "a blue square", "seed": 8},
    ]
    grid, single = _pixels(tmp_path / "both.png"), _pixels(tmp_path / "alone.png")
    row = single.shape[0]  # one row: 64 px of images and the caption band under them
    assert grid.shape == (2 * row, 128, 3)
    assert np.array_equal(grid[row : row + 64], single[:64])  # the blue square's images, pixel for pixel
    assert (grid[64:row] < 128).any()  # the caption's text is drawn in the band
    wrong = run_cli(
        "sample", run / "run", "--prompt", "a", "--prompt", "b", "--seeds", "1", "-o", tmp_path / "w.png"
    )
    assert wrong.exit_code == 2 and "one per prompt" in wrong.output


def test_training_grids_use_the_sample_sampler_and_record_prompts_and_seeds(run):
    from latentmill.train.sampling import grid_captions

    grid = run / "run" / "samples" / "step-0000002.png"
    assert grid_captions(grid) == [
        {"prompt": "a red circle", "seed": 0},
        {"prompt": "a blue square", "seed": 1},
    ]


def test_to_folder_adds_with_add_replaces_otherwise_and_pack_reads_the_index(run, tmp_path, run_cli):
    folder = tmp_path / "class"
    source = run / "export"

    def sample(*args):
        result = run_cli("sample", source, "--sampler-steps", "2", "--width", "64", "--height", "64", *args)
        assert result.exit_code == 0, result.output
        return result.output

    def index():
        return json.loads((folder / ".latentmill-samples.json").read_text())

    sample("--prompt", "a dog", "--count", "3", "--to-folder", folder)
    sample("--prompt", "a puppy", "--count", "2", "--to-folder", folder, "--add")
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    files = index()["files"]
    assert [files[f"{i:06d}"]["prompt"] for i in range(5)] == ["a dog"] * 3 + ["a puppy"] * 2
    assert [files[f"{i:06d}"]["seed"] for i in range(5)] == [0, 1, 2, 0, 1]
    assert "(0 made now)" in sample("--prompt", "a puppy", "--count", "2", "--to-folder", folder, "--add")
    assert len(index()["sets"]) == 2  # the same set again is continued, not added twice

    # a file of the index is what `sample` draws from its prompt and seed alone
    again = tmp_path / "again.png"
    sample("--prompt", "a puppy", "--seed", "1", "-o", again)
    alone, batched, other = (
        _pixels(p).astype(int) for p in (again, folder / "000004.png", folder / "000003.png")
    )  # (batched beside another image, the same noise; float sums of a batch of two may round apart)
    assert np.abs(alone[:64, :64] - batched).max() <= 2 < np.abs(other - batched).max()

    # without --add the folder holds the new set alone: no dogs or puppies left beside the cats
    sample("--prompt", "a photo of a cat", "--count", "2", "--to-folder", folder)
    assert sorted(p.name for p in folder.glob("0*")) == [
        "000000.png",
        "000000.txt",
        "000001.png",
        "000001.txt",
    ]
    assert {f["prompt"] for f in index()["files"].values()} == {"a photo of a cat"} and len(
        index()["sets"]
    ) == 1

    Image.new("RGB", (64, 64)).save(folder / "stray.png")  # not the sampler's: not packed
    packed = run_cli("images", "pack", folder, "-o", tmp_path / "packed")
    assert packed.exit_code == 0, packed.output
    from latentmill.curate.pack import pack_images

    totals = pack_images(folder, tmp_path / "packed")
    assert totals["packed"] == 2 and totals["dropped"] == {"not_in_sample_index": 1}
