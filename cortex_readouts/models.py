"""Readouts from one CNN layer to many electrodes, their regularisers, the closed-form ridge solver and the
fitting loop that fits every electrode of every array in one model.

Readouts (input: a post-ReLU feature map [B, C, H, W]; output [B, N electrodes]):
- `CadenaReadout` (Cadena et al. 2019, PLOS CB, "Deep convolutional models improve predictions of macaque V1
  responses to natural images", Methods; the repo's `MODEL_cadena_model_vgg.py`): BN → ReLU → dense weight
  w[C, H, W, N] + bias → optional ELU(x − 1) + 1. Regularisers, each per neuron and averaged over the neurons of a
  site (Cadena 2019, eq. for L_smooth / L_group / L_1): Laplacian (+4 centre) sum of squares, group sparsity
  Σ_c ‖w[c, :, :, n]‖₂, L1.
- `BashivanReadout` (Bashivan, Kar & DiCarlo 2019, Science, factorised readout; the repo's `MODEL_neural_model.py`):
  BN → ReLU → r̂[b, n] = Σ_c w_f[n, c] Σ_p |w_s[n, p]| x[b, c, p] + bias: a spatial mask per electrode times feature
  weights per electrode. Mask Laplacian smoothness + mask L1 + L2 ("weight decay"), averaged over neurons.
- ridge: the closed form of a linear readout (`ridge_path`), every electrode and a whole grid of penalties from ONE
  eigendecomposition; stored as a `CadenaReadout` without regularisers or output nonlinearity.

BatchNorm: by default (`norm="fixed"`) the readout's BN uses the training set's per-channel mean and variance,
computed once from the feature cache, in training and evaluation alike — the limit running statistics converge
to, and the reason one model can fit all arrays exactly as separate per-array fits would (running statistics
shared by all electrodes would couple the fits). `norm="batch"` is nn.BatchNorm2d's behaviour (batch statistics in
training), used by `--quirks original`.

Quirks of the original code, reproduced only with `--quirks original` (slugs used in main.py and README):
- `laplace-sign`: the repo's Laplacian is [[0,-1,0],[-1,-4,-1],[0,-1,0]] (all negative, "centre −4"): it measures
  local magnitude, not curvature, and is not 0 on a constant map;
- `reshape-mixes-neurons`: w [C,H,W,N] is *reshaped* (not permuted) to [C,N,H,W] and convolved with an N × N stack
  of that kernel, so each output channel sums the (scrambled) maps of all neurons; sqrt of the total;
- `group-l2`: "group sparsity" is Σ(2w)² = 4·L2;
- `sums-not-means`: every term is summed over neurons, so the penalty's weight grows with the array's size;
- `bn-momentum`: the Bashivan BN uses momentum 0.9 — TensorFlow's decay pasted into PyTorch, where it means
  "90 % new batch"; the faithful PyTorch value of TF's 0.9 is 0.1 (`torch_momentum`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from common import metrics, runtime

LAPLACE_PAPER = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
LAPLACE_REPO = torch.tensor([[0.0, -1.0, 0.0], [-1.0, -4.0, -1.0], [0.0, -1.0, 0.0]])  # laplace-sign

# Regulariser coefficients. paper: Cadena 2019 (smooth 0.1, group 0.01, L1 0.01, per neuron, averaged);
# original: the repo's TRAIN_cadena_model_vgg.py defaults (spa 1e-2, smo 1e-1, gsp 1e-3) and, for Bashivan,
# TRAIN_neural_model_vgg.py's per-area λ_s / weight decay (arrays < 9 V1, 9-12 V4, > 12 IT) with 1e-8 L1 on w_f.
REG = {
    ("cadena", "paper"): {"smooth": 0.1, "group": 0.01, "l1": 0.01},
    ("cadena", "original"): {"smooth": 0.1, "group": 1e-3, "l1": 1e-2},
    ("bashivan", "paper"): {"smooth": 0.01, "l1": 1e-3, "l2": 1e-3},
    ("bashivan", "original"): {"smooth": {"V1": 0.05, "V4": 0.001, "IT": 0.05},
                               "l2": {"V1": 0.01, "V4": 0.001, "IT": 0.005}, "l1": 1e-8},
}


def torch_momentum(tf_decay: float) -> float:
    """TensorFlow's BN `decay`/momentum (weight of the OLD running value) → PyTorch's momentum (weight of the NEW
    batch statistic). TF 0.9 ≡ torch 0.1 (bn-momentum)."""
    return 1.0 - tf_decay


def laplace_sq(maps: torch.Tensor, kernel: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """Squared Laplacian response per map: maps [..., H, W] → Σ_xy (kernel ∗ map)² with shape [...].
    Valid convolution by default (a constant map gives 0 with the +4 kernel); maps smaller than 3 × 3 give 0.
    One depthwise convolution (the second-to-last leading axis as channels): on CPU ~10× faster than a batch of
    single-channel maps, which matters because this runs on every weight of every electrode at every step."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    if padding == 0 and (h < 3 or w < 3):
        return maps.new_zeros(lead)
    c = lead[-1] if len(lead) else 1
    x = maps.reshape(-1, c, h, w)
    out = F.conv2d(x, kernel.to(maps).expand(c, 1, 3, 3), padding=padding, groups=c)
    return out.square().sum((-2, -1)).reshape(lead)


