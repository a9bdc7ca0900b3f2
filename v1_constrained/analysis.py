"""V1 tuning properties of a model's units from synthetic gratings (`--mode v1_props`), offline.

The protocol of Marques, Schrimpf & DiCarlo 2021 ("Multi-scale hierarchical neural network models that bridge
from single neurons in the primate primary visual cortex to object recognition behavior"), as Brain-Score
implements it (brain-score/vision: data/marques2020/data_packaging/marques_gen_stim.py for the stimuli,
benchmark_helpers/properties_common.py for the property formulas), mapped from Brain-Score's 8° field of view
onto the model's 64 px input (8 px per degree; Nyquist 4 cycles/degree):

  orientation set   12 orientations (0-165°) x 8 phases x SFs 0.771/1.542/3.084 cpd x apertures of 2/3/4 cycles
                    in diameter                                   (Brain-Score's 6.169 cpd is above Nyquist: dropped)
  SF set            aperture radii 0.75°/2.25° x 14 log-spaced SFs 2^-1.375 ... 2^1.875 cpd x 6 orientations x 8
                    phases                                        (the 8 of Brain-Score's 22 SFs above Nyquist: dropped)
  size set          12 log-spaced radii 0.125°-4° x the 3 SFs x 6 orientations x 8 phases
  RF-mapping set    21 x 21 positions over ±2.5° x 4 orientations x 2 phases, radius 0.25°, 2 cpd
                    (Brain-Score's radius 1/6° at 3 cpd would be 1.3 px wide at 64 px: enlarged)

Gratings are sin(2π·sf·(x cosθ + y sinθ) + φ) (degrees, y pointing down), full contrast in a hard circular aperture
on grey 0.5, centred on the image, then normalised like the training images (mean = std = 0.5). Phase varies
fastest. Responses of the chosen units (all channels, or --n_units of them, of --layer at one spatial position:
the one driven most by a centred grating) are clipped at 0 and affinely rescaled per stimulus set so that the
median maximum is 33.8 and the median blank response 0.82 spikes/s (Brain-Score's firing-rate rescale), clipped
again. A unit enters a property when its RF centroid lies within --rf_tolerance of the stimulus centre and its
rescaled maximum over that set reaches 5 spikes/s. F0 = mean over the 8 phases, F1 = 2·|FFT₁|/8.

Per unit: circular variance 1 − |Σ r e^{2iθ}|/Σ r, orientation bandwidth (half-width at 1/√2 of the maximum of the
hanning-smoothed curve, tiled 3x, cubic spline at 1°), orthogonal/preferred ratio (raw curve), preferred orientation;
peak SF (cubic spline in log2 SF on 100 points), SF bandwidth f_low/f_high x 100 at 1/√2 of the maximum, SF
selectivity (max − min)/(max + min) of the curve; surround suppression index SSI = (max − last)/max of the size
curve, grating summation field (diameter of the first radius reaching 95 % of the maximum) and surround diameter
(diameter beyond the peak where the curve comes within 5 % of the max-last range of its last value; both NaN
unless SSI > 0.1); F1/F0 at the unit's best orientation-set stimulus and its max F0; RF centroid (positions
above 5 % of the map maximum, weighted). Each curve is taken at the condition (SF, aperture / radius,
orientation, F0 or F1) where the unit responds most, as Brain-Score picks it.

What cannot be computed offline: the Brain-Score scores themselves (KS similarity to the monkey property
distributions), texture modulation (FreemanZiemba2013 images) and neural predictivity.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from common import checkpoint, plots, runtime
from common.runtime import UserError

PX, PPD = 64, 8.0                      # 64 px images covering 8°
NYQUIST = PPD / 2
ORI_SFS = (0.771, 1.542, 3.084)        # Brain-Score's 0.771 ... 6.169 cpd below Nyquist
SF_GRID = tuple(float(2.0 ** e) for e in np.arange(-1.375, 3.876, 0.25) if 2.0 ** e < NYQUIST)  # 14 of 22
PHASES = tuple(range(0, 360, 45))      # 8 phases
LAYERS = ("stem", "layer1", "layer2")
RESCALE_MAX, RESCALE_SPONT, RESPONSIVE = 33.8, 0.82, 5.0


def add_flags(parser) -> None:
    g = parser.add_argument_group("v1_props (V1 tuning properties)")
    g.add_argument("--layer", choices=LAYERS, default="layer1", help="layer whose units are analysed (layer1: the "
                   "Brain-Score V1 layer of the scored model)")
    g.add_argument("--n_units", type=int, default=None, help="analyse this many channels (evenly spaced) instead of all")
    g.add_argument("--unit_position", default="auto", help="ROW,COL of the layer's map, or auto: the position driven "
                   "most by a centred grating (for the polar models the fovea is not the map's centre)")
    g.add_argument("--protocol", choices=("full", "quick"), default="full", help="full: the stimulus sets of the "
                   "module docstring (7465 images); quick: 1 aperture, 1 SF-set radius, 2 orientations for the SF "
                   "and size sets, 11 x 11 RF grid (1573 images; smoke tests)")
    g.add_argument("--rf_tolerance", type=float, default=0.5, help="keep units whose RF centroid is within this "
                   "many degrees of the stimulus centre (Brain-Score 0.15°; the RF grid step here is 0.25°)")
    g.add_argument("--compare", nargs="+", default=None, metavar="RUN", help="eval_c: eval_c run folders (or "
                   "results.json files) side by side; v1_props: checkpoints, model types (random init) or v1_props "
                   "run folders side by side")


# ----------------------------------------------------------------------------- stimuli


def gratings(params: np.ndarray, size: int = PX, ppd: float = PPD) -> torch.Tensor:
    """Images (N, 3, size, size) in [0, 1] for rows (sf cpd, orientation °, phase °, radius °, x0 °, y0 °)."""
    p = torch.as_tensor(np.asarray(params, np.float64))
    c = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / ppd        # pixel centres in degrees
    y, x = c.view(1, -1, 1), c.view(1, 1, -1)                                   # y points down
    sf, th, ph, r, x0, y0 = (p[:, i].view(-1, 1, 1) for i in range(6))
    th, ph = torch.deg2rad(th), torch.deg2rad(ph)
    wave = torch.sin(2 * math.pi * sf * ((x - x0) * torch.cos(th) + (y - y0) * torch.sin(th)) + ph)
    inside = (x - x0) ** 2 + (y - y0) ** 2 <= r ** 2
    img = torch.where(inside, 0.5 + 0.5 * wave, torch.full_like(wave, 0.5))
    return img.float().unsqueeze(1).expand(-1, 3, -1, -1)


def _grid(*axes) -> np.ndarray:
    """Cartesian product, the last axis fastest."""
    return np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T


def protocol(kind: str = "full") -> dict:
    """{set name: (parameter rows (sf, ori, phase, radius, x0, y0), axes shape)} — phase always the last axis."""
    quick = kind == "quick"
    sfs = ORI_SFS
    oris12, oris6 = np.arange(0, 180, 15.0), (np.array([0.0, 90.0]) if quick else np.arange(0, 180, 30.0))
    cycles = (3,) if quick else (2, 3, 4)
    sets = {}
    rows = [(sf, o, ph, cyc / (2 * sf), 0, 0) for sf in sfs for cyc in cycles for o in oris12 for ph in PHASES]
    sets["orientation"] = (np.array(rows), (len(sfs), len(cycles), len(oris12), len(PHASES)))
    radii_sf = (2.25,) if quick else (0.75, 2.25)
    g = _grid(radii_sf, SF_GRID, oris6, PHASES)                                  # (radius, sf, ori, phase)
    sets["sf"] = (np.c_[g[:, 1], g[:, 2], g[:, 3], g[:, 0], 0 * g[:, 0], 0 * g[:, 0]],
                  (len(radii_sf), len(SF_GRID), len(oris6), len(PHASES)))
    radii = np.logspace(np.log10(0.125), np.log10(4.0), 12)
    g = _grid(radii, sfs, oris6, PHASES)                                         # (radius, sf, ori, phase)
    sets["size"] = (np.c_[g[:, 1], g[:, 2], g[:, 3], g[:, 0], 0 * g[:, 0], 0 * g[:, 0]],
                    (len(radii), len(sfs), len(oris6), len(PHASES)))
    pos = np.linspace(-2.5, 2.5, 11 if quick else 21)
    rf_oris, rf_ph = ((0.0, 90.0) if quick else (0.0, 45.0, 90.0, 135.0)), (0.0, 180.0)
    g = _grid(pos, pos, rf_oris, rf_ph)                                          # (y, x, ori, phase)
    sets["rf"] = (np.c_[2.0 + 0 * g[:, 0], g[:, 2], g[:, 3], 0.25 + 0 * g[:, 0], g[:, 1], g[:, 0]],
                  (len(pos), len(pos), len(rf_oris), len(rf_ph)))
    sets["blank"] = (np.array([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), (1,))          # radius 0: all grey
    return {"sets": sets, "radii": radii, "radii_sf": radii_sf, "sfs": sfs, "cycles": cycles, "oris12": oris12,
            "oris6": oris6, "rf_positions": pos, "kind": kind}


# ----------------------------------------------------------------------------- responses


def layer_units(model, layer: str, position, channels):
    """respond(images) → (N, units): the channels of `layer` at (row, col), on the model's normalised input."""
    def respond(x):
        fmap = feature_map(model, (x - 0.5) / 0.5, layer)
        return fmap[:, channels, position[0], position[1]]
    return respond


