"""ndn_baselines: the HSM of Antolík et al. 2016 (PLOS CB), the NDN3 thesis baselines bl1–bl4 and its DNN variants,
with many random seeds trained at once as one batched model.

Usage (from the repo root or from inside this folder):

  CPU, embedded synthetic data (< 3 min; short schedule: 300 epochs, 4 seeds, validation every 25 epochs;
  fewer for ln, lnln and the conv-heavy whatwhere, see SYNTHETIC_OVERRIDES):
    python ndn_baselines/main.py --mode train --model bl4
    python ndn_baselines/main.py --mode train --model ln           # the LN baseline on the same data
  Real data (Antolík 2016 S1 supplement, `Data/region{1,2,3}/`): the thesis protocol, 35,000 epochs, 50 seeds:
    python ndn_baselines/main.py --mode train --model bl4 --region all --data_root /path/to/Data
    python ndn_baselines/main.py --mode sweep --experiment bs2_exp1 --data_root /path/to/Data --jobs 4
    python ndn_baselines/main.py --mode summarize --output_root runs/ndn_baselines
    python ndn_baselines/main.py --mode benchmark
  One GPU: add `--device cuda` (all data lives on the GPU; the seeds are the batch dimension).
  torchrun: not used. One model holds all seeds, so a second GPU adds nothing to one run; run `--mode sweep`
  with `--jobs N` and CUDA_VISIBLE_DEVICES per job instead.

Modes
  train      one model (a preset `--model`, any flag overriding it) on `--region` 1|2|3|all|pooled|1,2, with
             `--seeds` seeds in one batched model; run folder `<output_root>/<run_name>` (region suffix for 'all').
  sweep      every setting of `--experiment` (experiments.py) as runs `<name>__<i>`, `--jobs` in parallel.
  summarize  50th/90th/10th percentile over seeds of the mean validation correlation, final and peak step, next
             to the noise ceiling, for every run under `--output_root`; summary.{json,csv,md} + PNG curves.
  benchmark  one JSON line: seconds per epoch for 1 seed and for `--bench_seeds` seeds batched, and the ratio.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import checkpoint, metrics, plots, runtime, synthetic  # noqa: E402
from common.runtime import UserError  # noqa: E402
from ndn_baselines import data, experiments, losses, models  # noqa: E402

STUDY = "ndn_baselines"
# Short schedule on the embedded synthetic data (each can still be set explicitly): < 3 min on a 2-core CPU.
SYNTHETIC_SCHEDULE = dict(epochs=300, seeds=4, eval_every=25)
SYNTHETIC_OVERRIDES = {"ln": dict(epochs=150), "lnln": dict(epochs=200),  # the d2x penalty on 961-pixel weights
                       "whatwhere": dict(epochs=4, seeds=2, eval_every=1)}  # ~10 GFLOP per seed-epoch
SETTING_KEYS = list(experiments.BASE) + ["region"]
PERCENTILES = (50, 90, 10)  # the thesis reports (median, 90th, 10th) over seeds


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
    a("--mode", choices=["train", "sweep", "summarize", "benchmark"], default="train", help="what to do (see the docstring)")
    a("--model", default="bl4", help=f"preset: {', '.join(experiments.PRESETS)}")
    a("--region", default=None, help="1|2|3, all (each separately), pooled (1+2+3 with masks) or a list like 1,2 (default 1)")
    a("--data_root", default=None, help="folder holding region1/ region2/ region3/ (Antolík 2016 S1 'Data'); "
      "omitted: embedded synthetic data in the same format, short schedule")
    a("--output_root", default="runs/ndn_baselines", help="runs go to <output_root>/<run_name>")
    a("--run_name", default=None, help="run folder name (default <model>_region<r>)")
    a("--experiment", default=None, help=f"sweep grid: {', '.join(experiments.EXPERIMENTS)}")
    a("--jobs", type=int, default=1, help="sweep: parallel training processes")
    a("--seeds", type=int, default=None, help="number of random initialisations trained together (real data: 50)")
    a("--seed_offset", type=int, default=0, help="seeds are seed_offset .. seed_offset+seeds-1 (msc-neuro: 0..)")
    a("--shared_order", action="store_true", help="all seeds see the same minibatch order (from --data_seed): "
      "~25%% faster with many seeds; default: each seed shuffles with its own generator, as separate runs did")
    a("--data_seed", type=int, default=0, help="seed of the shared minibatch order (--shared_order only)")
    # Model and training settings: None = the preset's value (experiments.BASE / PRESETS).
    a("--arch", choices=models.ARCHS, default=None, help="network family (set by the preset)")
    a("--epochs", type=int, default=None, help="training epochs (baselines 35,000; experiments 5,000; no early stopping)")
    a("--eval_every", type=int, default=None, help="validation correlation every N epochs (thesis: 100)")
    a("--batch_size", type=int, default=None, help="minibatch size (thesis: 16; the last partial batch is kept)")
    a("--lr", type=float, default=None, help="Adam learning rate (bl1/bl2 1e-4, bl3+ 1e-3)")
    a("--loss", choices=list(losses.LOSSES), default=None, help="poisson (default) or gaussian")
    a("--scaling", choices=data.SCALINGS, default=None, help="inputs: raw, x1e6 (bl1) or zscore (bl2+)")
    a("--zscore_val_own_stats", action="store_true", help="quirk: z-score validation inputs with their own mean/std "
      "(msc-neuro) instead of the training statistics")
    a("--bias_init", choices=["zeros", "normal", "abs_normal"], default=None, help="biases: zeros (bl1/bl2) or N(0,0.1²) (bl3+)")
    a("--n_dog", type=int, default=None, help="DoG filters (9)")
    a("--dog_act", choices=["lin", "softplus"], default=None, help="activation after the DoG layer (lin)")
    a("--hidden_ratio", type=float, default=None, help="hidden units = int(ratio·neurons) (0.2)")
    a("--hidden_type", choices=["normal", "sep"], default=None, help="hidden layer: dense or separable (space × channel)")
    a("--lin_scale", type=_bool, default=None, help="true: learnable scalar input scale w·x+b first (bs3_exp10)")
    a("--dropout", type=float, default=None, help="DROP probability on hidden units (NDN3's value was the keep-prob)")
    a("--conv_filters", type=int, default=None, help="conv / conv-DoG / what-where maps")
    a("--conv_size", type=int, default=None, help="conv kernel size")
    a("--conv_stride", type=int, default=None, help="conv stride (0: (k+1)//2)")
    a("--conv_layers", type=int, default=None, help="stacked conv layers (arch conv)")
    a("--conv_act", choices=["lin", "softplus"], default=None, help="activation after conv layers")
    a("--reg", action="append", default=None, metavar="LAYER.TYPE=λ",
      help="regularizer, repeatable; LAYER conv|hidden|out, TYPE l1|l2|d2x|max|max_filt (overrides the preset's)")
    a("--dog_sigma_bug", action="store_true", help="quirk: NDN3 60c4fa2 σ bounds (1,0) freeze both DoG widths")
    a("--dog_uy_init_bug", action="store_true", help="quirk: init uy = U(2,29)+2 (some centres start clamped)")
    a("--convdog_bounds_bug", action="store_true", help="quirk: keep the degenerate centre bounds (2,1) of 3-px conv DoGs")
    a("--synthetic_kind", choices=["v1", "deep", "hsm"], default="v1", help="ground truth of the embedded data: "
      "v1 = Gabor simple/complex cells of common.synthetic.SimulatedPopulation (default), deep = its pooled "
      "nonlinear feature units, hsm = a random HSM teacher (the model class being fit)")
    a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--dtype", choices=["float32", "float64"], default="float32", help="parameter/compute precision")
    a("--amp", action="store_true", help="bf16 autocast on CUDA (off by default: the models are tiny and "
      "latency-bound, and 35k epochs of Poisson fits are sensitive to precision)")
    a("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default, all cores; a sweep gives "
      "each of its --jobs children cores // jobs). Use 1 on a machine shared with other jobs: the ops are small "
      "and oversubscribed threads mostly wait for each other")
    a("--compile", action="store_true", help="torch.compile the model forward")
    a("--log_every", type=int, default=None, help="progress line every N epochs (default: eval_every)")
    a("--resume", action="store_true", help="continue the run in the run folder from last.pt")
    a("--overwrite", action="store_true", help="replace an existing run folder")
    a("--bench_seeds", type=int, default=50, help="benchmark: seeds of the batched model")
    a("--bench_epochs", type=int, default=2, help="benchmark: timed epochs per measurement")
    return p


def parse_reg(entries) -> dict:
    """['out.l2=0.1', 'hidden.d2x=1'] → {'out': {'l2': 0.1}, 'hidden': {'d2x': 1.0}}; later entries win."""
    reg = {}
    for e in entries or []:
        try:
            lhs, lam = e.split("=")
            layer, kind = lhs.split(".")
            lam = float(lam)
        except ValueError:
            raise UserError(f"--reg {e!r}: expected LAYER.TYPE=λ, e.g. out.l2=0.1") from None
        if layer not in ("conv", "hidden", "out") or kind not in losses.REGULARIZERS:
            raise UserError(f"--reg {e!r}: LAYER must be conv|hidden|out and TYPE one of {list(losses.REGULARIZERS)}")
        reg.setdefault(layer, {})[kind] = lam
    return reg


def resolve_settings(args, synthetic_data: bool) -> dict:
    """Preset < explicit flags; on synthetic data the short schedule replaces the paper's epochs/seeds."""
    if args.model not in experiments.PRESETS:
        raise UserError(f"--model {args.model!r}: unknown; expected one of {', '.join(experiments.PRESETS)}")
    s = {**experiments.BASE, **experiments.PRESETS[args.model]}
    s["seeds"], s["region"] = 50, "1"
    if synthetic_data:
        s.update(SYNTHETIC_SCHEDULE, **SYNTHETIC_OVERRIDES.get(args.model, {}))
    for k in SETTING_KEYS + ["seeds"]:
        v = getattr(args, k, None)
        if v is not None and k != "reg":
            s[k] = v
    s["reg"] = list(s["reg"]) + list(args.reg or [])
    parse_reg(s["reg"])  # validate early
    for k, lo in (("epochs", 0), ("seeds", 1), ("batch_size", 1), ("eval_every", 1)):
        if s[k] < lo:
            raise UserError(f"--{k} must be ≥ {lo}, got {s[k]}")
    if not 0 <= s["dropout"] < 1:
        raise UserError(f"--dropout is a drop probability in [0, 1), got {s['dropout']}")
    return s