# ----------------------------------------------------------------------------- readouts


class Readout(torch.nn.Module):
    """Shared front: BN (fixed training-set statistics, or batch statistics) → ReLU."""

    kind = "base"

    def __init__(self, c: int, h: int, w: int, n: int, norm: str = "fixed", bn_momentum: float = 0.1,
                 bn_eps: float = 1e-4):
        super().__init__()
        if norm not in ("fixed", "batch"):
            raise ValueError(f"norm must be fixed or batch, got {norm!r}")
        self.shape, self.n, self.norm, self.bn_momentum, self.bn_eps = (c, h, w), n, norm, bn_momentum, bn_eps
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def set_norm_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)

    def front(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.norm == "batch" and self.training
        x = F.batch_norm(x, self.running_mean, self.running_var, None, None, batch_stats, self.bn_momentum, self.bn_eps)
        return F.relu(x)

    def electrode_params(self) -> list[tuple[str, int]]:
        """(parameter name, electrode axis) of every per-electrode parameter (for per-array snapshots)."""
        raise NotImplementedError

    def config(self) -> dict:
        c, h, w = self.shape
        return {"kind": self.kind, "c": c, "h": h, "w": w, "n": self.n, "norm": self.norm,
                "bn_momentum": self.bn_momentum, "bn_eps": self.bn_eps, **self.extra_config()}

    def extra_config(self) -> dict:
        return {}


class CadenaReadout(Readout):
    kind = "cadena"

    def __init__(self, c, h, w, n, output: str = "identity", **kw):
        super().__init__(c, h, w, n, **kw)
        if output not in ("identity", "elu"):
            raise ValueError(f"output must be identity or elu, got {output!r}")
        self.output = output
        # stored electrode-major, [N, C, H, W] (contiguous per electrode: the regularisers and per-array slices
        # are fast); `dense_weight()` is the paper's / repo's w[C, H, W, N]
        self.weight = torch.nn.Parameter(torch.empty(n, c, h, w))
        self.bias = torch.nn.Parameter(torch.zeros(n))
        # Xavier-normal as the repo (fan_in = C·H·W inputs, fan_out = N electrodes would couple the init to the
        # number of electrodes fitted together, so each electrode uses its own fan-out of 1: per-array fits agree)
        torch.nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (c * h * w + 1)))

    def extra_config(self):
        return {"output": self.output}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.front(x).flatten(1) @ self.weight.flatten(1).T + self.bias
        return F.elu(z - 1.0) + 1.0 if self.output == "elu" else z

    def dense_weight(self) -> torch.Tensor:
        return self.weight.permute(1, 2, 3, 0)

    def electrode_params(self):
        return [("weight", 0), ("bias", 0)]

    def per_neuron_penalty(self) -> dict:
        """Cadena 2019's terms for each neuron n: smooth Σ_c Σ_xy (Lap₊₄ ∗ w[c,:,:,n])², group Σ_c ‖w[c,:,:,n]‖₂,
        L1 Σ |w[..., n]|. Each [N]."""
        w = self.weight  # [N, C, H, W]
        return {"smooth": laplace_sq(w, LAPLACE_PAPER).sum(1),
                "group": torch.sqrt(w.square().sum((2, 3)) + 1e-12).sum(1),
                "l1": w.abs().sum((1, 2, 3))}

    def repo_penalty(self, idx: torch.Tensor) -> dict:
        """The repo's terms for the fit of the electrodes `idx` (one array): sums over them (sums-not-means)."""
        w = self.weight.index_select(0, idx).permute(1, 2, 3, 0).contiguous()  # the repo's w [C, H, W, N]
        c, h, ww, n = w.shape
        r = w.reshape(c, n, h, ww)  # reshape-mixes-neurons: a reshape, not a permute
        # conv2d with an N × N stack of one kernel: every output channel is Lap ∗ Σ_j r[:, j], so the total sum of
        # squares is N × Σ_c (Lap ∗ Σ_j r[c, j])² — computed without building the N² stack the repo looped over.
        smooth = torch.sqrt(n * laplace_sq(r.sum(1), LAPLACE_REPO).sum() + 1e-12)
        return {"smooth": smooth, "group": (2 * w).square().sum(), "l1": w.abs().sum()}  # group-l2


