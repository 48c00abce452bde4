"""Fine-tuning from latent shards: LoRA adapters (and their diffusers and kohya files), weighted mixtures of
latent folders, DreamBooth's prior preservation. Tiny models on CPU."""

import json

import pytest
import torch

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError
from latentmill.train.config import TrainConfig
from latentmill.train.data import TrainingData, latent_sets
from latentmill.train.loop import train
from tests.conftest import image_entry, make_shard, report_section, tiny_clip_text_pipeline

ENCODE = dict(vae="tiny", bucket_min_side=64, bucket_max_side=256, step=32, flip=True, std=True)


def _latents(root, name, seed, resolution=128, shards=2):
    images = root / f"{name}-images"
    images.mkdir()
    for s in range(shards):
        make_shard(
            images / f"{s:05d}.tar",
            [
                image_entry(f"{seed}{s:03d}{i:04d}", 256, 256 if i % 2 else 192, seed=seed + i % 4)
                for i in range(12)
            ],
        )
    encode(images, root / name, EncodeConfig(resolution=resolution, **ENCODE))
    return root / name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two latent folders at 128 px ("photos", "paintings"), one at 64 px, a tiny CLIP text pipeline, and a
    "pretrained" base: a StableDiffusionPipeline folder exported from a short full run."""
    from latentmill.train.export import export_run

    root = tmp_path_factory.mktemp("finetune")
    _latents(root, "photos", seed=0)
    _latents(root, "paintings", seed=10)
    _latents(root, "small", seed=20, resolution=64)
    tiny_clip_text_pipeline(root / "text")
    train(config(root, root / "base-run", steps=2, model="tiny"))
    export_run(root / "base-run", root / "base")
    return root


def config(root, run, **overrides):
    base = dict(
        shards=str(root / "photos"),
        output=str(run),
        text_encoder=str(root / "text"),
        model=str(root / "base"),
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=1,
        checkpoint_every=1000,
        log_every=1,
    )
    return TrainConfig(**(base | overrides))


def last_checkpoint(run):
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def generate(pipe):
    """One 64 px image of a fixed prompt at a fixed seed, two steps."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def base_unet(root):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(root / "base" / "unet")


# --- LoRA ----------------------------------------------------------------------------------------------


def test_lora_targets_pick_the_attention_the_feed_forward_or_every_linear_layer(data):
    from latentmill.train.lora import target_modules

    unet = base_unet(data)
    attention = target_modules(unet, "attention")
    with_ff = target_modules(unet, "attention+ff")
    every = target_modules(unet, "all-linear")
    assert attention and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for name in attention)
    assert all(".attn1." in n or ".attn2." in n for n in attention)
    assert set(attention) < set(with_ff) < set(every)
    assert {n for n in with_ff if n not in attention} == {n for n in with_ff if ".ff.net." in n}
    assert "time_embedding.linear_1" in every and "time_embedding.linear_1" not in with_ff


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_the_base_stays_bit_identical(data, tmp_path):
    from safetensors.torch import load_file

    from latentmill.curate.fingerprints import weights_fingerprint

    run = tmp_path / "style"
    train(config(data, run, steps=4, checkpoint_every=4, lora_rank=4, lora_alpha=8.0))
    folder = last_checkpoint(run)
    names = {p.name for p in folder.iterdir()}
    assert {"lora.safetensors", "lora_ema.safetensors", "adapter.json"} <= names
    assert not names & {"unet.safetensors", "ema.safetensors"}  # adapter-only checkpoints
    lora = load_file(folder / "lora.safetensors")
    assert lora and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # B left zero: it trained
    optimizer = load_file(folder / "optimizer.safetensors")
    assert {int(k.split(".")[0]) for k in optimizer} == set(range(len(lora)))  # Adam only saw adapters
    adapter = json.loads((folder / "adapter.json").read_text())
    assert (adapter["rank"], adapter["alpha"], adapter["targets"]) == (4, 8.0, "attention")
    # the fingerprint is taken from the U-Net in memory at the checkpoint, after 4 optimizer steps
    assert adapter["base_fingerprint"] == weights_fingerprint(base_unet(data).state_dict())


