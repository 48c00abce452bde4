"""Flow matching checked against diffusers itself: the timestep densities (training_utils
compute_density_for_timestep_sampling), SD3's loss weightings (compute_loss_weighting_for_sd3), the sigmas
and the noisy latent FlowMatchEulerDiscreteScheduler makes at the same index, Flux's exponential time shift,
and the loss against a hand computation."""

import math

import pytest
import torch

from latentmill.train.flowmatching import FlowMatching, density, dynamic_mu, loss_weighting


@pytest.mark.parametrize("kind", ["logit_normal", "mode", "uniform"])
def test_the_densities_draw_what_diffusers_draws(kind):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = density(kind, 64, torch.Generator().manual_seed(3), 0.2, 0.8, 1.29)
    theirs = compute_density_for_timestep_sampling(
        kind, 64, logit_mean=0.2, logit_std=0.8, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["none", "sigma_sqrt", "cosmap"])
def test_the_loss_weightings_are_sd3s(kind):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(0.05, 0.95, 19)
    assert torch.equal(loss_weighting(kind, sigmas), compute_loss_weighting_for_sd3(kind, sigmas))


def test_the_noisy_latent_and_timesteps_are_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    objective = FlowMatching(predict=None, shift=3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents, noise = torch.randn(5, 16, 8, 8), torch.randn(5, 16, 8, 8)
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    timesteps, sigmas = objective.levels(u, latents)
    index = (u * 1000).long()
    assert torch.equal(timesteps, scheduler.timesteps[index]) and torch.equal(sigmas, scheduler.sigmas[index])
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(
        (1 - s) * latents + s * noise, scheduler.scale_noise(latents, timesteps, noise), atol=1e-6
    )


def test_fluxs_resolution_dependent_shift_is_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    objective = FlowMatching(predict=None, dynamic_shift=True, patch_size=2)
    latents = torch.zeros(3, 16, 64, 48)  # 32 x 24 = 768 tokens of 2x2 patches
    assert dynamic_mu(768) == pytest.approx(calculate_shift(768))
    u = torch.tensor([0.1, 0.5, 0.9])
    _, sigmas = objective.levels(u, latents)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    plain = FlowMatchEulerDiscreteScheduler().sigmas[(u * 1000).long()]
    assert torch.allclose(sigmas, scheduler.time_shift(calculate_shift(768), 1.0, plain), atol=1e-6)
    assert (sigmas > plain).all()  # a larger image is noised more


def test_the_loss_is_the_hand_computed_one():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 1)

    def predict(model, noisy, timesteps, text, metas, inpaint):
        return model(noisy) * (1 + timesteps.view(-1, 1, 1, 1) / 1000) + text.mean()

    objective = FlowMatching(predict=predict, shift=3.0, weighting="cosmap")
    latents, text = torch.randn(6, 4, 8, 8), torch.randn(6, 7, 32)
    loss = objective.loss(model, latents, text, None, None, torch.Generator().manual_seed(11))

    generator = torch.Generator().manual_seed(11)  # the same draws in the same order: noise, then u
    noise = torch.randn(latents.shape, generator=generator)
    u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(6,), generator=generator))
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigma = scheduler.sigmas[(u * 1000).long()].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    prediction = model(noisy) * (1 + sigma * 1000 / 1000) + text.mean()
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    expected = (weight * (prediction - (noise - latents)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert model.weight.grad.abs().sum() > 0
