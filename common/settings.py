"""The kit's command-line conventions, in one place: the shared flags every study accepts, the default output
folder, and how a run's settings are decided.

Every study resolves its settings the same way (`resolve`):

    defaults  →  named override layers (a preset, the embedded short schedule, ...)  →  the user's flags

The first that has a value wins from the right: a flag the user gave beats any layer, a later layer beats an
earlier one, and the study's defaults fill the rest. `args.settings_source` records where each value came from
and `print_settings` prints both at start, so "what learning rate did this run use, and why" is answered by one
line of the log and by `args.json`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name → (type, help). Values default to None ("not given": resolved later), except the booleans, --seed,
# --threads and --amp, whose defaults are the same in every study.
SHARED_FLAGS = {
    "epochs": (int, "training epochs"),
    "batch_size": (int, "minibatch size (per process under torchrun)"),
    "lr": (float, "initial learning rate"),
    "log_every": (int, "one progress line (loss, items/s, ETA) every N steps"),
    "device": (str, "cpu, cuda, cuda:1, ... (default: cuda if available)"),
    "seed": (int, "random seed (initialisation, data order, augmentation)"),
    "threads": (int, "CPU intra-op threads (0: torch's default, all cores)"),
    "data_root": (str, "the real data; omit it to run on the embedded synthetic data (written once, in the real format)"),
    "output_root": (str, "run folder (default: the repo's runs/<study>/<mode>, whatever the current folder)"),
}
SHARED_SWITCHES = {
    "compile": "torch.compile the model",
    "resume": "continue the run in --output_root from its last checkpoint (exactly)",
    "overwrite": "replace an existing run in --output_root",
}
AMP_HELP = "autocast on CUDA: bf16, fp16 (with a GradScaler) or off; CPU always computes in fp32"


def default_output_root(study: str, *parts: str) -> str:
    """The repo's `runs/<study>/<parts...>`, the same folder whatever the current working directory."""
    return str(REPO.joinpath("runs", study, *parts))


def add_shared_flags(parser: argparse.ArgumentParser, *, help: dict | None = None, aliases: dict | None = None,
                     amp_default: str = "bf16") -> None:
    """Add the kit's shared flags to `parser` (the study adds its own `--mode`).

    `help[name]` is appended to the flag's generic help (e.g. "paper 100; embedded 3"); `aliases[name]` lists the
    original code's spellings that also set it (e.g. {"epochs": ["--num_epochs"]}). Numeric settings default to
    None, meaning "not given by the user": `resolve` fills them.
    """
    help, aliases = help or {}, aliases or {}
    g = parser.add_argument_group("shared flags (the same in every study of the kit)")
    for name, (typ, text) in SHARED_FLAGS.items():
        default = 0 if name in ("seed", "threads") else None
        extra = f" ({help[name]})" if name in help else ""
        g.add_argument(f"--{name}", *aliases.get(name, []), dest=name, type=typ, default=default, help=text + extra)
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default=amp_default,
                   help=AMP_HELP + f" (default {amp_default})" + (f"; {help['amp']}" if "amp" in help else ""))
    for name, text in SHARED_SWITCHES.items():
        extra = f" ({help[name]})" if name in help else ""
        g.add_argument(f"--{name}", *aliases.get(name, []), action="store_true", help=text + extra)


def resolve(args: argparse.Namespace, defaults: dict, *layers: tuple[str, dict]) -> dict:
    """Decide every setting of `defaults` (and of the layers) on `args`, in place; return them as a dict.

    value = the user's flag if given (the attribute is not None), else the last layer (name, dict) that has the
    key, else `defaults`. `args.settings_source[key]` says which: "flag", a layer's name, or "default".
    Keys without a command-line flag (absent from `args`) are resolved the same way and set on `args` too.
    """
    keys = list(defaults) + [k for _, layer in layers for k in layer if k not in defaults]
    sources = getattr(args, "settings_source", {}) or {}
    out = {}
    for k in keys:
        given = getattr(args, k, None)
        if given is not None:
            value, source = given, "flag"
        else:
            value, source = defaults.get(k), "default"
            for name, layer in layers:
                if k in layer:
                    value, source = layer[k], name
        setattr(args, k, value)
        out[k], sources[k] = value, source
    args.settings_source = sources
    return out


def settings_line(args: argparse.Namespace, keys=None) -> str:
    """'settings: lr 0.1 [paper], epochs 3 [embedded], batch_size 64 [flag], ...' for the resolved keys."""
    src = getattr(args, "settings_source", {})
    keys = list(src) if keys is None else keys
    return "settings: " + ", ".join(f"{k} {getattr(args, k)!r} [{src.get(k, 'flag')}]" for k in keys)


def print_settings(args: argparse.Namespace, keys=None, file=None) -> None:
    print(settings_line(args, keys), file=file or sys.stdout, flush=True)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """A UserError for any of `names` below 1 (epochs, batch sizes, logging intervals...)."""
    from common.runtime import UserError

    for k in names:
        v = getattr(args, k, None)
        if v is not None and v < 1:
            raise UserError(f"--{k} must be ≥ 1, got {v}")


def explicit_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, exclude=()) -> list[str]:
    """The flags whose values differ from the parser's defaults, as argv tokens — what the user set
    explicitly — so a parent process (a sweep) can hand every one of them to its children.

    `exclude`: dests not to forward (e.g. mode, output_root). Store-true flags become the bare option, append
    flags one option per element, nargs lists one option followed by its values.
    """
    out = []
    for action in parser._actions:
        if not action.option_strings or action.dest in exclude or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        opt = action.option_strings[0]  # the kit's name (aliases are listed after it)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out.append(opt)
        elif isinstance(action, argparse._AppendAction):
            for v in value or []:
                out += [opt, str(v)]
        elif isinstance(value, (list, tuple)):
            out += [opt, *map(str, value)]
        elif value is not None:
            out += [opt, str(value)]
    return out
