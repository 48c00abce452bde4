"""Per model family: (1) one training step of latentmill's, through the family seam (its conditioning, its
objective, backward, AdamW), against the same step written the way diffusers' own training script for the
family writes it (train_text_to_image_sdxl.py, train_dreambooth_sd3.py, train_dreambooth_flux.py), on the
same tiny model, batch and device, timed alternately in one run: the ratio is baseline time / ours (>= 1.0:
no slower); (2) forward FLOPs per sample of the real models, counted by torch's FlopCounterMode on their
published configs built on the meta device (no weights), at 512^2 and 1024^2, the number an MFU needs.

    python -m bench.bench_families --steps 20          # both parts
    python -m bench.bench_families --flops-only        # FLOPs only (no training)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

# published configs (config.json of each model's transformer/ or unet/ folder)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)  # fmt: skip
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
TEXT_TOKENS = {"sdxl": 77, "sd3": 77 + 77, "flux": 512}  # CLIP (+ T5) tokens the training scripts use


def forward_flops(name: str, config: dict, side: int) -> tuple[float, int]:
    """(forward FLOPs of one sample at side x side px, parameters)."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    cls = {"sdxl": diffusers.UNet2DConditionModel, "sd3": diffusers.SD3Transformer2DModel}.get(
        name, diffusers.FluxTransformer2DModel
    )
    with torch.device("meta"):
        model = cls(**config)
        params = sum(p.numel() for p in model.parameters())
        h = w = side // 8
        text = torch.randn(
            1, TEXT_TOKENS[name], config.get("joint_attention_dim", config.get("cross_attention_dim"))
        )
        with FlopCounterMode(display=False) as counter:
            if name == "sdxl":
                model(torch.randn(1, 4, h, w), torch.tensor([500]), encoder_hidden_states=text,
                      added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})  # fmt: skip
            elif name == "sd3":
                model(hidden_states=torch.randn(1, 16, h, w), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=text, pooled_projections=torch.randn(1, 2048))  # fmt: skip
            else:
                tokens = (h // 2) * (w // 2)
                ids = torch.zeros(tokens, 3)
                model(hidden_states=torch.randn(1, tokens, 64), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 768),
                      encoder_hidden_states=text, txt_ids=torch.zeros(TEXT_TOKENS[name], 3), img_ids=ids)  # fmt: skip
    return float(counter.get_total_flops()), params


def _tiny(family: str):
    """The family's tiny model, its conditioning of a batch and its objective, as the trainer builds them."""
    from latentmill.train.families import family_of

    f = family_of(family)
    config = SimpleNamespace(
        text_encoder=None, model=f"tiny-{family}", caption_dropout=0.1, shuffle_tags=False, tag_dropout=0.0,
        keep_tags=0, max_sequence_length=None, seed=0, guidance_scale=3.5, flow_shift=None,
        timestep_density="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, loss_weighting="none",
        dynamic_shift=False, prediction="epsilon", min_snr_gamma=None, noise_offset=0.0, inpainting=False,
        size_conditioning=False,
    )  # fmt: skip
    encode, widths, _ = f.conditioning(config, {}, None, "cpu", "fp32")
    channels = 4 if family == "sdxl" else 16
    manifest = {"latent_channels": channels, "downsample_factor": 8, "resolution": 256}
    model = f.build(config, manifest, widths)
    return f, config, encode, model, f.objective(config, "cpu"), channels


def _baseline_step(family: str, model, text, latents, metas, generator):
    """The step as diffusers' script for the family writes it (its own helpers where it calls them)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if family == "sdxl":  # train_text_to_image_sdxl.py
        scheduler = _baseline_step.ddpm = getattr(_baseline_step, "ddpm", None) or DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
        )
        timesteps = torch.randint(0, 1000, (b,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        add_time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * b, dtype=latents.dtype)
        pred = model(noisy, timesteps, text["prompt_embeds"],
                     added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": text["pooled"]}).sample  # fmt: skip
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if family == "sd3" else 1.0
    )
    u = compute_density_for_timestep_sampling(
        "logit_normal", b, logit_mean=0.0, logit_std=1.0, generator=generator
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    # the scripts' get_sigmas: look each timestep up in the schedule
    schedule = scheduler.timesteps
    step_indices = [(schedule == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if family == "sd3":  # train_dreambooth_sd3.py
        pred = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                     pooled_projections=text["pooled"], return_dict=False)[0]  # fmt: skip
    else:  # train_dreambooth_flux.py
        c, h, w = latents.shape[1:]
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        guidance = torch.tensor([3.5]).expand(b)
        pred = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                     pooled_projections=text["pooled"], encoder_hidden_states=text["prompt_embeds"],
                     txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3), img_ids=ids, return_dict=False)[0]  # fmt: skip
        pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)
    weighting = compute_loss_weighting_for_sd3("none", sigmas)
    target = noise - latents
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def bench_step(family: str, steps: int, batch: int, side: int) -> dict:
    f, config, encode, model, objective, channels = _tiny(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    h = side // 8
    latents = torch.randn(batch, channels, h, h, generator=torch.Generator().manual_seed(0))
    captions = {"captions": ["a photograph of a cat"] * batch}
    metas = [{"original_size": [side, side], "crop": [0, 0], "bucket": [side, side]}] * batch

    def ours(generator):
        text = encode(captions, generator)
        return objective.loss(model, latents, text, metas, None, generator)

    def baseline(generator):
        text = encode(captions, generator)  # the same text encoders, the same states
        return _baseline_step(family, model, text, latents, metas, generator)

    times = {"ours": [], "baseline": []}
    for i in range(steps + 2):  # alternating, the first round of each a warm-up
        for name, step in (("ours", ours), ("baseline", baseline)):
            start = time.perf_counter()
            loss = step(torch.Generator().manual_seed(i))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    a, b = statistics.median(times["ours"]), statistics.median(times["baseline"])
    return {"family": family, "batch": batch, "side": side, "ours_s": round(a, 4), "baseline_s": round(b, 4),
            "ratio": round(b / a, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--flops-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, family, config in (
        ("SDXL", "sdxl", SDXL), ("SD3.5-medium", "sd3", SD35_MEDIUM), ("SD3.5-large", "sd3", SD35_LARGE),
        ("Flux.1-dev", "flux", FLUX_DEV),
    ):  # fmt: skip
        for side in (256, 512, 1024):
            flops, params = forward_flops(family, config, side)
            print(json.dumps({"model": name, "params_B": round(params / 1e9, 2), "side": side,
                              "forward_TFLOP": round(flops / 1e12, 3),
                              "train_step_TFLOP": round(3 * flops / 1e12, 3)}), flush=True)  # fmt: skip
    if args.flops_only:
        return
    for family in ("sdxl", "sd3", "flux"):
        print(json.dumps(bench_step(family, args.steps, args.batch, args.side)), flush=True)


if __name__ == "__main__":
    main()
