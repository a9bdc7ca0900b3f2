"""The low-resolution (64×64) mouse visual cortex models of Nayebi, Kong et al. (PLOS CB 2023), with the
layer and state-dict names of neuroailab/mouse-vision, so the released checkpoints load strictly.

- `alexnet_bn`    AlexNet with BatchNorm at 64 px, final fc dropped (`imagenet_models/alexnet.py`, AlexNetBN):
                  output 4096; readouts features.3/7/10/13/17, classifier.3/7.
- `dual_stream`   the simplified two-stream MouseNet (`parallel_stream_mousenet.py`, "dual_stream_visp_3x3"):
                  VISp → {ventral, dorsal} → {VISpor, VISam}, plus VISp → {VISpor, VISam} directly; every
                  area sums its incoming branches; output concat[VISpor, VISam] avg-pooled to 6×6 = 18,432.
- `six_stream`    the same graph with six intermediate areas (VISl, VISrl, VISal, VISli, VISpm, VISpl).
- `shi_mousenet`  Shi et al.'s MouseNet (`shi_mousenet.py`): 48 area-to-area connections + input→LGNv, each a
                  convolution whose weight is multiplied by a fixed random binary Gaussian mask; output the 4×4
                  average pool of the seven layer-5 areas = 2,864.
- `shi_mousenet_vispor5`  the same network read out at VISpor5 unpooled (28 × 32 × 32 = 28,672).

The neural-fit code uses `ARCHS`, `build_model`, `readout_layers`, `extract_features` and `load_model_path`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint
from common.runtime import UserError

# ----------------------------------------------------------------------------- AlexNet-BN at 64 px


class AlexNetBN(nn.Module):
    """AlexNet with BatchNorm after every conv and fc (Krizhevsky 2014 "one weird trick" widths), without its
    final 1000-way fc (the self-supervised heads sit on the 4096-d output). At 64 px the conv maps are
    7×7 (features.3) … 1×1 (features.17); AdaptiveAvgPool(6) replicates the 1×1 map 36 times, as released."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),                                                      # 3: 64×7×7
            nn.Conv2d(64, 192, 5, padding=2), nn.BatchNorm2d(192), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),                                                      # 7: 192×3×3
            nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384), nn.ReLU(inplace=True),   # 10: 384×3×3
            nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),   # 13: 256×3×3
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),                                                      # 17: 256×1×1
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),   # 3
            nn.Dropout(), nn.Linear(4096, 4096), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),          # 7
        )
        self.output_dim = 4096

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ----------------------------------------------------------------------------- multi-stream MouseNet


