"""Train / validate / fine-tune / benchmark the V1-component ResNet50s of Pogoncheff, Granley & Beyeler
(NeurIPS 2023), "Explaining V1 Properties with a Biologically Constrained Deep Learning Architecture".

Usage (from the repo root or from inside v1_constrained/):

  # embedded default: a synthetic Tiny-ImageNet tree (10 classes), short schedule, ~2-3 min on a CPU
  python v1_constrained/main.py --mode train

  # one GPU, the paper's schedule on ImageNet at 64x64 (100 epochs, batch 128, lr 0.1, steps at 60/80)
  python v1_constrained/main.py --mode train --dataset imagenet --data_root /data/imagenet \
      --model_type resnet50_composite_a --output_root runs/composite_a
  # linear probe on Tiny-ImageNet (200-way head, backbone and BN statistics frozen), then validate it
  python v1_constrained/main.py --mode finetune --dataset tinyimagenet --data_root /data/tiny-imagenet-200 \
      --model_type resnet50_composite_a --model_path runs/composite_a/best_model_acc.pt --output_root runs/a_tiny
  python v1_constrained/main.py --mode validate --dataset tinyimagenet --data_root /data/tiny-imagenet-200 \
      --model_type resnet50_composite_a --model_path runs/a_tiny/best_model_acc.pt --output_root runs/a_tiny_val
  # Tiny-ImageNet-C: accuracy per (corruption, severity) + mean
  python v1_constrained/main.py --mode eval_c --data_root /data/tiny-imagenet-200 --c_root /data/Tiny-ImageNet-C \
      --model_type resnet50_composite_a --model_path runs/a_tiny/best_model_acc.pt --output_root runs/a_c

  # N GPUs (DDP; --batch_size is per process; validation counts every image exactly once)
  torchrun --nproc_per_node=8 v1_constrained/main.py --mode train --data_root /data/imagenet ...

  # throughput / memory of a model against plain resnet50, and the LocallyConnected2d kernel
  python v1_constrained/main.py --mode benchmark --model_type resnet50_composite_a

On CUDA: bf16 autocast (--amp fp16 adds a GradScaler, as the release), channels_last, cudnn.benchmark,
optional --compile. Checkpoints: best_model_acc.pt (+ best.pt, a hard link), epoch_{e}.pt every
--save_freq epochs (e 0-indexed, as the release), last.pt after every epoch for exact --resume.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler  # noqa: E402

from common import checkpoint, datasets, metrics, plots, runtime  # noqa: E402
from common.runtime import UserError  # noqa: E402
from v1_constrained import data as v1data  # noqa: E402
from v1_constrained.models import (DOG_FORMS, MODEL_TYPES, POLAR_VARIANTS, TUNED_CENTERS,  # noqa: E402
                                   LocallyConnected2d, build_model, count_parameters, lc_broadcast,
                                   remap_release_keys, replace_head)

REPO = Path(__file__).resolve().parents[1]
MODES = ("train", "validate", "finetune", "benchmark", "eval_c")

# Flags left unset take the paper's value with --data_root, the embedded schedule without it.
PAPER = dict(num_epochs=100, batch_size=128, lr=0.1, lr_step_milestones=[60, 80], save_freq=10,
             iteration_verbosity=100, num_workers=16)
# Embedded: ResNet50 from scratch on 600 synthetic images must beat chance within ~2-3 CPU minutes: small
# batches give many steps, and lr 0.002 avoids the loss spikes of lr >= 0.01 at batch 8-16 (no warmup).
EMBEDDED = dict(num_epochs=3, batch_size=8, lr=0.002, lr_step_milestones=[2], save_freq=3,
                iteration_verbosity=25, num_workers=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=MODES, default="train", help="train from scratch, validate a checkpoint, finetune "
      "(linear probe with a new head), benchmark (speed/memory JSON line) or eval_c (Tiny-ImageNet-C)")
    a("--dataset", choices=("imagenet", "tinyimagenet"), default=None,
      help="layout of --data_root (default: tinyimagenet if DATA_ROOT/wnids.txt exists, else imagenet)")
    a("--data_root", default=None, help="ImageNet root (train/, val/ in class folders) or Tiny-ImageNet root "
      "(wnids.txt, train/, val/ as shipped). Omit it to run on embedded synthetic Tiny-ImageNet data")
    a("--model_type", choices=MODEL_TYPES, default="resnet50_composite_a", help="architecture (the release's names)")
    a("--model_path", default=None, help="checkpoint to validate / fine-tune from / warm-start training from "
      "(ours or the release's; a release cortical-magnification checkpoint is remapped)")
    a("--output_root", default=None, help="run folder (default: runs/v1_constrained/<mode> in the repo)")
    a("--cache_root", default=None, help="where the embedded synthetic data is cached (default: --output_root)")
    a("--num_epochs", type=int, default=None, help="epochs (paper 100; embedded 3)")
    a("--batch_size", type=int, default=None, help="batch size per process (paper 128; embedded 8)")
    a("--lr", type=float, default=None, help="initial SGD learning rate (paper 0.1; embedded 0.002)")
    a("--lr_step_milestones", type=int, nargs="+", default=None,
      help="epochs at which MultiStepLR multiplies the lr by --gamma (paper 60 80; embedded 2)")
    a("--gamma", type=float, default=0.1, help="MultiStepLR factor")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight_decay", type=float, default=1e-5, help="SGD weight decay")
    a("--save_freq", type=int, default=None, help="write epoch_{e}.pt when (e+1) %% save_freq == 0 (paper 10; embedded 3)")
    a("--iteration_verbosity", "--log_every", dest="iteration_verbosity", type=int, default=None,
      help="progress line (loss, img/s, ETA) every N batches (paper 100; embedded 25)")
    a("--num_workers", type=int, default=None, help="DataLoader workers (paper 16; embedded 0)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--seed", type=int, default=0, help="seed for init, data order and augmentation (reseeded every epoch)")
    a("--resume", action="store_true", help="continue the run in --output_root from its last.pt (exactly)")
    a("--overwrite", action="store_true", help="replace an existing run in --output_root")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--amp", choices=("bf16", "fp16", "off"), default="bf16",
      help="autocast on CUDA: bf16 (default), fp16 with GradScaler (the release), off. CPU is always fp32")
    a("--dog_form", choices=DOG_FORMS, default="textbook", help="DoG kernel: textbook = true centre-surround "
      "(unit-mass Gaussians); original = the release's sigma/pi precedence bug (single-signed kernels)")
    a("--polar_variant", choices=POLAR_VARIANTS, default="release",
      help="cortical magnification: release (reflect-pad angles) or brainscore (LPP49: also pad radii)")
    a("--tuned_center", choices=TUNED_CENTERS, default="opposite", help="tuned norm: opposite = the release's "
      "distance matrix (strongest inhibition from the opposite channel); self = circular distance")
    a("--finetune_bn_drift", action="store_true", help="finetune with the backbone in train() mode, so BN "
      "statistics (and Dropout2d) keep changing as in the release; default freezes them")
    a("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    small = p.add_argument_group("small-schedule flags (tests, smoke runs)")
    small.add_argument("--limit_train_batches", type=int, default=None, help="at most N training batches per epoch")
    small.add_argument("--limit_val_batches", type=int, default=None, help="at most N validation batches per process")
    bench = p.add_argument_group("benchmark / eval_c")
    bench.add_argument("--bench_batch_size", type=int, default=None, help="benchmark batch (default 128 on CUDA, 8 on CPU)")
    bench.add_argument("--bench_iters", type=int, default=None, help="timed iterations (default 20 on CUDA, 3 on CPU)")
    bench.add_argument("--c_root", default=None, help="Tiny-ImageNet-C root <corruption>/<1..5>/<wnid>/ (eval_c)")
    bench.add_argument("--corruptions", nargs="+", default=None, help="eval_c: only these corruptions")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.embedded = args.data_root is None
    for k, v in (EMBEDDED if args.embedded else PAPER).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.output_root is None:
        args.output_root = str(REPO / "runs" / "v1_constrained" / args.mode)
    if args.cache_root is None:
        args.cache_root = args.output_root
    for k in ("num_epochs", "batch_size", "save_freq", "iteration_verbosity"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} must be ≥ 1, got {getattr(args, k)}")
    return args


# ----------------------------------------------------------------------------- plumbing


def barrier(dist):
    if dist.enabled:
        torch.distributed.barrier()


def to_device(x, y, device):
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def make_loader(ds, args, dist, device, train: bool, epoch: int = 0):
    """Train: shuffled with a generator seeded by (seed, epoch) (DistributedSampler under torchrun);
    val: ShardSampler, every image on exactly one rank, no padding."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    if train and dist.enabled:
        sampler = DistributedSampler(ds, dist.world_size, dist.rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
    elif train:
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = datasets.ShardSampler(len(ds), dist.rank, dist.world_size)
    return DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=device.type == "cuda", generator=g, drop_last=False)


