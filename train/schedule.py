"""The one noise schedule: Stable Diffusion's scaled-linear betas over 1,000 steps. Training adds noise with
it (DDPM), sampling and the exported pipeline denoise with it (DDIM); defined once so they cannot drift."""

from __future__ import annotations

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}


def training_scheduler(prediction: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, prediction_type=prediction)


def sampling_scheduler(prediction: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SCHEDULE, prediction_type=prediction, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
