"""Sweeps as cluster job arrays: split a sweep's units over N independent shards, and merge what they wrote.

A sweep (ndn runs, cortex layers, mouse layers × models, Tiny-ImageNet-C cells) is a fixed, documented list of
*units*. Unit i belongs to shard i mod N, so `--shard K/N` for K = 0..N-1 covers every unit exactly once, with no
coordinator: each shard computes its own share from the list alone. `--shard slurm` / `--shard sge` read K and N
from the job array's environment.

Each unit writes only inside its own folder, every file atomically, and last of all a completion marker
(`.complete`). Shards running at the same time over a shared file system therefore never write the same file.
A rerun skips completed units, continues (with --resume) or redoes (with --overwrite) interrupted ones, and never
touches a completed unit without --overwrite. The study's merge step (summarize / heatmap) reads the complete
units, lists the missing ones, and fails with --require_complete.

    sbatch --array=0-7 --wrap "python ndn_baselines/main.py --mode sweep --experiment bs2_exp1 --shard slurm"
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Sequence

from common.runtime import UserError

MARKER = ".complete"


def add_shard_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster job arrays (sweeps)")
    g.add_argument("--shard", default="0/1", help="run only the units i with i mod N == K of the sweep: K/N, or "
                   "'slurm' / 'sge' to read K and N from the job array's environment (default 0/1: every unit)")
    g.add_argument("--require_complete", action="store_true",
                   help="merge: exit with status 2 when a unit of the sweep is missing (default: list it and go on)")


def parse_shard(spec: str, environ=None) -> tuple[int, int]:
    """'K/N' → (K, N); 'slurm' / 'sge' → from the array task variables. A UserError names what is wrong."""
    env = os.environ if environ is None else environ
    spec = str(spec).strip().lower()
    if spec == "slurm":
        need = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        task, lo, count = _env_ints(env, need, "--shard slurm (run it inside `sbatch --array=0-N`)")
        return _checked(task - lo, count, f"SLURM_ARRAY_TASK_ID={task} with MIN={lo} COUNT={count}")
    if spec == "sge":
        need = ("SGE_TASK_ID", "SGE_TASK_FIRST", "SGE_TASK_LAST")
        task, first, last = _env_ints(env, need, "--shard sge (run it inside `qsub -t 1-N`)")
        step = env.get("SGE_TASK_STEPSIZE", "1")
        if step != "1":
            raise UserError(f"--shard sge: SGE_TASK_STEPSIZE={step}; submit the array with step 1 (qsub -t 1-N)")
        return _checked(task - first, last - first + 1, f"SGE_TASK_ID={task} with FIRST={first} LAST={last}")
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected K/N (e.g. 0/4), slurm or sge") from None
    return _checked(k, n, f"--shard {spec}")


def _env_ints(env, names, what) -> list[int]:
    missing = [n for n in names if n not in env]
    if missing:
        raise UserError(f"{what}: {', '.join(missing)} not set; this is not a job-array task")
    try:
        return [int(env[n]) for n in names]
    except ValueError:
        raise UserError(f"{what}: {', '.join(f'{n}={env[n]!r}' for n in names)} are not integers") from None


def _checked(k: int, n: int, what: str) -> tuple[int, int]:
    if n < 1 or not 0 <= k < n:
        raise UserError(f"{what}: shard index must satisfy 0 ≤ K < N, got K={k}, N={n}")
    return k, n


def my_units(units: Sequence, shard: tuple[int, int]) -> list:
    """The units of this shard, in sweep order: unit i belongs to shard i mod N."""
    k, n = shard
    return [u for i, u in enumerate(units) if i % n == k]


# ----------------------------------------------------------------------------- per-unit folders


def is_complete(unit_dir) -> bool:
    return (Path(unit_dir) / MARKER).is_file()


def mark_complete(unit_dir, info: dict | None = None) -> None:
    """Write the completion marker — the last thing a unit does, after all its files are in place."""
    from common.checkpoint import write_json

    write_json(Path(unit_dir) / MARKER, info or {})


def prepare_unit(unit_dir, *, resume: bool = False, overwrite: bool = False) -> str:
    """Decide what to do with one unit's folder before running it:

    - "skip":   it is complete (and no --overwrite): leave it as it is;
    - "run":    it does not exist, or it was complete/interrupted and --overwrite wiped it: start it afresh;
    - "resume": it was interrupted (no marker) and --resume: continue it (the unit decides how; a unit that
                cannot continue simply reruns, writing only its own files).
    An interrupted unit without --resume or --overwrite is a UserError: nothing is overwritten silently.
    """
    d = Path(unit_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if not d.exists() or not any(d.iterdir()):
        return "run"
    if overwrite:
        shutil.rmtree(d)
        return "run"
    if is_complete(d):
        return "skip"
    if resume:
        return "resume"
    raise UserError(f"{d} holds an interrupted unit (no {MARKER} marker); pass --resume to continue it "
                    f"or --overwrite to redo it")


def collect(unit_dirs: dict) -> tuple[list, list]:
    """{name: folder} → (names of complete units, names of missing or incomplete units), in the given order."""
    done = [k for k, d in unit_dirs.items() if is_complete(d)]
    missing = [k for k, d in unit_dirs.items() if not is_complete(d)]
    return done, missing


def report_missing(missing: list, total: int, require_complete: bool, what: str = "units") -> None:
    """Print the missing units; with --require_complete raise a UserError (exit status 2)."""
    if not missing:
        return
    names = ", ".join(map(str, missing[:20])) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
    msg = f"{len(missing)} of {total} {what} missing or incomplete: {names}"
    if require_complete:
        raise UserError(msg + " (--require_complete)")
    print("warning: " + msg + "; the merged table covers the complete ones", flush=True)
