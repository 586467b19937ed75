"""The evaluation's non-adversarial measurements (Tables 1-2, Figure 1), as pure functions of tensors.

Reconstruction MSE on the 0-255 scale (Table 2), the latent pair distance (Table 1), the
mixture-clustering accuracy of raven-gmm, and the t-SNE of clean and noisy encodings
(Figure 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from raven.eval.probe import N_CLASSES
from raven.gaussians import reparameterize
from raven.objectives import aug_variance, mixture_component_log_prob


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, batch_size: int = 5000) -> torch.Tensor:
    """x_hat = sigmoid(Dec(mu_x)) for every row of x."""
    return torch.cat([torch.sigmoid(model.decoder(model.encoder(x[i:i + batch_size])[0]))
                      for i in range(0, len(x), batch_size)])


def reconstruction_mse_255(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over images and pixels of (255 (x - x_hat))^2 (Table 2's MSE)."""
    return float(((x.double() - x_hat.double()) * 255.0).pow(2).mean())


def latent_pair_distance(mu_clean: torch.Tensor, mu_noisy: torch.Tensor) -> tuple[float, float]:
    """Table 1, reading of the means: mean and std (ddof 0) over images of ||mu(x~) - mu(x)||^2."""
    d = (mu_clean.double() - mu_noisy.double()).pow(2).sum(dim=1)
    return float(d.mean()), float(d.std(unbiased=False)) if len(d) > 1 else 0.0


@torch.no_grad()
def sampled_latent_pair_distance(model: nn.Module, x_clean: torch.Tensor, x_noisy: torch.Tensor,
                                 generator: torch.Generator, batch_size: int = 5000) -> tuple[float, float]:
    """Table 1, reading of sampled latents: mean and std (ddof 0) of ||z~ - z||^2, z~ ~ q(.|x~), z ~ q(.|x).

    One draw of each latent per image, independent, as Theorem 1's q(z|x) q(z'|x') factorises;
    its expectation is ||mu~ - mu||^2 + tr Sigma~ + tr Sigma, so the posterior variances count.
    """
    distances = []
    for i in range(0, len(x_clean), batch_size):
        z_clean = reparameterize(*model.encoder(x_clean[i:i + batch_size]), generator)
        z_noisy = reparameterize(*model.encoder(x_noisy[i:i + batch_size]), generator)
        distances.append((z_clean.double() - z_noisy.double()).pow(2).sum(dim=1))
    d = torch.cat(distances)
    return float(d.mean()), float(d.std(unbiased=False)) if len(d) > 1 else 0.0


@torch.no_grad()
def mixture_assignments(model: nn.Module, x: torch.Tensor, sigma_aug: float | tuple[float, ...] | None,
                        batch_size: int = 5000) -> torch.Tensor:
    """argmax_c log pi_c + log N(mu_x; mu_c, Sigma_c + Sigma_aug) for a raven-gmm model, per image."""
    prior = model.prior
    out = []
    for i in range(0, len(x), batch_size):
        mu = model.encoder(x[i:i + batch_size])[0]
        extra = aug_variance(sigma_aug, mu) if sigma_aug is not None else 0.0
        out.append(mixture_component_log_prob(mu, prior.logits, prior.means, prior.logvars, extra).argmax(dim=1))
    return torch.cat(out)


def cluster_accuracy(assignments: Any, labels: Any) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels (Hungarian algorithm).

    Clusters left unmatched (more clusters than labels) count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(torch.as_tensor(assignments).cpu(), dtype=np.int64)
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if a.shape != y.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"assignments and labels must be equal-length 1-d arrays, got {a.shape} and {y.shape}")
    counts = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (a, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(a))


def first_of_each_class(y: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    picks = []
    labels = y.cpu().numpy()
    for cls in range(N_CLASSES):
        where = np.flatnonzero(labels == cls)
        if len(where):
            picks.append(int(where[0]))
    for i in range(len(labels)):  # fill up when classes are missing
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    return torch.tensor(sorted(picks[:n]), dtype=torch.long)


def tsne_embedding(mu_clean: torch.Tensor, mu_noisy: torch.Tensor, seed: int) -> np.ndarray:
    """2-d t-SNE (sklearn, PCA init, seeded) of the clean and noisy encodings stacked."""
    from sklearn.manifold import TSNE

    points = torch.cat([mu_clean, mu_noisy]).double().cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