def feature_map(model, x, layer: str):
    if layer == "stem":
        return model.stem(x)
    return model.forward_features(x, upto=layer)


@torch.no_grad()
def measure(respond, proto: dict, device, batch: int = 128) -> dict:
    """{set: responses (*axes, units) as float64 numpy}, images generated batch by batch."""
    out = {}
    for name, (rows, shape) in proto["sets"].items():
        chunks = [respond(gratings(rows[i:i + batch]).to(device)).double().cpu() for i in range(0, len(rows), batch)]
        out[name] = torch.cat(chunks).numpy().reshape(*shape, -1)
    return out


@torch.no_grad()
def auto_position(model, layer: str, device) -> tuple[int, int]:
    """The map position whose channels respond most (mean |r − r_blank|) to centred gratings (1.542 cpd, radius
    1°, 12 orientations x 2 phases)."""
    rows = [(1.542, o, ph, 1.0, 0, 0) for o in range(0, 180, 15) for ph in (0, 180)] + [(1, 0, 0, 0, 0, 0)]
    fmap = feature_map(model, (gratings(np.array(rows)).to(device) - 0.5) / 0.5, layer).double().cpu()
    score = (fmap[:-1] - fmap[-1:]).abs().mean(dim=(0, 1))
    r, c = divmod(int(score.argmax()), score.shape[1])
    return r, c


