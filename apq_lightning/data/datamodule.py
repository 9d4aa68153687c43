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

import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

log = logging.getLogger(__name__)

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

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar")
CACHE_VERSION = 1  # bump when the cache layout or decoding changes
_DECODE_CHUNK = 1000  # images per worker task; big enough to amortise pickling
_SERIAL_BELOW = 4000  # fewer images than this: a process pool costs more than it saves

ROOT_HINT = (
    "Pass `--data.root PATH` (or `root:` in the recipe) pointing at an ImageFolder tree "
    "(<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg) or a .tar.gz of one"
)


# --------------------------------------------------------------------------------------------
# Small helpers


def default_cache_dir() -> Path:
    """Where decoded arrays live: ``$APQ_CACHE_DIR`` or ``~/.cache/apq_lightning``.

    Never beside the data: shared data folders are read-only.
    """
    env = os.environ.get("APQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/apq_lightning").expanduser()


def crop_padding(image_size: int) -> int:
    """Random-crop padding scaled from the CIFAR convention (4 px at 32 px)."""
    return max(1, round(4 * image_size / 32))


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


# --------------------------------------------------------------------------------------------
# Locating an ImageFolder layout inside a directory or an archive


@dataclass
class ImageTreeLayout:
    """Where the train/test images of an ImageFolder tree are, found without decoding."""

    root: Path
    is_archive: bool
    classes: list[str]
    test_split: str  # "test", or "val" when the tree has no test/
    counts: dict[str, int]
    prefix: str = ""  # archive member prefix, e.g. "cifar10/"
    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # dir: split -> (cls, path)


def _layout_error(root: Path, found: Iterable[str], test_dir: str = "test") -> ValueError:
    shown = sorted(set(found))
    more = f" (+{len(shown) - 20} more)" if len(shown) > 20 else ""
    return ValueError(
        f"{root} does not hold the expected ImageFolder layout "
        f"'[<top>/]train/<class>/<image>' and '[<top>/]{test_dir}/<class>/<image>'; "
        f"found: {shown[:20] or 'no entries'}{more}"
    )


def _pick_splits(root: Path, splits: dict[str, set[str]], found: Iterable[str]) -> tuple[list[str], str]:
    """Check train + test(or val) exist and the test classes are a subset of the train classes."""
    test_split = "test" if "test" in splits else "val" if "val" in splits else None
    if "train" not in splits or test_split is None:
        raise _layout_error(root, found)
    classes = sorted(splits["train"])  # ImageFolder convention: alphabetical
    unknown = sorted(splits[test_split] - splits["train"])
    if unknown:
        raise ValueError(f"{root}: {test_split}/ has classes missing from train/: {unknown[:10]}")
    return classes, test_split


def scan_archive(path: Path) -> ImageTreeLayout:
    """List an archive's members (no decoding) and locate ``[prefix/]{train,test}/<class>/``."""
    prefixes: set[str] = set()
    splits: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    top: set[str] = set()
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            name = m.name.removeprefix("./")
            parts = name.split("/")
            if len(parts) <= 2:  # for the error message: what the archive holds instead
                top.add(name + ("/" if m.isdir() else ""))
            if not (m.isfile() and _is_image(name)) or len(parts) < 3:
                continue
            split = parts[-3]
            if split not in ("train", "test", "val"):
                continue
            prefixes.add("/".join(parts[:-3]))
            splits.setdefault(split, set()).add(parts[-2])
            counts[split] = counts.get(split, 0) + 1
    if len(prefixes) > 1:
        raise ValueError(f"{path}: several train/test trees in one archive: {sorted(prefixes)}")
    classes, test_split = _pick_splits(path, splits, top)
    prefix = next(iter(prefixes))
    return ImageTreeLayout(
        root=path,
        is_archive=True,
        classes=classes,
        test_split=test_split,
        counts={"train": counts["train"], "test": counts[test_split]},
        prefix=prefix + "/" if prefix else "",
    )


def scan_directory(path: Path) -> ImageTreeLayout:
    """Locate ``train/`` and ``test/`` in ``path`` or in one folder below it (e.g. ``cifar10/``)."""
    base = None
    for cand in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        if (cand / "train").is_dir() and ((cand / "test").is_dir() or (cand / "val").is_dir()):
            base = cand
            break
    if base is None:
        raise _layout_error(path, (p.name + ("/" if p.is_dir() else "") for p in path.iterdir()))
    splits: dict[str, set[str]] = {}
    files: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "test", "val"):
        sdir = base / split
        if not sdir.is_dir():
            continue
        splits[split] = {c.name for c in sdir.iterdir() if c.is_dir() and not c.name.startswith(".")}
        files[split] = [
            (cls, os.path.join(sdir, cls, f))
            for cls in sorted(splits[split])
            for f in sorted(os.listdir(sdir / cls))
            if _is_image(f)
        ]
    classes, test_split = _pick_splits(path, splits, (p.name for p in base.iterdir()))
    return ImageTreeLayout(
        root=path,
        is_archive=False,
        classes=classes,
        test_split=test_split,
        counts={"train": len(files["train"]), "test": len(files[test_split])},
        files={"train": files["train"], "test": files[test_split]},
    )


def scan_image_tree(path: Path) -> ImageTreeLayout:
    if path.is_dir():
        return scan_directory(path)
    if _is_archive(path) or tarfile.is_tarfile(path):
        return scan_archive(path)
    raise ValueError(f"{path} is neither a directory nor a .tar/.tar.gz archive")


