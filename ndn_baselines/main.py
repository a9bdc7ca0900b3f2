"""ndn_baselines: the HSM of Antolík et al. 2016 (PLOS Comput Biol 12(6): e1004927), the baselines bl1–bl4 and the
DNN variants of Houška's NDN3 thesis (github.com/petrroll/msc-thesis, code github.com/petrroll/msc-neuro), with many
random seeds trained at once as one batched model. README.md in this folder has the data format, every flag, the
original's quirks (by slug) and the measured results.

Usage (from the repo root or from inside this folder):

  CPU, embedded synthetic data (< 3 min; short schedule: 300 epochs, 4 seeds, validation every 25 epochs;
  fewer for ln, lnln and the conv-heavy whatwhere, see experiments.EMBEDDED_PER_PRESET):
    python ndn_baselines/main.py --mode train --model bl4
    python ndn_baselines/main.py --mode train --model ln           # the LN baseline on the same data
  Real data (Antolík 2016 S1 supplement, `Data/region{1,2,3}/`): the thesis protocol, 35,000 epochs, 50 seeds:
    python ndn_baselines/main.py --mode train --model bl4 --region all --data_root /path/to/Data
    python ndn_baselines/main.py --mode sweep --experiment bs2_exp1 --data_root /path/to/Data --jobs 4
    python ndn_baselines/main.py --mode summarize
    python ndn_baselines/main.py --mode benchmark
  A cluster job array (units `<exp>__<i>` in grid order; unit i belongs to shard i mod N), then the merge:
    sbatch --array=0-4 --wrap "python ndn_baselines/main.py --mode sweep --experiment bs2_exp1 --data_root DATA --shard slurm"
    python ndn_baselines/main.py --mode summarize --experiment bs2_exp1 --require_complete
  One GPU: add `--device cuda` (all data lives on the GPU; the seeds are the batch dimension).
  torchrun: not used. One model holds all seeds, so a second GPU adds nothing to one run; spread a sweep over GPUs
  with `--shard K/N` and CUDA_VISIBLE_DEVICES per shard instead.

Modes
  train      one model (a preset `--model`, any flag overriding it) on `--region` 1|2|3|all|pooled|1,2, with
             `--seeds` seeds in one batched model; run folder `<output_root>/<run_name>` (region suffix for 'all').
  sweep      every setting of `--experiment` (experiments.py) as runs `<exp>__<i>` under `<output_root>/<exp>/`,
             one after the other in this process (`--jobs N`: N parallel subprocesses); `--shard K/N|slurm|sge`
             runs only the units i with i mod N = K.
  summarize  50th/90th/10th percentile over seeds of the mean validation correlation, final and peak step, next
             to the noise ceilings: with --experiment, the merge of a (sharded) sweep, listing missing units;
             without, every run under `--output_root`. summary/summary.{json,csv,md} + PNG curves.
  benchmark  one JSON line: seconds per epoch for 1 seed and for `--bench_seeds` seeds batched.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import checkpoint, metrics, plots, runtime, settings, shard, synthetic  # noqa: E402
from common.runtime import UserError  # noqa: E402
from ndn_baselines import data, experiments, losses, models  # noqa: E402

STUDY = "ndn_baselines"
PERCENTILES = (50, 90, 10)  # the thesis reports (median, 90th, 10th) over seeds
SETTING_KEYS = ["model", *experiments.DEFAULTS, "log_every"]  # what print_settings / results.json report
# Flags that make no sense for a sweep as a whole (each unit gets its own) and flags of the sweep itself.
NOT_FOR_SWEEP = {"model": "each setting of the grid names its preset", "run_name": "units are named <exp>__<i>",
                 "grid_index": "the sweep runs every index", "bench_seeds": "benchmark only",
                 "bench_epochs": "benchmark only"}
SWEEP_ONLY = ("mode", "output_root", "experiment", "jobs", "shard", "require_complete", "resume", "overwrite")


# ----------------------------------------------------------------------------- command line


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=["train", "sweep", "summarize", "benchmark"], default="train", help="what to do (see above)")
    # Every setting below defaults to None = "not given": experiments.Settings, the preset, the embedded schedule
    # and the grid decide it (experiments.py); the run prints each value with its source at start.
    a("--model", default=None, help=f"preset (default bl4): {', '.join(experiments.PRESETS)}")
    a("--region", default=None, help="1|2|3, all (each separately), pooled (1+2+3 with masks) or a list like 1,2 (default 1)")
    a("--run_name", default=None, help="run folder name (default <model>_region<r>)")
    a("--experiment", default=None, help=f"sweep/summarize: the grid, one of {', '.join(experiments.EXPERIMENTS)}; "
      "train: with --grid_index, one setting of it")
    a("--grid_index", type=int, default=None, help="train: run setting I of --experiment (what sweep unit <exp>__<I> runs)")
    a("--jobs", type=int, default=1, help="sweep: parallel training processes on this machine")
    a("--seeds", type=int, default=None, help="random initialisations trained together (real data 50; embedded 4)")
    a("--shared_order", action="store_true", default=None, help="all seeds see the same minibatch order (from "
      "--data_seed): ~25%% faster with many seeds; default: each seed shuffles with its own generator, as separate runs did")
    a("--data_seed", type=int, default=0, help="seed of the shared minibatch order (--shared_order only)")
    a("--arch", choices=models.ARCHS, default=None, help="network family (set by the preset)")
    a("--eval_every", type=int, default=None, help="validation correlation every N epochs (thesis: 100)")
    a("--loss", choices=list(losses.LOSSES), default=None, help="poisson (default) or gaussian")
    a("--scaling", choices=data.SCALINGS, default=None, help="inputs: raw (slug input-scale), x1e6 (bl1) or zscore (bl2+)")
    a("--bias_init", choices=["zeros", "normal", "abs_normal"], default=None, help="biases: zeros (bl1/bl2) or "
      "N(0,0.1²) as NDN3 runs 'trunc_normal' (bl3+); abs_normal = |N(0,0.1²)| as the thesis text says (slug trunc-normal-bias)")
    a("--n_dog", type=int, default=None, help="DoG filters (9)")
    a("--dog_act", choices=["lin", "softplus"], default=None, help="activation after the DoG layer (lin)")
    a("--hidden_ratio", type=float, default=None, help="hidden units = int(ratio·neurons) (0.2)")
    a("--hidden_type", choices=["normal", "sep"], default=None, help="hidden layer: dense or separable (space × channel)")
    a("--lin_scale", type=_bool, default=None, help="true: learnable scalar input scale w·x+b first (bs3_exp10)")
    a("--dropout", type=float, default=None, help="DROP probability on hidden units (slug dropout-keep-prob: NDN3's "
      "value was the keep-probability)")
    a("--conv_filters", type=int, default=None, help="conv / conv-DoG / what-where maps")
    a("--conv_size", type=int, default=None, help="conv kernel size")
    a("--conv_stride", type=int, default=None, help="conv stride (0: (k+1)//2)")
    a("--conv_layers", type=int, default=None, help="stacked conv layers (arch conv)")
    a("--conv_act", choices=["lin", "softplus"], default=None, help="activation after conv layers")
    a("--reg", action="append", default=None, metavar="LAYER.TYPE=λ", help="regularizer, repeatable; LAYER "
      "conv|hidden|out, TYPE l1|l2|d2x|max|max_filt. Given at all, the --reg list REPLACES the preset's")
    a("--zscore_val_own_stats", action="store_true", default=None, help="quirk zscore-val-own-stats: z-score the "
      "validation inputs with their own mean/std (msc-neuro) instead of the training statistics")
    a("--dog_sigma_bug", action="store_true", default=None, help="quirk dog-sigma-bounds: NDN3 60c4fa2's σ bounds "
      "(1,0) freeze both DoG widths")
    a("--dog_uy_init_bug", action="store_true", default=None, help="quirk dog-uy-init: init uy = U(2,29)+2 "
      "(some centres start clamped)")
    a("--convdog_bounds_bug", action="store_true", default=None, help="quirk convdog-degenerate-bounds: keep the "
      "centre bounds (2,1) of 3-px conv DoGs (an edge pixel)")
    a("--synthetic_kind", choices=["v1", "deep", "hsm"], default="v1", help="ground truth of the embedded data: "
      "v1 = Gabor simple/complex cells of common.synthetic.SimulatedPopulation (default), deep = its pooled "
      "nonlinear feature units, hsm = a random HSM teacher (the model class being fit)")
    a("--dtype", choices=["float32", "float64"], default="float32", help="parameter/compute precision")
    a("--bench_seeds", type=int, default=50, help="benchmark: seeds of the batched model")
    a("--bench_epochs", type=int, default=2, help="benchmark: timed epochs per measurement")
    settings.add_shared_flags(p, amp_default="off", aliases={"seed": ["--seed_offset"]}, help={
        "epochs": "baselines 35,000, experiments 5,000, embedded 300; no early stopping",
        "batch_size": "thesis 16; the last partial batch is kept",
        "lr": "Adam; bl1/bl2 1e-4, bl3+ 1e-3",
        "log_every": "epochs; default --eval_every",
        "seed": "the FIRST seed: the run trains seeds seed..seed+seeds-1 (msc-neuro: 0..); --seed_offset is an alias",
        "threads": "a sweep gives each of its --jobs children cores // jobs unless set; 1 on a shared machine: the "
                   "ops are small and oversubscribed threads mostly wait for each other",
        "amp": "off by default here: the models are tiny and latency-bound (autocast gains nothing), and 35k epochs "
               "of Poisson fits are sensitive to precision; fp16 is refused, its loss scale would couple the seeds",
        "output_root": "here runs/ndn_baselines for every mode: train runs in <root>/<run_name>, sweeps in "
                       "<root>/<experiment>/<experiment>__<i>, and summarize reads them there",
        "resume": "sweep: continue interrupted units, skip complete ones",
        "overwrite": "sweep: redo every unit of this shard",
    })
    shard.add_shard_flags(p)
    return p


def resolve_settings(args) -> None:
    """Decide every setting on `args` (common.settings.resolve): Settings defaults → preset → embedded short
    schedule (no --data_root) → the grid setting (--experiment/--grid_index) → the user's flags."""
    grid, grid_name = {}, f"experiment {args.experiment} #{args.grid_index}"
    if args.grid_index is not None:
        grid_list = experiments.EXPERIMENTS.get(args.experiment)
        if grid_list is None:
            raise UserError(f"--grid_index needs --experiment, one of {', '.join(experiments.EXPERIMENTS)}; "
                            f"got {args.experiment!r}")
        if not 0 <= args.grid_index < len(grid_list):
            raise UserError(f"--grid_index {args.grid_index}: {args.experiment} has settings 0..{len(grid_list) - 1}")
        grid = dict(grid_list[args.grid_index])
    elif args.experiment and args.mode == "train":
        raise UserError("--mode train --experiment NAME needs --grid_index I (one setting of the grid); "
                        "--mode sweep runs them all")
    grid_model = grid.pop("model", None)  # the grid names the preset it starts from
    model_source = "flag" if args.model else grid_name if grid_model else "default"
    args.model = args.model or grid_model or "bl4"
    if args.model not in experiments.PRESETS:
        raise UserError(f"--model {args.model!r}: unknown; expected one of {', '.join(experiments.PRESETS)}")
    layers = [(f"preset {args.model}", experiments.PRESETS[args.model])]
    if args.data_root is None:
        layers += [("embedded", experiments.EMBEDDED_SCHEDULE),
                   (f"embedded {args.model}", experiments.EMBEDDED_PER_PRESET.get(args.model, {}))]
    if grid:
        layers.append((grid_name, grid))
    settings.resolve(args, experiments.DEFAULTS, *layers)
    args.settings_source["model"] = model_source
    args.reg = list(args.reg)
    experiments.parse_reg(args.reg)  # validate early
    if args.log_every is None:
        args.log_every, args.settings_source["log_every"] = args.eval_every, "= eval_every"
    else:
        args.settings_source["log_every"] = "flag"
    if args.epochs < 0:
        raise UserError(f"--epochs must be ≥ 0 (0: evaluate the initial weights only), got {args.epochs}")
    settings.check_positive(args, "seeds", "batch_size", "eval_every", "log_every")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout is a drop probability in [0, 1), got {args.dropout}")
    if args.amp == "fp16":
        raise UserError("--amp fp16 needs one loss scale for the whole model, which would couple the seeds (a seed's "
                        "overflow would skip every seed's step); use --amp bf16 or off")