def _conv_bn_relu(cin, cout, k, stride=1, padding=0):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MultiStreamMouseNet(nn.Module):
    """VISp → parallel intermediate areas → {VISpor, VISam}. `model_layers["<source>_<target>"]` is the branch
    from one area to another; an area is the (out-of-place) sum of its incoming branches, each ending in a ReLU.

    The release sums in place onto a ReLU output, which autograd rejects on current torch
    ("modified by an inplace operation"); summing out of place computes the same values (slug inplace-branch-sum)."""

    def __init__(self, streams: tuple[str, ...]):
        super().__init__()
        self.streams = tuple(streams)
        self.model_layers = nn.ModuleDict()
        self.model_layers["input_VISp"] = nn.Sequential(*_conv_bn_relu(3, 64, 11, 4, 2), nn.MaxPool2d(3, 2))
        for s in self.streams:  # 64×7×7 → 384×3×3
            self.model_layers[f"VISp_{s}"] = nn.Sequential(*_conv_bn_relu(64, 192, 5, 1, 2), nn.MaxPool2d(3, 2),
                                                           *_conv_bn_relu(192, 384, 3, 1, 1))
        for target in ("VISpor", "VISam"):
            # "visp_3x3": VISp reaches the top areas through a stride-2 3×3 conv (7×7 → 3×3)
            self.model_layers[f"VISp_{target}"] = nn.Sequential(*_conv_bn_relu(64, 256, 3, 2, 0))
            for s in self.streams:
                self.model_layers[f"{s}_{target}"] = nn.Sequential(*_conv_bn_relu(384, 256, 3, 1, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.output_dim = 2 * 256 * 6 * 6
        self.readouts = ["VISp", *self.streams, "VISpor", "VISam"]

    def forward_areas(self, x) -> dict[str, torch.Tensor]:
        L = self.model_layers
        out = {"VISp": L["input_VISp"](x)}
        for s in self.streams:
            out[s] = L[f"VISp_{s}"](out["VISp"])
        for target in ("VISpor", "VISam"):
            total = L[f"VISp_{target}"](out["VISp"])
            for s in self.streams:
                total = total + L[f"{s}_{target}"](out[s])
            out[target] = total
        return out

    def forward(self, x):
        a = self.forward_areas(x)
        return torch.flatten(self.avgpool(torch.cat([a["VISpor"], a["VISam"]], 1)), 1)


# ----------------------------------------------------------------------------- Shi et al.'s MouseNet

# (source_target): (in channels, out channels, gsh = peak connection probability, gsw = Gaussian width in
# pixels, stride) — the 48 connections of Shi et al. (2022, PLOS CB) as tabulated in the release's
# shi_mousenet.py, plus the input → LGNv convolution. Kernel = 2·int(gsw) + 1 (the mask grid); stride-2
# connections (64×64 → 32×32 areas) pad asymmetrically (k//2 − 1 before, k//2 after), stride 1 pads k//2.
SHI_CONNECTIONS = {
    "input_LGNv": (3, 5, 1.0, 4.0, 1),
    "LGNv_VISp4": (5, 22, 1.0, 1.0, 1),
    "VISp4_VISp2/3": (22, 45, 0.1618247181204468, 4.373461393573715, 1),
    "VISp4_VISl4": (22, 9, 0.034912195639630085, 9.829922101651555, 2),
    "VISp4_VISrl4": (22, 7, 0.037577178073911185, 9.62647371280456, 2),
    "VISp4_VISli4": (22, 4, 0.037449852426863633, 9.312342560678996, 2),
    "VISp4_VISpl4": (22, 8, 0.037737549420137274, 9.122277123908836, 2),
    "VISp4_VISal4": (22, 22, 0.04582299564985576, 8.698111152169682, 2),
    "VISp4_VISpor4": (22, 14, 0.015624046737049343, 8.68917420147244, 2),
    "VISp2/3_VISp5": (45, 40, 0.16733836379893013, 1.875687381575286, 1),
    "VISp2/3_VISl4": (45, 9, 0.0357372249704897, 9.648758580007351, 2),
    "VISp2/3_VISrl4": (45, 7, 0.02971095178107225, 10.051600895829274, 2),
    "VISp2/3_VISli4": (45, 4, 0.042097917460472346, 8.982344127733013, 2),
    "VISp2/3_VISpl4": (45, 8, 0.044107426612921594, 8.417906307424047, 2),
    "VISp2/3_VISal4": (45, 22, 0.05825007824673881, 7.881177496505771, 2),
    "VISp2/3_VISpor4": (45, 14, 0.011840275898830133, 9.10446893778518, 2),
    "VISl4_VISl2/3": (9, 22, 0.1618247181204468, 4.908689853497773, 1),
    "VISl4_VISpor4": (9, 14, 0.02228886519414421, 7.210773738657816, 1),
    "VISrl4_VISrl2/3": (7, 17, 0.1618247181204468, 5.757328262821668, 1),
    "VISrl4_VISpor4": (7, 14, 0.10329409855623324, 4.017319565911084, 1),
    "VISli4_VISli2/3": (4, 10, 0.1618247181204468, 8.166830772572673, 1),
    "VISli4_VISpor4": (4, 14, 0.018471083439349053, 9.09279040974996, 1),
    "VISpl4_VISpl2/3": (8, 18, 0.1618247181204468, 8.58362181881933, 1),
    "VISpl4_VISpor4": (8, 14, 0.07510132356117454, 1.3667550904906651, 1),
    "VISal4_VISal2/3": (22, 52, 0.1618247181204468, 6.43880724752149, 1),
    "VISal4_VISpor4": (22, 14, 0.22673891001537122, 1.7552967865784397, 1),
    "VISpor4_VISpor2/3": (14, 34, 0.1618247181204468, 6.233913519810125, 1),
    "VISp5_VISl4": (40, 9, 0.03388534685980559, 9.751817168318247, 2),
    "VISp5_VISrl4": (40, 7, 0.033449050398161526, 9.74783302631345, 2),
    "VISp5_VISli4": (40, 4, 0.03439205629544149, 9.838764315797347, 2),
    "VISp5_VISpl4": (40, 8, 0.04282976789181918, 8.709977858622878, 2),
    "VISp5_VISal4": (40, 22, 0.05152652598864332, 7.482449550640896, 2),
    "VISp5_VISpor4": (40, 14, 0.012734222793549202, 9.33667743711479, 2),
    "VISl2/3_VISl5": (22, 18, 0.16733836379893013, 2.144073754616868, 1),
    "VISl2/3_VISpor4": (22, 14, 0.015374443484884934, 7.128501966356189, 1),
    "VISrl2/3_VISrl5": (17, 14, 0.16733836379893013, 2.43908311658361, 1),
    "VISrl2/3_VISpor4": (17, 14, 0.08197499618177426, 4.0596254132643175, 1),
    "VISli2/3_VISli5": (10, 8, 0.16733836379893013, 3.1801753087496003, 1),
    "VISli2/3_VISpor4": (10, 14, 0.019500176808407967, 8.500519928431299, 1),
    "VISpl2/3_VISpl5": (18, 18, 0.16733836379893013, 2.5469288681099593, 1),
    "VISpl2/3_VISpor4": (18, 14, 0.0502379863688434, 2.3936095353633857, 1),
    "VISal2/3_VISal5": (52, 53, 0.16733836379893013, 2.756878958780832, 1),
    "VISal2/3_VISpor4": (52, 14, 1.2581895617439574, 0.6014396216421058, 1),
    "VISpor2/3_VISpor5": (34, 28, 0.16733836379893013, 1.724692214155501, 1),
    "VISl5_VISpor4": (18, 14, 0.020882959846672787, 7.549486682662879, 1),
    "VISrl5_VISpor4": (14, 14, 0.08328209629620217, 4.306473892530217, 1),
    "VISli5_VISpor4": (8, 14, 0.038070707825689616, 7.820253760755574, 1),
    "VISpl5_VISpor4": (18, 14, 0.08320538639455688, 2.1374090891846036, 1),
    "VISal5_VISpor4": (53, 14, 1.1923705757318432, 0.6768369853389479, 1),
}
# Areas in computation order (the release's `_areas`); each one's inputs are summed in table order.
SHI_AREAS = ("LGNv", "VISp4", "VISp2/3", "VISp5", "VISal4", "VISal2/3", "VISal5", "VISpl4", "VISpl2/3", "VISpl5",
             "VISli4", "VISli2/3", "VISli5", "VISrl4", "VISrl2/3", "VISrl5", "VISl4", "VISl2/3", "VISl5",
             "VISpor4", "VISpor2/3", "VISpor5")
SHI_OUTPUT_AREAS = ("VISp5", "VISl5", "VISrl5", "VISli5", "VISpl5", "VISal5", "VISpor5")


class MaskedConv2d(nn.Conv2d):
    """A convolution whose weight is multiplied by a fixed binary mask (a frozen Parameter, so it is in the
    state dict and counts in `parameters()`, as released). Mask entry (o, i, y, x) is 1 with probability
    gsh·exp(−r²/(2·gsw²)), r the distance from the kernel centre: the Gaussian fall-off of connection
    probability with cortical distance (Shi et al. 2022). The bias is not masked."""

    def __init__(self, cin, cout, gsh, gsw, stride, generator=None):
        k = 2 * int(gsw) + 1
        super().__init__(cin, cout, k, stride=stride, padding=0)
        h = k // 2
        self.pad = (h, h, h, h) if stride == 1 else (h - 1, h, h - 1, h)  # left, right, top, bottom
        r = torch.arange(-h, h + 1, dtype=torch.float64)
        prob = (gsh * torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * gsw ** 2))).float()
        keep = torch.rand(cout, cin, k, k, generator=generator) < prob
        self.mask = nn.Parameter(keep.float(), requires_grad=False)

    def forward(self, x):
        return self._conv_forward(F.pad(x, self.pad), self.weight * self.mask, self.bias)


