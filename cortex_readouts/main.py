"""Which layer of an ImageNet CNN explains which Utah array? Readouts from every layer of VGG-19 / GoogLeNet
(an InceptionV1 stand-in) to V1, V4 and IT multi-unit activity of the THINGS Ventral Stream Spiking Dataset —
a reimplementation of the Roelfsema-lab project (github.com/JoseReyLopez/Roelfsema-Lab).

Usage (from the repo root or from inside cortex_readouts/):

  # embedded default: a synthetic TVSD-layout dataset and a random-weight VGG-19, the whole layer × site sweep
  python cortex_readouts/main.py --mode sweep
  python cortex_readouts/main.py --mode train --layer features.19 --readout bashivan

  # real data on one GPU (TVSD monkey N; THINGS images under --image_root in the order of things_imgs.mat)
  python cortex_readouts/main.py --mode sweep --data_root /data/TVSD/monkeyN --image_root /data/THINGS/images \
      --weights imagenet --backbone vgg19 inception --readout cadena bashivan ridge --reliab_threshold 0.6

  # a cluster job array (see README), then the merge step
  sbatch --array=0-15 --wrap "python cortex_readouts/main.py --mode sweep --data_root ... --shard slurm"
  python cortex_readouts/main.py --mode heatmap --data_root ... --require_complete

  # feature-extraction vs fitting time of one layer (one JSON line); most exciting images of a sweep
  python cortex_readouts/main.py --mode benchmark
  python cortex_readouts/main.py --mode mei --layer features.19 --sites V4

On CUDA: features extracted once per layer under bf16 autocast and cached on disk in fp16, all electrodes of a
layer fitted in one model on the GPU. Readouts are fitted in fp32.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import checkpoint, metrics, plots, runtime, settings, shard, synthetic  # noqa: E402
from common.runtime import UserError  # noqa: E402
from cortex_readouts import backbones, data, models  # noqa: E402

STUDY = "cortex_readouts"
MODES = ("train", "sweep", "heatmap", "benchmark", "mei")
READOUTS = ("cadena", "bashivan", "ridge")
SYNTHETIC_NAME = "tvsd_synthetic_v1"

# Flags left unset: DEFAULTS, then PAPER (with --data_root) or EMBEDDED (without), then the user's flags.
# lr None = per readout: Cadena 1e-4 (Cadena 2019 and the repo), Bashivan 1e-3 (the repo's V1/V4 value).
DEFAULTS = dict(epochs=20, batch_size=64, lr=None, log_every=100, eval_every=100, patience=10, image_size=224,
                max_map=28, array_size=64, val_fraction=0.1, workers=8)
PAPER = {}
# Embedded: 360 + 40 images of 64 px, 16 arrays × 4 electrodes; maps pooled to 6 × 6 so the 16-layer VGG-19
# sweep of three readouts stays within ~3 CPU minutes.
EMBEDDED = dict(epochs=10, batch_size=32, log_every=0, eval_every=20, patience=3, image_size=64, max_map=6,
                array_size=4, val_fraction=0.2, workers=0)
LR = {"cadena": 1e-4, "bashivan": 1e-3}
LR_EMBEDDED = {"cadena": 1e-3, "bashivan": 1e-2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="sweep", help="train one (layer, readout) on the sites; sweep "
                   "every layer × readout (units, shardable); heatmap = merge a sweep's units into tables and "
                   "heatmaps; benchmark = one JSON line; mei = most exciting images of trained models")
    settings.add_shared_flags(p, help={"epochs": "max passes over the training images; paper 20, embedded 10",
                                       "batch_size": "paper 64, embedded 32",
                                       "lr": "Adam; default per readout: cadena 1e-4, bashivan 1e-3 (embedded 1e-3 / 1e-2)",
                                       "log_every": "steps; 0 = only evaluation lines",
                                       "output_root": "sweep, heatmap and mei share one folder"})
    a = p.add_argument
    a("--backbone", nargs="+", default=["vgg19"], choices=tuple(backbones.LAYERS),
      help="vgg19 and/or inception (torchvision GoogLeNet standing in for lucid's InceptionV1); train/mei use the first")
    a("--readout", nargs="+", default=None, choices=READOUTS,
      help="cadena (dense), bashivan (mask × features), ridge (closed form); default: all three (train: cadena)")
    a("--layer", nargs="+", default=None, help="layer name(s) (vgg19: features.0 … features.34; inception: conv1 … "
      "inception5b); sweep default: every layer; train default: the middle layer")
    a("--sites", nargs="+", default=["arrays", "areas"], help="heatmap rows / scored groups: 'arrays', 'areas', "
      "V1, V4, IT, arrayK (default: arrays areas)")
    a("--weights", default=None, help="backbone weights: a local torchvision state_dict file, or 'imagenet' "
      "(torchvision's download, online machines); default: random init (a loud warning; demo only)")
    a("--quirks", choices=("paper", "original"), default="paper", help="paper: Cadena 2019's regularisers (means, "
      "+4 Laplacian, group sparsity) and PyTorch-correct BN; original: the repo's laplace-sign, "
      "reshape-mixes-neurons, group-l2, sums-not-means, bn-momentum (see README)")
    a("--loss", choices=("mse", "poisson"), default="mse", help="mse (the repo; TVSD MUA is z-scored) or poisson "
      "(Cadena 2019, for spike counts; needs --output elu)")
    a("--output", choices=("identity", "elu"), default="identity", help="cadena output nonlinearity: identity "
      "(the repo) or ELU(x-1)+1 (Cadena 2019)")
    a("--reg", nargs=2, action="append", metavar=("TERM", "VALUE"), default=[],
      help="override a regulariser coefficient: smooth, group, l1 (cadena), smooth, l1, l2 (bashivan)")
    a("--select_on_test", action="store_true", help="select-on-test: early-stop on the TEST images as the repo did "
      "(optimistic; default: a validation split held out from the training images)")
    g = p.add_argument_group("data")
    g.add_argument("--monkey", choices=tuple(data.AREA_OF_ARRAY), default="N", help="electrode → area map")
    g.add_argument("--array_size", type=int, default=None, help="electrodes per array (TVSD 64; embedded 4)")
    g.add_argument("--reliab_threshold", type=float, default=None, help="keep electrodes whose mean 'reliab' "
                   "(over repeat pairs) is ≥ this (TVSD users: 0.6); default: keep all")
    g.add_argument("--image_list", default=None, help="things_imgs.mat or a text list (default: DATA_ROOT/"
                   "things_imgs.mat, DATA_ROOT/_logs/things_imgs.mat, or train_imgs.txt + test_imgs.txt)")
    g.add_argument("--image_root", default=None, help="folder the list's paths are relative to (default DATA_ROOT)")
    g.add_argument("--val_fraction", type=float, default=None, help="validation share of the training images "
                   "(paper 0.1, embedded 0.2)")
    g.add_argument("--cache_root", default=None, help="embedded data and feature cache (default runs/cortex_readouts/cache)")
    g.add_argument("--workers", type=int, default=None, help="image-loading processes (paper 8, embedded 0)")
    f = p.add_argument_group("features and fitting")
    f.add_argument("--image_size", type=int, default=None, help="backbone input size (224 as the repo; embedded 64)")
    f.add_argument("--max_map", type=int, default=None, help="average-pool maps larger than this (paper 28, embedded 6)")
    f.add_argument("--eval_every", type=int, default=None, help="validation every N steps (paper 100, embedded 20)")
    f.add_argument("--patience", type=int, default=None, help="stop an array after N evaluations without gain")
    shard.add_shard_flags(p)
    b = p.add_argument_group("benchmark / mei")
    b.add_argument("--bench_images", type=int, default=None, help="synthetic images (default 2048 on CUDA, 96 on CPU)")
    b.add_argument("--bench_electrodes", type=int, default=1024, help="synthetic electrodes (TVSD: 1024)")
    b.add_argument("--bench_all_layers", action="store_true", help="time every layer (a full sweep's cost)")
    b.add_argument("--electrodes", nargs="+", type=int, default=None, help="mei: these electrode indices (of the "
                   "model's electrodes) instead of the whole site")
    b.add_argument("--mei_steps", type=int, default=None, help="mei: optimisation steps (default 512; embedded 40)")
    b.add_argument("--mei_images", type=int, default=4, help="mei: images per objective")
    b.add_argument("--sweep_root", default=None, help="mei: the sweep folder, or a --mode train run folder "
                   "(default: runs/cortex_readouts/sweep)")
    b.add_argument("--rf_envelope", action="store_true", help="mei: restrict Bashivan MEIs to a Gaussian fitted "
                   "to the chosen electrodes' mean spatial mask")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.embedded = args.data_root is None
    settings.resolve(args, DEFAULTS, ("paper", PAPER) if not args.embedded else ("embedded", EMBEDDED))
    settings.check_positive(args, "epochs", "batch_size", "eval_every", "patience", "image_size", "max_map", "array_size")
    if args.output_root is None:
        args.output_root = settings.default_output_root(STUDY, args.mode)
    if args.cache_root is None:
        args.cache_root = settings.default_output_root(STUDY, "cache")
    if args.sweep_root is None:
        args.sweep_root = settings.default_output_root(STUDY, "sweep")
    if args.readout is None:
        args.readout = list(READOUTS) if args.mode in ("sweep", "heatmap", "benchmark", "mei") else ["cadena"]
    if args.loss == "poisson" and args.output != "elu":
        raise UserError("--loss poisson needs a positive prediction: add --output elu")
    args.reg_overrides = {}
    for term, value in args.reg:
        try:
            args.reg_overrides[term] = float(value)
        except ValueError:
            raise UserError(f"--reg {term} {value}: the value must be a number") from None
    return args


# ----------------------------------------------------------------------------- data and features


def open_data(args) -> dict:
    """The neural data, kept electrodes, sites, fitting groups (arrays) and the train/val/test rows."""
    if args.embedded:
        root = synthetic.ensure_synthetic(args.cache_root, SYNTHETIC_NAME, lambda p: data.write_synthetic(p))
    else:
        root = args.data_root
    d = data.load_dataset(root, args.monkey, args.array_size, args.reliab_threshold, args.image_list, args.image_root)
    keep = np.flatnonzero(d["keep"])
    d["y_train_all"] = torch.from_numpy(d["train"][:, keep]).float()
    d["y_test"] = torch.from_numpy(d["test"][:, keep]).float()
    d["test_reps_kept"] = None if d["test_reps"] is None else d["test_reps"][:, :, keep]
    d["kept"] = keep
    d["sites"] = data.make_sites(d["emap"], args.sites, d["keep"])
    arrays = d["emap"]["array"][keep]
    d["groups"] = [torch.from_numpy(np.flatnonzero(arrays == a)) for a in sorted(set(arrays.tolist()))]
    d["areas_kept"] = [d["emap"]["area"][i] for i in keep]
    n_train = d["y_train_all"].shape[0]
    d["train_rows"], d["val_rows"] = data.split_train_val(n_train, args.val_fraction, args.seed)
    d["test_rows"] = np.arange(n_train, n_train + d["y_test"].shape[0])
    d["tag"] = backbones.dataset_tag(d["source"], n_train + len(d["test_rows"]))
    print(f"data {d['source']}: {n_train} train images ({len(d['train_rows'])} fit / {len(d['val_rows'])} "
          f"validation), {len(d['test_rows'])} test images, {len(keep)} of {len(d['keep'])} electrodes kept, "
          f"{len(d['groups'])} arrays, sites: {', '.join(d['sites'])}", flush=True)
    return d


def feature_folder(args, d, backbone_name, device):
    bb, wtag = backbones.build_backbone(backbone_name, args.weights, args.image_size, args.seed)
    return bb, wtag, backbones.cache_dir(args.cache_root, d["tag"], bb, wtag, args.max_map)


def ensure_features(args, d, bb, folder, layers, device) -> dict:
    loader = torch.utils.data.DataLoader(data.ImageFiles(d["train_images"] + d["test_images"], args.image_size),
                                         batch_size=256 if device.type == "cuda" else 32, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    return backbones.extract_features(bb, loader, layers, folder, args.max_map, device, args.amp,
                                      log_every=max(1, len(loader) // 4))


def layer_tensors(folder, layer, d, device):
    """(train, val, test) feature tensors of one layer, fp16 on the device (cast to fp32 per batch)."""
    feats = backbones.load_features(folder, layer)
    to = lambda rows: torch.from_numpy(np.ascontiguousarray(feats[rows])).to(device)  # noqa: E731
    return to(d["train_rows"]), to(d["val_rows"]), to(d["test_rows"]), feats


# ----------------------------------------------------------------------------- one unit: (backbone, readout, layer)


def fit_unit(args, d, folder, backbone_name, readout_kind, layer, device, on_eval=None) -> tuple[dict, dict]:
    """Fit one readout of one layer to every kept electrode (all arrays jointly) and score every site.
    Returns (checkpoint state, scores)."""
    t0 = time.perf_counter()
    x_tr, x_val, x_te, feats = layer_tensors(folder, layer, d, device)
    x_natural = (x_tr, x_val, x_te)  # every natural image, for the highest predicted response (MEI comparison)
    y_all = d["y_train_all"]
    y_tr, y_val = y_all[d["train_rows"]].to(device), y_all[d["val_rows"]].to(device)
    if args.select_on_test:  # select-on-test: the repo validated (and picked checkpoints) on the test images
        x_val, y_val = x_te, d["y_test"].to(device)
    mean, var = models.channel_stats(feats, d["train_rows"])
    shape, n_el = tuple(x_tr.shape[1:]), y_tr.shape[1]
    info = {}
    if readout_kind == "ridge":
        readout, sol = models.ridge_readout(x_tr, y_tr, x_val, y_val, mean, var)
        info = {"steps": 0, "lambda": sol["lam"].cpu().tolist(), "alphas": sol["alphas"]}
    else:
        runtime.seed_everything(args.seed)
        readout = models.build_readout(readout_kind, shape, n_el, args.quirks, args.output).to(device)
        if readout.norm == "fixed":
            readout.set_norm_stats(mean.float(), var.float())
        coefs = models.coefficient_vectors(readout_kind, args.quirks, d["areas_kept"], args.reg_overrides)
        lr = args.lr or (LR_EMBEDDED if args.embedded else LR)[readout_kind]
        steps_per_epoch = max(1, len(d["train_rows"]) // args.batch_size)
        groups = [g.to(device) for g in d["groups"]]
        res = models.fit_gradient(readout, x_tr, y_tr, x_val, y_val, groups, coefs, quirks=args.quirks,
                                  loss=args.loss, lr=lr, batch_size=args.batch_size,
                                  max_steps=args.epochs * steps_per_epoch, eval_every=args.eval_every,
                                  patience=args.patience, seed=args.seed, log_every=args.log_every, on_eval=on_eval,
                                  prefix=f"{backbone_name} {layer} {readout_kind}")
        info = {"steps": res["steps"], "lr": lr, "history": res["history"], "best_step": res["best_step"]}
    fit_s = time.perf_counter() - t0
    scores = score_sites(readout, x_val, y_val, x_te, d)
    scores.update(backbone=backbone_name, readout=readout_kind, layer=layer, fit_seconds=fit_s,
                  feature_shape=list(shape), n_electrodes=n_el, **info)
    pred_all = models.predict(readout, torch.cat(x_natural))
    state = checkpoint.training_state(
        readout, epoch=1, step=info.get("steps", 0), best_metric=scores["val_corr_mean"], args=_plain_args(args),
        readout_config=readout.config(), readout=readout_kind, backbone=backbone_name, layer=layer,
        image_size=args.image_size,
        max_map=args.max_map, weights=args.weights, seed=args.seed, electrodes=d["kept"].tolist(),
        sites={k: v.tolist() for k, v in d["sites"].items()},
        max_natural_response=pred_all.max(0).values,  # per electrode, over every natural image of the dataset
        max_natural_site_response={k: float(pred_all[:, torch.from_numpy(v)].mean(1).max()) if len(v) else None
                                   for k, v in d["sites"].items()})
    return state, scores


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def score_sites(readout, x_val, y_val, x_te, d) -> dict:
    """Per electrode and per site (mean over its electrodes): validation and test correlation, FEVe against the
    test repeats, and the correlation corrected by the Spearman-Brown split-half reliability of the repeats."""
    r_val = metrics.corr(models.predict(readout, x_val), y_val.cpu())
    pred = models.predict(readout, x_te)
    r_test = metrics.corr(pred, d["y_test"])
    reps = d["test_reps_kept"]
    if reps is not None:
        fe = metrics.feve(reps, pred)
        rel = metrics.split_half_reliability(reps, n_splits=20, seed=0)
        ncc = metrics.noise_corrected_corr(r_test, rel)
    else:
        fe = ncc = np.full(len(r_test), np.nan)
    sites = {}
    for name, idx in d["sites"].items():
        nan_mean = lambda v: float(np.nanmean(v[idx])) if len(idx) and not np.all(np.isnan(v[idx])) else None  # noqa: E731
        sites[name] = {"n_electrodes": int(len(idx)), "val_corr": nan_mean(r_val), "test_corr": nan_mean(r_test),
                       "feve": nan_mean(fe), "noise_corrected_corr": nan_mean(ncc)}
    return {"sites": sites, "val_corr_mean": float(np.mean(r_val)), "test_corr_mean": float(np.mean(r_test)),
            "per_electrode": {"val_corr": r_val.tolist(), "test_corr": r_test.tolist(),
                              "feve": np.nan_to_num(fe, nan=-9.0).tolist(), "feve_nan_is": -9.0}}


# ----------------------------------------------------------------------------- modes


def mode_train(args, device):
    d = open_data(args)
    name, kind = args.backbone[0], args.readout[0]
    bb, wtag, folder = feature_folder(args, d, name, device)
    layer = (args.layer or [bb.layer_names[len(bb.layer_names) // 2]])[0]
    bb.index(layer)
    rd = checkpoint.RunDir(args.output_root, _plain_args(args), resume=args.resume, overwrite=args.overwrite)
    if args.resume and (rd.path / "results.json").is_file():
        print(f"{rd.path} is complete (results.json); nothing to resume", flush=True)
        return json.loads((rd.path / "results.json").read_text())
    ensure_features(args, d, bb, folder, [layer], device)
    state, scores = fit_unit(args, d, folder, name, kind, layer, device, on_eval=lambda row: rd.log(row))
    rd.save_best(state)
    rd.save("last.pt", state)
    rd.write_results(scores)
    if scores.get("history"):
        h = scores["history"]
        plots.line_plot(rd.figure_path("validation.png"), [{"label": "mean val corr", "x": [r["step"] for r in h],
                        "y": [r["val_corr_mean"] for r in h]}], title=f"{name} {layer} {kind}", xlabel="step",
                        ylabel="corr")
    print_sites(scores)
    print(json.dumps({"mode": "train", "backbone": name, "layer": layer, "readout": kind,
                      "val_corr_mean": scores["val_corr_mean"], "test_corr_mean": scores["test_corr_mean"],
                      "fit_seconds": round(scores["fit_seconds"], 2)}), flush=True)
    return scores


def print_sites(scores):
    for name, s in scores["sites"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"  {name:>14}: {s['n_electrodes']:3d} el | val r {fmt(s['val_corr'])} | test r {fmt(s['test_corr'])}"
              f" | FEVe {fmt(s['feve'])} | noise-corrected r {fmt(s['noise_corrected_corr'])}", flush=True)


def sweep_units(args) -> list[tuple[str, str, str]]:
    """The sweep's units in their fixed order: backbone, then readout, then layer in network order."""
    units = []
    for b in args.backbone:
        layers = backbones.LAYERS[b]
        if args.layer:
            bad = [x for x in args.layer if x not in layers]
            if len(args.backbone) == 1 and bad:
                raise UserError(f"--layer {' '.join(bad)}: not layers of {b}; expected some of {', '.join(layers)}")
            layers = [x for x in layers if x in args.layer]
        units += [(b, r, layer) for r in args.readout for layer in layers]
    if not units:
        raise UserError("the sweep has no units (check --backbone / --layer)")
    return units


