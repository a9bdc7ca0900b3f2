"""The kit's neural-data file for mouse_vision: an HDF5 layout, its reader, the converter from the original
pickles, and a writer of a synthetic file in the same layout.

Nayebi, Kong et al. (PLOS CB 2023) fit models to the Allen Brain Observatory responses to the 118 natural
scenes (Neuropixels spike rates and two-photon calcium dF/F). The original release ships them as pickles of
pandas/xarray objects (`mouse_neuropixels_visual_data_with_reliabilities.pkl`, `get_neural_data.sh`): loading
them runs code and needs 2019-era pandas/xarray. `--mode convert` turns them, once, into this layout, applying
the original's unit and animal selection (`mouse_vision/reliability/spec_map_utils.py`); everything else reads
the HDF5 file with h5py only.

Layout (format attribute "mouse_vision_neural/1"):

    /                                   attrs: format, sources (JSON list of {path, sha256}), note
    /stimuli                            uint8 [images, H, W] grayscale (or [images, H, W, 3])
    /<dataset>                          "neuropixels", "calcium" or "synthetic"; attrs: selection (JSON)
    /<dataset>/<area>/<animal>/         attrs: area, animal, time_window_ms (Neuropixels: [start, end))
        responses     float32 [trials, images, units]   NaN = missing trial
        unit_id       int64   [units]
        reliability   float32 [units]   split-half reliability the selection used (Neuropixels: max over
                                        time bins of the Spearman-Brown split-half r; calcium: reliability_mean)
        running_pval  float32 [units]   p-value of running modulation (NaN = not tested)
      synthetic files only:
        true_reliability  float32 [units]   squared correlation of the trial average with the true response
    /<dataset>/<area>/latent            synthetic only: float32 [images, k], the true features of the area

Areas are the Allen names (VISp, VISl, VISal, VISrl, VISam, VISpm); an animal is its specimen id as text.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.runtime import UserError

FORMAT = "mouse_vision_neural/1"
AREAS = ("VISp", "VISl", "VISal", "VISrl", "VISam", "VISpm")
DATASETS = ("neuropixels", "calcium", "synthetic")

# The original's selection (reliability/spec_map_utils.py); recorded in the file's `selection` attribute.
NEUROPIXELS_SELECTION = dict(unit_splithalf_min=0.5, running_pval_min=0.05, animal_median_min=0.3,
                             animal_units_percentile=75)
CALCIUM_SELECTION = dict(unit_reliability_min=0.75, running_pval_min=0.05, animal_units_percentile=75)


def _h5py():
    import h5py

    return h5py


# ----------------------------------------------------------------------------- reading


@dataclass
class Animal:
    """One animal's selected units of one area: responses trials × images × units (NaN = missing trial)."""

    area: str
    name: str
    responses: np.ndarray
    unit_id: np.ndarray
    reliability: np.ndarray
    running_pval: np.ndarray
    true_reliability: np.ndarray | None = None

    @property
    def n_units(self) -> int:
        return self.responses.shape[2]


def list_contents(path) -> dict:
    """{dataset: [areas]} of a kit neural file (cheap: reads no responses)."""
    with _open(path) as f:
        return {d: sorted(f[d].keys()) for d in f.keys() if d in DATASETS}


def _open(path):
    h5py = _h5py()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data {p}: no such file (expected the HDF5 file written by --mode convert)")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise UserError(f"--data {p}: not an HDF5 file ({e})") from None
    if f.attrs.get("format") != FORMAT:
        fmt = f.attrs.get("format")
        f.close()
        raise UserError(f"--data {p}: format attribute is {fmt!r}, expected {FORMAT!r} (write it with --mode convert)")
    return f


