"""The numbers of `latentmill eval`: the Fréchet distance between two feature sets (FID when the features
are Inception's), the kernel distance (KID), precision and recall, and the CLIP score.

- Fréchet distance: ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64 with scipy's matrix square root;
  a square root that is not finite is taken again with 1e-6 added to both diagonals, and an imaginary part
  left by numerical error is dropped (refused when it is not small), as pytorch-fid and clean-fid do.
- KID: the unbiased estimate of the squared MMD with the polynomial kernel k(x, y) = (x·y / d + 1)³, averaged
  over random subsets (Bińkowski et al. 2018; clean-fid's and torch-fidelity's defaults: 100 subsets of at
  most 1000).
- precision / recall (Kynkäänniemi et al. 2019): the share of generated features inside the k-NN ball
  (k = 3) of some reference feature, and the other way round.
- CLIP score: 100 × max(cos(image, caption), 0), averaged (Hessel et al. 2021, as torchmetrics defines it).
"""

from __future__ import annotations

import numpy as np

from latentmill.errors import InputError


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, d) features in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(
            f"features of {mu1.shape[0]} and {mu2.shape[0]} dimensions: compare sets in one feature space."
        )
    diff = mu1 - mu2
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the matrix square root has an imaginary part of {np.abs(root.imag).max():.3g}")
        root = root.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """(mean, std) over `subsets` random subsets of the unbiased squared MMD with the cubic polynomial kernel."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise InputError("KID needs at least 2 images in each set.")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def precision_recall(reference: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-NN balls (the pairwise distances: cheap for a few thousand)."""

    def radii(x):
        distances = _distances(x, x)
        return np.sort(distances, axis=1)[:, min(k, len(x) - 1)]

    reference, generated = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    if min(len(reference), len(generated)) <= k:
        return float("nan"), float("nan")
    precision = (_distances(generated, reference) <= radii(reference)[None, :]).any(axis=1).mean()
    recall = (_distances(reference, generated) <= radii(generated)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.maximum(squared, 0))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """100 × max(cosine, 0) of each image with its caption, averaged."""
    a = np.asarray(image_embeddings, np.float64)
    b = np.asarray(text_embeddings, np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float((100 * np.maximum(cosine, 0)).mean())
