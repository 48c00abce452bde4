"""CLIP embeddings, predictor heads and selection rules."""