def cache_key(path: Path, layout: ImageTreeLayout | None = None) -> str:
    """Identity of a data source: absolute path + size + mtime (of every file, for a tree).

    Any change to the source gives a new key, so a stale cache is never read.
    """
    ap = path.resolve()
    if ap.is_dir():
        assert layout is not None
        h = hashlib.sha1()
        for split in ("train", "test"):
            for cls, f in layout.files[split]:
                st = os.stat(f)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        ident = f"dir|{ap}|{h.hexdigest()}"
    else:
        st = ap.stat()
        ident = f"file|{ap}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(f"v{CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Decoding


def _decode_one(data: bytes, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:  # odd-sized image: bring it to the tree's size
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_chunk(args: tuple[list[bytes], tuple[int, int]]) -> np.ndarray:
    """Pool worker: decode a chunk of encoded images into one (n, H, W, 3) uint8 array."""
    blobs, size = args
    return np.stack([_decode_one(b, size) for b in blobs])


def _iter_archive(layout: ImageTreeLayout) -> Iterator[tuple[str, str, str, bytes]]:
    """Yield (split, class, member name, bytes) for every train/test image, in archive order."""
    test = layout.test_split
    with tarfile.open(layout.root, "r:*") as tf:
        for m in tf:
            name = m.name.removeprefix("./")
            if not (m.isfile() and _is_image(name) and name.startswith(layout.prefix)):
                continue
            parts = name[len(layout.prefix):].split("/")
            if len(parts) != 3 or parts[0] not in ("train", test):
                continue
            fh = tf.extractfile(m)
            assert fh is not None
            yield ("train" if parts[0] == "train" else "test"), parts[1], name, fh.read()


def _iter_directory(layout: ImageTreeLayout) -> Iterator[tuple[str, str, str, bytes]]:
    for split in ("train", "test"):
        for cls, f in layout.files[split]:
            with open(f, "rb") as fh:
                yield split, cls, f, fh.read()


def decode_image_tree(layout: ImageTreeLayout, workers: int | None = None) -> dict[str, np.ndarray]:
    """Decode every train/test image of an ImageFolder tree once, with a progress bar.

    Returns ``{train_x, train_y, test_x, test_y, classes}``; images are (N, H, W, 3) uint8 in
    (class, file name) order, labels int64 indices into the alphabetical class list. All images
    share the size of the first one (odd ones are resized to it), so they stack into one array.

    Reading the archive is single-threaded (gzip), so decoding runs in a forked process pool
    fed chunk by chunk while the main process keeps reading: on 2 cores this overlaps the two.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    items = _iter_archive(layout) if layout.is_archive else _iter_directory(layout)
    cls_index = {c: i for i, c in enumerate(layout.classes)}
    keys: list[tuple[int, int, str]] = []  # (split 0/1, label, name) per decoded image, in order
    first: dict[str, tuple[int, int]] = {}

    def chunks() -> Iterator[tuple[list[bytes], tuple[int, int]]]:
        buf: list[bytes] = []
        for split, cls, name, data in items:
            if not first:
                with Image.open(io.BytesIO(data)) as im:
                    first["size"] = im.size
            keys.append((0 if split == "train" else 1, cls_index[cls], name))
            buf.append(data)
            if len(buf) == _DECODE_CHUNK:
                yield buf, first["size"]
                buf = []
        if buf:
            yield buf, first["size"]

    total = layout.counts["train"] + layout.counts["test"]
    workers = workers if workers is not None else min(_cpu_count(), 8)
    use_pool = workers > 1 and total >= _SERIAL_BELOW and sys.platform.startswith("linux")
    t0 = time.perf_counter()
    parts: list[np.ndarray] = []
    with tqdm(total=total, desc=f"decoding {layout.root.name}", unit="img", smoothing=0.1) as bar:
        if use_pool:
            import multiprocessing as mp

            # fork: the worker needs only PIL/numpy; a spawned child would re-import torch.
            with mp.get_context("fork").Pool(workers) as pool:
                for arr in pool.imap(_decode_chunk, chunks()):
                    parts.append(arr)
                    bar.update(len(arr))
        else:
            for chunk in chunks():
                parts.append(_decode_chunk(chunk))
                bar.update(len(parts[-1]))
    if not keys:
        raise ValueError(f"{layout.root}: no images found under train/ and test/")
    images = np.concatenate(parts)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # deterministic: split, class, name
    split = np.array([keys[i][0] for i in order])
    labels = np.array([keys[i][1] for i in order], dtype=np.int64)
    images = images[np.asarray(order)]
    log.info("decoded %d images from %s in %.1fs", len(images), layout.root, time.perf_counter() - t0)
    return {
        "train_x": images[split == 0],
        "train_y": labels[split == 0],
        "test_x": images[split == 1],
        "test_y": labels[split == 1],
        "classes": np.array(layout.classes),
    }


def save_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write atomically (temp file + rename) so concurrent runs or a crash never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays from a cache file, or None when it is missing or unreadable (then re-decode)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y", "classes")}
    except Exception as err:  # truncated / foreign file: rebuild rather than fail
        log.warning("ignoring unreadable cache %s (%s)", path, err)
        return None
    return out


def load_cached_classes(path: Path) -> list[str] | None:
    """Only the class names from a cache file (cheap: npz members load lazily)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return [str(c) for c in z["classes"]]
    except Exception:
        return None


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
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
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
            extra = ", or set `download: true` (--data.download true) to fetch CIFAR-10" if self.dataset == "cifar10" else ""
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
                raise _layout_error(root, (p.name + ("/" if p.is_dir() else "") for p in root.iterdir()), "val")
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
            raise _layout_error(root, (p.name + ("/" if p.is_dir() else "") for p in root.iterdir()), "val")
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
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=len(self.train_set) >= self.batch_size)

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
