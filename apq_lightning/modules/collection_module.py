"""Sample collection (APQ stages 2 and 4) as LightningModules run by ``trainer.predict``.

``python -m apq_lightning.cli predict --config recipes/collect_fp.yaml`` (or ``collect_mp``):
the :class:`~apq_lightning.collection.SampleIndexDataModule` yields sample indices, each
``predict_step`` turns one index into a subnet -- a pure function of ``(seed, index)``
(:mod:`apq_lightning.collection.sampling`) -- measures it and returns a
:class:`~apq_lightning.collection.SampleRecord`, and the
:class:`~apq_lightning.collection.SampleWriter` appends it to the store at once.

* :class:`FPCollectionModule` (stage 2): activate the float subnet, re-calibrate BatchNorm on
  a few training batches, top-1 on the held-out split. No training.
* :class:`MPCollectionModule` (stage 4): extract the subnet, re-calibrate BatchNorm, quantize
  it with its bit policy and KL-calibrate the ranges (``quantize_subnet``), a short QAT
  (straight-through, cross-entropy + distillation from the float subnet, QATModule's loss and
  optimiser), top-1 on the held-out split.

The images are cached on the device once per run (they are the same for every sample), so a
sample costs its forward/backward passes and little else. Each record carries the protocol
(every setting that changes the number) and the supernet checkpoint's hash, which resuming
and the sample readers check.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from apq_lightning.collection.measure import FP_MODES, FPMode, cache_batches, measure_fp, top1
from apq_lightning.collection.sampling import MPSampling, fp_subnet, mp_subnet, qat_seed
from apq_lightning.collection.store import MP_KINDS, SampleRecord, checkpoint_hash
from apq_lightning.modules.common import distillation_loss
from apq_lightning.modules.supernet_module import load_supernet
from apq_lightning.quant import check_method, quantize_subnet
from apq_lightning.quant.policy import FixedBits, clone_float, resolve_fixed_bits
from apq_lightning.space import Subnet, get_space
from apq_lightning.supernet import Supernet, recalibrate_bn

__all__ = [
    "FPCollectionModule",
    "MPCollectionModule",
    "SubnetCollectionModule",
    "load_collection_supernet",
    "short_qat",
]

CL = torch.channels_last


def load_collection_supernet(
    ckpt: str | None, space: str | None, num_classes: int, seed: int = 0
) -> tuple[Supernet, str]:
    """``(supernet, supernet_hash)``: from a stage-1 checkpoint, or randomly initialised.

    A missing or unreadable checkpoint is a one-line ValueError naming it. Without a checkpoint
    the supernet is seeded (every DDP rank builds the same one) and its hash is that of its
    weights, so samples of a random supernet can never pass for those of a trained one.
    """
    if ckpt is None:
        if space is None:
            raise ValueError(
                "give model.init_args.supernet_ckpt (a stage-1 checkpoint) or, for a random supernet, space"
            )
        msg = (
            f"sample collection from a RANDOMLY INITIALISED {space} supernet (no supernet_ckpt): "
            "accuracies are meaningless except for tests and timing"
        )
        warnings.warn(msg, stacklevel=3)
        rank_zero_only(print)("!! " + msg, flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = Supernet(space, num_classes)
        h = hashlib.sha256()
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return net, "random-" + h.hexdigest()[:10]
    digest = checkpoint_hash(ckpt)
    try:
        net = load_supernet(ckpt)
    except Exception as err:  # torch.load / state-dict errors are long; the user needs the path
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"supernet checkpoint {ckpt!r} is unreadable: {type(err).__name__}: {first}") from None
    if space is not None and get_space(space).name != net.space.name:
        raise ValueError(f"supernet checkpoint {ckpt!r} is for space {net.space.name!r}, but space={space!r}")
    if net.num_classes != num_classes:
        raise ValueError(f"supernet checkpoint {ckpt!r} has {net.num_classes} classes, but the data has {num_classes}")
    return net, digest


def _json_plain(d: dict[str, Any]) -> dict[str, Any]:
    """The dict as it reads back from JSON (tuples -> lists), so stored and live protocols compare equal."""
    return json.loads(json.dumps(d))


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
        eval_batch_size: int = 500,
        channels_last: bool = True,
        cache_images: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("bn_batches", bn_batches, 1),
            ("bn_batch_size", bn_batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if eval_images is not None and (
            isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 1
        ):
            raise ValueError(f"eval_images must be an integer >= 1 or null (all held-out images), got {eval_images!r}")
        self.supernet, self.supernet_hash = load_collection_supernet(supernet_ckpt, space, num_classes, seed)
        self.space = self.supernet.space
        self.seed = int(seed)
        self._bn_images: list[torch.Tensor] | None = None
        self._eval_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._data_protocol: dict[str, Any] = {}

    # ---- data -------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not all(hasattr(dm, a) for a in ("calib_dataloader", "heldout_dataloader", "train_set")):
            raise ValueError(
                f"{type(self).__name__} needs an image datamodule with calib_dataloader / heldout_dataloader "
                "(apq_lightning.collection.SampleIndexDataModule)"
            )
        return dm

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
        n_eval = heldout if h.eval_images is None else min(h.eval_images, heldout)
        self._data_protocol = {
            "dataset": dm.dataset,
            "image_size": dm.image_size,
            "data_seed": dm.seed,
            "train_subset": dm.train_subset,
            "heldout_images": heldout,
            "eval_split": "heldout",
            "eval_images": n_eval,
            "bn_batches": h.bn_batches,
            "bn_batch_size": h.bn_batch_size,
        }
        if h.cache_images:
            self._bn_images = [
                x
                for x, _ in cache_batches(
                    dm.calib_dataloader(h.bn_batches, h.bn_batch_size), None, "cpu", h.channels_last
                )
            ]
            self._eval_batches = cache_batches(dm.heldout_dataloader(h.eval_batch_size), n_eval, "cpu", h.channels_last)

    def on_predict_start(self) -> None:
        if self._bn_images is not None and self._eval_batches is not None:
            with torch.inference_mode(False):
                self._bn_images = [x.to(self.device) for x in self._bn_images]
                self._eval_batches = [(x.to(self.device), y.to(self.device)) for x, y in self._eval_batches]

    def bn_images(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        """BatchNorm re-calibration images (cached, or streamed from the loader)."""
        if self._bn_images is not None:
            return self._bn_images
        h = self.hparams
        return (x for x, _ in self._stream(self._datamodule().calib_dataloader(h.bn_batches, h.bn_batch_size)))

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out ``(images, labels)`` batches, ``eval_images`` of them."""
        if self._eval_batches is not None:
            return self._eval_batches
        loader = self._datamodule().heldout_dataloader(self.hparams.eval_batch_size)
        return self._stream(loader, self._data_protocol["eval_images"])

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
            "protocol": _json_plain(self.protocol()),
            "kinds": list(self.KINDS),
        }

    def record(self, subnet: Subnet, acc: float, index: int, kind: str, timing: dict[str, float]) -> SampleRecord:
        return SampleRecord.measured(
            subnet, acc, index, self.seed, kind, self.supernet_hash, _json_plain(self.protocol()), timing
        )

    def measure(self, index: int) -> SampleRecord:
        """One sample: FPCollectionModule / MPCollectionModule define what is measured."""
        raise NotImplementedError(f"{type(self).__name__} must implement measure(index)")

    def predict_step(self, batch: list[int], batch_idx: int, dataloader_idx: int = 0) -> list[SampleRecord]:
        return [self.measure(int(i)) for i in batch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)


