"""TVSD on disk: the THINGS Ventral Stream Spiking Dataset (Papale et al. 2025, gin.g-node.org/paolo_papale/TVSD)
and the Roelfsema-lab repo's per-array exports, plus a writer of a small synthetic dataset in the same layout.

Readers
- `read_normmua(path)`: `monkey{N,F}/THINGS_normMUA.mat` (MATLAB v7.3 = HDF5). h5py shows MATLAB's dimensions
  reversed: `train_MUA` (22248, 1024) = [image, electrode], `test_MUA` (100, 1024), `test_MUA_reps` (30, 100, 1024)
  = [repeat, image, electrode], `reliab` (435, 1024) = [repeat pair, electrode], `oracle` (1024, 1). Files written
  the other way round (e.g. re-saved from Python) are detected from the electrode dimension shared by train and
  test (on TVSD: the 22,248 / 100 image counts) and transposed back. NaN is allowed (the source uses nanmean).
- `read_array_exports(folder)`: the repo's `THINGS_exportMUA_array{N}.mat` (from TVSD `export_MUA.m`):
  `good_chns` (n, 1), `train_MUA` (22248, n, 1), `test_MUA` (100, n, 1); an empty MATLAB array (monkey N's dead
  array 6) is skipped. No repeats, so no FEVe for this format.
- `read_image_list(path)`: `_logs/things_imgs.mat` (`train_imgs` / `test_imgs` struct arrays whose `things_path`
  field holds HDF5 object references to UTF-16 char arrays) or a text file of paths, one per line — in ROW ORDER
  (row i of `train_MUA` is image i; never sorted).

Electrodes → arrays → areas: each block of 64 electrodes is one Utah array (true for THINGS_normMUA.mat, whose
`norm_MUA.m` already applied the headstage permutation). Monkey N: arrays 1-8 V1, 9-12 V4, 13-16 IT; monkey F:
arrays 1-8 V1, 9-13 IT, 14-16 V4.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from common import metrics, synthetic
from common.runtime import UserError

N_TRAIN, N_TEST, N_ELECTRODES, N_ARRAYS = 22248, 100, 1024, 16
AREA_OF_ARRAY = {  # 16 arrays per monkey, in electrode order (TVSD README / norm_MUA.m)
    "N": ["V1"] * 8 + ["V4"] * 4 + ["IT"] * 4,
    "F": ["V1"] * 8 + ["IT"] * 5 + ["V4"] * 3,
}
AREAS = ("V1", "V4", "IT")
NORMMUA = "THINGS_normMUA.mat"
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


# ----------------------------------------------------------------------------- HDF5 (.mat v7.3) helpers


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a MATLAB v7.3 (HDF5) file: {e}") from None


def _is_empty(ds) -> bool:
    """MATLAB stores an empty array as its size vector with MATLAB_empty=1: a naive read would return the sizes."""
    return bool(ds.attrs.get("MATLAB_empty", 0))


def _read(f: h5py.File, key: str, path, required: bool = True):
    if key not in f:
        if required:
            raise UserError(f"{path}: key {key!r} missing (found: {', '.join(sorted(f.keys()))})")
        return None
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise UserError(f"{path}: {key!r} is a group, expected a numeric array")
    if _is_empty(ds):
        return None
    return np.asarray(ds[()], dtype=np.float64)


def _electrodes_last(a: np.ndarray, n_el: int, key: str, path) -> np.ndarray:
    """Move the electrode axis (size n_el) last. h5py's natural order has it last already; a transposed file
    has it first, and then every axis is reversed (MATLAB order)."""
    if a.shape[-1] == n_el:
        return a
    if a.shape[0] == n_el:
        return a.transpose(tuple(range(a.ndim))[::-1])
    raise UserError(f"{path}: {key} has shape {a.shape}, expected one axis of {n_el} electrodes (first or last)")


def read_normmua(path) -> dict:
    """THINGS_normMUA.mat → dict(train [n_train, E], test [n_test, E], test_reps [reps, n_test, E] or None,
    reliab [E] (mean over repeat pairs, NaN-aware) or None, oracle [E] or None, snr_max [E] or None), float64."""
    with _open(path) as f:
        train, test = _read(f, "train_MUA", path), _read(f, "test_MUA", path)
        reps = _read(f, "test_MUA_reps", path, required=False)
        reliab = _read(f, "reliab", path, required=False)
        oracle = _read(f, "oracle", path, required=False)
        snr_max = _read(f, "SNR_max", path, required=False)
    if train is None or test is None or train.ndim != 2 or test.ndim != 2:
        raise UserError(f"{path}: train_MUA and test_MUA must be 2-D [images, electrodes], got "
                        f"{None if train is None else train.shape} and {None if test is None else test.shape}")
    n_el = _electrode_count(train.shape, test.shape, path)
    train, test = _electrodes_last(train, n_el, "train_MUA", path), _electrodes_last(test, n_el, "test_MUA", path)
    out = {"train": train, "test": test, "test_reps": None, "reliab": None, "oracle": None, "snr_max": None}
    if reps is not None:
        if reps.ndim != 3:
            raise UserError(f"{path}: test_MUA_reps must be 3-D [repeats, images, electrodes], got {reps.shape}")
        reps = _electrodes_last(reps, n_el, "test_MUA_reps", path)
        if reps.shape[1] != test.shape[0]:
            raise UserError(f"{path}: test_MUA_reps has {reps.shape[1]} images, test_MUA {test.shape[0]}")
        out["test_reps"] = reps
    if reliab is not None:
        reliab = _electrodes_last(np.atleast_2d(reliab), n_el, "reliab", path)
        with warnings.catch_warnings():  # an all-NaN electrode gives NaN (and is dropped by the threshold)
            warnings.simplefilter("ignore", RuntimeWarning)
            out["reliab"] = np.nanmean(reliab.reshape(-1, n_el), axis=0)  # average over repeat pairs
    for key, name in (("oracle", oracle), ("snr_max", snr_max)):
        if name is not None:
            if name.size != n_el:
                raise UserError(f"{path}: {key} has {name.size} values, expected {n_el} (one per electrode)")
            out[key] = name.reshape(-1)
    return out


def _electrode_count(train_shape, test_shape, path) -> int:
    """The electrode axis is the one train_MUA and test_MUA share; on TVSD the image axes are 22248 and 100."""
    shared = set(train_shape) & set(test_shape)
    if len(shared) == 1:
        return shared.pop()
    if len(shared) == 2:  # e.g. a square toy file: fall back on the TVSD image counts, else h5py's natural order
        if N_TRAIN in train_shape:
            return train_shape[1 - train_shape.index(N_TRAIN)]
        return train_shape[1]
    raise UserError(f"{path}: train_MUA {tuple(train_shape)} and test_MUA {tuple(test_shape)} share no electrode "
                    f"axis; expected [images, electrodes] (h5py) or [electrodes, images] (MATLAB order)")


def read_array_exports(folder) -> dict:
    """The repo's per-array files THINGS_exportMUA_array{N}.mat → the `read_normmua` dict (no repeats) plus
    `array_of_electrode` (1-based array numbers, from the file names)."""
    files = sorted(Path(folder).glob("THINGS_exportMUA_array*.mat"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    if not files:
        raise UserError(f"{folder}: no THINGS_exportMUA_array{{N}}.mat files")
    trains, tests, arrays = [], [], []
    for p in files:
        with _open(p) as f:
            tr, te = _read(f, "train_MUA", p), _read(f, "test_MUA", p)
        if tr is None or te is None:  # a dead array exported as an empty MATLAB matrix
            print(f"note: {p.name} holds an empty array (no electrodes); skipped", flush=True)
            continue
        tr, te = tr.reshape(tr.shape[0], -1) if tr.ndim == 3 else tr, te.reshape(te.shape[0], -1) if te.ndim == 3 else te
        n_el = _electrode_count(tr.shape, te.shape, p)
        tr, te = _electrodes_last(tr, n_el, "train_MUA", p), _electrodes_last(te, n_el, "test_MUA", p)
        trains.append(tr)
        tests.append(te)
        arrays += [int(re.findall(r"\d+", p.stem)[-1])] * n_el
    if len({t.shape[0] for t in trains}) != 1:
        raise UserError(f"{folder}: the per-array files have different numbers of training images")
    return {"train": np.concatenate(trains, 1), "test": np.concatenate(tests, 1), "test_reps": None,
            "reliab": None, "oracle": None, "snr_max": None, "array_of_electrode": np.asarray(arrays)}


def read_image_list(path, split: str) -> list[str]:
    """Image paths (relative, '/' separators) of `split` ('train' or 'test') in row order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image list {path} does not exist")
    if path.suffix == ".mat":
        with _open(path) as f:
            key = f"{split}_imgs"
            if key not in f or "things_path" not in f[key]:
                raise UserError(f"{path}: expected a struct {key} with a field things_path")
            refs = f[key]["things_path"][()].reshape(-1)
            names = []
            for r in refs:
                chars = np.asarray(f[r][()]).reshape(-1)
                names.append("".join(map(chr, chars)).replace("\\", "/"))
            return names
    text = path.read_text().splitlines()
    return [t.strip().replace("\\", "/") for t in text if t.strip()]


