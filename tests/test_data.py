"""ImageDataModule: digits, ImageFolder trees/archives through the array cache, error messages,
calibration loader, and the real shared CIFAR-10 archive."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apq_lightning.data import ImageDataModule, default_cache_dir
from apq_lightning.data import datamodule as dmod
from apq_lightning.data.datasets import CIFAR10_CLASSES

CLASSES = ["dog", "ant", "cat"]  # written unsorted: labels must follow alphabetical order
N_TRAIN, N_TEST = 12, 4  # per class


def _write_tree(base: Path, size: int = 32, seed: int = 0) -> Path:
    """A tiny ImageFolder tree of random JPEGs: base/{train,test}/<class>/NNNN.jpg."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for cls in CLASSES:
            d = base / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pix = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pix).save(d / f"{i:04d}.jpg", quality=90)
    return base


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return dest


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return _write_tree(tmp_path / "tree")


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_dtype_and_disjoint_splits() -> None:
    dm = ImageDataModule("digits", batch_size=32, seed=3)
    assert (dm.num_classes, dm.image_size, len(dm.classes)) == (10, 16, 10)  # before setup
    dm.setup("fit")
    n_train, n_held, n_test = len(dm.train_set), len(dm.heldout_set), len(dm.test_set)
    assert n_train + n_held + n_test == 1797
    assert n_test == round(0.2 * 1797)
    assert n_held == round(0.1 * (n_train + n_held))
    assert not set(dm.train_indices) & set(dm.heldout_indices)
    assert sorted(set(dm.train_indices) | set(dm.heldout_indices)) == list(range(n_train + n_held))
    assert set(dm.heldout_set.targets) == set(range(10))  # stratified: every class held out

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == n_train // 32  # drop_last

    # eval images are only normalised: statistics near (0, 1) over the held-out split
    xs = torch.cat([b[0] for b in dm.heldout_dataloader(batch_size=64)])
    assert xs.shape == (n_held, 3, 16, 16)
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1
    assert isinstance(dm.val_dataloader(), torch.utils.data.DataLoader)
    assert len(dm.test_dataloader().dataset) == n_test


def test_digits_heldout_and_subset_options() -> None:
    dm = ImageDataModule("digits", heldout_size=100, train_subset=400, image_size=8)
    dm.setup()
    assert len(dm.heldout_set) == 100 and len(dm.train_set) == 300
    assert dm.train_set.images.shape[1:] == (8, 8, 3)
    assert np.bincount(dm.train_set.targets, minlength=10).min() > 0  # subset is class-balanced

    same = ImageDataModule("digits", heldout_size=100, train_subset=400, image_size=8)
    same.setup()
    assert np.array_equal(dm.heldout_indices, same.heldout_indices)  # seeded
    other = ImageDataModule("digits", heldout_size=100, train_subset=400, image_size=8, seed=1)
    other.setup()
    assert not np.array_equal(dm.heldout_indices, other.heldout_indices)

    none = ImageDataModule("digits", heldout_size=0)
    none.setup()
    assert len(none.heldout_set) == 0 and none.val_dataloader() == []
    with pytest.raises(ValueError, match="heldout_size"):
        ImageDataModule("digits", heldout_size=5000).setup()


def test_augmentation_only_on_train_and_no_flip_for_digits() -> None:
    from torchvision.transforms import v2

    def kinds(t) -> set[type]:
        return {type(m) for m in t.transforms}

    train, eval_ = ImageDataModule("digits").build_transforms()
    assert v2.RandomCrop in kinds(train) and v2.RandomHorizontalFlip not in kinds(train)
    assert not kinds(eval_) & {v2.RandomCrop, v2.RandomHorizontalFlip}
    train, _ = ImageDataModule("cifar10", download=True).build_transforms()
    assert {v2.RandomCrop, v2.RandomHorizontalFlip} <= kinds(train)
    assert next(m for m in train.transforms if isinstance(m, v2.RandomCrop)).padding == [4, 4, 4, 4]
    train, _ = ImageDataModule("digits", augment=False).build_transforms()
    assert v2.RandomCrop not in kinds(train)