@pytest.mark.slow
def test_an_exported_lora_loads_in_diffusers_changes_its_output_and_matches_the_baked_merge(
    data, tmp_path, run_cli
):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "style"
    train(config(data, run, steps=4, checkpoint_every=4, lora_rank=4, lora_alpha=8.0))

    assert run_cli("export", run, "-o", tmp_path / "style-lora").exit_code == 0
    assert run_cli("merge", "--lora", run, "-o", tmp_path / "baked").exit_code == 0
    assert run_cli("export", tmp_path / "baked", "-o", tmp_path / "baked-pipeline").exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(data / "base")
    before = generate(pipe)
    pipe.load_lora_weights(tmp_path / "style-lora")
    after = generate(pipe)
    baked = generate(StableDiffusionPipeline.from_pretrained(tmp_path / "baked-pipeline"))
    assert abs(after - before).max() > 1e-2  # the adapter changes the images
    assert abs(after - baked).max() < 1e-4  # and means what the merge bakes in (alpha / rank included)

    # another base (one weight changed): refused with both fingerprints, unless --force
    from safetensors.torch import save_file

    from latentmill.curate.fingerprints import weights_fingerprint

    other = base_unet(data).state_dict()
    other["conv_in.bias"] = other["conv_in.bias"] + 0.5
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "other.safetensors")
    adapter = json.loads((last_checkpoint(run) / "adapter.json").read_text())
    refused = run_cli("merge", tmp_path / "other.safetensors", "--lora", run, "-o", tmp_path / "wrong")
    assert refused.exit_code == 2 and "not the weights the LoRA adapter" in refused.output
    assert weights_fingerprint(other) in refused.output and adapter["base_fingerprint"] in refused.output
    assert not (tmp_path / "wrong").exists()
    forced = run_cli(
        "merge", tmp_path / "other.safetensors", "--lora", run, "--force", "-o", tmp_path / "wrong"
    )
    assert forced.exit_code == 0 and "not the weights the LoRA adapter" in forced.output
    same = run_cli("merge", data / "base", "--lora", run, "-o", tmp_path / "same-base")
    assert same.exit_code == 0 and "not the weights" not in same.output  # its own base, given as A


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_kohya_export_names_every_module_as_sd_scripts_does_and_diffusers_reads_it(
    data, tmp_path, run_cli, targets
):
    """kohya's LoRA files (sd-scripts' networks/lora.py, as documented in its README and read by ComfyUI and
    A1111) name each module `lora_unet_` + its U-Net path with dots as underscores, and hold
    `.lora_down.weight` (rank x in), `.lora_up.weight` (out x rank) and a scalar `.alpha`."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from latentmill.train.lora import target_modules

    run = tmp_path / "style"
    train(config(data, run, steps=2, checkpoint_every=2, lora_rank=4, lora_alpha=2.0, lora_targets=targets))
    out = tmp_path / "style.safetensors"
    result = run_cli("export", run, "--format", "kohya", "-o", out)
    assert result.exit_code == 0, result.output
    with safe_open(out, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = target_modules(base_unet(data), targets)
    expected = {
        f"lora_unet_{m.replace('.', '_')}.{part}"
        for m in modules
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert keys == expected
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{q}.alpha"].shape == () and float(tensors[f"{q}.alpha"]) == 2.0
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    resnet = "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"
    assert (resnet in keys) == (targets == "all-linear")
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "2.0",
    )
    # diffusers' own kohya converter reads the file as the same adapter as our diffusers-format export
    assert run_cli("export", run, "-o", tmp_path / "diffusers-format").exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(data / "base")
    images = []
    for lora in (tmp_path / "diffusers-format", str(out)):
        pipe.load_lora_weights(lora)
        images.append(generate(pipe))
        pipe.unload_lora_weights()
    assert abs(images[0] - images[1]).max() < 1e-5


def test_merging_a_lora_adds_scale_times_alpha_over_rank_times_b_a():
    from latentmill.train.lora import merge_lora

    generator = torch.Generator().manual_seed(0)
    base = {"x.to_q.weight": torch.randn(6, 5, generator=generator), "x.norm.weight": torch.ones(5)}
    lora = {
        "x.to_q.lora_A.weight": torch.randn(2, 5, generator=generator),
        "x.to_q.lora_B.weight": torch.randn(6, 2, generator=generator),
    }
    merged = merge_lora(base, lora, alpha=4.0, scale=0.5)
    expected = (
        base["x.to_q.weight"] + 0.5 * (4.0 / 2) * lora["x.to_q.lora_B.weight"] @ lora["x.to_q.lora_A.weight"]
    )
    assert torch.allclose(merged["x.to_q.weight"], expected, atol=1e-6)
    assert torch.equal(merged["x.norm.weight"], base["x.norm.weight"])
    assert torch.equal(merge_lora(base, lora, alpha=4.0, scale=0.0)["x.to_q.weight"], base["x.to_q.weight"])
    with pytest.raises(InputError, match="another architecture"):
        merge_lora({"x.to_q.weight": torch.zeros(3, 3)}, lora, alpha=4.0)


@pytest.mark.slow
def test_a_lora_run_samples_resumes_exactly_and_is_refused_without_a_pretrained_model(
    data, tmp_path, run_cli
):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # sample grids swap the EMA adapters in and the trained ones back: the straight run samples, the
    # resumed one does not, and they still end bit-identical
    train(config(data, straight, steps=4, checkpoint_every=4, lora_rank=2, sample_every=2, sample_steps=2))
    train(config(data, resumed, steps=2, checkpoint_every=2, lora_rank=2))
    train(config(data, resumed, steps=4, checkpoint_every=2, lora_rank=2, resume=True))
    assert (straight / "samples" / "step-0000002.png").exists()
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = (load_file(last_checkpoint(r) / name) for r in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = run_cli(
        "sample", straight, "--prompt", "a dog", "-o", tmp_path / "grid.png", "--sampler-steps", "2"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(InputError, match=r"other settings \(lora_rank \(--lora-rank\): 2 -> 0"):
        train(config(data, resumed, steps=6, resume=True))
    with pytest.raises(InputError, match="LoRA adapts a trained model"):
        config(data, tmp_path / "x", model="tiny", lora_rank=4).validate()
    result = run_cli("export", tmp_path / "straight", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0
    result = run_cli("train", data / "photos", "-o", tmp_path / "y", "--model", "tiny", "--lora-alpha", "4")
    assert result.exit_code == 2 and "--lora-rank" in result.output


# --- mixtures ------------------------------------------------------------------------------------------


def _mixture(data, **overrides):
    options = dict(batch_size=2, seed=3, mode="resampled", shuffle_buffer=4, flip=True)
    return TrainingData(
        latent_sets([str(data / "photos"), str(data / "paintings")]),
        overrides.pop("mix", [0.8, 0.2]),
        overrides.pop("class_data", None),
        **(options | overrides),
    )


def test_a_mixture_draws_batches_in_its_weights_proportions(data):
    mixture = _mixture(data)
    sources = [mixture.next()[0]["source"] for _ in range(1000)]
    share = sources.count(0)
    # binomial(1000, 0.8): sd 12.6; 4 sd either side
    assert abs(share - 800) < 51, share
    for _ in range(20):  # every batch from one bucket of one folder (photos' keys start with 0, paintings' 1)
        batch, _ = mixture.next()
        assert {key[0] for key in batch["keys"]} == {str(batch["source"])}
        assert len({tuple(m["bucket"]) for m in batch["meta"]}) == 1


def test_a_mixture_resumed_from_its_state_continues_the_same_batches(data):
    straight = _mixture(data)
    expected = [straight.next()[0]["keys"] for _ in range(60)]
    first = _mixture(data)
    seen = [first.next()[0]["keys"] for _ in range(25)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    second = _mixture(data)
    second.load_state_dict(state)
    seen += [second.next()[0]["keys"] for _ in range(35)]
    assert seen == expected


def test_folders_mixed_together_must_share_the_latent_space(data, tmp_path, run_cli):
    with pytest.raises(InputError, match="resolution"):
        TrainingData(latent_sets([str(data / "photos"), str(data / "small")]), None, None, batch_size=2)
    manifest = json.loads((data / "paintings" / "manifest.json").read_text())
    other = tmp_path / "other-vae"
    other.mkdir()
    for shard in (data / "paintings").glob("*.tar"):
        (other / shard.name).write_bytes(shard.read_bytes())
    manifest["vae"] = manifest["vae"] | {"fingerprint": "0123456789abcdef", "name": "another-vae"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="share the VAE"):
        TrainingData(latent_sets([str(data / "photos"), str(other)]), None, None, batch_size=2)
    result = run_cli(
        "train", data / "photos", data / "paintings", "--mix", "0.5", "-o", tmp_path / "r", "--model", "tiny"
    )
    assert result.exit_code == 2 and "one weight per folder" in result.output
    # stored caption embeddings of another text encoder matter only where the run reads them (no --text-encoder)
    manifest = json.loads((data / "paintings" / "manifest.json").read_text())
    texts = tmp_path / "other-text"
    texts.mkdir()
    for shard in (data / "paintings").glob("*.tar"):
        (texts / shard.name).write_bytes(shard.read_bytes())
    (texts / "manifest.json").write_text(
        json.dumps(manifest | {"text_encoder": {"name": "clip-x", "shape": [77, 32]}})
    )
    sets = latent_sets([str(data / "photos"), str(texts)])
    with pytest.raises(InputError, match=r"stored caption embeddings \(clip-x\) differ"):
        TrainingData(sets, None, None, batch_size=2)
    assert len(TrainingData(sets, None, None, batch_size=2, stored_text=False).loaders) == 2


def test_shard_files_of_one_folder_count_as_one_latent_set(data):
    """`train photos/*.tar paintings/ --mix 0.8,0.2`: the shell's files are one folder, one weight."""
    sources = [*map(str, sorted((data / "photos").glob("*.tar"))), str(data / "paintings")]
    assert len(sources) == 3
    assert [name for name, _ in latent_sets(sources)] == [str(data / "photos"), str(data / "paintings")]
    config(data, data / "unused", shards=sources, mix=[0.8, 0.2]).validate()
    assert len(TrainingData(latent_sets(sources), [0.8, 0.2], None, batch_size=2).loaders) == 2


