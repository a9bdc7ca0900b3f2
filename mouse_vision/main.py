"""Train / benchmark the mouse visual cortex models of Nayebi, Kong et al. (PLOS CB 2023), "Mouse visual cortex as a
limited resource system that self-learns an ecologically-general representation"; neural predictivity modes
(convert, neural_fit, --bench neural_fit) come from mouse_vision/neural_fit.py.

Usage (from the repo root or from inside mouse_vision/):

  # embedded default: alexnet_bn + Instance Recognition on a synthetic 10-class image tree, 5 short epochs
  python mouse_vision/main.py --mode train

  # one GPU, a released recipe on ImageNet (64x64 inputs; bf16 autocast, channels_last)
  python mouse_vision/main.py --mode train --config alexnet_bn_ir --data_root /data/imagenet
  # any architecture x any objective, recipe of the objective, flags override
  python mouse_vision/main.py --mode train --arch shi_mousenet --loss simsiam --data_root /data/imagenet --lr 0.05

  # N GPUs (DDP; --batch_size is per process: the release's 256 / 4096 / 512 are global batch sizes)
  torchrun --nproc_per_node=8 mouse_vision/main.py --mode train --config six_stream_simclr \
      --data_root /data/imagenet --batch_size 512

  # training throughput of an arch x loss against alexnet_bn + supervised cross-entropy (one JSON line)
  python mouse_vision/main.py --mode benchmark --arch dual_stream --loss ir

Run folder (--output_root, default runs/mouse_vision/<mode>): args.json, metrics.csv/jsonl (one row per
epoch: loss, lr, monitor accuracy), last.pt (exact --resume: backbone, heads, IR memory bank / MoCo queue,
optimizer), best.pt (best monitor), results.json, figures/. The backbone weights sit under `model` with the
release's names, so `--model_path runs/.../best.pt` works wherever a released checkpoint does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from common import checkpoint, datasets, plots, runtime, settings, synthetic  # noqa: E402
from common.runtime import UserError  # noqa: E402
from mouse_vision import data as mvdata  # noqa: E402
from mouse_vision.losses import LOSSES, build_objective, ddp_ignored  # noqa: E402
from mouse_vision.models import ARCHS, build_model, count_parameters, load_model_path  # noqa: E402

try:
    from mouse_vision import neural_fit  # noqa: E402
except ImportError:
    neural_fit = None

MODES = ("train", "benchmark", "convert", "neural_fit")

# Per-objective recipes (release `model_training/configs/`): global batch size, optimizer, lr, schedule, epochs.
RECIPES = {
    "ir": dict(batch_size=256, optimizer="sgd", lr=0.003, weight_decay=5e-4, schedule="steps", milestones=[120, 160], epochs=200),
    "simclr": dict(batch_size=4096, optimizer="lars", lr=4.8, weight_decay=1e-6, schedule="warmup_cosine",
                   warmup_epochs=10, epochs=200),
    "simsiam": dict(batch_size=512, optimizer="sgd", lr=0.1, weight_decay=1e-4, schedule="cosine", epochs=100),
    "mocov2": dict(batch_size=512, optimizer="sgd", lr=0.06, weight_decay=5e-4, schedule="cosine", epochs=200),
    "rotnet": dict(batch_size=192, optimizer="sgd", lr=0.01, weight_decay=5e-4, nesterov=True, schedule="steps",
                   milestones=[15, 30, 45, 50], epochs=50),
    "supervised": dict(batch_size=256, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="steps", milestones=[30, 60, 90], epochs=100),
    "ae": dict(batch_size=256, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="steps", milestones=[30, 60, 90], epochs=100),
    # no trainer/config in the release for these: the kit's choices (README)
    "barlow": dict(batch_size=512, optimizer="sgd", lr=0.05, weight_decay=1e-4, schedule="cosine", epochs=100),
    "vicreg": dict(batch_size=512, optimizer="sgd", lr=0.05, weight_decay=1e-4, schedule="cosine", epochs=100),
    "relloc": dict(batch_size=256, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="steps", milestones=[30, 60, 90], epochs=100),
    "depth": dict(batch_size=256, optimizer="sgd", lr=0.01, weight_decay=5e-4, schedule="steps", milestones=[30, 60, 90], epochs=100),
}
# --config presets: the released models' recipes. The release has no IR config for the Shi models: they follow
# alexnet_bn_ir's (README).
CONFIGS = {f"{a}_{l}": dict(arch=a, loss=l) for a in ARCHS for l in LOSSES}
for _a in ("dual_stream", "six_stream"):
    CONFIGS[f"{_a}_ir"]["lr"] = 0.03
DEFAULTS = dict(arch="alexnet_bn", loss="ir", epochs=200, batch_size=256, lr=0.003, optimizer="sgd", momentum=0.9,
                weight_decay=5e-4, nesterov=False, schedule="steps", milestones=[120, 160], gamma=0.1,
                warmup_epochs=0, crop_size=224, num_workers=8, log_every=100, monitor_images=10000, n_noise=4096)
# Embedded: a 10-class synthetic tree of 200 64-px images (so the crop is 64 px), a few short epochs. With only
# N = 200 bank entries the release's m = 4096 noise draws would hold each positive ~20 times (it is not excluded)
# and push it away: m = 64 keeps m/N < 1 as on ImageNet (4096/1.28M).
EMBEDDED = dict(epochs=3, batch_size=32, crop_size=64, num_workers=0, log_every=3, milestones=[2], warmup_epochs=1,
                monitor_images=200, n_noise=64)
# IR only (slug ir-embedded-lr): at init the embeddings of a random alexnet_bn share a common direction (mean
# pairwise cosine 0.34, from the ReLU outputs), above the fixed-Z saturation point v·m > τ·ln(2.245·m) = 0.35 at
# m = 64, so each noise term pushes with ~1/τ and the summed push is the same direction −(bank mean) for every
# image. At the release's lr 0.003 one SGD step moves all embeddings onto that one direction (mean cosine 0.34 →
# 0.98; measured on the embedded images), the bank fills with it and the NCE value climbs (15.9 → 102 → 272 over
# three epochs) while the nearest-bank accuracy sits at chance. ImageNet-length training outgrows this phase; a
# 3-minute run cannot, so the embedded IR run takes lr 1e-5 (no step), batch 16 (more, smaller steps), 5 epochs.
EMBEDDED_IR = dict(lr=1e-5, batch_size=16, epochs=5, schedule="constant")
EMBEDDED_LR = {"supervised": 0.03, "rotnet": 0.03, "ae": 0.03, "relloc": 0.03, "depth": 0.03}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=MODES, default="train", help="train a model, benchmark (one JSON line), convert (neural "
      "data pickle → HDF5) or neural_fit (neural predictivity); the last two from neural_fit.py")
    a("--config", choices=sorted(CONFIGS), default=None, help="a released model's recipe: arch + loss + optimizer, "
      "schedule, batch size, epochs (e.g. alexnet_bn_ir, dual_stream_ir, six_stream_simclr, shi_mousenet_ir, "
      "shi_mousenet_vispor5_ir); any flag overrides it")
    a("--arch", default=None, help=f"architecture: {', '.join(ARCHS)} (default alexnet_bn, or the --config's); "
      "neural_fit also takes torchvision:<name>")
    a("--loss", choices=LOSSES, default=None, help="training objective (default ir, or the --config's)")
    a("--model_path", default=None, help="a released-style checkpoint (model_state_dict / state_dict / model, "
      "optional module. prefix): training warm-starts the backbone from it")
    a("--optimizer", choices=("sgd", "lars"), default=None, help="SGD with momentum, or LARS (SimCLR)")
    a("--momentum", type=float, default=None, help="momentum (0.9)")
    a("--weight_decay", type=float, default=None, help="weight decay (recipe: 5e-4 IR, 1e-6 SimCLR, ...)")
    a("--nesterov", type=int, choices=(0, 1), default=None, help="Nesterov momentum (1 for RotNet)")
    a("--schedule", choices=("steps", "cosine", "warmup_cosine", "constant"), default=None,
      help="lr per epoch: steps (×gamma at --milestones), cosine, warmup_cosine (linear warm-up from 1e-4·lr over "
      "--warmup_epochs, then cosine to 0), constant")
    a("--milestones", type=int, nargs="+", default=None, help="epochs of the ×gamma steps (IR 120 160)")
    a("--gamma", type=float, default=None, help="step factor (0.1)")
    a("--warmup_epochs", type=int, default=None, help="warm-up epochs of warmup_cosine (SimCLR 10)")
    a("--cosine_offset", choices=("kit", "release"), default="kit", help="cosine position of epoch e: kit = e/E "
      "(first epoch at the full lr); release = (e+1)/E (slug cosine-last-epoch-zero: the last epoch runs at lr 0)")
    a("--lars_eta", type=float, default=1e-3, help="LARS trust coefficient η")
    a("--lars_exclude", choices=("bn_and_bias", "release_names"), default="bn_and_bias",
      help="parameters LARS and weight decay skip: every BatchNorm parameter and bias (the intent); release_names "
      "(slug lars-bn-exclusion) matches by name only the neck's bn0/bn1 and biases, so backbone BN weights are "
      "LARS-scaled and decayed as released")
    a("--loss_batch_divisor", type=float, default=None, help="Barlow Twins / VICReg: divide by this batch size "
      "instead of the actual global batch (slug fixed-batch-divisor: the release used its configured 2048)")
    a("--head_dim", type=int, default=None, help="override the heads' hidden width (SimCLR/MoCo 2048, SimSiam 2048, "
      "Barlow/VICReg 8192 per layer) — smaller heads for smoke runs")
    a("--queue_size", type=int, default=None, help="MoCo v2 queue length (65536)")
    a("--n_noise", type=int, default=None, help="IR noise samples per image (4096)")
    a("--sync_bn", action="store_true", help="under torchrun on CUDA, BatchNorm statistics over all processes "
      "(SyncBatchNorm, as the release trained six_stream_simclr; same state-dict keys)")
    a("--crop_size", type=int, default=None, help="augmentation crop before the resize to 64 px (224; embedded 64)")
    a("--num_workers", type=int, default=None, help="DataLoader workers (8; embedded 0)")
    a("--monitor_images", type=int, default=None, help="kNN monitor: training images embedded as the reference set "
      "(10000; IR uses its memory bank instead)")
    a("--cache_root", default=None, help="where the embedded synthetic data is written (default: --output_root)")
    small = p.add_argument_group("small-schedule flags (tests, smoke runs)")
    small.add_argument("--limit_train_batches", type=int, default=None, help="at most N training batches per epoch")
    small.add_argument("--limit_val_batches", type=int, default=None, help="at most N monitor batches per process")
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--bench", choices=("train", "neural_fit"), default="train", help="train: training images/s of "
                       "--arch × --loss and of alexnet_bn × supervised in the same run; neural_fit: neural_fit.py's")
    bench.add_argument("--bench_batch_size", type=int, default=None, help="benchmark batch (256 on CUDA, 16 on CPU)")
    bench.add_argument("--bench_iters", type=int, default=None, help="timed steps (20 on CUDA, 3 on CPU)")
    settings.add_shared_flags(p, help={"epochs": "recipe: IR 200, SimSiam 100, ...; embedded 3 (IR 5)",
                                       "batch_size": "recipe: IR 256, SimCLR 4096, ...; embedded 32 (IR 16)",
                                       "lr": "recipe: alexnet_bn_ir 0.003, dual/six IR 0.03, SimCLR 4.8, ...; embedded IR 1e-5",
                                       "log_every": "100; embedded 3"})
    if neural_fit is not None:
        neural_fit.add_args(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.output_root is None:
        args.output_root = settings.default_output_root("mouse_vision", args.mode)
    if args.cache_root is None:
        args.cache_root = args.output_root
    return args


def resolve_training(args):
    """defaults → the objective's recipe and the --config preset ("paper") → the embedded schedule → flags."""
    preset = dict(CONFIGS[args.config]) if args.config else {}
    loss = args.loss or preset.get("loss", DEFAULTS["loss"])
    paper = {**RECIPES[loss], **preset, "loss": loss}
    layers = [("paper", paper)]
    args.embedded = args.data_root is None
    if args.embedded:
        layers.append(("embedded", {**EMBEDDED, **({"lr": EMBEDDED_LR[loss]} if loss in EMBEDDED_LR else {}),
                                    **(EMBEDDED_IR if loss == "ir" else {})}))
    settings.resolve(args, DEFAULTS, *layers)
    if args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch!r} cannot be trained here; expected one of {', '.join(ARCHS)}")
    args.nesterov = bool(args.nesterov)
    settings.check_positive(args, "epochs", "batch_size", "log_every", "crop_size", "monitor_images")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")


