"""Image data for supernet training, subnet evaluation and calibration.

One ``LightningDataModule`` serves three sources, all configured by keyword so LightningCLI
can build it from a recipe:

* ``cifar10`` -- an ImageFolder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) given as
  a directory or a ``.tar(.gz)`` archive, or torchvision's download. JPEG decoding of 60k
  images dominates start-up on small machines, so every image is decoded once into uint8
  arrays that are cached as ``.npz`` under ``cache_dir``; later runs load them in well under a
  second.
* ``digits`` -- scikit-learn's bundled 8x8 digits: offline, tiny, for demos and fast tests.
* ``imagefolder`` -- ImageNet-style trees streamed from disk (too large for an array cache).

APQ evaluates thousands of subnets during sample collection; those evaluations must not touch
the test split, so a seeded held-out part of the *training* images is carved out and served as
the validation split (``val_dataloader`` / ``heldout_dataloader``). The test split is for final
reports only.
"""


from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from apq_lightning.data.datasets import (
    CIFAR10_CLASSES,
    DATASET_STATS,
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    ArrayDataset,
    DatasetName,
    TransformSubset,
    crop_padding,
    load_digits_arrays,
    resolve_count,
    seeded_split,
)
from apq_lightning.data.imagetree import (
    ARCHIVE_SUFFIXES,
    CACHE_VERSION,
    ROOT_HINT,
    ImageTreeLayout,
    cache_key,
    decode_image_tree,
    default_cache_dir,
    layout_error,
    load_cache,
    load_cached_classes,
    save_cache,
    scan_image_tree,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The DataModule


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10 / ImageFolder / digits, with a held-out split of the training images.

    ``num_classes``, ``classes`` and ``image_size`` are known right after ``__init__`` so a
    model can be sized before ``setup``. Splits (after ``setup``):

    * train: training images minus held-out, augmented -- ``train_dataloader``
    * held-out: seeded (stratified) part of the training images, not augmented --
      ``val_dataloader`` / ``heldout_dataloader``; subnet evaluation uses it
    * test: the official test split -- ``test_dataloader``; final reports only
    * calibration: seeded subset of the train split, not augmented -- ``calib_dataloader``

    Args:
        dataset: which source.
        root: cifar10: ImageFolder tree or .tar(.gz) of one (``train/`` + ``test/``, optionally
            under one top folder such as ``cifar10/``); imagefolder: tree with ``train/`` and
            ``val/``; ignored by digits.
        image_size: side in pixels (default: cifar10 32, digits 16, imagefolder 224).
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size for held-out / test loaders (default ``batch_size``).
        num_workers: DataLoader workers.
        heldout_size: held-out images taken from the training split, a count or a fraction
            (default: 5000 for the full cifar10, else 10%). 0 disables validation.
        seed: seeds the held-out split, the digits train/test split and ``train_subset``.
        augment: random crop (+ flip except digits) on the train split.
        cache_dir: where decoded arrays are cached (default ``$APQ_CACHE_DIR`` or
            ``~/.cache/apq_lightning``).
        download: cifar10 without ``root``: download through torchvision into ``cache_dir``.
        train_subset: keep only N training images (a seeded, class-balanced choice, since the
            source is ordered by class) before the held-out split -- for quick tests and demos.
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        heldout_size: int | float | None = None,
        seed: int = 0,
        augment: bool = True,
        cache_dir: str | None = None,
        download: bool = False,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = Path(root).expanduser() if root is not None else None
        self.image_size = int(image_size or DEFAULT_IMAGE_SIZE[dataset])
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.heldout_size = heldout_size
        self.seed = seed
        self.augment = augment
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.download = download
        self.train_subset = train_subset
        self.mean, self.std = DATASET_STATS[dataset]

        self._layout: ImageTreeLayout | None = None
        self._cache_path: Path | None = None
        self.classes: list[str] = self._discover_classes()
        self.num_classes: int = len(self.classes)

        self.train_set: Dataset | None = None
        self.heldout_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_indices: np.ndarray | None = None  # into the (sub-sampled) training split
        self.heldout_indices: np.ndarray | None = None
        self._train_base: Dataset | None = None  # training split, eval transform (calibration)

    # -- discovery (cheap; runs in __init__) -----------------------------------------------

    def _require_root(self) -> Path:
        if self.root is None:
            extra = ""
            if self.dataset == "cifar10":
                extra = ", or set `download: true` (--data.download true) to fetch CIFAR-10"
            raise FileNotFoundError(f"dataset={self.dataset!r} needs `root`. {ROOT_HINT}{extra}.")
        if not self.root.exists():
            extra = ", or set `download: true` to fetch CIFAR-10 into the cache" if self.dataset == "cifar10" else ""
            raise FileNotFoundError(f"data root {str(self.root)!r} does not exist. {ROOT_HINT}{extra}.")
        return self.root

    def _discover_classes(self) -> list[str]:
        if self.dataset == "digits":
            return [str(i) for i in range(10)]
        if self.dataset == "imagefolder":
            root = self._require_root()
            train = root / "train"
            if not train.is_dir():
                raise layout_error(root, (p.name + ("/" if p.is_dir() else "") for p in root.iterdir()), "val")
            classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise ValueError(f"{train} has no class folders")
            return classes
        # cifar10
        if self.root is None and self.download:
            return list(CIFAR10_CLASSES)
        root = self._require_root()
        if root.is_file():  # key from size + mtime: no need to list the archive if cached
            self._cache_path = self._cache_file(cache_key(root))
            cached = load_cached_classes(self._cache_path)
            if cached is not None:
                return cached
        self._layout = scan_image_tree(root)
        if self._cache_path is None:
            self._cache_path = self._cache_file(cache_key(root, self._layout))
        return list(self._layout.classes)

    def _cache_file(self, key: str) -> Path:
        stem = self.root.name if self.root is not None else "cifar10"
        for suf in ARCHIVE_SUFFIXES:
            stem = stem.removesuffix(suf)
        return self.cache_dir / "arrays" / f"{stem}-{key}.npz"

    @property
    def cache_path(self) -> Path | None:
        """The array cache file of a cifar10 ``root`` (None for other sources)."""
        return self._cache_path

    # -- loading ---------------------------------------------------------------------------

    def _cifar_arrays(self) -> dict[str, np.ndarray]:
        """Arrays from the cache, decoding (and caching) on a miss."""
        if self.root is None:
            return self._torchvision_cifar()
        assert self._cache_path is not None
        arrays = load_cache(self._cache_path)
        if arrays is None:
            layout = self._layout or scan_image_tree(self.root)
            arrays = decode_image_tree(layout)
            save_cache(self._cache_path, arrays, {"source": str(self.root.resolve()), "version": CACHE_VERSION})
            log.info("cached %s -> %s", self.root, self._cache_path)
        return arrays

    def _torchvision_cifar(self) -> dict[str, np.ndarray]:
        from torchvision.datasets import CIFAR10

        where = self.cache_dir / "torchvision"
        out: dict[str, np.ndarray] = {}
        for split, train in (("train", True), ("test", False)):
            ds = CIFAR10(str(where), train=train, download=self.download)
            out[f"{split}_x"] = np.ascontiguousarray(ds.data, dtype=np.uint8)
            out[f"{split}_y"] = np.asarray(ds.targets, dtype=np.int64)
            classes = list(ds.classes)
        if classes != sorted(classes):  # keep the ImageFolder (alphabetical) label convention
            remap = np.array([sorted(classes).index(c) for c in classes])
            for split in ("train", "test"):
                out[f"{split}_y"] = remap[out[f"{split}_y"]]
        out["classes"] = np.array(sorted(classes))
        return out

    def prepare_data(self) -> None:
        """Decode + cache (or download) once, on one process per node, before ``setup``."""
        if self.dataset == "cifar10":
            if self.root is None:
                self._torchvision_cifar()
            else:
                assert self._cache_path is not None
                if not self._cache_path.is_file():
                    self._cifar_arrays()

    def setup(self, stage: str | None = None) -> None:
        """Build all splits (idempotent: later calls for other stages reuse them)."""
        if self.train_set is not None:
            return
        if self.dataset == "imagefolder":
            self._setup_imagefolder()
            return
        if self.dataset == "digits":
            images, labels = load_digits_arrays(self.image_size)
            train_idx, test_idx = seeded_split(labels, int(round(0.2 * len(labels))), self.seed)
            train_x, train_y = images[train_idx], labels[train_idx]
            test_x, test_y = images[test_idx], labels[test_idx]
        else:
            a = self._cifar_arrays()
            train_x, train_y, test_x, test_y = a["train_x"], a["train_y"], a["test_x"], a["test_y"]
            classes = [str(c) for c in a["classes"]]
            if classes != self.classes:
                raise RuntimeError(f"classes changed between __init__ and setup: {self.classes} -> {classes}")

        if self.train_subset is not None and self.train_subset < len(train_y):
            _, keep = seeded_split(train_y, self.train_subset, self.seed + 1)
            train_x, train_y = train_x[keep], train_y[keep]
        train_idx, heldout_idx = self._heldout_split(train_y)
        self.train_indices, self.heldout_indices = train_idx, heldout_idx

        train_tf, eval_tf = self.build_transforms(stored_size=train_x.shape[1])
        self.train_set = ArrayDataset(train_x, train_y, train_idx, train_tf)
        self.heldout_set = ArrayDataset(train_x, train_y, heldout_idx, eval_tf)
        self._train_base = ArrayDataset(train_x, train_y, train_idx, eval_tf)
        self.test_set = ArrayDataset(test_x, test_y, None, eval_tf)

    def _heldout_split(self, train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(train_y)
        size = self.heldout_size
        if size is None:
            size = min(5000, round(0.1 * n)) if self.dataset == "cifar10" else 0.1
        return seeded_split(train_y, resolve_count(size, n, "heldout_size"), self.seed)

    def _setup_imagefolder(self) -> None:
        from torchvision.datasets import ImageFolder

        root = self._require_root()
        test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if test_dir is None:
            raise layout_error(root, (p.name + ("/" if p.is_dir() else "") for p in root.iterdir()), "val")
        train_tf, eval_tf = self.build_transforms()
        base = ImageFolder(str(root / "train"))  # transform applied per view
        targets = np.asarray(base.targets, dtype=np.int64)
        idx = np.arange(len(targets))
        if self.train_subset is not None and self.train_subset < len(targets):
            _, idx = seeded_split(targets, self.train_subset, self.seed + 1)
        train_pos, heldout_pos = self._heldout_split(targets[idx])
        self.train_indices, self.heldout_indices = idx[train_pos], idx[heldout_pos]
        self.train_set = TransformSubset(base, self.train_indices, train_tf)
        self.heldout_set = TransformSubset(base, self.heldout_indices, eval_tf)
        self._train_base = TransformSubset(base, self.train_indices, eval_tf)
        test = ImageFolder(str(test_dir), transform=eval_tf)
        if test.classes != base.classes:
            raise ValueError(f"{test_dir} classes differ from {root / 'train'}")
        self.test_set = test

    # -- transforms ------------------------------------------------------------------------

    def build_transforms(self, stored_size: int | None = None) -> tuple[Callable, Callable]:
        """(train, eval) transforms.

        Arrays (cifar10/digits): uint8 CHW tensors -> [resize if the stored size differs] ->
        random crop with scaled padding (+ horizontal flip, not for digits: flipped digits are
        other glyphs) -> float -> normalise. ImageFolder: RandomResizedCrop + flip, and
        Resize(size / 0.875) + CenterCrop for evaluation (the ImageNet convention).
        """
        s = self.image_size
        norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        if self.dataset == "imagefolder":
            train = [v2.RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip()] if self.augment else [
                v2.Resize(int(s / 0.875), antialias=True), v2.CenterCrop(s)]
            eval_ = [v2.Resize(int(s / 0.875), antialias=True), v2.CenterCrop(s)]
            pure = v2.ToPureTensor()
            return v2.Compose([v2.ToImage(), *train, *norm, pure]), v2.Compose([v2.ToImage(), *eval_, *norm, pure])
        resize = [v2.Resize((s, s), antialias=True)] if stored_size not in (None, s) else []
        aug: list = []
        if self.augment:
            aug.append(v2.RandomCrop(s, padding=crop_padding(s)))
            if self.dataset != "digits":
                aug.append(v2.RandomHorizontalFlip())
        return v2.Compose([*resize, *aug, *norm]), v2.Compose([*resize, *norm])

    # -- loaders ---------------------------------------------------------------------------

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _ready(self) -> None:
        if self.train_set is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented; drops the last partial batch (BN statistics and sandwich-rule
        steps behave badly on tiny batches) unless the split is smaller than one batch."""
        self._ready()
        assert self.train_set is not None
        drop_last = len(self.train_set) >= self.batch_size
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out training images (never the test split); empty when ``heldout_size=0``."""
        self._ready()
        assert self.heldout_set is not None
        return self.heldout_dataloader() if len(self.heldout_set) else []

    def test_dataloader(self) -> DataLoader:
        self._ready()
        assert self.test_set is not None
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def heldout_dataloader(self, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
        """Held-out split for subnet evaluation during sample collection and search."""
        self._ready()
        assert self.heldout_set is not None
        return self._loader(self.heldout_set, batch_size or self.eval_batch_size, shuffle=shuffle)

    def calib_dataloader(self, num_batches: int, batch_size: int | None = None, seed: int = 0) -> DataLoader:
        """A fixed, seeded subset of the training split without augmentation.

        For BatchNorm re-calibration of a sampled subnet and for quantizer range calibration:
        the same images every time (so results are reproducible and comparable across subnets),
        from the training split (never held-out or test). Yields ``num_batches`` batches, or
        fewer if the training split is smaller than ``num_batches * batch_size``.
        """
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self._ready()
        assert self._train_base is not None
        bs = batch_size or self.batch_size
        n = min(num_batches * bs, len(self._train_base))
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self._train_base), generator=g)[:n].numpy()
        base = self._train_base
        if isinstance(base, ArrayDataset):
            ds: Dataset = ArrayDataset(base.images, base.labels, base.indices[pick], base.transform)
        else:
            assert isinstance(base, TransformSubset)
            ds = TransformSubset(base.base, base.indices[pick], base.transform)
        return self._loader(ds, bs, shuffle=False)

    def __repr__(self) -> str:
        sizes = ""
        if self.train_set is not None:
            sizes = f", train={len(self.train_set)}, heldout={len(self.heldout_set)}, test={len(self.test_set)}"  # type: ignore[arg-type]
        return f"ImageDataModule({self.dataset!r}, classes={self.num_classes}, image_size={self.image_size}{sizes})"

    # Lightning's __str__ builds every dataloader (and so would load the data): keep it cheap.
    __str__ = __repr__