def test_without_weights_folders_mix_in_proportion_to_their_sizes(data):
    mixture = _mixture(data, mix=None)
    sizes = [json.loads((data / n / "manifest.json").read_text())["samples"] for n in ("photos", "paintings")]
    assert mixture.weights == sizes


def test_repeats_weigh_each_folder_by_size_times_repeats(data, tmp_path, run_cli):
    sizes = [json.loads((data / n / "manifest.json").read_text())["samples"] for n in ("photos", "paintings")]
    mixture = _mixture(data, mix=None, repeats=[3, 1])
    assert mixture.weights == [sizes[0] * 3, sizes[1]]
    drawn = [mixture.source_of(n) for n in range(2000)]
    assert abs(drawn.count(0) / 2000 - 3 * sizes[0] / (3 * sizes[0] + sizes[1])) < 0.04
    with pytest.raises(
        InputError, match="--repeats has 1 count.s. for 2 latent folder.s.: one count per folder"
    ):
        _mixture(data, mix=None, repeats=[2])
    both = run_cli(
        "train",
        data / "photos",
        data / "paintings",
        "--repeats",
        "3,1",
        "--mix",
        "0.5,0.5",
        "-o",
        tmp_path / "r",
        "--model",
        "tiny",
    )
    assert both.exit_code == 2 and "--repeats or --mix, not both" in both.output


