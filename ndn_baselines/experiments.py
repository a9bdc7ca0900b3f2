"""Every setting of a run, in one place: the defaults (`Settings`), the presets bl1–bl4 and the thesis' variants,
and the thesis' experiment grids.

How a run's settings are decided (main.py, `common.settings.resolve`; each value's source is printed at start and
recorded in the run's args.json under `settings_source`):

    Settings() defaults → preset (--model) → embedded short schedule (no --data_root only)
                        → experiment grid setting (--experiment/--grid_index, what a sweep's child runs) → flags

A *setting* is a dict of main.py flags without the dashes: `{"model": "bl2", "lr": 1e-5}` is the run
`main.py --mode train --model bl2 --lr 1e-5`. An experiment is a named list of settings, run by
`--mode sweep --experiment NAME` as units `NAME__0`, `NAME__1`, ... in list order (msc-neuro's
`experiments/**/{exp}_runner.py` grids). Regularizers are `"reg": ["LAYER.TYPE=λ", ...]` with LAYER in
conv|hidden|out and TYPE in l1|l2|d2x|max|max_filt; a `reg` given by a later layer or a flag REPLACES the earlier
list (it is the whole regularization of the run).

Sources: P. Houška, "Deep-learning architectures for analysing population neural data", MSc thesis, Charles
University 2021 (github.com/petrroll/msc-thesis, chapter 5; "thesis 1.2.1" below = its experiment 1.2.1), and its
code github.com/petrroll/msc-neuro (experiments/, utils/) with NDN3 (github.com/petrroll/NDN3, pinned at e89669d).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product

from common.runtime import UserError
from ndn_baselines.losses import REGULARIZERS

BASELINE_EPOCHS = 35_000  # bl1–bl4 and the multi-region evaluation; the `bs*` experiments use 5,000


@dataclass(frozen=True)
class Settings:
    """The defaults of every setting (a preset, the embedded schedule, a grid or a flag overrides them).

    The training protocol is msc-neuro's for all runs: Adam(0.9, 0.999, 1e-8), batch 16, train images reshuffled
    every epoch, the last partial batch kept, a fixed number of epochs (no early stopping), validation every 100.
    """
    # network (models.build_model)
    arch: str = "hsm"              # hsm | conv | conv_dog | ln | lnln | whatwhere
    n_dog: int = 9                 # DoG filters of the HSM (Antolík et al. 2016: 9)
    dog_act: str = "lin"           # after the DoG layer: lin (HSM) or softplus (thesis 1.3.4)
    hidden_ratio: float = 0.2      # hidden units = int(ratio · neurons): 20/11/20 on regions 1/2/3
    hidden_type: str = "normal"    # dense (normal) or separable space × channel (sep, NDN3 'sep')
    lin_scale: bool = False        # learnable input scale w·x + b first (thesis 1.4.1)
    dropout: float = 0.0           # DROP probability on the hidden units (slug dropout-keep-prob)
    conv_filters: int = 9
    conv_size: int = 7
    conv_stride: int = 0           # 0: (k + 1) // 2, as the thesis' runners
    conv_layers: int = 1
    conv_act: str = "softplus"
    bias_init: str = "normal"      # N(0, 0.1²) as NDN3 runs 'trunc_normal' (slug trunc-normal-bias); bl1/bl2: zeros
    reg: tuple = ()                # "LAYER.TYPE=λ" entries
    # quirks of the original, reproduced on request (README "Original quirks")
    dog_sigma_bug: bool = False        # slug dog-sigma-bounds
    dog_uy_init_bug: bool = False      # slug dog-uy-init
    convdog_bounds_bug: bool = False   # slug convdog-degenerate-bounds
    zscore_val_own_stats: bool = False  # slug zscore-val-own-stats
    # data and training
    region: str = "1"              # 1|2|3, all, pooled, or a list like 1,2
    scaling: str = "zscore"        # raw | x1e6 (bl1) | zscore (bl2+)
    loss: str = "poisson"          # poisson | gaussian (thesis exp51)
    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 5000             # the experiments' 5,000; the baseline presets set 35,000
    eval_every: int = 100          # msc-neuro's epochs_summary
    seeds: int = 50                # random initialisations trained together (msc-neuro's bl1 ran 0..49)
    shared_order: bool = False     # one minibatch order for all seeds (faster); default: each seed its own


DEFAULTS = asdict(Settings())
MODEL_KEYS = ("arch", "n_dog", "dog_act", "hidden_ratio", "hidden_type", "lin_scale", "dropout", "conv_filters",
              "conv_size", "conv_stride", "conv_layers", "conv_act", "bias_init", "reg", "dog_sigma_bug",
              "dog_uy_init_bug", "convdog_bounds_bug")

# The embedded synthetic data (no --data_root): a short schedule, < 3 min on a 2-core CPU; per preset where the
# default would not fit (ln/lnln: the d2x penalty on 961-pixel weights; whatwhere: ~10 GFLOP per seed-epoch).
EMBEDDED_SCHEDULE = dict(epochs=300, seeds=4, eval_every=25)
EMBEDDED_PER_PRESET = {"ln": dict(epochs=150), "lnln": dict(epochs=200),
                       "whatwhere": dict(epochs=4, seeds=2, eval_every=1)}

PRESETS = {
    # Baselines (thesis 1.1.1, 1.2.1, 1.2.5, 1.3.2/1.3.3). bl4 is the best model.
    "bl1": dict(scaling="x1e6", lr=1e-4, bias_init="zeros", epochs=BASELINE_EPOCHS),
    "bl2": dict(scaling="zscore", lr=1e-4, bias_init="zeros", epochs=BASELINE_EPOCHS),
    "bl3": dict(scaling="zscore", lr=1e-3, bias_init="normal", epochs=BASELINE_EPOCHS),
    "bl4": dict(scaling="zscore", lr=1e-3, bias_init="normal", epochs=BASELINE_EPOCHS, reg=["hidden.l2=0.0", "out.l2=0.1"]),
    # Variants (5,000-epoch experiments; values = the thesis' best or multeval setting of that family).
    "dog_softplus": dict(dog_act="softplus", reg=["out.l2=0.1"]),                        # bs4_exp3 (1.3.4)
    "lin_scale": dict(lin_scale=True, reg=["out.l2=0.1"]),                                # bs3_exp10 (1.4.1)
    "dropout": dict(dropout=0.1),                                                         # bs3_exp11 (1.3.1), on bl3
    "conv": dict(arch="conv", conv_filters=9, conv_size=7),                               # bs3_exp6 (plain conv, no reg)
    "conv_sep": dict(arch="conv", conv_filters=30, conv_size=15, hidden_type="sep",       # bs4_exp5 multeval
                     reg=["conv.d2x=0.01", "hidden.l1=0.1", "out.l2=0.1"]),
    "conv_dog": dict(arch="conv_dog", conv_filters=9, conv_size=7, conv_act="lin",        # bs4_exp10 multeval
                     reg=["hidden.l1=0.1", "out.l2=0.1"]),
    "ln": dict(arch="ln", reg=["out.d2x=100"]),                                           # bs4_exp2 (2.1.2)
    "lnln": dict(arch="lnln", hidden_ratio=0.2, reg=["hidden.d2x=0.1", "out.l2=0.1"]),    # bs4_exp1 multeval
    "whatwhere": dict(arch="whatwhere", conv_filters=48, conv_stride=2,                   # bs4_exp6-8 (2.2.5)
                      reg=["conv.d2x=0.1", "conv.max_filt=0.01", "out.l1=0.01"]),
}


def _grid(base: dict, **axes) -> list[dict]:
    """Cartesian product of the axes on top of `base`; an axis value may be a dict of several flags."""
    out = []
    names = list(axes)
    for combo in product(*(axes[n] for n in names)):
        s = dict(base)
        for n, v in zip(names, combo):
            s.update(v if isinstance(v, dict) else {n: v})
        out.append(s)
    return out


_REG_SWEEP = [10, 1, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]

EXPERIMENTS = {
    # experiments_1 (5k epochs, 10 seeds); exp32 (extra hidden layer) is not reproduced.
    "exp1": [dict(model="bl1", region="1,2", epochs=5000, seeds=10),
             dict(model="bl1", region="1,2", n_dog=16, epochs=5000, seeds=10),
             dict(model="bl1", scaling="zscore", epochs=5000, seeds=10),
             dict(model="bl1", dog_act="softplus", epochs=5000, seeds=10),
             dict(model="bl1", scaling="zscore", dog_act="softplus", epochs=5000, seeds=10),
             dict(model="bl1", bias_init="normal", epochs=5000, seeds=10),
             dict(model="bl1", loss="gaussian", epochs=5000, seeds=10)],
    "bs2_exp1": _grid(dict(model="bl2", epochs=5000, seeds=10), lr=[1e-5, 1e-4, 5e-4, 1e-3, 5e-3]),
    "bs3_exp2": [dict(model="bl3", batch_size=b, epochs=int(max(b / 16 * 5000, 5000)), seeds=10)
                 for b in (2, 8, 16, 32, 64, 128, 512, 1024, 1800)],
    "bs3_exp3": _grid(dict(model="bl3", epochs=5000, seeds=10), hidden_ratio=[0.05, 0.1, 0.2, 0.3, 0.4],
                      n_dog=[4, 9, 15, 20, 30]),
    "bs3_exp5": _grid(dict(model="bl3", epochs=5000, seeds=10), hidden_ratio=[0.2, 0.4],
                      reg=[[f"hidden.{t}={lam}", f"out.{t}={lam}"] for t in ("l1", "l2") for lam in _REG_SWEEP]),
    "bs3_exp6": _grid(dict(model="conv", epochs=5000, seeds=10), conv_filters=[9, 20], conv_size=[3, 5, 7, 15, 30]),
    "bs3_exp7": _grid(dict(model="conv", conv_layers=2, epochs=5000, seeds=10), conv_filters=[9, 20],
                      conv_size=[3, 5, 7, 15, 30]),
    "bs3_exp10": _grid(dict(model="bl3", epochs=5000, seeds=10), scaling=["zscore", "x1e6", "raw"], lin_scale=[False, True]),
    "bs3_exp11": _grid(dict(model="bl3", epochs=5000, seeds=10), dropout=[0.0, 0.05, 0.1, 0.2, 0.4, 0.5],
                       hidden_ratio=[0.2, 0.3, 0.4]),
    "bl3_exp12": _grid(dict(model="bl3", epochs=BASELINE_EPOCHS, seeds=10), hidden_ratio=[0.2, 0.3],
                       reg=[[f"hidden.l2={a}", f"out.l2={b}"] for a in (0, 0.05, 0.1, 0.5) for b in (0, 0.05, 0.1, 0.5)]),
    "bs4_exp1": _grid(dict(model="lnln", epochs=5000, seeds=10), hidden_ratio=[0.1, 0.2],
                      reg=[[f"hidden.d2x={a}", f"out.l2={b}"] for a in (0, 0.1, 0.5, 1, 10) for b in (0.1, 0.5)]),
    "bs4_exp2": _grid(dict(model="ln", epochs=5000, seeds=10),
                      reg=[[f"out.d2x={lam}"] for lam in (0, 0.1, 1, 10, 100, 1e3, 1e4, 1e5)]),
    "bs4_exp3": [dict(model="dog_softplus", epochs=5000, seeds=10)],
    "bs4_exp5": _grid(dict(model="conv_sep", epochs=5000, seeds=10), conv_filters=[9, 30], conv_size=[3, 7, 15],
                      reg=[[f"conv.d2x={d}", f"hidden.{t}={lam}", "out.l2=0.1"] for d in (0.01, 0.1)
                           for t in ("l1", "l2") for lam in (0.01, 0.1, 1)]),
    "bs4_exp5_normal": _grid(dict(model="conv_sep", hidden_type="normal", epochs=5000, seeds=10),
                             conv_filters=[9, 30], conv_size=[3, 7, 15],
                             reg=[[f"conv.d2x={d}", f"hidden.{t}={lam}", "out.l2=0.1"] for d in (0.01, 0.1)
                                  for t in ("max", "l2") for lam in (0.01, 0.1, 1)]),
    "bs4_exp6": _grid(dict(model="whatwhere", epochs=5000, seeds=10), conv_stride=[2, 6],
                      reg=[["conv.d2x=0.1", "conv.max_filt=0.01", f"out.{t}={lam}"] for t in ("l1", "l2") for lam in (0.01, 0.1)]),
    "bs4_exp9": _grid(dict(model="conv_dog", conv_act="softplus", epochs=5000, seeds=10), conv_filters=[4, 9, 30],
                      conv_size=[3, 7, 15], hidden_type=["sep", "normal"]),
    "bs4_exp10": _grid(dict(model="conv_dog", conv_act="lin", epochs=5000, seeds=10), conv_filters=[4, 9, 30],
                       conv_size=[3, 7, 15], hidden_type=["sep", "normal"]),
    # experiments_mult1 bs3_exp4/exp9 (3.1.1): pooled regions with masks.
    "mult1": _grid(dict(model="bl4", epochs=5000, seeds=10), region=["1,2", "pooled"], n_dog=[9, 15, 25],
                   hidden_ratio=[0.2, 0.3, 0.4], reg=[[f"out.l2={lam}"] for lam in (0, 0.1, 1)]),
    # experiments_multeval (3.2.1): the five models on every region, 35k epochs, lr 1e-3, 10 seeds.
    "multeval": _grid(dict(epochs=BASELINE_EPOCHS, lr=1e-3, seeds=10), region=["1", "2", "3"],
                      model=["bl2", "bl4", "lnln", "conv_sep", "conv_dog"]),
    # A tiny grid for the tests and for trying the sweep machinery (seconds on CPU).
    "tiny": [dict(model="bl4", epochs=3, seeds=2, eval_every=1, n_dog=4),
             dict(model="ln", epochs=3, seeds=2, eval_every=1)],
}


def parse_reg(entries) -> dict:
    """['out.l2=0.1', 'hidden.d2x=1'] → {'out': {'l2': 0.1}, 'hidden': {'d2x': 1.0}}; a later entry of the same
    LAYER.TYPE wins."""
    reg = {}
    for e in entries or []:
        try:
            lhs, lam = e.split("=")
            layer, kind = lhs.split(".")
            lam = float(lam)
        except ValueError:
            raise UserError(f"--reg {e!r}: expected LAYER.TYPE=λ, e.g. out.l2=0.1") from None
        if layer not in ("conv", "hidden", "out") or kind not in REGULARIZERS:
            raise UserError(f"--reg {e!r}: LAYER must be conv|hidden|out and TYPE one of {list(REGULARIZERS)}")
        reg.setdefault(layer, {})[kind] = lam
    return reg
