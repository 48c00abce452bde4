"""latentmill: from a table of image URLs to a trained latent-diffusion model."""

__version__ = "0.1.0"