def read_neural(path, dataset: str | None = None, areas=None) -> tuple[np.ndarray, str, dict[str, list[Animal]], dict]:
    """Read a kit neural file: (stimuli uint8, dataset name, {area: [Animal]}, file info).

    `dataset` None: the only dataset in the file, else neuropixels. `areas` None: every area of the dataset.
    Checks: the dataset and areas exist, every responses array is trials × images × units with the stimuli's
    image count, at least 2 trials, no unit without any valid trial for an image (NaN everywhere).
    """
    with _open(path) as f:
        present = [d for d in f.keys() if d in DATASETS]
        if "stimuli" not in f:
            raise UserError(f"--data {path}: no /stimuli dataset")
        stimuli = np.asarray(f["stimuli"][()])
        if stimuli.ndim not in (3, 4) or (stimuli.ndim == 4 and stimuli.shape[-1] != 3):
            raise UserError(f"--data {path}: /stimuli must be images × H × W (gray) or images × H × W × 3, "
                            f"got shape {stimuli.shape}")
        if dataset is None:
            dataset = present[0] if len(present) == 1 else "neuropixels"
        if dataset not in f:
            raise UserError(f"--data {path}: no dataset {dataset!r}; the file holds {', '.join(present) or 'none'}")
        g = f[dataset]
        available = sorted(g.keys())
        areas = list(areas) if areas else [a for a in AREAS if a in g] + [a for a in available if a not in AREAS]
        missing = [a for a in areas if a not in g]
        if missing:
            raise UserError(f"--data {path}: dataset {dataset!r} has no area {', '.join(missing)}; "
                            f"it holds {', '.join(available)}")
        out: dict[str, list[Animal]] = {}
        n_img = len(stimuli)
        for area in areas:
            animals = []
            for name in g[area].keys():
                if not isinstance(g[area][name], _h5py().Group):
                    continue
                h = g[area][name]
                where = f"{path}:/{dataset}/{area}/{name}"
                if "responses" not in h:
                    raise UserError(f"{where}: no responses dataset")
                r = np.asarray(h["responses"][()], dtype=np.float32)
                if r.ndim != 3:
                    raise UserError(f"{where}/responses must be trials × images × units, got shape {r.shape}")
                if r.shape[1] != n_img:
                    raise UserError(f"{where}/responses has {r.shape[1]} images but /stimuli has {n_img}")
                if r.shape[0] < 2:
                    raise UserError(f"{where}/responses has {r.shape[0]} trial(s); split halves need at least 2")
                valid = ~np.isnan(r)
                uid = np.asarray(h["unit_id"][()]) if "unit_id" in h else np.arange(r.shape[2])
                dead = ~valid.any(axis=(0, 1))
                if dead.any():
                    raise UserError(f"{where}/responses: unit(s) {', '.join(map(str, uid[dead][:10]))} are NaN in "
                                    f"every trial (remove them from the file)")
                gaps = ~valid.any(axis=0)
                if gaps.any():
                    img, unit = np.argwhere(gaps)[0]
                    raise UserError(f"{where}/responses: unit {uid[unit]} has no valid trial for image {img} "
                                    f"({int(gaps.sum())} such image-unit pairs)")
                get = lambda k: np.asarray(h[k][()], np.float32) if k in h else np.full(r.shape[2], np.nan, np.float32)  # noqa: E731
                animals.append(Animal(area, name, r, uid, get("reliability"), get("running_pval"),
                                      np.asarray(h["true_reliability"][()]) if "true_reliability" in h else None))
            if not animals:
                raise UserError(f"--data {path}: area {area} of {dataset!r} holds no animal")
            out[area] = animals
        info = {"format": FORMAT, "dataset": dataset, "sources": json.loads(f.attrs.get("sources", "[]")),
                "selection": json.loads(g.attrs.get("selection", "{}"))}
    return stimuli, dataset, out, info


# ----------------------------------------------------------------------------- writing


