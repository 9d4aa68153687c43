"""ImageFolder trees on disk or in a tar archive: find the layout, decode every image once,
cache the uint8 arrays as ``.npz``.

JPEG decoding of 60k CIFAR-10 images dominates start-up on small machines, so images are decoded
once (in a process pool for large trees) and later runs load the cache in well under a second.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar")
CACHE_VERSION = 1  # bump when the cache layout or decoding changes
_DECODE_CHUNK = 1000  # images per worker task; big enough to amortise pickling
_SERIAL_BELOW = 4000  # fewer images than this: a process pool costs more than it saves

ROOT_HINT = (
    "Pass `--data.root PATH` (or `root:` in the recipe) pointing at an ImageFolder tree "
    "(<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg) or a .tar.gz of one"
)


def default_cache_dir() -> Path:
    """Where decoded arrays live: ``$APQ_CACHE_DIR`` or ``~/.cache/apq_lightning``.

    Never beside the data: shared data folders are read-only.
    """
    env = os.environ.get("APQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/apq_lightning").expanduser()


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


def layout_error(root: Path, found: Iterable[str], test_dir: str = "test") -> ValueError:
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
        raise layout_error(root, found)
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
        raise layout_error(path, (p.name + ("/" if p.is_dir() else "") for p in path.iterdir()))
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
            for _cls, f in layout.files[split]:
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