class BashivanReadout(Readout):
    kind = "bashivan"

    def __init__(self, c, h, w, n, **kw):
        super().__init__(c, h, w, n, **kw)
        self.mask = torch.nn.Parameter(torch.full((n, h * w), 1.0 / (h * w)) * (1 + 0.1 * torch.randn(n, h * w)))
        self.features = torch.nn.Parameter(torch.randn(n, c) / math.sqrt(c))
        self.bias = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.front(x).flatten(2)  # [B, C, P]
        pooled = torch.einsum("bcp,np->bnc", z, self.mask.abs())  # per-electrode spatial pooling
        return (pooled * self.features).sum(-1) + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight w[c, h, w, n] = |w_s[n, hw]| · w_f[n, c]."""
        c, h, w = self.shape
        return torch.einsum("np,nc->cpn", self.mask.abs(), self.features).reshape(c, h, w, self.n)

    def electrode_params(self):
        return [("mask", 0), ("features", 0), ("bias", 0)]

    def per_neuron_penalty(self) -> dict:
        c, h, w = self.shape
        m = self.mask.reshape(self.n, h, w)
        return {"smooth": laplace_sq(m, LAPLACE_PAPER), "l1": self.mask.abs().sum(1),
                "l2": 0.5 * (self.mask.square().sum(1) + self.features.square().sum(1))}

    def repo_penalty(self, idx: torch.Tensor) -> dict:
        """The repo: λ_s·sqrt(Σ (Lap₋₄ ∗ w_s)²) with padding 5 on the raw masks of the array, 1e-8·‖w_f‖₁, and
        Adam weight_decay — written here as ½·wd·Σw², whose gradient wd·w is exactly what Adam's (coupled)
        weight_decay adds."""
        c, h, w = self.shape
        m = self.mask.index_select(0, idx).reshape(-1, h, w)
        f = self.features.index_select(0, idx)
        return {"smooth": torch.sqrt(laplace_sq(m, LAPLACE_REPO, padding=5).sum() + 1e-12),
                "l1": f.abs().sum(), "l2": 0.5 * (m.square().sum() + f.square().sum())}


def build_readout(kind: str, shape, n: int, quirks: str = "paper", output: str = "identity") -> Readout:
    c, h, w = shape
    if kind in ("cadena", "ridge"):
        # the repo's Cadena BN: torch defaults (momentum 0.1, eps 1e-5) in train mode; Cadena 2019: eps 1e-4
        kw = dict(norm="batch", bn_momentum=0.1, bn_eps=1e-5) if quirks == "original" and kind == "cadena" else {}
        return CadenaReadout(c, h, w, n, output=output if kind == "cadena" else "identity", **kw)
    if kind == "bashivan":
        kw = dict(norm="batch", bn_momentum=0.9, bn_eps=1e-4) if quirks == "original" else dict(bn_momentum=torch_momentum(0.9))
        return BashivanReadout(c, h, w, n, **kw)
    raise ValueError(f"unknown readout {kind!r}")


def readout_from_config(cfg: dict) -> Readout:
    kw = dict(norm=cfg["norm"], bn_momentum=cfg["bn_momentum"], bn_eps=cfg["bn_eps"])
    if cfg["kind"] == "cadena":
        return CadenaReadout(cfg["c"], cfg["h"], cfg["w"], cfg["n"], output=cfg.get("output", "identity"), **kw)
    return BashivanReadout(cfg["c"], cfg["h"], cfg["w"], cfg["n"], **kw)


# ----------------------------------------------------------------------------- the loss of a joint fit


def coefficient_vectors(kind: str, quirks: str, areas: list[str], overrides: dict) -> dict:
    """{term: tensor [N]}: a coefficient per electrode (the repo's Bashivan values depend on the area).
    `overrides[term]` (a float, from the command line) replaces the default for every electrode."""
    out = {}
    for term, v in REG[(kind, quirks)].items():
        if overrides.get(term) is not None:
            v = overrides[term]
        out[term] = torch.tensor([v[a] if isinstance(v, dict) else v for a in areas], dtype=torch.float32)
    return out


def penalty(readout: Readout, groups: list[torch.Tensor], coefs: dict, quirks: str) -> torch.Tensor:
    """Σ over groups (arrays) of that group's regulariser, so the total equals the sum of per-array fits' terms.
    paper: per-neuron terms averaged over the group's neurons; original: the repo's sums over the group."""
    if quirks == "paper":
        terms = readout.per_neuron_penalty()
        weight = torch.zeros(readout.n, device=readout.bias.device)
        for g in groups:
            weight[g] = 1.0 / len(g)
        return sum((coefs[k].to(weight) * terms[k] * weight).sum() for k in terms)
    total = readout.bias.new_zeros(())
    for g in groups:
        terms = readout.repo_penalty(g)
        first = int(g[0])
        total = total + sum(coefs[k][first].to(total) * terms[k] for k in terms)
    return total


def data_loss(pred: torch.Tensor, target: torch.Tensor, groups: list[torch.Tensor], loss: str) -> torch.Tensor:
    """Σ over groups of the group's mean loss (MSE, or Poisson negative log-likelihood up to a constant)."""
    if loss == "mse":
        per = (pred - target).square().mean(0)
    else:
        per = (pred - target * torch.log(pred + 1e-8)).mean(0)
    return sum(per[g].mean() for g in groups)


# ----------------------------------------------------------------------------- feature normalisation


def channel_stats(feats, rows: np.ndarray, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) variance over `rows` of a [images, C, H, W] array (memmap ok), float64."""
    s = s2 = 0.0
    count = 0
    for i in range(0, len(rows), chunk):
        x = torch.from_numpy(np.asarray(feats[rows[i:i + chunk]], dtype=np.float64))
        s = s + x.sum((0, 2, 3))
        s2 = s2 + x.square().sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    return mean, (s2 / count - mean.square()).clamp_min(0.0)


# ----------------------------------------------------------------------------- gradient fit, all arrays at once


def _slice(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(axis, idx).clone()


def fit_gradient(readout: Readout, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, groups: list[torch.Tensor], coefs: dict, *, quirks: str = "paper",
                 loss: str = "mse", lr: float = 1e-3, batch_size: int = 64, max_steps: int = 1000,
                 eval_every: int = 50, patience: int = 5, seed: int = 0, log_every: int = 0, on_eval=None,
                 prefix: str = "") -> dict:
    """Adam on every electrode at once; early stopping on the validation correlation of each group (array).

    The loss is Σ_groups [mean loss of the group + the group's regulariser]: the groups' parameters are disjoint,
    Adam is element-wise and the fixed BN has no shared state, so every group follows exactly the trajectory a
    separate fit of that group alone would follow (same batches). Each group keeps the parameters of its own best
    validation step (a per-array snapshot) and the fit stops when no group improved for `patience` evaluations.
    x_* are feature tensors (any float dtype, cast per batch); returns the history and per-group best scores.
    """
    dev = readout.bias.device
    opt = torch.optim.Adam(readout.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    best = [-math.inf] * len(groups)
    best_step = [0] * len(groups)
    stale = [0] * len(groups)
    snap = [None] * len(groups)
    history, step, perm, pos = [], 0, torch.randperm(n, generator=gen), 0
    progress = runtime.Progress(max_steps, log_every or max_steps, unit="img", prefix=prefix, enabled=log_every > 0)
    while step < max_steps:
        if pos + batch_size > n:  # a new epoch: a new seeded order (the last partial batch is dropped)
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + min(batch_size, n)]
        pos += len(idx)
        readout.train()
        xb = x_train[idx.to(x_train.device)].to(dev, readout.bias.dtype)  # features may be stored in fp16
        yb = y_train[idx.to(y_train.device)].to(dev, readout.bias.dtype)
        pred = readout(xb)
        fit_term = data_loss(pred, yb, groups, loss)
        total = fit_term + penalty(readout, groups, coefs, quirks)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
        progress.update(len(idx), loss=float(fit_term.detach()))
        if step % eval_every == 0 or step == max_steps:
            r = metrics.corr(predict(readout, x_val), y_val.cpu())
            row = {"step": step, "train_loss": float(fit_term.detach()), "total_loss": float(total.detach())}
            for gi, g in enumerate(groups):
                score = float(np.mean(r[g.cpu().numpy()]))
                row[f"val_corr_{gi}"] = score
                if score > best[gi]:
                    best[gi], best_step[gi], stale[gi] = score, step, 0
                    snap[gi] = {name: _slice(getattr(readout, name), ax, g) for name, ax in readout.electrode_params()}
                else:
                    stale[gi] += 1
            row["val_corr_mean"] = float(np.mean(r))
            history.append(row)
            if on_eval:
                on_eval(row)
            if all(s >= patience for s in stale):
                break
    with torch.no_grad():  # every group gets its own best parameters back
        for gi, g in enumerate(groups):
            for name, ax in readout.electrode_params():
                getattr(readout, name).index_copy_(ax, g, snap[gi][name])
    readout.eval()
    return {"history": history, "steps": step, "best_val_corr": best, "best_step": best_step}


@torch.no_grad()
def predict(readout: torch.nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Eval-mode predictions [n, N] (the readout's dtype, CPU) of a feature tensor, in chunks."""
    was = readout.training
    readout.eval()  # bn-train-eval: the repo often validated with BN in train mode (batch-dependent scores)
    p = next(readout.parameters())
    out = torch.cat([readout(x[i:i + chunk].to(p.device, p.dtype)).cpu() for i in range(0, len(x), chunk)])
    readout.train(was)
    return out


# ----------------------------------------------------------------------------- closed-form ridge


def ridge_path(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
               alphas=tuple(10.0 ** np.arange(-3, 4.5, 0.5))) -> dict:
    """Ridge regression of every electrode for a whole grid of penalties from ONE eigendecomposition.

    Minimises ‖y − x w − b‖² + λ‖w‖² per electrode (b unpenalised: x, y centred on the training means).
    n ≤ D: dual, K = x xᵀ = U S Uᵀ, w_λ = xᵀ U (S + λ)⁻¹ Uᵀ y; n > D: primal, xᵀx = V S Vᵀ, w_λ = V (S + λ)⁻¹ Vᵀ xᵀ y.
    λ = alpha · mean(S) (scale-free grid); per electrode, the λ with the best validation correlation is kept.
    Returns dict(weight [D, N], bias [N], lam [N], val_corr [len(alphas), N]) in float64.
    """
    # the D-dimensional products run in the features' dtype (float32 keeps 22k × 200k features at 16 GB);
    # everything n × n or D × D (the eigendecomposition, the penalty grid) in float64
    y = y.double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc, xv = x - xm, y - ym, x_val - xm
    n, d = xc.shape
    dual = n <= d
    s, u = torch.linalg.eigh((xc @ xc.T if dual else xc.T @ xc).double())
    s = s.clamp_min(0.0)
    if dual:
        left, right = (xv @ xc.T).double() @ u, u.T @ yc  # val predictions = left (S+λ)⁻¹ right + ȳ
    else:
        left, right = xv.double() @ u, u.T @ (xc.T.double() @ yc)
    lams = torch.tensor(alphas, dtype=torch.float64, device=s.device) * s.mean().clamp_min(1e-12)
    scores = np.stack([metrics.corr(left @ (right / (s + lam)[:, None]) + ym, y_val) for lam in lams])
    lam = lams[torch.from_numpy(scores.argmax(0)).to(s.device)]  # [N]
    coef = right / (s[:, None] + lam[None, :])
    w = (xc.T @ (u @ coef).to(xc.dtype)).double() if dual else u @ coef
    xm = xm.double()
    return {"weight": w, "bias": ym - xm @ w, "lam": lam, "val_corr": scores, "alphas": list(alphas)}


def ridge_readout(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                  mean: torch.Tensor, var: torch.Tensor, alphas=None) -> tuple[CadenaReadout, dict]:
    """Fit the ridge readout on BN(fixed) → ReLU features and return it as a CadenaReadout (identity output)."""
    c, h, w = x_train.shape[1:]
    n = y_train.shape[1]
    ro = CadenaReadout(c, h, w, n)
    ro.set_norm_stats(mean.float(), var.float())
    ro = ro.to(x_train.device)
    phi = lambda x: torch.cat([ro.front(x[i:i + 512].float()).flatten(1) for i in range(0, len(x), 512)])  # noqa: E731
    with torch.no_grad():
        sol = ridge_path(phi(x_train), y_train, phi(x_val), y_val, **({"alphas": alphas} if alphas else {}))
        ro.weight.copy_(sol["weight"].T.reshape(n, c, h, w).float())
        ro.bias.copy_(sol["bias"].float())
    ro.eval()
    return ro, sol
