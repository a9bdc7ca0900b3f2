"""Neural predictivity of mouse_vision models on mouse visual cortex (Nayebi, Kong et al., PLOS CB 2023, Methods
"Neural response predictivity" and "Inter-animal consistency"; the release's `neural_fits/perform_neural_fits.py`,
`neural_mappers/pls_neural_map.py`, `reliability/metrics.py`, `reliability/interanimal_noise_ceiling.py`).

For every area, animal and model layer:
  features  stimuli → gray to 3 channels, Resize(256), CenterCrop(224), Resize(64), ImageNet normalisation →
            the layer's activations, flattened (eval mode);
  splits    s = 0..9: numpy.random.RandomState(s).permutation(118), the first 59 images train, the rest test;
  halves    i = 0..99: RandomState(i).permutation(trials), first half A, second half B (the same trials for every
            image); Y_A, Y_B = NaN-aware trial means;
  mapping   PLS regression, 25 components, no scaling, one multi-target fit per animal, fitted features → Y_A
            and features → Y_B on the train images, predicting P_A, P_B on the test images;
  score     per unit  r(P_A, Y_B) / sqrt( SB(r(P_A, P_B)) · SB(r(Y_A, Y_B)) ),  SB(r) = 2r / (1 + r),
            all correlations over test images; a negative product → NaN (two negative factors give a finite
            score, as in the release); mean over splits × halves per unit; median ± s.e.m. over the units of an
            area (all animals pooled); the best layer per area.
  ceiling   the inter-animal consistency: the same estimator with the pooled units of all *other* animals of the
            area as the source (their trials split with the same halves).

Speed. scikit-learn's NIPALS PLS on 59 images of up to 10^4 features, 2000 fits per animal and layer, takes hours
per model. With only 59 training images the PLS2 solution lives in image space: every quantity is a 59 × 59
matrix (the Gram matrix K of the features, G = Y Yᵀ of the targets), whatever the feature width, and the fit is a
"hat" matrix A with P_test = A (Y − ȳ) + ȳ (kernel PLS, Rosipal & Trejo 2001, JMLR 2:97). The PLS2 x-score of
component k is the top eigenvector of K_k G (K_k the deflated Gram matrix), computed exactly with one symmetric
59 × 59 eigendecomposition, batched over layers × halves × {A, B}. This is the *converged* PLS2 solution;
scikit-learn stops its power iteration at tol 1e-6 (500 iterations at most), which differs from it by up to a
few % in predictions on wide feature sets (the per-area medians by ≤ 0.004).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import checkpoint, metrics, plots, runtime, settings, shard
from common.runtime import UserError
from mouse_vision import neural_data

DEFAULTS = dict(n_components=25, n_splits=10, n_halves=100)
# embedded default: the synthetic file (6 areas × 2 animals), fewer splits and halves, < 3 min on 2 CPU cores
EMBEDDED = dict(n_splits=2, n_halves=4)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CEILING = "interanimal_ceiling"


def add_args(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode convert / neural_fit / benchmark --bench neural_fit (not the kit's shared ones)."""
    g = parser.add_argument_group("neural predictivity (--mode convert, neural_fit, benchmark --bench neural_fit)")
    g.add_argument("--data", default=None, help="the kit's neural HDF5 file (written by --mode convert); omit it to "
                   "run on an embedded synthetic file (convert: the output file)")
    g.add_argument("--neural_dataset", default=None, choices=neural_data.DATASETS,
                   help="which recordings of --data (default: the only one in the file, else neuropixels)")
    g.add_argument("--models", nargs="+", default=None, metavar="ARCH[=PATH]",
                   help="several models in one sweep, e.g. alexnet_bn=a.pt dual_stream=b.pt torchvision:resnet18 "
                   "(default: --arch with --model_path)")
    g.add_argument("--layers", nargs="+", default=None, help="readout layers (default: the model's readout layers; "
                   "a torchvision:<name> model: its top-level children)")
    g.add_argument("--areas", nargs="+", default=None, help="visual areas (default: every area of the file)")
    g.add_argument("--mapping", choices=("pls", "ridge"), default="pls",
                   help="pls: PLS regression, --n_components, no scaling (the paper); ridge: kernel ridge with the "
                   "penalty chosen per fit by leave-one-out over a 13-value grid")
    g.add_argument("--n_components", type=int, default=None, help="PLS components (paper 25; capped at train images − 1)")
    g.add_argument("--n_splits", type=int, default=None, help="image train/test splits (paper 10; embedded 2)")
    g.add_argument("--n_halves", type=int, default=None, help="trial split-halves per split (paper 100; embedded 4)")
    g.add_argument("--n_train", type=int, default=None, help="train images per split (default: half, rounded up)")
    g.add_argument("--layer_batch", type=int, default=None,
                   help="layers fitted together (default: as many as keep the predictions under ~2e7 numbers on CPU, "
                   "2e8 on CUDA)")
    g.add_argument("--trust_pickle", action="store_true", help="convert: allow loading the original pickles "
                   "(unpickling runs code stored in the file; only for a file you trust)")
    g.add_argument("--source", nargs="+", default=None, help="convert: the original's .pkl files (Neuropixels, calcium)")
    g.add_argument("--merge_only", action="store_true", help="neural_fit: only merge the complete units in "
                   "--output_root into neural_fit.json, the .npz and the figures (after a job array)")
    g.add_argument("--bench_units", type=int, default=8301, help="benchmark: units of the synthetic file")
    g.add_argument("--bench_trials", type=int, default=50, help="benchmark: trials of the synthetic file")
    g.add_argument("--bench_ref_fits", type=int, default=3, help="benchmark: fits the NIPALS reference is timed on")
    g.add_argument("--bench_skip_full", action="store_true", help="benchmark: only the PLS comparison")
    shard.add_shard_flags(parser)