# ----------------------------------------------------------------------------- electrodes → sites


def electrode_map(n_electrodes: int, monkey: str = "N", array_size: int = 64, array_of_electrode=None) -> dict:
    """{'array': int array [E] (1-based), 'area': list[str] [E], 'n_arrays': 16}. A map that does not fit the
    file (E != 16 × array_size) is a UserError."""
    if monkey not in AREA_OF_ARRAY:
        raise UserError(f"--monkey {monkey!r}: expected one of {', '.join(AREA_OF_ARRAY)}")
    if array_of_electrode is None:
        if n_electrodes != N_ARRAYS * array_size:
            raise UserError(f"electrode map of monkey {monkey}: {N_ARRAYS} arrays × {array_size} electrodes = "
                            f"{N_ARRAYS * array_size}, but the data has {n_electrodes} electrodes (pass --array_size)")
        array_of_electrode = np.arange(n_electrodes) // array_size + 1
    array_of_electrode = np.asarray(array_of_electrode)
    if array_of_electrode.min() < 1 or array_of_electrode.max() > N_ARRAYS:
        raise UserError(f"electrode map: array numbers must be 1..{N_ARRAYS}")
    areas = [AREA_OF_ARRAY[monkey][a - 1] for a in array_of_electrode]
    return {"array": array_of_electrode, "area": areas}


