"""Measurement: correlations, noise ceilings, explained variance, accuracy and corruption robustness.

Every study reports its scores with these functions; nothing is re-derived locally. Inputs may be numpy
arrays or torch tensors (moved to CPU, computed in float64); outputs are numpy arrays / floats.

Shapes
- `pred`, `target`: images × neurons (correlation is over images, per neuron: `axis=0`).
- `repeats`: reps × images × neurons, NaN where a repeat is missing (e.g. fewer trials for some images).

Conventions (as neuralpredictors' `neuralpredictors/measures/np_functions.py`; ImageNet-C: Hendrycks & Dietterich, ICLR 2019)
- Pearson correlation with the population std (ddof=0); a neuron whose prediction or target has zero
  variance scores 0 and is still counted in the mean.
- noise variance σ²_noise = mean over images of the across-repeat variance (ddof=1);
  Var_total = variance over all single trials (ddof=1);
  explainable fraction (FEV) = (Var_total − σ²_noise) / Var_total;
  FEVe = 1 − (MSE − σ²_noise) / (Var_total − σ²_noise), MSE over all single trials.
- oracle correlation: leave-one-out (jackknife) — each trial against the mean of the other trials of its
  image, pooled over (trial, image) pairs. It *under*-estimates the ceiling for the trial average.
- split-half reliability: correlation over images between the means of two random halves of the repeats,
  averaged over random splits, then Spearman-Brown corrected to the full number of repeats (n=2).
  This corrected reliability ρ estimates the squared correlation between the trial average and the true
  rate, so the noise-corrected correlation of a model is r / sqrt(ρ).
- corruption robustness (ImageNet-C): error E = 1 − accuracy per (corruption, severity);
  CE_c = Σ_s E_{s,c} / Σ_s E^base_{s,c}; mCE = mean_c CE_c;
  relative CE_c = Σ_s (E_{s,c} − E_clean) / Σ_s (E^base_{s,c} − E^base_clean). Reported in percent.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

EPS = 1e-8


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- correlation / R²


def corr(pred, target, axis: int = 0, eps: float = EPS) -> np.ndarray:
    """Per-neuron Pearson correlation over `axis` (images), population std; zero variance → 0."""
    x, y = _np(pred), _np(target)
    if x.shape != y.shape:
        raise ValueError(f"corr: shapes differ, {x.shape} vs {y.shape}")
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    sx, sy = np.sqrt((xc**2).mean(axis=axis)), np.sqrt((yc**2).mean(axis=axis))
    cov = (xc * yc).mean(axis=axis)
    ok = (sx > eps) & (sy > eps)
    r = np.where(ok, cov / np.where(ok, sx * sy, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def masked_corr(pred, target, mask=None, eps: float = EPS) -> np.ndarray:
    """Per-neuron Pearson over images using only entries where `mask` (images × neurons) is true.

    Used for pooled datasets where a neuron was not recorded on every image. Neurons with < 2 entries → 0.
    `mask=None` uses every entry (= `corr`).
    """
    if mask is None:
        return corr(pred, target, eps=eps)
    x, y, w = _np(pred), _np(target), _np(mask) > 0
    n = w.sum(0)
    safe_n = np.maximum(n, 1)
    mx, my = (x * w).sum(0) / safe_n, (y * w).sum(0) / safe_n
    xc, yc = (x - mx) * w, (y - my) * w
    sx, sy = np.sqrt((xc**2).sum(0) / safe_n), np.sqrt((yc**2).sum(0) / safe_n)
    ok = (sx > eps) & (sy > eps) & (n >= 2)
    r = np.where(ok, (xc * yc).sum(0) / safe_n / np.where(ok, sx * sy, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def explained_variance(pred, target, axis: int = 0) -> np.ndarray:
    """Per-neuron coefficient of determination R² = 1 − SS_res / SS_tot (zero-variance target → nan)."""
    x, y = _np(pred), _np(target)
    ss_res = ((y - x) ** 2).sum(axis=axis)
    ss_tot = ((y - y.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)


# ----------------------------------------------------------------------------- repeats: noise ceilings


def _check_repeats(repeats) -> np.ndarray:
    r = _np(repeats)
    if r.ndim != 3:
        raise ValueError(f"repeats must be reps × images × neurons, got shape {r.shape}")
    return r


def noise_variance(repeats) -> np.ndarray:
    """σ²_noise per neuron: mean over images of the across-repeat variance (ddof=1; images with < 2 repeats skipped)."""
    r = _check_repeats(repeats)
    n = (~np.isnan(r)).sum(0)  # images × neurons
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(r, 0) / np.maximum(n, 1)
        var = np.nansum((r - mean) ** 2, 0) / np.maximum(n - 1, 1)
    var = np.where(n >= 2, var, np.nan)
    return np.nanmean(var, axis=0)


def total_variance(repeats) -> np.ndarray:
    """Var_total per neuron: variance over all single trials of all images (ddof=1)."""
    r = _check_repeats(repeats)
    return np.nanvar(r.reshape(-1, r.shape[-1]), axis=0, ddof=1)


def explainable_fraction(repeats) -> np.ndarray:
    """Fraction of explainable variance, FEV = (Var_total − σ²_noise) / Var_total (1 for noise-free repeats)."""
    vt, vn = total_variance(repeats), noise_variance(repeats)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(vt > 0, (vt - vn) / np.where(vt > 0, vt, 1.0), np.nan)



def feve(repeats, pred) -> np.ndarray:
    """Fraction of explainable variance explained, per neuron.

    FEVe = 1 − (MSE − σ²_noise) / (Var_total − σ²_noise), with MSE over all single trials and
    `pred` images × neurons. Neurons without explainable variance (denominator ≤ 0) get nan.
    """
    r, p = _check_repeats(repeats), _np(pred)
    if p.shape != r.shape[1:]:
        raise ValueError(f"feve: pred shape {p.shape} does not match repeats' images × neurons {r.shape[1:]}")
    mse = np.nanmean(((r - p[None]) ** 2).reshape(-1, r.shape[-1]), axis=0)
    vt, vn = total_variance(r), noise_variance(r)
    denom = vt - vn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 1.0 - (mse - vn) / np.where(denom > 0, denom, 1.0), np.nan)


def oracle_corr(repeats) -> np.ndarray:
    """Leave-one-out (jackknife) oracle correlation per neuron.

    Every single trial is paired with the mean of the *other* trials of the same image; the Pearson
    correlation is taken over all such pairs. Images with < 2 valid repeats are skipped.
    """
    r = _check_repeats(repeats)
    valid = ~np.isnan(r)
    n = valid.sum(0, keepdims=True)
    total = np.nansum(r, 0, keepdims=True)
    use = valid & (n >= 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        loo = (total - np.where(valid, r, 0.0)) / np.maximum(n - 1, 1)
    k = r.shape[-1]
    return masked_corr(np.where(use, loo, 0.0).reshape(-1, k), np.where(use, r, 0.0).reshape(-1, k),
                       use.reshape(-1, k))


def spearman_brown(r, n: float = 2.0):
    """Spearman-Brown prophecy: reliability of a measurement n times as long, n·r / (1 + (n − 1)·r)."""
    r = _np(r) if not isinstance(r, (int, float)) else r
    return n * r / (1.0 + (n - 1.0) * r)


def split_half_reliability(repeats, n_splits: int = 50, seed: int = 0, correct: bool = True) -> np.ndarray:
    """Split-half reliability per neuron over random splits of the repeats.

    For each split the repeats are randomly permuted, the two halves averaged (NaN-aware), and correlated
    over images per neuron; the correlations are averaged over splits and (if `correct`) Spearman-Brown
    corrected with n=2 to the full number of repeats.
    """
    r = _check_repeats(repeats)
    reps = r.shape[0]
    if reps < 2:
        raise ValueError("split-half reliability needs at least 2 repeats")
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(n_splits):
        perm = rng.permutation(reps)
        a, b = perm[: reps // 2], perm[reps // 2:]
        with warnings.catch_warnings():  # a half with no valid repeat for an image → NaN, handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            ma, mb = np.nanmean(r[a], 0), np.nanmean(r[b], 0)
        both = ~(np.isnan(ma) | np.isnan(mb))
        rs.append(masked_corr(np.nan_to_num(ma), np.nan_to_num(mb), both))
    half = np.mean(rs, axis=0)
    return spearman_brown(half, 2.0) if correct else half


def noise_corrected_corr(r, ceiling) -> np.ndarray:
    """r / sqrt(ceiling), with `ceiling` a reliability (e.g. Spearman-Brown split-half); ceiling ≤ 0 → nan."""
    r, c = _np(r), _np(ceiling)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, r / np.sqrt(np.where(c > 0, c, 1.0)), np.nan)


# ----------------------------------------------------------------------------- classification


def topk_correct(logits, labels, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (counts, for exact DDP sums)."""
    logits = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    ks = list(ks)
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top.eq(labels.view(-1, 1).to(top.device))
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum().item()) for k in ks}


