"""The flow-matching transformer families (SD3.5 and Flux.1) end to end on tiny configs: 16-channel latents
from the tiny16 VAE, the tiny text encoders written from configs, train -> resume -> sample -> export ->
the family's diffusers pipeline generates what latentmill's sampler does -> LoRA on the exported pipeline,
its base untouched, its file loaded by the pipeline's `load_lora_weights`."""

import json

import numpy as np
import pytest
import torch

FLOW = {"sd3": "tiny-sd3", "flux": "tiny-flux"}
FAMILIES = {"sdxl": "tiny-sdxl"} | FLOW  # the families whose text encoders are their pipeline's own
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
GUIDANCE = {"sdxl": 5.0, "sd3": 5.0, "flux": 3.5}


@pytest.fixture(scope="module")
def latents16(tmp_path_factory):
    """8 pictures at 64 px as tiny16 latents (16 channels, SD3's scaling and shift), 2 of them held out, and
    2 more in a second folder."""
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import SMALL_ENCODE, small_image_shards

    root = tmp_path_factory.mktemp("latents16")
    small_image_shards(root / "images", shards=2, per_shard=4)
    encode(
        root / "images",
        root / "latents",
        EncodeConfig(**(SMALL_ENCODE | {"vae": "tiny16", "step": 32, "validation_share": 0.25})),
    )
    small_image_shards(root / "more-images", shards=1, per_shard=2)  # class images, a second folder
    encode(
        root / "more-images", root / "more", EncodeConfig(**(SMALL_ENCODE | {"vae": "tiny16", "step": 32}))
    )
    # SDXL's latent space: 4 channels (the tiny VAE)
    encode(root / "images", root / "latents4", EncodeConfig(**(SMALL_ENCODE | {"validation_share": 0.25})))
    encode(root / "more-images", root / "more4", EncodeConfig(**SMALL_ENCODE))
    return root


def _folders(family):
    """(training latents, a second folder) of the family's latent space."""
    return ("latents4", "more4") if family == "sdxl" else ("latents", "more")


def _config(root, run, model, **settings):
    from latentmill.train.config import TrainConfig
    from latentmill.train.families import infer_family

    base = dict(
        shards=[str(root / _folders(infer_family(model))[0])],
        output=str(run),
        model=model,
        batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        checkpoint_every=1,
        log_every=1,
    )
    return TrainConfig(**(base | settings))


def test_the_manifest_records_the_16_channel_latent_space(latents16):
    manifest = json.loads((latents16 / "latents" / "manifest.json").read_text())
    assert manifest["latent_channels"] == 16
    assert manifest["shift_factor"] == pytest.approx(0.0609) and manifest["scaling_factor"] == pytest.approx(
        1.5305
    )


