"""Data for the mouse_vision models: image folders, the per-objective augmentations, and image + depth pairs.

Layouts read (`--data_root`)
- ImageNet:       root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG (val in class folders)
- Tiny-ImageNet:  root/wnids.txt, root/train/<wnid>/images/*.JPEG, root/val/images + val_annotations.txt
                  (detected by wnids.txt)
- depth pairs:    root/{train,val}/images/<name>.png|jpg and root/{train,val}/depth/<name>.png (16-bit or 8-bit
                  grey, larger = farther; scaled to [0, 1]) or <name>.npy (float H × W)

Augmentations (the release's `model_training/trainer_transforms.py`): every training pipeline crops at 224 px
(`crop`), then resizes to 64 × 64, ToTensor, ImageNet normalisation; evaluation is Resize(256), CenterCrop(224),
Resize(64). With `crop` ≠ 224 (e.g. the embedded 64-px synthetic images) the 256 and the blur kernel scale with it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common import datasets
from common.runtime import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# objective → pipeline (data.pipelines) and number of views
PIPELINE_OF = {"ir": "ir", "simclr": "simclr", "simsiam": "mocov2", "mocov2": "mocov2", "barlow": "barlow",
               "vicreg": "barlow", "rotnet": "supervised", "supervised": "supervised", "ae": "supervised",
               "relloc": "relloc", "depth": "depth"}


def _tail(size):
    return [T.Resize((size, size)), T.ToTensor(), T.Normalize(MEAN, STD)]


def _blur(crop, p):
    k = max(3, int(0.1 * crop) // 2 * 2 + 1)  # ~10% of the crop, odd (23 px at 224)
    return T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=p)


def pipelines(name: str, crop: int = 224, size: int = 64) -> list:
    """The training transform(s) of pipeline `name`: a list with one entry per view."""
    if name == "ir":  # Wu et al.: jitter always applied
        return [T.Compose([T.RandomResizedCrop(crop, scale=(0.2, 1.0)), T.RandomGrayscale(0.2),
                           T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip(), *_tail(size)])]
    if name == "simclr":
        t = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(),
                       T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
                       _blur(crop, 0.5), *_tail(size)])
        return [t, t]
    if name == "mocov2":
        t = T.Compose([T.RandomResizedCrop(crop, scale=(0.2, 1.0)),
                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                       _blur(crop, 0.5), T.RandomHorizontalFlip(), *_tail(size)])
        return [t, t]
    if name == "barlow":  # two asymmetric pipelines (blur 1.0 / 0.1, solarize 0 / 0.2)
        def one(blur_p, sol_p):
            return T.Compose([T.RandomResizedCrop(crop, interpolation=T.InterpolationMode.BICUBIC),
                              T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                              T.RandomGrayscale(0.2), _blur(crop, blur_p), T.RandomSolarize(128, p=sol_p),
                              *_tail(size)])
        return [one(1.0, 0.0), one(0.1, 0.2)]
    if name == "supervised":  # supervised, RotNet, autoencoder
        return [T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *_tail(size)])]
    if name == "relloc":  # the patches are cut from the full-resolution crop by the objective
        return [T.Compose([T.Resize(round(crop * 256 / 224)), T.RandomCrop(crop), T.ToTensor(), T.Normalize(MEAN, STD)])]
    raise UserError(f"unknown augmentation pipeline {name!r}")


def eval_transform(crop: int = 224, size: int = 64):
    return T.Compose([T.Resize(round(crop * 256 / 224)), T.CenterCrop(crop), *_tail(size)])


# ----------------------------------------------------------------------------- datasets


def open_images(root, split: str):
    """An ImageNet (class folders) or Tiny-ImageNet (wnids.txt) split as a dataset with .samples/.classes/.targets."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} does not exist or is not a folder (expected an ImageNet root with "
                        f"train/ and val/ class folders, or a Tiny-ImageNet root with wnids.txt)")
    if (root / "wnids.txt").is_file():
        return datasets.TinyImageNet(root, split)
    return datasets.imagenet_split(root, split)