# ----------------------------------------------------------------------------- features


def preprocess_stimuli(stimuli: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """uint8 images × H × W (gray) or × 3 → float N × 3 × 64 × 64: the release's evaluation transform
    (`model_transforms.py`): Resize(256) on the short side, CenterCrop(224), Resize(64), ToTensor, Normalize."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    out = []
    for img in np.asarray(stimuli):
        pil = Image.fromarray(img).convert("RGB")  # gray → 3 identical channels
        pil = TF.resize(TF.center_crop(TF.resize(pil, 256), 224), 64)
        out.append(TF.to_tensor(pil))
    x = torch.stack(out)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD) if normalize else x


def parse_models(args) -> list[tuple[str, str | None, str]]:
    """[(arch, model_path, label)] in the given order; labels are unique folder-safe names."""
    if args.models:
        specs = [(m.split("=", 1) + [None])[:2] for m in args.models]
    else:
        specs = [(getattr(args, "arch", None) or "alexnet_bn", getattr(args, "model_path", None))]
    out, seen = [], set()
    for arch, path in specs:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "-", arch + (f"@{Path(path).stem}" if path else ""))
        while label in seen:
            label += "+"
        seen.add(label)
        out.append((arch, path, label))
    return out


def build(arch: str, path: str | None):
    """(model, default readout layers) for a mouse_vision arch or `torchvision:<name>` (random init unless path)."""
    from mouse_vision import models as mv

    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise UserError(f"--arch {arch}: torchvision has no model {name!r}") from None
        if path:
            checkpoint.load_model_weights(model, path)
        return model, [n for n, _ in model.named_children()]
    model = mv.build_model(arch)
    if path:
        mv.load_model_path(model, path)
    return model, mv.readout_layers(arch)


def feature_grams(model, images: torch.Tensor, layers, device) -> dict[str, torch.Tensor]:
    """{layer: 118 × 118 Gram matrix (float64) of the mean-centred flattened features}. The kernel PLS needs only
    this (any constant shift of the features cancels in the train-centring, so centring by the overall mean first
    is exact and keeps the Gram matrix well conditioned)."""
    from mouse_vision import models as mv

    model = model.to(device).eval()
    with torch.no_grad():
        feats = mv.extract_features(model, images.to(device), layers)
    out = {}
    for name in layers:
        x = feats[name].to(device, torch.float64)
        x = x - x.mean(0, keepdim=True)
        out[name] = (x @ x.T).cpu()
    return out


# ----------------------------------------------------------------------------- splits and halves


def image_splits(n_images: int, n_splits: int, n_train: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split s: RandomState(s).permutation(n_images); the first n_train (default ceil(n/2)) train, the rest test."""
    n_train = math.ceil(n_images / 2) if n_train is None else n_train
    if not 2 <= n_train <= n_images - 2:
        raise UserError(f"--n_train {n_train}: needs 2 ≤ n_train ≤ images − 2 ({n_images} images)")
    perms = [np.random.RandomState(s).permutation(n_images) for s in range(n_splits)]
    return [(p[:n_train], p[n_train:]) for p in perms]


def trial_halves(n_trials: int, n_halves: int) -> np.ndarray:
    """n_halves × n_trials 0/1 matrix of half A (half B is its complement): RandomState(i).permutation(trials),
    the first floor(trials / 2) trials; the same split for every image."""
    m = np.zeros((n_halves, n_trials))
    for i in range(n_halves):
        m[i, np.random.RandomState(i).permutation(n_trials)[: n_trials // 2]] = 1.0
    return m


def half_means(responses: np.ndarray, halves: np.ndarray) -> torch.Tensor:
    """trials × images × units (NaN = missing) → H × 2 × images × units NaN-aware means of halves A and B.
    An image with no valid trial in a half takes the mean of all its trials (never in complete data)."""
    r = torch.from_numpy(np.asarray(responses, np.float64))
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros(()))
    sel = torch.from_numpy(np.stack([halves, 1 - halves], 1)).double()  # H × 2 × trials
    s = torch.einsum("hat,tiu->haiu", sel, r0)
    n = torch.einsum("hat,tiu->haiu", sel, valid.double())
    full = r0.sum(0) / valid.sum(0).clamp_min(1)
    return torch.where(n > 0, s / n.clamp_min(1), full)


def center_gram(K: torch.Tensor, train, test) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, N) Gram → train-centred (..., n, n) train Gram and (..., m, n) test × train Gram: the Gram
    matrices of (x − mean of the train x)."""
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    ktt = K[..., tr[:, None], tr[None, :]]
    kxt = K[..., te[:, None], tr[None, :]]
    row = ktt.mean(-1, keepdim=True)  # x_i · μ
    tot = row.mean(-2, keepdim=True)  # μ · μ
    kc = ktt - row - row.transpose(-1, -2) + tot
    kte = kxt - kxt.mean(-1, keepdim=True) - row.transpose(-1, -2) + tot
    return kc, kte


# ----------------------------------------------------------------------------- mappings (hat matrices)


def _sym_sqrt(G: torch.Tensor) -> torch.Tensor:
    ev, V = torch.linalg.eigh(G)
    return (V * ev.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def _top_eigenpair(S: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue (…) and its unit eigenvector (…, n, 1) of symmetric PSD matrices, exactly: a first estimate,
    then two steps of inverse iteration shifted just above the eigenvalue (each step shrinks the other components
    by (shift − λ₁) / (λ₁ − λ₂) ≈ 1e-9 λ₁ / gap). First estimate: method "eigvalsh" (CPU: half the cost of a full
    `eigh`) or "squaring" (CUDA, whose batched eigensolvers loop over matrices larger than 32 × 32): 20 squarings
    of the trace-normalised matrix (2^20 power steps in 20 batched products) leave ≈ v vᵀ."""
    tiny = torch.finfo(S.dtype).tiny
    n = S.shape[-1]
    diag = lambda M: M.diagonal(dim1=-2, dim2=-1)  # noqa: E731
    if method == "eigvalsh":
        lam = torch.linalg.eigvalsh(S)[..., -1]  # reads the lower triangle: no symmetrisation needed
        g = torch.Generator(device="cpu").manual_seed(0)
        v = (torch.rand(n, 1, generator=g, dtype=S.dtype) + 0.5).to(S.device).expand(*S.shape[:-1], 1)
    elif method == "squaring":
        P = S / diag(S).sum(-1).clamp_min(tiny)[..., None, None]
        for _ in range(20):
            P = P @ P
            P = P / diag(P).sum(-1).clamp_min(tiny)[..., None, None]
        j = diag(P).argmax(-1)
        v = torch.take_along_dim(P, j[..., None, None].expand(*P.shape[:-2], n, 1), -1)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)
        lam = (v * (S @ v)).sum((-2, -1))  # Rayleigh quotient
    else:
        raise ValueError(f"unknown eigen method {method!r}")
    shift = lam + 1e-9 * lam.abs() + tiny
    LU, piv, _ = torch.linalg.lu_factor_ex(S - shift[..., None, None] * torch.eye(n, dtype=S.dtype, device=S.device))
    for _ in range(2):  # a singular system (no component left) gives a non-finite v: zeroed below
        v = torch.linalg.lu_solve(LU, piv, v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)
    return lam, torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


