"""The model-family seam (train/families): the config names every family, a run records its family, and
what reads a run (sample, export, eval) builds the model through it."""

import json

import pytest


def test_the_config_names_every_family_and_an_unknown_one_is_refused():
    from latentmill.errors import InputError
    from latentmill.train.config import FAMILY_NAMES
    from latentmill.train.families import FAMILIES, family_of

    assert FAMILY_NAMES == tuple(FAMILIES)
    assert family_of(None) is FAMILIES["sd-unet"]  # runs from before families were recorded
    with pytest.raises(InputError, match="not one latentmill trains"):
        family_of("sd-9")


def test_a_run_records_its_family_and_is_read_back_through_it(tmp_path, run_cli):
    from latentmill.curate.encode import EncodeConfig, encode
    from latentmill.train.config import TrainConfig
    from latentmill.train.families import family_of
    from latentmill.train.loop import train
    from latentmill.train.runs import load_run
    from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

    (tmp_path / "images").mkdir()
    make_shard(
        tmp_path / "images" / "00000.tar", [image_entry(f"{i:09d}", 128, 128, seed=i) for i in range(4)]
    )
    encode(tmp_path / "images", tmp_path / "latents", EncodeConfig(vae="tiny", resolution=128))
    tiny_clip_text_pipeline(tmp_path / "pipeline")
    run = tmp_path / "run"
    train(TrainConfig(shards=[str(tmp_path / "latents")], output=str(run), model="tiny", batch_size=2, steps=1,
                      checkpoint_every=1, text_encoder=str(tmp_path / "pipeline")))  # fmt: skip
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert json.loads((checkpoint / "state.json").read_text())["config"]["family"] == "sd-unet"
    loaded = load_run(run)
    assert (
        type(loaded.unet()).__name__ == type(family_of("sd-unet").from_config(loaded.unet_config())).__name__
    )
    wrong = run_cli(
        "train", tmp_path / "latents", "-o", tmp_path / "r2", "--model", "tiny", "--family", "sd-9"
    )
    assert wrong.exit_code == 2 and "sd-unet" in wrong.output