class Views(torch.utils.data.Dataset):
    """(list of augmented views, label, dataset index) — the index addresses the IR memory bank."""

    def __init__(self, base, transforms):
        self.base, self.transforms = base, list(transforms)
        self.classes, self.targets = base.classes, base.targets

    def __len__(self):
        return len(self.base.samples)

    def __getitem__(self, i):
        path, label = self.base.samples[i]
        img = datasets.load_image(path)
        return [t(img) for t in self.transforms], label, i


def _read_depth(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            d = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
            d = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read depth map {path}: {e}") from None
    if d.ndim != 2 or not np.isfinite(d).all():
        raise UserError(f"depth map {path}: expected a finite H × W array, got shape {d.shape}")
    return d


class DepthPairs(torch.utils.data.Dataset):
    """root/<split>/images/<name>.* with root/<split>/depth/<name>.png|.npy → ([image], depth 1×size×size, index).
    Training: one RandomResizedCrop + flip applied to both, colour jitter to the image only."""

    def __init__(self, root, split: str, train: bool, crop: int = 224, size: int = 64):
        root = Path(root)
        img_dir, depth_dir = root / split / "images", root / split / "depth"
        for d in (img_dir, depth_dir):
            if not d.is_dir():
                raise UserError(f"{d} is missing (expected depth pairs: {split}/images/<name>.* and {split}/depth/<name>.png)")
        self.samples = []
        for p in sorted(q for q in img_dir.iterdir() if q.suffix.lower() in datasets.IMAGE_EXTENSIONS):
            cands = [depth_dir / f"{p.stem}.png", depth_dir / f"{p.stem}.npy"]
            dp = next((c for c in cands if c.is_file()), None)
            if dp is None:
                raise UserError(f"image {p} has no depth map {cands[0]} (or .npy)")
            self.samples.append((p, dp))
        if not self.samples:
            raise UserError(f"{img_dir} holds no images")
        self.train, self.crop, self.size = train, crop, size
        self.classes, self.targets = ["depth"], [0] * len(self.samples)
        self.jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        ip, dp = self.samples[i]
        img = datasets.load_image(ip)
        depth = torch.from_numpy(_read_depth(dp))[None]
        if depth.shape[-2:] != (img.height, img.width):
            raise UserError(f"depth map {dp} is {tuple(depth.shape[-2:])}, its image {ip} is {(img.height, img.width)}")
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            img, depth = TF.crop(img, top, left, h, w), depth[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                img, depth = TF.hflip(img), depth.flip(-1)
            img = self.jitter(img)
        else:
            s = min(img.height, img.width)
            top, left = (img.height - s) // 2, (img.width - s) // 2
            img, depth = TF.crop(img, top, left, s, s), depth[:, top:top + s, left:left + s]
        x = TF.normalize(TF.to_tensor(img.resize((self.size, self.size), Image.BILINEAR)), MEAN, STD)
        depth = F.interpolate(depth[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return [x], depth, i


def write_depth_pairs(root, n_train: int = 80, n_val: int = 20, size: int = 64, seed: int = 0) -> Path:
    """Synthetic image + depth pairs in the layout above: a ground plane receding towards the top of the image
    (depth 0.3 → 1.0) with the class objects of common.synthetic standing on it (their box at the depth of the
    plane at the box's bottom edge). 16-bit PNG depth maps."""
    from common import synthetic

    root = Path(root)
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        x, _, boxes = synthetic.make_class_images(n, 1, size, s)
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        rows = np.linspace(1.0, 0.3, size, dtype=np.float32)[:, None].repeat(size, 1)
        for i, (img, (x0, y0, x1, y1)) in enumerate(zip(x, boxes)):
            d = rows.copy()
            y0, y1, x0, x1 = max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)
            d[y0:y1, x0:x1] = rows[min(y1, size) - 1, 0]
            Image.fromarray(img).save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray((d * 65535).astype(np.uint16)).save(root / split / "depth" / f"{i:05d}.png")
    return root
