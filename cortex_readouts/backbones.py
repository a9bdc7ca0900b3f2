"""Frozen ImageNet CNNs cut at a named layer, their on-disk feature cache, and the image → response model.

Backbones (the Roelfsema-lab repo's `helper.py` FeatureExtractor hooked one named module and ran the whole net,
classifier included, on every call; here the net runs only up to the deepest requested layer):
- `vgg19`: torchvision VGG-19, the 16 convolutions `features.0 … features.34`, taken after their ReLU (the repo's
  hooks saw post-ReLU values because the next ReLU is in-place).
- `inception`: torchvision GoogLeNet as a STAND-IN for lucid's InceptionV1 (inception5h) that the repo used via
  lucent: conv1/conv2/conv3 ↔ conv2d0/1/2, inception4a–e ↔ mixed4a–e, inception5a/b ↔ mixed5a/b. Same
  architecture family and map sizes (64@112, 64@56, 192@56, 512-832@14, 832/1024@7 at 224 px), different weights
  (torchvision's are BN-Inception-style retrained ones), so layer-wise scores are not the repo's.

Preprocessing (both nets, as the repo): images in [0, 1] resized to `image_size` (224 for real data; no crop)
then ImageNet mean/std. This ignores lucid InceptionV1's native [-117, 138] range, as the repo did.
GoogLeNet is built with `transform_input=True`, as torchvision's ImageNet weights expect.

Spatial pooling: maps larger than `max_map` × `max_map` are average-pooled down to it before caching (the repo kept
224² × 64 maps for features.0: 3.2 M weights per electrode). This bounds memory (VGG conv1-2 would be 36 GB at
22,348 images in fp16) at the price of receptive-field resolution: a readout of a pooled map localises to
(H / max_map) pixels of the map. Cadena et al. 2019 read out a 10 × 10 conv3_1 map.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from common import checkpoint, runtime
from common.runtime import UserError

VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
LAYERS = {
    "vgg19": [f"features.{i}" for i in VGG_CONVS],
    "inception": ["conv1", "conv2", "conv3", "inception4a", "inception4b", "inception4c", "inception4d",
                  "inception4e", "inception5a", "inception5b"],
}
LUCID_NAMES = dict(zip(LAYERS["inception"], ["conv2d0", "conv2d1", "conv2d2", "mixed4a", "mixed4b", "mixed4c",
                                              "mixed4d", "mixed4e", "mixed5a", "mixed5b"]))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FP16_MAX = 65504.0


class Backbone(torch.nn.Module):
    """A frozen CNN as a list of stages, stage k ending at layer LAYERS[name][k] (post-ReLU)."""

    def __init__(self, name: str, net: torch.nn.Module, image_size: int):
        super().__init__()
        self.name, self.image_size = name, image_size
        self.layer_names = LAYERS[name]
        if name == "vgg19":
            stages, start = [], 0
            for i in VGG_CONVS:  # conv i, its ReLU at i + 1; max-pools open the next stage
                stages.append(net.features[start:i + 2])
                start = i + 2
        else:
            g = net
            stages = [torch.nn.Sequential(_TransformInput(g.transform_input), g.conv1),
                      torch.nn.Sequential(g.maxpool1, g.conv2), g.conv3,
                      torch.nn.Sequential(g.maxpool2, g.inception3a, g.inception3b, g.maxpool3, g.inception4a),
                      g.inception4b, g.inception4c, g.inception4d, g.inception4e,
                      torch.nn.Sequential(g.maxpool4, g.inception5a), g.inception5b]
        self.stages = torch.nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: BN/Dropout always in eval mode
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def index(self, layer: str) -> int:
        if layer not in self.layer_names:
            raise UserError(f"--layer {layer!r}: not a layer of {self.name}; expected one of {', '.join(self.layer_names)}")
        return self.layer_names.index(layer)

    def forward(self, images01: torch.Tensor, layers) -> dict:
        """{layer: post-ReLU map} for `layers`, running the net only up to the deepest of them."""
        want = {self.index(layer) for layer in layers}
        x, out = self.preprocess(images01), {}
        for k in range(max(want) + 1):
            x = self.stages[k](x)
            if k in want:
                out[self.layer_names[k]] = x
        return out


class _TransformInput(torch.nn.Module):
    """torchvision GoogLeNet's `transform_input`: ImageNet-normalised input → the (x - 0.5) / 0.5 range its
    ImageNet weights were trained on."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.enabled = enabled

    def forward(self, x):
        if not self.enabled:
            return x
        ch = [x[:, i:i + 1] * (s / 0.5) + (m - 0.5) / 0.5 for i, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))]
        return torch.cat(ch, 1)


def build_backbone(name: str, weights: str | None, image_size: int, seed: int = 0) -> tuple[Backbone, str]:
    """(backbone, weights tag). weights: None → random init (loud warning); 'imagenet' → torchvision's download;
    a path → a local torchvision state_dict (or a dict holding one under 'model' / 'state_dict')."""
    if name not in LAYERS:
        raise UserError(f"--backbone {name!r}: expected one of {', '.join(LAYERS)}")
    ctor = _vgg19_features if name == "vgg19" else torchvision.models.googlenet
    kw = {} if name == "vgg19" else {"aux_logits": False, "transform_input": True, "init_weights": True}
    if weights == "imagenet":
        ctor = torchvision.models.vgg19 if name == "vgg19" else ctor
        net, tag = ctor(weights="IMAGENET1K_V1"), "imagenet"
        if name == "inception":
            net.aux1 = net.aux2 = None
    else:
        torch.manual_seed(seed)  # the same random net in every process of a sweep
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "scipy is slow" note for GoogLeNet's truncated normal init
            net = ctor(weights=None, **kw)
        if weights is None:
            tag = f"random-seed{seed}"
            print(f"WARNING: {name} has RANDOM weights (no --weights given). Its features are not ImageNet "
                  f"features: scores and best layers say nothing about visual cortex. Pass --weights PATH "
                  f"(a torchvision state_dict) or --weights imagenet.", flush=True)
        else:
            path = Path(weights)
            state = checkpoint.load_checkpoint(path)
            sd = state.get("model", state.get("state_dict", state))
            # the classifier (VGG) and auxiliary heads (GoogLeNet) are never run: their weights are not loaded
            sd = {k: v for k, v in checkpoint.clean_state_dict(sd).items()
                  if not k.startswith(("aux1.", "aux2.")) and not (name == "vgg19" and k.startswith("classifier."))}
            checkpoint.load_model_weights(net, {"model": sd})
            tag = f"{path.stem}-{_file_hash(path)}"
    return Backbone(name, net, image_size), tag