def write_neural(path, stimuli: np.ndarray, datasets: dict, sources=(), note: str = "") -> Path:
    """Write the layout. `datasets`: {name: {"selection": dict, "areas": {area: [dict(name, responses,
    unit_id, reliability, running_pval, [true_reliability], [time_window_ms])]}, "latent": {area: array}}}.
    Written to a temporary name and renamed, so a partial file never looks complete."""
    h5py = _h5py()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["sources"] = json.dumps(list(sources))
        f.attrs["note"] = note
        f.create_dataset("stimuli", data=np.asarray(stimuli, np.uint8), compression="gzip")
        for dname, d in datasets.items():
            g = f.create_group(dname)
            g.attrs["selection"] = json.dumps(d.get("selection", {}))
            for area, animals in d["areas"].items():
                ga = g.create_group(area)
                if area in d.get("latent", {}):
                    ga.create_dataset("latent", data=np.asarray(d["latent"][area], np.float32))
                for a in animals:
                    h = ga.create_group(str(a["name"]))
                    h.attrs["area"], h.attrs["animal"] = area, str(a["name"])
                    if a.get("time_window_ms") is not None:
                        h.attrs["time_window_ms"] = np.asarray(a["time_window_ms"], np.float64)
                    r = np.asarray(a["responses"], np.float32)
                    h.create_dataset("responses", data=r, compression="gzip", chunks=(r.shape[0], r.shape[1], 1))
                    h.create_dataset("unit_id", data=np.asarray(a["unit_id"], np.int64))
                    for k in ("reliability", "running_pval", "true_reliability"):
                        if a.get(k) is not None:
                            h.create_dataset(k, data=np.asarray(a[k], np.float32))
    tmp.replace(path)
    return path


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the original's selection


def longest_run(mask: np.ndarray) -> np.ndarray | None:
    """Indices of the longest contiguous run of True (the first on ties), None if there is none.
    (The original's `_findContig` returns None when exactly one bin passes; we return that bin.)"""
    best, start, best_len = None, None, 0
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            if i - start > best_len:
                best, best_len = (start, i), i - start
            start = None
    return None if best is None else np.arange(*best)


def percentile_filter(counts: dict, pct: float) -> list:
    """Animals whose unit count is ≥ ceil(the pct-th percentile of the counts) (spec_map_utils.py)."""
    if not counts:
        return []
    thr = math.ceil(np.percentile(list(counts.values()), pct))
    return [k for k, n in counts.items() if n >= thr]


def select_neuropixels(rates: np.ndarray, splithalf_r: np.ndarray, run_pval: np.ndarray, area: np.ndarray,
                       specimen: np.ndarray, unit_id: np.ndarray, time_ms: np.ndarray | None = None,
                       sel: dict = NEUROPIXELS_SELECTION) -> dict:
    """rates trials × images × time × units; splithalf_r time × units → {area: [animal dicts]}.

    Per area and animal: units whose max-over-time split-half r ≥ 0.5 and that are not running-modulated
    (p > 0.05 or untested); the animal is kept if the max over time of the median r of those units ≥ 0.3;
    responses are averaged over the longest contiguous run of time bins with median r ≥ 0.3. Then, per area,
    animals with fewer units than the 75th percentile (rounded up) are dropped.
    """
    out = {}
    for a in [x for x in AREAS if x in set(area)] + sorted(set(area) - set(AREAS)):
        kept = {}
        for s in sorted(set(specimen[area == a]), key=str):
            idx = np.flatnonzero((area == a) & (specimen == s))
            r = splithalf_r[:, idx]
            with np.errstate(invalid="ignore"):
                rmax = np.nanmax(np.where(np.isnan(r), -np.inf, r), axis=0)
                good = (rmax >= sel["unit_splithalf_min"]) & ~(run_pval[idx] <= sel["running_pval_min"])
            if not good.any():
                continue
            med = np.median(r[:, good], axis=1)
            win = longest_run(med >= sel["animal_median_min"])
            if win is None:
                continue
            units = idx[good]
            with warnings.catch_warnings():  # a missing trial is NaN in every bin: its mean stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                resp = np.nanmean(rates[:, :, win][..., units], axis=2)
            tw = None
            if time_ms is not None and len(time_ms) >= win[-1] + 1:
                step = float(time_ms[1] - time_ms[0]) if len(time_ms) > 1 else 10.0
                tw = [float(time_ms[win[0]]), float(time_ms[win[-1]]) + step]
            kept[s] = dict(name=str(s), responses=resp, unit_id=unit_id[units], reliability=rmax[good],
                           running_pval=run_pval[units], time_window_ms=tw)
        names = percentile_filter({k: v["responses"].shape[2] for k, v in kept.items()}, sel["animal_units_percentile"])
        if names:
            out[a] = [kept[k] for k in names]
    return out