def unit_dir(root, unit) -> Path:
    return Path(root) / "units" / unit[0] / unit[1] / unit[2]


def mode_sweep(args, device):
    k, n = shard.parse_shard(args.shard)
    units = sweep_units(args)
    mine = shard.my_units(units, (k, n))
    root = Path(args.output_root)
    d = open_data(args)
    if n == 1:  # a single process owns the folder; with N > 1 shards write only their units' folders
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(root / "sweep_args.json", _plain_args(args))
    todo = []
    for u in mine:
        action = shard.prepare_unit(unit_dir(root, u), resume=args.resume, overwrite=args.overwrite)
        if action == "skip":
            print(f"unit {'/'.join(u)}: complete, skipped", flush=True)
        else:
            todo.append(u)
    print(f"sweep: {len(units)} units (backbone × readout × layer), shard {k}/{n} owns {len(mine)}, "
          f"{len(todo)} to run, into {root}", flush=True)
    t0 = time.perf_counter()
    for b in dict.fromkeys(u[0] for u in todo):
        bb, wtag, folder = feature_folder(args, d, b, device)
        ensure_features(args, d, bb, folder, list(dict.fromkeys(u[2] for u in todo if u[0] == b)), device)
        for u in [u for u in todo if u[0] == b]:
            ud = unit_dir(root, u)
            ud.mkdir(parents=True, exist_ok=True)
            state, scores = fit_unit(args, d, folder, *u, device)
            checkpoint.save_checkpoint(ud / "best.pt", state)
            checkpoint.write_json(ud / "scores.json", scores)
            shard.mark_complete(ud, {"unit": list(u), "seconds": scores["fit_seconds"]})
            print(f"unit {'/'.join(u)}: val r {scores['val_corr_mean']:.3f} | test r {scores['test_corr_mean']:.3f}"
                  f" | {scores.get('steps', 0)} steps | {scores['fit_seconds']:.1f}s", flush=True)
    print(f"sweep shard {k}/{n}: {len(todo)} unit(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    if n == 1:
        return mode_heatmap(args, device, d=d)
    print(f"merge when every shard is done: python cortex_readouts/main.py --mode heatmap --output_root {root} "
          f"(same --backbone/--readout/--layer/--sites)", flush=True)
    return None


def mode_heatmap(args, device=None, d=None):
    """The merge step: tables and heatmaps from the complete units; missing ones are listed."""
    root = Path(args.output_root)
    units = sweep_units(args)
    done, missing = shard.collect({u: unit_dir(root, u) for u in units})
    shard.report_missing(["/".join(u) for u in missing], len(units), args.require_complete)
    if not done:
        raise UserError(f"{root}: no complete unit of this sweep (run --mode sweep first, with the same "
                        f"--backbone/--readout/--layer)")
    rows, by_pair = [], {}
    for u in done:
        try:
            s = json.loads((unit_dir(root, u) / "scores.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{unit_dir(root, u)}/scores.json unreadable ({e})") from None
        by_pair.setdefault(u[:2], {})[u[2]] = s
        for site, v in s["sites"].items():
            rows.append({"backbone": u[0], "readout": u[1], "layer": u[2], "site": site, **v})
    if not rows:
        raise UserError(f"{root}: the complete units hold no site scores")
    fig = root / "figures"
    best = {}
    for (b, r), per_layer in by_pair.items():
        layers = [x for x in backbones.LAYERS[b] if x in per_layer]
        sites = list(next(iter(per_layer.values()))["sites"])
        for metric in ("test_corr", "feve"):
            vals = [[per_layer[x]["sites"][s][metric] for x in layers] for s in sites]
            val_sel = [[per_layer[x]["sites"][s]["val_corr"] for x in layers] for s in sites]
            # the best layer of a site is chosen on the VALIDATION split; the cell shows the test score
            marks = [(i, int(np.nanargmax([-np.inf if v is None else v for v in row])))
                     for i, row in enumerate(val_sel) if any(v is not None for v in row)]
            short = [x.replace("features.", "f").replace("inception", "i") for x in layers]
            plots.heatmap(fig / f"heatmap_{b}_{r}_{metric}.png", vals, sites, short,
                          title=f"{b} {r}: {metric.replace('_', ' ')} (box: best layer on validation)", marks=marks)
            if metric == "test_corr":
                best[f"{b}/{r}"] = {sites[i]: {"layer": layers[j], "val_corr": val_sel[i][j], "test_corr": vals[i][j]}
                                    for i, j in marks}
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(root / "table.json", rows)
    with open(root / ".table.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / ".table.csv.tmp").replace(root / "table.csv")
    results = {"mode": "heatmap", "units_total": len(units), "units_complete": len(done),
               "missing": ["/".join(u) for u in missing], "best_layer": best}
    checkpoint.write_json(root / "results.json", results)
    for pair, sites in best.items():
        print(f"best layer per site ({pair}, chosen on validation): " +
              ", ".join(f"{s} {v['layer']} (test r {v['test_corr']:.2f})" for s, v in sites.items()), flush=True)
    print(f"wrote {root}/table.csv, table.json, results.json and {len(by_pair) * 2} heatmap(s) in {fig}", flush=True)
    return results


def mode_benchmark(args, device):
    """One JSON line: features of one layer (or every layer) for synthetic images, then every electrode fitted by
    each readout with the run's schedule; fit time / extraction time per readout."""
    runtime.setup_cuda_speed(device)
    cuda = device.type == "cuda"
    n_img = args.bench_images or (2048 if cuda else 96)
    name = args.backbone[0]
    bb, _ = backbones.build_backbone(name, args.weights, args.image_size, args.seed)
    bb = bb.to(device)
    layers = bb.layer_names if args.bench_all_layers else (args.layer or [bb.layer_names[len(bb.layer_names) // 2]])
    g = torch.Generator().manual_seed(args.seed)
    images = synthetic.natural_images(n_img, args.image_size, 3, seed=args.seed)
    n_el, arr = args.bench_electrodes, max(1, args.bench_electrodes // data.N_ARRAYS)
    groups = [torch.arange(i, min(i + arr, n_el), device=device) for i in range(0, n_el, arr)]
    out = {"mode": "benchmark", "device": str(device), "torch": torch.__version__, "backbone": name,
           "image_size": args.image_size, "max_map": args.max_map, "images": n_img, "electrodes": n_el,
           "epochs": args.epochs, "batch_size": args.batch_size, "layers": {}}
    for layer in layers:
        runtime.reset_peak_memory(device)
        runtime.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            chunks = []
            for i in range(0, n_img, 256 if cuda else 32):
                x = images[i:i + (256 if cuda else 32)].to(device)
                with runtime.autocast(device, args.amp):
                    chunks.append(backbones.pool_map(bb(x, [layer])[layer].float(), args.max_map).half())
            feats = torch.cat(chunks)
        runtime.synchronize(device)
        t_ext = time.perf_counter() - t0
        # targets: a random linear readout of the (pooled) features plus noise, split 80/20 into fit/validation
        flat = feats.float().flatten(1)
        w = torch.randn(flat.shape[1], n_el, generator=g).to(device) / flat.shape[1] ** 0.5
        y = flat @ w
        y = (y - y.mean(0)) / y.std(0).clamp_min(1e-6) + torch.randn(y.shape, generator=g).to(device)
        n_fit = int(0.8 * n_img)
        mean, var = feats[:n_fit].float().mean((0, 2, 3)), feats[:n_fit].float().var((0, 2, 3), unbiased=False)
        row = {"extract_s": round(t_ext, 3), "extract_images_per_s": round(n_img / t_ext, 1),
               "feature_shape": list(feats.shape[1:])}
        for kind in args.readout:
            runtime.synchronize(device)
            t0 = time.perf_counter()
            if kind == "ridge":
                models.ridge_readout(feats[:n_fit], y[:n_fit], feats[n_fit:], y[n_fit:], mean, var)
            else:
                ro = models.build_readout(kind, tuple(feats.shape[1:]), n_el, args.quirks, args.output).to(device)
                ro.set_norm_stats(mean, var)
                coefs = models.coefficient_vectors(kind, args.quirks, ["V1"] * n_el, args.reg_overrides)
                steps = args.epochs * max(1, n_fit // args.batch_size)
                models.fit_gradient(ro, feats[:n_fit], y[:n_fit], feats[n_fit:], y[n_fit:], groups, coefs,
                                    lr=(args.lr or LR[kind]), batch_size=args.batch_size, max_steps=steps,
                                    eval_every=args.eval_every, patience=10**9, seed=args.seed)
                row[f"{kind}_steps"] = steps
            runtime.synchronize(device)
            t_fit = time.perf_counter() - t0
            row[f"{kind}_fit_s"] = round(t_fit, 3)
            row[f"{kind}_fit_over_extract"] = round(t_fit / t_ext, 3)
        row["peak_mem_mb"] = round(runtime.peak_memory_mb(device), 1)
        out["layers"][layer] = row
    if len(layers) > 1:
        out["total_extract_s"] = round(sum(r["extract_s"] for r in out["layers"].values()), 2)
        for kind in args.readout:
            out[f"total_{kind}_fit_s"] = round(sum(r[f"{kind}_fit_s"] for r in out["layers"].values()), 2)
    print(json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- most exciting images


def trained_models(args) -> list[tuple[Path, dict]]:
    """The (folder, checkpoint) of every trained model chosen by --backbone/--readout/--layer under --sweep_root
    (a sweep folder with units/, or a --mode train run folder with best.pt)."""
    root = Path(args.sweep_root)
    if (root / "best.pt").is_file():
        paths = [root / "best.pt"]
    elif (root / "units").is_dir():
        paths = [unit_dir(root, u) / "best.pt" for u in sweep_units(args)]
        paths = [p for p in paths if shard.is_complete(p.parent)] if args.layer is None else paths
    else:
        raise UserError(f"--sweep_root {root}: no trained model there (expected best.pt of --mode train, or a "
                        f"sweep folder with units/)")
    out = []
    for p in paths:
        if not p.is_file():
            raise UserError(f"no trained model at {p} (run --mode sweep for it, or pick another --layer/--readout)")
        ck = checkpoint.load_checkpoint(p)
        if "readout_config" not in ck or "layer" not in ck:
            raise UserError(f"{p} is not a cortex_readouts model checkpoint (no readout_config/layer)")
        out.append((p.parent, ck))
    if not out:
        raise UserError(f"--sweep_root {root}: no complete unit of the chosen --backbone/--readout/--layer")
    return out


def response_model(ck: dict, device) -> backbones.ResponseModel:
    """A trained model's `response_fn`: images in [0, 1] → [n, electrodes] (preprocessing, backbone up to the
    layer, pooling, readout; eval mode). `ck` = a best.pt of --mode train or of a sweep unit."""
    readout = models.readout_from_config(ck["readout_config"])
    readout.load_state_dict(ck["model"])
    bb, _ = backbones.build_backbone(ck["backbone"], ck["weights"], ck["image_size"], ck["seed"])
    return backbones.ResponseModel(bb, ck["layer"], readout, ck["max_map"]).to(device)


def image_grid(images: torch.Tensor, min_size: int = 128, gap: int = 4):
    """A row of images [n, 3, H, W] in [0, 1] as one PIL image (nearest upscaling to ≥ min_size px)."""
    from PIL import Image

    n, _, h, w = images.shape
    k = max(1, -(-min_size // h))
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = Image.new("RGB", (n * w * k + (n - 1) * gap, h * k), "white")
    for i in range(n):
        grid.paste(Image.fromarray(arr[i]).resize((w * k, h * k), Image.NEAREST), (i * (w * k + gap), 0))
    return grid


def mode_mei(args, device):
    """MEIs of every chosen (layer, site) model: objective = mean predicted response of the site's electrodes
    (or of --electrodes), cortex_readouts/mei.py's generator; compared with the highest predicted response of
    any natural image of the dataset (from the feature cache)."""
    from cortex_readouts import mei

    models_ = trained_models(args)
    rd = checkpoint.RunDir(args.output_root, _plain_args(args), resume=False, overwrite=args.overwrite)
    out_dir = rd.path / "meis"
    out_dir.mkdir(exist_ok=True)
    steps = args.mei_steps or (40 if args.embedded else mei.PRESETS["lucent"]["steps"])
    records, data_cache = [], {}
    for folder, ck in models_:
        train_args = argparse.Namespace(**{**vars(args), **{k: v for k, v in ck["args"].items() if k in (
            "data_root", "cache_root", "monkey", "array_size", "reliab_threshold", "image_list", "image_root",
            "val_fraction", "seed", "embedded", "image_size", "max_map", "weights", "workers", "amp")}})
        train_args.sites = ck["args"].get("sites", ["arrays", "areas"])
        sites = {k: torch.tensor(v, dtype=torch.long) for k, v in ck["sites"].items()}
        explicit = args.sites != build_parser().get_default("sites")
        chosen = pick_sites(sites, args.sites, folder) if explicit else sites
        n_el = ck["readout_config"]["n"]
        if args.electrodes and (max(args.electrodes) >= n_el or min(args.electrodes) < 0):
            raise UserError(f"--electrodes {' '.join(map(str, args.electrodes))}: the model at {folder} has "
                            f"electrodes 0..{n_el - 1}")
        model = response_model(ck, device)
        readout = model.readout
        # a ridge readout is stored as a dense one: its name comes from the checkpoint (or the unit's folder)
        kind = ck.get("readout") or (folder.parent.name if folder.parent.name in READOUTS else ck["readout_config"]["kind"])
        # the highest response to a natural image: the readout on the dataset's cached features (fp16)
        key = (train_args.data_root, ck["backbone"])
        if key not in data_cache:
            d = open_data(train_args)
            data_cache[key] = (d, *feature_folder(train_args, d, ck["backbone"], device)[::2])
        d, bb_feat, feat_dir = data_cache[key]
        ensure_features(train_args, d, bb_feat, feat_dir, [ck["layer"]], device)
        feats = torch.from_numpy(np.array(backbones.load_features(feat_dir, ck["layer"])))
        natural = models.predict(readout.to(device), feats).float()
        targets = [(f"electrodes{'-'.join(map(str, args.electrodes))}", torch.tensor(args.electrodes))] \
            if args.electrodes else list(chosen.items())
        for name, idx in targets:
            if len(idx) == 0:
                print(f"{folder.name} {name}: no electrodes, skipped", flush=True)
                continue
            objective = mei.electrode_objective(model, idx.tolist())
            envelope = None
            if args.rf_envelope and isinstance(readout, models.BashivanReadout):
                c, h, w = readout.shape
                envelope = mei.fit_rf_envelope(readout.mask.detach().abs()[idx].mean(0).reshape(h, w).cpu(),
                                               ck["image_size"])
            t0 = time.perf_counter()
            res = mei.generate(objective, image_size=ck["image_size"], n_images=args.mei_images, steps=steps,
                               lr=mei.PRESETS["lucent"]["lr"], seed=args.seed, device=device, rf_envelope=envelope,
                               log_every=max(1, steps // 4), log_prefix=f"mei {ck['layer']} {name}")
            best_nat = float(natural[:, idx].mean(1).max())
            pred = res["final_objective"]
            stem = f"{ck['backbone']}_{kind}_{ck['layer']}_{name}"
            np.save(out_dir / f"{stem}.npy", res["images"].numpy())
            image_grid(res["images"]).save(out_dir / f"{stem}.png")
            rec = {"backbone": ck["backbone"], "readout": kind, "layer": ck["layer"],
                   "site": name, "electrodes": idx.tolist(), "model": str(folder), "steps": steps,
                   "seed": args.seed, "image_size": ck["image_size"], "rf_envelope": envelope is not None,
                   "predicted_response": pred.tolist(), "predicted_response_max": float(pred.max()),
                   "best_natural_response": best_nat,
                   "ratio": float(pred.max()) / best_nat if best_nat > 0 else None,
                   "exceeds_natural": bool(float(pred.max()) > best_nat),
                   "objective_first_last": [res["objective_trace"][0], res["objective_trace"][-1]] if steps else None,
                   "seconds": round(time.perf_counter() - t0, 2), "png": f"meis/{stem}.png", "npy": f"meis/{stem}.npy"}
            records.append(rec)
            print(f"mei {stem}: predicted {rec['predicted_response_max']:.3f} vs best natural {best_nat:.3f} "
                  f"(ratio {rec['ratio'] if rec['ratio'] is None else round(rec['ratio'], 2)})", flush=True)
    checkpoint.write_json(rd.path / "meis.json", records)
    rd.write_results({"mode": "mei", "n_meis": len(records), "meis": "meis.json",
                      "fraction_exceeding_natural": float(np.mean([r["exceeds_natural"] for r in records]))
                      if records else None})
    print(f"wrote {len(records)} MEI(s) to {out_dir} and {rd.path / 'meis.json'}", flush=True)
    return records


def pick_sites(sites: dict, spec, folder) -> dict:
    """The model's sites named by --sites (exact names, arrayK, an area, 'arrays', 'areas')."""
    out = {}
    for tok in spec:
        hits = {k: v for k, v in sites.items() if k == tok or k.startswith(tok + "_")
                or (tok == "arrays" and k.startswith("array")) or (tok == "areas" and k in data.AREAS)}
        if not hits:
            raise UserError(f"--sites {tok!r}: not a site of the model at {folder} (its sites: {', '.join(sites)})")
        out.update(hits)
    return out


def main(argv=None):
    args = parse_args(argv)
    runtime.set_threads(args.threads)
    settings.print_settings(args)
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    if args.mode == "train":
        return mode_train(args, device)
    if args.mode == "sweep":
        return mode_sweep(args, device)
    if args.mode == "heatmap":
        return mode_heatmap(args, device)
    if args.mode == "benchmark":
        return mode_benchmark(args, device)
    return mode_mei(args, device)


if __name__ == "__main__":
    runtime.run_cli(main)
