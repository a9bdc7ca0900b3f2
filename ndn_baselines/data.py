"""The Antolík et al. 2016 mouse V1 data (S1 supplement, `Data/region{1,2,3}/`): reader, scaling, pooling, and a
writer of synthetic regions in the same format.

Real data: download the supplement of Antolík, Hofer, Bednar & Mrsic-Flogel 2016, PLOS Comput Biol 12(6):
e1004927, file S1 (doi 10.1371/journal.pcbi.1004927.s001), unzip, and pass `--data_root <...>/Data`. Per region:

    training_inputs.npy      (N_tr, 961)       31×31 images, row-major, pixels 0..0.000255 (meant 0..255)
    training_set.npy         (N_tr, N)         responses (non-negative, ≈0..10)
    validation_inputs.npy    (50, 961)
    validation_set.npy       (50, N)           trial average
    raw_validation_set.npy   (reps, 50, N)     single trials (some copies store (50, reps, N): checked on load)

with N = 103/55/102 neurons, N_tr = 1800/1260/1800 and reps = 10/8/12 for regions 1/2/3 (Antolík et al. 2016,
Methods; regions 1 and 2 come from one mouse, region 3 from another).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import metrics, synthetic
from common.datasets import NeuralResponses
from common.runtime import UserError

from ndn_baselines import models

FILES = ("training_inputs.npy", "training_set.npy", "validation_inputs.npy", "validation_set.npy",
         "raw_validation_set.npy")
IMAGE_SIZE = 31
N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
PIXEL_MAX = 0.000255  # the published arrays are the 0..255 images divided by 1e6
REGION_SIZES = {1: dict(neurons=103, train=1800, val=50, reps=10),  # the real regions' shapes
                2: dict(neurons=55, train=1260, val=50, reps=8),
                3: dict(neurons=102, train=1800, val=50, reps=12)}
SCALINGS = ("raw", "x1e6", "zscore")


@dataclass
class Region:
    """One region's arrays as stored (float64, unscaled)."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    raw_val: np.ndarray  # (reps, 50, N)

    @property
    def n_neurons(self) -> int:
        return self.train_y.shape[1]


def split(images: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor | None = None,
          source: str = "<memory>") -> NeuralResponses:
    """One split as the kit's `common.datasets.NeuralResponses`: rows of 961 pixels → N × 1 × 31 × 31 images."""
    images = torch.as_tensor(images)
    return NeuralResponses(images.reshape(len(images), 1, IMAGE_SIZE, IMAGE_SIZE), torch.as_tensor(responses),
                           mask=mask, source=source)


@dataclass
class Dataset:
    """A run's data: the training and validation splits (`common.datasets.NeuralResponses`; the validation
    responses are the trial averages of validation_set.npy) and, per region, what the splits cannot hold.

    The splits are NeuralResponses; this small wrapper exists because one run trains on pooled regions and must
    still score each neuron on its own region's images only: `blocks` holds one dict per region with its name,
    `images` (validation image slice), `neurons` (slice), and two noise ceilings from raw_validation_set.npy
    (means over neurons): `oracle` = leave-one-out oracle correlation (a single trial against the mean of the
    others; the ceiling for predicting one trial, below the one for the trial average), and `avg_ceiling` =
    sqrt(Spearman-Brown split-half reliability), the expected correlation of the true rate with the trial average,
    against which validation correlations are to be read. Correlations are reported per region and as the
    neuron-weighted mean over regions (thesis 3.2.1).
    """
    train: NeuralResponses
    val: NeuralResponses
    blocks: list = field(default_factory=list)
    ceiling: np.ndarray | None = None  # oracle correlation per neuron
    avg_ceiling: np.ndarray | None = None  # sqrt(split-half reliability) per neuron

    @property
    def n_neurons(self) -> int:
        return self.train.n_neurons

    def to(self, device, dtype) -> "Dataset":
        def mv(r: NeuralResponses) -> NeuralResponses:
            return NeuralResponses(r.images.to(device=device, dtype=dtype), r.responses.to(device=device, dtype=dtype),
                                   mask=None if r.mask is None else r.mask.to(device), source=r.source)
        return Dataset(mv(self.train), mv(self.val), self.blocks, self.ceiling, self.avg_ceiling)


# ----------------------------------------------------------------------------- reader