def pls_hat(K: torch.Tensor, Kte: torch.Tensor, G: torch.Tensor, n_components: int, eig: str | None = None) -> torch.Tensor:
    """Kernel PLS2: the (..., m, n) matrix A with predictions A (Y − ȳ) + ȳ, equal to converged NIPALS PLS2
    (scikit-learn's PLSRegression(scale=False) algorithm iterated to convergence).

    K (..., n, n): train-centred Gram of the train images; Kte (..., m, n): test × train; G (..., n, n) = Yc Ycᵀ.
    Component k: t_k = top eigenvector of K_k G (K_k deflated: (I − t tᵀ) K_{k−1} (I − t tᵀ)), found as
    K_k G^½ v with v the top eigenvector of the symmetric S_k = G^½ K_k G^½ (S deflates by the same rank-2
    update); u_k = (I − T Tᵀ) G t_k (the y-scores); A = Kte U (Tᵀ K U)⁻¹ Tᵀ (Rosipal & Trejo 2001, eq. 7).
    """
    shape = torch.broadcast_shapes(K.shape[:-2], Kte.shape[:-2], G.shape[:-2])
    n = K.shape[-1]
    K = K.expand(*shape, n, n).contiguous()
    G = G.expand(*shape, n, n)
    eig = eig or ("squaring" if K.is_cuda else "eigvalsh")
    Gh = _sym_sqrt(G)
    S = Gh @ K @ Gh
    T = K.new_zeros(*shape, n, n_components)  # unit x-scores (columns not yet found stay 0)
    U = K.new_zeros(*shape, n, n_components)
    Tt = T.transpose(-1, -2)
    lam0 = None

    def deflated(x):  # (I − T Tᵀ) x: K_k x = deflated(K @ deflated(x)), without forming K_k
        return x - T @ (Tt @ x)

    for k in range(n_components):
        lam, v = _top_eigenpair(S, eig)
        lam0 = lam if lam0 is None else lam0
        t = deflated(K @ deflated(Gh @ v))  # (..., n, 1)
        norm = t.norm(dim=-2, keepdim=True)
        alive = (lam > 1e-12 * lam0.clamp_min(1e-300))[..., None, None] & (norm > 0)
        t = torch.where(alive, t / norm.clamp_min(1e-300), torch.zeros((), dtype=t.dtype, device=t.device))
        U[..., k:k + 1] = deflated(G @ t)
        Kt = deflated(K @ t)  # K_k t (t ⟂ the previous scores)
        T[..., k:k + 1] = t
        # S_{k+1} = G^½ K_{k+1} G^½ = S_k − a bᵀ − b aᵀ + c a aᵀ (a = G^½ t, b = G^½ K_k t, c = tᵀ K_k t),
        # one batched rank-2 product: S − [a, b − c a / 2] [b − c a / 2, a]ᵀ
        c = (t * Kt).sum(-2, keepdim=True)
        a = Gh @ t
        b = Gh @ Kt - 0.5 * c * a
        S = torch.baddbmm(S.reshape(-1, n, n), torch.cat([a, b], -1).reshape(-1, n, 2),
                          torch.cat([b, a], -1).reshape(-1, n, 2).transpose(-1, -2), alpha=-1).reshape(S.shape)
    M = Tt @ K @ U
    dead = (T.abs().sum(-2) == 0).to(M.dtype)  # components never found (rank exhausted): identity rows
    M = M + torch.diag_embed(dead)
    return Kte @ U @ torch.linalg.solve(M, Tt)