@pytest.mark.parametrize("family", FLOW)
def test_the_flow_matching_loss_is_the_hand_computed_one(family):
    """The family's loss at a seed equals the SD3 paper's, computed here from diffusers' own pieces: the
    density draw, the scheduler's sigma table, x = (1 - s) x0 + s noise, target noise - x0, and the
    transformer called the way diffusers' training script for the family calls it."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from latentmill.train.families import family_of

    f = family_of(family)
    cfg = SimpleNamespace(
        text_encoder=None, model=FAMILIES[family], caption_dropout=0.0, shuffle_tags=False, tag_dropout=0.0,
        keep_tags=0, max_sequence_length=None, seed=0, guidance_scale=3.5, flow_shift=None,
        timestep_density="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, loss_weighting="none",
        dynamic_shift=False,
    )  # fmt: skip
    encode, widths, _ = f.conditioning(cfg, {}, None, "cpu", "fp32")
    manifest = {"latent_channels": 16, "downsample_factor": 8, "resolution": 64}
    model = f.build(cfg, manifest, widths).eval()
    text = encode({"captions": ["a red circle", "a blue square"]}, torch.Generator().manual_seed(1))
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = f.objective(cfg, "cpu").loss(model, x0, text, [{}, {}], None, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=0.0, logit_std=1.0, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=f.default_shift)
    index = (u * 1000).long()
    sigmas = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * x0 + sigmas * noise
    timesteps = scheduler.timesteps[index]
    with torch.no_grad():
        if family == "sd3":
            pred = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                         pooled_projections=text["pooled"], return_dict=False)[0]  # fmt: skip
        else:  # 2x2 packing by hand, image ids (0, row, col), text ids zero, dev's guidance 3.5
            packed = noisy.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
            ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(
                16, 2
            )
            img_ids = torch.cat([torch.zeros(16, 1), ids.float()], dim=1)
            out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((2,), 3.5),
                        pooled_projections=text["pooled"], encoder_hidden_states=text["prompt_embeds"],
                        txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3), img_ids=img_ids,
                        return_dict=False)[0]  # fmt: skip
            pred = out.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)
    hand = ((pred.float() - (noise - x0)) ** 2).mean()
    assert ours.item() == pytest.approx(hand.item(), rel=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, latents16, tmp_path_factory):
    """A family's full fine-tune of its tiny config: 2 steps with the validation loss, and the same run
    stopped after step 1 and resumed."""
    from latentmill.train.loop import train

    family = request.param
    root = tmp_path_factory.mktemp(f"run-{family}")
    straight = root / "straight"
    train(_config(latents16, straight, FAMILIES[family], steps=2, eval_every=2, eval_samples=2))
    resumed = root / "resumed"
    train(_config(latents16, resumed, FAMILIES[family], steps=1))
    train(_config(latents16, resumed, FAMILIES[family], steps=2, resume=True))
    return family, straight, resumed


def _weights(run):
    from safetensors.torch import load_file

    (last,) = sorted((run / "checkpoints").iterdir())[-1:]
    return load_file(last / "unet.safetensors"), json.loads((last / "state.json").read_text())


def test_a_run_trains_records_its_family_and_resumes_exactly(trained):
    from latentmill.train.families import family_of

    family, straight, resumed = trained
    a, state = _weights(straight)
    b, _ = _weights(resumed)
    assert state["config"]["family"] == family
    assert json.loads((straight / "lineage.json").read_text())  # the lineage is written
    fresh = family_of(family).from_config(
        json.loads((sorted((straight / "checkpoints").iterdir())[0] / "unet_config.json").read_text())
    )
    denoiser = {
        "sdxl": "UNet2DConditionModel",
        "sd3": "SD3Transformer2DModel",
        "flux": "FluxTransformer2DModel",
    }
    assert type(fresh).__name__ == denoiser[family]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact resume on CPU
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["loss"]) and np.isfinite(log[-1]["val_loss"]) and "val_loss_ema" in log[-1]


def test_one_step_changes_the_weights(trained, latents16, tmp_path):
    from latentmill.train.loop import train

    family, straight, _ = trained
    first, _ = _weights(straight)
    train(_config(latents16, tmp_path / "one", FAMILIES[family], steps=1))
    one, _ = _weights(tmp_path / "one")
    train(_config(latents16, tmp_path / "zero-lr", FAMILIES[family], steps=1, learning_rate=1e-12))
    still, _ = _weights(tmp_path / "zero-lr")
    assert any(not torch.equal(one[k], still[k]) for k in one)


def test_the_export_loads_in_the_family_pipeline_and_generates_what_sample_does(trained, tmp_path, run_cli):
    import diffusers

    from latentmill.train.sampling import sampler

    family, straight, _ = trained
    out = run_cli("export", straight, "-o", tmp_path / "pipe")
    assert out.exit_code == 0, out.output
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(tmp_path / "pipe", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a landscape"]
    tokens = (
        32  # what the run trained with: SD3's 77 T5 tokens and Flux's 512, cut to the tiny T5 tokenizer's 32
    )
    extra = {} if family == "sdxl" else {"max_sequence_length": tokens}
    images = pipe(prompts, num_inference_steps=3, guidance_scale=GUIDANCE[family], height=64, width=64,
                  generator=torch.Generator().manual_seed(7), output_type="np", **extra).images  # fmt: skip
    assert np.isfinite(images).all() and images.shape == (2, 64, 64, 3)
    ours = sampler(straight)(prompts, 7, 3, GUIDANCE[family], (64, 64))
    theirs = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # the same sampler, up to rounding
    grid = run_cli("sample", straight, "--prompt", "a cat", "--sampler-steps", "2", "-o", tmp_path / "g.png")
    assert grid.exit_code == 0 and (tmp_path / "g.png").exists(), grid.output


def test_lora_on_the_exported_pipeline_trains_adapters_only_and_loads_in_diffusers(
    trained, latents16, tmp_path, run_cli
):
    import diffusers
    from safetensors.torch import load_file

    from latentmill.curate.fingerprints import weights_fingerprint
    from latentmill.train.loop import train

    family, straight, _ = trained
    assert run_cli("export", straight, "-o", tmp_path / "base").exit_code == 0
    cls = getattr(diffusers, PIPELINES[family])
    base = cls.from_pretrained(tmp_path / "base", local_files_only=True)
    before = weights_fingerprint((base.unet if family == "sdxl" else base.transformer).state_dict())
    # the family comes from the pipeline folder's model_index.json; so do the text encoders
    train(
        _config(
            latents16, tmp_path / "lora", str(tmp_path / "base"), steps=2, lora_rank=4, learning_rate=1e-2
        )
    )
    (last,) = sorted((tmp_path / "lora" / "checkpoints").iterdir())[-1:]
    adapter = json.loads((last / "adapter.json").read_text())
    assert adapter["base_fingerprint"] == before  # the base did not move
    assert json.loads((last / "state.json").read_text())["config"]["family"] == family
    if family in FLOW:  # the joint attention's text stream gets adapters too
        assert any("add_q_proj" in name for name in load_file(last / "lora.safetensors"))
    out = run_cli("export", tmp_path / "lora", "-o", tmp_path / "adapter")
    assert out.exit_code == 0, out.output
    lora_file = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    prefix = "unet." if family == "sdxl" else "transformer."
    assert all(key.startswith(prefix) for key in load_file(lora_file))
    base.set_progress_bar_config(disable=True)

    def run():
        return base(["a cat"], num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain = run()
    base.load_lora_weights(str(lora_file))
    adapted = run()
    assert torch.isfinite(adapted).all() and not torch.equal(plain, adapted)
    kohya = run_cli("export", tmp_path / "lora", "--format", "kohya", "-o", tmp_path / "kohya.safetensors")
    if family == "sd3":  # sd-scripts has no SD3 layout diffusers reads: refused, nothing written
        assert kohya.exit_code == 2 and "--format diffusers" in kohya.output
        assert not (tmp_path / "kohya.safetensors").exists()
        return
    assert kohya.exit_code == 0, kohya.output
    keys = load_file(tmp_path / "kohya.safetensors")
    assert all(key.startswith("lora_unet_") for key in keys)
    if (
        family == "flux"
    ):  # BFL's names, q/k/v fused (read back by diffusers at FLUX.1's width: test_kohyalayouts)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
        return
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)  # SDXL: ldm names, as sd-scripts
    base.unload_lora_weights()
    assert torch.equal(run(), plain)
    base.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    torch.testing.assert_close(
        run(), adapted, rtol=1e-4, atol=1e-5
    )  # the same adapter, read from kohya's keys


def test_shards_of_another_latent_space_are_refused_by_name(tmp_path, run_cli):
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import SMALL_ENCODE, small_image_shards

    small_image_shards(tmp_path / "images", shards=1, per_shard=2)
    encode(tmp_path / "images", tmp_path / "latents", EncodeConfig(**SMALL_ENCODE))  # 4-channel (SD's)
    out = run_cli(
        "train", tmp_path / "latents", "-o", tmp_path / "run", "--model", "tiny-sd3", "--steps", "1"
    )
    assert out.exit_code == 2
    assert "4-channel" in out.output and "sd3" in out.output and "tiny16" in out.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_dreambooth_a_mixture_and_eval_run_for_the_family(family, latents16, tmp_path, run_cli, monkeypatch):
    """DreamBooth (a second folder as class images), a two-folder mixture and `eval run` of the result
    go through the family like a plain run."""
    from latentmill.train.loop import train

    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    latents, held_out = (str(latents16 / name) for name in _folders(family))
    train(_config(latents16, tmp_path / "db", FAMILIES[family], shards=[], instance=latents, class_data=held_out,
                  steps=1, prior_loss_weight=0.5))  # fmt: skip
    train(
        _config(
            latents16, tmp_path / "mix", FAMILIES[family], shards=[latents, held_out], mix=[0.5, 0.5], steps=1
        )
    )
    for run in ("db", "mix"):
        state = json.loads(
            sorted((tmp_path / run / "checkpoints").iterdir())[-1].joinpath("state.json").read_text()
        )
        assert state["step"] == 1 and state["config"]["family"] == family
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = run_cli("eval", "run", tmp_path / "mix", "--prompts", tmp_path / "prompts.txt", "--count", "2",
                  "--sampler-steps", "2", "--clip-model", "tiny-rn", "-o", tmp_path / "eval.json")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["clip_score"] <= 100


def test_the_family_recipes_name_the_real_models_and_fail_in_preflight_offline(
    tmp_path, run_cli, monkeypatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # what a fresh machine has
    (tmp_path / "mine").mkdir()
    for recipe, model in (
        ("sd35-finetune", "stabilityai/stable-diffusion-3.5-medium"),
        ("flux-lora", "black-forest-labs/FLUX.1-dev"),
    ):
        out = run_cli("run", recipe, "--urls", tmp_path / "mine", "-w", tmp_path / recipe)
        assert out.exit_code == 2, out.output
        assert (
            f"train.model: {model} is not in the local Hugging Face cache: `hf download {model}`"
            in out.output
        )
        assert f"encode.vae: {model} is not in the local Hugging Face cache" in out.output
        assert not (tmp_path / recipe).exists()


@pytest.mark.slow
def test_a_flux_run_under_torchrun_with_2_ranks_resumes_exactly(latents16, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    def torchrun(run, steps, *more):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "latentmill", "train", str(latents16 / "latents"), "--model", "tiny-flux", "-o", str(run),
             "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "1", "--warmup-steps", "0", *more],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "straight", 2)
    torchrun(tmp_path / "resumed", 1)
    torchrun(tmp_path / "resumed", 2, "--resume")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert len(state["loader"]["ranks"]) == 2 and state["config"]["family"] == "flux"
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000002" / "unet.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000002" / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_stored_text_states_train_as_the_encoders_on_the_device_do(family, latents16, tmp_path, run_cli):
    """`encode-text` writes one shard of states per latent shard, listed in its manifest; `train --text-states`
    joins them by key and trains as the run with the encoders on the device (float32 states: the same
    numbers); a second encode-text run has nothing to do, and a shard whose marker is gone is made again."""
    from safetensors.torch import load_file

    from latentmill.train.loop import train

    model, latents = FAMILIES[family], latents16 / _folders(family)[0]
    states = tmp_path / "text"
    out = run_cli("encode-text", latents, "-o", states, "--model", model, "--dtype", "float32")
    assert out.exit_code == 0, out.output
    manifest = json.loads((states / "manifest.json").read_text())
    assert manifest["family"] == family and set(manifest["tensors"]) >= {"prompt_embeds", "pooled"}
    assert all(spec["dtype"] == "float32" for spec in manifest["tensors"].values())
    shards = sorted(p.stem for p in latents.glob("*.tar"))
    assert sorted(p.stem for p in states.glob("*.tar")) == shards
    again = run_cli("encode-text", latents, "-o", states, "--model", model, "--dtype", "float32")
    assert again.exit_code == 0 and f"0 shard(s) encoded (0 captions), {len(shards)} already" in again.output
    (states / f"{shards[0]}.json").unlink()
    once = run_cli("encode-text", latents, "-o", states, "--model", model, "--dtype", "float32")
    assert "1 shard(s) encoded" in once.output, once.output
    train(_config(latents16, tmp_path / "device", model, steps=2))
    train(_config(latents16, tmp_path / "stored", model, steps=2, text_states=str(states)))
    logs = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("device", "stored")
    ]
    # step 2's loss is of the weights step 1 made: the same states gave the same update (Adam's normalised
    # steps amplify the last bits of near-zero gradients, so single weights are not compared)
    assert len(logs[0]) == 2 and logs[0] == pytest.approx(logs[1], rel=1e-4)
    assert load_file(states / "empty.safetensors").keys() == manifest["tensors"].keys()


def test_text_states_of_another_family_or_missing_shards_are_refused_by_name(latents16, tmp_path, run_cli):
    from latentmill.errors import InputError
    from latentmill.train.loop import train

    states = tmp_path / "text"
    assert run_cli("encode-text", latents16 / "latents", "-o", states, "--model", "tiny-flux").exit_code == 0
    with pytest.raises(
        InputError, match=r"states of the flux family's text encoders, and this run trains sd3"
    ):
        train(_config(latents16, tmp_path / "sd3", "tiny-sd3", steps=1, text_states=str(states)))
    (victim,) = sorted(states.glob("*.json"))[:1]
    victim.unlink()
    with pytest.raises(InputError, match=rf"no states for .*{victim.stem}.*encode-text"):
        train(_config(latents16, tmp_path / "flux", "tiny-flux", steps=1, text_states=str(states)))
    assert (
        not (tmp_path / "sd3").exists() and not (tmp_path / "flux").exists()
    )  # refused before the run folder
    unet = run_cli("encode-text", latents16 / "latents4", "-o", tmp_path / "u", "--model", "tiny")
    assert unet.exit_code == 2 and "encode --text-encoder" in unet.output


def test_an_sdxl_run_exports_as_one_file_that_from_single_file_reads_as_the_same_model(
    trained, tmp_path, run_cli
):
    """SDXL's single file: the U-Net and VAE in the ldm layout, CLIP-L under conditioner.embedders.0, CLIP-G
    in open_clip's layout under conditioner.embedders.1; the flow families' files are refused by name."""
    from diffusers import StableDiffusionXLPipeline

    family, straight, _ = trained
    out = run_cli("export", straight, "--format", "single-file", "-o", tmp_path / "model.safetensors")
    if family != "sdxl":
        assert out.exit_code == 2 and "--format pipeline" in out.output
        return
    assert out.exit_code == 0, out.output
    assert run_cli("export", straight, "-o", tmp_path / "pipe").exit_code == 0
    folder = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tmp_path / "pipe"), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), (part, name)


def test_logging_sampling_and_checkpoints_each_fire_on_their_own_steps_and_at_the_last(latents16, tmp_path):
    from latentmill.train.loop import train

    run = tmp_path / "run"
    cadences = dict(steps=5, log_every=10, sample_every=2, sample_steps=1, checkpoint_every=4)
    train(_config(latents16, run, "tiny-sdxl", sample_prompts=["a cat"], **cadences))
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        f"step-{s:07d}.png" for s in (2, 4, 5)
    ]  # not only where a log line is written
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 5]  # the first step, then the last
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000004", "step-0000005"]