class FPCollectionModule(SubnetCollectionModule):
    """Stage 2: accuracy of random float subnets, BN re-calibrated, no training.

    Args (beyond :class:`SubnetCollectionModule`):
        mode: ``extract`` (default) measures a static copy of the subnet; ``inplace`` runs it
            inside the supernet (no copy; the supernet's BN buffers are overwritten by every
            sample's re-calibration). Same accuracy; the static copy measured ~1.4x faster on
            CPU (the dynamic ops slice weights and transform kernels at every call), see
            ``benchmarks/collect_fp.py``.
    """

    KINDS = ("fp",)

    def __init__(
        self,
        supernet_ckpt: str | None = None,
        space: str | None = None,
        num_classes: int = 10,
        seed: int = 0,
        bn_batches: int = 2,
        bn_batch_size: int = 256,
        eval_images: int | None = 5000,
        eval_batch_size: int = 500,
        channels_last: bool = True,
        cache_images: bool = True,
        mode: FPMode = "extract",
    ) -> None:
        if mode not in FP_MODES:
            raise ValueError(f"mode={mode!r} is not allowed; allowed: {list(FP_MODES)}")
        super().__init__(
            supernet_ckpt,
            space,
            num_classes,
            seed,
            bn_batches,
            bn_batch_size,
            eval_images,
            eval_batch_size,
            channels_last,
            cache_images,
        )
        self.save_hyperparameters()

    def protocol(self) -> dict[str, Any]:
        return {"stage": "fp", **self._data_protocol}

    def measure(self, index: int) -> SampleRecord:
        t0 = time.perf_counter()
        subnet = fp_subnet(self.space, self.seed, index)
        res = measure_fp(
            self.supernet, subnet, self.bn_images(), self.eval_batches(), self.hparams.mode, self.hparams.channels_last
        )
        timing = {"total_s": time.perf_counter() - t0, "bn_s": res.bn_s, "eval_s": res.eval_s, "qat_s": 0.0}
        return self.record(subnet, res.acc, index, "fp", timing)


