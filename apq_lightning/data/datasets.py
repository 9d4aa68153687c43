"""Datasets, splits and the per-dataset constants behind :class:`ImageDataModule`.

Splits are seeded index views of one uint8 array, so train / held-out / calibration share memory
and a split is the same on every rank and every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

DatasetName = Literal["cifar10", "imagefolder", "digits"]
DATASETS: tuple[str, ...] = ("cifar10", "imagefolder", "digits")

DEFAULT_IMAGE_SIZE: dict[str, int] = {"cifar10": 32, "digits": 16, "imagefolder": 224}

# Per-dataset normalisation (RGB, on [0, 1] pixels). Digits: measured over all 1,797 images
# after the 8 -> 16 px bilinear resize (grey, so the three channels agree).
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053, 0.3053, 0.3053), (0.3187, 0.3187, 0.3187)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


def crop_padding(image_size: int) -> int:
    """Random-crop padding scaled from the CIFAR convention (4 px at 32 px)."""
    return max(1, round(4 * image_size / 32))


def seeded_split(
    labels: np.ndarray, size: int, seed: int, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (rest, chosen) with ``len(chosen) == size``.

    Stratified when every class can give at least one image to each side, so a small held-out
    set still covers all classes; otherwise a plain seeded permutation. Both halves are sorted.
    """
    n = len(labels)
    if not 0 <= size <= n:
        raise ValueError(f"cannot take {size} of {n} images")
    if size == 0:
        return np.arange(n), np.arange(0)
    if size == n:
        return np.arange(0), np.arange(n)
    counts = np.bincount(labels) if n else np.zeros(0, int)
    n_cls = int((counts > 0).sum())
    if stratify and counts[counts > 0].min() >= 2 and n_cls <= size <= n - n_cls:
        from sklearn.model_selection import train_test_split

        rest, chosen = train_test_split(
            np.arange(n), test_size=size, stratify=labels, random_state=seed
        )
    else:
        perm = np.random.default_rng(seed).permutation(n)
        chosen, rest = perm[:size], perm[size:]
    return np.sort(rest), np.sort(chosen)


def resolve_count(size: int | float, n: int, what: str) -> int:
    """An absolute count from an int count or a fraction in (0, 1)."""
    if isinstance(size, float) and not size.is_integer():
        if not 0.0 < size < 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1), got {size}")
        return int(round(size * n))
    count = int(size)
    if not 0 <= count < n:
        raise ValueError(f"{what}={count} must be in [0, {n}) for a training split of {n} images")
    return count


def load_digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (N, S, S, 3) uint8 + int64 labels, bilinearly resized."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0))).float()[:, None]
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8)
    images = x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return images, d.target.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Datasets


class ArrayDataset(Dataset):
    """Images held as one (N, H, W, 3) uint8 array, viewed through ``indices``.

    Splits share the array (train / held-out / calibration are index views), and transforms
    run on uint8 CHW tensors, so nothing is copied or converted to float before the crop.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {tuple(self.images.shape)} {self.images.dtype}")
        self.indices = np.arange(len(self.images)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = self.images[j].permute(2, 0, 1)  # HWC -> CHW, still uint8
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy()[self.indices]


class TransformSubset(Dataset):
    """An index view of a dataset returning (PIL image, label), with its own transform.

    Lets train / held-out share one ImageFolder scan yet use different transforms.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | np.ndarray, transform: Callable | None) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[int(self.indices[i])]
        return (self.transform(x) if self.transform is not None else x), y

