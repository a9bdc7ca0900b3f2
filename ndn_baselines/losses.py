"""Losses and weight regularizers of the NDN3 thesis experiments, batched over seeds.

Every function takes tensors with a leading seed dimension R and returns one value per seed, shape (R,).
The training loop minimises the SUM over seeds: seed s's parameters only enter seed s's term, so the
gradients of different seeds never mix and one Adam over the stacked parameters is R independent Adams
(Adam is elementwise).

Scaling follows NDN3 (petrroll/NDN3 NDN.py: the Poisson cost; regularization.py: the penalties), which ties the
thesis' λ values to it:
- the Poisson loss sums over neurons and over the minibatch and divides by the batch size only;
- regularizers are NOT normalised by layer size or batch size and are added to that loss unscaled;
- L2 carries the ½ of `tf.nn.l2_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POISSON_EPS = 1e-6  # NDN3: ŷ − y·log(ŷ + 1e-6)


# ----------------------------------------------------------------------------- losses


def poisson_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_neurons Σ_batch (ŷ − y·log(ŷ + 1e-6)) / batch_size, per seed.

    pred (R, B, N); target and mask broadcast to it. Masked entries (mask 0, a neuron not recorded for that
    image when regions are pooled) contribute nothing; the divisor stays the batch size, as in NDN3.
    """
    nll = pred - target * torch.log(pred + POISSON_EPS)
    if mask is not None:
        nll = nll * mask
    return nll.sum(dim=(-2, -1)) / pred.shape[-2]


def gaussian_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_neurons Σ_batch (y − ŷ)² / batch_size, per seed (thesis experiments_1 exp51)."""
    se = (target - pred) ** 2
    if mask is not None:
        se = se * mask
    return se.sum(dim=(-2, -1)) / pred.shape[-2]


LOSSES = {"poisson": poisson_loss, "gaussian": gaussian_loss}


# ----------------------------------------------------------------------------- regularizers
# All take the weight in the "filter" view w5 of shape (R, out, C, H, W): for every output unit, its weights
# over the input's channels and pixels. A dense layer on a flat input has C = n_in, H = W = 1; a dense layer on
# an image or a feature map has its input's (C, H, W); a conv kernel is (R, C_out, C_in, k, k). Writing the
# penalties on this view makes them independent of the memory layout (NDN3 flattens NHWC, channel fastest,
# which only matters for its index matrices, not for the value of the penalty).

def l1_penalty(w5: torch.Tensor) -> torch.Tensor:
    """Σ|w| per seed."""
    return w5.abs().flatten(1).sum(1)


def l2_penalty(w5: torch.Tensor) -> torch.Tensor:
    """½ Σ w² per seed (tf.nn.l2_loss)."""
    return 0.5 * w5.pow(2).flatten(1).sum(1)


def d2x_penalty(w5: torch.Tensor) -> torch.Tensor:
    """Σ (Lap w)² per seed: 5-point Laplacian over the spatial dims of each input channel, zero boundary.

    NDN3 builds this as a sparse matrix D2x = D1y ⊗ I + I ⊗ D1x ([1, −2, 1] second differences) applied to the
    flat weights; shifted copies of the zero-padded weight maps are the same operator (a 1-channel conv2d is
    too, but ~20× slower on CPU).
    """
    R, O, C, H, W = w5.shape
    if H * W == 1:
        raise ValueError("d2x needs a spatial input (H×W > 1); this layer's input has no spatial extent")
    m = w5.reshape(R, O * C, H, W)
    p = F.pad(m, (1, 1, 1, 1))
    lap = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * m
    return lap.pow(2).flatten(1).sum(1)


def max_penalty(w5: torch.Tensor) -> torch.Tensor:
    """Σ_out Σ_{i≠j} w_i² w_j² over all inputs i, j of each output unit (NDN3 'max': ones − eye)."""
    w2 = w5.pow(2).flatten(2)  # (R, O, inputs)
    return (w2.sum(-1) ** 2 - (w2**2).sum(-1)).sum(-1)


def max_filt_penalty(w5: torch.Tensor) -> torch.Tensor:
    """Like 'max' but only pairs of different channels at the same pixel (NDN3 'max_filt': eye_pix ⊗ (ones − eye))."""
    w2 = w5.pow(2)  # (R, O, C, H, W)
    return (w2.sum(2) ** 2 - (w2**2).sum(2)).flatten(1).sum(1)


REGULARIZERS = {"l1": l1_penalty, "l2": l2_penalty, "d2x": d2x_penalty, "max": max_penalty, "max_filt": max_filt_penalty}


def penalty(w5: torch.Tensor, reg: dict) -> torch.Tensor:
    """Σ_type λ_type · penalty_type(w5), per seed; zero λ terms are skipped (they cost nothing)."""
    total = w5.new_zeros(w5.shape[0])
    for name, lam in reg.items():
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}; known: {sorted(REGULARIZERS)}")
        if lam:
            total = total + float(lam) * REGULARIZERS[name](w5)
    return total
