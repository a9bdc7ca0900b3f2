"""Train, validate, fine-tune, evaluate (Tiny-ImageNet-C, V1 tuning properties) and benchmark the V1-component
ResNet50s of Pogoncheff, Granley & Beyeler (NeurIPS 2023), "Explaining V1 Properties with a Biologically
Constrained Deep Learning Architecture".

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
  # Tiny-ImageNet-C: clean + 75 cells, means, CE/mCE vs a baseline run, heatmap (--shard K/N|slurm|sge splits
  # the cells over a job array; --merge_only merges them; --compare RUN... tabulates runs side by side)
  python v1_constrained/main.py --mode eval_c --data_root /data/tiny-imagenet-200 --c_root /data/Tiny-ImageNet-C \
      --model_type resnet50_composite_a --model_path runs/a_tiny/best_model_acc.pt --output_root runs/a_c \
      --baseline_results runs/resnet50_c/results.json

  # V1 tuning properties of layer1 units from synthetic gratings (no data needed); several models side by side
  python v1_constrained/main.py --mode v1_props --model_type resnet50_composite_a --model_path runs/a/best.pt
  python v1_constrained/main.py --mode v1_props --compare runs/resnet50/best.pt runs/a/best.pt

  # N GPUs (DDP; --batch_size is per process; validation counts every image exactly once)
  torchrun --nproc_per_node=8 v1_constrained/main.py --mode train --data_root /data/imagenet ...

  # throughput / memory of a model against plain resnet50, and the LocallyConnected2d kernel
  python v1_constrained/main.py --mode benchmark --model_type resnet50_composite_a

On CUDA: bf16 autocast (--amp fp16 adds a GradScaler, as the release), channels_last, cudnn.benchmark,
optional --compile. Checkpoints: best.pt (+ best_model_acc.pt, the release's name, a hard link), epoch_{e}.pt
every --save_freq epochs (e 0-indexed, as the release), last.pt after every epoch for exact --resume.
README.md in this folder: modes, data, flags, the release bugs fixed, measured results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import checkpoint, datasets, metrics, plots, runtime, settings, shard  # noqa: E402
from common.runtime import UserError  # noqa: E402
from v1_constrained import analysis, robustness  # noqa: E402
from v1_constrained import data as v1data  # noqa: E402
from v1_constrained.models import (DOG_FORMS, MODEL_TYPES, POLAR_VARIANTS, TUNED_CENTERS,  # noqa: E402
                                   LocallyConnected2d, build_model, count_parameters, lc_broadcast,
                                   remap_release_keys, replace_head)

MODES = ("train", "validate", "finetune", "benchmark", "eval_c", "v1_props")

# Settings resolve in one place (parse_args): DEFAULTS, then the paper's schedule (with --data_root) or the
# embedded short schedule (without), then the user's flags. DEFAULTS are the release's main.py defaults, which its
# readme calls "the ones used in the paper".
DEFAULTS = dict(epochs=100, batch_size=128, lr=0.1, lr_step_milestones=[60, 80], gamma=0.1, momentum=0.9,
                weight_decay=1e-5, save_freq=10, log_every=100, num_workers=16)
PAPER = dict(epochs=100, batch_size=128, lr=0.1, lr_step_milestones=[60, 80], save_freq=10, log_every=100,
             num_workers=16)
# Embedded: ResNet50 from scratch on 600 synthetic images must beat chance within ~2-3 CPU minutes: small
# batches give many steps, and lr 0.002 avoids the loss spikes of lr >= 0.01 at batch 8-16 (no warmup).
EMBEDDED = dict(epochs=3, batch_size=8, lr=0.002, lr_step_milestones=[2], save_freq=3, log_every=25,
                num_workers=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=MODES, default="train", help="train from scratch, validate a checkpoint, finetune "
      "(linear probe with a new head), benchmark (speed/memory JSON line), eval_c (Tiny-ImageNet-C robustness) "
      "or v1_props (V1 tuning properties from synthetic gratings)")
    settings.add_shared_flags(p, help={
        "epochs": "paper 100; embedded 3; the release's --num_epochs", "batch_size": "paper 128; embedded 8",
        "lr": "initial SGD learning rate: paper 0.1; embedded 0.002",
        "log_every": "batches; paper 100; embedded 25; the release's --iteration_verbosity",
        "data_root": "ImageNet root (train/, val/ in class folders) or Tiny-ImageNet root (wnids.txt, train/, val/ "
                     "as shipped)", "output_root": "default runs/v1_constrained/<mode> in the repo",
        "resume": "eval_c: continue interrupted cells"},
        aliases={"epochs": ["--num_epochs"], "log_every": ["--iteration_verbosity"]})
    a("--dataset", choices=("imagenet", "tinyimagenet"), default=None,
      help="layout of --data_root (default: tinyimagenet if DATA_ROOT/wnids.txt exists, else imagenet)")
    a("--model_type", choices=MODEL_TYPES, default="resnet50_composite_a", help="architecture (the release's names)")
    a("--model_path", default=None, help="checkpoint to validate / fine-tune from / warm-start training from / "
      "evaluate (ours or the release's; a release cortical-magnification checkpoint is remapped)")
    a("--cache_root", default=None, help="where the embedded synthetic data is cached (default: --output_root)")
    a("--lr_step_milestones", type=int, nargs="+", default=None,
      help="epochs at which MultiStepLR multiplies the lr by --gamma (paper 60 80; embedded 2)")
    a("--gamma", type=float, default=None, help="MultiStepLR factor (0.1)")
    a("--momentum", type=float, default=None, help="SGD momentum (0.9)")
    a("--weight_decay", type=float, default=None, help="SGD weight decay (1e-5)")
    a("--save_freq", type=int, default=None, help="write epoch_{e}.pt when (e+1) %% save_freq == 0 (paper 10; embedded 3)")
    a("--num_workers", type=int, default=None, help="DataLoader workers (paper 16; embedded 0)")
    a("--dog_form", choices=DOG_FORMS, default="textbook", help="DoG kernel: textbook = true centre-surround "
      "(unit-mass Gaussians); original = the release's dog-sigma-precedence bug (sigma/pi, single-signed kernels)")
    a("--polar_variant", choices=POLAR_VARIANTS, default="release",
      help="cortical magnification: release (reflect-pad angles) or brainscore (LPP49: also pad radii)")
    a("--tuned_center", choices=TUNED_CENTERS, default="opposite", help="tuned norm: opposite = the release's "
      "distance matrix (tuned-norm-opposite: strongest inhibition from the opposite channel; the scored model); "
      "self = circular distance")
    a("--finetune_bn_drift", action="store_true", help="finetune-bn-drift: finetune with the backbone in train() "
      "mode, so BN statistics (and Dropout2d) keep changing as in the release; default freezes them")
    a("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    small = p.add_argument_group("small-schedule flags (tests, smoke runs)")
    small.add_argument("--limit_train_batches", type=int, default=None, help="at most N training batches per epoch")
    small.add_argument("--limit_val_batches", type=int, default=None, help="at most N validation batches per "
                       "process (eval_c: per cell)")
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--bench_batch_size", type=int, default=None, help="benchmark batch (default 128 on CUDA, 8 on CPU)")
    bench.add_argument("--bench_iters", type=int, default=None, help="timed iterations (default 20 on CUDA, 3 on CPU)")
    robustness.add_flags(p)
    analysis.add_flags(p)
    shard.add_shard_flags(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.embedded = args.data_root is None
    settings.resolve(args, DEFAULTS, ("embedded", EMBEDDED) if args.embedded else ("paper", PAPER))
    if args.output_root is None:
        args.output_root = settings.default_output_root("v1_constrained", args.mode)
    if args.cache_root is None:
        args.cache_root = args.output_root
    settings.check_positive(args, "epochs", "batch_size", "save_freq", "log_every")
    runtime.set_threads(args.threads)
    return args


# ----------------------------------------------------------------------------- plumbing


def to_device(x, y, device):
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def load_checkpoint_model(args, path):
    """Build --model_type with the checkpoint's head size and load it with common.checkpoint (ours or the release's
    format: V1ResNet50.load_state_dict remaps the release's Sequential cortical-magnification keys)."""
    ckpt = checkpoint.load_checkpoint(path)
    ck_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    ck_type = ck_args.get("model_type")
    if ck_type is not None and ck_type != args.model_type:
        raise UserError(f"checkpoint {path} is a {ck_type} model, but --model_type is {args.model_type}")
    for flag in ("dog_form", "polar_variant", "tuned_center"):
        if flag in ck_args and ck_args[flag] != getattr(args, flag):
            raise UserError(f"checkpoint {path} was trained with --{flag} {ck_args[flag]}; pass the same flag")
    if ck_args and "dog_form" not in ck_args and args.dog_form != "original":
        print(f"note: {path} looks like a release checkpoint; pass --dog_form original to reproduce it", flush=True)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    head = remap_release_keys(checkpoint.clean_state_dict(sd)).get("fc.weight") if isinstance(sd, dict) else None
    if not isinstance(head, torch.Tensor) or head.dim() != 2:
        raise UserError(f"checkpoint {path} has no fc.weight: not a {args.model_type} checkpoint")
    model = new_model(args, head.shape[0])
    checkpoint.load_model_weights(model, path, strict=True)  # reads the file again: its errors name the path
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