def model_cfg(s: dict, args) -> dict:
    keys = set(models.MODEL_DEFAULTS) - {"reg", "dog_sigma_bug", "dog_uy_init_bug", "convdog_bounds_bug"}
    cfg = {k: s[k] for k in keys if k in s}
    cfg.update(reg=parse_reg(s["reg"]), dog_sigma_bug=args.dog_sigma_bug, dog_uy_init_bug=args.dog_uy_init_bug,
               convdog_bounds_bug=args.convdog_bounds_bug)
    return cfg


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
    n, R = len(ds.train_x), len(gens)
    order = epoch_order([order_gen] if order_gen is not None else gens, n).to(ds.train_x.device)
    rows = len(order)  # R, or 1 with a shared order
    total = torch.zeros(R, device=ds.train_x.device, dtype=ds.train_x.dtype)
    # Minibatches are gathered into buffers allocated once per epoch: a fresh multi-MB tensor per step costs
    # page faults that made the gather the largest single cost with 50 seeds on CPU.
    bufs = [None if t is None else t.new_empty(rows * min(batch_size, n), t.shape[1])
            for t in (ds.train_x, ds.train_y, ds.train_mask)]
    shape = (lambda B: (B, -1)) if order_gen is not None else (lambda B: (R, B, -1))
    n_batches = 0
    for start in range(0, n, batch_size):  # the last partial batch is kept (msc-neuro's NDN3 patch)
        idx = order[:, start:start + batch_size]
        B, flat = idx.shape[1], idx.reshape(-1)
        x, y, mask = (None if t is None else torch.index_select(t, 0, flat, out=b[:rows * B]).view(shape(B))
                      for t, b in zip((ds.train_x, ds.train_y, ds.train_mask), bufs))
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
    """Full-batch validation (and training-set) correlation per seed: (R, neurons) arrays + mean per seed."""
    model.eval()
    pv = model(ds.val_x).double()
    pt = model(ds.train_x).double()
    val = np.stack([data.validation_corr(p, ds) for p in pv])  # (R, N)
    tr = np.stack([metrics.masked_corr(p, ds.train_y, ds.train_mask) for p in pt])
    val_loss = loss_fn(pv, ds.val_y.double(), None if ds.val_mask is None else ds.val_mask.double()).cpu().numpy()
    return dict(val_corr=val, train_corr=tr, val_loss=val_loss)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """Adam(β1 0.9, β2 0.999, ε 1e-8) as NDN3. One Adam over the stacked parameters is R independent Adams
    (elementwise update; the seeds' gradients never mix). The fused kernel saves most of its per-step cost."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without the fused kernel
        return torch.optim.Adam(model.parameters(), **kw)


def fit(model, ds, gens, *, epochs, batch_size, lr, loss="poisson", eval_every=100, on_eval=None, start_epoch=0,
        opt=None, amp_ctx=None, progress=None, order_gen=None):
    """Train `model` (all its seeds) for epochs start_epoch+1..epochs with Adam; evaluate at start_epoch (if 0),
    every `eval_every` epochs and at the end. `on_eval(epoch, step, ev, train_loss, opt)` receives each evaluation.
    Returns the list of (epoch, mean validation corr per seed)."""
    loss_fn = losses.LOSSES[loss]
    opt = opt or make_optimizer(model, lr)
    amp_ctx = amp_ctx or contextlib.nullcontext
    curve, steps_per_epoch = [], -(-len(ds.train_x) // batch_size)
    train_loss = None

    def do_eval(ep):
        ev = evaluate(model, ds, loss_fn)
        curve.append((ep, ev["val_corr"].mean(1)))
        if on_eval:
            on_eval(ep, ep * steps_per_epoch, ev, train_loss, opt)

    # Far-tail Gaussian values and tiny Adam moments are subnormal floats, which x86 CPUs process ~100× slower;
    # flushing them to zero changes nothing measurable here (|values| < 1e-38 in float32).
    torch.set_flush_denormal(True)
    try:
        if start_epoch == 0:
            do_eval(0)
        for ep in range(start_epoch + 1, epochs + 1):
            train_loss = train_epoch(model, opt, ds, gens, batch_size, loss_fn, amp_ctx, order_gen).cpu().numpy()
            if progress:
                progress.update(len(ds.train_x) * len(gens), loss=float(train_loss.mean()))
            if ep % eval_every == 0 or ep == epochs:
                do_eval(ep)
    finally:
        torch.set_flush_denormal(False)  # torch's default; leave the process as we found it
    return curve


# ----------------------------------------------------------------------------- train mode


def percentiles(values) -> dict:
    """{'p50','p90','p10'} over seeds (numpy linear interpolation = pandas quantile, as msc-neuro's analysis)."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES}


def curve_summary(epochs, corr) -> dict:
    """Percentiles at the final step and at the peak step (the eval with the highest median over seeds; the thesis'
    'peak' values pick epochs on the validation set itself, note §5.8)."""
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


def train_one(args, s: dict, regions: list[int], run_path: Path, device, dtype) -> dict:
    """Train all seeds of one setting on one region (or pooled regions); write the run folder."""
    raw_regions, root = load_data(args, regions)
    ds = data.make_dataset(raw_regions, s["scaling"], args.zscore_val_own_stats).to(device, dtype)
    seeds = list(range(args.seed_offset, args.seed_offset + s["seeds"]))
    gens = models.make_generators(seeds)
    order_gen = torch.Generator().manual_seed(args.data_seed) if args.shared_order else None
    try:
        model = models.build_model(model_cfg(s, args), ds.n_neurons, seeds, gens=gens).to(device=device, dtype=dtype)
    except ValueError as e:
        raise UserError(f"model settings: {e}") from None
    record = {**vars(args), "settings": s, "regions": regions, "data": str(root)}
    run = checkpoint.RunDir(run_path, record, resume=args.resume, overwrite=args.overwrite)  # after all checks
    fwd = torch.compile(model) if args.compile else model  # shares the parameters; checkpoints save `model`
    opt = make_optimizer(model, s["lr"])
    n_eff, n_ndn3 = models.count_parameters(model), models.count_parameters(model, "ndn3")
    curves = dict(epochs=[], val_corr=[], train_corr=[], regions={b["name"]: [] for b in ds.blocks})
    start_epoch, t_prev, best = 0, 0.0, {"median": -np.inf}
    state = run.resume_state()
    if state is not None:  # exact continuation: weights, Adam moments, every seed's generator, the curves so far
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for g, gs in zip(gens, state["generators"]):
            g.set_state(gs)
        if order_gen is not None:
            order_gen.set_state(state["order_generator"])
        start_epoch, curves, t_prev = state["epoch"], state["curves"], state.get("seconds", 0.0)
        best["median"] = state["best_metric"]
        run.truncate_metrics(lambda r: r["epoch"] <= start_epoch)
        print(f"resuming {run.path} at epoch {start_epoch}", flush=True)
    where = ", ".join(b["name"] for b in ds.blocks)
    print(f"{run.path.name}: {args.model} ({s['arch']}) on {where}: {ds.n_neurons} neurons, {len(ds.train_x)} train / "
          f"{len(ds.val_x)} val images, {len(seeds)} seeds, {s['epochs']} epochs, {n_eff} parameters per seed "
          f"({n_ndn3} in NDN3's layout), device {device}", flush=True)
    t0 = time.perf_counter()
    progress = runtime.Progress(s["epochs"] - start_epoch, args.log_every or s["eval_every"], unit="img",
                                prefix=run.path.name)

    def on_eval(epoch, step, ev, train_loss, opt):
        per_seed = ev["val_corr"].mean(1)
        curves["epochs"].append(epoch)
        curves["val_corr"].append(per_seed.tolist())
        curves["train_corr"].append(ev["train_corr"].mean(1).tolist())
        for b in ds.blocks:
            curves["regions"][b["name"]].append(ev["val_corr"][:, b["neurons"]].mean(1).tolist())
        row = {"epoch": epoch, "step": step, "val_corr_median": float(np.median(per_seed)),
               **{f"val_corr_{k}": v for k, v in percentiles(per_seed).items()},
               "val_corr_mean": float(per_seed.mean()), "train_corr_mean": float(ev["train_corr"].mean()),
               "val_loss_mean": float(ev["val_loss"].mean()),
               "train_loss_mean": None if train_loss is None else float(train_loss.mean()),
               "seconds": t_prev + time.perf_counter() - t0,
               **{f"val_corr_seed{sd}": float(c) for sd, c in zip(seeds, per_seed)}}
        run.log(row)
        is_best = row["val_corr_median"] > best["median"]
        best["median"] = max(best["median"], row["val_corr_median"])
        ckpt = checkpoint.training_state(model, opt, epoch=epoch, step=step, best_metric=best["median"], args=record,
                                         generators=[g.get_state() for g in gens], curves=curves,
                                         order_generator=None if order_gen is None else order_gen.get_state(),
                                         seconds=row["seconds"])
        run.save("last.pt", ckpt)
        if is_best:  # best = highest median validation correlation over seeds (a validation-set choice, note §5.8)
            run.save("best.pt", ckpt)
        if epoch > 0:
            print(f"{run.path.name} epoch {epoch}: val corr median {row['val_corr_median']:.4f} "
                  f"(p90 {row['val_corr_p90']:.4f}, p10 {row['val_corr_p10']:.4f}), train corr "
                  f"{row['train_corr_mean']:.4f}", flush=True)

    amp = lambda: runtime.autocast(device, "bf16" if args.amp else "off")  # noqa: E731 (fp32 off CUDA)
    fit(fwd, ds, gens, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], loss=s["loss"],
        eval_every=s["eval_every"], on_eval=on_eval, start_epoch=start_epoch, opt=opt, amp_ctx=amp, progress=progress,
        order_gen=order_gen)
    seconds = t_prev + time.perf_counter() - t0
    weights = [b["neurons"].stop - b["neurons"].start for b in ds.blocks]
    results = {
        "study": STUDY, "model": args.model, "experiment": s.get("experiment") or args.experiment or args.model,
        "run": run.path.name, "regions": [b["name"] for b in ds.blocks], "seeds": seeds, "settings": s,
        "n_params": n_eff, "n_params_ndn3_layout": n_ndn3, "seconds": seconds,
        "seconds_per_epoch": seconds / max(s["epochs"] - start_epoch, 1),
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
    f = results["final"]
    print(f"{run.path.name} done in {seconds:.1f}s: final val corr p50 {f['p50']:.4f} p90 {f['p90']:.4f} "
          f"p10 {f['p10']:.4f} (peak p50 {results['peak']['p50']:.4f} at epoch {results['peak']['epoch']}); "
          f"noise ceiling: oracle {results['noise_ceiling']:.4f}, trial average {results['avg_ceiling']:.4f}"
          + (f", true {results['true_ceiling']:.4f}" if truth else ""), flush=True)
    return results


def plot_run(run, res):
    c = np.asarray(res["curves"]["val_corr"])
    series = [dict(label="val median (10-90%)", x=res["curves"]["epochs"], y=np.median(c, 1).tolist(),
                   lo=np.percentile(c, 10, axis=1).tolist(), hi=np.percentile(c, 90, axis=1).tolist()),
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
    s = resolve_settings(args, synthetic_data=args.data_root is None)
    if args.experiment:
        s["experiment"] = args.experiment
    groups = data.region_list(s["region"])
    out = []
    for regions, name in zip(groups, run_names(args, groups)):
        out.append(train_one(args, s, regions, Path(args.output_root) / name, device, dtype))
    return out


# ----------------------------------------------------------------------------- sweep mode


def _flags(setting: dict) -> list[str]:
    out = []
    for k, v in setting.items():
        if k == "reg":
            out += [x for r in v for x in ("--reg", str(r))]
        else:
            out += [f"--{k}", str(v)]
    return out


def mode_sweep(args, device, dtype):
    """Run every setting of the experiment as `main.py --mode train` in a subprocess (`--jobs` at a time).

    Flags given to the sweep itself (--data_root, --epochs, --seeds, --eval_every, --device, --dtype, ...) are
    forwarded and override the grid; without --data_root every run shares one synthetic cache.
    """
    if args.experiment not in experiments.EXPERIMENTS:
        raise UserError(f"--experiment {args.experiment!r}: unknown; expected one of {', '.join(experiments.EXPERIMENTS)}")
    grid = experiments.EXPERIMENTS[args.experiment]
    root = Path(args.output_root) / args.experiment
    if args.data_root is None:  # write the cache once, before the children race for it
        synthetic.ensure_synthetic(root, f"{STUDY}_{args.synthetic_kind}",
                                   lambda p: data.write_synthetic(p, kind=args.synthetic_kind))
    forward = {k: getattr(args, k) for k in ("data_root", "epochs", "seeds", "eval_every", "device", "seed_offset",
                                             "data_seed", "synthetic_kind", "log_every", "threads")
               if getattr(args, k) not in (None, 0)}
    forward["dtype"] = args.dtype
    forward.setdefault("threads", max(1, (os.cpu_count() or 1) // max(1, args.jobs)))  # no oversubscription
    flags = [f for f in ("resume", "overwrite", "zscore_val_own_stats", "dog_sigma_bug", "dog_uy_init_bug",
                         "convdog_bounds_bug", "shared_order") if getattr(args, f)]
    logs = root / "job_logs"
    logs.mkdir(parents=True, exist_ok=True)

    def launch(i_setting):
        i, setting = i_setting
        name = f"{args.experiment}__{i}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", "train", "--output_root", str(root),
               "--run_name", name, "--experiment", args.experiment]
        cmd += _flags({**setting, **forward}) + [f"--{f}" for f in flags]
        with open(logs / f"o_{name}.log", "w") as out, open(logs / f"e_{name}.log", "w") as err:
            rc = subprocess.call(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail = (logs / f"e_{name}.log").read_text().strip().splitlines()[-1:] or [""]
        print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc}): {tail[0]}'}  {setting}", flush=True)
        return rc

    print(f"sweep {args.experiment}: {len(grid)} settings, {args.jobs} parallel job(s), runs under {root}", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        codes = list(pool.map(launch, enumerate(grid)))
    failed = sum(c != 0 for c in codes)
    if failed:
        raise UserError(f"sweep {args.experiment}: {failed} of {len(grid)} runs failed; see {logs}")
    mode_summarize(args, root=root)


# ----------------------------------------------------------------------------- summarize mode


def mode_summarize(args, root=None):
    """Table of final/peak percentiles per run (grouped by experiment and region) + curves per experiment."""
    root = Path(root or args.output_root)
    files = sorted(p for p in root.rglob("results.json") if "synthetic" not in p.parts)
    if not files:
        raise UserError(f"no results.json under {root}: train or sweep first")
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
                         "path": str(f.parent)})
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
        series = []
        for r in runs:
            c = np.asarray(r["curves"]["val_corr"])
            series.append(dict(label=f"{r['run']} ({'+'.join(r['regions'])})", x=r["curves"]["epochs"],
                               y=np.median(c, 1).tolist(), lo=np.percentile(c, 10, axis=1).tolist(),
                               hi=np.percentile(c, 90, axis=1).tolist()))
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
    (the default) and with one shared order (--shared_order)."""
    s = resolve_settings(args, synthetic_data=True)
    n_img, n_neu = data.REGION_SIZES[1]["train"], data.REGION_SIZES[1]["neurons"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_img, data.N_PIXELS, generator=g, dtype=torch.float64)
    y = torch.poisson(torch.full((n_img, n_neu), 2.0, dtype=torch.float64), generator=g)
    ds = data.Dataset(x, y, None, x[:50], y[:50], None, []).to(device, dtype)
    cfg, loss_fn = model_cfg(s, args), losses.LOSSES[s["loss"]]
    out = {"study": STUDY, "mode": "benchmark", "model": args.model, "device": str(device), "dtype": args.dtype,
           "threads": torch.get_num_threads(), "train_images": n_img, "neurons": n_neu, "batch_size": s["batch_size"]}
    torch.set_flush_denormal(True)
    for order, tag in (("per_seed", ""), ("shared", "_shared_order")):
        for R in (1, args.bench_seeds):
            gens = models.make_generators(range(R))
            order_gen = torch.Generator().manual_seed(0) if order == "shared" else None
            model = models.build_model(cfg, n_neu, list(range(R)), gens=gens).to(device=device, dtype=dtype)
            opt = make_optimizer(model, s["lr"])
            epoch = lambda: train_epoch(model, opt, ds, gens, s["batch_size"], loss_fn,  # noqa: E731
                                        contextlib.nullcontext, order_gen)
            sec = runtime.time_fn(epoch, device, warmup=1, iters=args.bench_epochs)
            out[f"sec_per_epoch_{R}_seeds{tag}"] = round(sec, 5)
            print(f"benchmark ({order} order): {R} seed(s): {sec:.4f} s/epoch", file=sys.stderr, flush=True)
        out[f"ratio{tag}"] = round(out[f"sec_per_epoch_{args.bench_seeds}_seeds{tag}"] / out[f"sec_per_epoch_1_seeds{tag}"], 3)
    rN = out[f"sec_per_epoch_{args.bench_seeds}_seeds"]
    out["target_ratio_max"] = 5.0
    out["speedup_vs_sequential_seeds"] = round(args.bench_seeds * out["sec_per_epoch_1_seeds"] / rN, 2)
    out["items_per_sec"] = round(args.bench_seeds * n_img / rN, 1)  # seed-images per second, batched
    out["full_protocol_hours"] = round(experiments.BASELINE_EPOCHS * rN / 3600, 2)  # 35k epochs, all seeds
    out["peak_memory_mb"] = round(runtime.peak_memory_mb(device), 1)
    print(json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- entry point


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.mode == "summarize":
        return mode_summarize(args)
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.mode == "sweep":
        if not args.experiment:
            raise UserError("--mode sweep needs --experiment NAME")
        return mode_sweep(args, device, dtype)
    if args.mode == "benchmark":
        return mode_benchmark(args, device, dtype)
    return mode_train(args, device, dtype)


if __name__ == "__main__":
    runtime.run_cli(main)