class ShiMouseNet(nn.Module):
    """Each area = ReLU(BN(sum of its incoming masked convolutions)); LGNv is its convolution alone (its BN
    exists in the state dict but is unused, as released). Readout: `pool` > 0 → adaptive average pool to
    pool×pool of each output area, flattened and concatenated with every new area *prepended* (the release's
    order: VISpor5 first, VISp5 last); pool 0 → the areas unpooled."""

    def __init__(self, output_areas=SHI_OUTPUT_AREAS, pool: int = 4, mask_seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(mask_seed)  # masks are random at build: a trained model's come from its file
        self.Convs = nn.ModuleDict({name: MaskedConv2d(*spec, generator=g) for name, spec in SHI_CONNECTIONS.items()})
        self.BNs = nn.ModuleDict()
        for name, (_, cout, *_r) in SHI_CONNECTIONS.items():
            target = name.split("_")[1]
            if target not in self.BNs:
                self.BNs[target] = nn.BatchNorm2d(cout)
        self.inputs = {a: [c for c in SHI_CONNECTIONS if c.split("_")[1] == a] for a in SHI_AREAS}
        self.output_areas, self.pool = tuple(output_areas), pool
        size = {a: 64 if a in ("LGNv", "VISp4", "VISp2/3", "VISp5") else 32 for a in SHI_AREAS}
        chans = {name.split("_")[1]: spec[1] for name, spec in SHI_CONNECTIONS.items()}
        self.output_dim = sum(chans[a] * (pool * pool if pool else size[a] ** 2) for a in self.output_areas)
        self.readouts = list(SHI_AREAS)

    def forward_areas(self, x) -> dict[str, torch.Tensor]:
        out = {"input": x}
        for area in SHI_AREAS:
            total = None
            for conn in self.inputs[area]:
                y = self.Convs[conn](out[conn.split("_")[0]])
                total = y if total is None else total + y
            out[area] = total if area == "LGNv" else F.relu(self.BNs[area](total))
        del out["input"]
        return out

    def forward(self, x):
        a = self.forward_areas(x)
        feats = [torch.flatten(F.adaptive_avg_pool2d(a[n], self.pool) if self.pool else a[n], 1)
                 for n in self.output_areas]
        return torch.cat(feats[::-1], 1)  # each new area prepended


# ----------------------------------------------------------------------------- registry

SIX_STREAMS = ("VISl", "VISrl", "VISal", "VISli", "VISpm", "VISpl")
ARCHS = {
    "alexnet_bn": AlexNetBN,
    "dual_stream": lambda: MultiStreamMouseNet(("ventral", "dorsal")),
    "six_stream": lambda: MultiStreamMouseNet(SIX_STREAMS),
    "shi_mousenet": lambda: ShiMouseNet(),
    "shi_mousenet_vispor5": lambda: ShiMouseNet(output_areas=("VISpor5",), pool=0),
}
# the release's model names (model_paths.py / get_checkpoints.sh) → ours
RELEASE_NAMES = {"alexnet_bn_ir": "alexnet_bn", "simplified_mousenet_dual_stream_visp_3x3_ir": "dual_stream",
                 "dual_stream_ir": "dual_stream", "six_stream_simclr": "six_stream",
                 "simplified_mousenet_six_stream_visp_3x3_simclr": "six_stream", "shi_mousenet_ir": "shi_mousenet",
                 "shi_mousenet_vispor5_ir": "shi_mousenet_vispor5"}
ALEXNET_READOUTS = ["features.3", "features.7", "features.10", "features.13", "features.17", "classifier.3",
                    "classifier.7"]


def build_model(arch: str) -> nn.Module:
    """A freshly initialised backbone (output `model.output_dim` features per image)."""
    arch = RELEASE_NAMES.get(arch, arch)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    model = ARCHS[arch]()
    model.arch = arch
    return model


def readout_layers(arch: str) -> list[str]:
    """The named layers the paper reads out for neural predictivity (release `model_layers.py`)."""
    arch = RELEASE_NAMES.get(arch, arch)
    if arch == "alexnet_bn":
        return list(ALEXNET_READOUTS)
    if arch == "dual_stream":
        return ["VISp", "ventral", "dorsal", "VISpor", "VISam"]
    if arch == "six_stream":
        return ["VISp", *SIX_STREAMS, "VISpor", "VISam"]
    if arch in ("shi_mousenet", "shi_mousenet_vispor5"):
        return list(SHI_AREAS)
    raise UserError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) as `model.parameters()` counts them (Shi's frozen masks count in the total)."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, layers, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{layer: (N, D) float32 CPU tensor} of the named layers, flattened per image, in eval mode.

    A layer is an area of a multi-stream / Shi model (their `forward_areas`) or the name of any submodule
    (`model.named_modules()`, e.g. "features.3" or a torchvision model's "layer2.1"), read by a forward hook.
    The model's train/eval mode is restored afterwards."""
    model = checkpoint.unwrap_model(model)
    layers = list(layers)
    areas = set(getattr(model, "readouts", [])) if hasattr(model, "forward_areas") else set()
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in areas and n not in modules]
    if unknown:
        known = sorted(areas) if areas else [n for n in modules if n]
        raise UserError(f"unknown layer(s) {', '.join(unknown)} for {type(model).__name__}; known: "
                        f"{', '.join(known[:40])}{' ...' if len(known) > 40 else ''}")
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in layers if n not in areas]
    was_training = model.training
    model.eval()
    out = {n: [] for n in layers}
    try:
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size].to(device)
            captured.clear()
            if areas.intersection(layers):
                a = model.forward_areas(x)
                captured.update({n: a[n] for n in layers if n in areas})
                if len(captured) < len(layers):
                    model(x)
            else:
                model(x)
            for n in layers:
                # a hooked ReLU(inplace) output is the tensor itself: clone before later layers could touch it
                out[n].append(torch.flatten(captured[n], 1).float().cpu().clone())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in out.items()}


def load_model_path(model: nn.Module, path) -> dict:
    """Load a released-style checkpoint into `model` strictly: weights under `model_state_dict` (self-supervised
    trainers), `state_dict` (supervised trainer) or `model` (this kit), optionally `module.`-prefixed; read with
    weights_only=True. Missing / unexpected keys or shapes → UserError naming the file. Returns the file's dict."""
    ckpt = checkpoint.load_checkpoint(path)
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    else:
        sd = ckpt if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else None
    if not sd:
        raise UserError(f"checkpoint {path} holds no model_state_dict / state_dict / model weights")
    sd = checkpoint.clean_state_dict(sd)
    target = checkpoint.unwrap_model(model)
    try:
        target.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(line.strip() for line in str(e).splitlines()[:4])[:600]
        raise UserError(f"checkpoint {path} does not fit {getattr(target, 'arch', type(target).__name__)}: {msg}") from None
    return ckpt