def topk_accuracy(logits, labels, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (fraction in [0, 1]) for each k."""
    n = len(labels)
    return {k: c / max(n, 1) for k, c in topk_correct(logits, labels, ks).items()}


# ----------------------------------------------------------------------------- corruption robustness

Table = Mapping[str, Mapping[int, float]]  # corruption → severity → accuracy in [0, 1]


def corruption_table(rows: Iterable) -> dict[str, dict[int, float]]:
    """Build {corruption: {severity: accuracy}} from (corruption, severity, accuracy) rows."""
    table: dict[str, dict[int, float]] = {}
    for c, s, a in rows:
        table.setdefault(str(c), {})[int(s)] = float(a)
    return table


def mean_corrupted_accuracy(table: Table) -> float:
    """Mean accuracy over all (corruption, severity) cells."""
    cells = [a for sev in table.values() for a in sev.values()]
    if not cells:
        raise ValueError("empty corruption table")
    return float(np.mean(cells))


def _check_same_cells(table: Table, baseline: Table) -> None:
    for c, sev in table.items():
        if c not in baseline or set(sev) - set(baseline[c]):
            raise ValueError(f"baseline table lacks cells of corruption {c!r}")


def corruption_errors(table: Table, baseline: Table) -> dict[str, float]:
    """CE_c in percent: 100 · Σ_s (1 − acc_{s,c}) / Σ_s (1 − acc^base_{s,c})."""
    _check_same_cells(table, baseline)
    out = {}
    for c, sev in table.items():
        err = sum(1.0 - a for a in sev.values())
        base = sum(1.0 - baseline[c][s] for s in sev)
        out[c] = 100.0 * err / base if base > 0 else float("nan")
    return out


def mce(table: Table, baseline: Table) -> float:
    """Mean corruption error (percent) against a baseline table; the baseline's own mCE is 100."""
    return float(np.mean(list(corruption_errors(table, baseline).values())))


def relative_mce(table: Table, clean_acc: float, baseline: Table, baseline_clean_acc: float) -> float:
    """Relative mCE (percent): CE measured as the error *increase* over each model's clean error."""
    _check_same_cells(table, baseline)
    e0, b0 = 1.0 - clean_acc, 1.0 - baseline_clean_acc
    ces = []
    for c, sev in table.items():
        num = sum((1.0 - a) - e0 for a in sev.values())
        den = sum((1.0 - baseline[c][s]) - b0 for s in sev)
        ces.append(100.0 * num / den if den != 0 else float("nan"))
    return float(np.mean(ces))
