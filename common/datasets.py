"""Image datasets and in-memory batching shared by the studies.

On-disk layouts read here
- Tiny-ImageNet (as shipped):    root/wnids.txt
                                 root/train/<wnid>/images/*.JPEG      (+ <wnid>_boxes.txt, ignored)
                                 root/val/images/*.JPEG + root/val/val_annotations.txt
                                 (tab-separated: file, wnid, x0, y0, x1, y1)
  A val/ already reorganised into val/<wnid>/[images/]*.JPEG is accepted too. Class index = position in
  the *sorted* wnids of wnids.txt (what torchvision's ImageFolder gives on the train folder).
- ImageNet / any ImageFolder:   root/{train,val}/<wnid>/*.JPEG (val already in class folders).
- Tiny-ImageNet-C:              root/<corruption>/<severity 1..5>/<wnid>/*.JPEG (64×64).

Every layout problem (missing folder or file, a class folder not in wnids.txt, an unreadable image)
raises `common.runtime.UserError` naming the path and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.runtime import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")

# The 15 ImageNet-C corruptions used for Tiny-ImageNet-C evaluation (Hendrycks & Dietterich 2019).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


def load_image(path) -> Image.Image:
    """Open an image as RGB, decoding it fully so a truncated or corrupt file fails here, by name."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a folder (expected {what})")
    return path


