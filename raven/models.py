"""Gaussian MLP encoder, Bernoulli MLP decoder, and the trainable mixture prior (Appendix B).

Section 4.1.2 / Appendix C.2: symmetric MLPs 784-500-250-d and d-250-500-784 with PReLU
activations and no normalisation layers.
"""

from __future__ import annotations

import torch
from torch import nn

from raven.data import IMAGE_SIZE


class Encoder(nn.Module):
    """x (N, 784) -> (mu, logvar), each (N, d)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(IMAGE_SIZE, 500), nn.PReLU(), nn.Linear(500, 250), nn.PReLU(), nn.Linear(250, 2 * latent_dim)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.body(x).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z (N, d) -> Bernoulli logits (N, 784)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(latent_dim, 250), nn.PReLU(), nn.Linear(250, 500), nn.PReLU(), nn.Linear(500, IMAGE_SIZE)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class MixturePrior(nn.Module):
    """p_psi(z~) = sum_c pi_c N(mu_c, diag sigma_c^2) with every parameter trainable (Appendix B)."""

    def __init__(self, n_components: int, latent_dim: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_components))
        # Spread the means so the components start apart rather than collapsed at 0.
        self.means = nn.Parameter(torch.randn(n_components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(n_components, latent_dim))


class RavenModel(nn.Module):
    """The auto-encoder shared by every method; `prior` is set for raven-gmm only."""

    def __init__(self, latent_dim: int = 10, n_components: int | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(latent_dim)
        self.decoder = Decoder(latent_dim)
        self.prior = MixturePrior(n_components, latent_dim) if n_components else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] of shape (N, 784) -> (mu, logvar) of q(z|x), each (N, d)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != IMAGE_SIZE:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"encode expects images of shape (N, {IMAGE_SIZE}) with values in [0, 1], got {shape}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, d) -> Bernoulli logits (N, 784); sigmoid gives the mean image."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects latents of shape (N, {self.latent_dim}), got {shape}")
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean reconstruction sigmoid(Dec(mu_x)) in [0, 1], the image used for MSE and FID."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decoder(mu))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
