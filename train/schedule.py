"""The one noise schedule: Stable Diffusion's scaled-linear betas over 1,000 steps. Training adds noise with
it (DDPM), sampling and the exported pipeline denoise with it (DDIM); defined once so they cannot drift."""

from __future__ import annotations

from latentmill.errors import InputError

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}


def training_scheduler(prediction: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, prediction_type=prediction)


# `--sampler` of the DDPM families (sd-unet, sdxl): diffusers' schedulers, each made from the DDIM one's
# config (diffusers' own way to swap a pipeline's scheduler), so every one denoises the training schedule
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# the flow-matching families' (sd3, flux): their own Euler
FLOW_SAMPLERS = ("euler",)
SAMPLER_NAMES = tuple(dict.fromkeys([*SAMPLERS, *FLOW_SAMPLERS]))


def sampling_scheduler(prediction: str, sampler: str | None = None):
    """The scheduler sample grids, `sample` and `eval` denoise with: DDIM (the exported pipelines' too), or
    the `sampler` named (SAMPLERS)."""
    import diffusers

    ddim = (
        diffusers.DDIMScheduler(  # every value given: from_config takes the ones left at a default as unset
            **SCHEDULE,
            prediction_type=prediction,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        )
    )
    return with_sampler(ddim, sampler)


def with_sampler(scheduler, sampler: str | None, family: str = "sd-unet"):
    """`scheduler` (a DDPM pipeline's) swapped for the `sampler` named, from its config; None keeps it."""
    import diffusers

    if sampler in (None, "ddim") and type(scheduler).__name__ == "DDIMScheduler":
        return scheduler
    if sampler not in SAMPLERS:
        raise InputError(
            f"--sampler {sampler}: the {family} family samples with {', '.join(SAMPLERS)} (flow matching's "
            f"families with {', '.join(FLOW_SAMPLERS)})."
        )
    name, extra = SAMPLERS[sampler or "ddim"]
    return getattr(diffusers, name).from_config(scheduler.config, **extra)


def step_options(scheduler, seed: int) -> dict:
    """What `scheduler.step` takes besides the prediction: a seeded generator where it draws noise (the
    ancestral and SDE samplers), so a sampled image is a function of its seed."""
    import inspect

    import torch

    if "generator" not in inspect.signature(scheduler.step).parameters:
        return {}
    return {"generator": torch.Generator().manual_seed(seed)}