RIDGE_GRID = 10.0 ** np.arange(-3.0, 3.5, 0.5)


def ridge_hat(K: torch.Tensor, Kte: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Kernel ridge: A = Kte (K + αI)⁻¹ with α = mean(diag K) × grid value chosen per fit by the leave-one-out
    squared error summed over units (closed form from one eigendecomposition of K; needs only G = Yc Ycᵀ)."""
    shape = torch.broadcast_shapes(K.shape[:-2], Kte.shape[:-2], G.shape[:-2])
    n = K.shape[-1]
    s, V = torch.linalg.eigh(K.expand(*shape, n, n))
    s = s.clamp_min(0)
    scale = K.diagonal(dim1=-2, dim2=-1).mean(-1).expand(shape)
    alphas = scale[..., None] * torch.as_tensor(RIDGE_GRID).to(K)  # (..., a)
    Vt = V.transpose(-1, -2)
    Gv = Vt @ G.expand(*shape, n, n) @ V
    errs = []
    for j in range(len(RIDGE_GRID)):
        al = alphas[..., j, None]
        shrink = al / (s + al)  # eigenvalues of I − H
        R = V * shrink.unsqueeze(-2)  # V diag(shrink)
        resid = (R @ Gv @ R.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)  # diag((I−H) G (I−H))
        lev = 1 - ((V**2) * (s / (s + al)).unsqueeze(-2)).sum(-1)
        errs.append((resid / lev.clamp_min(1e-12) ** 2).sum(-1))
    best = torch.stack(errs, -1).argmin(-1)
    al = alphas.gather(-1, best[..., None])
    return Kte @ (V * (1 / (s + al)).unsqueeze(-2)) @ Vt


# ----------------------------------------------------------------------------- the split-half estimator


def corrected_score(r, r_pp, r_yy) -> np.ndarray:
    """r(P_A, Y_B) / sqrt(SB(r(P_A, P_B)) · SB(r(Y_A, Y_B))), SB(r) = 2r / (1 + r) (the release's
    `spearman_brown_split_half_denominator`); a product ≤ 0 → NaN, two negative factors → a finite score."""
    with np.errstate(divide="ignore", invalid="ignore"):
        den = metrics.spearman_brown(np.asarray(r_pp, np.float64), 2.0) * metrics.spearman_brown(np.asarray(r_yy, np.float64), 2.0)
        return metrics.noise_corrected_corr(r, den)


def split_half_scores(gram: torch.Tensor, Yh: torch.Tensor, splits, mapping: str, n_components: int,
                      device, eig: str | None = None) -> np.ndarray:
    """Noise-corrected scores (L, splits, halves, units) of one animal.

    gram: (L, N, N) source Gram matrices (model layers), or (L, H, 2, N, N) one per trial half (inter-animal:
    the source is trial-split too); Yh: (H, 2, N, units) half means of the target."""
    if device.type == "cpu":  # many small LAPACK calls: threads only contend (60× slower on shared cores)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _split_half_scores(gram, Yh, splits, mapping, n_components, device, eig)
        finally:
            torch.set_num_threads(threads)
    return _split_half_scores(gram, Yh, splits, mapping, n_components, device, eig)


def _split_half_scores(gram, Yh, splits, mapping, n_components, device, eig) -> np.ndarray:
    gram = gram.to(device, torch.float64)
    if gram.ndim == 3:
        gram = gram[:, None, None]
    Yh = Yh.to(device, torch.float64)
    out = []
    for tr, te in splits:
        K, Kte = center_gram(gram, tr, te)
        Ytr = Yh[..., tr, :]
        mu = Ytr.mean(-2, keepdim=True)
        Yc = Ytr - mu
        G = Yc @ Yc.transpose(-1, -2)
        nc = min(n_components, len(tr) - 1)
        A = pls_hat(K, Kte, G, nc, eig) if mapping == "pls" else ridge_hat(K, Kte, G)
        P = (A @ Yc + mu).cpu().numpy()  # (L, H, 2, m, U)
        Yte = Yh[..., te, :].cpu().numpy()  # (H, 2, m, U)
        YA, YB = np.broadcast_to(Yte[:, 0], P[:, :, 0].shape), np.broadcast_to(Yte[:, 1], P[:, :, 0].shape)
        r = metrics.corr(P[:, :, 0], YB, axis=-2)  # (L, H, U)
        r_pp = metrics.corr(P[:, :, 0], P[:, :, 1], axis=-2)
        r_yy = metrics.corr(YA, YB, axis=-2)
        out.append(corrected_score(r, r_pp, r_yy))
    return np.stack(out, 1).astype(np.float32)


def model_scores(grams: dict, animals, splits, halves_of, args, device) -> dict:
    """{layer: {area: (splits, halves, units of all animals)}} for the model layers in `grams`."""
    names = list(grams)
    out = {n: {} for n in names}
    for area, anims in animals.items():
        per = {n: [] for n in names}
        for a in anims:
            Yh = half_means(a.responses, halves_of(a.responses.shape[0]))
            # layers per batch: the predictions (layers, halves, 2, test images, units) stay under ~2e7 numbers
            # on CPU, ~2e8 on CUDA (override: --layer_batch)
            budget = 2e8 if device.type == "cuda" else 2e7
            lb = args.layer_batch or max(1, int(budget // (Yh[..., :len(splits[0][1]), :].numel())))
            for i in range(0, len(names), lb):
                chunk = names[i:i + lb]
                s = split_half_scores(torch.stack([grams[n] for n in chunk]), Yh, splits, args.mapping,
                                      args.n_components, device)
                for j, n in enumerate(chunk):
                    per[n].append(s[j])
        for n in names:
            out[n][area] = np.concatenate(per[n], -1)
    return out


def ceiling_scores(animals, splits, halves_of, args, device) -> dict:
    """{area: (splits, halves, units)}: the inter-animal consistency of every unit, the pooled units of the
    area's other animals as the source (NaN for an area with one animal)."""
    out = {}
    for area, anims in animals.items():
        n_tr = min(a.responses.shape[0] for a in anims)  # trials used: the area's smallest count (all 50 in the data)
        hv = halves_of(n_tr)
        hm = [half_means(a.responses[:n_tr], hv) for a in anims]  # a unit's half means do not depend on the pool
        parts = []
        for i, a in enumerate(anims):
            if len(anims) == 1:
                parts.append(np.full((len(splits), args.n_halves, a.n_units), np.nan, np.float32))
                continue
            src = torch.cat([h for j, h in enumerate(hm) if j != i], -1)
            src = src - src.mean(-2, keepdim=True)
            gram = (src @ src.transpose(-1, -2))[None]  # (1, H, 2, N, N)
            parts.append(split_half_scores(gram, hm[i], splits, args.mapping, args.n_components, device)[0])
        out[area] = np.concatenate(parts, -1)
    return out


def summarize(unit_scores: np.ndarray) -> dict:
    """Per-unit mean over splits × halves → median ± s.e.m. across units (NaN units left out and counted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        u = np.nanmean(unit_scores.reshape(-1, unit_scores.shape[-1]), 0)
    ok = u[np.isfinite(u)]
    sem = float(np.std(ok, ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else float("nan")
    return {"median": float(np.median(ok)) if len(ok) else float("nan"), "sem": sem, "mean": float(ok.mean()) if len(ok) else float("nan"),
            "n_units": int(len(u)), "n_nan_units": int(len(u) - len(ok))}


# ----------------------------------------------------------------------------- modes


def mode_convert(args):
    out = args.data or str(Path(args.output_root or settings.default_output_root("mouse_vision", "convert")) / "neural.h5")
    if Path(out).exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    summary = neural_data.convert(args.source, out, trust_pickle=args.trust_pickle)
    for name, areas in summary.items():
        for area, animals in areas.items():
            print(f"{name} {area}: {len(animals)} animals, {sum(n for _, n in animals)} units "
                  f"({', '.join(f'{a}:{n}' for a, n in animals)})", flush=True)
    print(json.dumps({"mode": "convert", "out": str(out), "datasets": {k: sorted(v) for k, v in summary.items()}}), flush=True)
    return summary


def _resolve(args):
    runtime.set_threads(args.threads)
    settings.resolve(args, DEFAULTS, *((("embedded", EMBEDDED),) if args.data is None else ()))
    settings.check_positive(args, "n_components", "n_splits", "n_halves")
    if args.output_root is None:
        args.output_root = settings.default_output_root("mouse_vision", "neural_fit")


def _embedded_file(args) -> str:
    from common.synthetic import ensure_synthetic

    d = ensure_synthetic(args.output_root, "mouse_neural", lambda p: neural_data.write_synthetic(
        Path(p) / "neural.h5", animals_per_area=2, units_per_animal=[30, 24, 36], seed=0))
    return str(d / "neural.h5")


def _unit_dirs(out: Path, models, layer_lists) -> dict:
    """The sweep's units in their fixed order: models in the given order, each model's layers in network order,
    then the inter-animal ceiling (model-free)."""
    units = {}
    for (arch, path, label), layers in zip(models, layer_lists):
        for layer in layers:
            units[(label, layer)] = out / "units" / f"{label}__{layer.replace('/', '_')}"
    units[(CEILING, CEILING)] = out / "units" / CEILING
    return units


def mode_neural_fit(args):
    _resolve(args)
    out = Path(args.output_root)
    models = parse_models(args)
    built = {}
    layer_lists = []
    for arch, path, label in models:  # build to learn the layers and fail early on bad names/paths
        runtime.seed_everything(args.seed)  # a random-init model is the same in every shard
        model, default_layers = build(arch, None if args.merge_only else path)
        built[label] = model
        layer_lists.append(list(args.layers) if args.layers else default_layers)
    units = _unit_dirs(out, models, layer_lists)
    if args.merge_only:
        return merge(args, units, models, layer_lists)
    if args.data is None:
        args.data = _embedded_file(args)
    settings.print_settings(args, ["n_components", "n_splits", "n_halves"])
    stimuli, dataset, animals, info = neural_data.read_neural(args.data, args.neural_dataset, args.areas)
    k, n = shard.parse_shard(args.shard)
    mine = shard.my_units(list(units), (k, n))
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    n_units = sum(a.n_units for v in animals.values() for a in v)
    print(f"neural_fit on {args.data} ({dataset}): {len(stimuli)} images, {', '.join(f'{a} {len(v)} animals' for a, v in animals.items())}; "
          f"{n_units} units; mapping {args.mapping}; shard {k}/{n}: {len(mine)} of {len(units)} units; device {device}",
          flush=True)
    splits = image_splits(len(stimuli), args.n_splits, args.n_train)
    halves_cache = {}

    def halves_of(n_trials):
        if n_trials not in halves_cache:
            halves_cache[n_trials] = trial_halves(n_trials, args.n_halves)
        return halves_cache[n_trials]

    meta = {"data": str(args.data), "dataset": dataset, "mapping": args.mapping, "n_components": args.n_components,
            "n_splits": args.n_splits, "n_halves": args.n_halves, "n_train": len(splits[0][0]), "area_names": list(animals)}
    todo = []
    for u in mine:
        if shard.prepare_unit(units[u], resume=args.resume, overwrite=args.overwrite) == "skip":
            _check_meta(units[u], meta)
        else:
            todo.append(u)
    if len(mine) > len(todo):
        print(f"{len(mine) - len(todo)} unit(s) already complete: skipped", flush=True)
    images = preprocess_stimuli(stimuli)
    t_all = time.perf_counter()
    for arch, path, label in models + [(CEILING, None, CEILING)]:
        layers = [u[1] for u in todo if u[0] == label]
        if not layers:
            continue
        t0 = time.perf_counter()
        if label == CEILING:
            res = {CEILING: ceiling_scores(animals, splits, halves_of, args, device)}
        else:
            grams = feature_grams(built.pop(label), images, layers, device)
            res = model_scores(grams, animals, splits, halves_of, args, device)
        for layer, by_area in res.items():
            d = units[(label, layer)]
            d.mkdir(parents=True, exist_ok=True)
            arrays = {}
            for area, s in by_area.items():  # per split: sum and count of the finite scores over halves
                arrays[f"sum/{area}"] = np.nansum(s, 1, dtype=np.float64)
                arrays[f"count/{area}"] = np.isfinite(s).sum(1)
                arrays[f"unit_id/{area}"] = np.concatenate([a.unit_id for a in animals[area]])
                arrays[f"animal/{area}"] = np.concatenate([[a.name] * a.n_units for a in animals[area]]).astype("U")
            _save_npz(d / "scores.npz", arrays)
            summ = {area: summarize(s) for area, s in by_area.items()}
            checkpoint.write_json(d / "unit.json", {"model": label, "arch": arch, "model_path": path, "layer": layer,
                                                    **meta, "areas": summ})
            shard.mark_complete(d, {"model": label, "layer": layer})
            print(f"{label} {layer}: " + " | ".join(f"{a} {v['median']:.3f}±{v['sem']:.3f}" for a, v in summ.items()), flush=True)
        print(f"{label}: {len(layers)} unit(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"fits done in {time.perf_counter() - t_all:.1f}s", flush=True)
    if n == 1:
        return merge(args, units, models, layer_lists, meta)
    print(f"shard {k}/{n} done; merge with --mode neural_fit --merge_only (same flags, no --shard)", flush=True)
    return None


META_KEYS = ("data", "dataset", "mapping", "n_components", "n_splits", "n_halves", "n_train", "area_names")


def _check_meta(unit_dir: Path, meta: dict) -> None:
    """A complete unit computed with other settings is never mixed into this sweep silently."""
    done = json.loads((unit_dir / "unit.json").read_text())
    diff = [k for k in META_KEYS if done.get(k) != meta.get(k)]
    if diff:
        raise UserError(f"{unit_dir} was computed with {', '.join(f'{k}={done.get(k)!r}' for k in diff)}, this run has "
                        f"{', '.join(f'{k}={meta.get(k)!r}' for k in diff)}; pass --overwrite or another --output_root")


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def merge(args, units, models, layer_lists, meta=None) -> dict:
    """neural_fit.json, per_unit_scores.npz and one PNG per area from the complete units; missing ones listed
    (exit status 2 with --require_complete)."""
    out = Path(args.output_root)
    done, missing = shard.collect(units)
    shard.report_missing([f"{m}/{layer}" for m, layer in missing], len(units), args.require_complete)
    if not done:
        raise UserError(f"{out}: no complete unit to merge")
    info = {k: json.loads((units[k] / "unit.json").read_text()) for k in done}
    if meta is None:
        meta = {k: v for k, v in next(iter(info.values())).items() if k in META_KEYS}
    for k in done:
        _check_meta(units[k], meta)
    npz = {}  # "<model>/<layer>/<area>": per-unit scores (mean over splits × halves); unit_id/<area>, animal/<area>
    for (label, layer) in done:
        with np.load(units[(label, layer)] / "scores.npz") as z:
            for key in z.files:
                kind, area = key.split("/", 1)
                if kind in ("unit_id", "animal"):
                    npz[key] = z[key]
                elif kind == "sum":
                    n = z[f"count/{area}"].sum(0)
                    npz[f"{label}/{layer}/{area}"] = np.where(n > 0, z[key].sum(0) / np.maximum(n, 1), np.nan)
    ceiling = info.get((CEILING, CEILING), {}).get("areas", {})
    result = {"mode": "neural_fit", **meta, "score": "noise-corrected r (Spearman-Brown split-half denominator), "
              "median ± s.e.m. over units", "missing_units": [f"{m}/{layer}" for m, layer in missing],
              "interanimal_ceiling": ceiling, "models": {}}
    for (arch, path, label), layers in zip(models, layer_lists):
        by_area = {}
        for layer in layers:
            if (label, layer) in info:
                for area, v in info[(label, layer)]["areas"].items():
                    by_area.setdefault(area, {})[layer] = v
        best = {}
        for area, per_layer in by_area.items():
            b = max(per_layer, key=lambda lay: -np.inf if not np.isfinite(per_layer[lay]["median"]) else per_layer[lay]["median"])
            best[area] = {"layer": b, **per_layer[b], "ceiling": ceiling.get(area, {}).get("median")}
            vals = [per_layer.get(lay, {}).get("median") for lay in layers]
            c = ceiling.get(area, {}).get("median")
            plots.bar_chart(out / "figures" / f"{label}_{area}.png", layers, [{"label": label, "values": vals}],
                            title=f"{label}: {area} neural predictivity per layer ({meta.get('mapping')})",
                            ylabel="noise-corrected r", hlines=[(c, "inter-animal")] if c is not None and np.isfinite(c) else [])
        result["models"][label] = {"arch": arch, "model_path": path, "layers": layers, "scores": by_area, "best_layer": best}
    _save_npz(out / "per_unit_scores.npz", npz)
    checkpoint.write_json(out / "args.json", vars(args))  # the merging command's settings (each unit: unit.json)
    checkpoint.write_json(out / "neural_fit.json", result)
    for label, m in result["models"].items():
        for area, b in m["best_layer"].items():
            c = b["ceiling"]
            print(f"{label} {area}: best layer {b['layer']} {b['median']:.3f} ± {b['sem']:.3f} "
                  f"(inter-animal {c if c is None else round(c, 3)})", flush=True)
    print(json.dumps({"mode": "neural_fit", "out": str(out / "neural_fit.json"), "units_done": len(done),
                      "units_missing": len(missing)}), flush=True)
    return result


# ----------------------------------------------------------------------------- benchmark


def nipals_pls_reference(X, Y, X_test, n_components: int, tol: float = 1e-6, max_iter: int = 500) -> np.ndarray:
    """Straightforward NIPALS PLS2, scikit-learn's PLSRegression(scale=False) algorithm (`_get_first_singular_
    vectors_power_method`, regression-mode deflation, x_rotations = W (PᵀW)⁺); its defaults tol 1e-6 / 500
    iterations stop before convergence, so the benchmark also reports the distance to the converged solution."""
    X, Y, X_test = (np.asarray(a, np.float64) for a in (X, Y, X_test))
    xm, ym = X.mean(0), Y.mean(0)
    Xk, Yk = X - xm, Y - ym
    eps = np.finfo(np.float64).eps
    W, P, Q = [], [], []
    for _ in range(n_components):
        Yk[:, np.all(np.abs(Yk) < 10 * eps, axis=0)] = 0.0
        cols = np.flatnonzero(np.any(np.abs(Yk) > eps, axis=0))
        y_score = Yk[:, cols[0]] if len(cols) else Yk[:, 0]
        w_old = np.zeros(X.shape[1])
        for _ in range(max_iter):
            w = Xk.T @ y_score / (y_score @ y_score)
            w /= np.sqrt(w @ w) + eps
            t = Xk @ w
            c = Yk.T @ t / (t @ t)
            y_score = Yk @ c / (c @ c + eps)
            d = w - w_old
            if d @ d < tol or Yk.shape[1] == 1:
                break
            w_old = w
        t = Xk @ w
        p, q = Xk.T @ t / (t @ t), Yk.T @ t / (t @ t)
        Xk -= np.outer(t, p)
        Yk -= np.outer(t, q)
        W.append(w), P.append(p), Q.append(q)
    W, P, Q = np.stack(W, 1), np.stack(P, 1), np.stack(Q, 1)
    coef = W @ np.linalg.pinv(P.T @ W) @ Q.T
    return (X_test - xm) @ coef + ym


def benchmark(args):
    """One JSON line: (1) the kernel PLS against the NIPALS reference on the same data (per-fit time ratio, max
    prediction difference); (2) the full evaluation (features, every readout layer, inter-animal ceiling) of the
    first model on a Neuropixels-sized synthetic file (--bench_units units, --bench_trials trials)."""
    runtime.set_threads(args.threads)
    settings.resolve(args, DEFAULTS)
    if args.output_root is None:
        args.output_root = settings.default_output_root("mouse_vision", "benchmark")
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    rng = np.random.default_rng(args.seed)
    res = {"mode": "benchmark", "bench": "neural_fit", "device": str(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "n_components": args.n_components}
    # (1) one animal of 100 units, 118 images, features 3136 wide (alexnet_bn features.3 at 64 px)
    n_img, d, u, trials = 118, 3136, 100, 50
    X = rng.normal(size=(n_img, d))
    Wt = rng.normal(size=(d, 10)) / np.sqrt(d)
    resp = (X @ Wt @ rng.normal(size=(10, u)))[None] + rng.normal(size=(trials, n_img, u))
    splits = image_splits(n_img, args.n_splits, args.n_train)
    halves = trial_halves(trials, args.n_halves)
    Xc = X - X.mean(0)
    gram = torch.from_numpy(Xc @ Xc.T)[None]
    Yh = half_means(resp, halves)
    fits = len(splits) * args.n_halves * 2
    times = {}
    # the default first eigen-estimate of the device, and on CUDA the other one too (CPU: squaring is far slower)
    for eig in (("squaring", "eigvalsh") if device.type == "cuda" else ("eigvalsh",)):
        t0 = time.perf_counter()
        split_half_scores(gram, Yh, splits, "pls", args.n_components, device, eig)
        runtime.synchronize(device)
        times[eig] = (time.perf_counter() - t0) / fits
    t_fast = times["squaring" if device.type == "cuda" else "eigvalsh"]
    tr, te = splits[0]
    K, Kte = center_gram(gram[0], tr, te)
    Yc = Yh[0, 0, tr] - Yh[0, 0, tr].mean(0)
    nc = min(args.n_components, len(tr) - 1)
    fast = (pls_hat(K, Kte, Yc @ Yc.T, nc) @ Yc + Yh[0, 0, tr].mean(0)).numpy()
    t0 = time.perf_counter()
    for i in range(args.bench_ref_fits):
        ref = nipals_pls_reference(X[tr], Yh[i % args.n_halves, 0, tr].numpy(), X[te], nc)
    t_ref = (time.perf_counter() - t0) / args.bench_ref_fits
    ref = nipals_pls_reference(X[tr], Yh[0, 0, tr].numpy(), X[te], nc)
    t0 = time.perf_counter()
    conv = nipals_pls_reference(X[tr], Yh[0, 0, tr].numpy(), X[te], nc, tol=1e-24, max_iter=20000)
    t_conv = time.perf_counter() - t0
    scale = np.abs(conv - conv.mean(0)).max()
    res.update({"pls_data": {"images": n_img, "train": len(tr), "features": d, "units": u, "trials": trials},
                "pls_fast_fits": fits, "pls_fast_ms_per_fit": round(t_fast * 1e3, 3),
                "pls_fast_ms_per_fit_by_eig": {k: round(v * 1e3, 3) for k, v in times.items()},
                "pls_ref_fits_timed": args.bench_ref_fits, "pls_ref_ms_per_fit": round(t_ref * 1e3, 2),
                "pls_speedup": round(t_ref / t_fast, 1), "pls_ref_converged_ms_per_fit": round(t_conv * 1e3, 2),
                "pls_speedup_vs_converged": round(t_conv / t_fast, 1),
                "pls_max_abs_diff_vs_converged_nipals": float(np.abs(fast - conv).max()),
                "pls_max_abs_diff_vs_sklearn_tol_nipals": float(np.abs(fast - ref).max()),
                "pls_prediction_scale": float(scale)})
    if not args.bench_skip_full:
        res.update(_bench_full(args, device))
    print(json.dumps(res), flush=True)
    return res


def _bench_full(args, device) -> dict:
    from common.synthetic import ensure_synthetic

    arch, path, label = parse_models(args)[0]
    n_areas, per_area = len(neural_data.AREAS), 4
    base, extra = divmod(args.bench_units, n_areas * per_area)
    counts = [base + (i < extra) for i in range(n_areas * per_area)]
    name = f"mouse_neural_{args.bench_units}u_{args.bench_trials}t"
    t0 = time.perf_counter()
    d = ensure_synthetic(args.output_root, name, lambda p: neural_data.write_synthetic(
        Path(p) / "neural.h5", animals_per_area=per_area, units_per_animal=counts, n_trials=args.bench_trials,
        image_hw=(230, 294), seed=1))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    stimuli, _, animals, _ = neural_data.read_neural(d / "neural.h5")
    t_read = time.perf_counter() - t0
    splits = image_splits(len(stimuli), args.n_splits, args.n_train)
    hv = {}
    halves_of = lambda n: hv.setdefault(n, trial_halves(n, args.n_halves))  # noqa: E731
    runtime.reset_peak_memory(device)
    t0 = time.perf_counter()
    runtime.seed_everything(args.seed)
    model, layers = build(arch, path)
    layers = list(args.layers) if args.layers else layers
    grams = feature_grams(model, preprocess_stimuli(stimuli), layers, device)
    t_feat = time.perf_counter() - t0
    model_scores(grams, animals, splits, halves_of, args, device)
    runtime.synchronize(device)
    t_layers = time.perf_counter() - t0 - t_feat
    t1 = time.perf_counter()
    ceiling_scores(animals, splits, halves_of, args, device)
    t_ceil = time.perf_counter() - t1
    total = time.perf_counter() - t0
    return {"full_model": arch, "full_layers": len(layers), "full_units": int(sum(counts)), "full_trials": args.bench_trials,
            "full_animals": n_areas * per_area, "full_splits": len(splits), "full_halves": args.n_halves,
            "full_write_s": round(t_write, 2), "full_read_s": round(t_read, 2), "full_features_s": round(t_feat, 2),
            "full_layers_s": round(t_layers, 2), "full_ceiling_s": round(t_ceil, 2), "full_eval_s": round(total, 2),
            "full_peak_mem_mb": round(runtime.peak_memory_mb(device), 1)}
