"""Task losses and the learned likelihood weighting of Safarani et al. (NeurIPS 2021, §3 "Training").

Each task gets a learned log-variance s (init 0) and its loss becomes a negative log-likelihood whose scale is
learned (Kendall, Gal & Cipolla 2018, the weighting the original's `loss_weighing=True` implements in
neural_cotraining `trainer/main_loop_modules/mtl_loss.py`):

- classification:      exp(−s)·CE + s/2                     (the 2020 code used + s; the published form is s/2)
- Gaussian (MSE):      ½·exp(−s)·MSE + s/2                  (a Gaussian NLL with variance e^s; the paper's neural loss)
- "Poisson" weighted:  negative-binomial NLL with dispersion r = e^s, element mean
                       (y + r)·log(μ + r) − y·log μ − r·log r + lgamma(r) − lgamma(y + r) + lgamma(y + 1)
                       (→ the Poisson NLL as r → ∞; what the original computes when Poisson meets loss_weighing)

Without weighting: CE, MSE (mean) and the Poisson loss μ − y·log(μ + 1e-12) summed over batch and neurons
(neuralpredictors `PoissonLoss(avg=False)`; with `scale_loss` it is multiplied by √(N_train / B)).
The logged weight of a task is e^s.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NEURAL_LOSSES = ("mse", "poisson")


def weighted_ce(ce: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """exp(−s)·CE + s/2: minimised over s at s = ln(2·CE)."""
    return torch.exp(-s) * ce + 0.5 * s


def weighted_mse(mse: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """½·exp(−s)·MSE + s/2: the Gaussian NLL with variance e^s (up to a constant); minimised at s = ln(MSE)."""
    return 0.5 * torch.exp(-s) * mse + 0.5 * s


def negative_binomial_nll(mu: torch.Tensor, y: torch.Tensor, s: torch.Tensor, mask=None, eps: float = 1e-8) -> torch.Tensor:
    """Element-mean negative-binomial NLL with mean μ and dispersion r = e^s (Var = μ + μ²/r)."""
    r = torch.exp(s)
    mu = mu + eps
    nll = ((y + r) * torch.log(mu + r) - y * torch.log(mu) - r * s
           + torch.lgamma(r) - torch.lgamma(y + r) + torch.lgamma(y + 1))
    return _mean(nll, mask)


def poisson_loss(mu: torch.Tensor, y: torch.Tensor, mask=None, eps: float = 1e-12) -> torch.Tensor:
    """μ − y·log(μ + eps), summed over batch and neurons (the 2021 neuralpredictors PoissonLoss, avg=False)."""
    nll = mu - y * torch.log(mu + eps)
    return (nll * mask).sum() if mask is not None else nll.sum()


def mse_loss(mu: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
    return _mean((mu - y) ** 2, mask)


def _mean(x: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


class LossWeighting(nn.Module):
    """The learned log-variances s, one per task (key "img_classification" or a neural task name).

    Kept apart from the network so that the optimizer can exclude them from weight decay (the original put them
    in the same SGD group, so wd 5e-4 pulled every s towards 0: `--decay_loss_weights`, slug loss-weight-decay),
    and saved in every checkpoint and restored with the best weights (the original kept them outside
    `model.state_dict()`, so early stopping restored a model with the latest s: slug loss-weights-not-saved).
    """

    def __init__(self, tasks):
        super().__init__()
        self.s = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in tasks})

    def weights(self) -> dict:
        """The logged weights e^s."""
        return {t: math.exp(p.item()) for t, p in self.s.items()}


def classification_loss(logits, labels, weighting: LossWeighting | None):
    """(loss to optimise, plain CE for logging)."""
    ce = F.cross_entropy(logits.float(), labels)
    if weighting is None:
        return ce, ce.detach()
    return weighted_ce(ce, weighting.s["img_classification"]), ce.detach()


def neural_loss(pred, target, kind: str, weighting: LossWeighting | None, task: str = "v1", mask=None,
                scale: float = 1.0):
    """(loss to optimise, unweighted loss for logging) for one neural batch.

    kind "mse": MSE (mean), weighted as a Gaussian NLL. kind "poisson": summed Poisson NLL × `scale`
    (√(N_train/B) with scale_loss), or, with weighting, the NB NLL with learned dispersion.
    """
    if kind not in NEURAL_LOSSES:
        raise ValueError(f"neural loss must be one of {NEURAL_LOSSES}, got {kind!r}")
    pred, target = pred.float(), target.float()
    if kind == "mse":
        mse = mse_loss(pred, target, mask)
        return (weighted_mse(mse, weighting.s[task]) if weighting is not None else mse), mse.detach()
    if weighting is not None:
        nb = negative_binomial_nll(pred, target, weighting.s[task], mask)
        return nb, nb.detach()
    pl = poisson_loss(pred, target, mask) * scale
    return pl, pl.detach()


def readout_penalty(readout, gamma: float, summed: bool, n_elements: int) -> torch.Tensor:
    """gamma·Σ|features| of one session's readout (legacy Gaussian2d `feature_l1`, gamma_readout 0.5 in the
    recipes), added to that session's batches.

    The original adds it only when `scale_loss` is on, i.e. never in the co-training recipes (which leave
    scale_loss off) — a silent omission reproduced by `--omit_readout_l1` (slug readout-l1-omitted).
    Against a summed loss (the Poisson loss) the penalty is added as is; against an element-mean loss (MSE, NB) it
    is divided by the number of averaged elements (batch × neurons), so it keeps its strength relative to the data
    term.
    """
    l1 = readout.l1()
    return gamma * l1 if summed else gamma * l1 / max(n_elements, 1)