# ----------------------------------------------------------------------------- optimisation


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the release's SimCLR: for parameters in a `lars` group the update is
    lr · η‖w‖/(‖g‖ + wd‖w‖) · (g + wd·w), accumulated in a momentum buffer; excluded groups take plain momentum
    SGD without weight decay."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    wn, gn = p.norm(), d.norm()
                    trust = torch.where((wn > 0) & (gn > 0), g["eta"] * wn / (gn + g["weight_decay"] * wn),
                                        torch.ones_like(wn))
                    d = (d + g["weight_decay"] * p) * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(g["momentum"]).add_(d, alpha=g["lr"])
                p.sub_(buf)


def make_optimizer(trainee, args):
    named = [(n, p) for n, p in trainee.named_parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD([p for _, p in named], lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, nesterov=args.nesterov)
    norm_params = {id(p) for m in trainee.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                   for p in m.parameters()}
    if args.lars_exclude == "release_names":  # slug lars-bn-exclusion: the release's name match
        skip = lambda n, p: n.endswith(".bias") or ".bn0." in n or ".bn1." in n  # noqa: E731
    else:
        skip = lambda n, p: n.endswith(".bias") or id(p) in norm_params  # noqa: E731
    groups = [dict(params=[p for n, p in named if not skip(n, p)]),
              dict(params=[p for n, p in named if skip(n, p)], lars=False, weight_decay=0.0)]
    return LARS(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, eta=args.lars_eta)


def lr_at(args, epoch: int) -> float:
    """The learning rate of epoch `epoch` (set once per epoch, as the release does)."""
    E, W = args.epochs, args.warmup_epochs or 0
    pos = (epoch + 1) if args.cosine_offset == "release" else epoch  # slug cosine-last-epoch-zero
    if args.schedule == "steps":
        return args.lr * args.gamma ** sum(epoch >= m for m in args.milestones)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * pos / E))
    if args.schedule == "warmup_cosine":
        if epoch < W:
            return args.lr * (1e-4 + (1 - 1e-4) * epoch / W)
        return args.lr * 0.5 * (1 + math.cos(math.pi * (pos - W) / max(E - W, 1)))
    return args.lr