# ----------------------------------------------------------------------------- property formulas


def rescale(resp: dict) -> dict:
    """Brain-Score's firing-rate rescale per stimulus set (clip, affine to median max 33.8 / blank 0.82, clip)."""
    blank = np.clip(resp["blank"].reshape(-1), 0, None)
    out = {}
    for name, r in resp.items():
        if name == "blank":
            continue
        r = np.clip(r, 0, None)
        mx = np.median(r.reshape(-1, r.shape[-1]).max(0))
        b = np.median(blank)
        a = (RESCALE_MAX - RESCALE_SPONT) / (mx - b) if mx > b else 1.0
        out[name] = np.clip(a * (r - b) + RESCALE_SPONT, 0, None)
        out[name + "_blank"] = np.clip(a * (blank - b) + RESCALE_SPONT, 0, None)
    return out


def f0_f1(r: np.ndarray):
    """F0 = mean over the phase axis (-2), F1 = 2·|FFT₁|/n_phases."""
    f = np.fft.fft(r, axis=-2)
    n = r.shape[-2]
    return np.real(f[..., 0, :]) / n, 2 * np.abs(f[..., 1, :]) / n


def circular_variance(curve, angles_deg) -> float:
    w = np.exp(2j * np.deg2rad(angles_deg))
    s = np.abs(curve).sum()
    return float(1 - np.abs((curve * w).sum()) / s) if s > 0 else float("nan")


