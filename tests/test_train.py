"""The streaming U-Net trainer on CPU with a tiny model."""

import json
import subprocess
import sys

import pytest

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError, LatentmillWarning
from latentmill.train.config import TrainConfig
from latentmill.train.loader import LatentLoader, expand_shards
from latentmill.train.loop import train
from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

pytestmark = pytest.mark.slow  # end to end: real downloads, Ray, training runs


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """4 latent shards (16 images each, two buckets) at 128 px, and a tiny CLIP text pipeline folder."""
    root = tmp_path_factory.mktemp("train")
    (root / "images").mkdir()
    for s in range(4):
        make_shard(
            root / "images" / f"{s:05d}.tar",
            [image_entry(f"{s:05d}{i:04d}", 256, 256 if i % 2 else 192, seed=i % 4) for i in range(16)],
        )
    # "log": 256x192 ties between 128x128 and 160x96 in linear aspect (kohya takes 128x128); two buckets here
    encode(
        root / "images",
        root / "latents",
        EncodeConfig(
            vae="tiny",
            resolution=128,
            bucket_min_side=64,
            bucket_max_side=256,
            step=32,
            flip=True,
            std=True,
            bucket_assign="log",
        ),
    )
    tiny_clip_text_pipeline(root / "pipeline")
    return root


def config(latents, run, **overrides):
    base = dict(
        shards=str(latents / "latents"),
        output=str(run),
        model="tiny",
        text_encoder=str(latents / "pipeline"),
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=10,
        checkpoint_every=1000,
        log_every=1,
    )
    return TrainConfig(**(base | overrides))


def test_the_loss_falls_below_half(latents, tmp_path):
    losses = []
    train(config(latents, tmp_path / "run", steps=150), progress=lambda m: losses.append(m["loss"]))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 150 and log[-1]["step"] == 150
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(latents, tmp_path):
    straight, resumed = [], []
    train(
        config(latents, tmp_path / "a", steps=6, checkpoint_every=3),
        progress=lambda m: straight.append(m["loss"]),
    )
    train(
        config(latents, tmp_path / "b", steps=3, checkpoint_every=3),
        progress=lambda m: resumed.append(m["loss"]),
    )
    with pytest.raises(InputError, match="pass --resume"):
        train(config(latents, tmp_path / "b", steps=6, checkpoint_every=3))
    train(
        config(latents, tmp_path / "b", steps=6, checkpoint_every=3, resume=True),
        progress=lambda m: resumed.append(m["loss"]),
    )
    assert resumed == straight  # bit-exact on CPU
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["step"] == 6 and state["loader"]["batches"] > 0