def select_calcium(dff: np.ndarray, reliability: np.ndarray, run_pval: np.ndarray, area: np.ndarray,
                   specimen: np.ndarray, unit_id: np.ndarray, sel: dict = CALCIUM_SELECTION) -> dict:
    """dff trials × images × units → {area: [animal dicts]}: reliability_mean ≥ 0.75, not running-modulated,
    then the same 75th-percentile animal filter."""
    out = {}
    for a in [x for x in AREAS if x in set(area)] + sorted(set(area) - set(AREAS)):
        kept = {}
        for s in sorted(set(specimen[area == a]), key=str):
            idx = np.flatnonzero((area == a) & (specimen == s))
            with np.errstate(invalid="ignore"):
                good = (reliability[idx] >= sel["unit_reliability_min"]) & ~(run_pval[idx] <= sel["running_pval_min"])
            if good.any():
                u = idx[good]
                kept[s] = dict(name=str(s), responses=dff[..., u], unit_id=unit_id[u], reliability=reliability[u],
                               running_pval=run_pval[u])
        names = percentile_filter({k: v["responses"].shape[2] for k, v in kept.items()}, sel["animal_units_percentile"])
        if names:
            out[a] = [kept[k] for k in names]
    return out


# ----------------------------------------------------------------------------- the converter


def _labelled(obj, where: str):
    """(values, dims, coords) of an xarray DataArray or of a plain dict {values, dims, coords}
    (coords: name → array, or (dims, array))."""
    if isinstance(obj, dict) and "values" in obj:
        vals, dims, coords = obj["values"], tuple(obj.get("dims", ())), dict(obj.get("coords", {}))
    elif hasattr(obj, "dims") and hasattr(obj, "coords") and hasattr(obj, "values"):
        vals, dims = obj.values, tuple(obj.dims)
        coords = {str(k): (tuple(v.dims), np.asarray(v.values)) for k, v in obj.coords.items()}
    else:
        raise UserError(f"{where}: expected an xarray DataArray or a dict with values/dims/coords, "
                        f"got {type(obj).__name__}")
    coords = {k: np.asarray(v[1] if isinstance(v, tuple) else v) for k, v in coords.items()}
    return np.asarray(vals), dims, coords


def _axis(dims, words, default):
    for i, d in enumerate(dims):
        if any(w in str(d).lower() for w in words):
            return i
    return default


def _convert_one(obj, where: str):
    """→ (dataset name, {area: [animal dicts]}, selection) for one DataArray of the original."""
    vals, dims, c = _labelled(obj, where)
    need = lambda *names: next((c[n] for n in names if n in c), None)  # noqa: E731
    area, specimen = need("visual_area"), need("specimen_id")
    if area is None or specimen is None:
        raise UserError(f"{where}: needs the unit coordinates visual_area and specimen_id; found {', '.join(c)}")
    area = np.asarray(area).astype(str)
    if vals.ndim == 4:  # Neuropixels: trials × frame_id × time bins × units
        order = [_axis(dims, ("trial",), 0), _axis(dims, ("frame", "image", "stim"), 1),
                 _axis(dims, ("time", "bin"), 2), _axis(dims, ("unit", "neuroid", "cell"), 3)]
        if sorted(order) != [0, 1, 2, 3]:
            order = [0, 1, 2, 3]
        rates = np.transpose(vals, order).astype(np.float32)
        r = need("splithalf_r_mean")
        if r is None:
            raise UserError(f"{where}: Neuropixels data needs the splithalf_r_mean coordinate (time × units)")
        r = np.asarray(r, np.float64)
        if r.shape != (rates.shape[2], rates.shape[3]):
            r = r.T if r.T.shape == (rates.shape[2], rates.shape[3]) else None
        if r is None:
            raise UserError(f"{where}: splithalf_r_mean must be time bins × units {rates.shape[2:]}")
        pv = need("run_pval_ns")
        pv = np.full(rates.shape[3], np.nan) if pv is None else np.asarray(pv, np.float64)
        uid = need("unit_id")
        uid = np.arange(rates.shape[3]) if uid is None else np.asarray(uid)
        time_ms = need(*[d for d in dims if "time" in str(d).lower()]) if dims else None
        if time_ms is not None and np.nanmax(np.abs(time_ms)) < 5:  # seconds → ms
            time_ms = np.asarray(time_ms) * 1000.0
        areas = select_neuropixels(rates, r, pv, area, np.asarray(specimen), uid, time_ms)
        return "neuropixels", areas, NEUROPIXELS_SELECTION
    if vals.ndim == 3:  # calcium: trials × frame_id × units
        order = [_axis(dims, ("trial",), 0), _axis(dims, ("frame", "image", "stim"), 1),
                 _axis(dims, ("unit", "neuroid", "cell"), 2)]
        if sorted(order) != [0, 1, 2]:
            order = [0, 1, 2]
        dff = np.transpose(vals, order).astype(np.float32)
        rel = need("reliability_mean")
        if rel is None:
            raise UserError(f"{where}: calcium data needs the reliability_mean coordinate")
        pv = need("p_run_mod_ns")
        pv = np.full(dff.shape[2], np.nan) if pv is None else np.asarray(pv, np.float64)
        uid = need("cell_specimen_id", "unit_id")
        uid = np.arange(dff.shape[2]) if uid is None else np.asarray(uid)
        areas = select_calcium(dff, np.asarray(rel, np.float64), pv, area, np.asarray(specimen), uid)
        return "calcium", areas, CALCIUM_SELECTION
    raise UserError(f"{where}: responses have {vals.ndim} dimensions; expected 4 (Neuropixels: trials × images × "
                    f"time × units) or 3 (calcium: trials × images × units)")