def model_cfg(args) -> dict:
    return {k: getattr(args, k) for k in experiments.MODEL_KEYS}


# ----------------------------------------------------------------------------- the training loop


def epoch_order(gens, n: int) -> torch.Tensor:
    """(len(gens), n): one permutation of the training images per generator for this epoch.

    Default: each seed draws its own order from its own generator (as each msc-neuro run did with
    np.random.seed(i)), so a seed in a stack sees exactly the minibatches it would see alone; the stack gathers
    (R, B, 961) inputs per step. --shared_order: one generator (--data_seed) orders the images for all seeds,
    the minibatch is shared (B, 961) and the DoG layer is a single GEMM (~25% faster with 50 seeds on CPU);
    a seed then equals a one-seed run with the same --data_seed, and seeds differ only by initialisation.
    """
    return torch.stack([torch.randperm(n, generator=g) for g in gens])


def train_epoch(model, opt, ds, gens, batch_size: int, loss_fn, amp_ctx, order_gen=None) -> torch.Tensor:
    """One pass over the training set for every seed; returns each seed's mean minibatch loss (R,).
    `order_gen`: one generator ordering the images for all seeds (--shared_order), else one order per seed."""
    model.train()
    tr = ds.train
    images = tr.images.flatten(1)  # (n, 961) view
    n, R = len(images), len(gens)
    order = epoch_order([order_gen] if order_gen is not None else gens, n).to(images.device)
    rows = len(order)  # R, or 1 with a shared order
    total = torch.zeros(R, device=images.device, dtype=images.dtype)
    # Minibatches are gathered into buffers allocated once per epoch: a fresh multi-MB tensor per step costs
    # page faults that made the gather the largest single cost with 50 seeds on CPU.
    bufs = [None if t is None else t.new_empty(rows * min(batch_size, n), t.shape[1])
            for t in (images, tr.responses, tr.mask)]
    shape = (lambda B: (B, -1)) if order_gen is not None else (lambda B: (R, B, -1))
    n_batches = 0
    for start in range(0, n, batch_size):  # the last partial batch is kept (msc-neuro's NDN3 patch)
        idx = order[:, start:start + batch_size]
        B, flat = idx.shape[1], idx.reshape(-1)
        x, y, mask = (None if t is None else torch.index_select(t, 0, flat, out=b[:rows * B]).view(shape(B))
                      for t, b in zip((images, tr.responses, tr.mask), bufs))
        with amp_ctx():
            pred = model(x)
        data_loss = loss_fn(pred.to(y.dtype), y, mask)  # the loss in full precision even under autocast
        loss = data_loss + model.penalty()
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # the sum over seeds keeps their gradients apart
        opt.step()
        total += data_loss.detach()
        n_batches += 1
    return total / max(n_batches, 1)