def orientation_bandwidth(curve, angles_deg):
    """(bandwidth °, preferred orientation 0..179) from the hanning-smoothed, 3x-tiled, spline-fit curve."""
    k = np.hanning(5)[1:-1]
    k = k / k.sum()
    smooth = sum(w * np.roll(curve, s) for w, s in zip(k, (-1, 0, 1)))
    xs = np.concatenate([angles_deg - 180, angles_deg, angles_deg + 180])
    spline = CubicSpline(xs, np.tile(smooth, 3))
    fine = np.arange(-180, 360, 1.0)
    y = spline(fine)
    mid = (fine >= 0) & (fine < 180)
    pref = int(fine[mid][np.argmax(y[mid])])
    peak = spline(pref)
    if peak <= 0:
        return float("nan"), pref
    half = peak / math.sqrt(2)
    i0 = int(np.where(fine == pref)[0][0])
    left = next((i0 - i for i in range(i0, max(i0 - 91, -1), -1) if y[i] < half), None)
    right = next((i - i0 for i in range(i0, min(i0 + 91, len(fine))) if y[i] < half), None)
    return (float("nan") if left is None or right is None else (left + right) / 2.0), pref


def sf_properties(curve, sfs):
    """(peak SF, bandwidth f_low/f_high x 100, selectivity (max−min)/(max+min)) of a response-vs-SF curve."""
    x = np.log2(np.asarray(sfs))
    spline = CubicSpline(x, curve)
    fine = np.linspace(x[0], x[-1], 100)
    y = spline(fine)
    i = int(np.argmax(y))
    peak, lo, hi = y[i], None, None
    if peak > 0:
        below = np.where(y[:i] < peak / math.sqrt(2))[0]
        above = np.where(y[i:] < peak / math.sqrt(2))[0]
        lo = 2 ** fine[below[-1]] if len(below) else None
        hi = 2 ** fine[i + above[0]] if len(above) else None
    bw = 100.0 * lo / hi if lo is not None and hi is not None else float("nan")
    mx, mn = float(np.max(curve)), float(np.min(curve))
    return float(2 ** fine[i]), bw, ((mx - mn) / (mx + mn) if mx + mn > 0 else float("nan"))


def size_properties(curve, radii):
    """(SSI, grating summation field diameter °, surround diameter °) of a response-vs-radius curve."""
    mx, last = float(np.max(curve)), float(curve[-1])
    if mx <= 0:
        return float("nan"), float("nan"), float("nan")
    ssi = (mx - last) / mx
    if ssi <= 0.1:
        return ssi, float("nan"), float("nan")
    gsf = 2 * float(radii[int(np.argmax(curve >= 0.95 * mx))])
    ip = int(np.argmax(curve))
    near = np.where(curve[ip:] <= last + 0.05 * (mx - last))[0]
    return ssi, gsf, 2 * float(radii[ip + near[0]])


def best_curve(f0, f1, base, curve_axis: int):
    """The curve along `curve_axis` at the condition and component (F0 − blank or F1) with the largest response.
    f0, f1: (*axes, units) without phase. Returns (units, len(curve_axis))."""
    comps = np.stack([f0 - base, f1])                             # (2, *axes, units)
    moved = np.moveaxis(comps, curve_axis + 1, -2)                # (2, *others, curve, units)
    flat = moved.reshape(-1, moved.shape[-2], moved.shape[-1])    # (conditions, curve, units)
    best = flat.max(1).argmax(0)                                  # per unit
    return flat[best, :, np.arange(flat.shape[-1])]