def convert(sources, out_path, trust_pickle: bool = False) -> dict:
    """The original pickles → the kit's HDF5 file. Loading a pickle runs arbitrary code, hence `trust_pickle`."""
    if not sources:
        raise UserError("--mode convert needs --source PATH [PATH ...] (the original's .pkl files)")
    for s in sources:
        if not Path(s).is_file():
            raise UserError(f"--source {s}: no such file")
    if not trust_pickle:
        raise UserError(f"--source {sources[0]} is a pickle: loading it runs code stored in the file. Pass "
                        f"--trust_pickle only for a file you trust (e.g. the original's own download)")
    stimuli, datasets, recs = None, {}, []
    for s in sources:
        print(f"reading {s} (pickle; may need pandas and xarray) ...", flush=True)
        try:
            with open(s, "rb") as f:
                payload = pickle.load(f)  # noqa: S301 — the user vouched for the file with --trust_pickle
        except ModuleNotFoundError as e:
            raise UserError(f"--source {s} needs the module {e.name!r} to be unpickled (the original pickles hold "
                            f"pandas/xarray objects): pip install pandas xarray, then rerun") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise UserError(f"--source {s} could not be unpickled ({type(e).__name__}: {e})") from None
        if not isinstance(payload, dict) or "neural_data" not in payload or "stimuli" not in payload:
            keys = list(payload) if isinstance(payload, dict) else type(payload).__name__
            raise UserError(f"--source {s}: expected a dict with keys stimuli and neural_data, got {keys}")
        stim = np.asarray(payload["stimuli"])
        if stimuli is None:
            stimuli = stim
        elif stim.shape != stimuli.shape or not np.array_equal(stim, stimuli):
            raise UserError(f"--source {s}: its stimuli differ from those of {sources[0]}")
        nd = payload["neural_data"]
        items = nd.items() if isinstance(nd, dict) and "values" not in nd else [(None, nd)]
        for key, obj in items:
            name, areas, sel = _convert_one(obj, f"{s}:neural_data" + (f"[{key!r}]" if key else ""))
            if name in datasets:
                raise UserError(f"--source {s}: a second {name} dataset; pass each recording type once")
            for area, animals in areas.items():
                for a in animals:
                    if a["responses"].shape[1] != len(stimuli):
                        raise UserError(f"--source {s}: {area} responses have {a['responses'].shape[1]} images "
                                        f"but the stimuli {len(stimuli)}")
            datasets[name] = {"selection": sel, "areas": areas}
        recs.append({"path": str(Path(s).resolve()), "sha256": sha256(s)})
    if stimuli.dtype != np.uint8:
        stimuli = np.clip(np.round(stimuli), 0, 255).astype(np.uint8)
    write_neural(out_path, stimuli, datasets, recs, note="converted from the original pickles by mouse_vision --mode convert")
    return {name: {area: [(a["name"], a["responses"].shape[2]) for a in animals] for area, animals in d["areas"].items()}
            for name, d in datasets.items()}


# ----------------------------------------------------------------------------- synthetic file


