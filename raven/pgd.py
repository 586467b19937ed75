"""Projected sign-gradient ascent in an L-inf ball intersected with the pixel range [0, 1].

Shared by the Smooth Encoder's training partner (raven.train) and the evaluation attacks
(raven.eval.attacks), so both search the same set with the same steps.
"""

from __future__ import annotations

from typing import Callable

import torch


def pgd_linf(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    keep_best: bool = True,
    on_iterate: Callable[[torch.Tensor], None] | None = None,
    start: torch.Tensor | None = None,
    start_noise: torch.Tensor | None = None,
    row_dims: int = 1,
) -> torch.Tensor:
    """Maximise objective(x_adv) per row subject to ||x_adv - x||_inf <= epsilon, 0 <= x_adv <= 1.

    objective maps (batch, D) inputs to (batch,) values; rows are attacked independently.
    row_dims: how many leading dimensions of x index its rows, e.g. 2 for the (K, batch, D)
    inputs of a pack of K encoders (raven.eval.pack_eval), whose objective returns (K, batch).
    random_start draws the start uniformly in the ball: dissimilarities such as KL and W2
    between q(.|x) and q(.|x + e) have zero value and zero gradient at e = 0, so a start
    there never moves. keep_best returns, per row, the best iterate seen (including the
    final one) rather than the last, which can only make the attack stronger.
    start_noise passes the random start's U(0, 1) draw (shaped like x) instead of drawing it
    from `generator`. Without keep_best, rows may carry more leading dimensions than row_dims.
    Gradients are taken with respect to the input alone; the result is detached.

    on_iterate, when given, is called under no_grad with every iterate (the start, and the
    point after each step, steps + 1 in all), e.g. to record whether a classifier is ever
    fooled along the path; it must not modify its argument. start, when given, is the first
    iterate instead of a (random) start, to continue an ascent from where an earlier call
    left it; it must lie in the ball. Without either nothing extra runs.
    """
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    low = (x - epsilon).clamp(min=0.0)
    high = (x + epsilon).clamp(max=1.0)
    if start is not None:
        x_adv = start.detach().clone()
    elif random_start:
        noise = start_noise if start_noise is not None else torch.rand(
            x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = low + noise * (high - low)
    else:
        x_adv = x.clone()
    best = x_adv.clone() if keep_best else x_adv
    best_value = torch.full(x.shape[:row_dims], -torch.inf, device=x.device, dtype=x.dtype)
    row = x.shape[:row_dims] + (1,) * (x.dim() - row_dims)  # broadcasts a per-row flag over the row
    for _ in range(steps):
        if on_iterate is not None:
            with torch.no_grad():
                on_iterate(x_adv)
        x_adv.requires_grad_(True)
        value = objective(x_adv)
        (grad,) = torch.autograd.grad(value.sum(), x_adv)
        with torch.no_grad():
            x_adv = x_adv.detach()
            if keep_best:
                value = value.detach()
                improved = value > best_value
                best_value = torch.where(improved, value, best_value)
                # torch.where rather than boolean indexing: no host sync, one fused pass.
                best = torch.where(improved.view(row), x_adv, best)
            # In place (the graph that saw x_adv is gone): x_adv + step * sign(grad), then project.
            x_adv.add_(grad.sign_(), alpha=step_size).clamp_(min=low, max=high)
    if on_iterate is not None:
        with torch.no_grad():
            on_iterate(x_adv)
    if not keep_best:
        return x_adv
    with torch.no_grad():
        value = objective(x_adv)
        improved = value > best_value
        best = torch.where(improved.view(row), x_adv, best)
    return best