def _load(path: Path, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"missing file {path} (expected the 5 files {', '.join(FILES)} in {path.parent})")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # pickled object arrays, truncated files, not an .npy at all
        raise UserError(f"{path} is not a readable numeric .npy array ({type(e).__name__}: {e})") from None
    while a.ndim > ndim and 1 in a.shape:  # msc-neuro np.squeeze-s the arrays: drop extra singleton axes
        a = a.squeeze(a.shape.index(1))
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.number):
        raise UserError(f"{path}: expected a {ndim}-D numeric array, got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise UserError(f"{path}: contains {int((~np.isfinite(a)).sum())} NaN/inf values")
    return a


def load_region(root, region: int) -> Region:
    """Read and check `root/region{region}/`: shapes, matching image and neuron counts, finite values."""
    d = Path(root) / f"region{region}"
    if not d.is_dir():
        raise UserError(f"missing folder {d} (expected --data_root to hold region1/ region2/ region3/)")
    tx, ty = _load(d / FILES[0], 2), _load(d / FILES[1], 2)
    vx, vy, raw = _load(d / FILES[2], 2), _load(d / FILES[3], 2), _load(d / FILES[4], 3)
    for name, x in ((FILES[0], tx), (FILES[2], vx)):
        if x.shape[1] != N_PIXELS:
            raise UserError(f"{d / name}: expected {N_PIXELS} pixels (31×31) per row, got shape {x.shape}")
    if len(tx) != len(ty):
        raise UserError(f"{d}: {FILES[0]} has {len(tx)} images but {FILES[1]} has {len(ty)} rows")
    if len(vx) != len(vy):
        raise UserError(f"{d}: {FILES[2]} has {len(vx)} images but {FILES[3]} has {len(vy)} rows")
    if ty.shape[1] != vy.shape[1]:
        raise UserError(f"{d}: {FILES[1]} has {ty.shape[1]} neurons but {FILES[3]} has {vy.shape[1]}")
    return Region(f"region{region}", tx, ty, vx, vy, _orient_raw(raw, vy, d / FILES[4]))


def _orient_raw(raw: np.ndarray, val_y: np.ndarray, path: Path) -> np.ndarray:
    """Return the single trials as (reps, images, neurons).

    The supplement's array is (reps, 50, N); third-party code swaps axes 0/1, so both orders exist in the
    wild. When the shape allows both, the order whose trial mean matches validation_set.npy wins.
    """
    n_img, n_neu = val_y.shape
    if raw.shape[2] != n_neu:
        raise UserError(f"{path}: expected (reps, {n_img}, {n_neu}) with {n_neu} neurons as in validation_set.npy, "
                        f"got shape {raw.shape}")
    options = []
    if raw.shape[1] == n_img:
        options.append(raw)
    if raw.shape[0] == n_img:
        options.append(raw.transpose(1, 0, 2))
    if not options:
        raise UserError(f"{path}: expected (reps, {n_img}, {n_neu}) or ({n_img}, reps, {n_neu}), got shape {raw.shape}")
    return min(options, key=lambda r: float(np.abs(r.mean(0) - val_y).mean()))


# ----------------------------------------------------------------------------- scaling and pooling


def scale_inputs(x: np.ndarray, mode: str, stats=None) -> np.ndarray:
    """raw: as stored (0..0.000255, slug input-scale: training fails at this scale, thesis 1.1.1); x1e6: back to 0..255 (bl1); zscore: (x − mean)/std
    with the mean/std of the whole array (bl2+), or of `stats` = (mean, std) when given."""
    if mode == "raw":
        return x
    if mode == "x1e6":
        return x * 1e6
    if mode == "zscore":
        mean, std = stats if stats is not None else (x.mean(), x.std())
        return (x - mean) / max(std, 1e-12)
    raise UserError(f"unknown input scaling {mode!r}; expected one of {SCALINGS}")


def make_dataset(regions: list[Region], scaling: str, val_own_stats: bool = False) -> Dataset:
    """Scale each region's inputs and pool the regions (one region: no masks).

    z-score: by default the validation inputs use the TRAINING mean/std (the intent: one fixed preprocessing);
    `val_own_stats=True` reproduces msc-neuro, which z-scores the validation array with its own statistics (slug
    zscore-val-own-stats).
    Pooling (thesis exp11/12, bs3_exp4/9): images are concatenated; every image has responses only for its own
    region's neurons, so outputs are widened with zeros and a 0/1 mask (block diagonal) excludes the rest from
    the loss and from the correlations.
    """
    txs, tys, vxs, vys, blocks, ceilings, avg_ceilings = [], [], [], [], [], [], []
    n_total = sum(r.n_neurons for r in regions)
    n0, v0 = 0, 0
    for r in regions:
        stats = (r.train_x.mean(), r.train_x.std())
        txs.append(scale_inputs(r.train_x, scaling))
        vxs.append(scale_inputs(r.val_x, scaling, None if val_own_stats else stats))
        ty = np.zeros((len(r.train_y), n_total))
        ty[:, n0:n0 + r.n_neurons] = r.train_y
        vy = np.zeros((len(r.val_y), n_total))
        vy[:, n0:n0 + r.n_neurons] = r.val_y
        tys.append(ty)
        vys.append(vy)
        ceil = metrics.oracle_corr(r.raw_val)
        avg = np.sqrt(np.clip(metrics.split_half_reliability(r.raw_val, n_splits=20), 0.0, None))
        ceilings.append(ceil)
        avg_ceilings.append(avg)
        blocks.append(dict(name=r.name, images=slice(v0, v0 + len(r.val_y)), neurons=slice(n0, n0 + r.n_neurons),
                           oracle=float(np.mean(ceil)), avg_ceiling=float(np.mean(avg))))
        n0, v0 = n0 + r.n_neurons, v0 + len(r.val_y)
    t = lambda a: torch.from_numpy(np.concatenate(a))  # noqa: E731
    train_mask = val_mask = None
    if len(regions) > 1:
        train_mask = torch.cat([_block_mask(len(r.train_y), n_total, b["neurons"]) for r, b in zip(regions, blocks)])
        val_mask = torch.cat([_block_mask(len(r.val_y), n_total, b["neurons"]) for r, b in zip(regions, blocks)])
    names = "+".join(r.name for r in regions)
    return Dataset(split(t(txs), t(tys), train_mask, f"{names} training"), split(t(vxs), t(vys), val_mask,
                   f"{names} validation"), blocks, np.concatenate(ceilings), np.concatenate(avg_ceilings))


def _block_mask(n_images: int, n_total: int, neurons: slice) -> torch.Tensor:
    m = torch.zeros(n_images, n_total, dtype=torch.bool)
    m[:, neurons] = True
    return m


def region_list(spec: str) -> list:
    """'1'|'2'|'3' → [[r]]; 'all' → [[1], [2], [3]] (trained separately); 'pooled' → [[1, 2, 3]]; '1,2' → [[1, 2]]."""
    if spec == "all":
        return [[1], [2], [3]]
    if spec == "pooled":
        return [[1, 2, 3]]
    try:
        rs = [int(s) for s in spec.split(",")]
    except ValueError:
        rs = []
    if not rs or any(r not in REGION_SIZES for r in rs):
        raise UserError(f"--region {spec!r}: expected 1, 2, 3, all, pooled or a list like 1,2")
    return [rs]


def validation_corr(pred: torch.Tensor, ds: Dataset) -> np.ndarray:
    """Per-neuron validation correlation (common.metrics), each neuron over its own region's images only."""
    p = pred.detach().cpu().double().numpy()
    y = ds.val.responses.cpu().double().numpy()
    out = np.zeros(ds.n_neurons)
    for b in ds.blocks:
        out[b["neurons"]] = metrics.corr(p[b["images"], b["neurons"]], y[b["images"], b["neurons"]])
    return out


# ----------------------------------------------------------------------------- synthetic regions


def hsm_teacher(n_neurons: int, seed: int) -> models.SeedNet:
    """A random HSM (one seed) with plausible receptive fields, used as ground truth (synthetic regions, tests).

    DoG centres near the image middle, widths of a few pixels; every hidden unit mixes the DoG outputs with
    random signs (ON- and OFF-like units) and is calibrated to rectify strongly, and each neuron sums a few
    hidden units with positive weights: a sum of rectified units, which an LN model can only partly fit.
    Calibrated on z-scored `natural_images` so that the mean rate is ≈ 2 spikes per trial.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    net = models.build_model(dict(arch="hsm", n_dog=9, hidden_ratio=0.2), n_neurons, [seed]).eval()
    u = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)  # noqa: E731
    dog, hidden, out = net.layers
    calib = synthetic.natural_images(256, IMAGE_SIZE, 1, seed=20_000 + seed).double().reshape(256, -1)
    calib = (calib - calib.mean()) / calib.std()
    with torch.no_grad():
        K, bank = dog.bank.n_filters, dog.bank
        bank.alpha1.copy_(u((1, K), 5, 10))
        bank.alpha2.copy_(bank.alpha1 * u((1, K), 0.6, 1.0))
        bank.sigma1.copy_(u((1, K), 1.0, 5.0))
        bank.sigma2.copy_(u((1, K), 2.0, 12.0))
        bank.ux.copy_(u((1, K), 9, 21))
        bank.uy.copy_(u((1, K), 9, 21))
        dog.bias.zero_()
        d = dog(calib)[0]  # (256, K)
        w = torch.randn(hidden.weight.shape, generator=g, dtype=torch.float64) / d.std(0)  # (1, H, K)
        pre = d @ w[0].t()
        hidden.weight.copy_(2.0 * w / pre.std(0)[None, :, None])
        hidden.bias.copy_(2.0 * (-pre.mean(0) / pre.std(0)) + u(hidden.bias.shape, -1.0, 0.5))
        h = hidden(d[None])[0]
        n_out, n_hid = out.weight.shape[1:]
        wo = u(out.weight.shape, 0.2, 1.0) * (torch.rand(out.weight.shape, generator=g, dtype=torch.float64) < 0.3)
        wo[0, torch.arange(n_out), torch.randint(0, n_hid, (n_out,), generator=g)] += 1.0  # ≥ 1 strong input
        po = h @ wo[0].t()
        out.weight.copy_(1.5 * wo / po.std(0)[None, :, None])
        out.bias.copy_(1.5 * (-po.mean(0) / po.std(0)) + 1.0)
    return net


def synthetic_region(kind: str, n_neurons: int, n_train: int, n_val: int, reps: int, seed: int):
    """Images (float64 in 0..0.000255), single-trial training responses, validation repeats and the true
    validation rates for one synthetic region.

    kind 'v1' (the default) / 'deep': common.synthetic.SimulatedPopulation (Gabor simple and complex cells, or
    pooled nonlinear features), Poisson noise: a ground truth outside the HSM's model class, which the HSM fits
    far better than an LN model (complex cells are invisible to a linear filter). kind 'hsm': a random HSM teacher
    (`hsm_teacher`) on z-scored images, for teacher-student checks.
    """
    imgs = synthetic.natural_images(n_train + n_val, IMAGE_SIZE, 1, seed=seed).double()
    x = imgs.reshape(len(imgs), -1) * PIXEL_MAX
    if kind == "hsm":
        z = (x - x[:n_train].mean()) / x[:n_train].std()
        with torch.no_grad():
            rates = hsm_teacher(n_neurons, seed)(z)[0]
    elif kind in ("v1", "deep"):
        rates = synthetic.SimulatedPopulation(n_neurons, IMAGE_SIZE, 1, kind=kind, seed=seed).rates(imgs)
    else:
        raise UserError(f"unknown synthetic kind {kind!r}; expected hsm|v1|deep")
    g = torch.Generator().manual_seed(seed + 1)
    train_y = torch.poisson(rates[:n_train], generator=g)
    raw_val = torch.poisson(rates[n_train:].expand(reps, -1, -1).contiguous(), generator=g)
    return x[:n_train], train_y, x[n_train:], raw_val, rates[n_train:]


def write_synthetic(root, regions=(1, 2, 3), sizes=None, kind: str = "v1", seed: int = 0) -> Path:
    """Write `root/region{r}/` with the 5 real file names, shapes, dtypes (float64) and value ranges, plus
    `root/ground_truth.json` holding each region's true noise ceiling (expected correlation between the true
    rate and the trial average) next to the oracle estimate from raw_validation_set.npy.

    sizes: {region: dict(neurons, train, val, reps)}, default the real ones (REGION_SIZES).
    """
    root = Path(root)
    sizes = sizes or REGION_SIZES
    truth = {"kind": kind, "seed": seed, "regions": {}}
    for r in regions:
        s = sizes[r]
        tx, ty, vx, raw, vrates = synthetic_region(kind, s["neurons"], s["train"], s["val"], s["reps"], seed + 100 * r)
        d = root / f"region{r}"
        d.mkdir(parents=True, exist_ok=True)
        arrays = dict(zip(FILES, (tx, ty, vx, raw.mean(0), raw)))
        for name, a in arrays.items():
            np.save(d / name, a.numpy().astype(np.float64))
        true_ceiling = synthetic.SimulatedPopulation.true_ceiling(vrates, s["reps"])
        truth["regions"][f"region{r}"] = {
            "true_ceiling_mean": float(np.mean(true_ceiling)),
            "oracle_corr_mean": float(np.mean(metrics.oracle_corr(raw.numpy()))), **s}
    (root / "ground_truth.json").write_text(json.dumps(truth, indent=2))
    return root


def read_ground_truth(root) -> dict | None:
    p = Path(root) / "ground_truth.json"
    return json.loads(p.read_text()) if p.is_file() else None