def test_caption_tags_are_shuffled_and_dropped_keeping_the_first_ones_and_repeat_on_resume():
    import torch

    from latentmill.train.conditioning import caption_variants

    caption = "sks dog, red collar, on grass, sunny, photo"
    shuffled = TrainConfig(shards=["x"], output="y", model="tiny", shuffle_tags=True, keep_tags=1)
    seen = {caption_variants([caption], shuffled, torch.Generator().manual_seed(s))[0] for s in range(20)}
    assert len(seen) > 5 and all(v.startswith("sks dog, ") for v in seen)
    assert all(sorted(v.split(", ")) == sorted(caption.split(", ")) for v in seen)
    same = [caption_variants([caption], shuffled, torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert same[0] == same[1]  # the step's generator decides: a resumed run sees the same captions
    dropped = TrainConfig(shards=["x"], output="y", model="tiny", tag_dropout=1.0, keep_tags=2)
    assert caption_variants([caption], dropped, torch.Generator()) == ["sks dog, red collar"]
    plain = TrainConfig(shards=["x"], output="y", model="tiny")
    generator = torch.Generator().manual_seed(1)
    assert caption_variants([caption], plain, generator) == [caption]
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())  # no draw
    with pytest.raises(InputError, match="--shuffle-tags and --tag-dropout change caption text"):
        TrainConfig(shards=["x"], output="y", model="tiny", shuffle_tags=True).validate()


# --- DreamBooth ----------------------------------------------------------------------------------------


def test_the_prior_preservation_loss_is_the_instance_mse_plus_the_weighted_class_mse(data):
    import torch.nn.functional as F

    from latentmill.train.objective import Objective
    from latentmill.train.schedule import training_scheduler

    unet = base_unet(data)
    g = torch.Generator().manual_seed(0)
    instance = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 77, 32, generator=g),
        [{}] * 2,
        None,
        None,
    )
    class_images = (
        torch.randn(3, 4, 16, 12, generator=g),
        torch.randn(3, 77, 32, generator=g),
        [{}] * 3,
        None,
        None,
    )
    objective = Objective(training_scheduler("epsilon"), "epsilon", min_snr_gamma=None)
    with torch.no_grad():
        loss = objective.step_loss(unet, instance, class_images, 0.7, torch.Generator().manual_seed(5))

        # the same draws by hand, in the documented order: per batch noise, then timesteps
        draws = torch.Generator().manual_seed(5)
        terms = []
        for latents, text, _, _, _ in (instance, class_images):
            noise = torch.randn(latents.shape, generator=draws)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=draws)
            noisy = objective.schedule.add_noise(latents, noise, t)
            terms.append(F.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise))
    assert torch.allclose(loss, terms[0] + 0.7 * terms[1], rtol=1e-5)
    assert not torch.allclose(terms[0], terms[1])