@torch.no_grad()
def evaluate(model, ds, loss_fn) -> dict:
    """Full-batch validation (and training-set) correlation per seed: (R, neurons) arrays + loss per seed."""
    model.eval()
    pv = model(ds.val.images).double()
    pt = model(ds.train.images).double()
    val = np.stack([data.validation_corr(p, ds) for p in pv])  # (R, N)
    tr = np.stack([metrics.masked_corr(p, ds.train.responses, ds.train.mask) for p in pt])
    val_loss = loss_fn(pv, ds.val.responses.double(), ds.val.mask).cpu().numpy()
    return dict(val_corr=val, train_corr=tr, val_loss=val_loss)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """Adam(β1 0.9, β2 0.999, ε 1e-8) as NDN3. One Adam over the stacked parameters is R independent Adams
    (elementwise update; the seeds' gradients never mix). The fused kernel saves most of its per-step cost."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without the fused kernel
        return torch.optim.Adam(model.parameters(), **kw)


@contextlib.contextmanager
def flush_denormal():
    """Far-tail Gaussian values and tiny Adam moments are subnormal floats, which x86 CPUs process ~100× slower;
    flushing them to zero changes nothing measurable here (|values| < 1e-38 in float32). Restored afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default


def percentiles(values) -> dict:
    """{'p50','p90','p10'} over seeds (numpy linear interpolation = pandas quantile, as msc-neuro's analysis)."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES}


def curve_summary(epochs, corr) -> dict:
    """Percentiles at the final eval and at the peak eval (the highest median over seeds; like the thesis'
    'peak' values this picks an epoch on the validation set itself, there being no held-out test set)."""
    corr = np.asarray(corr)  # (evals, R)
    med = np.median(corr, axis=1)
    k = int(np.argmax(med))
    return {"final": {"epoch": int(epochs[-1]), **percentiles(corr[-1])},
            "peak": {"epoch": int(epochs[k]), **percentiles(corr[k])}}


def load_data(args, regions):
    """Regions from --data_root, or from the embedded synthetic cache under --output_root."""
    root = args.data_root
    if root is None:
        kind = args.synthetic_kind
        root = synthetic.ensure_synthetic(args.output_root, f"{STUDY}_{kind}",
                                          lambda p: data.write_synthetic(p, kind=kind))
    elif not Path(root).is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    return [data.load_region(root, r) for r in regions], root


def train_one(args, regions: list[int], run_path: Path, device, dtype) -> dict:
    """Train all seeds of one setting on one region (or pooled regions); write the run folder."""
    raw_regions, root = load_data(args, regions)
    ds = data.make_dataset(raw_regions, args.scaling, args.zscore_val_own_stats).to(device, dtype)
    seeds = list(range(args.seed, args.seed + args.seeds))
    gens = models.make_generators(seeds)  # each seed's init, minibatch order and dropout masks
    order_gen = torch.Generator().manual_seed(args.data_seed) if args.shared_order else None
    try:
        model = models.build_model(model_cfg(args), ds.n_neurons, seeds, gens=gens).to(device=device, dtype=dtype)
    except ValueError as e:
        raise UserError(f"model settings: {e}") from None
    record = {**vars(args), "regions": regions, "data": str(root)}
    run = checkpoint.RunDir(run_path, record, resume=args.resume, overwrite=args.overwrite)  # after all checks
    fwd = torch.compile(model) if args.compile else model  # shares the parameters; checkpoints save `model`
    opt = make_optimizer(model, args.lr)
    loss_fn = losses.LOSSES[args.loss]
    amp_ctx = lambda: runtime.autocast(device, args.amp)  # noqa: E731 (fp32 off CUDA)
    n_eff, n_ndn3 = models.count_parameters(model), models.count_parameters(model, "ndn3")
    steps_per_epoch = -(-len(ds.train.images) // args.batch_size)
    # curves: one entry per evaluation; p50/p90/p10 are the percentile bands over seeds, computed once here
    curves = dict(epochs=[], val_corr=[], train_corr=[], p50=[], p90=[], p10=[], regions={b["name"]: [] for b in ds.blocks})
    start_epoch, seconds_before, best = 0, 0.0, -np.inf
    state = run.resume_state()
    if state is not None:  # exact continuation: weights, Adam moments, every seed's generator, the curves so far
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for g, gs in zip(gens, state["generators"]):
            g.set_state(gs)
        if order_gen is not None:
            order_gen.set_state(state["order_generator"])
        start_epoch, curves, seconds_before, best = state["epoch"], state["curves"], state["seconds"], state["best_metric"]
        run.truncate_metrics(lambda r: r["epoch"] < start_epoch)
        print(f"resuming {run.path} at epoch {start_epoch}", flush=True)
    where = ", ".join(b["name"] for b in ds.blocks)
    print(f"{run.path.name}: {args.model} ({args.arch}) on {where}: {ds.n_neurons} neurons, {len(ds.train.images)} "
          f"train / {len(ds.val.images)} val images, {len(seeds)} seeds, {args.epochs} epochs, {n_eff} parameters "
          f"per seed ({n_ndn3} in NDN3's layout), device {device}", flush=True)
    progress = runtime.Progress(max(args.epochs - max(start_epoch, 1) + 1, 0), args.log_every, unit="img",
                                prefix=run.path.name)
    t0 = time.perf_counter()
    train_loss = None
    with flush_denormal():
        for epoch in range(start_epoch, args.epochs + 1):  # epoch 0 only evaluates the initial weights
            # train
            if epoch > 0:
                train_loss = train_epoch(fwd, opt, ds, gens, args.batch_size, loss_fn, amp_ctx, order_gen).cpu().numpy()
                progress.update(len(ds.train.images) * len(seeds), loss=float(train_loss.mean()))
            if epoch % args.eval_every and epoch != args.epochs:
                continue
            # evaluate
            ev = evaluate(fwd, ds, loss_fn)
            per_seed = ev["val_corr"].mean(1)  # each seed's mean over neurons
            bands = percentiles(per_seed)
            curves["epochs"].append(epoch)
            curves["val_corr"].append(per_seed.tolist())
            curves["train_corr"].append(ev["train_corr"].mean(1).tolist())
            for k, v in bands.items():
                curves[k].append(v)
            for b in ds.blocks:
                curves["regions"][b["name"]].append(ev["val_corr"][:, b["neurons"]].mean(1).tolist())
            # log
            row = {"epoch": epoch, "step": epoch * steps_per_epoch, **{f"val_corr_{k}": v for k, v in bands.items()},
                   "val_corr_mean": float(per_seed.mean()), "train_corr_mean": float(ev["train_corr"].mean()),
                   "val_loss_mean": float(ev["val_loss"].mean()),
                   "train_loss_mean": None if train_loss is None else float(train_loss.mean()),
                   "seconds": seconds_before + time.perf_counter() - t0,
                   **{f"val_corr_seed{sd}": float(c) for sd, c in zip(seeds, per_seed)}}
            run.log(row)
            if epoch > 0:
                print(f"{run.path.name} epoch {epoch}: val corr median {bands['p50']:.4f} (p90 {bands['p90']:.4f}, "
                      f"p10 {bands['p10']:.4f}), train corr {row['train_corr_mean']:.4f}", flush=True)
            # save: last.pt always, best.pt when the median over seeds improves (a validation-set choice)
            new_best = bands["p50"] > best
            best = max(best, bands["p50"])
            state = checkpoint.training_state(
                model, opt, epoch=epoch + 1, step=row["step"], best_metric=best, args=record, curves=curves,
                generators=[g.get_state() for g in gens], seconds=row["seconds"],
                order_generator=None if order_gen is None else order_gen.get_state())
            run.save("last.pt", state)
            if new_best:
                run.save_best(state)
    seconds = seconds_before + time.perf_counter() - t0
    weights = [b["neurons"].stop - b["neurons"].start for b in ds.blocks]
    results = {
        "study": STUDY, "model": args.model, "experiment": args.experiment or args.model,
        "run": run.path.name, "regions": [b["name"] for b in ds.blocks], "seeds": seeds,
        "settings": {k: getattr(args, k) for k in SETTING_KEYS}, "settings_source": args.settings_source,
        "n_params": n_eff, "n_params_ndn3_layout": n_ndn3, "seconds": seconds,
        "seconds_per_epoch": seconds / max(args.epochs - start_epoch, 1),
        **curve_summary(curves["epochs"], curves["val_corr"]),
        "noise_ceiling": float(np.mean(ds.ceiling)),
        "avg_ceiling": float(np.mean(ds.avg_ceiling)),
        "ceiling_conventions": {
            "noise_ceiling": "oracle (leave-one-out) correlation from raw_validation_set.npy, mean over neurons: "
                             "the ceiling for predicting ONE trial",
            "avg_ceiling": "sqrt(Spearman-Brown split-half reliability), mean over neurons: the expected correlation "
                           "of the true rate with the trial average validation_set.npy (what val corr measures)"},
        "per_region": {b["name"]: {"noise_ceiling": b["oracle"], "avg_ceiling": b["avg_ceiling"],
                                   **curve_summary(curves["epochs"], curves["regions"][b["name"]])} for b in ds.blocks},
        "curves": curves,
    }
    truth = data.read_ground_truth(root)
    if truth:
        results["synthetic"] = truth
        results["true_ceiling"] = float(np.average([truth["regions"][b["name"]]["true_ceiling_mean"] for b in ds.blocks],
                                                   weights=weights))
    run.write_results(results)
    plot_run(run, results)
    if args.grid_index is not None:  # a sweep unit: its completion marker is the last file it writes
        shard.mark_complete(run.path, {"experiment": args.experiment, "grid_index": args.grid_index})
    f = results["final"]
    print(f"{run.path.name} done in {seconds:.1f}s: final val corr p50 {f['p50']:.4f} p90 {f['p90']:.4f} "
          f"p10 {f['p10']:.4f} (peak p50 {results['peak']['p50']:.4f} at epoch {results['peak']['epoch']}); "
          f"noise ceiling: oracle {results['noise_ceiling']:.4f}, trial average {results['avg_ceiling']:.4f}"
          + (f", true {results['true_ceiling']:.4f}" if truth else ""), flush=True)
    return results


def band_series(label: str, curves: dict) -> dict:
    """The median over seeds with its 10-90% band, from the percentiles stored once per evaluation."""
    return dict(label=label, x=curves["epochs"], y=curves["p50"], lo=curves["p10"], hi=curves["p90"])


def plot_run(run, res):
    series = [band_series("val median (10-90%)", res["curves"]),
              dict(label="train mean", x=res["curves"]["epochs"], y=np.mean(res["curves"]["train_corr"], 1).tolist())]
    plots.line_plot(run.figure_path("val_corr.png"), series, title=f"{res['run']}: correlation over seeds",
                    ylabel="corr", hlines=[(res["noise_ceiling"], "oracle ceiling (single trial)"),
                                           (res["avg_ceiling"], "trial-average ceiling")])


def run_names(args, groups) -> list[str]:
    """<model>_region1, <model>_region1+2+3 (pooled); --run_name as given, with a region suffix for --region all."""
    tags = ["region" + "+".join(map(str, g)) for g in groups]
    if args.run_name:
        return [args.run_name] if len(groups) == 1 else [f"{args.run_name}_{t}" for t in tags]
    return [f"{args.model}_{t}" for t in tags]


def mode_train(args, device, dtype):
    groups = data.region_list(args.region)
    if args.grid_index is not None and len(groups) > 1:
        raise UserError("a sweep unit is one run: --region all cannot apply (use 1, 2, 3, pooled or a list like 1,2)")
    return [train_one(args, regions, Path(args.output_root) / name, device, dtype)
            for regions, name in zip(groups, run_names(args, groups))]


# ----------------------------------------------------------------------------- sweep mode


def unit_names(experiment: str) -> list[str]:
    """The sweep's units in grid order: `<exp>__<i>` runs setting i of experiments.EXPERIMENTS[exp]."""
    if experiment not in experiments.EXPERIMENTS:
        raise UserError(f"--experiment {experiment!r}: unknown; expected one of {', '.join(experiments.EXPERIMENTS)}")
    return [f"{experiment}__{i}" for i in range(len(experiments.EXPERIMENTS[experiment]))]