def train_epoch(run, loader, optimizer, scaler, args, device, dist, epoch, n_batches):
    # finetune: the backbone is frozen, and by default so are its BN statistics (eval mode); the release
    # leaves the model in train() so running means/vars drift (finetune-bn-drift; --finetune_bn_drift keeps it).
    run.train(not (args.mode == "finetune" and not args.finetune_bn_drift))
    progress = runtime.Progress(n_batches, args.log_every, prefix=f"epoch {epoch}", enabled=dist.is_main)
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
        if (i + 1) % args.log_every == 0 or i + 1 == n_batches:
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
        runtime.barrier(dist)
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


def linear_probe(model, n_classes: int):
    """Fine-tuning as in the paper: a new `n_classes`-way head, everything else frozen. Selected by module
    (`model.fc`), so it works for every model type — the release matched the name 'resnet50_polar' and so
    froze every parameter of the cortical-magnification model (finetune-freezes-polar)."""
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
    rd = checkpoint.open_run_dir(args, dist)
    run, raw = prepare_for_device(model, args, device, dist)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_step_milestones, gamma=args.gamma)
    # amp-hardcoded-cuda: the release autocasts fp16 on 'cuda' even on CPU runs; here autocast (bf16 by default,
    # fp16 + GradScaler with --amp fp16) happens on CUDA only
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.amp == "fp16")
    start_epoch, step, best = 0, 0, -1.0
    state = rd.resume_state() if args.resume else None
    if state is not None:  # exact resume: model, optimizer, scheduler, scaler, counters (resume-restarts-schedule)
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
    for epoch in range(start_epoch, args.epochs):
        runtime.seed_everything(args.seed + 1000 * epoch + dist.rank)  # resume at an epoch == never stopping
        loader = datasets.epoch_loader(train_ds, args, dist, device, train=True, epoch=epoch)
        n_batches = min(len(loader), args.limit_train_batches or len(loader))
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc, ips, nb = train_epoch(run, loader, optimizer, scaler, args, device, dist, epoch, n_batches)
        step += nb
        val = evaluate(raw, datasets.epoch_loader(val_ds, args, dist, device, train=False), args, device, dist, args.limit_val_batches)
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
        # the kit's keys, each named once (epoch = the next epoch to run; the release's current_epoch and
        # lr_scheduler duplicates are gone) plus the release's valid_loss / valid_acc
        state = checkpoint.training_state(
            raw, optimizer, scheduler, scaler, epoch=epoch + 1, step=step, best_metric=best, args=vars(args),
            valid_loss=val["valid_loss"], valid_acc=val["valid_acc"], model_type=args.model_type,
            num_classes=n_classes)
        if new_best:  # best.pt, and best_model_acc.pt (the release's name) as a hard link to it
            rd.save_best(state, also=("best_model_acc.pt",))
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
               "epochs_run": args.epochs - start_epoch, "best_valid_acc": best,
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
    swapped the head *after* loading, so fine-tuned 200-way checkpoints could not be evaluated: head-swap-after-load).
    Without
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
    rd = checkpoint.open_run_dir(args, dist)
    _, raw = prepare_for_device(model, args, device, dist)
    t0 = time.perf_counter()
    val = evaluate(raw, datasets.epoch_loader(val_ds, args, dist, device, train=False), args, device, dist, args.limit_val_batches)
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
    """Tiny-ImageNet-C: the units (clean val accuracy, then every corruption x severity cell; order and files in
    robustness.py) of this shard, each evaluated into its own folder, then — unsharded or --merge_only — the merge:
    the release's CSV, results.json (means, CE/mCE/relative mCE vs --baseline_results), the heatmap."""
    if dist.enabled:
        raise UserError("--mode eval_c runs in one process per shard (no torchrun; use --shard K/N to split it)")
    if args.compare:
        return robustness.compare(args, args.compare)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    k, n = shard.parse_shard(args.shard)
    if args.data_root is None:
        tiny = v1data.ensure_synthetic_tiny(args.cache_root)
        c_root = args.c_root or v1data.ensure_synthetic_tiny_c(args.cache_root, tiny, args.corruptions, max_per_class=2)
    else:
        if args.c_root is None:
            raise UserError("--mode eval_c needs --c_root (the Tiny-ImageNet-C root)")
        tiny, c_root = Path(args.data_root), Path(args.c_root)
    classes = datasets.read_wnids(tiny)
    units, gaps = robustness.plan(c_root, args.corruptions, args.severities, args.allow_partial)
    out = Path(args.output_root)
    if (out / "args.json").is_file() and json.loads((out / "args.json").read_text()).get("mode") != "eval_c":
        raise UserError(f"{out} holds a run of another mode; choose another --output_root")
    todo = []
    if not args.merge_only:
        for u in shard.my_units(units, (k, n)):
            if shard.prepare_unit(robustness.unit_dir(out, u), resume=args.resume, overwrite=args.overwrite) != "skip":
                todo.append(u)
        print(f"eval_c shard {k}/{n}: {len(shard.my_units(units, (k, n)))} of {len(units)} units, {len(todo)} to "
              f"run (the others are complete)", flush=True)
    if todo:
        model = model_to_evaluate(args, len(classes), c_root)
        _, raw = prepare_for_device(model, args, device, dist)
        for u in todo:
            c, sev = robustness.split_unit(u)
            ds = v1data.load_split("tinyimagenet", tiny, "val") if c is None else \
                v1data.corruption_cell(c_root, c, sev, classes)
            t0 = time.perf_counter()
            val = evaluate(raw, datasets.epoch_loader(ds, args, dist, device, train=False), args, device, dist,
                           args.limit_val_batches)
            robustness.write_unit(out, u, {**val, "wall_time_s": time.perf_counter() - t0}, args)
            print(f"{u}: top-1 {val['valid_acc']:.4f} ({val['n_valid']} images)", flush=True)
    if n > 1 and not args.merge_only:
        print(f"shard {k}/{n} done; merge the shards with the same flags plus --merge_only", flush=True)
        return {"shard": [k, n], "units_run": todo}
    res = robustness.merge(args, units, gaps, c_root, tiny)
    checkpoint.write_json(out / "args.json", vars(args))  # shared files: only the merge writes them
    return res