def make_sites(emap: dict, spec: list[str], keep: np.ndarray) -> dict:
    """Sites named by `spec` tokens: 'arrays' (every array), 'areas' (V1, V4, IT), an area name or 'arrayK'.
    Returns {site name: electrode indices (into the kept electrodes)}; an unknown token is a UserError."""
    kept = np.flatnonzero(keep)
    arr, area = emap["array"][kept], np.asarray(emap["area"])[kept]
    sites = {}
    for tok in spec:
        if tok == "arrays":
            for a in sorted(set(emap["array"].tolist())):
                sites[f"array{a}_{_area_of(emap, a)}"] = np.flatnonzero(arr == a)
        elif tok == "areas":
            for a in AREAS:
                sites[a] = np.flatnonzero(area == a)
        elif tok in AREAS:
            sites[tok] = np.flatnonzero(area == tok)
        elif re.fullmatch(r"array\d+", tok) and int(tok[5:]) in set(emap["array"].tolist()):
            a = int(tok[5:])
            sites[f"{tok}_{_area_of(emap, a)}"] = np.flatnonzero(arr == a)
        else:
            raise UserError(f"--sites {tok!r}: expected 'arrays', 'areas', one of {', '.join(AREAS)} or arrayK "
                            f"with K in {sorted(set(emap['array'].tolist()))}")
    return sites


def _area_of(emap, a) -> str:
    return emap["area"][int(np.flatnonzero(emap["array"] == a)[0])]