def properties(resp: dict, proto: dict, rf_tolerance: float = 0.5) -> dict:
    """Per-unit V1 properties from `measure`'s responses (see the module docstring). NaN where undefined or where
    the unit is not kept for that set."""
    R = rescale(resp)
    n = resp["blank"].shape[-1]
    nan = np.full(n, np.nan)
    out = {}
    # RF centroid from the position map: max over orientation and phase of (response − blank), clipped
    rf = R["rf"]                                                  # (y, x, ori, phase, units)
    m = np.clip(rf.reshape(*rf.shape[:2], -1, n).max(2) - R["rf_blank"], 0, None)
    pos = proto["rf_positions"]
    cy, cx = nan.copy(), nan.copy()
    for u in range(n):
        mu = m[..., u]
        if mu.max() > 0:
            w = np.where(mu >= 0.05 * mu.max(), mu, 0)
            cy[u] = (w.sum(1) * pos).sum() / w.sum()
            cx[u] = (w.sum(0) * pos).sum() / w.sum()
    out["rf_centroid_x"], out["rf_centroid_y"] = cx, cy
    centred = np.hypot(cx, cy) <= rf_tolerance
    kept = {}
    # orientation set (sf, cycles, ori, phase, units)
    r = R["orientation"]
    f0, f1 = f0_f1(r)
    ok = centred & (r.reshape(-1, n).max(0) >= RESPONSIVE)
    kept["orientation"] = ok
    curves = best_curve(f0, f1, R["orientation_blank"] * 0, 2)    # no baseline subtracted (Brain-Score)
    cv, bw, orth, pref, mod, dc = (nan.copy() for _ in range(6))
    peak = np.maximum(f0, f1).reshape(-1, n)                       # per stimulus (sf, cycles, ori)
    for u in np.where(ok)[0]:
        c = curves[u]
        cv[u] = circular_variance(c, proto["oris12"])
        bw[u], pref[u] = orientation_bandwidth(c, proto["oris12"])
        k = int(np.argmax(c))
        orth[u] = c[(k + len(c) // 2) % len(c)] / c[k] if c[k] > 0 else np.nan
        s = int(np.argmax(peak[:, u]))
        F0, F1 = f0.reshape(-1, n)[s, u], f1.reshape(-1, n)[s, u]
        mod[u] = F1 / F0 if F0 > 0 else np.nan
        dc[u] = f0[..., u].max()
    out.update(circular_variance=cv, orientation_bandwidth=bw, orthogonal_preferred_ratio=orth,
               preferred_orientation=pref, f1_f0=mod, max_dc=dc)
    # SF set (radius, sf, ori, phase, units)
    r = R["sf"]
    f0, f1 = f0_f1(r)
    ok = centred & (r.reshape(-1, n).max(0) >= RESPONSIVE)
    kept["sf"] = ok
    curves = best_curve(f0, f1, R["sf_blank"], 1)
    pk, sbw, sel = nan.copy(), nan.copy(), nan.copy()
    for u in np.where(ok)[0]:
        pk[u], sbw[u], sel[u] = sf_properties(curves[u], SF_GRID)
    out.update(peak_sf=pk, sf_bandwidth=sbw, sf_selectivity=sel)
    # size set (radius, sf, ori, phase, units)
    r = R["size"]
    f0, f1 = f0_f1(r)
    ok = centred & (r.reshape(-1, n).max(0) >= RESPONSIVE)
    kept["size"] = ok
    curves = best_curve(f0, f1, R["size_blank"], 0)
    ssi, gsf, sd = nan.copy(), nan.copy(), nan.copy()
    for u in np.where(ok)[0]:
        ssi[u], gsf[u], sd[u] = size_properties(curves[u], proto["radii"])
    out.update(ssi=ssi, grating_summation_field=gsf, surround_diameter=sd)
    out["kept"] = kept
    return out


# ----------------------------------------------------------------------------- summaries, figures, modes

HIST = {  # property: (bin edges, label format)
    "circular_variance": (np.linspace(0, 1, 11), "{:.1f}"), "orientation_bandwidth": (np.arange(0, 100, 10.0), "{:.0f}"),
    "orthogonal_preferred_ratio": (np.linspace(0, 1, 11), "{:.1f}"), "peak_sf": (np.array(SF_GRID[::2] + (4.0,)), "{:.2f}"),
    "sf_bandwidth": (np.arange(0, 110, 10.0), "{:.0f}"), "ssi": (np.linspace(0, 1, 11), "{:.1f}"),
    "f1_f0": (np.linspace(0, 2, 11), "{:.1f}"), "grating_summation_field": (np.linspace(0, 8, 9), "{:.0f}"),
}
PROPS = ("circular_variance", "orientation_bandwidth", "orthogonal_preferred_ratio", "peak_sf", "sf_bandwidth",
         "sf_selectivity", "ssi", "grating_summation_field", "surround_diameter", "f1_f0", "max_dc",
         "rf_centroid_x", "rf_centroid_y")


def orientation_histogram(pref) -> dict:
    """Counts of preferred orientations in 0/45/90/135 ± 22.5° (values ≥ 157.5 wrap to −22.5 .. 0)."""
    p = np.asarray(pref, float)
    p = p[np.isfinite(p)]
    p = np.where(p >= 157.5, p - 180, p)
    return {str(c): int(((p >= c - 22.5) & (p < c + 22.5)).sum()) for c in (0, 45, 90, 135)}


def summarize(props: dict) -> dict:
    out = {}
    for k in PROPS:
        v = np.asarray(props[k], float)
        v = v[np.isfinite(v)]
        out[k] = {"n": int(v.size), **({"median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
                                        "q75": float(np.percentile(v, 75)), "mean": float(v.mean())} if v.size else {})}
    ssi = np.asarray(props["ssi"], float)
    ssi = ssi[np.isfinite(ssi)]
    out["ssi"]["fraction_ge_0.1"] = float((ssi >= 0.1).mean()) if ssi.size else None
    out["preferred_orientation_histogram"] = orientation_histogram(props["preferred_orientation"])
    out["units_kept"] = {k: int(np.sum(v)) for k, v in props["kept"].items()}
    return out


def histogram(values, edges) -> list:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    return (counts / max(v.size, 1)).tolist()


def figures(fig_dir: Path, results: list) -> None:
    """One bar chart per property: the fraction of units per bin, a series per model."""
    for k, (edges, fmt) in HIST.items():
        cats = [fmt.format(e) for e in edges[:-1]]
        series = [{"label": r["model"], "values": histogram(r["units"][k], edges)} for r in results]
        plots.bar_chart(fig_dir / f"v1_{k}.png", cats, series, title=f"{k} (fraction of units per bin)",
                        ylabel="fraction")
    cats = ["0", "45", "90", "135"]
    series = [{"label": r["model"], "values": [r["summary"]["preferred_orientation_histogram"][c] for c in cats]}
              for r in results]
    plots.bar_chart(fig_dir / "v1_preferred_orientation.png", cats, series, title="preferred orientation (units)",
                    ylabel="units")


def analyse(model, label: str, args, device) -> dict:
    """Measure and compute the properties of one model; the v1_props.json content."""
    model = model.to(device).eval()
    if args.unit_position == "auto":
        position = auto_position(model, args.layer, device)
    else:
        try:
            position = tuple(int(v) for v in args.unit_position.split(","))
            assert len(position) == 2
        except (ValueError, AssertionError):
            raise UserError(f"--unit_position {args.unit_position!r}: expected ROW,COL or auto") from None
    with torch.no_grad():
        fmap = feature_map(model, torch.zeros(1, 3, PX, PX, device=device), args.layer)
    c, h, w = fmap.shape[1:]
    if not (0 <= position[0] < h and 0 <= position[1] < w):
        raise UserError(f"--unit_position {position} is outside {args.layer}'s {h}x{w} map")
    n = c if args.n_units is None else min(args.n_units, c)
    if n < 1:
        raise UserError(f"--n_units must be ≥ 1, got {args.n_units}")
    channels = np.unique(np.linspace(0, c - 1, n).round().astype(int))
    proto = protocol(args.protocol)
    n_images = sum(len(rows) for rows, _ in proto["sets"].values())
    print(f"v1_props {label}: {len(channels)} units of {args.layer} at {position}, {n_images} stimuli "
          f"({args.protocol} protocol)", flush=True)
    resp = measure(layer_units(model, args.layer, position, torch.as_tensor(channels, device=device)), proto, device,
                   batch=128)
    props = properties(resp, proto, args.rf_tolerance)
    units = {k: [None if not np.isfinite(v) else float(v) for v in props[k]] for k in PROPS}
    units["preferred_orientation"] = [None if not np.isfinite(v) else int(v) for v in props["preferred_orientation"]]
    units["channel"] = channels.tolist()
    return {"model": label, "layer": args.layer, "position": list(position), "n_units": len(channels),
            "protocol": args.protocol, "n_stimuli": n_images, "pixels_per_degree": PPD, "rf_tolerance": args.rf_tolerance,
            "sf_grid": list(SF_GRID), "dropped": "SFs above the 4 cpd Nyquist limit (8 of the SF set's 22, the "
            "orientation/size sets' 6.169 cpd); RF-mapping grating enlarged to radius 0.25° at 2 cpd",
            "summary": summarize(props), "units": units}


def _print_summary(res: dict) -> None:
    s = res["summary"]
    med = lambda k: s[k].get("median", float("nan"))  # noqa: E731
    print(f"{res['model']}: kept {s['units_kept']} of {res['n_units']} units | circular variance {med('circular_variance'):.3f}"
          f" | orientation bandwidth {med('orientation_bandwidth'):.1f}° | peak SF {med('peak_sf'):.2f} cpd | "
          f"SSI {med('ssi'):.3f} (≥ 0.1: {s['ssi']['fraction_ge_0.1']}) | F1/F0 {med('f1_f0'):.2f}", flush=True)


def run_dir(args, create: bool):
    """The run folder's checks first (an existing run is never overwritten without --overwrite), created only
    once the analysis has succeeded, so a bad flag leaves nothing behind."""
    return checkpoint.RunDir(args.output_root, vars(args), resume=False, overwrite=args.overwrite, is_main=create)


def run(args, model, label: str) -> dict:
    device = runtime.choose_device(args.device)
    run_dir(args, create=False)
    res = analyse(model, label, args, device)
    rd = run_dir(args, create=True)
    checkpoint.write_json(rd.path / "v1_props.json", res)
    figures(rd.path / "figures", [res])
    rd.write_results({"mode": "v1_props", "model": label, "summary": res["summary"]})
    _print_summary(res)
    return res


def compare(args, specs: list, load_model) -> dict:
    """Several models side by side: each spec a v1_props run folder (its v1_props.json), a checkpoint or a model
    type; writes v1_props_compare.json, compare.csv / compare.md (medians, fractions, counts) and the figures."""
    device = runtime.choose_device(args.device)
    run_dir(args, create=False)
    results = []
    for spec in specs:
        if Path(spec).is_dir():
            f = Path(spec) / "v1_props.json"
            if not f.is_file():
                raise UserError(f"--compare {spec}: folder without v1_props.json (not a v1_props run)")
            results.append(json.loads(f.read_text()))
        else:
            model, label = load_model(spec)
            results.append(analyse(model, label, args, device))
            _print_summary(results[-1])
    rd = run_dir(args, create=True)
    labels = [r["model"] for r in results]
    rows = [("units kept (orientation/sf/size)", ["/".join(str(v) for v in r["summary"]["units_kept"].values())
                                                  for r in results])]
    for k in PROPS[:-2]:
        rows.append((f"{k} median", [r["summary"][k].get("median") for r in results]))
    rows.append(("ssi >= 0.1 fraction", [r["summary"]["ssi"]["fraction_ge_0.1"] for r in results]))
    rows.append(("preferred orientation 0/45/90/135", ["/".join(str(v) for v in r["summary"]
                                                               ["preferred_orientation_histogram"].values()) for r in results]))
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| property | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    md += ["| " + name + " | " + " | ".join(map(fmt, vals)) + " |" for name, vals in rows]
    (rd.path / "compare.md").write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    csv.writer(buf).writerows([["property", *labels], *([name, *map(fmt, vals)] for name, vals in rows)])
    (rd.path / "compare.csv").write_text(buf.getvalue())
    figures(rd.path / "figures", results)
    out = {"mode": "v1_props_compare", "models": labels, "table": {n: dict(zip(labels, v)) for n, v in rows}}
    checkpoint.write_json(rd.path / "v1_props_compare.json", {**out, "results": results})
    rd.write_results(out)
    print("\n".join(md), flush=True)
    return out
