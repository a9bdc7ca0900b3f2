"""Data of the co-training study: Tiny-ImageNet (+ -C and Gaussian noise), the monkey V1 sessions in both real
formats, a writer of the session format, and the batch cycler that interleaves the two tasks.

Image data (Safarani et al. 2021 §3; nntransfer `dataset/img_dataset_loader.py` defaults)
- Tiny-ImageNet root (wnids.txt, train/<wnid>/images/*.JPEG, val/ as shipped): a seeded 10% of train is the
  validation split, the official val (10k images) is the test split.
- Train transform: RandomCrop(64, pad 4), horizontal flip, rotation ±15°, ToTensor, Grayscale,
  Normalize(0.4519, 0.2221). Eval transform: ToTensor, Grayscale, Normalize.
- Tiny-ImageNet-C (Hendrycks & Dietterich 2019): root/<corruption>/<1..5>/<wnid>/*.JPEG. Grayscale is taken on the
  tensor as for clean images (the original converted corrupted images on the PIL uint8 image, clean ones on the
  float tensor: slug grayscale-pil-uint8).

Neural data, two real formats, both pickles read with a restricted unpickler (numpy arrays and builtins only)
1. nnvision session pickles (nnvision `datasets/monkey_loaders.py::monkey_static_loader`):
     <root>/neuronal_data/<any name>   one pickled dict per recording session (CSRF19_V4_3653663964522.pickle is
                                       skipped, as the original), keys
         session_id                    the data key (default: the file name)
         training_responses            neurons × time_bins (≥ 12) × trials; bins 0-11 are summed per trial
         testing_responses             neurons × time_bins × trials
         training_image_ids / testing_image_ids   1-D, one 1-based image id per trial
         (subject_id, unit_ids, electrode_nums, relative_micron_depth, *_labels: read if present, unused)
     <root>/images/<6-digit id>.npy    one image per id, uint8 H×W (or H×W×3, reduced to luminance)
   A seeded permutation of all image ids (train and test ids; seed 1000 in the original, `--split_seed`) puts the
   first 80% in train, the other training trials form the validation split. Test trials are grouped by image into
   repeats (reps × images × neurons, NaN where an image has fewer repeats) for FEVe.
2. The public Cadena et al. 2019 (PLOS CB) pickle `cadena_ploscb_data.pkl` (GIN: doi 10.12751/g-node.2e31e3):
     images (7250, 140, 140) 0-255, responses (4 repeats, 7250, 166 neurons) with NaN where a neuron has only 2
     repeats, repetitions (166,), image_ids, image_types, image_numbers, subject_id. The last 20% of the images are
     the test split (Cadena's `cnn_sys_ident/data.py`); a seeded 20% of the rest is validation. Responses are
     averaged over the valid repeats; an image × neuron without any valid repeat is masked out of the loss.
Both: optional crop (pixels per side), subsample (stride, Cadena's [30:-30:2] is crop 30 + subsample 2) and
rescale, then the Tiny-ImageNet grayscale normalisation (the co-training recipes use those statistics).
"""
from __future__ import annotations

import io
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from common import datasets
from common.datasets import NeuralResponses
from common.runtime import UserError

MEAN, STD = 0.4519, 0.2221  # Tiny-ImageNet grayscale statistics (the original's `stats`)
SKIP_FILES = ("CSRF19_V4_3653663964522.pickle",)  # skipped by the original loader
TIME_BINS = 12  # the original sums time bins 0-11 (`time_bins_sum` 12)
SESSION_KEYS = ("training_responses", "testing_responses", "training_image_ids", "testing_image_ids")


# ----------------------------------------------------------------------------- Tiny-ImageNet