def split_train_val(n_train: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A validation split held out from the TRAINING images (model selection never sees the test images)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n_train)
    n_val = max(1, int(round(val_fraction * n_train)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ----------------------------------------------------------------------------- one loaded dataset


def load_dataset(root, monkey: str = "N", array_size: int = 64, reliab_threshold: float | None = None,
                 image_list=None, image_root=None) -> dict:
    """Neural data + image paths of a TVSD-layout folder.

    Returns dict(train, test, test_reps, oracle, keep [E] bool, emap, train_images, test_images, source)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    if (root / NORMMUA).is_file():
        d, source = read_normmua(root / NORMMUA), str(root / NORMMUA)
        emap = electrode_map(d["train"].shape[1], monkey, array_size)
    elif list(root.glob("THINGS_exportMUA_array*.mat")):
        d, source = read_array_exports(root), str(root)
        emap = electrode_map(d["train"].shape[1], monkey, array_size, d["array_of_electrode"])
    else:
        raise UserError(f"{root}: neither {NORMMUA} nor THINGS_exportMUA_array{{N}}.mat files found")
    keep = np.ones(d["train"].shape[1], bool)
    nan = np.isnan(d["train"]).any(0) | np.isnan(d["test"]).any(0)
    if nan.any():
        print(f"note: {int(nan.sum())} electrode(s) with NaN in train_MUA/test_MUA excluded", flush=True)
        keep &= ~nan
    if reliab_threshold is not None:
        if d["reliab"] is None:
            raise UserError(f"{source}: --reliab_threshold needs the 'reliab' key, which this file lacks")
        keep &= np.nan_to_num(d["reliab"], nan=-np.inf) >= reliab_threshold
    if not keep.any():
        raise UserError(f"{source}: no electrode left after the NaN / reliability filter")
    if image_list is None:
        cands = [root / "things_imgs.mat", root / "_logs" / "things_imgs.mat"]
        image_list = next((c for c in cands if c.is_file()), None)
    if image_list is None and (root / "train_imgs.txt").is_file():
        train_names, test_names = read_image_list(root / "train_imgs.txt", "train"), read_image_list(root / "test_imgs.txt", "test")
    elif image_list is None:
        raise UserError(f"{root}: no image list (things_imgs.mat, _logs/things_imgs.mat or train_imgs.txt + "
                        f"test_imgs.txt); pass --image_list")
    else:
        train_names, test_names = read_image_list(image_list, "train"), read_image_list(image_list, "test")
    if len(train_names) != d["train"].shape[0] or len(test_names) != d["test"].shape[0]:
        raise UserError(f"image list has {len(train_names)} train / {len(test_names)} test images but {source} has "
                        f"{d['train'].shape[0]} / {d['test'].shape[0]} rows")
    iroot = Path(image_root) if image_root else root
    d.update(keep=keep, emap=emap, source=source, train_images=[str(iroot / n) for n in train_names],
             test_images=[str(iroot / n) for n in test_names])
    return d


class ImageFiles(torch.utils.data.Dataset):
    """Images of a list, resized to size × size (bilinear), as float [3, size, size] in [0, 1]."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = Image.open(self.paths[i]).convert("RGB")
        except (OSError, ValueError) as e:
            raise UserError(f"image {self.paths[i]} could not be read ({e})") from None
        img = img.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)


# ----------------------------------------------------------------------------- synthetic TVSD-layout data


def simulated_rates(images: torch.Tensor, n_per_array: int, monkey: str = "N", seed: int = 0) -> np.ndarray:
    """Noise-free rates [images, 16 × n_per_array] of V1-, V4- and IT-like electrodes (common.synthetic):
    V1 arrays = Gabor LN / energy units; V4 arrays = the 'deep' population (pooled rectified Gabor-energy
    features); IT arrays = the 'deep' population on images at half resolution (larger, coarser receptive fields)."""
    size = images.shape[-1]
    cols = []
    for k, area in enumerate(AREA_OF_ARRAY[monkey]):
        if area == "V1":
            pop, x = synthetic.SimulatedPopulation(n_per_array, size, 3, "v1", seed=seed + k), images
        elif area == "V4":
            pop, x = synthetic.SimulatedPopulation(n_per_array, size, 3, "deep", seed=seed + k), images
        else:
            x = torch.nn.functional.avg_pool2d(images, 2)
            pop = synthetic.SimulatedPopulation(n_per_array, size // 2, 3, "deep", seed=seed + k)
        cols.append(pop.rates(x).numpy())
    return np.concatenate(cols, 1)


def _write_mat(path: Path, arrays: dict) -> None:
    """A MATLAB v7.3-style file: 512-byte userblock with the MATLAB header, MATLAB_class attributes."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            ds = f.create_dataset(k, data=np.asarray(v, np.float64))
            ds.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


def write_things_imgs(path: Path, train_names: list[str], test_names: list[str]) -> None:
    """`things_imgs.mat` as MATLAB writes a struct array of strings: each field an (N, 1) dataset of object
    references into #refs#, each a uint16 (UTF-16) char array; Windows separators as in TVSD."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        count = 0
        for split, names in (("train", train_names), ("test", test_names)):
            g = f.create_group(f"{split}_imgs")
            g.attrs["MATLAB_class"] = np.bytes_("struct")
            ds = g.create_dataset("things_path", (len(names), 1), dtype=h5py.ref_dtype)
            for i, n in enumerate(names):
                c = refs.create_dataset(f"r{count}", data=np.frombuffer(n.replace("/", "\\").encode("utf-16-le"),
                                                                         np.uint16).reshape(-1, 1))
                c.attrs["MATLAB_class"] = np.bytes_("char")
                ds[i, 0] = c.ref
                count += 1
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


def write_synthetic(root, n_train: int = 360, n_test: int = 40, n_reps: int = 10, image_size: int = 64,
                    n_per_array: int = 4, monkey: str = "N", seed: int = 0, transposed: bool = False,
                    train_trials: int = 2) -> Path:
    """A small dataset in the TVSD layout: root/THINGS_normMUA.mat, root/things_imgs.mat and the images under
    root/<class>/<class>_NN.png (the list's things_path). Responses are Poisson trials of `simulated_rates`,
    z-scored per electrode with the test trials' mean and std (as TVSD's norm_MUA.m does per day), then averaged
    (train: `train_trials` trials; test: all `n_reps`). `transposed` writes MATLAB's order as h5py would see a
    file saved the other way round (tests the orientation detection)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    imgs = synthetic.natural_images(n_train + n_test, image_size, 3, seed=seed)
    imgs = torch.round(imgs * 255) / 255  # what the PNGs will hold
    names = [f"class{i // 10:03d}/class{i // 10:03d}_{i % 10:02d}.png" for i in range(n_train + n_test)]
    for img, name in zip(imgs, names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / name)
    rates = simulated_rates(imgs, n_per_array, monkey, seed)
    g = torch.Generator().manual_seed(seed + 1)
    trials_train = torch.poisson(torch.from_numpy(rates[:n_train]).expand(train_trials, -1, -1).contiguous(), generator=g).numpy()
    reps = torch.poisson(torch.from_numpy(rates[n_train:]).expand(n_reps, -1, -1).contiguous(), generator=g).numpy()
    mu, sd = reps.mean((0, 1)), reps.std((0, 1)) + 1e-6
    trials_train, reps = (trials_train - mu) / sd, (reps - mu) / sd
    pairs = [(i, j) for i in range(n_reps) for j in range(i + 1, n_reps)]
    reliab = np.stack([metrics.corr(reps[i], reps[j]) for i, j in pairs])  # [pair, electrode]
    arrays = {"train_MUA": trials_train.mean(0), "test_MUA": reps.mean(0), "test_MUA_reps": reps,
              "reliab": reliab, "oracle": metrics.oracle_corr(reps)[:, None], "SNR_max": (reps.mean(0).std(0) / sd)[:, None]}
    if transposed:
        arrays = {k: v.transpose(tuple(range(v.ndim))[::-1]) for k, v in arrays.items()}
    _write_mat(root / NORMMUA, arrays)
    write_things_imgs(root / "things_imgs.mat", names[:n_train], names[n_train:])
    return root
