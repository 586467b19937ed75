"""The linear probe of the robustness evaluation (Section 4.1): a multinomial logistic regression on mu_x.

The encoder is frozen and an image's representation is the posterior mean mu_x (Eq. 14);
the probe is fitted on the representations of clean training images and read on those of
clean or attacked test images. Both protocols (raven.eval.protocols) and the selection
objectives share it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 10
# Linear probe: full-batch L-BFGS on standardised features, from zero weights.
PROBE_MAX_ITER = 500
PROBE_WEIGHT_DECAY = 1e-4


@torch.no_grad()
def encode_mean(model: nn.Module, x: torch.Tensor, batch_size: int = 5000) -> torch.Tensor:
    """mu_x (Eq. 14) for every row of x, in chunks, on x's device."""
    return torch.cat([model.encoder(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int = N_CLASSES,
                       max_iter: int = PROBE_MAX_ITER, weight_decay: float = PROBE_WEIGHT_DECAY
                       ) -> tuple[nn.Linear, dict[str, Any]]:
    """A multinomial logistic regression on `features` (the encoder means), as nn.Linear(d, n_classes).

    Features are standardised with the training mean and std (a change of coordinates that
    helps L-BFGS; a linear model can represent the same maps either way), the weights start
    at zero, and full-batch L-BFGS (strong Wolfe line search, float64) minimises the mean
    cross-entropy + weight_decay/2 ||W||^2 (on standardised features; the small penalty
    keeps the problem well posed when the classes are separable). Deterministic: no seed
    is involved. The standardisation is folded into the returned layer, which maps raw mu.
    """
    device = features.device
    x = features.detach().double()
    y = labels.to(device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), warnings.catch_warnings():
        # torch's L-BFGS calls float() on the closure's loss, which warns on every probe fit.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        optimizer.step(closure)
    with torch.no_grad():
        final = float(F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum())
    state = optimizer.state[weight]
    with torch.no_grad():
        layer = nn.Linear(x.shape[1], n_classes).to(device)
        w_raw = weight / std
        layer.weight.copy_(w_raw.float())
        layer.bias.copy_((bias - w_raw @ mean).float())
        train_acc = float(((z @ weight.T + bias).argmax(dim=1) == y).double().mean())
    layer.eval()
    info = {
        "features": "encoder mean mu_x (Eq. 14), encoder frozen",
        "model": f"nn.Linear({x.shape[1]}, {n_classes}), multinomial logistic regression",
        "standardised": True,
        "optimizer": "full-batch L-BFGS (strong Wolfe), float64, zero init",
        "max_iter": max_iter,
        "iterations": int(state.get("n_iter", 0)),
        "weight_decay": weight_decay,
        "train_images": int(len(x)),
        "train_loss": final,
        "train_accuracy": train_acc,
    }
    return layer, info


@torch.no_grad()
def probe_accuracy(probe: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe(encode_mean(model, x)).argmax(dim=1) == y).double().mean())