def mode_sweep(args, forward: list[str]):
    """Run this shard's settings of the experiment into `<output_root>/<exp>/<exp>__<i>`, each exactly as
    `main.py --mode train --experiment E --grid_index I --run_name E__I ...` would: in this process one after the
    other (--jobs 1), or as `--jobs` parallel subprocesses.

    `forward`: every flag the user gave the sweep (common.settings.explicit_argv), handed to every unit, where it
    beats the grid's value; each unit's args.json records what it used and why. A unit writes only its own folder
    and its job logs `job_logs/{o,e}_<unit>.log`, then a completion marker; a rerun skips complete units,
    continues interrupted ones with --resume and redoes them with --overwrite. One shard (N = 1) ends with the
    summary; with N > 1 the shards write nothing shared and `--mode summarize --experiment E` merges them.
    """
    names = unit_names(args.experiment)
    k, n = shard.parse_shard(args.shard)
    root = Path(args.output_root) / args.experiment
    mine = shard.my_units(list(enumerate(names)), (k, n))
    actions = {name: shard.prepare_unit(root / name, resume=args.resume, overwrite=args.overwrite) for _, name in mine}
    if args.data_root is None:  # write the cache once, before the units need it (atomic: shards may race for it)
        synthetic.ensure_synthetic(root, f"{STUDY}_{args.synthetic_kind}",
                                   lambda p: data.write_synthetic(p, kind=args.synthetic_kind))
    if args.threads == 0:  # not set: the units share this machine's cores
        forward = forward + ["--threads", str(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))]
    logs = root / "job_logs"
    logs.mkdir(parents=True, exist_ok=True)

    def run_unit(i_name):
        i, name = i_name
        if actions[name] == "skip":
            print(f"{name}: complete, skipped", flush=True)
            return 0
        argv = ["--mode", "train", "--experiment", args.experiment, "--grid_index", str(i), "--run_name", name,
                "--output_root", str(root), *forward]
        if actions[name] == "resume":  # interrupted: continue from its last checkpoint, or redo it if it has none
            argv.append("--resume" if (root / name / "last.pt").is_file() else "--overwrite")
        with open(logs / f"o_{name}.log", "w") as out, open(logs / f"e_{name}.log", "w") as err:
            if args.jobs > 1:
                rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv], stdout=out, stderr=err,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
            else:
                rc = run_in_process(argv, out, err)
        tail = (logs / f"e_{name}.log").read_text().strip().splitlines()[-1:] or [""]
        setting = experiments.EXPERIMENTS[args.experiment][i]
        print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc}): {tail[0]}'}  {setting}", flush=True)
        return rc

    print(f"sweep {args.experiment}: shard {k}/{n} runs {len(mine)} of {len(names)} settings, {args.jobs} parallel "
          f"job(s), under {root}" + (f"; forwarded to every run: {' '.join(forward)}" if forward else ""), flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        codes = list(pool.map(run_unit, mine))
    failed = sum(c != 0 for c in codes)
    if failed:
        raise UserError(f"sweep {args.experiment}: {failed} of {len(mine)} runs failed; see {logs}")
    if n == 1:
        return mode_summarize(args, experiment=args.experiment)
    print(f"shard {k}/{n} done. When every shard has finished, merge with:\n  {sys.executable} "
          f"{Path(__file__).resolve()} --mode summarize --experiment {args.experiment} --output_root "
          f"{args.output_root} --require_complete", flush=True)
    return None


def run_in_process(argv: list[str], out, err) -> int:
    """`main(argv)` with its output in the unit's job logs; the exit status a subprocess would have had."""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            return 0
        except UserError as e:
            print(f"error: {e}", file=err, flush=True)
            return 2
        except Exception:  # a unit's crash is that unit's failure, reported in its log; the sweep goes on
            traceback.print_exc(file=err)
            return 1


# ----------------------------------------------------------------------------- summarize mode


def mode_summarize(args, experiment=None):
    """Table of final/peak percentiles per run (grouped by experiment and region) + curves per experiment.

    With `--experiment E`: the merge of E's units under `<output_root>/E` (complete ones only; the missing are
    listed, and --require_complete makes them an error). Without: every run under `--output_root`.
    """
    experiment = experiment or args.experiment
    if experiment:
        root = Path(args.output_root) / experiment
        units = {name: root / name for name in unit_names(experiment)}
        done, missing = shard.collect(units)
        shard.report_missing(missing, len(units), args.require_complete, what=f"runs of {experiment}")
        files = [units[name] / "results.json" for name in done]
    else:
        root = Path(args.output_root)
        files = sorted(p for p in root.rglob("results.json") if "synthetic" not in p.parts)
    if not files:
        raise UserError(f"no complete run{' of ' + experiment if experiment else ''} (results.json) under {root}: "
                        f"train or sweep first")
    rows, by_exp = [], {}
    for f in files:
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: not valid JSON ({e})") from None
        if r.get("study") != STUDY:
            continue
        exp = r.get("experiment") or r["model"]
        for region, sub in ([("+".join(r["regions"]), r)] + (list(r["per_region"].items()) if len(r["regions"]) > 1 else [])):
            rows.append({"experiment": exp, "run": r["run"], "model": r["model"], "region": region,
                         "seeds": len(r["seeds"]), "epochs": r["settings"]["epochs"],
                         **{f"final_{k}": sub["final"][k] for k in ("p50", "p90", "p10")},
                         "peak_epoch": sub["peak"]["epoch"], **{f"peak_{k}": sub["peak"][k] for k in ("p50", "p90", "p10")},
                         "oracle_ceiling": sub["noise_ceiling"], "avg_ceiling": sub["avg_ceiling"],
                         "true_ceiling": r.get("true_ceiling") if sub is r else None,
                         "path": str(f.parent.relative_to(root))})
        by_exp.setdefault(exp, []).append(r)
    rows.sort(key=lambda x: (x["experiment"], x["region"], x["run"]))
    out = root / "summary"
    out.mkdir(exist_ok=True)
    checkpoint.write_json(out / "summary.json", rows)
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ("| experiment | run | region | seeds | final p50 / p90 / p10 | peak p50 / p90 / p10 (epoch) "
            "| ceiling: oracle / trial-avg |")
    lines = [head, "|" + "---|" * 7]
    for x in rows:
        lines.append(f"| {x['experiment']} | {x['run']} | {x['region']} | {x['seeds']} | "
                     f"{x['final_p50']:.3f} / {x['final_p90']:.3f} / {x['final_p10']:.3f} | "
                     f"{x['peak_p50']:.3f} / {x['peak_p90']:.3f} / {x['peak_p10']:.3f} ({x['peak_epoch']}) | "
                     f"{x['oracle_ceiling']:.3f} / {x['avg_ceiling']:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("validation correlation (mean over neurons), percentiles over seeds:\n" + "\n".join(lines), flush=True)
    for exp, runs in by_exp.items():
        series = [band_series(f"{r['run']} ({'+'.join(r['regions'])})", r["curves"]) for r in runs]
        ceilings = sorted({(round(r["noise_ceiling"], 3), round(r["avg_ceiling"], 3)) for r in runs})[:3]
        plots.line_plot(out / f"{exp}.png", series, title=f"{exp}: validation corr, median and 10-90% over seeds",
                        ylabel="corr", hlines=[(c, f"ceiling {n} {c}") for pair in ceilings
                                               for c, n in zip(pair, ("oracle", "trial-avg"))])
    print(f"wrote {out}/summary.{{json,csv,md}} and {len(by_exp)} figure(s)", flush=True)
    return rows


# ----------------------------------------------------------------------------- benchmark mode


def mode_benchmark(args, device, dtype):
    """Seconds per epoch of the model (default bl4) on region-1-sized synthetic tensors (1800 images, 103 neurons,
    batch 16): 1 seed vs `--bench_seeds` seeds batched, in the same process, with each seed's own minibatch order
    (the default) and with one shared order (--shared_order). Prints measurements only."""
    n_img, n_neu = data.REGION_SIZES[1]["train"], data.REGION_SIZES[1]["neurons"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_img, data.N_PIXELS, generator=g, dtype=torch.float64)
    y = torch.poisson(torch.full((n_img, n_neu), 2.0, dtype=torch.float64), generator=g)
    ds = data.Dataset(data.split(x, y), data.split(x[:50], y[:50])).to(device, dtype)
    cfg, loss_fn = model_cfg(args), losses.LOSSES[args.loss]
    out = {"study": STUDY, "mode": "benchmark", "model": args.model, "device": str(device), "dtype": args.dtype,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "train_images": n_img, "neurons": n_neu,
           "batch_size": args.batch_size, "seeds": args.bench_seeds}
    with flush_denormal():
        for order, tag in (("per_seed", ""), ("shared", "_shared_order")):
            for R in (1, args.bench_seeds):
                gens = models.make_generators(range(R))
                order_gen = torch.Generator().manual_seed(0) if order == "shared" else None
                model = models.build_model(cfg, n_neu, list(range(R)), gens=gens).to(device=device, dtype=dtype)
                opt = make_optimizer(model, args.lr)
                epoch = lambda: train_epoch(model, opt, ds, gens, args.batch_size, loss_fn,  # noqa: E731
                                            contextlib.nullcontext, order_gen)
                sec = runtime.time_fn(epoch, device, warmup=1, iters=args.bench_epochs)
                out[f"sec_per_epoch_{R}_seeds{tag}"] = round(sec, 5)
                print(f"benchmark ({order} order): {R} seed(s): {sec:.4f} s/epoch", file=sys.stderr, flush=True)
            out[f"ratio{tag}"] = round(out[f"sec_per_epoch_{args.bench_seeds}_seeds{tag}"] / out[f"sec_per_epoch_1_seeds{tag}"], 3)
    rN = out[f"sec_per_epoch_{args.bench_seeds}_seeds"]
    out["speedup_vs_sequential_seeds"] = round(args.bench_seeds * out["sec_per_epoch_1_seeds"] / rN, 2)
    out["items_per_sec"] = round(args.bench_seeds * n_img / rN, 1)  # seed-images per second, batched
    out["full_protocol_hours"] = round(experiments.BASELINE_EPOCHS * rN / 3600, 2)  # 35k epochs, all seeds
    out["peak_memory_mb"] = round(runtime.peak_memory_mb(device), 1)
    print(json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- entry point


def parse_args(argv=None):
    """(parser, args) with the default output folder filled in: the repo's runs/ndn_baselines whatever the cwd."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output_root = args.output_root or settings.default_output_root(STUDY)
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    if args.mode == "summarize":
        return mode_summarize(args)
    if args.mode == "sweep":
        if not args.experiment:
            raise UserError("--mode sweep needs --experiment NAME")
        for name, why in NOT_FOR_SWEEP.items():
            if getattr(args, name) != parser.get_default(name):
                raise UserError(f"--{name} cannot apply to a sweep ({why})")
        settings.check_positive(args, "jobs")
        if args.region == "all":
            raise UserError("--region all cannot apply to a sweep (a unit is one run): use 1, 2, 3, pooled or 1,2")
        unit_names(args.experiment)
        forward = settings.explicit_argv(parser, args, exclude=SWEEP_ONLY)
        return mode_sweep(args, forward)
    resolve_settings(args)
    settings.print_settings(args, SETTING_KEYS, file=sys.stderr if args.mode == "benchmark" else None)
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    runtime.set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.mode == "benchmark":
        return mode_benchmark(args, device, dtype)
    return mode_train(args, device, dtype)


if __name__ == "__main__":
    runtime.run_cli(main)