class MPCollectionModule(SubnetCollectionModule):
    """Stage 4: accuracy of random quantized subnets after calibration and a short QAT.

    Args (beyond :class:`SubnetCollectionModule`):
        arch_policies_fraction, policies_per_arch: the mix of APQ's sampling kinds (see
            :mod:`apq_lightning.collection.sampling`): the share of indices that come in groups of
            ``policies_per_arch`` policies on one random architecture.
        uniform_bits: force a uniform policy (e.g. 4) on every sampled architecture (a study of
            what quantization costs; the records are then all ``mp_random``).
        calib_batches, calib_batch_size, method, fixed_bits, per_channel: quantizer calibration
            as in :func:`~apq_lightning.quant.quantize_subnet` (KL, stem/head at 8 bits).
        qat_steps, qat_batch_size, lr, momentum, weight_decay: the short QAT: timm SGD
            (Nesterov, no decay on BN/bias) with a per-step cosine schedule, as QATModule;
            ``qat_steps: 0`` measures post-training quantization.
        kd_ratio, kd_temperature, label_smoothing: QATModule's loss, CE + ``kd_ratio`` × KD
            from the float subnet (a frozen copy taken after BN re-calibration).
    """

    KINDS = MP_KINDS

    def __init__(
        self,
        supernet_ckpt: str | None = None,
        space: str | None = None,
        num_classes: int = 10,
        seed: int = 0,
        bn_batches: int = 2,
        bn_batch_size: int = 256,
        eval_images: int | None = 2000,
        eval_batch_size: int = 500,
        channels_last: bool = True,
        cache_images: bool = True,
        arch_policies_fraction: float = 0.5,
        policies_per_arch: int = 10,
        uniform_bits: int | None = None,
        calib_batches: int = 4,
        calib_batch_size: int = 128,
        method: str = "kl",
        fixed_bits: FixedBits = "space",
        per_channel: bool = False,
        qat_steps: int = 60,
        qat_batch_size: int = 64,
        lr: float = 0.005,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        kd_ratio: float = 1.0,
        kd_temperature: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        check_method(method)
        for name, value, low in (
            ("calib_batches", calib_batches, 1),
            ("calib_batch_size", calib_batch_size, 1),
            ("qat_steps", qat_steps, 0),
            ("qat_batch_size", qat_batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if lr <= 0 or kd_ratio < 0 or kd_temperature <= 0:
            raise ValueError(
                f"need lr > 0, kd_ratio >= 0, kd_temperature > 0; got lr={lr}, kd_ratio={kd_ratio}, "
                f"kd_temperature={kd_temperature}"
            )
        sampling = MPSampling(arch_policies_fraction, policies_per_arch, uniform_bits)
        super().__init__(
            supernet_ckpt,
            space,
            num_classes,
            seed,
            bn_batches,
            bn_batch_size,
            eval_images,
            eval_batch_size,
            channels_last,
            cache_images,
        )
        if uniform_bits is not None and uniform_bits not in self.space.bit_choices:
            raise ValueError(
                f"uniform_bits={uniform_bits} is not a bit choice of space {self.space.name!r}; "
                f"allowed: {list(self.space.bit_choices)}"
            )
        self.sampling = sampling
        self.fixed_bits = resolve_fixed_bits(self.space, fixed_bits)
        self.save_hyperparameters()
        self._calib_images: list[torch.Tensor] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        h = self.hparams
        if h.cache_images:
            loader = self._datamodule().calib_dataloader(h.calib_batches, h.calib_batch_size)
            self._calib_images = [x for x, _ in cache_batches(loader, None, "cpu", h.channels_last)]

    def on_predict_start(self) -> None:
        super().on_predict_start()
        if self._calib_images is not None:
            with torch.inference_mode(False):
                self._calib_images = [x.to(self.device) for x in self._calib_images]

    def calib_images(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        if self._calib_images is not None:
            return self._calib_images
        h = self.hparams
        return (x for x, _ in self._stream(self._datamodule().calib_dataloader(h.calib_batches, h.calib_batch_size)))

    def protocol(self) -> dict[str, Any]:
        h = self.hparams
        return {
            "stage": "mp",
            **self._data_protocol,
            "calib_batches": h.calib_batches,
            "calib_batch_size": h.calib_batch_size,
            "method": h.method,
            "fixed_bits": self.fixed_bits,
            "per_channel": h.per_channel,
            "qat_steps": h.qat_steps,
            "qat_batch_size": h.qat_batch_size,
            "optimizer": "sgd-nesterov, cosine per step",
            "lr": h.lr,
            "momentum": h.momentum,
            "weight_decay": h.weight_decay,
            "kd_ratio": h.kd_ratio,
            "kd_temperature": h.kd_temperature,
            "label_smoothing": h.label_smoothing,
            "augment": bool(self._datamodule().augment),
            "sampling": self.sampling.to_dict(),
        }

    def qat_batches(self, seed: int) -> DataLoader:
        """Augmented training batches in a per-sample seeded order (``qat_steps`` of them)."""
        h = self.hparams
        train = self._datamodule().train_set
        g = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(train, num_samples=h.qat_steps * h.qat_batch_size, generator=g)
        return DataLoader(train, batch_size=h.qat_batch_size, sampler=sampler, num_workers=0, drop_last=True)

    def measure(self, index: int) -> SampleRecord:
        h = self.hparams
        t0 = time.perf_counter()
        kind, subnet = mp_subnet(self.space, self.seed, index, self.sampling)
        seed = qat_seed(self.seed, index)
        devices = [self.device] if self.device.type == "cuda" else []
        # Predict runs under inference mode; QAT needs autograd, and the data order and
        # augmentation of this sample must not depend on what ran before it.
        with torch.inference_mode(False), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = self.supernet.extract(subnet)
            if h.channels_last:
                model = model.to(memory_format=CL)
            t1 = time.perf_counter()
            recalibrate_bn(model, self.bn_images())
            teacher = clone_float(model).eval().requires_grad_(False) if h.kd_ratio > 0 else None
            t2 = time.perf_counter()
            quantize_subnet(
                model,
                subnet,
                self.calib_images(),
                method=h.method,
                fixed_bits=self.fixed_bits,
                per_channel=h.per_channel,
            )
            t3 = time.perf_counter()
            if h.qat_steps > 0:
                short_qat(
                    model,
                    teacher,
                    self.qat_batches(seed),
                    h.qat_steps,
                    lr=h.lr,
                    momentum=h.momentum,
                    weight_decay=h.weight_decay,
                    kd_ratio=h.kd_ratio,
                    kd_temperature=h.kd_temperature,
                    label_smoothing=h.label_smoothing,
                    channels_last=h.channels_last,
                )
            t4 = time.perf_counter()
            acc = top1(model, self.eval_batches())
            t5 = time.perf_counter()
        timing = {"total_s": t5 - t0, "bn_s": t2 - t1, "calib_s": t3 - t2, "qat_s": t4 - t3, "eval_s": t5 - t4}
        return self.record(subnet, acc, index, kind, timing)


def short_qat(
    model: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Any],
    steps: int,
    lr: float = 0.005,
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    kd_ratio: float = 1.0,
    kd_temperature: float = 1.0,
    label_smoothing: float = 0.0,
    channels_last: bool = True,
) -> int:
    """``steps`` QAT steps of QATModule's recipe on a calibrated quantized model; returns the
    number of steps run. Ranges stay fixed; gradients pass the fake quantizers straight through."""
    device = next(model.parameters()).device
    opt = create_optimizer_v2(model, opt="sgd", lr=lr, weight_decay=weight_decay, momentum=momentum)
    sched = CosineLRScheduler(opt, t_initial=max(1, steps), lr_min=lr * 1e-3, t_in_epochs=False)
    model.train()
    done = 0
    with torch.enable_grad():
        for x, y in batches:
            if done >= steps:
                break
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=CL)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if teacher is not None and kd_ratio > 0:
                with torch.no_grad():
                    t = teacher(x)
                loss = loss + kd_ratio * distillation_loss(logits, t, kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            sched.step_update(num_updates=done)
    model.eval()
    return done