def load_checkpoint_model(args, path):
    """Build --model_type with the checkpoint's head size and load it (ours or the release's format)."""
    ckpt = checkpoint.load_checkpoint(path)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"checkpoint {path} holds no model state_dict")
    ck_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    ck_type = ck_args.get("model_type")
    if ck_type is not None and ck_type != args.model_type:
        raise UserError(f"checkpoint {path} is a {ck_type} model, but --model_type is {args.model_type}")
    for flag in ("dog_form", "polar_variant", "tuned_center"):
        if flag in ck_args and ck_args[flag] != getattr(args, flag):
            raise UserError(f"checkpoint {path} was trained with --{flag} {ck_args[flag]}; pass the same flag")
    if ck_args and "dog_form" not in ck_args and args.dog_form != "original":
        print(f"note: {path} looks like a release checkpoint; pass --dog_form original to reproduce it", flush=True)
    sd = remap_release_keys(checkpoint.clean_state_dict(sd))
    if "fc.weight" not in sd:
        raise UserError(f"checkpoint {path} has no fc.weight: not a {args.model_type} checkpoint")
    model = new_model(args, sd["fc.weight"].shape[0])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(line.strip() for line in str(e).splitlines()[:3])[:500]
        raise UserError(f"checkpoint {path} does not fit --model_type {args.model_type}: {msg}") from None
    return model, ckpt