def test_calib_dataloader_is_fixed_unaugmented_training_subset() -> None:
    dm = ImageDataModule("digits", batch_size=16)
    loader = dm.calib_dataloader(num_batches=3)  # sets up on demand
    first = list(loader)
    second = list(dm.calib_dataloader(num_batches=3))
    assert len(first) == 3 and all(b[0].shape[0] == 16 for b in first)
    for (xa, ya), (xb, yb) in zip(first, second):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # deterministic: no augmentation
    picked = loader.dataset.indices
    assert set(picked) <= set(dm.train_indices) and not set(picked) & set(dm.heldout_indices)
    # exactly the normalised stored pixels: no crop, no flip
    raw = dm.train_set.images[torch.as_tensor(picked[:16])].permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (dm.mean, dm.std))
    torch.testing.assert_close(first[0][0], (raw - mean) / std)
    other = list(dm.calib_dataloader(num_batches=3, seed=1))
    assert not torch.equal(other[0][0], first[0][0])
    assert len(list(dm.calib_dataloader(num_batches=1, batch_size=40))[0][0]) == 40


# ------------------------------------------------------------- ImageFolder trees and archives


@pytest.mark.parametrize("as_archive", [False, True], ids=["directory", "tar.gz"])
def test_image_tree_through_cache(tmp_path: Path, tree: Path, as_archive: bool, monkeypatch) -> None:
    root = _tar(tree, tmp_path / "tiny.tar.gz", "cifar10") if as_archive else tree
    cache = tmp_path / "cache"
    dm = ImageDataModule("cifar10", root=str(root), cache_dir=str(cache), batch_size=8)
    assert dm.num_classes == 3 and dm.classes == sorted(CLASSES)  # known before setup
    assert dm.cache_path is not None and not dm.cache_path.exists()
    dm.prepare_data()
    dm.setup()
    assert dm.cache_path.is_file() and cache in dm.cache_path.parents
    assert len(dm.train_set) + len(dm.heldout_set) == 3 * N_TRAIN and len(dm.test_set) == 3 * N_TEST
    test_x, test_y = dm.test_set.images.numpy(), dm.test_set.labels.numpy()
    assert test_x.dtype == np.uint8 and test_x.shape == (3 * N_TEST, 32, 32, 3)
    # order: (class alphabetically, file name); pixels are PIL's decode of that file
    expected = [(c, i) for c in sorted(CLASSES) for i in range(N_TEST)]
    for k, (cls, i) in enumerate(expected):
        assert test_y[k] == sorted(CLASSES).index(cls)
        assert np.array_equal(test_x[k], _decoded(tree / "test" / cls / f"{i:04d}.jpg"))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(dmod, "decode_image_tree", no_decode)
    again = ImageDataModule("cifar10", root=str(root), cache_dir=str(cache))
    again.prepare_data()
    again.setup()
    assert again.cache_path == dm.cache_path and again.classes == dm.classes
    assert np.array_equal(again.test_set.images.numpy(), test_x)
    assert np.array_equal(again.train_set.images.numpy(), dm.train_set.images.numpy())


def test_cache_key_follows_source_and_env(tmp_path: Path, tree: Path, monkeypatch) -> None:
    archive = _tar(tree, tmp_path / "tiny.tgz", "cifar10")
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    dm = ImageDataModule("cifar10", root=str(archive))
    assert (tmp_path / "envcache") in dm.cache_path.parents
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed source
    assert ImageDataModule("cifar10", root=str(archive)).cache_path != dm.cache_path


def test_odd_sized_images_and_image_size(tmp_path: Path) -> None:
    tree = _write_tree(tmp_path / "t", size=24)
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tree / "train" / "cat" / "9999.jpg")
    dm = ImageDataModule("cifar10", root=str(tree), cache_dir=str(tmp_path / "c"), image_size=32, batch_size=4)
    dm.setup()
    assert dm.train_set.images.shape[1:] == (24, 24, 3)  # stored at the tree's size
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)  # resized by the transform
    assert next(iter(dm.test_dataloader()))[0].shape[-2:] == (32, 32)


# --------------------------------------------------------------------------- bad input