def test_resume_takes_the_runs_settings_and_refuses_other_ones_by_name(latents, tmp_path, run_cli):
    run = tmp_path / "run"
    base = [
        "--model",
        "tiny",
        "--text-encoder",
        latents / "pipeline",
        "--batch-size",
        "8",
        "--learning-rate",
        "0.001",
    ]
    first = run_cli(
        "train",
        latents / "latents",
        "-o",
        run,
        *base,
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--warmup-steps",
        "10",
        "--log-every",
        "1",
    )
    assert first.exit_code == 0, first.output
    refused = run_cli(
        "train", latents / "latents", "-o", run, "--resume", "--batch-size", "4", "--learning-rate", "0.01"
    )
    assert refused.exit_code == 2
    assert "batch_size (--batch-size): 8 -> 4" in refused.output
    assert "learning_rate (--learning-rate): 0.001 -> 0.01" in refused.output
    # only --steps given: every other setting is the run's (warm-up stays 10, not the default 100)
    extended = run_cli("train", "-o", run, "--resume", "--steps", "6")
    assert extended.exit_code == 0, extended.output
    assert f"resuming {run} from step 4 of 6" in extended.output
    state = json.loads((run / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["config"]["warmup_steps"] == 10 and state["config"]["batch_size"] == 8
    assert state["changes"] == [{"step": 4, "key": "steps", "from": 4, "to": 6}]
    done = run_cli("train", "-o", run, "--resume", "--steps", "3")
    assert done.exit_code == 0, done.output
    assert "is at step 6 of 3: nothing to train" in done.output and "nan" not in done.output


def test_epochs_are_steps_over_every_sample(latents, tmp_path, run_cli):
    run = tmp_path / "epochs"
    args = [
        "train",
        latents / "latents",
        "-o",
        run,
        "--model",
        "tiny",
        "--text-encoder",
        latents / "pipeline",
    ]
    result = run_cli(*args, "--epochs", "1", "--batch-size", "16", "--checkpoint-every", "100")
    assert result.exit_code == 0, result.output
    assert "1 epoch(s) of the data: 4 steps" in result.output  # 64 latents, 16 a batch
    state = json.loads((run / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["epochs"] == 1
    both = run_cli(*args, "--epochs", "1", "--steps", "5")
    assert both.exit_code == 2 and "--steps or --epochs, not both" in both.output


def test_a_config_file_gives_train_settings_and_options_override_it(latents, tmp_path, run_cli):
    settings = tmp_path / "style.yaml"
    settings.write_text("model: tiny\nsteps: 2\nbatch_size: 4\nlearning_rate: 0.002\nwarmup_steps: 1\n")
    run = tmp_path / "run"
    args = ["train", latents / "latents", "-o", run, "--text-encoder", latents / "pipeline"]
    result = run_cli(*args, "--config", settings, "--learning-rate", "0.003")
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())["config"]
    assert (saved["steps"], saved["batch_size"], saved["learning_rate"]) == (2, 4, 0.003)
    settings.write_text("modle: tiny\n")
    bad = run_cli(*args[:3], tmp_path / "other", "--config", settings)
    assert bad.exit_code == 2 and "style.yaml: unknown key train.modle. Did you mean" in bad.output


def test_sample_grids_reach_tensorboard_and_wandb(latents, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grids = dict(steps=2, sample_every=2, sample_steps=2, sample_prompts=["a cat"])
    train(config(latents, tmp_path / "tb", **grids))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert "samples" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]
    assert [image.step for image in events.Images("samples")] == [2]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(config(latents, tmp_path / "wb", report_to="wandb", **grids))
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not (tmp_path / "wb" / "tensorboard").exists()


def test_epoch_mode_visits_every_sample_once_in_one_bucket_batches(latents):
    loader = LatentLoader(expand_shards(str(latents / "latents")), batch_size=5, mode="epoch", seed=3)
    seen, buckets = [], []
    for batch in loader:
        if loader.state.epoch > 0:
            break
        seen += batch["keys"]
        buckets.append({tuple(m["bucket"]) for m in batch["meta"]})
        assert batch["latents"].shape[0] == len(batch["keys"])
    assert sorted(seen) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(16))
    assert all(len(b) == 1 for b in buckets) and len({next(iter(b)) for b in buckets}) == 2


def test_fewer_shards_than_ranks_is_an_error(latents):
    from latentmill.errors import InputError

    with pytest.raises(InputError, match="every reader needs at least one shard"):
        LatentLoader(expand_shards(str(latents / "latents" / "0000{0..1}.tar")), batch_size=4, world_size=3)


def test_two_processes_with_torchrun_read_disjoint_shards_and_take_equal_steps(latents, tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "latentmill",
            "train",
            str(latents / "latents"),
            "--model",
            "tiny",
            "-o",
            str(run),
            "--text-encoder",
            str(latents / "pipeline"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((run / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["world_size"] == 2
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"]) and len(ranks[0]["shards"]) == 2
    assert (run / "checkpoints" / "step-0000003" / "ema.safetensors").exists()


def test_the_export_loads_in_stable_diffusion_pipeline_and_generates(latents, tmp_path, run_cli):
    import torch
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    train(config(latents, run, steps=4, checkpoint_every=4))
    result = run_cli("export", run, "-o", tmp_path / "pipeline")
    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (128, 128, 3)


def test_the_single_file_export_loads_with_from_single_file_as_the_same_model(latents, tmp_path, run_cli):
    import torch
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    train(config(latents, run, steps=2, checkpoint_every=2))
    assert run_cli("export", run, "-o", tmp_path / "pipeline").exit_code == 0
    result = run_cli("export", run, "--format", "single-file", "-o", tmp_path / "model.safetensors")
    assert result.exit_code == 0, result.output
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tmp_path / "pipeline"), local_files_only=True
    )
    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    before = (tmp_path / "model.safetensors").read_bytes()  # an existing file: refused before any work
    again = run_cli("export", run, "--format", "single-file", "-o", tmp_path / "model.safetensors")
    assert again.exit_code == 2 and "exists. Give --overwrite" in again.output
    assert (tmp_path / "model.safetensors").read_bytes() == before
    replaced = run_cli(
        "export", run, "--format", "single-file", "-o", tmp_path / "model.safetensors", "--overwrite"
    )
    assert replaced.exit_code == 0, replaced.output
    onto_file = run_cli("export", run, "-o", tmp_path / "model.safetensors")  # a pipeline is a folder
    assert onto_file.exit_code == 2 and "writes a folder" in onto_file.output


def test_merge_arithmetic_is_exact(tmp_path, run_cli):
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tensors = [{"w": torch.randn(4, 3), "b": torch.randn(3)} for _ in range(3)]
    for name, t in zip("abc", tensors, strict=True):
        save_file(t, str(tmp_path / f"{name}.safetensors"))
    a, b, c = tensors
    result = run_cli(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        "--alpha",
        "0.25",
        "-o",
        tmp_path / "ws",
    )
    assert (
        result.exit_code == 2 and "--config-from RUN" in result.output
    )  # two bare files: no configuration to take
    donor = (
        tmp_path / "donor" / "checkpoints" / "step-0000040"
    )  # a run's checkpoint, as far as merge reads it
    donor.mkdir(parents=True)
    save_file(a, str(donor / "ema.safetensors"))
    (donor / "unet_config.json").write_text("{}")
    (donor / "state.json").write_text(json.dumps({"step": 40, "config": {"prediction": "epsilon"}}))
    result = run_cli(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        "--alpha",
        "0.25",
        "-o",
        tmp_path / "ws",
        "--config-from",
        tmp_path / "donor",
    )
    assert result.exit_code == 0, result.output
    merged_state = json.loads((tmp_path / "ws" / "checkpoints" / "step-0000040" / "state.json").read_text())
    assert merged_state["step"] == 40 and merged_state["merge"]["alpha"] == 0.25
    merged = load_file(tmp_path / "ws" / "checkpoints" / "step-0000040" / "ema.safetensors")
    for key in ("w", "b"):
        expected = (0.75 * a[key].double() + 0.25 * b[key].double()).float()
        assert torch.equal(merged[key], expected)
    run_cli(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        "--base",
        tmp_path / "c.safetensors",
        "--alpha",
        "0.5",
        "-o",
        tmp_path / "ad",
        "--config-from",
        tmp_path / "donor",
    )
    merged = load_file(tmp_path / "ad" / "checkpoints" / "step-0000040" / "ema.safetensors")
    assert torch.equal(merged["w"], (a["w"].double() + 0.5 * (b["w"].double() - c["w"].double())).float())
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    result = run_cli(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "other.safetensors",
        "--alpha",
        "0.5",
        "-o",
        tmp_path / "x",
        "--config-from",
        tmp_path / "donor",
    )
    assert result.exit_code == 2 and "do not match" in result.output
    result = run_cli(
        "merge",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        "--alpha",
        "0.5",
        "-o",
        tmp_path / "ws",
        "--config-from",
        tmp_path / "donor",
    )
    assert result.exit_code == 2 and "already holds a run" in result.output  # never overwritten


def test_sample_grids_during_training_and_the_sample_command(latents, tmp_path, run_cli):
    from PIL import Image

    run = tmp_path / "run"
    train(config(latents, run, steps=4, checkpoint_every=4, sample_every=2, sample_steps=2))
    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000002.png", "step-0000004.png"]
    from latentmill.train.gridcaptions import grid_captions

    assert Image.open(grids[0]).size[0] == 4 * 128 and len(grid_captions(grids[0])) == 4  # prompts under them
    result = run_cli(
        "sample",
        run,
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--sampler-steps",
        "2",
        "-o",
        tmp_path / "grid.png",
    )
    assert result.exit_code == 0, result.output
    width, height = Image.open(tmp_path / "grid.png").size  # a row per prompt, its prompt and seed under it
    assert width == 128 and height > 2 * 128
    assert [c["prompt"] for c in grid_captions(tmp_path / "grid.png")] == ["a cat", "a dog"]


def test_a_nan_loss_stops_with_the_step_and_the_keys(latents, tmp_path, run_cli):
    import shutil

    import numpy as np

    from latentmill.curate.latentshards import LatentShardWriter
    from latentmill.errors import TrainingFailed

    bad = tmp_path / "latents"
    shutil.copytree(latents / "latents", bad)
    writer = LatentShardWriter(bad, "00000")
    for i in range(16):
        writer.add(f"nan{i:04d}", np.full((4, 16, 16), np.nan, np.float32), "broken", {"bucket": [128, 128]})
    writer.close()
    _record_in_manifest(bad, "00000")  # vouched for: the loss, not the checksum, must catch these
    run = tmp_path / "run"
    with pytest.raises(
        TrainingFailed, match=r"loss is nan at step \d+ \(last finite loss logged: .*\); batch keys: nan"
    ):
        train(
            config(
                latents,
                run,
                shards=str(bad / "00000.tar"),
                steps=5,
                checkpoint_every=1,
                mode="epoch",
                flip=False,
            )
        )
    assert not (run / "checkpoints").exists() or all(
        (c / "state.json").exists() for c in (run / "checkpoints").iterdir()
    )
    # on the command line a training failure is exit 1 (the input was valid), not the bad-input code 2
    result = run_cli(
        "train",
        bad / "00000.tar",
        "-o",
        tmp_path / "cli-run",
        "--text-encoder",
        latents / "pipeline",
        "--model",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--mode",
        "epoch",
        "--no-flip",
    )
    assert result.exit_code == 1 and "loss is nan at step" in result.output, result.output


def test_latents_from_another_vae_are_refused(latents, tmp_path):
    from latentmill.curate.vae import load_vae
    from latentmill.errors import InputError

    load_vae("tiny", seed=7).model.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(InputError, match="made with VAE"):
        train(config(latents, tmp_path / "run", steps=1, vae=str(tmp_path / "other-vae")))


def test_workers_split_the_shards_and_resume_exactly(latents):
    shards = expand_shards(str(latents / "latents"))
    loader = LatentLoader(shards, batch_size=4, mode="epoch", workers=2, seed=1)
    keys, count = [], 0
    for batch in loader:
        if loader.state.epoch > 0:
            break
        keys += batch["keys"]
        count += 1
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(16))
    resumed = LatentLoader(shards, batch_size=4, mode="epoch", workers=2, seed=1)
    resumed.state.batches = 3
    first = next(iter(resumed))
    again = LatentLoader(shards, batch_size=4, mode="epoch", workers=2, seed=1)
    stream = iter(again)
    for _ in range(3):
        next(stream)
    expected = next(stream)
    assert first["keys"] == expected["keys"] and torch_equal(first["latents"], expected["latents"])
    with pytest.raises(Exception, match="every reader needs at least one shard"):
        LatentLoader(shards, batch_size=4, workers=3, world_size=2)


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_shards_are_read_from_urls(latents, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(latents / "latents"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loader = LatentLoader(expand_shards(base + "/{00000..00003}.tar"), batch_size=4, mode="epoch")
        local = LatentLoader(expand_shards(str(latents / "latents")), batch_size=4, mode="epoch")
        assert next(iter(loader))["keys"] == next(iter(local))["keys"]
    finally:
        server.shutdown()


def _record_in_manifest(folder, *shards):
    """Make the manifest vouch for shards changed by hand (as a hostile folder would): their digests."""
    from latentmill.curate.shardchecksum import KINDS, new_digest

    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in shards:
        data = (folder / f"{shard}.tar").read_bytes()
        entry = manifest["shards"].setdefault(shard, {"samples": 0})
        for kind in KINDS:
            digest = new_digest(kind)
            digest.update(data)
            entry[kind] = digest.hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_samples_and_shards_are_skipped_and_counted(latents, tmp_path):
    """Samples the manifest vouches for but cannot be used are skipped one by one; a shard whose bytes are
    not the ones encode wrote (cut off, one byte changed, not in the manifest) is skipped whole: not one of
    its samples is trained on."""
    import shutil

    import numpy as np

    from latentmill.curate.latentshards import LatentShardWriter

    folder = tmp_path / "latents"
    shutil.copytree(latents / "latents", folder)
    writer = LatentShardWriter(folder, "00000")
    writer.add("good0000", np.zeros((4, 16, 16)), "fine", {"bucket": [128, 128]})
    writer.add("bad00000", np.zeros((4, 8, 8)), "wrong shape for its bucket", {"bucket": [128, 128]})
    writer.add("good0001", np.zeros((4, 16, 16)), "fine", {"bucket": [128, 128]})
    writer.close()
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2])  # a truncated shard
    data = bytearray((folder / "00002.tar").read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one latent: the tar still reads
    (folder / "00002.tar").write_bytes(bytes(data))
    import io

    from latentmill.curate.latentshards import npy_bytes

    header = io.BytesIO()  # a header claiming 7 TiB: refused before numpy allocates it
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": (4, 10**6, 10**6)}
    )
    meta = json.dumps({"bucket": [128, 128]}).encode()
    bad_samples = [
        ("huge0000", {"latent.npy": header.getvalue() + bytes(2048), "json": meta}),
        ("notnpy00", {"latent.npy": b"\x93NUMPY garbage", "json": meta}),
        ("good0002", {"latent.npy": npy_bytes(np.zeros((4, 16, 16), np.float16)), "json": meta}),
    ]
    make_shard(folder / "00004.tar", bad_samples)
    make_shard(folder / "00005.tar", bad_samples)  # not in the manifest
    _record_in_manifest(folder, "00000", "00004")
    loader = LatentLoader(expand_shards(str(folder)), batch_size=4, mode="epoch")
    with pytest.warns(LatentmillWarning) as warned:
        keys = [key for batch in loader.epoch_batches(0) for key in batch["keys"]]
    assert sorted(keys) == sorted(
        ["good0000", "good0001", "good0002"] + [f"00003{i:04d}" for i in range(16)]
    )  # shard 3 whole; nothing of shards 1, 2 and 5
    assert loader.skipped_total() == {
        "bad_sample": 3,
        "damaged_shard": 1,
        "checksum_mismatch": 1,
        "unlisted_shard": 1,
    }
    messages = " ".join(str(w.message) for w in warned)
    assert "00002.tar changed since encode wrote it: xxh3_128" in messages
    assert "00005.tar is not in the manifest's shard table" in messages
    strict = LatentLoader(expand_shards(str(folder / "00002.tar")), batch_size=4, mode="epoch", strict=True)
    with pytest.raises(InputError, match=r"00002.tar changed since encode wrote it: xxh3_128 \w+… differs"):
        list(strict.epoch_batches(0))


def test_a_damaged_shard_is_counted_in_the_log_or_stops_a_strict_run(latents, tmp_path, run_cli):
    import shutil

    folder = tmp_path / "latents"
    shutil.copytree(latents / "latents", folder)
    data = bytearray((folder / "00003.tar").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (folder / "00003.tar").write_bytes(bytes(data))
    args = ["train", folder, "--model", "tiny", "--text-encoder", latents / "pipeline", "--batch-size", "8",
            "--mode", "epoch", "--epochs", "1", "--log-every", "1"]  # fmt: skip
    result = run_cli(*args, "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "00003.tar changed since encode wrote it" in result.output
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert list(log[-1]["skipped"]) == ["checksum_mismatch"]  # once per epoch that read it
    strict = run_cli(*args, "-o", tmp_path / "strict", "--strict")
    assert strict.exit_code == 2 and "00003.tar changed since encode wrote it" in strict.output
    assert "Traceback" not in strict.output


def test_size_and_crop_conditioning_reaches_the_unet(latents, tmp_path, run_cli):
    import torch

    from latentmill.train.conditioning import size_condition
    from latentmill.train.models import build_unet

    unet = build_unet("tiny", 4, 32, 16, size_conditioning=True)
    text = torch.randn(2, 77, 32)
    noisy = torch.randn(2, 4, 16, 16)
    metas = [{"original_size": [640, 480], "crop": [0, 80], "bucket": [128, 128]}] * 2
    small = [{"original_size": [128, 128], "crop": [0, 0], "bucket": [128, 128]}] * 2
    cond = size_condition(text, metas)
    assert cond["time_ids"][0].tolist() == [480, 640, 0, 80, 128, 128]
    with torch.no_grad():
        a = unet(noisy, torch.tensor([500, 500]), encoder_hidden_states=text, added_cond_kwargs=cond).sample
        b = unet(
            noisy,
            torch.tensor([500, 500]),
            encoder_hidden_states=text,
            added_cond_kwargs=size_condition(text, small),
        ).sample
    assert not torch.allclose(a, b)
    run = tmp_path / "run"
    losses = []
    train(
        config(latents, run, steps=3, checkpoint_every=3, size_conditioning=True),
        progress=lambda m: losses.append(m["loss"]),
    )
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert (
        run_cli(
            "sample", run, "--prompt", "a cat", "--sampler-steps", "2", "-o", tmp_path / "g.png"
        ).exit_code
        == 0
    )
    result = run_cli("export", run, "-o", tmp_path / "pipe")
    assert result.exit_code == 2 and "size/crop conditioning" in result.output


def test_v_prediction_bf16_autocast_and_the_last_k_checkpoints(latents, tmp_path):
    losses = []
    run = tmp_path / "run"
    train(
        config(
            latents,
            run,
            steps=4,
            checkpoint_every=1,
            keep_checkpoints=2,
            prediction="v_prediction",
            precision="bf16",
            grad_accum=2,
        ),
        progress=lambda m: losses.append(m["loss"]),
    )
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["step-0000003", "step-0000004"]


def test_a_model_that_does_not_fit_the_latents_is_refused(latents, tmp_path):
    from latentmill.train.models import build_unet

    build_unet("tiny", 8, 32, 16).save_pretrained(tmp_path / "unet8")
    with pytest.raises(InputError, match="takes 8-channel latents; the shards hold 4"):
        train(config(latents, tmp_path / "run", steps=1, model=str(tmp_path / "unet8")))
    with pytest.raises(InputError, match="no latent shards"):
        train(config(latents, tmp_path / "run2", steps=1, shards=str(tmp_path / "nothing-here")))


def test_shards_without_samples_stop_with_a_message(latents, tmp_path):
    import shutil

    from latentmill.curate.latentshards import LatentShardWriter

    folder = tmp_path / "latents"
    shutil.copytree(latents / "latents", folder)
    for shard in range(4):
        LatentShardWriter(folder, f"{shard:05d}").close()  # empty shards
    with pytest.raises(InputError, match="hold no readable samples"):
        next(iter(LatentLoader(expand_shards(str(folder)), batch_size=4)))


def _stream(loader, count):
    it = iter(loader)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_a_loader_resumed_from_its_saved_position_continues_the_same_stream(latents, workers, mode):
    """The saved state (JSON, as in a checkpoint) locates the exact place: mid-shard, mid-buffer, mid-epoch
    and in the next epoch, with and without worker processes."""
    import dataclasses

    from latentmill.train.loader import LoaderState

    shards = expand_shards(str(latents / "latents"))
    settings = dict(batch_size=3, mode=mode, workers=workers, seed=4, shuffle_buffer=10)
    straight = _stream(LatentLoader(shards, **settings), 40)  # an epoch here is 64 samples: 22-23 batches
    for taken in (1, 7, 25):
        loader = LatentLoader(shards, **settings)
        it = iter(loader)
        for _ in range(taken):
            next(it)
        saved = json.loads(json.dumps(dataclasses.asdict(loader.state)))
        assert saved["positions"], "a position per worker is saved"
        resumed = LatentLoader(shards, **settings, state=LoaderState(**saved))
        again = _stream(resumed, 40 - taken)
        for expected, got in zip(straight[taken:], again, strict=True):
            assert got["keys"] == expected["keys"], (taken, got["keys"], expected["keys"])
            assert torch_equal(got["latents"], expected["latents"])


def test_resume_reads_a_few_shards_however_far_the_run_went(latents, monkeypatch):
    """Constant-time resume: restoring a late position reads no more shards than an early one."""
    import dataclasses

    from latentmill.train import loader as loader_module
    from latentmill.train.loader import LoaderState

    shards = expand_shards(str(latents / "latents"))
    settings = dict(batch_size=4, mode="resampled", seed=1, shuffle_buffer=8)
    reads = []
    original = loader_module.iter_latent_shard
    monkeypatch.setattr(
        loader_module, "iter_latent_shard", lambda *a, **k: (reads.append(a[0]), original(*a, **k))[1]
    )
    costs = {}
    for taken in (2, 300):
        loader = LatentLoader(shards, **settings)
        it = iter(loader)
        for _ in range(taken):
            next(it)
        state = LoaderState(**json.loads(json.dumps(dataclasses.asdict(loader.state))))
        reads.clear()
        next(iter(LatentLoader(shards, **settings, state=state)))
        costs[taken] = len(reads)
    assert 0 < costs[300] <= costs[2] + 3, costs  # 300 batches = 1,200 samples = 75 shard reads if replayed


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_from_an_early_or_a_late_checkpoint_repeats_the_straight_run(
    latents, tmp_path, workers
):
    straight = []
    train(
        config(latents, tmp_path / "a", steps=24, checkpoint_every=4, workers=workers, keep_checkpoints=10),
        progress=lambda m: straight.append(m["loss"]),
    )
    for stop in (4, 20):
        run = tmp_path / f"b{stop}"
        resumed: list = []
        collect = resumed.append
        train(
            config(latents, run, steps=stop, checkpoint_every=4, workers=workers),
            progress=lambda m, c=collect: c(m["loss"]),
        )
        train(
            config(latents, run, steps=24, checkpoint_every=4, workers=workers, resume=True),
            progress=lambda m, c=collect: c(m["loss"]),
        )
        assert resumed == straight, stop


def test_caption_dropout_uses_the_stored_empty_caption(latents, tmp_path):
    import numpy as np
    import torch

    from latentmill.curate.latentshards import read_manifest
    from latentmill.curate.textencoder import load_text_encoder
    from latentmill.train.conditioning import text_conditioning

    out = tmp_path / "latents"
    encode(
        latents / "images",
        out,
        EncodeConfig(
            vae="tiny",
            resolution=128,
            bucket_min_side=64,
            bucket_max_side=256,
            step=32,
            text_encoder=str(latents / "pipeline"),
            bucket_assign="log",
        ),
    )
    manifest = read_manifest(out)
    stored_empty = np.load(out / manifest["text_encoder"]["empty"])
    expected = load_text_encoder(str(latents / "pipeline")).encode([""])[0]
    np.testing.assert_array_equal(stored_empty, expected.astype(np.float16))
    assert np.abs(stored_empty).max() > 0.1  # not zeros

    loader = LatentLoader(expand_shards(str(out)), batch_size=8, mode="epoch")
    batch = next(iter(loader))
    cfg = TrainConfig(shards=str(out), output=str(tmp_path / "r"), model="tiny", caption_dropout=1.0)
    encode_text, width, _ = text_conditioning(cfg, manifest, out, "cpu", "fp32")
    states = encode_text(batch, torch.Generator().manual_seed(0))
    assert width == 32 and states.shape == (8, 77, 32)
    for row in states:
        assert torch.equal(row, torch.from_numpy(stored_empty.astype(np.float32)))
    kept = text_conditioning(
        TrainConfig(shards=str(out), output="x", model="tiny", caption_dropout=0.0),
        manifest,
        out,
        "cpu",
        "fp32",
    )[0]
    assert torch.equal(kept(batch, torch.Generator().manual_seed(0)), batch["text_emb"].float())


def test_a_run_trained_on_stored_caption_states_samples_with_their_encoder_and_a_negative_prompt(
    latents, tmp_path, run_cli
):
    import numpy as np
    from PIL import Image

    stored = tmp_path / "latents"
    encode(
        latents / "images",
        stored,
        EncodeConfig(vae="tiny", resolution=128, text_encoder=str(latents / "pipeline")),
    )
    run = tmp_path / "run"
    train(config(latents, run, shards=str(stored), text_encoder=None, steps=2, checkpoint_every=2))
    grids = {}
    for name, extra in (
        ("plain", []),
        ("negative", ["--negative-prompt", "blurry"]),
        ("given", ["--text-encoder", latents / "pipeline"]),
    ):
        result = run_cli(
            "sample", run, "--prompt", "a cat", "--sampler-steps", "2", "-o", tmp_path / f"{name}.png", *extra
        )
        assert result.exit_code == 0, result.output  # the encoder the manifest names, without --text-encoder
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(grids["plain"], grids["given"]) and not np.array_equal(
        grids["plain"], grids["negative"]
    )
    other = run_cli(
        "sample",
        run,
        "--prompt",
        "a cat",
        "--text-encoder",
        "openclip:latentmill-tiny",
        "-o",
        tmp_path / "x.png",
    )
    assert other.exit_code == 2 and "not the text encoder that made the caption states" in other.output


def test_resume_truncates_the_log_clears_stale_temporaries_and_falls_back_past_a_damaged_checkpoint(
    latents, tmp_path, run_cli
):
    straight = tmp_path / "straight"
    train(config(latents, straight, steps=6, checkpoint_every=2))
    run = tmp_path / "run"
    with pytest.raises(InputError, match="has no checkpoints to resume from"):
        train(config(latents, run, steps=6, checkpoint_every=2, resume=True))
    train(config(latents, run, steps=6, checkpoint_every=2, keep_checkpoints=3))
    # a run killed after logging step 6 but while writing checkpoint 6, whose newest intact checkpoint is 4:
    (run / "checkpoints" / "step-0000006" / "ema.safetensors").unlink()
    stale = run / "checkpoints" / ".step-0000008.tmp-999"
    stale.mkdir()
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 7, "loss": 0.1')  # cut off by the kill
    for command in (
        ["export", run, "-o", tmp_path / "pipe"],
        ["sample", run, "--prompt", "a red circle", "-o", tmp_path / "grid.png"],
        ["merge", run, straight, "--alpha", "0.5", "-o", tmp_path / "merged"],
    ):
        result = run_cli(*command)
        assert (
            result.exit_code == 2
            and "step-0000006" in result.output
            and "ema.safetensors is missing" in result.output
        )
    with pytest.warns(
        LatentmillWarning, match=r"step-0000006: damaged checkpoint \(ema.safetensors is missing\)"
    ):
        train(config(latents, run, steps=6, checkpoint_every=2, resume=True, keep_checkpoints=3))
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: 5 and 6 of the killed run were dropped, then redone
    ours = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in ours] == [
        m["loss"] for m in theirs
    ]  # and the redone steps equal a straight run


def test_a_merged_run_is_a_run_that_export_sample_and_init_from_take(latents, tmp_path, run_cli):
    import torch
    from safetensors.torch import load_file

    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    train(config(latents, a, steps=2, checkpoint_every=2))
    train(config(latents, b, steps=2, checkpoint_every=2, seed=1))
    result = run_cli("merge", a, b, "--alpha", "0.5", "-o", merged)
    assert result.exit_code == 0, result.output
    (checkpoint,) = (merged / "checkpoints").iterdir()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["merge"]["method"] == "weighted_sum" and state["config"]["text_encoder"] == str(
        latents / "pipeline"
    )
    assert not list(tmp_path.glob(".merged.tmp-*"))  # written whole, then renamed
    result = run_cli("export", merged, "-o", tmp_path / "pipe")
    assert result.exit_code == 0 and (tmp_path / "pipe" / "model_index.json").exists(), result.output
    result = run_cli(
        "sample", merged, "--prompt", "a red circle", "--sampler-steps", "2", "-o", tmp_path / "grid.png"
    )
    assert result.exit_code == 0 and (tmp_path / "grid.png").exists(), result.output
    # --init-from starts from the merged weights: one small step later the U-Net is still next to them
    train(
        config(
            latents, tmp_path / "c", steps=1, checkpoint_every=1, learning_rate=1e-6, init_from=str(merged)
        )
    )
    weights = load_file(checkpoint / "ema.safetensors")
    after = load_file(tmp_path / "c" / "checkpoints" / "step-0000001" / "unet.safetensors")
    start_a = load_file(a / "checkpoints" / "step-0000002" / "ema.safetensors")
    near = max(float((after[k] - weights[k]).abs().max()) for k in weights)
    far = max(float((start_a[k] - weights[k]).abs().max()) for k in weights)
    assert near < 1e-3 < far, (near, far)
    assert torch.equal(
        load_file(merged / "checkpoints" / checkpoint.name / "unet.safetensors")["conv_in.weight"],
        weights["conv_in.weight"],
    )


def test_training_streams_shards_from_s3_and_keeps_its_run_there_resuming_exactly(latents, tmp_path, bucket):
    from latentmill.curate import storage
    from latentmill.train.shardcache import ShardCache

    for path in sorted((latents / "latents").iterdir()):
        storage.upload(path, storage.location(f"{bucket}/latents/{path.name}"))
    remote = dict(shards=f"{bucket}/latents", cache_dir=str(tmp_path / "cache"), cache_limit="200kB")
    straight, resumed = [], []
    train(
        config(latents, tmp_path / "local", steps=6, checkpoint_every=3),
        progress=lambda m: straight.append(m["loss"]),
    )
    run = f"{bucket}/runs/a"
    train(
        config(latents, run, steps=3, checkpoint_every=3, **remote),
        progress=lambda m: resumed.append(m["loss"]),
    )
    train(
        config(latents, run, steps=6, checkpoint_every=3, resume=True, **remote),
        progress=lambda m: resumed.append(m["loss"]),
    )
    assert resumed == straight  # the same stream from the store as from disk, resumed exactly
    # a run killed before its first checkpoint resumes from the store too: its settings went there at once
    early = f"{bucket}/runs/early"
    train(config(latents, early, steps=2, checkpoint_every=2, **remote))
    assert storage.location(f"{early}/started.json").exists()
    storage.remove(f"{early}/checkpoints")  # as if killed before step 2's checkpoint
    again: list = []
    train(
        config(latents, early, steps=2, checkpoint_every=2, resume=True, **remote),
        progress=lambda m: again.append(m["loss"]),
    )
    assert again == straight[:2]
    names = {p.name for p in storage.location(f"{run}/checkpoints").iterdir()}
    assert names == {"step-0000003", "step-0000006"}
    state = storage.location(f"{run}/checkpoints/step-0000006/state.json").read_text()
    assert '"step": 6' in state
    log = storage.location(f"{run}/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log if '"loss"' in line][-1] == 6
    # the cache stays under its limit: of the 4 shards read (~87 kB each), the earlier ones were evicted
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert 0 < sum(p.stat().st_size for p in cached) <= 200_000 and len(cached) < 4
    cache = ShardCache(tmp_path / "cache2", limit=10**9)
    shard = f"{bucket}/latents/00000.tar"
    with cache.open(shard, [f"{bucket}/latents/00001.tar"]) as stream:
        assert stream.read() == (latents / "latents" / "00000.tar").read_bytes()
    cache.close()
    assert cache.downloads == 2  # the shard and, read ahead, the next one


def test_a_torchrun_run_resumed_repeats_the_straight_run_on_every_rank(latents, tmp_path):
    from safetensors.torch import load_file

    def torchrun(run, steps, *more):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "latentmill", "train", str(latents / "latents"), "--model", "tiny", "-o", str(run), "--text-encoder",
             str(latents / "pipeline"), "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "3",
             "--workers", "0", *more],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "straight", 6)
    torchrun(tmp_path / "resumed", 3)
    torchrun(tmp_path / "resumed", 6, "--resume")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert len(state["loader"]["ranks"]) == 2  # each rank's own position, not rank 0's for both
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / "unet.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000006" / "unet.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_runs_in_s3_are_sampled_merged_and_trained_from(latents, tmp_path, bucket, run_cli):
    from PIL import Image

    from latentmill.curate import storage

    run = f"{bucket}/runs/first"
    train(config(latents, run, steps=2, checkpoint_every=2))
    result = run_cli("sample", run, "--prompt", "a cat", "--sampler-steps", "2", "-o", f"{bucket}/grid.png")
    assert result.exit_code == 0, result.output
    (tmp_path / "grid.png").write_bytes(storage.location(f"{bucket}/grid.png").read_bytes())
    assert Image.open(tmp_path / "grid.png").size[0] == 128
    merged = f"{bucket}/runs/merged"
    result = run_cli("merge", run, run, "--alpha", "0.5", "-o", merged)
    assert result.exit_code == 0, result.output
    assert storage.location(f"{merged}/checkpoints/step-0000002/state.json").exists()
    train(config(latents, f"{bucket}/runs/second", steps=1, init_from=merged))
    assert storage.location(f"{bucket}/runs/second/checkpoints/step-0000001/ema.safetensors").exists()
    result = run_cli("export", merged, "-o", f"{bucket}/export")
    assert result.exit_code == 0, result.output
    assert storage.location(f"{bucket}/export/model_index.json").exists()
