"""Co-train a VGG-19 on Tiny-ImageNet classification and monkey V1 response prediction — Safarani et al.
(NeurIPS 2021), "Towards robust vision by multi-task learning on monkey visual cortex" — and measure its
robustness on Tiny-ImageNet-C and under Gaussian noise.

Usage (from the repo root or from inside mtl_cotraining/):

  # embedded default: synthetic Tiny-ImageNet (5 classes) + 2 simulated V1 sessions in the nnvision format
  python mtl_cotraining/main.py --task mtl --mode train

  # the paper's pipeline on one GPU (presets: mtl = SGD 0.1/0.75/5e-4, plateau x0.3, 5 early-stopping rounds)
  python mtl_cotraining/main.py --task neural --mode train --neural_root /data/monkey/neural_v1    # single-task V1
  python mtl_cotraining/main.py --mode predict_targets --checkpoint runs/mtl_cotraining/train/neural/best.pt \
      --data_root /data/tiny-imagenet-200 --output_root /data/monkey/mtl_monkey_dataset           # co-training targets
  python mtl_cotraining/main.py --task mtl --mode train --data_root /data/tiny-imagenet-200 \
      --neural_root /data/monkey/mtl_monkey_dataset --output_root runs/mtl_seed1000 --seed 1000
  python mtl_cotraining/main.py --task image --mode train --data_root /data/tiny-imagenet-200 --output_root runs/base
  python mtl_cotraining/main.py --mode evaluate --checkpoint runs/base/best.pt --data_root /data/tiny-imagenet-200 \
      --c_root /data/Tiny-ImageNet-C --output_root runs/base_eval
  python mtl_cotraining/main.py --mode evaluate --checkpoint runs/mtl_seed1000/best.pt --data_root ... --c_root ... \
      --baseline_results runs/base_eval/results.json --output_root runs/mtl_eval                   # + mCE vs baseline

  # images/s of an MTL epoch vs an image-only epoch (synthetic tensors)
  python mtl_cotraining/main.py --mode benchmark

On CUDA: bf16 autocast, channels_last, cudnn.benchmark, optional --compile; the neural sets live on the GPU.
One process (the study is Tiny-ImageNet scale; no torchrun).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import checkpoint, datasets, metrics, plots, runtime, settings, synthetic  # noqa: E402
from common.runtime import UserError  # noqa: E402
from mtl_cotraining import data, losses  # noqa: E402
from mtl_cotraining.models import HEADS, MTLVGG, count_parameters  # noqa: E402

STUDY = "mtl_cotraining"
TASKS, MODES = ("mtl", "image", "neural"), ("train", "evaluate", "predict_targets", "benchmark")
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # the original's `validation_gauss` stds

DEFAULTS = dict(epochs=407, batch_size=128, lr=0.1, log_every=100, optimizer="sgd", momentum=0.75,
                weight_decay=5e-4, lr_factor=0.3, lr_patience=5, lr_threshold=1e-4, min_lr=1e-4, es_patience=5,
                es_rounds=5, neural_batch_size=128, neural_loss="mse", loss_weighting="on", scale_loss="off",
                gamma_readout=0.5, ratio="1", workers=8, readout_lr=None)
# The recipes of the NeurIPS submission (nntransfer_recipes `_2021_05_21_NeurIPS_submission`): co-training, the
# image-only baseline, and the single-task V1 model whose predictions are the co-training targets.
PRESETS = {
    "mtl": dict(DEFAULTS),
    "baseline": dict(DEFAULTS, epochs=400, lr_factor=0.4),
    "v1": dict(DEFAULTS, epochs=150, optimizer="adam", lr=5e-4, lr_factor=0.5, lr_threshold=1e-6,
               neural_loss="poisson", loss_weighting="off", scale_loss="on"),
}
TASK_PRESET = {"mtl": "mtl", "image": "baseline", "neural": "v1"}
# Embedded: VGG-19-BN at 64 px trains at ~6 img/s on 2 CPU cores, so a few hundred images, batch 8 (twice the
# optimizer steps of batch 16 at the same cost) and Adam: the recipe's SGD 0.1 needs far more steps than a 3-minute
# budget allows. Ratio 2 gives each of the 2 sessions one neural batch per step (ratio 1 alternates them). The
# readouts get a larger lr (--readout_lr): their positions must travel a fair part of the map, which at 5e-4 per
# Adam step takes thousands of steps, not the 46 of this run.
EMBEDDED = dict(epochs=2, batch_size=8, neural_batch_size=16, ratio="2", lr=5e-4, readout_lr=3e-2, optimizer="adam",
                log_every=8, workers=0, lr_patience=5, es_patience=3, es_rounds=1)
EMBEDDED_TINY = dict(n_classes=5, n_train_per_class=40, n_val_per_class=10)
EMBEDDED_NEURAL = dict(n_sessions=2, n_neurons=24, n_train=480, n_test=100, test_repeats=4, mean_rate=10.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=MODES, default="train", help="train; evaluate a checkpoint (clean / noise / Tiny-ImageNet-C "
      "accuracy, mCE vs --baseline_results, neural correlation and FEVe); predict_targets (a neural-only model's "
      "responses to the Tiny-ImageNet images, written as co-training targets); benchmark (one JSON line)")
    a("--task", choices=TASKS, default="mtl", help="mtl: co-training; image: the image-only baseline; neural: the "
      "single-task V1 model (core + readouts)")
    a("--preset", choices=tuple(PRESETS), default=None, help="recipe (default: mtl, baseline or v1 by --task)")
    settings.add_shared_flags(p, help={"epochs": "maximum; paper 407 (baseline 400, v1 150); embedded 2",
                                       "batch_size": "image batch; paper 128; embedded 8",
                                       "lr": "paper 0.1 (v1 5e-4); embedded 5e-4",
                                       "data_root": "Tiny-ImageNet root (tasks mtl/image, predict_targets, evaluate)"})
    a("--neural_root", default=None, help="neural data: an nnvision folder (neuronal_data/ + images/) or "
      "cadena_ploscb_data.pkl (tasks mtl/neural)")
    a("--c_root", default=None, help="Tiny-ImageNet-C root <corruption>/<1..5>/<wnid>/ (evaluate)")
    a("--cache_root", default=None, help="where embedded synthetic data is written (default runs/mtl_cotraining)")
    a("--checkpoint", default=None, help="evaluate / predict_targets: a best.pt or last.pt written by --mode train")
    a("--baseline_results", default=None, help="evaluate: another evaluate run's results.json (the baseline of mCE)")
    m = p.add_argument_group("model")
    m.add_argument("--head", choices=HEADS, default="conv", help="classifier: conv (the recipe) or dense")
    m.add_argument("--kaiming_last_layer", action="store_true", help="Kaiming fan_out init of the last classifier "
                   "layer, as the original (slug head-init-kaiming); default N(0, 0.01²)")
    o = p.add_argument_group("optimisation (unset: the preset's value)")
    o.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    for name, typ, text in (("momentum", float, "SGD momentum (paper 0.75)"), ("weight_decay", float, "paper 5e-4"),
                            ("lr_factor", float, "ReduceLROnPlateau factor (paper 0.3, baseline 0.4, v1 0.5)"),
                            ("lr_patience", int, "plateau patience in epochs (paper 5)"),
                            ("lr_threshold", float, "plateau relative threshold (paper 1e-4, v1 1e-6)"),
                            ("min_lr", float, "plateau minimum lr (paper 1e-4)"),
                            ("es_patience", int, "early stopping: epochs without improvement per round (paper 5)"),
                            ("es_rounds", int, "early stopping: rounds, each ending with a restore of the best "
                             "weights (paper 5)"),
                            ("neural_batch_size", int, "neural batch (paper 128; embedded 16)"),
                            ("gamma_readout", float, "readout L1 strength (paper 0.5)"),
                            ("workers", int, "image DataLoader workers (paper 8; embedded 0)")):
        o.add_argument(f"--{name}", type=typ, default=None, help=text)
    o.add_argument("--readout_lr", type=float, default=None, help="learning rate of the neural readouts (default "
                   "--lr: the original trains every parameter at one lr; embedded 3e-2, so the readout positions can move "
                   "within a few dozen steps)")
    o.add_argument("--neural_loss", choices=losses.NEURAL_LOSSES, default=None, help="mse (the co-training recipe) or "
                   "poisson (the single-task V1 model; with --loss_weighting on it becomes a negative binomial)")
    o.add_argument("--loss_weighting", choices=("on", "off"), default=None, help="learned likelihood weighting (mtl on)")
    o.add_argument("--scale_loss", choices=("on", "off"), default=None, help="Poisson loss × √(N_train/B) (v1 on)")
    o.add_argument("--ratio", default=None, help="neural batches per image batch: 1, 2, 0.5, or a schedule by "
                   "epoch '1:1,3:2' (paper 1; embedded 2)")
    o.add_argument("--omit_readout_l1", action="store_true", help="leave out the readout L1 penalty, as the original "
                   "silently does without scale_loss (slug readout-l1-omitted)")
    o.add_argument("--decay_loss_weights", action="store_true", help="apply weight decay to the learned loss weights, "
                   "as the original (slug loss-weight-decay)")
    o.add_argument("--original_fraction_ratio", action="store_true", help="fractional --ratio as the original: a "
                   "neural batch when (i+1) mod (1/ratio) == 0, so 0.3 never yields one (slug fraction-ratio)")
    d = p.add_argument_group("data")
    d.add_argument("--split_seed", type=int, default=1000, help="seed of the train/validation splits (the original "
                   "fixes 1000 whatever the model seed)")
    d.add_argument("--neural_crop", type=int, default=None, help="pixels cropped per side (Cadena 30, nnvision 0)")
    d.add_argument("--neural_subsample", type=int, default=None, help="keep every n-th pixel (Cadena 2, nnvision 1)")
    d.add_argument("--neural_scale", type=float, default=1.0, help="rescale factor after crop/subsample")
    s = p.add_argument_group("evaluation, targets, small schedules, benchmark")
    s.add_argument("--corruptions", nargs="+", default=None, help="evaluate: only these Tiny-ImageNet-C corruptions")
    s.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="evaluate: severities")
    s.add_argument("--noise_levels", nargs="+", type=float, default=list(NOISE_LEVELS), help="evaluate: Gaussian "
                   "pixel-noise stds of the robustness curve")
    s.add_argument("--limit_train_batches", type=int, default=None, help="at most N image batches per epoch "
                   "(neural task: cycler items)")
    s.add_argument("--limit_eval_batches", type=int, default=None, help="at most N batches per evaluated set (each "
                   "image set; each session's neural set)")
    s.add_argument("--limit_images", type=int, default=None, help="predict_targets: at most N train and N val images")
    s.add_argument("--bench_batch_size", type=int, default=None, help="benchmark batch (default 128 CUDA, 16 CPU)")
    s.add_argument("--bench_iters", type=int, default=None, help="benchmark timed steps (default 20 CUDA, 3 CPU)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.preset = args.preset or TASK_PRESET[args.task]
    args.embedded = args.data_root is None and args.neural_root is None
    layers = [("paper", PRESETS[args.preset])] + ([("embedded", EMBEDDED)] if args.embedded else [])
    settings.resolve(args, DEFAULTS, *layers)
    settings.check_positive(args, "epochs", "batch_size", "log_every", "neural_batch_size", "es_patience", "es_rounds")
    if args.readout_lr is not None and not args.readout_lr > 0:
        raise UserError(f"--readout_lr must be > 0, got {args.readout_lr}")
    args.ratio_schedule = {k: str(v) for k, v in data.parse_ratio(args.ratio).items()}
    unknown = sorted(set(args.corruptions or ()) - set(datasets.CORRUPTIONS)) + [s for s in args.severities if not 1 <= s <= 5]
    if unknown:
        raise UserError(f"--corruptions/--severities: {unknown} unknown (expected names of {', '.join(datasets.CORRUPTIONS)}"
                        f" and severities 1-5)")
    if args.output_root is None:
        args.output_root = settings.default_output_root(STUDY, args.mode, args.task)
    if args.cache_root is None:
        args.cache_root = settings.default_output_root(STUDY)
    if args.mode == "train" and not args.embedded:
        if args.task in ("mtl", "image") and args.data_root is None:
            raise UserError(f"--task {args.task} needs --data_root (a Tiny-ImageNet root)")
        if args.task in ("mtl", "neural") and args.neural_root is None:
            raise UserError(f"--task {args.task} needs --neural_root (an nnvision folder or cadena_ploscb_data.pkl)")
    return args


# ----------------------------------------------------------------------------- data


def tiny_root(args) -> Path:
    if args.data_root is not None:
        return Path(args.data_root)
    return synthetic.ensure_synthetic(args.cache_root, "tiny_imagenet_5c", lambda p: synthetic.write_tiny_imagenet(
        p, seed=0, **EMBEDDED_TINY))


def neural_sets(args) -> dict:
    root = args.neural_root
    if root is None:
        root = synthetic.ensure_synthetic(args.cache_root, "monkey_v1_sim_{n_sessions}x{n_neurons}_{n_train}_{n_test}_r{mean_rate:g}"
                                          .format(**EMBEDDED_NEURAL),
                                          lambda p: data.simulated_sessions(p, seed=0, **EMBEDDED_NEURAL))
    return data.read_neural(root, args.neural_crop, args.neural_subsample, args.neural_scale, args.split_seed)


def neural_batcher(ds, args, device, train: bool):
    tensors = [ds.images, ds.responses] + ([ds.mask] if ds.mask is not None else [])
    return datasets.TensorBatcher(*tensors, batch_size=args.neural_batch_size if train else 256, shuffle=train,
                                  device=device, seed=args.seed)


def image_loader(ds, args, device, train: bool, epoch: int = 0):
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size if train else max(args.batch_size, 64),
                                       shuffle=train, generator=g, num_workers=args.workers,
                                       pin_memory=device.type == "cuda")


def to_device(x, device):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.ndim == 4 else x


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accuracy(model, ds, args, device, limit=None) -> float:
    """Top-1 accuracy in [0, 1] over a whole image set (or its first `limit` batches)."""
    model.eval()
    correct = n = 0
    for i, (x, y) in enumerate(image_loader(ds, args, device, train=False)):
        if limit is not None and i >= limit:
            break
        with runtime.autocast(device, args.amp):
            logits = model(to_device(x, device), task="image").float()
        correct += metrics.topk_correct(logits, y.to(device), (1,))[1]
        n += len(y)
    return correct / max(n, 1)


@torch.no_grad()
def neural_predictions(model, images, key, device, args) -> torch.Tensor:
    model.eval()
    out = []
    for b in range(0, len(images), args.neural_batch_size):
        x = to_device(data.to_input(images[b:b + args.neural_batch_size]), device)
        with runtime.autocast(device, args.amp):
            out.append(model(x, task="neural", session=key).float().cpu())
    return torch.cat(out)


def neural_scores(model, sets: dict, split: str, device, args) -> dict:
    """Per-neuron Pearson correlation over images (masked where a neuron lacks data), mean over all neurons of all
    sessions; FEVe where the split has repeats (common.metrics conventions). Batches of --neural_batch_size; with
    --limit_eval_batches only the first that many batches of each session."""
    rs, fe, per = [], [], {}
    for key, s in sets.items():
        ds = s[split]
        n = ds.n_images if args.limit_eval_batches is None else min(ds.n_images,
                                                                     args.limit_eval_batches * args.neural_batch_size)
        pred = neural_predictions(model, ds.images[:n], key, device, args)
        r = metrics.masked_corr(pred, ds.responses[:n], None if ds.mask is None else ds.mask[:n])
        rs.append(r)
        per[key] = {"corr": float(np.mean(r))}
        if ds.repeats is not None:
            f = metrics.feve(ds.repeats[:, :n], pred)
            fe.append(f)
            per[key]["feve"] = float(np.nanmean(f)) if np.isfinite(f).any() else None
    allr = np.concatenate(rs)
    out = {"corr": float(np.mean(allr)), "corr_median": float(np.median(allr)), "per_session": per}
    if fe:
        f = np.concatenate(fe)
        out["feve"] = float(np.nanmean(f)) if np.isfinite(f).any() else None
    return out


# ----------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """The original's early stopping (nntransfer `trainer/utils/early_stopping.py`): an epoch improves when the
    monitored score exceeds best + threshold; after `patience` epochs without improvement the best weights are
    restored and the next of `rounds` rounds starts (the lr cut itself comes from the plateau scheduler); after the
    last round training stops. step(score) → "improved" | "wait" | "restore" | "stop"."""

    def __init__(self, patience: int, rounds: int, threshold: float = 0.0):
        self.patience, self.rounds, self.threshold = patience, rounds, threshold
        self.best, self.wait, self.round = -math.inf, 0, 0

    def step(self, score: float) -> str:
        if score > self.best + self.threshold:
            self.best, self.wait = score, 0
            return "improved"
        self.wait += 1
        if self.wait < self.patience:
            return "wait"
        self.wait, self.round = 0, self.round + 1
        return "stop" if self.round >= self.rounds else "restore"

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "round": self.round}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.wait, self.round = float(d["best"]), int(d["wait"]), int(d["round"])


# ----------------------------------------------------------------------------- model construction


def build_model(task, n_classes, sessions, args):
    return MTLVGG(n_classes, sessions, task=task, head=args.head, kaiming_last=args.kaiming_last_layer)


def model_from_checkpoint(path, args):
    """(model, checkpoint) built from the task, classes and sessions recorded in a --mode train checkpoint."""
    ck = checkpoint.load_checkpoint(path)
    meta = ck.get("model_meta")
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {path} has no model_meta (expected a best.pt / last.pt of {STUDY} --mode train)")
    args.head = meta.get("head", args.head)
    model = build_model(meta["task"], int(meta["n_classes"]), meta.get("sessions") or None, args)
    checkpoint.load_model_weights(model, ck)
    return model, ck


def make_optimizer(model, weighting, args):
    readout = list(model.readouts.parameters()) if hasattr(model, "readouts") else []
    ids = {id(q) for q in readout}
    groups = [{"params": [q for q in model.parameters() if id(q) not in ids], "weight_decay": args.weight_decay}]
    if readout:  # one lr for every parameter in the original; --readout_lr lets the readout positions move faster
        groups.append({"params": readout, "weight_decay": args.weight_decay, "lr": args.readout_lr or args.lr})
    if weighting is not None:  # the learned s: no weight decay unless --decay_loss_weights (slug loss-weight-decay)
        groups.append({"params": list(weighting.parameters()),
                       "weight_decay": args.weight_decay if args.decay_loss_weights else 0.0})
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    return torch.optim.Adam(groups, lr=args.lr)


# ----------------------------------------------------------------------------- training


def train(args, device):
    task = args.task
    t_start = time.perf_counter()
    img = nsets = None
    if task in ("mtl", "image"):
        img = data.tiny_imagenet(tiny_root(args), split_seed=args.split_seed)
    if task in ("mtl", "neural"):
        nsets = neural_sets(args)
    n_classes = len(img[3]) if img else 0
    sessions = {k: s["train"].n_neurons for k, s in nsets.items()} if nsets else {}
    rd = checkpoint.RunDir(args.output_root, vars(args), resume=args.resume, overwrite=args.overwrite)
    runtime.seed_everything(args.seed)
    raw = build_model(task, n_classes, sessions, args)
    for k, s in (nsets or {}).items():
        raw.readouts[k].init_bias(s["train"].responses.mean(0))
    raw = raw.to(device)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    run = torch.compile(raw) if args.compile else raw
    tasks = (["img_classification"] if img else []) + (["v1"] if nsets else [])
    weighting = losses.LossWeighting(tasks).to(device) if args.loss_weighting == "on" else None
    optimizer = make_optimizer(raw, weighting, args)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_factor,
                                                           patience=args.lr_patience, threshold=args.lr_threshold,
                                                           min_lr=args.min_lr)
    early = EarlyStopping(args.es_patience, args.es_rounds, args.lr_threshold)
    meta = {"task": task, "n_classes": n_classes, "sessions": sessions, "head": args.head}
    start, step = 1, 0
    state = rd.resume_state()
    if state is not None:
        checkpoint.load_model_weights(raw, state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        early.load_state_dict(state["early_stopping"])
        if weighting is not None:
            weighting.load_state_dict(state["loss_weighting"])
        start, step = int(state["epoch"]), int(state["step"])
        rd.truncate_metrics(lambda r: r.get("epoch", 0) < start)
        print(f"resumed {rd.path / 'last.pt'} at epoch {start}", flush=True)
    print(f"{task}: {count_parameters(raw):,} parameters (shared core {count_parameters(raw.core):,}); "
          f"{n_classes} classes, sessions {sessions}", flush=True)
    neural_train = {k: neural_batcher(s["train"], args, device, True) for k, s in (nsets or {}).items()}
    n_train = {k: s["train"].n_images for k, s in (nsets or {}).items()}
    monitor = "valid_acc" if img else "valid_corr"
    stop = False
    for epoch in range(start, args.epochs + 1):
        if stop:
            break
        runtime.seed_everything(args.seed + 1000 * epoch)  # exact resume: every epoch's randomness from (seed, epoch)
        t0 = time.perf_counter()
        raw.train()
        if img:
            loader = image_loader(img[0], args, device, True, epoch)
            if args.limit_train_batches:
                loader = data.Limited(loader, args.limit_train_batches)
            ratio = data.ratio_for_epoch(data.parse_ratio(args.ratio), epoch)
            cycler = data.MTLCycler(loader, neural_train, ratio if nsets else 0, epoch, args.original_fraction_ratio)
        else:
            cycler = data.LongCycler(neural_train, epoch)
        total = len(cycler) if not (args.limit_train_batches and not img) else min(len(cycler), args.limit_train_batches)
        prog = runtime.Progress(total, args.log_every, unit="img", prefix=f"epoch {epoch}")
        sums = {"ce": 0.0, "n_img": 0, "neural": 0.0, "n_neural": 0, "correct": 0}
        for i, (kind, key, batch, do_step) in enumerate(cycler):
            if i >= total:
                break
            with runtime.autocast(device, args.amp):
                if kind == "image":
                    x, y = to_device(batch[0], device), batch[1].to(device)
                    logits = run(x, task="image")
                    loss, ce = losses.classification_loss(logits, y, weighting)
                    sums["ce"] += ce.item() * len(y)  # plain CE: the original logged the weighted loss (slug logged-loss-weighted)
                    sums["n_img"] += len(y)
                    sums["correct"] += metrics.topk_correct(logits.detach(), y, (1,))[1]
                else:
                    x, r = to_device(data.to_input(batch[0]), device), batch[1]
                    mask = batch[2] if len(batch) > 2 else None
                    pred = run(x, task="neural", session=key)
                    summed = args.neural_loss == "poisson" and weighting is None
                    scale = math.sqrt(n_train[key] / len(r)) if args.scale_loss == "on" else 1.0
                    loss, nl = losses.neural_loss(pred, r, args.neural_loss, weighting, "v1", mask, scale)
                    if not args.omit_readout_l1:
                        loss = loss + losses.readout_penalty(raw.readouts[key], args.gamma_readout, summed, r.numel())
                    sums["neural"] += nl.item()
                    sums["n_neural"] += 1
            if not torch.isfinite(loss):
                print(f"epoch {epoch}: non-finite loss at batch {i}; stopping (as the original)", flush=True)
                stop = True
                break
            loss.backward()  # gradients accumulate over the neural batches and the image batch of one group
            if do_step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            prog.update(len(batch[1]), loss=loss.item(), kind=kind)
        optimizer.zero_grad(set_to_none=True)  # a group cut by --limit_train_batches does not leak into the next epoch
        row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
        if img:
            row.update(train_ce=sums["ce"] / max(sums["n_img"], 1), train_acc=sums["correct"] / max(sums["n_img"], 1),
                       valid_acc=accuracy(raw, img[1], args, device, args.limit_eval_batches))
        if nsets:
            row.update(train_neural_loss=sums["neural"] / max(sums["n_neural"], 1),
                       valid_corr=neural_scores(raw, nsets, "validation", device, args)["corr"])
        if weighting is not None:
            row.update({f"weight_{t}": w for t, w in weighting.weights().items()})
        score = row[monitor]
        scheduler.step(score)
        action = early.step(score)
        row.update(early_stopping=action, epoch_time_s=time.perf_counter() - t0)
        state = checkpoint.training_state(raw, optimizer, scheduler, epoch=epoch + 1, step=step, best_metric=early.best,
                                          args=vars(args), early_stopping=early.state_dict(), model_meta=meta,
                                          loss_weighting=weighting.state_dict() if weighting is not None else {})
        if action == "improved":
            rd.save_best(state)
        elif action in ("restore", "stop") and (rd.path / "best.pt").is_file():
            best = checkpoint.load_checkpoint(rd.path / "best.pt")  # restore the best weights and loss weights
            checkpoint.load_model_weights(raw, best)
            if weighting is not None:
                weighting.load_state_dict(best["loss_weighting"])
            state["model"] = checkpoint.unwrap_model(raw).state_dict()
            state["loss_weighting"] = weighting.state_dict() if weighting is not None else {}
        rd.log(row)
        rd.save("last.pt", state)
        print(f"epoch {epoch} ({row['epoch_time_s']:.1f}s) | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            if k not in ("epoch", "epoch_time_s")), flush=True)
        stop = stop or action == "stop"
    # final evaluation of the best weights on every split
    if (rd.path / "best.pt").is_file():
        best = checkpoint.load_checkpoint(rd.path / "best.pt")
        checkpoint.load_model_weights(raw, best)
    results = {"mode": "train", "task": task, "preset": args.preset, "embedded_data": args.embedded,
               "params_total": count_parameters(raw), "params_shared_core": count_parameters(raw.core),
               "best_epoch_score": early.best, "monitor": monitor, "epochs_run": len(rd.read_metrics())}
    if img:
        results.update(n_classes=n_classes, chance_acc=1 / n_classes,
                       valid_acc=accuracy(raw, img[1], args, device, args.limit_eval_batches),
                       test_acc=accuracy(raw, img[2], args, device, args.limit_eval_batches))
    if nsets:
        results["neural_validation"] = neural_scores(raw, nsets, "validation", device, args)
        results["neural_test"] = neural_scores(raw, nsets, "test", device, args)
    if weighting is not None:
        results["loss_weights"] = weighting.weights()
    results["wall_time_s"] = time.perf_counter() - t_start
    rd.write_results(results)
    training_figures(rd, n_classes)
    summary = {k: results[k] for k in ("task", "test_acc", "chance_acc", "wall_time_s") if k in results}
    if nsets:
        summary.update(test_corr=results["neural_test"]["corr"], test_feve=results["neural_test"].get("feve"))
    print(json.dumps(summary), flush=True)
    return results


def training_figures(rd, n_classes):
    rows = rd.read_metrics()
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    series = [{"label": k, "x": ep, "y": [r[k] for r in rows]} for k in ("train_acc", "valid_acc", "valid_corr")
              if k in rows[0]]
    hl = [(1 / n_classes, "chance")] if n_classes else []
    plots.line_plot(rd.figure_path("learning_curves.png"), series, title="co-training", ylabel="accuracy / correlation",
                    hlines=hl)


# ----------------------------------------------------------------------------- evaluate


def evaluate(args, device):
    """Clean test accuracy, the Gaussian-noise curve, Tiny-ImageNet-C per (corruption, severity), their mean and
    (with --baseline_results) CE / mCE / relative mCE; neural correlation and FEVe on the neural test set."""
    t0 = time.perf_counter()
    root = tiny_root(args) if (args.data_root is not None or args.embedded) else None
    if args.checkpoint is not None:
        model, _ = model_from_checkpoint(args.checkpoint, args)
    elif args.embedded:
        print("no --checkpoint: evaluating a randomly initialised MTL model (embedded demo)", flush=True)
        runtime.seed_everything(args.seed)
        model = build_model("mtl", len(datasets.read_wnids(root)),
                            {k: s["train"].n_neurons for k, s in neural_sets(args).items()}, args)
    else:
        raise UserError("--mode evaluate needs --checkpoint (a best.pt of --mode train)")
    baseline = None
    if args.baseline_results is not None:
        bp = Path(args.baseline_results)
        try:
            baseline = json.loads(bp.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--baseline_results {bp}: not a readable results.json ({e})") from None
        if not isinstance(baseline, dict) or "c_table" not in baseline or "clean_acc" not in baseline:
            raise UserError(f"--baseline_results {bp}: expected the results.json of an evaluate run "
                            f"(keys c_table, clean_acc)")
    rd = checkpoint.RunDir(args.output_root, vars(args), resume=False, overwrite=args.overwrite)
    model = model.to(device)
    task = model.task
    res = {"mode": "evaluate", "checkpoint": args.checkpoint, "task": task}
    if task in ("mtl", "image"):
        if root is None:
            raise UserError(f"evaluating a {task} model needs --data_root (Tiny-ImageNet)")
        classes = datasets.read_wnids(root)
        if len(classes) != model.n_classes:
            raise UserError(f"{root} has {len(classes)} classes but the checkpoint's head has {model.n_classes}")
        lim = args.limit_eval_batches
        res["clean_acc"] = accuracy(model, data.tiny_test(root), args, device, lim)
        print(f"clean test accuracy {res['clean_acc']:.4f}", flush=True)
        curve = []
        for std in args.noise_levels:
            runtime.seed_everything(args.seed + int(std * 1e4))  # the same noise for every model
            curve.append(accuracy(model, data.tiny_test(root, std), args, device, lim))
            print(f"gaussian noise std {std:g}: accuracy {curve[-1]:.4f}", flush=True)
        res["noise_levels"], res["noise_acc"] = list(args.noise_levels), curve
        c_root = args.c_root
        if c_root is None and args.embedded:
            names = tuple(args.corruptions or datasets.CORRUPTIONS)  # write only what is evaluated (cached per choice)
            tag = "" if names == datasets.CORRUPTIONS else "_" + "-".join(names)
            c_root = synthetic.ensure_synthetic(args.cache_root, f"tiny_imagenet_5c_C{tag}", lambda p: synthetic.write_tiny_imagenet_c(
                p, root, corruptions=names, max_per_class=2, seed=0))
        if c_root is not None:
            rows = []
            for c, s, ds in data.tiny_c(c_root, classes, args.corruptions, tuple(args.severities)):
                runtime.seed_everything(args.seed)
                rows.append((c, s, accuracy(model, ds, args, device, lim)))
                rd.log({"corruption": c, "severity": s, "accuracy": rows[-1][2]})
                print(f"{c} severity {s}: accuracy {rows[-1][2]:.4f}", flush=True)
            table = metrics.corruption_table(rows)
            res["c_table"] = table
            res["mean_corrupted_acc"] = metrics.mean_corrupted_accuracy(table)
            if baseline is not None:
                base = {c: {int(s): a for s, a in v.items()} for c, v in baseline["c_table"].items()}
                try:
                    res["corruption_errors"] = metrics.corruption_errors(table, base)
                    res["mce"] = metrics.mce(table, base)
                    res["relative_mce"] = metrics.relative_mce(table, res["clean_acc"], base, baseline["clean_acc"])
                except ValueError as e:
                    raise UserError(f"--baseline_results {args.baseline_results}: {e}") from None
            evaluation_figures(rd, res, baseline)
    if task in ("mtl", "neural") and (args.neural_root is not None or args.embedded):
        res["neural_test"] = neural_scores(model, neural_sets(args), "test", device, args)
    res["wall_time_s"] = time.perf_counter() - t0
    rd.write_results(res)
    print(json.dumps({k: res.get(k) for k in ("clean_acc", "mean_corrupted_acc", "mce", "relative_mce")}
                     | ({"test_corr": res["neural_test"]["corr"]} if "neural_test" in res else {})), flush=True)
    return res


def evaluation_figures(rd, res, baseline):
    cs = list(res["c_table"])
    mean = lambda t: [float(np.mean(list(t[c].values()))) for c in cs]  # noqa: E731
    series = [{"label": "this model", "values": mean(res["c_table"])}]
    if baseline is not None:
        series.append({"label": "baseline", "values": mean({c: baseline["c_table"][c] for c in cs})})
    plots.bar_chart(rd.figure_path("corruption_accuracy.png"), cs, series, title="Tiny-ImageNet-C accuracy (mean over "
                    "severities)", ylabel="accuracy")
    curves = [{"label": "this model", "x": res["noise_levels"], "y": res["noise_acc"]}]
    if baseline is not None and "noise_acc" in baseline:
        curves.append({"label": "baseline", "x": baseline["noise_levels"], "y": baseline["noise_acc"]})
    plots.line_plot(rd.figure_path("noise_robustness.png"), curves, title="Gaussian pixel noise", xlabel="noise std",
                    ylabel="accuracy")


# ----------------------------------------------------------------------------- predict_targets


@torch.no_grad()
def predict_targets(args, device):
    """The co-training targets (paper §3, "MTL-Monkey"): a trained neural-only model's predicted responses to the
    Tiny-ImageNet images, written as an nnvision folder (images/ + one neuronal_data/ pickle per readout session)
    that `--neural_root` reads. Train images → training trials, the official val images → testing trials; each
    prediction is spread evenly over the 12 summed time bins."""
    root = tiny_root(args)
    if args.checkpoint is not None:
        model, _ = model_from_checkpoint(args.checkpoint, args)
    elif args.embedded:
        print("no --checkpoint: targets of a randomly initialised neural model (embedded demo)", flush=True)
        runtime.seed_everything(args.seed)
        model = build_model("neural", 0, {k: s["train"].n_neurons for k, s in neural_sets(args).items()}, args)
    else:
        raise UserError("--mode predict_targets needs --checkpoint (a neural or mtl model of --mode train)")
    if not hasattr(model, "readouts"):
        raise UserError(f"checkpoint {args.checkpoint} is an image-only model; it has no neural readouts")
    rd = checkpoint.RunDir(args.output_root, vars(args), resume=False, overwrite=args.overwrite)
    model = model.to(device).eval()
    evalt = data.tiny_transforms(False)
    splits = []
    for split in ("train", "val"):
        ds = datasets.TinyImageNet(root, split, evalt)
        n = len(ds) if args.limit_images is None else min(args.limit_images, len(ds))
        splits.append(torch.stack([ds[i][0] for i in range(n)]))
    x = torch.cat(splits)  # normalised grayscale, N × 1 × 64 × 64
    u8 = ((x[:, 0] * data.STD + data.MEAN).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    inp = data.to_input(torch.from_numpy(u8)[:, None])  # exactly what the reader will feed back
    ids = np.arange(1, len(u8) + 1)
    n_tr = len(splits[0])
    sessions = []
    for key in model.readouts:
        preds = torch.cat([model(to_device(inp[b:b + 256], device), task="neural", session=key).float().cpu()
                           for b in range(0, len(inp), 256)]).numpy()  # images × neurons
        bins = np.repeat((preds.T / data.TIME_BINS)[:, None, :], data.TIME_BINS, axis=1).astype(np.float32)
        sessions.append({"session_id": key, "training_responses": bins[:, :, :n_tr], "testing_responses": bins[:, :, n_tr:],
                         "training_image_ids": ids[:n_tr], "testing_image_ids": ids[n_tr:]})
    data.write_sessions(rd.path, u8, sessions)
    res = {"mode": "predict_targets", "checkpoint": args.checkpoint, "sessions": list(model.readouts),
           "n_train_images": n_tr, "n_test_images": len(u8) - n_tr, "folder": str(rd.path)}
    rd.write_results(res)
    print(f"wrote co-training targets for {len(sessions)} session(s), {len(u8)} images, to {rd.path} "
          f"(use it as --neural_root)", flush=True)
    return res


# ----------------------------------------------------------------------------- benchmark


def benchmark(args, device):
    """One JSON line: training images/s of an MTL step (k neural batches + one image batch, one optimizer step) and
    of an image-only step, measured in the same run on synthetic tensors, and their ratio."""
    cuda = device.type == "cuda"
    bs = args.bench_batch_size or (128 if cuda else 16)
    iters, warmup = args.bench_iters or (20 if cuda else 3), 5 if cuda else 1
    k = data.ratio_for_epoch(data.parse_ratio(args.ratio), 1)
    runtime.seed_everything(args.seed)
    res = {"mode": "benchmark", "device": str(device), "batch_size": bs, "neural_batch_size": bs, "ratio": str(k),
           "image_size": 64, "iters": iters, "amp": args.amp if cuda else "off", "compile": args.compile}
    def measure(task):  # one model at a time: its memory is freed on return
        runtime.reset_peak_memory(device)
        model = build_model(task, 200, {"s1": 100} if task == "mtl" else None, args).to(device)
        model = model.to(memory_format=torch.channels_last) if cuda else model
        run = torch.compile(model) if args.compile else model
        weighting = losses.LossWeighting(["img_classification", "v1"]).to(device)
        opt = make_optimizer(model, weighting, args)
        x = torch.randn(bs, 1, 64, 64, device=device)
        y = torch.randint(0, 200, (bs,), device=device)
        r = torch.rand(bs, 100, device=device) * 4
        plan = data.neural_counts(iters + warmup, k) if task == "mtl" else [0] * (iters + warmup)
        it = iter(plan)

        def step():
            for _ in range(next(it)):
                with runtime.autocast(device, args.amp):
                    loss = losses.neural_loss(run(x, task="neural", session="s1"), r, "mse", weighting)[0]
                loss.backward()
            with runtime.autocast(device, args.amp):
                loss = losses.classification_loss(run(x, task="image"), y, weighting)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = runtime.time_fn(step, device, warmup=warmup, iters=iters)
        res[f"{task}_image_batches_per_s"] = round(1 / sec, 4)
        res[f"{task}_images_per_s"] = round(bs / sec, 2)
        res[f"{task}_peak_mem_mb"] = round(runtime.peak_memory_mb(device), 1)
        if task == "mtl":  # neural batches run in the timed steps (after the warm-up steps)
            res["mtl_neural_batches_per_image_batch"] = round(sum(plan[warmup:]) / iters, 3)
            res["mtl_all_images_per_s"] = round(bs * (1 + sum(plan[warmup:]) / iters) / sec, 2)
    for task in ("mtl", "image"):
        measure(task)
    res["mtl_vs_image_throughput_ratio"] = round(res["mtl_images_per_s"] / res["image_images_per_s"], 3)
    res["peak_mem_kind"] = "cuda max_memory_allocated" if cuda else "process peak RSS (VmHWM)"
    print(json.dumps(res), flush=True)
    return res


def main(argv=None):
    args = parse_args(argv)
    settings.print_settings(args)
    runtime.set_threads(args.threads)
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    return {"train": train, "evaluate": evaluate, "predict_targets": predict_targets,
            "benchmark": benchmark}[args.mode](args, device)


if __name__ == "__main__":
    runtime.run_cli(main)