@pytest.mark.slow
def test_dreambooth_trains_on_instance_and_class_batches_and_resumes_exactly(data, tmp_path, run_cli):
    from safetensors.torch import load_file

    dreambooth = dict(
        shards=[], instance=str(data / "photos"), class_data=str(data / "paintings"), lora_rank=2
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(data, straight, steps=4, checkpoint_every=4, **dreambooth))
    train(config(data, resumed, steps=2, checkpoint_every=2, **dreambooth))
    train(config(data, resumed, steps=4, checkpoint_every=2, resume=True, **dreambooth))
    a, b = (load_file(last_checkpoint(r) / "lora.safetensors") for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((last_checkpoint(straight) / "state.json").read_text())
    assert state["loader"]["class"]["batches"] == 4  # one class batch per step
    assert sum(s["batches"] for s in state["loader"]["sources"]) == 4
    weight = TrainConfig.__dataclass_fields__["prior_loss_weight"].default
    for line in (straight / "log.jsonl").read_text().splitlines():  # the two terms logged apart
        m = json.loads(line)
        assert m["prior_loss"] > 0 and m["instance_loss"] > 0
        assert m["loss"] == pytest.approx(m["instance_loss"] + weight * m["prior_loss"], rel=1e-5)
    result = run_cli(
        "sample", straight, "--prompt", "a photo of sks", "-o", tmp_path / "g.png", "--sampler-steps", "2"
    )
    assert result.exit_code == 0, result.output
    result = run_cli("train", "--instance", data / "photos", "-o", tmp_path / "x", "--model", "tiny")
    assert result.exit_code == 2 and "--class-data" in result.output


# --- the user's own pictures, class images, the recipe ----------------------------------------------------


def _picture_folder(folder, count=6):
    from latentmill.curate import samples

    folder.mkdir(parents=True)
    for i in range(count):
        image, _ = samples.synthetic(i, 160 + 32 * (i % 3), 160)
        image.save(folder / f"pic{i}.png")
    return folder


def test_images_pack_writes_img2dataset_shards_from_a_folder_and_resumes(tmp_path, run_cli):
    from latentmill.curate.imageshards import ShardReadStats, iter_image_shard

    folder = _picture_folder(tmp_path / "mine")
    (folder / "pic1.txt").write_text("my own caption\n")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli(
        "images",
        "pack",
        folder,
        "-o",
        tmp_path / "shards",
        "--caption",
        "a photo of sks",
        "--shard-size",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert "packed 6 image(s)" in result.output and "undecodable 1" in result.output
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"]
    assert all(
        s.with_name(s.stem + "_stats.json").exists() and s.with_suffix(".parquet").exists() for s in shards
    )
    stats = ShardReadStats()
    samples = [s for shard in shards for s in iter_image_shard(shard, stats)]
    captions = {s.meta["url"]: s.caption for s in samples}
    assert captions["pic1.png"] == "my own caption" and captions["pic0.png"] == "a photo of sks"
    assert len(samples) == 6 and stats.samples == 6
    before = [s.stat().st_mtime_ns for s in shards]
    pack = ["images", "pack", folder, "-o", tmp_path / "shards", "--shard-size", "4"]
    assert run_cli(*pack, "--caption", "a photo of sks").exit_code == 0
    assert [s.stat().st_mtime_ns for s in shards] == before  # done shards are kept
    # another caption is not the same shards: refused by name, not silently kept; --overwrite packs again
    other = run_cli(*pack, "--caption", "x")
    assert other.exit_code == 2 and 'settings.caption: "a photo of sks" -> "x"' in other.output, other.output
    assert [s.stat().st_mtime_ns for s in shards] == before
    assert run_cli(*pack, "--caption", "x", "--overwrite").exit_code == 0
    samples = [s for shard in shards for s in iter_image_shard(shard, ShardReadStats())]
    assert {s.meta["url"]: s.caption for s in samples}["pic0.png"] == "x"
    result = run_cli("images", "pack", tmp_path / "shards", "-o", tmp_path / "nothing")
    assert result.exit_code == 2 and "no image files" in result.output


@pytest.mark.slow
def test_class_images_come_from_the_base_pipeline_into_a_folder_that_packs(data, tmp_path, run_cli):
    out = tmp_path / "class-images"
    args = ["sample", data / "base", "--prompt", "a photo of a dog", "--count", "3", "--sampler-steps", "2"]
    args += ["--width", "64", "--height", "64", "--to-folder", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert all(p.with_suffix(".txt").read_text().strip() == "a photo of a dog" for p in pngs)
    first = pngs[0].read_bytes()
    pngs[2].unlink()  # a stopped call: run again, the missing image is made, the others kept
    again = run_cli(*args)
    assert again.exit_code == 0 and "3 image(s) of these prompts" in again.output, again.output
    assert pngs[2].exists() and pngs[0].read_bytes() == first
    result = run_cli("images", "pack", out, "-o", tmp_path / "class-shards")
    assert result.exit_code == 0 and "packed 3 image(s)" in result.output
    # a new prompt is not the old prompt's images: they are made anew
    cat = [a if a != "a photo of a dog" else "a photo of a cat" for a in args]
    result = run_cli(*cat)
    assert result.exit_code == 0 and "(3 made now)" in result.output, result.output
    assert all(p.with_suffix(".txt").read_text().strip() == "a photo of a cat" for p in pngs)
    # images it did not write are neither counted as its own nor overwritten
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "000000.png").write_bytes(first)
    result = run_cli(*args[:-1], theirs)
    assert result.exit_code == 2 and "000000.png was not written by `latentmill sample`" in result.output
    assert (theirs / "000000.png").read_bytes() == first


@pytest.mark.slow
def test_a_recipe_packs_a_folder_trains_a_lora_and_exports_it(data, tmp_path, run_cli):
    from latentmill.train.lora import DIFFUSERS_FILE

    folder = _picture_folder(tmp_path / "style", count=8)
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        "urls: {source: folder}\n"
        "pack: {caption: a picture in sks style}\n"
        "score: {clip_model: tiny-rn, pretrained: none, workers: 0, batch_size: 8}\n"
        "select: {min_side: 128}\n"
        "encode: {resolution: 128, step: 32, vae: tiny}\n"
        f"train: {{model: {data / 'base'}, text_encoder: {data / 'text'}, lora_rank: 4, steps: 3, batch_size: 2,\n"
        "        warmup_steps: 1, checkpoint_every: 3}\n"
    )
    result = run_cli("run", recipe, "--urls", folder, "-w", tmp_path / "work")
    assert result.exit_code == 0, result.output
    assert "packed 8 image(s)" in result.output
    assert (tmp_path / "work" / "export" / DIFFUSERS_FILE).exists()
    assert not (tmp_path / "work" / "urls" / "kept.parquet").exists()  # no URL table, no prefilter
    result = run_cli("report", tmp_path / "work")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "work" / "report" / "index.html").read_text()
    assert "<td>images in the folder</td><td>8</td>" in page  # a folder source: how many went in
    assert "<summary>encode</summary>" in page and "<summary>train</summary>" in page  # each stage's settings
    assert "lora_rank" in report_section(page, "settings")
    result = run_cli("status", tmp_path / "work")
    assert result.exit_code == 0 and "train" in result.output


