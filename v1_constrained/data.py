"""Data for the V1-constrained ResNet50s: ImageNet at 64x64, Tiny-ImageNet, Tiny-ImageNet-C.

Everything the network sees is 64x64 with mean/std 0.5 normalisation (the release's `main.py`;
Brain-Score preprocessing uses the same 64 px, mean/std 0.5).

- ImageNet  root/{train,val}/<wnid>/*.JPEG (val already in class folders, labels = sorted wnids)
    train: RandomResizedCrop(224) → Resize(64, 64) → HorizontalFlip → ToTensor → Normalize(0.5, 0.5)
    val:   Resize(256) → CenterCrop(224) → Resize(64, 64) → ToTensor → Normalize(0.5, 0.5)
- Tiny-ImageNet root/wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt
  (read as shipped, or already reorganised into val/<wnid>/ — tiny-val-relayout: the release silently needs the
  latter, else ImageFolder sees one class)
    train: HorizontalFlip → ToTensor → Normalize;  val: Resize(64, 64) → ToTensor → Normalize
- Tiny-ImageNet-C root/<corruption>/<1..5>/<wnid>/*.JPEG: ToTensor → Normalize (the release's eval script)

Readers come from common/datasets.py; the embedded default writes a small synthetic tree in the
Tiny-ImageNet format with common/synthetic.py.
"""
from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T

from common import datasets, synthetic
from common.runtime import UserError

MEAN = STD = (0.5, 0.5, 0.5)
IMAGE_SIZE = 64

# Embedded synthetic Tiny-ImageNet: 10 learnable classes (common.synthetic.make_class_images).
SYNTH_CLASSES, SYNTH_TRAIN_PER_CLASS, SYNTH_VAL_PER_CLASS = 10, 60, 20


def _normalize():
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def imagenet_transform(train: bool):
    if train:
        return T.Compose([T.RandomResizedCrop(224), T.Resize((IMAGE_SIZE, IMAGE_SIZE)),
                          T.RandomHorizontalFlip(), *_normalize()])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.Resize((IMAGE_SIZE, IMAGE_SIZE)), *_normalize()])


def tinyimagenet_transform(train: bool):
    if train:
        return T.Compose([T.RandomHorizontalFlip(), *_normalize()])
    return T.Compose([T.Resize((IMAGE_SIZE, IMAGE_SIZE)), *_normalize()])


def corruption_transform():
    return T.Compose(_normalize())


def detect_dataset(data_root) -> str:
    """'tinyimagenet' when root/wnids.txt exists, else 'imagenet' (used when --dataset is not given)."""
    return "tinyimagenet" if (Path(data_root) / "wnids.txt").is_file() else "imagenet"


def load_split(dataset: str, data_root, split: str, classes=None):
    """The train or val split with the paper's transform. Layout problems → UserError naming the path."""
    train = split == "train"
    if dataset == "tinyimagenet":
        return datasets.TinyImageNet(data_root, split, transform=tinyimagenet_transform(train))
    if dataset == "imagenet":
        return datasets.imagenet_split(data_root, split, transform=imagenet_transform(train), classes=classes)
    raise UserError(f"--dataset must be imagenet or tinyimagenet, got {dataset!r}")


def write_synthetic_tiny(path) -> Path:
    """The embedded default: a genuine Tiny-ImageNet tree (val as shipped, with val_annotations.txt)."""
    return synthetic.write_tiny_imagenet(path, n_classes=SYNTH_CLASSES, n_train_per_class=SYNTH_TRAIN_PER_CLASS,
                                         n_val_per_class=SYNTH_VAL_PER_CLASS, size=IMAGE_SIZE, seed=0)


def ensure_synthetic_tiny(cache_root) -> Path:
    return synthetic.ensure_synthetic(cache_root, "tiny_imagenet_v1", write_synthetic_tiny)


def ensure_synthetic_tiny_c(cache_root, tiny_root, corruptions=None, max_per_class=2) -> Path:
    """Synthetic Tiny-ImageNet-C from the embedded val images: 15 corruptions x 5 severities x
    `max_per_class` images per class (2 keeps the embedded eval_c run short on a CPU)."""
    corruptions = tuple(corruptions or synthetic.CORRUPTIONS)
    name = f"tiny_imagenet_c_v1_{max_per_class}" + ("" if corruptions == tuple(synthetic.CORRUPTIONS)
                                                     else "_" + "-".join(corruptions))

    def writer(path):
        synthetic.write_tiny_imagenet_c(path, tiny_root, corruptions=corruptions, max_per_class=max_per_class)

    return synthetic.ensure_synthetic(cache_root, name, writer)


def corruption_cell(c_root, corruption: str, severity: int, classes):
    """One Tiny-ImageNet-C cell, root/<corruption>/<severity>/<wnid>/*.JPEG, labelled with the training classes."""
    return datasets.ImageFolderDataset(Path(c_root) / corruption / str(severity), corruption_transform(), classes)


def iter_corruptions(c_root, classes, corruptions=None):
    """(corruption, severity, dataset) over a Tiny-ImageNet-C tree, labelled with the training classes."""
    return datasets.iter_tiny_imagenet_c(c_root, transform=corruption_transform(), classes=classes,
                                         corruptions=corruptions)