def v1_props(args):
    """V1 tuning properties of --model_type's --layer units from synthetic gratings (analysis.py)."""
    if args.compare:
        return analysis.compare(args, args.compare, lambda spec: model_for_analysis(args, spec))
    model, label = model_for_analysis(args, None)
    return analysis.run(args, model, label)


def model_for_analysis(args, spec):
    """(model, label) for v1_props: spec None → --model_path (or a random model without it); a model type name →
    that architecture, randomly initialised; a file → its checkpoint (model type from its args)."""
    if spec is None:
        if args.model_path is not None:
            return load_checkpoint_model(args, args.model_path)[0], f"{args.model_type} ({Path(args.model_path).name})"
        print(f"no --model_path: v1_props of a randomly initialised {args.model_type}", flush=True)
        runtime.seed_everything(args.seed)
        return new_model(args, 1000), f"{args.model_type} (random init)"
    if spec in MODEL_TYPES:
        runtime.seed_everything(args.seed)
        return new_model(argparse.Namespace(**{**vars(args), "model_type": spec}), 1000), f"{spec} (random init)"
    if not Path(spec).is_file():
        raise UserError(f"--compare {spec}: neither a model type ({', '.join(MODEL_TYPES[:3])}, ...), a checkpoint "
                        f"file, nor a v1_props run folder")
    ck_args = checkpoint.load_checkpoint(spec).get("args") or {}
    sub = argparse.Namespace(**{**vars(args), "model_type": ck_args.get("model_type", args.model_type),
                                **{k: ck_args[k] for k in ("dog_form", "polar_variant", "tuned_center") if k in ck_args}})
    return load_checkpoint_model(sub, spec)[0], f"{sub.model_type} ({Path(spec).name})"


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
        out = bs / sec, runtime.peak_memory_mb(device), count_parameters(model)[0]
        del model, run, opt
        return out

    base_ips, base_mem, base_params = train_speed("resnet50")
    ips, mem, params = train_speed(args.model_type)
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
           "threads": torch.get_num_threads(), "torch": torch.__version__, "params_total": params,
           "train_images_per_s": round(ips, 2), "peak_mem_mb": round(mem, 1), "baseline": "resnet50",
           "baseline_params_total": base_params, "baseline_train_images_per_s": round(base_ips, 2),
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
    settings.print_settings(args)
    if args.mode == "benchmark":
        return benchmark(args)
    if args.mode == "v1_props":
        return v1_props(args)
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