class _LogLines:
    """A kill marker: `log.jsonl` holds a line for `step` (and, with `checkpoint`, that checkpoint is done)."""

    def __init__(self, run, step, checkpoint=None):
        self.log, self.step = run / "log.jsonl", step
        self.checkpoint = (
            run / "checkpoints" / f"step-{checkpoint:07d}" / "state.json" if checkpoint else None
        )

    def exists(self):
        if self.checkpoint and not self.checkpoint.exists():
            return False
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return any(line.startswith(f'{{"step": {self.step},') for line in lines)


@pytest.mark.slow  # kills and restarts training processes
def test_a_lora_run_killed_before_or_after_its_first_checkpoint_resumes_to_the_straight_runs_log(
    data, tmp_path
):
    """Killed before its first checkpoint, a run resumes from step 0 with its saved settings (or starts
    again when not resumed) and its log is the straight run's, line for line; killed after one, the same."""
    import subprocess
    import sys

    from tests.conftest import kill_when_done

    def command(run, *extra):
        return [sys.executable, "-m", "latentmill", "train", "-o", str(run), *extra]

    settings = [str(data / "photos"), "--model", str(data / "base"), "--text-encoder", str(data / "text"),
                "--lora-rank", "2", "--steps", "8", "--checkpoint-every", "5", "--log-every", "1",
                "--batch-size", "4", "--learning-rate", "0.01", "--warmup-steps", "1"]  # fmt: skip

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    def losses(run):
        return [(entry["step"], entry["loss"]) for entry in log(run)]

    straight = tmp_path / "straight"
    subprocess.run(command(straight, *settings), check=True, capture_output=True)
    assert [step for step, _ in losses(straight)] == list(range(1, 9))
    for name, marker, then in (
        ("early-resumed", lambda run: _LogLines(run, 2), ["--resume"]),  # no checkpoint yet
        ("early-restarted", lambda run: _LogLines(run, 2), settings),  # started again, not resumed
        ("late-resumed", lambda run: _LogLines(run, 6, checkpoint=5), ["--resume"]),
    ):
        run = tmp_path / name
        process = subprocess.Popen(
            command(run, *settings),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kill_when_done(process, marker(run))
        steps = [entry["step"] for entry in log(run)]
        assert steps and steps[-1] < 8, (name, steps)  # stopped mid-way
        if name.startswith("early"):
            assert not list((run / "checkpoints").glob("step-*")), (name, "a checkpoint was written")
        result = subprocess.run(command(run, *then), capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr[-800:])
        assert losses(run) == losses(straight), name  # each step once, with the straight run's loss
