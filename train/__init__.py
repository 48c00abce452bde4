"""Streaming latent loader, U-Net construction, the training loop, sampling and export."""
