"""Checkpoint I/O and the run directory.

- Checkpoints are dicts of plain Python types and tensors only (state_dicts, floats, `vars(args)`), so they load with `torch.load(weights_only=True)`: a file carrying any other pickled
  object (the classic arbitrary-code payload) is refused.
- Writes are atomic: temp file in the same folder → flush + fsync → `os.replace`. A crash mid-write
  leaves the previous file intact.
- The run directory holds args.json, metrics.csv + metrics.jsonl (one row per epoch/step),
  last.pt / best.pt / periodic files, results.json and figures/. An existing run is never
  overwritten: `resume=True` continues it, `overwrite=True` replaces it, anything else is a UserError.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.runtime import UserError

PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------- model unwrapping


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def clean_state_dict(sd: dict) -> dict:
    """Remove `module.` / `_orig_mod.` key prefixes (checkpoints written from wrapped models)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


# ----------------------------------------------------------------------------- atomic save / safe load


def _atomic_write(path: Path, write) -> None:
    """Call `write(fileobj)` on a temp file next to `path`, fsync it, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the user's umask like open()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path, state: dict) -> None:
    """Atomically `torch.save(state, path)`. `state` must hold plain types and tensors only."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """`torch.load(weights_only=True, map_location="cpu")`, with one clear UserError for any failure."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain types; refused "
                        f"(weights_only load): {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def write_json(path, obj) -> None:
    """Atomic JSON write (used for args.json and results.json)."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- run directory


class RunDir:
    """A run's output folder.

    RunDir(output_root, vars(args), resume=args.resume, overwrite=args.overwrite, is_main=rank == 0)

    Non-main ranks get an object whose writes do nothing, so training code needs no `if rank == 0`.
    """

    def __init__(self, output_root, args: dict, resume: bool = False, overwrite: bool = False, is_main: bool = True):
        self.path = Path(output_root)
        self.is_main = is_main
        self.resume = resume
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output folder {self.path} exists and is not a folder")
        # The embedded-data cache (`synthetic/`, see common.synthetic.ensure_synthetic) may live inside the
        # output folder; it does not make the folder "a run".
        exists = self.path.is_dir() and any(c.name != "synthetic" for c in self.path.iterdir())
        if exists and not (resume or overwrite):
            raise UserError(f"output folder {self.path} already holds a run; pass --resume to continue it "
                            f"or --overwrite to replace it")
        if resume and not (self.path / "last.pt").is_file():
            raise UserError(f"--resume: no {self.path / 'last.pt'} to resume from")
        if not is_main:
            return
        if exists and overwrite:
            for child in self.path.iterdir():
                if child.name == "synthetic":  # the embedded-data cache may live here; keep it
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(self.path / "args.json", args)

    # -- metrics ---------------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        """Append one row to metrics.jsonl and metrics.csv (the csv header grows if new keys appear)."""
        if not self.is_main:
            return
        row = {k: _plain_scalar(v) for k, v in row.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        csv_path = self.path / "metrics.csv"
        header = []
        if csv_path.exists():
            with open(csv_path, newline="") as f:
                header = next(csv.reader(f), [])
        if header and any(k not in header for k in row):
            # A new column: rewrite the csv from the jsonl with the wider header (rare; the files are small).
            rows = self.read_metrics()
            for r in rows:
                header += [k for k in r if k not in header]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
            _atomic_write(csv_path, lambda f: f.write(buf.getvalue().encode()))
            return
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if not header:
                w.writeheader()
            w.writerow(row)

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (typed), or [] when none."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # -- checkpoints and results -----------------------------------------------------------------

    def save(self, name: str, state: dict) -> None:
        if self.is_main:
            save_checkpoint(self.path / name, state)

    def save_best(self, state: dict, also: tuple = ()) -> None:
        """best.pt, plus hard links under the names in `also` (e.g. a release's own name for it; a copy where the
        file system has no hard links). The one way every study writes its best checkpoint."""
        if not self.is_main:
            return
        save_checkpoint(self.path / "best.pt", state)
        for name in also:
            tmp = self.path / f".{name}.link"
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(self.path / "best.pt", tmp)
            except OSError:
                shutil.copyfile(self.path / "best.pt", tmp)
            os.replace(tmp, self.path / name)

    def resume_state(self, name: str = "last.pt") -> dict | None:
        """The checkpoint to continue from when resuming, else None."""
        if not self.resume:
            return None
        return load_checkpoint(self.path / name)

    def truncate_metrics(self, keep) -> None:
        """On resume: drop metric rows written after the checkpoint (`keep(row) -> bool`), so a resumed run's
        metrics equal an uninterrupted run's."""
        if not self.is_main:
            return
        rows = [r for r in self.read_metrics() if keep(r)]
        for name in ("metrics.jsonl", "metrics.csv"):
            p = self.path / name
            if p.exists():
                p.unlink()
        for r in rows:
            self.log(r)

    def write_results(self, results: dict) -> None:
        if self.is_main:
            write_json(self.path / "results.json", results)

    def figure_path(self, name: str) -> Path:
        fig = self.path / "figures"
        if self.is_main:
            fig.mkdir(exist_ok=True)
        return fig / name


def open_run_dir(args, dist) -> RunDir:
    """The run folder of a (possibly torchrun) training mode: every rank first runs the read-only checks (same files,
    same verdict, so a bad --output_root fails on all ranks alike), then rank 0 alone creates or wipes the folder;
    the other ranks get a RunDir whose writes do nothing."""
    from common.runtime import barrier

    check = RunDir(args.output_root, vars(args), resume=args.resume, overwrite=args.overwrite, is_main=False)
    barrier(dist)
    rd = RunDir(args.output_root, vars(args), resume=args.resume, overwrite=args.overwrite) if dist.is_main else check
    barrier(dist)
    return rd


def _plain_scalar(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def training_state(model, optimizer=None, scheduler=None, scaler=None, *, epoch: int, step: int = 0,
                   best_metric: float | None = None, args: dict | None = None, **extra) -> dict:
    """The standard checkpoint dict: unwrapped model state + optimizer/scheduler/scaler + counters + args.

    No RNG state: the studies reseed at every epoch from (seed, epoch), so a run resumed at an epoch boundary
    draws exactly what an uninterrupted run draws."""
    state = {
        "model": unwrap_model(model).state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
        "args": dict(args or {}),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra)
    return state


def load_model_weights(model: torch.nn.Module, state_or_path, strict: bool = True) -> dict:
    """Load a checkpoint's (or a bare state_dict's) weights into `model`, cleaning wrapper prefixes.

    Shape/key mismatches (e.g. a checkpoint of another architecture) become a UserError.
    Returns the checkpoint dict.
    """
    ckpt = load_checkpoint(state_or_path) if isinstance(state_or_path, (str, os.PathLike)) else state_or_path
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {state_or_path} has no model state_dict")
    try:
        unwrap_model(model).load_state_dict(clean_state_dict(sd), strict=strict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UserError(f"checkpoint {state_or_path} does not fit this model: {' '.join(l.strip() for l in lines[:4])[:600]}") from None
    return ckpt
