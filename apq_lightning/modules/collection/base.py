"""What FP and MP collection share: the supernet, the sampling seed, the images, the records.

A sample reads the same images as every other sample of its run (BatchNorm re-calibration
images, held-out evaluation images, for MP also quantizer calibration images), so they are
decoded, transformed and put on the device once (``cache_images``), and a sample costs its
forward/backward passes and little else. Each record carries the protocol (every setting that
changes the number) and the supernet's hash, which resuming and the sample readers check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import torch

from apq_lightning.collection.measure import cache_batches
from apq_lightning.collection.record import SampleRecord
from apq_lightning.modules.collection.loading import load_collection_supernet
from apq_lightning.space import Subnet

CL = torch.channels_last

Batches = list[tuple[torch.Tensor, torch.Tensor]]
ImageSets = dict[str, tuple[Callable[[], Iterable], int | None]]
"""``name -> (loader factory, max images or None)``: the image sets a sample reads."""


def json_plain(d: dict[str, Any]) -> dict[str, Any]:
    """The dict as it reads back from JSON (tuples -> lists), so stored and live protocols compare equal."""
    return json.loads(json.dumps(d))


def check_count(name: str, value: Any, low: int) -> None:
    """An integer setting ``>= low`` (not a bool), else a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class SubnetCollectionModule(L.LightningModule):
    """What both stages share: the supernet, the sampling seed, cached images, records.

    Args:
        supernet_ckpt: stage-1 checkpoint (loaded with ``weights_only=True``); ``None`` = a
            seeded random supernet (tests, timing), with a warning.
        space: the search space (``None``: the checkpoint's).
        num_classes: linked from the datamodule by the CLI.
        seed: sampling seed: index ``i`` measures the subnet of ``(seed, i)``.
        bn_batches, bn_batch_size: BatchNorm re-calibration images (a fixed, seeded subset of
            the training split without augmentation; the same for every sample).
        eval_images, eval_batch_size: top-1 on the first ``eval_images`` held-out images
            (``None``: all of them).
        channels_last: NHWC models and images (faster convolutions on CPU).
        cache_images: keep the re-calibration and evaluation images on the device for the whole
            run (``False``: stream them through the data loaders for every sample, for image
            sets that do not fit).
    """

    KINDS: tuple[str, ...] = ()

    def __init__(
        self,
        supernet_ckpt: str | None = None,
        space: str | None = None,
        num_classes: int = 10,
        seed: int = 0,
        bn_batches: int = 2,
        bn_batch_size: int = 256,
        eval_images: int | None = 5000,
        eval_batch_size: int = 100,
        channels_last: bool = True,
        cache_images: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("bn_batches", bn_batches), ("bn_batch_size", bn_batch_size),
                            ("eval_batch_size", eval_batch_size)):
            check_count(name, value, 1)
        if eval_images is not None and (
            isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 1
        ):
            raise ValueError(f"eval_images must be an integer >= 1 or null (all held-out images), got {eval_images!r}")
        self.supernet, self.supernet_hash = load_collection_supernet(supernet_ckpt, space, num_classes, seed)
        self.space = self.supernet.space
        self.seed = int(seed)
        self._cache: dict[str, Batches] | None = None
        self._data_protocol: dict[str, Any] = {}

    # ---- data -------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not all(hasattr(dm, a) for a in ("calib_dataloader", "heldout_dataloader", "train_set")):
            raise ValueError(
                f"{type(self).__name__} needs an image datamodule with calib_dataloader / heldout_dataloader "
                "(apq_lightning.data.SampleIndexDataModule)"
            )
        return dm

    def image_sets(self) -> ImageSets:
        """The image sets of a sample (a subclass adds its own): ``bn`` and ``eval``."""
        dm, h = self._datamodule(), self.hparams
        return {
            "bn": (lambda: dm.calib_dataloader(h.bn_batches, h.bn_batch_size), None),
            "eval": (lambda: dm.heldout_dataloader(h.eval_batch_size), self._data_protocol["eval_images"]),
        }

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise ValueError(f"{type(self).__name__} collects samples with `predict`; `{stage}` is not supported")
        dm = self._datamodule()
        dm.setup("predict")
        h = self.hparams
        if h.channels_last:
            self.supernet.to(memory_format=CL)
        heldout = len(dm.heldout_set)
        if heldout == 0:
            raise ValueError("the datamodule has no held-out images (heldout_size=0): collection evaluates on them")
        self._data_protocol = {
            "dataset": dm.dataset,
            "image_size": dm.image_size,
            "data_seed": dm.seed,
            "train_subset": dm.train_subset,
            "heldout_images": heldout,
            "eval_split": "heldout",
            "eval_images": heldout if h.eval_images is None else min(h.eval_images, heldout),
            "bn_batches": h.bn_batches,
            "bn_batch_size": h.bn_batch_size,
        }
        if h.cache_images:
            self._cache = {
                name: cache_batches(make(), n, "cpu", h.channels_last) for name, (make, n) in self.image_sets().items()
            }

    def on_predict_start(self) -> None:
        if self._cache is not None:
            with torch.inference_mode(False):
                self._cache = {
                    name: [(x.to(self.device), y.to(self.device)) for x, y in batches]
                    for name, batches in self._cache.items()
                }

    def batches(self, name: str) -> Batches | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` batches of one image set (cached, or streamed from its loader)."""
        if self._cache is not None:
            return self._cache[name]
        make, max_images = self.image_sets()[name]
        return self._stream(make(), max_images)

    def images(self, name: str) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        """The images alone of one image set."""
        batches = self.batches(name)
        return [x for x, _ in batches] if isinstance(batches, list) else (x for x, _ in batches)

    def bn_images(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        """BatchNorm re-calibration images."""
        return self.images("bn")

    def eval_batches(self) -> Batches | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out ``(images, labels)`` batches, ``eval_images`` of them."""
        return self.batches("eval")

    def _stream(self, loader: Iterable, max_images: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        with torch.inference_mode(False):
            for x, y in loader:
                if max_images is not None:
                    x, y = x[: max_images - seen], y[: max_images - seen]
                x = x.to(self.device)
                yield (x.contiguous(memory_format=CL) if self.hparams.channels_last else x), y.to(self.device)
                seen += len(y)
                if max_images is not None and seen >= max_images:
                    return

    # ---- records ----------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """Every setting that defines the measured number (stored with each record)."""
        return dict(self._data_protocol)

    def sample_identity(self) -> dict[str, Any]:
        """What a record must match to count as already collected (see SampleIndexDataModule)."""
        return {
            "space": self.space.name,
            "supernet_hash": self.supernet_hash,
            "seed": self.seed,
            "protocol": json_plain(self.protocol()),
            "kinds": list(self.KINDS),
        }

    def record(self, subnet: Subnet, acc: float, index: int, kind: str, timing: dict[str, float]) -> SampleRecord:
        """The store's record of one measured sample. ``timing`` also gets ``threads``, the torch
        threads it ran on: a quantized label depends on them (a float sum's order moves values
        across rounding edges; docs/collection.md §5.1), so a store says how to reproduce it."""
        timing = {**timing, "threads": torch.get_num_threads()}
        return SampleRecord.measured(
            subnet, acc, index, self.seed, kind, self.supernet_hash, json_plain(self.protocol()), timing
        )

    def measure(self, index: int) -> SampleRecord:
        """One sample: FPCollectionModule / MPCollectionModule define what is measured."""
        raise NotImplementedError(f"{type(self).__name__} must implement measure(index)")

    def predict_step(self, batch: list[int], batch_idx: int, dataloader_idx: int = 0) -> list[SampleRecord]:
        return [self.measure(int(i)) for i in batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)