def synthetic_stimuli(n_images: int = 118, height: int = 92, width: int = 118, seed: int = 0) -> np.ndarray:
    """Grayscale 1/f images with occluding discs, uint8 images × H × W (the real ones are 918 × 1174)."""
    from common.synthetic import natural_images

    side = max(height, width)
    x = natural_images(n_images, side, 1, seed=seed)[:, 0, :height, :width].numpy()
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def write_synthetic(path, n_images: int = 118, areas=AREAS, animals_per_area: int = 3, units_per_animal=40,
                    n_trials: int = 50, n_latent: int = 8, image_hw=(92, 118), seed: int = 0,
                    missing_frac: float = 0.01, reliability_range=(0.6, 0.95), latents: dict | None = None,
                    stimuli: np.ndarray | None = None) -> Path:
    """A synthetic file in the kit's layout whose ground truth is known.

    Each area has `n_latent` true features (the `latent` dataset): the rates of a simulated population
    (`common.synthetic.SimulatedPopulation`: Gabor units for VISp, deeper nonlinear units elsewhere) on the
    stimuli as the models see them (64 × 64). Every unit of every animal is a random linear combination of its
    area's features plus Gaussian trial noise, so units of different animals share one feature space (the
    inter-animal ceiling is ≈ 1). The noise is set so the trial average has the unit's `true_reliability`
    (squared correlation with the noise-free response), drawn uniformly from `reliability_range`. A fraction
    `missing_frac` of trials is NaN. `latents` {area: images × k} plants other features (tests).
    `units_per_animal`: an int, or a list of counts cycled over animals.
    """
    rng = np.random.default_rng(seed)
    if stimuli is None:
        stimuli = synthetic_stimuli(n_images, *image_hw, seed=seed)
    counts = units_per_animal if isinstance(units_per_animal, (list, tuple)) else [units_per_animal]
    areas_out, latent_out = {}, {}
    small = None
    for ai, area in enumerate(areas):
        if latents is not None and area in latents:
            lat = np.asarray(latents[area], np.float64)
        else:
            if small is None:
                small = _model_view(stimuli)
            from common.synthetic import SimulatedPopulation

            pop = SimulatedPopulation(n_latent, 64, 1, kind="v1", seed=seed * 100 + ai)
            lat = pop.rates(small).numpy()
        lat = (lat - lat.mean(0)) / np.maximum(lat.std(0), 1e-12)
        latent_out[area] = lat
        animals = []
        for j in range(animals_per_area):
            u = counts[(ai * animals_per_area + j) % len(counts)]
            w = rng.normal(size=(lat.shape[1], u))
            signal = lat @ w
            signal = (signal - signal.mean(0)) / np.maximum(signal.std(0), 1e-12)  # unit signal variance
            rho = rng.uniform(*reliability_range, u)  # reliability of the n_trials average
            sigma = np.sqrt(n_trials * (1 - rho) / rho)  # per-trial noise sd: Var(mean) = sigma² / n
            resp = 5.0 + signal[None] + rng.normal(size=(n_trials, n_images, u)) * sigma
            miss = rng.uniform(size=(n_trials, n_images)) < missing_frac
            miss[0] = False  # every image keeps at least one trial
            resp[miss] = np.nan
            animals.append(dict(name=f"{700000 + 100 * ai + j}", responses=resp.astype(np.float32),
                                unit_id=np.arange(u) + 10_000 * (ai * animals_per_area + j), reliability=rho,
                                running_pval=rng.uniform(0.05, 1, u), true_reliability=rho))
        areas_out[area] = animals
    sel = {"note": "synthetic units: linear in the area's latent features plus Gaussian trial noise"}
    return write_neural(path, stimuli, {"synthetic": {"selection": sel, "areas": areas_out, "latent": latent_out}},
                        note="synthetic (mouse_vision.neural_data.write_synthetic)")


def _model_view(stimuli: np.ndarray):
    """The stimuli as the models see them, luminance 1 × 64 × 64 in [0, 1] (without the normalisation)."""
    import torch

    from mouse_vision.neural_fit import preprocess_stimuli

    x = preprocess_stimuli(stimuli, normalize=False)
    return x.mean(1, keepdim=True).to(torch.float64)