def tiny_transforms(train: bool, noise_std: float = 0.0):
    """The paper's grayscale pipeline; `noise_std` adds N(0, std²) pixel noise in [0, 1] space (clipped) before
    the grayscale conversion (the original's `validation_gauss` / OutDomain noise)."""
    ops = [T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15)] if train else []
    ops.append(T.ToTensor())
    if noise_std > 0:
        ops.append(T.Lambda(lambda x: (x + noise_std * torch.randn_like(x)).clamp(0.0, 1.0)))
    ops += [T.Grayscale(num_output_channels=1), T.Normalize((MEAN,), (STD,))]
    return T.Compose(ops)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation: (first 1 − fraction, last fraction), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def tiny_imagenet(root, valid_fraction: float = 0.1, split_seed: int = 1000):
    """(train, validation, test, classes): train/validation = a seeded split of Tiny-ImageNet train (train and eval
    transforms), test = the official val split."""
    train_full = datasets.TinyImageNet(root, "train", tiny_transforms(True))
    eval_full = datasets.TinyImageNet(root, "train", tiny_transforms(False))
    tr, va = split_indices(len(train_full), valid_fraction, split_seed)
    test = datasets.TinyImageNet(root, "val", tiny_transforms(False))
    return (torch.utils.data.Subset(train_full, tr.tolist()), torch.utils.data.Subset(eval_full, va.tolist()),
            test, train_full.classes)


def tiny_test(root, noise_std: float = 0.0):
    return datasets.TinyImageNet(root, "val", tiny_transforms(False, noise_std))


def tiny_c(c_root, classes, corruptions=None, severities=(1, 2, 3, 4, 5)):
    """(corruption, severity, dataset) over a Tiny-ImageNet-C root, eval transform, the training class order."""
    return datasets.iter_tiny_imagenet_c(c_root, tiny_transforms(False), classes, corruptions, severities)


# ----------------------------------------------------------------------------- restricted unpickler