def new_model(args, num_classes):
    return build_model(args.model_type, num_classes, dog_form=args.dog_form, polar_variant=args.polar_variant,
                       tuned_center=args.tuned_center)


def prepare_for_device(model, args, device, dist):
    """Move, channels_last on CUDA, then DDP and torch.compile wrappers. Returns (wrapped, raw)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    run = model
    if dist.enabled:
        run = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run = torch.compile(run)
    return run, model


# ----------------------------------------------------------------------------- one epoch


def train_epoch(run, raw, loader, optimizer, scaler, args, device, dist, epoch, n_batches):
    # finetune: the backbone is frozen, and by default so are its BN statistics (eval mode); the release
    # leaves the model in train() so running means/vars drift (--finetune_bn_drift reproduces that).
    run.train(not (args.mode == "finetune" and not args.finetune_bn_drift))
    progress = runtime.Progress(n_batches, args.iteration_verbosity, prefix=f"epoch {epoch}", enabled=dist.is_main)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, done = 0, 0
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        x, y = to_device(x, y, device)
        with runtime.autocast(device, args.amp):
            out = run(x)
            loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(1) == y).sum()
        seen, done = seen + len(y), done + 1
        if (i + 1) % args.iteration_verbosity == 0 or i + 1 == n_batches:
            progress.update(len(y), loss=loss.item())
        else:
            progress.update(len(y))
    total_loss, total_correct, total = runtime.all_reduce_sum([loss_sum.item(), correct.item(), seen], dist, device)
    return total_loss / max(total, 1), total_correct / max(total, 1), progress.items_per_sec * dist.world_size, done


@torch.no_grad()
def evaluate(raw, loader, args, device, dist, limit=None):
    """Exact top-1/top-5 over the whole split: per-rank counts summed with all_reduce."""
    if dist.enabled:  # every rank evaluates with rank 0's BN statistics
        for b in raw.buffers():
            torch.distributed.broadcast(b, 0)
    raw.eval()
    loss_sum, c1, c5, n = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = to_device(x, y, device)
        with runtime.autocast(device, args.amp):
            out = raw(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        c = metrics.topk_correct(out, y, ks=(1, min(5, out.shape[1])))
        c1, c5, n = c1 + c[1], c5 + c[min(5, out.shape[1])], n + len(y)
    loss_sum, c1, c5, n = runtime.all_reduce_sum([loss_sum, c1, c5, n], dist, device)
    n = max(n, 1)
    return {"valid_loss": loss_sum / n, "valid_acc": c1 / n, "valid_top5": c5 / n, "n_valid": int(n)}


# ----------------------------------------------------------------------------- modes


def open_data(args, dist, need_train: bool):
    """(train dataset or None, val dataset, dataset name). Writes the embedded data once (rank 0 first)."""
    root = args.data_root
    if root is None:
        if dist.is_main:
            root = v1data.ensure_synthetic_tiny(args.cache_root)
        barrier(dist)
        root = v1data.ensure_synthetic_tiny(args.cache_root)
        args.dataset = "tinyimagenet"
    dataset = args.dataset or v1data.detect_dataset(root)
    if args.dataset is None and dist.is_main:
        print(f"--dataset not given: reading {root} as {dataset}", flush=True)
    train_ds = v1data.load_split(dataset, root, "train") if need_train else None
    val_ds = v1data.load_split(dataset, root, "val", classes=train_ds.classes if train_ds is not None else None)
    if train_ds is not None and len(train_ds.classes) != len(val_ds.classes):
        raise UserError(f"{root}: train has {len(train_ds.classes)} classes but val has {len(val_ds.classes)}")
    return train_ds, val_ds, dataset, str(root)


def open_rundir(args, dist) -> checkpoint.RunDir:
    """Every rank first runs the read-only checks (same files, same verdict: a bad --output_root fails on all
    ranks alike), then rank 0 alone creates or wipes the folder."""
    check = checkpoint.RunDir(args.output_root, vars(args), resume=args.resume, overwrite=args.overwrite, is_main=False)
    barrier(dist)
    rd = checkpoint.RunDir(args.output_root, vars(args), resume=args.resume, overwrite=args.overwrite) \
        if dist.is_main else check
    barrier(dist)
    return rd


def save_best(rd: checkpoint.RunDir, state: dict):
    """best_model_acc.pt (the release's name) and best.pt (the kit's name) as one file, two links."""
    rd.save("best_model_acc.pt", state)
    if rd.is_main:
        tmp = rd.path / ".best.pt.link"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(rd.path / "best_model_acc.pt", tmp)
        except OSError:
            checkpoint.save_checkpoint(tmp, state)
        os.replace(tmp, rd.path / "best.pt")


def linear_probe(model, n_classes: int):
    """Fine-tuning as in the paper: a new `n_classes`-way head, everything else frozen. Selected by module
    (`model.fc`), so it works for every model type — the release matched the name 'resnet50_polar' and so
    froze every parameter of the cortical-magnification model (bug 1)."""
    replace_head(model, n_classes)
    for name, prm in model.named_parameters():
        prm.requires_grad = name.startswith("fc.")
    return model


def fit(args, dist, device):
    """Modes train and finetune: SGD + MultiStepLR (stepped per epoch) + cross-entropy, train → validate."""
    train_ds, val_ds, dataset, root = open_data(args, dist, need_train=True)
    n_classes = len(train_ds.classes)
    if args.model_path is not None:
        model, _ = load_checkpoint_model(args, args.model_path)
        if args.mode == "train" and model.fc.out_features != n_classes:
            raise UserError(f"--model_path {args.model_path} has a {model.fc.out_features}-way head but the "
                            f"dataset has {n_classes} classes; use --mode finetune to swap the head")
    elif args.mode == "finetune" and not args.embedded:
        raise UserError("--mode finetune needs --model_path (a checkpoint trained with --mode train)")
    else:
        if args.mode == "finetune" and dist.is_main:
            print("no --model_path: fine-tuning a randomly initialised backbone (embedded demo)", flush=True)
        runtime.seed_everything(args.seed)
        model = new_model(args, n_classes)
    if args.mode == "finetune":
        runtime.seed_everything(args.seed)
        linear_probe(model, n_classes)
    rd = open_rundir(args, dist)
    run, raw = prepare_for_device(model, args, device, dist)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_step_milestones, gamma=args.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.amp == "fp16")
    start_epoch, step, best = 0, 0, -1.0
    state = rd.resume_state() if args.resume else None
    if state is not None:  # exact resume: model, optimizer, scheduler, scaler, counters (release bug 5)
        if state.get("args", {}).get("model_type") != args.model_type or state.get("args", {}).get("mode") != args.mode:
            raise UserError(f"{args.output_root}/last.pt is a {state.get('args', {}).get('mode')} run of "
                            f"{state.get('args', {}).get('model_type')}; pass the same --mode and --model_type")
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_metric"]
        rd.truncate_metrics(lambda r: r.get("epoch", -1) < start_epoch)
        if dist.is_main:
            print(f"resuming {args.output_root} at epoch {start_epoch} (best valid_acc {best:.4f})", flush=True)
    total, trainable = count_parameters(raw)
    if dist.is_main:
        print(f"{args.mode} {args.model_type} on {dataset} ({root}): {len(train_ds)} train / {len(val_ds)} val "
              f"images, {n_classes} classes, {total:,} parameters ({trainable:,} trainable), device {device}, "
              f"world size {dist.world_size}", flush=True)
    t_start = time.perf_counter()
    val = None
    for epoch in range(start_epoch, args.num_epochs):
        runtime.seed_everything(args.seed + 1000 * epoch + dist.rank)  # resume at an epoch == never stopping
        loader = make_loader(train_ds, args, dist, device, train=True, epoch=epoch)
        n_batches = min(len(loader), args.limit_train_batches or len(loader))
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc, ips, nb = train_epoch(run, raw, loader, optimizer, scaler, args, device, dist, epoch, n_batches)
        step += nb
        val = evaluate(raw, make_loader(val_ds, args, dist, device, train=False), args, device, dist, args.limit_val_batches)
        scheduler.step()
        row = {"epoch": epoch, "step": step, "lr": lr, "train_loss": train_loss, "train_acc": train_acc, **val,
               "images_per_s": ips, "epoch_time_s": time.perf_counter() - t0}
        rd.log(row)
        if dist.is_main:
            print(f"epoch {epoch} ({row['epoch_time_s']:.1f}s): lr {lr:g} | train loss {train_loss:.4f} acc "
                  f"{train_acc:.4f} | valid loss {val['valid_loss']:.4f} acc {val['valid_acc']:.4f} "
                  f"top5 {val['valid_top5']:.4f} | {ips:.1f} img/s", flush=True)
        new_best = val["valid_acc"] >= best
        best = max(best, val["valid_acc"])
        # the release's checkpoint keys (current_epoch, valid_loss, valid_acc, model, optimizer, lr_scheduler)
        # plus the kit's (epoch = next epoch to run, scheduler, scaler, rng, ...)
        state = checkpoint.training_state(
            raw, optimizer, scheduler, scaler, epoch=epoch + 1, step=step, best_metric=best, args=vars(args),
            current_epoch=epoch, valid_loss=val["valid_loss"], valid_acc=val["valid_acc"], device=str(device),
            lr_scheduler=scheduler.state_dict(), model_type=args.model_type, num_classes=n_classes)
        if new_best:
            save_best(rd, state)
        if (epoch + 1) % args.save_freq == 0:
            rd.save(f"epoch_{epoch}.pt", state)
        rd.save("last.pt", state)
    rows = rd.read_metrics() if dist.is_main else []
    if dist.is_main and rows:
        ep = [r["epoch"] for r in rows]
        curve = lambda label, key: {"label": label, "x": ep, "y": [r[key] for r in rows]}  # noqa: E731
        plots.line_plot(rd.figure_path("loss.png"), [curve("train", "train_loss"), curve("valid", "valid_loss")],
                        title="cross-entropy", ylabel="loss")
        plots.line_plot(rd.figure_path("accuracy.png"), [curve("train", "train_acc"), curve("valid top-1", "valid_acc")],
                        title=f"{args.model_type} accuracy", ylabel="top-1", hlines=[(1 / n_classes, "chance")])
    last = rows[-1] if rows else (val or {})
    results = {"mode": args.mode, "model_type": args.model_type, "dataset": dataset, "data_root": root,
               "embedded_data": args.embedded, "num_classes": n_classes, "chance_acc": 1 / n_classes,
               "epochs_run": args.num_epochs - start_epoch, "best_valid_acc": best,
               "final_valid_acc": last.get("valid_acc"), "final_valid_top5": last.get("valid_top5"),
               "final_train_acc": last.get("train_acc"), "params_total": total, "params_trainable": trainable,
               "wall_time_s": time.perf_counter() - t_start, "world_size": dist.world_size}
    rd.write_results(results)
    if dist.is_main:
        print(json.dumps({k: results[k] for k in ("mode", "model_type", "best_valid_acc", "final_valid_acc",
                                                   "chance_acc", "wall_time_s")}), flush=True)
    return results


def model_to_evaluate(args, n_classes: int, root) -> torch.nn.Module:
    """validate / eval_c: the --model_path checkpoint, built with its own head size and then loaded (the release
    swapped the head *after* loading, so fine-tuned 200-way checkpoints could not be evaluated: bug 3). Without
    --model_path on the embedded data, a randomly initialised model (a demo of the mode)."""
    if args.model_path is not None:
        model, _ = load_checkpoint_model(args, args.model_path)
        if model.fc.out_features != n_classes:
            raise UserError(f"checkpoint {args.model_path} has a {model.fc.out_features}-way head but {root} has "
                            f"{n_classes} classes (fine-tune it first: --mode finetune)")
        return model
    if not args.embedded:
        raise UserError(f"--mode {args.mode} needs --model_path (a checkpoint trained with --mode train or finetune)")
    print(f"no --model_path: {args.mode} of a randomly initialised model (embedded demo)", flush=True)
    runtime.seed_everything(args.seed)
    return new_model(args, n_classes)


def validate(args, dist, device):
    _, val_ds, dataset, root = open_data(args, dist, need_train=False)
    n_classes = len(val_ds.classes)
    model = model_to_evaluate(args, n_classes, root)
    rd = open_rundir(args, dist)
    _, raw = prepare_for_device(model, args, device, dist)
    t0 = time.perf_counter()
    val = evaluate(raw, make_loader(val_ds, args, dist, device, train=False), args, device, dist, args.limit_val_batches)
    res = {"mode": "validate", "model_type": args.model_type, "dataset": dataset, "data_root": root,
           "model_path": args.model_path, "num_classes": n_classes, "chance_acc": 1 / n_classes, **val,
           "wall_time_s": time.perf_counter() - t0}
    rd.log(val)
    rd.write_results(res)
    if dist.is_main:
        print(f"validation: loss {val['valid_loss']:.4f} | top-1 {val['valid_acc']:.4f} | top-5 "
              f"{val['valid_top5']:.4f} | {val['n_valid']} images", flush=True)
    return res


def eval_c(args, dist, device):
    """Tiny-ImageNet-C: top-1 per (corruption, severity) → tinyimagenetc_results.csv (the release's columns)
    plus the mean over cells (the release computes none)."""
    if dist.enabled:
        raise UserError("--mode eval_c runs in one process (no torchrun)")
    if args.data_root is None:
        tiny = v1data.ensure_synthetic_tiny(args.cache_root)
        c_root = args.c_root or v1data.ensure_synthetic_tiny_c(args.cache_root, tiny, args.corruptions,
                                                               max_per_class=2)
        classes = datasets.read_wnids(tiny)
    else:
        if args.c_root is None:
            raise UserError("--mode eval_c needs --c_root (the Tiny-ImageNet-C root)")
        c_root, classes = args.c_root, datasets.read_wnids(args.data_root)
    model = model_to_evaluate(args, len(classes), c_root)
    rd = open_rundir(args, dist)
    _, raw = prepare_for_device(model, args, device, dist)
    rows = []
    for corruption, severity, ds in v1data.iter_corruptions(c_root, classes, args.corruptions):
        val = evaluate(raw, make_loader(ds, args, dist, device, train=False), args, device, dist, args.limit_val_batches)
        rows.append((corruption, severity, val["valid_acc"]))
        rd.log({"corruption_type": corruption, "difficulty": severity, **val})
        print(f"{corruption} severity {severity}: top-1 {val['valid_acc']:.4f} ({val['n_valid']} images)", flush=True)
    table = metrics.corruption_table(rows)
    mean_acc = metrics.mean_corrupted_accuracy(table)
    with open(rd.path / "tinyimagenetc_results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["corruption_type", "difficulty", "valid_acc"])
        w.writerows(rows)
    res = {"mode": "eval_c", "model_type": args.model_type, "c_root": str(c_root), "model_path": args.model_path,
           "mean_corrupted_acc": mean_acc, "table": table}
    rd.write_results(res)
    print(json.dumps({"mean_corrupted_acc": mean_acc, "cells": len(rows)}), flush=True)
    return res


def benchmark(args):
    """One JSON line: training img/s and peak memory of --model_type and of plain resnet50 (same run), their
    ratio, and LocallyConnected2d forward+backward (unfold+bmm) against the release's broadcast form."""
    device = runtime.choose_device(args.device)
    runtime.setup_cuda_speed(device)
    cuda = device.type == "cuda"
    bs = args.bench_batch_size or (128 if cuda else 8)
    iters, warmup = args.bench_iters or (20 if cuda else 3), 5 if cuda else 2
    runtime.seed_everything(args.seed)

    def train_speed(model_type):
        runtime.reset_peak_memory(device)
        model = build_model(model_type, 1000, dog_form=args.dog_form, polar_variant=args.polar_variant,
                            tuned_center=args.tuned_center).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        run = torch.compile(model) if args.compile else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
        x = torch.randn(bs, 3, 64, 64, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if cuda else x
        y = torch.randint(0, 1000, (bs,), device=device)

        def step():
            with runtime.autocast(device, args.amp):
                loss = F.cross_entropy(run(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = runtime.time_fn(step, device, warmup=warmup, iters=iters)
        out = bs / sec, runtime.peak_memory_mb(device)
        del model, run, opt
        return out

    base_ips, base_mem = train_speed("resnet50")
    ips, mem = train_speed(args.model_type)
    # LocallyConnected2d at the shape it has in layer1: (bs, 64, 16, 16), fp32 for both forms
    lc = LocallyConnected2d(64, 64, 16).to(device)
    x = torch.randn(bs, 64, 16, 16, device=device, requires_grad=True)

    def lc_fast():
        lc(x).sum().backward()

    def lc_naive():
        lc_broadcast(x, lc.weight).sum().backward()

    with torch.no_grad():
        diff = (lc(x) - lc_broadcast(x, lc.weight)).abs().max().item()
    runtime.reset_peak_memory(device)
    t_fast = runtime.time_fn(lc_fast, device, warmup=warmup, iters=iters)
    mem_fast = runtime.peak_memory_mb(device)
    runtime.reset_peak_memory(device)
    t_naive = runtime.time_fn(lc_naive, device, warmup=warmup, iters=iters)
    mem_naive = runtime.peak_memory_mb(device)
    res = {"mode": "benchmark", "device": str(device), "model_type": args.model_type, "batch_size": bs,
           "image_size": 64, "iters": iters, "amp": args.amp if cuda else "off", "compile": args.compile,
           "train_images_per_s": round(ips, 2), "peak_mem_mb": round(mem, 1),
           "baseline": "resnet50", "baseline_train_images_per_s": round(base_ips, 2),
           "baseline_peak_mem_mb": round(base_mem, 1), "throughput_ratio": round(ips / base_ips, 3),
           "lc_shape": [bs, 64, 16, 16], "lc_fast_ms": round(t_fast * 1e3, 3), "lc_naive_ms": round(t_naive * 1e3, 3),
           "lc_speedup": round(t_naive / t_fast, 2), "lc_fast_peak_mem_mb": round(mem_fast, 1),
           "lc_naive_peak_mem_mb": round(mem_naive, 1), "lc_max_abs_diff": diff,
           "peak_mem_kind": "cuda max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
           "peak_mem_scope": "per measurement (peak counter reset before each)"}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "benchmark":
        return benchmark(args)
    dist = runtime.setup_distributed(args.device)
    try:
        device = runtime.dist_device(dist, args.device)
        runtime.setup_cuda_speed(device)
        if args.deterministic:
            runtime.seed_everything(args.seed, deterministic=True)
        if args.mode in ("train", "finetune"):
            return fit(args, dist, device)
        if args.mode == "validate":
            return validate(args, dist, device)
        return eval_c(args, dist, device)
    finally:
        runtime.cleanup_distributed(dist)


if __name__ == "__main__":
    runtime.run_cli(main)