def _vgg19_features(weights=None) -> torch.nn.Module:
    """VGG-19's convolutional part only (configuration "E"), initialised as torchvision initialises it
    (Kaiming-normal fan_out, zero bias); the 120 M-parameter classifier is never run, so it is not built."""
    net = torch.nn.Module()
    net.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"], batch_norm=False)
    for m in net.features.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    return net


def _file_hash(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:8]


def pool_map(x: torch.Tensor, max_map: int | None) -> torch.Tensor:
    """Average-pool a map larger than max_map × max_map down to it (see the module docstring)."""
    if max_map and (x.shape[-1] > max_map or x.shape[-2] > max_map):
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], max_map), min(x.shape[-1], max_map)))
    return x


@torch.no_grad()
def layer_shapes(backbone: Backbone, max_map: int | None = None) -> dict:
    """{layer: (C, H, W)} of the (pooled) maps at the backbone's image size, from one dummy image."""
    dev = backbone.mean.device
    out = backbone(torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=dev), backbone.layer_names)
    return {k: tuple(pool_map(v, max_map).shape[1:]) for k, v in out.items()}


# ----------------------------------------------------------------------------- the feature cache


def cache_dir(cache_root, dataset_tag: str, backbone: Backbone, weights_tag: str, max_map) -> Path:
    return Path(cache_root) / "features" / dataset_tag / f"{backbone.name}-{weights_tag}-{backbone.image_size}px-max{max_map}"


def extract_features(backbone: Backbone, loader, layers: list[str], folder: Path, max_map, device, amp: str = "bf16",
                     log_every: int = 20) -> dict:
    """Compute the missing layers of `layers` over every image of `loader` in ONE pass up to the deepest of them,
    and store each as `folder/<layer>.npy` (fp16, [images, C, H, W], memory-mappable). Each file is written under a
    temporary name and renamed when complete, so a crash never leaves a partial cache and two shards computing the
    same layer just write identical bytes. Returns {layer: seconds of the pass shared among the layers}."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [layer for layer in layers if not (folder / f"{layer}.npy").is_file()]
    if not todo:
        return {}
    backbone = backbone.to(device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    n = len(loader.dataset)
    shapes = layer_shapes(backbone, max_map)
    tmp = {layer: folder / f".{layer}.npy.tmp-{os.getpid()}" for layer in todo}
    mm = {layer: np.lib.format.open_memmap(tmp[layer], mode="w+", dtype=np.float16, shape=(n, *shapes[layer]))
          for layer in todo}
    progress = runtime.Progress(len(loader), log_every, prefix=f"features {backbone.name} ({len(todo)} layer(s))")
    t0, i = time.perf_counter(), 0
    with torch.no_grad():
        for x in loader:
            x = x.to(device, non_blocking=True)
            with runtime.autocast(device, amp if amp != "off" else "off"):
                out = backbone(x, todo)
            for layer, v in out.items():  # fp16 on disk: half the bytes; post-ReLU values are ≥ 0, clamp the top
                mm[layer][i:i + len(x)] = pool_map(v.float(), max_map).clamp_max(FP16_MAX).half().cpu().numpy()
            i += len(x)
            progress.update(len(x))
    runtime.synchronize(device)
    seconds = time.perf_counter() - t0
    for layer in todo:
        mm[layer].flush()
        del mm[layer]
        os.replace(tmp[layer], folder / f"{layer}.npy")
    meta = folder / "meta.json"
    if not meta.exists():
        checkpoint.write_json(meta, {"backbone": backbone.name, "image_size": backbone.image_size,
                                     "max_map": max_map, "n_images": n, "shapes": {k: list(v) for k, v in shapes.items()}})
    return {layer: seconds for layer in todo}


def load_features(folder: Path, layer: str) -> np.ndarray:
    p = Path(folder) / f"{layer}.npy"
    if not p.is_file():
        raise UserError(f"feature cache {p} missing")
    return np.load(p, mmap_mode="r")


def dataset_tag(source: str, n_images: int) -> str:
    return hashlib.sha1(f"{Path(source).resolve()}:{n_images}".encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- images → electrode responses


class ResponseModel(torch.nn.Module):
    """preprocessing + backbone up to `layer` + pooling + readout, in eval mode: images in [0, 1] → [n, electrodes].
    This is the `response_fn` MEIs optimise (gradients flow to the images)."""

    def __init__(self, backbone: Backbone, layer: str, readout: torch.nn.Module, max_map):
        super().__init__()
        backbone.index(layer)
        self.backbone, self.layer, self.readout, self.max_map = backbone, layer, readout, max_map
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        feats = pool_map(self.backbone(images01, [self.layer])[self.layer], self.max_map)
        return self.readout(feats)