_ALLOWED = {
    # numpy arrays, scalars and dtypes as 2019-2021 numpy (numpy.core) and numpy 2 (numpy._core) pickle them
    **{(m, n): True for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")},
    **{(m, "_frombuffer"): True for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): True, ("numpy", "dtype"): True, ("_codecs", "encode"): True,
    **{("builtins", n): True for n in ("bytearray", "set", "frozenset", "complex", "slice", "range")},
    ("collections", "OrderedDict"): True,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array/scalar/dtype constructors and a few builtins: any other global (a class of some
    library, `os.system`, ...) is refused, so a crafted file cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (numpy arrays and builtins only)")


def load_pickle(path):
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to unpickle ({e})") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, ImportError) as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- image preprocessing


def preprocess(images: np.ndarray, crop: int = 0, subsample: int = 1, scale: float = 1.0, source="") -> torch.Tensor:
    """N × H × W (or N × H × W × 3) images → N × 1 × h × w: uint8 when unscaled, else float in [0, 1].

    Luminance for colour images; crop `crop` pixels per side; keep every `subsample`-th pixel; rescale by `scale`
    (antialiased bilinear, as skimage's rescale). Float images are taken as 0-255 if their max exceeds 1 (the
    original did not divide float .npy images by 255: slug float-npy-not-scaled).
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 3:
        x = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if x.ndim != 3:
        raise UserError(f"{source}: images must be N × H × W (or N × H × W × 3), got shape {x.shape}")
    if crop < 0 or subsample < 1 or scale <= 0:
        raise UserError(f"crop must be ≥ 0, subsample ≥ 1 and scale > 0 (got {crop}, {subsample}, {scale})")
    h, w = x.shape[1:]
    if 2 * crop >= min(h, w):
        raise UserError(f"{source}: crop {crop} per side leaves nothing of {h}×{w} images")
    x = x[:, crop:h - crop, crop:w - crop][:, ::subsample, ::subsample]
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise UserError(f"{source}: images contain NaN or inf")
        x = x / 255.0 if x.max() > 1.0 else x
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    if scale != 1.0:
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t
        t = F.interpolate(t, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return t


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Stored images (uint8 0-255 or float 0-1) → the network's normalised float input."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x - MEAN) / STD


# ----------------------------------------------------------------------------- nnvision session pickles


def _as_array(d: dict, key: str, path, ndim: int) -> np.ndarray:
    if key not in d:
        raise UserError(f"{path}: key {key!r} is missing (expected {', '.join(SESSION_KEYS)})")
    a = np.asarray(d[key])
    if ndim == 1:
        a = a.reshape(-1)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.number):
        raise UserError(f"{path}: {key!r} must be a numeric {ndim}-D array, got {a.dtype} shape {a.shape}")
    return a


def _sum_bins(resp: np.ndarray, key: str, path) -> np.ndarray:
    """neurons × bins × trials → trials × neurons, summing bins 0-11."""
    if resp.shape[1] < TIME_BINS:
        raise UserError(f"{path}: {key!r} has {resp.shape[1]} time bins; bins 0-{TIME_BINS - 1} are summed, so at "
                        f"least {TIME_BINS} are needed (shape neurons × time_bins × trials)")
    return resp[:, :TIME_BINS].sum(1).T.astype(np.float32)


def _group_repeats(resp: np.ndarray, ids: np.ndarray):
    """trials × neurons + image id per trial → (unique ids, reps × images × neurons with NaN padding)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    counts = np.bincount(inv)
    reps = np.full((counts.max(), len(uniq), resp.shape[1]), np.nan, np.float32)
    seen = np.zeros(len(uniq), np.int64)
    for t, i in enumerate(inv):
        reps[seen[i], i] = resp[t]
        seen[i] += 1
    return uniq, reps


def _nanmean0(reps: np.ndarray):
    """Mean over axis 0 of the finite entries (0 where none) and the mask of entries with at least one."""
    ok = np.isfinite(reps)
    n = ok.sum(0)
    return (np.where(ok, reps, 0.0).sum(0) / np.maximum(n, 1)).astype(np.float32), n > 0


def _nan_to_mask(resp: np.ndarray):
    bad = ~np.isfinite(resp)
    return np.where(bad, 0.0, resp).astype(np.float32), (None if not bad.any() else torch.from_numpy(~bad))


def read_sessions(root, crop: int = 0, subsample: int = 1, scale: float = 1.0, train_fraction: float = 0.8,
                  split_seed: int = 1000) -> dict:
    """{data_key: {"train", "validation", "test": NeuralResponses}} from an nnvision `neuronal_data/` + `images/`
    folder (see the module docstring)."""
    root = Path(root)
    ndir, idir = root / "neuronal_data", root / "images"
    if not ndir.is_dir():
        raise UserError(f"{ndir} does not exist (expected an nnvision folder with neuronal_data/ and images/)")
    files = sorted(p for p in ndir.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in SKIP_FILES)
    if not files:
        raise UserError(f"{ndir} holds no session files")
    raw = {}
    for path in files:
        d = load_pickle(path)
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a pickled dict, got {type(d).__name__}")
        tr = _as_array(d, "training_responses", path, 3)
        te = _as_array(d, "testing_responses", path, 3)
        tr_ids = _as_array(d, "training_image_ids", path, 1).astype(np.int64)
        te_ids = _as_array(d, "testing_image_ids", path, 1).astype(np.int64)
        for key, resp, ids in (("training", tr, tr_ids), ("testing", te, te_ids)):
            if resp.shape[2] != len(ids):
                raise UserError(f"{path}: {key}_responses has {resp.shape[2]} trials but {key}_image_ids has {len(ids)}")
        if tr.shape[0] != te.shape[0]:
            raise UserError(f"{path}: training and testing responses differ in neurons ({tr.shape[0]} vs {te.shape[0]})")
        key = str(np.asarray(d["session_id"]).reshape(-1)[0]) if "session_id" in d else path.stem
        if key in raw:
            raise UserError(f"{path}: session_id {key!r} occurs twice in {ndir}")
        raw[key] = (_sum_bins(tr, "training_responses", path), tr_ids, _sum_bins(te, "testing_responses", path), te_ids)
    needed = np.unique(np.concatenate([np.concatenate([v[1], v[3]]) for v in raw.values()]))
    if (needed < 1).any():
        raise UserError(f"{ndir}: image ids are 1-based, found {needed.min()}")
    images = {}
    for i in needed:
        p = idir / f"{i:06d}.npy"
        if not p.is_file():
            raise UserError(f"{p} is missing (image id {i} is referenced in {ndir})")
        try:
            images[i] = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{p}: not a readable .npy image ({e})") from None
    shapes = {a.shape for a in images.values()}
    if len(shapes) != 1:
        raise UserError(f"{idir}: images differ in shape {sorted(shapes)[:3]}")
    pos = {i: n for n, i in enumerate(needed)}
    pixels = preprocess(np.stack([images[i] for i in needed]), crop, subsample, scale, source=str(idir))
    out = {}
    for key, (tr, tr_ids, te, te_ids) in raw.items():
        # the original permutes all image ids of the session (test ids too) with a fixed seed: first 80% → train
        all_ids = np.unique(np.concatenate([tr_ids, te_ids]))
        perm = np.random.default_rng(split_seed).permutation(all_ids)
        train_ids = set(perm[: int(round(train_fraction * len(perm)))].tolist())
        is_tr = np.array([i in train_ids for i in tr_ids])
        sets = {}
        for name, sel in (("train", is_tr), ("validation", ~is_tr)):
            resp, mask = _nan_to_mask(tr[sel])
            idx = torch.tensor([pos[i] for i in tr_ids[sel]], dtype=torch.long)
            sets[name] = NeuralResponses(pixels[idx], torch.from_numpy(resp), mask=mask, source=f"{key}/{name}")
        uniq, reps = _group_repeats(te, te_ids)
        mean, valid = _nanmean0(reps)
        mask = None if valid.all() else torch.from_numpy(valid)
        idx = torch.tensor([pos[i] for i in uniq], dtype=torch.long)
        sets["test"] = NeuralResponses(pixels[idx], torch.from_numpy(mean), torch.from_numpy(reps), mask,
                                       source=f"{key}/test")
        if len(sets["train"].images) == 0:
            raise UserError(f"{ndir}: session {key} has no training trials after the {train_fraction:.0%} split")
        out[key] = sets
    return out


def write_sessions(root, images: np.ndarray, sessions: list[dict], protocol: int = 2) -> Path:
    """Write an nnvision folder: images/<6-digit id>.npy (id = index + 1) and neuronal_data/<session_id>.pickle.

    `sessions`: dicts with session_id, training_responses / testing_responses (neurons × time_bins × trials),
    training_image_ids / testing_image_ids (1-based); other keys are written as given.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "neuronal_data").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(np.asarray(images)):
        np.save(root / "images" / f"{i + 1:06d}.npy", img)
    for s in sessions:
        with open(root / "neuronal_data" / f"{s['session_id']}.pickle", "wb") as f:
            pickle.dump(s, f, protocol=protocol)
    return root


def simulated_sessions(root, n_sessions: int = 2, n_neurons: int = 24, n_train: int = 480, n_test: int = 40,
                       test_repeats: int = 4, size: int = 64, mean_rate: float = 4.0, seed: int = 0) -> Path:
    """The embedded default's "monkey": Gabor simple/complex cells (common.synthetic.SimulatedPopulation) seeing
    1/f natural-like images, Poisson spike counts over 14 time bins (only 0-11 are summed), one trial per train
    image and `test_repeats` per test image, written in the nnvision session-pickle format."""
    from common import synthetic

    imgs = synthetic.natural_images(n_train + n_test, size, 1, seed=seed)  # float [0, 1]
    u8 = (imgs[:, 0].numpy() * 255 + 0.5).astype(np.uint8)
    x = torch.from_numpy(u8[:, None].astype(np.float64) / 255.0)
    g = torch.Generator().manual_seed(seed)
    sessions = []
    for s in range(n_sessions):
        pop = synthetic.SimulatedPopulation(n_neurons, size, 1, "v1", seed=seed + 101 * (s + 1), mean_rate=mean_rate)
        rates = pop.rates(x)  # images × neurons
        tr_ids = np.arange(1, n_train + 1)
        te_ids = np.repeat(np.arange(n_train + 1, n_train + n_test + 1), test_repeats)

        def spikes(ids):
            r = rates[torch.from_numpy(ids - 1)].T / TIME_BINS  # neurons × trials, per bin
            return torch.poisson(r[:, None, :].expand(-1, TIME_BINS + 2, -1).contiguous(), generator=g).numpy()

        sessions.append({"subject_id": 1, "session_id": f"sim{s + 1}", "training_responses": spikes(tr_ids),
                         "testing_responses": spikes(te_ids), "training_image_ids": tr_ids,
                         "testing_image_ids": te_ids, "unit_ids": np.arange(n_neurons)})
    return write_sessions(root, u8, sessions)


# ----------------------------------------------------------------------------- Cadena et al. 2019 pickle


def read_cadena(path, crop: int = 30, subsample: int = 2, scale: float = 1.0, test_fraction: float = 0.2,
                valid_fraction: float = 0.2, split_seed: int = 1000) -> dict:
    """{"cadena": {"train", "validation", "test": NeuralResponses}} from `cadena_ploscb_data.pkl`."""
    d = load_pickle(path)
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    for k in ("images", "responses"):
        if k not in d:
            raise UserError(f"{path}: key {k!r} is missing (expected images N×H×W and responses reps×N×neurons)")
    images, resp = np.asarray(d["images"]), np.asarray(d["responses"], dtype=np.float32)
    if images.ndim != 3 or resp.ndim != 3 or resp.shape[1] != len(images):
        raise UserError(f"{path}: expected images N×H×W and responses reps×N×neurons, got {images.shape} and {resp.shape}")
    n = len(images)
    pixels = preprocess(images, crop, subsample, scale, source=str(path))
    n_test = int(round(test_fraction * n))
    tr, va = split_indices(n - n_test, valid_fraction, split_seed)
    te = np.arange(n - n_test, n)
    out = {}
    for name, idx in (("train", tr), ("validation", va), ("test", te)):
        reps = resp[:, idx]
        mean, valid = _nanmean0(reps)
        out[name] = NeuralResponses(pixels[torch.from_numpy(idx)], torch.from_numpy(mean),
                                    torch.from_numpy(reps) if name == "test" else None, torch.from_numpy(valid),
                                    source=f"{path}/{name}")
    return {"cadena": out}


def read_neural(root, crop=None, subsample=None, scale=1.0, split_seed=1000) -> dict:
    """Dispatch on the format: a .pkl file → Cadena 2019; a folder with neuronal_data/ → nnvision sessions.
    crop/subsample default to each format's usual values (Cadena 30/2, nnvision 0/1)."""
    root = Path(root)
    if root.is_file():
        return read_cadena(root, 30 if crop is None else crop, 2 if subsample is None else subsample, scale,
                           split_seed=split_seed)
    if (root / "neuronal_data").is_dir():
        return read_sessions(root, crop or 0, subsample or 1, scale, split_seed=split_seed)
    raise UserError(f"{root}: expected cadena_ploscb_data.pkl or an nnvision folder with neuronal_data/ and images/")


# ----------------------------------------------------------------------------- batch cycling


def parse_ratio(text) -> dict:
    """'1', '0.5' or a schedule '1:1,3:2' ({start epoch: neural batches per image batch}; epochs start at 1)."""
    try:
        if isinstance(text, dict):
            sched = {int(k): Fraction(str(v)) for k, v in text.items()}
        elif ":" in str(text):
            sched = {int(a): Fraction(b.strip()) for a, b in (p.split(":") for p in str(text).split(","))}
        else:
            sched = {1: Fraction(str(text).strip())}
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--ratio {text!r}: expected a number (2, 0.5) or a schedule 'epoch:k,...' such as '1:1,3:2'") from None
    if not sched or min(sched) > 1 or any(v < 0 for v in sched.values()):
        raise UserError(f"--ratio {text!r}: the schedule must start at epoch 1 with ratios ≥ 0")
    return sched


def ratio_for_epoch(schedule: dict, epoch: int) -> Fraction:
    """The ratio of the largest start epoch ≤ `epoch` (1-based), as the original MTL_Cycler's ratio dict."""
    return schedule[max(k for k in schedule if k <= epoch)]


def neural_counts(n_images: int, ratio, original_fraction: bool = False) -> list[int]:
    """Neural batches before each image batch. k integer: k each. A fraction: floor((i+1)k) − floor(ik), so k = 0.3
    gives 3 neural batches per 10 image batches. `original_fraction` reproduces neural_cotraining's
    `(i + 1) % (1 / ratio) == 0`, which never fires when 1/ratio is not an integer (k = 0.3 → no neural batch;
    slug fraction-ratio)."""
    k = ratio if isinstance(ratio, Fraction) else Fraction(str(ratio))  # "0.3" exactly, not its binary float
    if original_fraction and k.numerator != 0 and k < 1:
        inv = 1 / float(k)
        return [1 if ((i + 1) % inv) == 0 else 0 for i in range(n_images)]
    return [int((i + 1) * k) - int(i * k) for i in range(n_images)]


class _Restarting:
    """Endless batches of one re-iterable loader; at each exhaustion it starts over (calling set_epoch with a
    new value, so a TensorBatcher reshuffles)."""

    def __init__(self, loader, base: int = 0):
        self.loader, self.base, self.restarts, self.it = loader, base, 0, None

    def next(self):
        while True:
            if self.it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.base + self.restarts)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.restarts = None, self.restarts + 1
                if self.restarts > 1000 and len(self.loader) == 0:
                    raise ValueError("empty neural loader") from None


class MTLCycler:
    """One epoch of co-training batches: for each image batch, its neural batches (round-robin over the sessions,
    each session's loader restarting when exhausted), then the image batch.

    Yields (kind, session, batch, step): kind "neural" | "image"; step is True after the image batch — gradients of
    the neural batches and the image batch accumulate and the optimizer steps once per group, as the original's
    MTL_Cycler + trainer. The neural loaders and the round-robin pointer start afresh every epoch (seeded by
    `epoch`), so a resumed epoch replays exactly.
    """

    def __init__(self, image_loader, neural_loaders: dict, ratio, epoch: int = 1, original_fraction: bool = False):
        self.image_loader, self.keys = image_loader, list(neural_loaders)
        self.neural = {k: _Restarting(v, base=1000 * epoch) for k, v in neural_loaders.items()}
        self.counts = neural_counts(len(image_loader), ratio if self.keys else 0, original_fraction)

    def __len__(self) -> int:
        return len(self.counts) + sum(self.counts)

    def __iter__(self):
        turn = 0
        for i, batch in enumerate(self.image_loader):
            for _ in range(self.counts[i]):
                key = self.keys[turn % len(self.keys)]
                turn += 1
                yield "neural", key, self.neural[key].next(), False
            yield "image", None, batch, True


class LongCycler:
    """Single-task neural training (neuralpredictors' LongCycler): round-robin over the sessions for
    n_sessions × (longest loader) batches; the optimizer steps after every n_sessions batches."""

    def __init__(self, neural_loaders: dict, epoch: int = 1):
        self.keys = list(neural_loaders)
        self.neural = {k: _Restarting(v, base=1000 * epoch) for k, v in neural_loaders.items()}
        self.n = len(self.keys) * max(len(v) for v in neural_loaders.values())

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            key = self.keys[i % len(self.keys)]
            yield "neural", key, self.neural[key].next(), (i + 1) % len(self.keys) == 0


class Limited:
    """The first n batches of a loader (--limit_train_batches), with a len() the cycler can plan with."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self):
        return self.n

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i >= self.n:
                break
            yield b