class _FileDataset(torch.utils.data.Dataset):
    """(image, label) pairs from a list of (path, label) samples."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = load_image(path)
        return (self.transform(img) if self.transform else img), label


# ----------------------------------------------------------------------------- Tiny-ImageNet


def read_wnids(root) -> list[str]:
    """Sorted wnids of root/wnids.txt (the class order of every Tiny-ImageNet reader here)."""
    f = Path(root) / "wnids.txt"
    if not f.is_file():
        raise UserError(f"{f} is missing (expected a Tiny-ImageNet root with wnids.txt, train/ and val/)")
    wnids = sorted({w.strip() for w in f.read_text().splitlines() if w.strip()})
    if not wnids:
        raise UserError(f"{f} lists no classes")
    return wnids


class TinyImageNet(_FileDataset):
    """Tiny-ImageNet train or val split; labels index the sorted wnids of wnids.txt."""

    def __init__(self, root, split: str = "train", transform=None):
        root = _require_dir(Path(root), "a Tiny-ImageNet root")
        wnids = read_wnids(root)
        if split == "train":
            samples = self._train_samples(root, wnids)
        elif split == "val":
            samples = self._val_samples(root, wnids)
        else:
            raise UserError(f"Tiny-ImageNet split must be 'train' or 'val', got {split!r}")
        if not samples:
            raise UserError(f"{root / split} holds no images")
        self.root, self.split = root, split
        super().__init__(samples, wnids, transform)

    @staticmethod
    def _check_class_dirs(folder: Path, wnids: list[str]) -> None:
        known = set(wnids)
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            if d.name not in known and d.name != "images":
                raise UserError(f"class folder {d} is not listed in {folder.parent / 'wnids.txt'}")

    def _train_samples(self, root: Path, wnids: list[str]):
        train = _require_dir(root / "train", "train/<wnid>/images/*.JPEG")
        self._check_class_dirs(train, wnids)
        samples = []
        for i, w in enumerate(wnids):
            d = train / w
            if not d.is_dir():
                raise UserError(f"{d} is missing (wnids.txt lists {w})")
            samples += [(p, i) for p in _images_in(d)]
        return samples

    def _val_samples(self, root: Path, wnids: list[str]):
        val = _require_dir(root / "val", "val/images + val/val_annotations.txt, or val/<wnid>/")
        ann = val / "val_annotations.txt"
        index = {w: i for i, w in enumerate(wnids)}
        class_dirs = [p for p in val.iterdir() if p.is_dir() and p.name != "images"]
        if ann.is_file() and (val / "images").is_dir():
            samples = []
            for n, line in enumerate(ann.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 2:
                    raise UserError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>bbox', got {line!r}")
                fname, wnid = parts[0].strip(), parts[1].strip()
                if wnid not in index:
                    raise UserError(f"{ann}:{n}: wnid {wnid} is not listed in {root / 'wnids.txt'}")
                path = val / "images" / fname
                if not path.is_file():
                    raise UserError(f"{ann}:{n}: image {path} is missing")
                samples.append((path, index[wnid]))
            return samples
        if class_dirs:  # already reorganised into val/<wnid>/
            self._check_class_dirs(val, wnids)
            return [(p, index[d.name]) for d in sorted(class_dirs) for p in _images_in(d)]
        raise UserError(f"{ann} is missing and {val} has no class folders (expected val/images + "
                        f"val_annotations.txt as shipped, or val/<wnid>/)")


# ----------------------------------------------------------------------------- ImageFolder / ImageNet


class ImageFolderDataset(_FileDataset):
    """root/<class>/**/*.{JPEG,jpg,png}; class order sorted (or as given by `classes`)."""

    def __init__(self, root, transform=None, classes: list[str] | None = None):
        root = _require_dir(Path(root), "class folders root/<class>/*.JPEG")
        dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not dirs:
            raise UserError(f"{root} has no class folders (expected root/<class>/*.JPEG)")
        if classes is None:
            classes = dirs
        else:
            unknown = set(dirs) - set(classes)
            if unknown:
                raise UserError(f"class folder {root / sorted(unknown)[0]} is not one of the {len(classes)} known classes")
        index = {c: i for i, c in enumerate(classes)}
        samples = [(p, index[d]) for d in dirs for p in _images_in(root / d)]
        if not samples:
            raise UserError(f"{root} holds no images")
        self.root = root
        super().__init__(samples, list(classes), transform)


def imagenet_split(root, split: str, transform=None, classes=None) -> ImageFolderDataset:
    """ImageNet `root/train` or `root/val` (val must already be in class folders)."""
    root = _require_dir(Path(root), "an ImageNet root with train/ and val/")
    return ImageFolderDataset(_require_dir(root / split, f"{split}/<wnid>/*.JPEG"), transform, classes)


def iter_tiny_imagenet_c(root, transform=None, classes: list[str] | None = None, corruptions=None,
                         severities=(1, 2, 3, 4, 5)):
    """Yield (corruption, severity, dataset) over root/<corruption>/<severity>/<wnid>/*.JPEG.

    `corruptions` defaults to the 15 standard names found under root (at least one must be there).
    `classes` should be the training set's class order (sorted wnids) so labels agree with the model.
    """
    root = _require_dir(Path(root), "a Tiny-ImageNet-C root <corruption>/<severity>/<wnid>/")
    if corruptions is None:
        corruptions = [c for c in CORRUPTIONS if (root / c).is_dir()]
        if not corruptions:
            raise UserError(f"{root} holds none of the 15 corruption folders ({', '.join(CORRUPTIONS[:3])}, ...)")
    for c in corruptions:
        for s in severities:
            folder = root / c / str(s)
            if not folder.is_dir():
                raise UserError(f"{folder} is missing (expected severity folders 1..5 under {root / c})")
            yield c, int(s), ImageFolderDataset(folder, transform, classes)


# ----------------------------------------------------------------------------- tensors in memory


class TensorBatcher:
    """Shuffled minibatches from tensors held on one device (no DataLoader workers).

    For small datasets (all neural ones, synthetic image sets): the tensors are moved to `device` once
    and each batch is an index_select. Shuffling is reproducible: epoch e uses a generator seeded with
    (seed, e), so a resumed run sees the same order as an uninterrupted one.

        batches = TensorBatcher(x, y, batch_size=64, device="cuda", seed=0)
        for epoch in range(E):
            batches.set_epoch(epoch)
            for xb, yb in batches: ...
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 device=None, seed: int = 0):
        if not tensors:
            raise ValueError("TensorBatcher needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f"TensorBatcher: tensors differ in length {[len(t) for t in tensors]}")
        self.tensors = [t.to(device) if device is not None else t for t in tensors]
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, int(batch_size), shuffle, drop_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        idx = self.order().to(self.tensors[0].device)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield tuple(t.index_select(0, sel) for t in self.tensors)


def epoch_loader(ds, args, dist, device: torch.device, train: bool, epoch: int = 0, drop_last: bool = False):
    """The DataLoader of one epoch, reproducible from (args.seed, epoch) alone — so a run resumed at an epoch sees
    the batches an uninterrupted run sees. Train: shuffled by a generator seeded with (seed, epoch), or a
    DistributedSampler under torchrun; `drop_last` keeps only full batches (contrastive losses need them).
    Evaluation: ShardSampler, every item on exactly one rank, no padding. Uses args.batch_size / seed / num_workers."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    if train and dist.enabled:
        sampler = torch.utils.data.DistributedSampler(ds, dist.world_size, dist.rank, shuffle=True, seed=args.seed,
                                                      drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif train:
        sampler = torch.utils.data.RandomSampler(ds, generator=g)
    else:
        sampler = ShardSampler(len(ds), dist.rank, dist.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=device.type == "cuda", generator=g, drop_last=train and drop_last)


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank+world, ... with no padding: every sample is evaluated exactly once over ranks
    (exact distributed validation; sum counts with `common.runtime.all_reduce_sum`)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- neural responses


@dataclass
class NeuralResponses:
    """Images shown and the responses they evoked.

    images:    N × C × H × W float
    responses: N × neurons (trial-averaged or single-trial) float
    repeats:   R × N × neurons, optional, NaN where a repeat is missing
    mask:      N × neurons bool, optional (False where a neuron was not recorded, e.g. pooled sessions)
    """

    images: torch.Tensor
    responses: torch.Tensor
    repeats: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    source: str = "<memory>"

    def __post_init__(self):
        self.images = torch.as_tensor(np.asarray(self.images) if not isinstance(self.images, torch.Tensor) else self.images)
        self.responses = torch.as_tensor(self.responses)
        if self.images.ndim != 4:
            raise UserError(f"{self.source}: images must be N × C × H × W, got shape {tuple(self.images.shape)}")
        if self.responses.ndim != 2 or len(self.responses) != len(self.images):
            raise UserError(f"{self.source}: responses must be {len(self.images)} images × neurons, "
                            f"got shape {tuple(self.responses.shape)}")
        if not torch.isfinite(self.images).all():
            raise UserError(f"{self.source}: images contain NaN or inf")
        if not torch.isfinite(self.responses).all():
            raise UserError(f"{self.source}: responses contain NaN or inf")
        if self.repeats is not None:
            self.repeats = torch.as_tensor(self.repeats)
            if self.repeats.ndim != 3 or tuple(self.repeats.shape[1:]) != tuple(self.responses.shape):
                raise UserError(f"{self.source}: repeats must be reps × {len(self.images)} × {self.n_neurons}, "
                                f"got shape {tuple(self.repeats.shape)}")
        if self.mask is not None:
            self.mask = torch.as_tensor(self.mask).bool()
            if tuple(self.mask.shape) != tuple(self.responses.shape):
                raise UserError(f"{self.source}: mask shape {tuple(self.mask.shape)} != responses shape "
                                f"{tuple(self.responses.shape)}")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_neurons(self) -> int:
        return self.responses.shape[1]

    def to(self, device) -> "NeuralResponses":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NeuralResponses(mv(self.images), mv(self.responses), mv(self.repeats), mv(self.mask), self.source)

    def subset(self, idx) -> "NeuralResponses":
        idx = torch.as_tensor(idx, dtype=torch.long)
        sel = lambda t, ax=0: None if t is None else t.index_select(ax, idx.to(t.device))  # noqa: E731
        return NeuralResponses(sel(self.images), sel(self.responses), sel(self.repeats, 1), sel(self.mask), self.source)
