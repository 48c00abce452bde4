"""A run works from any directory and as a copied or moved folder: `sample`, `export`, `merge`, `eval`,
`--init-from` and `--resume` find what the run recorded (train/runinputs.py)."""

import json
import shutil

import pytest

from latentmill.curate.encode import EncodeConfig, encode
from tests.conftest import Cli, image_entry, make_shard, tiny_clip_text_pipeline


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work folder trained in as a user does, every path relative to it: latents/, text/ (a tiny CLIP
    pipeline), runs/full (a full run) and base/ (its export), runs/lora (a LoRA run on base/)."""
    import os

    root = tmp_path_factory.mktemp("portable") / "work"
    (root / "images").mkdir(parents=True)
    make_shard(
        root / "images" / "00000.tar", [image_entry(f"0000{i:04d}", 128, 128, seed=i) for i in range(8)]
    )
    encode(root / "images", root / "latents", EncodeConfig(resolution=64, vae="tiny", bucket_min_side=64))
    tiny_clip_text_pipeline(root / "text")
    common = ["--text-encoder", "text", "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "2"]
    here = os.getcwd()
    os.chdir(root)
    try:
        run_cli = Cli()
        for args in (
            ["train", "latents", "-o", "runs/full", "--model", "tiny", "--steps", "2", *common],
            ["export", "runs/full", "-o", "base"],
            [
                "train",
                "latents",
                "-o",
                "runs/lora",
                "--model",
                "base",
                "--lora-rank",
                "2",
                "--steps",
                "2",
                *common,
            ],
        ):
            result = run_cli(*args)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(here)
    return root


def test_a_run_records_its_inputs_absolute_and_its_own_place(work):
    state = json.loads((work / "runs" / "lora" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["written_at"] == str((work / "runs" / "lora").resolve())
    assert state["config"]["shards"] == [str((work / "latents").resolve())]
    assert state["config"]["model"] == str((work / "base").resolve())
    assert state["config"]["text_encoder"] == str((work / "text").resolve())
    adapter = json.loads(
        (work / "runs" / "lora" / "checkpoints" / "step-0000002" / "adapter.json").read_text()
    )
    assert adapter["base"] == str((work / "base").resolve())
    manifest = json.loads(
        (work / "runs" / "full" / "checkpoints" / "step-0000002" / "latents.json").read_text()
    )
    assert manifest == json.loads((work / "latents" / "manifest.json").read_text())


def test_sample_export_merge_eval_and_init_from_work_from_another_directory(
    work, tmp_path, run_cli, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    runs = work / "runs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\na bowl of fruit\n")
    for args in (
        ["sample", runs / "full", "--prompt", "a lighthouse", "--sampler-steps", "2", "-o", "g0.png"],
        ["sample", runs / "lora", "--prompt", "a lighthouse", "--sampler-steps", "2", "-o", "g1.png"],
        ["export", runs / "full", "-o", "exported"],
        ["export", runs / "lora", "-o", "lora-file"],
        ["merge", "--lora", runs / "lora", "-o", "baked"],
        ["eval", runs / "full", "--prompts", prompts, "--count", "2", "--sampler-steps", "2", "--clip-model",
         "tiny-rn", "--reference", work / "images", "--features", "clip:tiny", "--kid-only", "-o", "eval.json"],
        ["train", work / "latents", "-o", "again", "--init-from", runs / "lora", "--model", "tiny",
         "--text-encoder", work / "text", "--steps", "1", "--batch-size", "4"],
    ):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "g0.png").exists() and (tmp_path / "exported" / "model_index.json").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["clip_score"] is not None


def test_a_moved_work_folder_and_a_copied_run_sample_export_and_resume(work, tmp_path, run_cli, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    # the original away: what the runs recorded is only found beside them now
    hidden = work.with_name("work-hidden")
    work.rename(hidden)
    try:
        monkeypatch.chdir(tmp_path)
        for args in (
            ["sample", moved / "runs" / "lora", "--prompt", "a dog", "--sampler-steps", "2", "-o", "m.png"],
            ["export", moved / "runs" / "full", "-o", "m-export"],
            ["train", moved / "latents", "-o", moved / "runs" / "lora", "--model", moved / "base", "--lora-rank",
             "2", "--steps", "4", "--text-encoder", moved / "text", "--batch-size", "4", "--log-every", "1",
             "--checkpoint-every", "2", "--resume"],
        ):  # fmt: skip
            result = run_cli(*args)
            assert result.exit_code == 0, (args, result.output)
        state = json.loads(
            (moved / "runs" / "lora" / "checkpoints" / "step-0000004" / "state.json").read_text()
        )
        assert state["written_at"] == str((moved / "runs" / "lora").resolve())
    finally:
        hidden.rename(work)
    # a run copied on its own, its inputs where they were: a copy of the run samples like the original
    alone = tmp_path / "alone"
    shutil.copytree(work / "runs" / "full", alone)
    result = run_cli("sample", alone, "--prompt", "a cat", "--sampler-steps", "2", "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.output


def test_a_missing_input_names_what_was_recorded_and_how_to_point_to_it(work, tmp_path, run_cli):
    copy = tmp_path / "lora"
    shutil.copytree(work / "runs" / "lora", copy)  # beside it no base/: only the recorded one, moved away
    base, away = work / "base", work.with_name("base-away")
    base.rename(away)
    try:
        result = run_cli(
            "sample", copy, "--prompt", "a dog", "--sampler-steps", "2", "-o", tmp_path / "x.png"
        )
    finally:
        away.rename(base)
    recorded = str(base.resolve())
    assert result.exit_code == 2, result.output
    assert f"was recorded as {recorded}" in result.output and "content fingerprint" in result.output
    assert f"latentmill merge --lora {copy} NEW_PLACE" in result.output