def test_missing_root_names_path_and_remedy(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    with pytest.raises(FileNotFoundError) as err:
        ImageDataModule("cifar10", root=str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "--data.root" in msg and "download: true" in msg
    with pytest.raises(FileNotFoundError, match="--data.root"):
        ImageDataModule("cifar10")  # no root, no download
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageDataModule("imagefolder", root=str(tmp_path / "nowhere"))


def test_bad_layout_and_unknown_dataset(tmp_path: Path) -> None:
    src = tmp_path / "flat" / "images"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.jpg")
    archive = _tar(src.parent, tmp_path / "flat.tar.gz", "stuff")
    with pytest.raises(ValueError, match=r"train/<class>.*found.*stuff"):
        ImageDataModule("cifar10", root=str(archive))
    only_train = _write_tree(tmp_path / "half")
    for p in sorted((only_train / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (only_train / "test").rmdir()
    with pytest.raises(ValueError, match=r"found.*train/"):
        ImageDataModule("cifar10", root=str(only_train))
    with pytest.raises(ValueError, match="cifar10, imagefolder, digits"):
        ImageDataModule("mnist")  # type: ignore[arg-type]


# ------------------------------------------------------------------ imagefolder + CLI + Lightning


def test_imagefolder_streams_with_resize_crop(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "inet", size=40)
    (root / "test").rename(root / "val")
    dm = ImageDataModule("imagefolder", root=str(root), image_size=32, batch_size=6, heldout_size=6)
    assert dm.num_classes == 3 and dm.image_size == 32
    dm.setup()
    assert (len(dm.train_set), len(dm.heldout_set), len(dm.test_set)) == (30, 6, 12)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    a, b = next(iter(dm.calib_dataloader(1))), next(iter(dm.calib_dataloader(1)))
    assert torch.equal(a[0], b[0])
    assert next(iter(dm.test_dataloader()))[0].shape == (6, 3, 32, 32)


def test_built_by_jsonargparse_like_lightning_cli() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageDataModule, "data")
    cfg = parser.parse_args(["--data.dataset", "digits", "--data.heldout_size", "0.25", "--data.batch_size", "16"])
    dm = ImageDataModule(**cfg.data)
    assert dm.hparams["heldout_size"] == 0.25 and dm.batch_size == 16
    dm.setup()
    assert len(dm.heldout_set) == round(0.25 * (len(dm.train_set) + len(dm.heldout_set)))


def test_lightning_fit_and_test_with_fast_dev_run() -> None:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self, num_classes: int, size: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * size * size, num_classes)

        def _loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def test_step(self, batch, _):
            self.log("test_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageDataModule("digits", batch_size=64)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    model = Probe(dm.num_classes, dm.image_size)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)


# ------------------------------------------------------------------------- real archive


@pytest.mark.shared
@pytest.mark.slow
def test_shared_cifar10_archive(cifar_archive: Path) -> None:
    """The full archive, through the user-level cache (first run decodes for ~15-60 s)."""
    dm = ImageDataModule("cifar10", root=str(cifar_archive), batch_size=256)
    assert dm.num_classes == 10 and dm.classes == list(CIFAR10_CLASSES)
    assert default_cache_dir() in dm.cache_path.parents
    dm.prepare_data()
    dm.setup()
    train_x, test_x = dm.train_set.images, dm.test_set.images
    assert tuple(train_x.shape) == (50_000, 32, 32, 3) and train_x.dtype == torch.uint8
    assert tuple(test_x.shape) == (10_000, 32, 32, 3) and test_x.dtype == torch.uint8
    assert (len(dm.train_set), len(dm.heldout_set), len(dm.test_set)) == (45_000, 5_000, 10_000)
    assert np.bincount(dm.train_set.labels.numpy()).tolist() == [5000] * 10
    assert np.bincount(dm.test_set.labels.numpy()).tolist() == [1000] * 10
    assert np.bincount(dm.heldout_set.targets).tolist() == [500] * 10  # stratified
    xs = torch.cat([b[0] for _, b in zip(range(8), dm.heldout_dataloader(batch_size=500))])
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 0.1  # per-channel normalisation is right
    assert (xs.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
