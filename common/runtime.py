"""Runtime plumbing shared by every study: errors, device, seeding, AMP, torchrun/DDP, progress, timing.

Everything here is paper-agnostic. The device/AMP/DDP block follows nanoGPT's ~30-line pattern:
one script serves CPU, one GPU and `torchrun --nproc_per_node=N`.
"""
from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """Bad input from the user (missing file, wrong layout/shape, unknown name).

    `run_cli` turns it into one line on stderr and exit status 2, without a traceback.
    The message should name the offending path or value and what was expected.
    """


def run_cli(main_fn, argv=None):
    """Run `main_fn(argv)`; a UserError becomes `error: <msg>` on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- device, seeds, AMP


def choose_device(name: str | None = None) -> torch.device:
    """`None`/"auto" → cuda if available, else cpu. "cuda:1", "cpu", "mps" are accepted as torch spells them."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {name!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r} asked for CUDA, but torch sees no CUDA device here; use --device cpu")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). `deterministic` also forces deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_threads(n: int) -> None:
    """--threads: CPU intra-op threads (n > 0); 0 keeps torch's default (all cores)."""
    if n and n > 0:
        torch.set_num_threads(n)


def setup_cuda_speed(device: torch.device) -> None:
    """cudnn autotuning and TF32 matmuls on CUDA (as torchvision/nanoGPT do); a no-op on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, amp: str = "bf16"):
    """Autocast on CUDA: amp="bf16" (default, no GradScaler needed), "fp16" (pair it with a GradScaler) or "off".
    Plain fp32 on every other device."""
    if amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"amp must be bf16, fp16 or off, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- torchrun / DDP


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set), else a no-op.

    Backend: nccl when the run is on CUDA, gloo on CPU. Each rank takes cuda:LOCAL_RANK.
    """
    if int(os.environ.get("RANK", -1)) == -1 or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    on_cuda = (device_name in (None, "", "auto") and torch.cuda.is_available()) or str(device_name).startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return DistInfo(True, rank, world, local)


def dist_device(info: DistInfo, device_name: str | None) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK under torchrun on CUDA, else `choose_device`."""
    dev = choose_device(device_name)
    if info.enabled and dev.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return dev


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in one process)."""
    if info.enabled:
        torch.distributed.barrier()


def all_reduce_sum(values, info: DistInfo, device: torch.device) -> list[float]:
    """Sum a list of numbers over ranks (exact distributed evaluation: counts, not averages)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- progress and timing


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class Progress:
    """One progress line every `log_every` updates: step, scalars, items/s and ETA.

    >>> p = Progress(total=100, log_every=10, unit="img", prefix="epoch 1")
    >>> p.update(128, loss=0.7)   # called once per step
    """

    def __init__(self, total: int, log_every: int, unit: str = "img", prefix: str = "", enabled: bool = True):
        self.total, self.log_every, self.unit, self.prefix, self.enabled = total, max(1, log_every), unit, prefix, enabled
        self.step = 0
        self.items = 0
        self.start = time.perf_counter()

    @property
    def items_per_sec(self) -> float:
        return self.items / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n_items: int, **scalars) -> None:
        self.step += 1
        self.items += n_items
        if not self.enabled or (self.step % self.log_every and self.step != self.total):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.step * (self.total - self.step) if self.total else 0.0
        parts = [f"{self.prefix} step {self.step}/{self.total}".strip()]
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items()]
        parts += [f"{self.items_per_sec:.1f} {self.unit}/s", f"eta {_fmt_seconds(eta)}"]
        print(" | ".join(parts), flush=True)


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's peak counter, or on Linux the process's RSS high-water mark
    (writing 5 to /proc/self/clear_refs), so consecutive measurements in one run are independent."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA max_memory_allocated, else the process's peak
    resident set (VmHWM; ru_maxrss — the whole run's peak — where /proc is unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _vm_hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median wall seconds per call of `fn()` after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