# ----------------------------------------------------------------------------- model + objective


class Trainee(nn.Module):
    """Backbone and objective in one module, so DDP averages the heads' gradients too."""

    def __init__(self, backbone, objective):
        super().__init__()
        self.backbone, self.objective = backbone, objective

    def forward(self, views, labels, index):
        return self.objective(self.backbone, views, labels, index)


def objective_kwargs(args) -> dict:
    h = args.head_dim
    kw = {"ir": dict(n_noise=args.n_noise), "simclr": dict(hidden=h), "mocov2": dict(hidden=h, queue_size=args.queue_size),
          "simsiam": dict(dim=h, pred_dim=h and max(h // 4, 1)), "barlow": dict(dims=h and (h, h, h), divisor=args.loss_batch_divisor),
          "vicreg": dict(dims=h and (h, h, h), divisor=args.loss_batch_divisor), "relloc": dict(hidden=h, crop=args.crop_size)}
    return kw.get(args.loss, {})


def prepare(trainee, args, device, dist):
    trainee = trainee.to(device)
    if device.type == "cuda":
        trainee.backbone.to(memory_format=torch.channels_last)
    run = trainee
    if args.sync_bn and dist.enabled and device.type == "cuda":
        # BN children replaced in place; MoCo's key encoder keeps per-process BN (its shuffle-BN needs that)
        for name, child in [("backbone", trainee.backbone), *trainee.objective.named_children()]:
            if not name.startswith("key_"):
                nn.SyncBatchNorm.convert_sync_batchnorm(child)
    elif args.sync_bn and dist.is_main:
        print("note: --sync_bn needs torchrun on CUDA; using per-process BatchNorm", flush=True)
    if dist.enabled:
        # the IR bank / MoCo queue are updated identically on every rank from gathered values: not broadcast
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainee, ddp_ignored(trainee.objective))
        run = nn.parallel.DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run = torch.compile(run)
    return run


def to_device(batch, device):
    views, labels, index = batch
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    views = [v.to(device, non_blocking=True).contiguous(memory_format=cl) for v in views]
    return views, labels.to(device, non_blocking=True), index.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- data


def open_data(args, dist):
    """(train Views, monitor reference Views, held-out Views, root) for the objective's pipeline."""
    pipe = mvdata.PIPELINE_OF[args.loss]
    if args.loss == "depth":
        root = args.data_root or synthetic.ensure_synthetic(args.cache_root, "depth_pairs", mvdata.write_depth_pairs)
        train = mvdata.DepthPairs(root, "train", train=True, crop=args.crop_size)
        return train, None, mvdata.DepthPairs(root, "val", train=False, crop=args.crop_size), root
    if args.data_root is None:
        root = synthetic.ensure_synthetic(args.cache_root, "tiny_imagenet_10x20", lambda p: synthetic.write_tiny_imagenet(
            p, n_classes=10, n_train_per_class=20, n_val_per_class=10, seed=0))
    else:
        root = args.data_root
    base_train, base_val = mvdata.open_images(root, "train"), mvdata.open_images(root, "val")
    if base_val.classes != base_train.classes:
        raise UserError(f"{root}: val classes differ from train classes")
    ev = mvdata.eval_transform(args.crop_size)
    train = mvdata.Views(base_train, mvdata.pipelines(pipe, args.crop_size))
    return train, mvdata.Views(base_train, [ev]), mvdata.Views(base_val, [ev]), root


# ----------------------------------------------------------------------------- monitor


@torch.no_grad()
def embed(model_fn, loader, device, args, limit=None, head=None):
    """L2-normalised model_fn outputs and labels of a loader; with `head`, also normalised head(outputs) from the
    same forward pass (IR's monitor needs both and pays for one backbone pass)."""
    feats, heads, labels = [], [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        views, y, _ = to_device(batch, device)
        with runtime.autocast(device, args.amp):
            f = model_fn(views[0])
            feats.append(F.normalize(f.float(), dim=1))
            if head is not None:
                heads.append(head(f).float())
        labels.append(y)
    out = (torch.cat(feats), torch.cat(labels))
    return (*out, torch.cat(heads)) if head is not None else out


@torch.no_grad()
def monitor(trainee, ref_ds, val_ds, args, device, dist):
    """A cheap representation check on held-out images: `monitor_acc` = 1-nearest-neighbour (cosine) accuracy of
    backbone outputs, the reference set being the first --monitor_images training images (eval transform); IR
    also reports `monitor_bank_acc`, the label of the nearest memory-bank entry (the release's IR validation; it
    needs an epoch or more before the bank holds trained embeddings). Depth: held-out 0.5·MSE. Exact under
    torchrun (held-out images sharded, counts summed)."""
    trainee.eval()
    val_loader = datasets.epoch_loader(val_ds, args, dist, device, train=False)
    try:
        if args.loss == "depth":
            total, n = 0.0, 0
            for i, batch in enumerate(val_loader):
                if args.limit_val_batches is not None and i >= args.limit_val_batches:
                    break
                views, depth, index = to_device(batch, device)
                with runtime.autocast(device, args.amp):
                    loss, _ = trainee(views, depth, index)
                total, n = total + loss.item() * len(depth), n + len(depth)
            s, c = runtime.all_reduce_sum([total, n], dist, device)
            return {"monitor_depth_loss": s / max(c, 1)}
        out = {}
        if args.loss == "ir":  # the release's IR validation: label of the nearest memory-bank entry
            obj = trainee.objective
            v, y, e = embed(trainee.backbone, val_loader, device, args, args.limit_val_batches, head=obj.embed)
            pred = torch.as_tensor(ref_ds.targets, device=device)[(e @ obj.bank.float().t()).argmax(1)]
            correct, n = runtime.all_reduce_sum([(pred == y).sum().item(), len(y)], dist, device)
            out["monitor_bank_acc"] = correct / max(n, 1)
        else:
            v, y = embed(trainee.backbone, val_loader, device, args, args.limit_val_batches)
        n_ref = min(args.monitor_images, len(ref_ds))
        ref_loader = DataLoader(Subset(ref_ds, range(n_ref)), batch_size=args.batch_size, num_workers=args.num_workers)
        ref, ref_y = embed(trainee.backbone, ref_loader, device, args)
        pred = ref_y[(v @ ref.float().t()).argmax(1)]
        correct, n = runtime.all_reduce_sum([(pred == y).sum().item(), len(y)], dist, device)
        return {"monitor_acc": correct / max(n, 1), **out, "monitor_n": int(n)}
    finally:
        trainee.train()


# ----------------------------------------------------------------------------- training


def train(args):
    resolve_training(args)
    runtime.set_threads(args.threads)
    dist = runtime.setup_distributed(args.device)
    try:
        device = runtime.dist_device(dist, args.device)
        runtime.setup_cuda_speed(device)
        if dist.is_main:
            settings.print_settings(args)
        return fit(args, dist, device)
    finally:
        runtime.cleanup_distributed(dist)


def fit(args, dist, device):
    train_ds, ref_ds, val_ds, root = open_data(args, dist)
    n_classes = len(train_ds.classes)
    runtime.seed_everything(args.seed)
    backbone = build_model(args.arch)
    if args.model_path is not None:
        load_model_path(backbone, args.model_path)
    objective = build_objective(args.loss, backbone, len(train_ds), n_classes, **objective_kwargs(args))
    trainee = Trainee(backbone, objective)
    rd = checkpoint.open_run_dir(args, dist)
    run = prepare(trainee, args, device, dist)
    optimizer = make_optimizer(trainee, args)
    start_epoch, step, best = 0, 0, None
    higher_better = args.loss != "depth"
    state = rd.resume_state() if args.resume else None
    if state is not None:
        old = state.get("args", {})
        if (old.get("arch"), old.get("loss")) != (args.arch, args.loss):
            raise UserError(f"{args.output_root}/last.pt is a {old.get('arch')} × {old.get('loss')} run; pass the "
                            f"same --arch/--loss (or --config) to resume it")
        trainee.backbone.load_state_dict(state["model"])
        trainee.objective.load_state_dict(state["loss_state"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_metric"]
        rd.truncate_metrics(lambda r: r.get("epoch", -1) < start_epoch)
        if dist.is_main:
            print(f"resuming {args.output_root} at epoch {start_epoch}", flush=True)
    total, trainable = count_parameters(backbone)
    chance = 1 / n_classes if higher_better else None
    if dist.is_main:
        print(f"train {args.arch} × {args.loss} on {root}: {len(train_ds)} train / {len(val_ds)} held-out images, "
              f"{n_classes} classes, backbone {total:,} parameters ({trainable:,} trainable), heads "
              f"{sum(p.numel() for p in objective.parameters() if p.requires_grad):,}, device {device}, world size "
              f"{dist.world_size}", flush=True)
    t_start = time.perf_counter()
    row = {}
    for epoch in range(start_epoch, args.epochs):
        runtime.seed_everything(args.seed + 1000 * epoch + dist.rank)  # resume at an epoch == never stopping
        lr = lr_at(args, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loader = datasets.epoch_loader(train_ds, args, dist, device, train=True, epoch=epoch, drop_last=True)
        n_batches = min(len(loader), args.limit_train_batches or len(loader))
        if n_batches == 0:
            raise UserError(f"{root}: {len(train_ds)} training images give no full batch of {args.batch_size} per process")
        progress = runtime.Progress(n_batches, args.log_every, prefix=f"epoch {epoch}", enabled=dist.is_main)
        run.train()
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            views, labels, index = to_device(batch, device)
            with runtime.autocast(device, args.amp):
                loss, stats = run(views, labels, index)
            if not torch.isfinite(loss):
                raise UserError(f"the {args.loss} loss became {loss.item()} at epoch {epoch} step {i} (lr {lr:g}); "
                                f"lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trainee.objective.after_step() if hasattr(trainee.objective, "after_step") else None
            loss_sum, seen, step = loss_sum + loss.item() * len(index), seen + len(index), step + 1
            progress.update(len(index) * dist.world_size, loss=loss.item(), **stats)
        tot, cnt = runtime.all_reduce_sum([loss_sum, seen], dist, device)
        mon = monitor(trainee, ref_ds, val_ds, args, device, dist)
        row = {"epoch": epoch, "step": step, "lr": lr, "train_loss": tot / max(cnt, 1), **mon,
               "images_per_s": progress.items_per_sec, "epoch_time_s": time.perf_counter() - t0}
        rd.log(row)
        key = "monitor_acc" if higher_better else "monitor_depth_loss"
        if dist.is_main:
            print(f"epoch {epoch} ({row['epoch_time_s']:.1f}s): lr {lr:g} | train loss {row['train_loss']:.4f} | "
                  f"{key} {mon[key]:.4f}" + (f" (chance {chance:.3f})" if chance else "") +
                  f" | {row['images_per_s']:.1f} img/s", flush=True)
        new_best = best is None or (mon[key] >= best if higher_better else mon[key] <= best)
        best = mon[key] if new_best else best
        state = checkpoint.training_state(trainee.backbone, optimizer, None, None, epoch=epoch + 1, step=step,
                                          best_metric=best, args=vars(args), loss_state=trainee.objective.state_dict(),
                                          arch=args.arch, loss=args.loss, monitor=mon[key])
        if new_best:
            rd.save_best(state)
        rd.save("last.pt", state)
    rows = rd.read_metrics() if dist.is_main else []
    if dist.is_main and rows:
        ep = [r["epoch"] for r in rows]
        plots.line_plot(rd.figure_path("loss.png"), [{"label": "train", "x": ep, "y": [r["train_loss"] for r in rows]}],
                        title=f"{args.arch} × {args.loss}", ylabel="loss")
        key = "monitor_acc" if higher_better else "monitor_depth_loss"
        plots.line_plot(rd.figure_path("monitor.png"), [{"label": "held-out", "x": ep, "y": [r[key] for r in rows]}],
                        title=f"{args.arch} × {args.loss} monitor", ylabel=key,
                        hlines=[(chance, "chance")] if chance else [])
    last = rows[-1] if rows else row
    results = {"mode": "train", "arch": args.arch, "loss": args.loss, "config": args.config, "data_root": str(root),
               "embedded_data": args.embedded, "num_classes": n_classes, "chance_acc": chance,
               "epochs_run": args.epochs - start_epoch, "best_monitor": best,
               "final_monitor_acc": last.get("monitor_acc"), "first_monitor_acc": rows[0].get("monitor_acc") if rows else None,
               "final_train_loss": last.get("train_loss"), "first_train_loss": rows[0].get("train_loss") if rows else None,
               "params_total": total, "params_trainable": trainable, "wall_time_s": time.perf_counter() - t_start,
               "world_size": dist.world_size}
    rd.write_results(results)
    if dist.is_main:
        print(json.dumps({k: results[k] for k in ("arch", "loss", "best_monitor", "final_monitor_acc", "chance_acc",
                                                   "wall_time_s")}), flush=True)
    return results


# ----------------------------------------------------------------------------- benchmark


def benchmark(args):
    """One JSON line: training images/s of --arch × --loss and of alexnet_bn × supervised cross-entropy on the same
    synthetic batches in the same run, and their ratio."""
    if args.bench == "neural_fit":
        return require_neural_fit("--bench neural_fit").benchmark(args)
    resolve_training(args)
    runtime.set_threads(args.threads)
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    cuda = device.type == "cuda"
    bs = args.bench_batch_size or (256 if cuda else 16)
    iters, warmup = args.bench_iters or (20 if cuda else 3), 5 if cuda else 1
    n_data = 1281167 if cuda else 20000  # IR bank rows (ImageNet's count on GPU)

    def speed(arch, loss):
        runtime.seed_everything(args.seed)
        runtime.reset_peak_memory(device)
        a = argparse.Namespace(**{**vars(args), "arch": arch, "loss": loss})
        backbone = build_model(arch)
        obj = build_objective(loss, backbone, n_data, 1000, **objective_kwargs(a))
        trainee = Trainee(backbone, obj)
        run = prepare(trainee, a, device, runtime.DistInfo())
        opt = make_optimizer(trainee, a)
        size = a.crop_size if loss == "relloc" else 64
        views = [torch.randn(bs, 3, size, size, device=device) for _ in range(obj.n_views)]
        if cuda:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        labels = torch.rand(bs, 1, 64, 64, device=device) if loss == "depth" else torch.randint(0, 1000, (bs,), device=device)
        index = torch.randperm(n_data, device=device)[:bs]

        def one():
            with runtime.autocast(device, args.amp):
                loss_v, _ = run(views, labels, index)
            opt.zero_grad(set_to_none=True)
            loss_v.backward()
            opt.step()
            obj.after_step() if hasattr(obj, "after_step") else None

        sec = runtime.time_fn(one, device, warmup=warmup, iters=iters)
        return bs / sec, runtime.peak_memory_mb(device)

    base_ips, base_mem = speed("alexnet_bn", "supervised")
    ips, mem = speed(args.arch, args.loss)
    res = {"mode": "benchmark", "bench": "train", "device": str(device), "torch": torch.__version__,
           "arch": args.arch, "loss": args.loss, "batch_size": bs, "image_size": 64, "iters": iters,
           "amp": args.amp if cuda else "off", "compile": args.compile, "threads": torch.get_num_threads(),
           "train_images_per_s": round(ips, 2), "peak_mem_mb": round(mem, 1),
           "baseline": "alexnet_bn x supervised", "baseline_train_images_per_s": round(base_ips, 2),
           "baseline_peak_mem_mb": round(base_mem, 1), "throughput_ratio": round(ips / base_ips, 3),
           "ir_bank_rows": n_data if args.loss == "ir" else None,
           "peak_mem_kind": "cuda max_memory_allocated" if cuda else "process peak RSS (VmHWM)"}
    print(json.dumps(res), flush=True)
    return res


# ----------------------------------------------------------------------------- entry point


def require_neural_fit(what: str):
    if neural_fit is None:
        raise UserError(f"{what} needs mouse_vision/neural_fit.py, which is missing from this copy of the kit")
    return neural_fit


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "benchmark":
        return benchmark(args)
    if args.mode == "convert":
        return require_neural_fit("--mode convert").mode_convert(args)
    if args.mode == "neural_fit":
        return require_neural_fit("--mode neural_fit").mode_neural_fit(args)
    return train(args)


if __name__ == "__main__":
    runtime.run_cli(main)
