"""The model-family seam (train/families): the config names every family, a run records its family, and
what reads a run (sample, export, eval) builds the model through it."""

import json
from pathlib import Path

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


FIXTURES = Path(__file__).parent / "fixtures"
PRESEAM_RUNS = {"epsilon": {}, "v": {"prediction": "v_prediction", "noise_offset": 0.1}}


def machine() -> dict:
    """What float results depend on: the torch build and the CPU's vector instructions."""
    import os
    import platform

    import torch

    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return {"torch": torch.__version__, "arch": platform.machine(), "vector": vector, "cores": os.cpu_count()}


def _preseam_inputs(root: Path) -> None:
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import SMALL_ENCODE, small_image_shards, tiny_clip_text_pipeline

    small_image_shards(root / "images", shards=2, per_shard=4)
    encode(root / "images", root / "latents", EncodeConfig(**SMALL_ENCODE))
    tiny_clip_text_pipeline(root / "text")


def test_a_unet_run_gives_the_weights_the_code_before_the_family_seam_gave(tmp_path):
    """tests/fixtures/preseam_unet.json holds what latentmill made before train/families existed, on these
    inputs: the weights' fingerprint after 3 steps (epsilon; v-prediction with a noise offset) and the losses.
    On the machine it was made on (the same torch, the same vector instructions) the weights are
    bit-identical; elsewhere float results may differ in the last bits, and the losses are compared."""

    import torch

    recorded = json.loads((FIXTURES / "preseam_unet.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(recorded["threads"])  # float sums depend on it; an earlier test may have changed it
    try:
        _preseam_inputs(tmp_path)
        _compare_preseam_runs(tmp_path, recorded)
    finally:
        torch.set_num_threads(threads)


def _compare_preseam_runs(tmp_path: Path, recorded: dict) -> None:
    from safetensors.torch import load_file

    from latentmill.curate.fingerprints import weights_fingerprint
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train

    for name, extra in PRESEAM_RUNS.items():
        run = tmp_path / f"run-{name}"
        train(TrainConfig(shards=str(tmp_path / "latents"), output=str(run), model="tiny", text_encoder=str(tmp_path / "text"),
                          batch_size=4, steps=3, learning_rate=1e-3, warmup_steps=1, checkpoint_every=3, log_every=1,
                          **extra))  # fmt: skip
        weights = load_file(next((run / "checkpoints").iterdir()) / "unet.safetensors")
        losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
        if recorded["machine"] == machine():
            assert weights_fingerprint(weights) == recorded["runs"][name]["fingerprint"], name
            assert losses == recorded["runs"][name]["losses"], name
        else:
            assert losses == pytest.approx(recorded["runs"][name]["losses"], rel=1e-4), name
