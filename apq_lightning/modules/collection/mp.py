"""Stage 4: the accuracy of random quantized subnets, by one of two protocols.

* ``short_qat`` (APQ's): extract the subnet, re-calibrate BatchNorm, calibrate the quantizers
  (KL), a short QAT, then BatchNorm re-estimated on the fixed images again (after QAT in train
  mode on augmented batches, its running statistics would mostly come from those batches), and
  top-1. The QAT seed is the *architecture's* (every policy of one architecture sees the same
  data order), so what differs between its policies is the policy.
* ``qfa``: the subnet and policy run inside a quantized-for-all supernet (trained with a
  ``quant`` phase): BatchNorm statistics and activation ranges re-estimated on the fixed images
  (:func:`~apq_lightning.quant.supernet.reestimate_supernet`), then top-1 on the same held-out
  images as FP collection. No training per sample: the cost of an FP sample plus quantization.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from apq_lightning.collection.measure import measure_qfa
from apq_lightning.collection.record import MP_KINDS, SampleRecord
from apq_lightning.collection.sampling import MPSampling, arch_index, mp_subnet, qat_seed
from apq_lightning.metrics import top1
from apq_lightning.modules.collection.base import CL, ImageSets, SubnetCollectionModule, check_count
from apq_lightning.modules.collection.qat import ShortQAT, short_qat
from apq_lightning.quant import check_method, quantize_subnet
from apq_lightning.quant.subnet import FixedBits, clone_float, resolve_fixed_bits
from apq_lightning.quant.supernet import is_batch_quantized
from apq_lightning.space import Subnet
from apq_lightning.supernet import recalibrate_bn

MP_PROTOCOLS: tuple[str, ...] = ("short_qat", "qfa")
"""How an MP sample is measured (see the module docstring)."""


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
        qat_steps, qat_batch_size, lr, momentum, weight_decay: the short QAT
            (:mod:`~apq_lightning.modules.collection.qat`): timm SGD (Nesterov, no decay on
            BN/bias) with a per-step cosine schedule, as QATModule; ``qat_steps: 0`` measures
            post-training quantization.
        kd_ratio, kd_temperature, label_smoothing: QATModule's loss, CE + ``kd_ratio`` × KD
            from the float subnet (a frozen copy taken after BN re-calibration).
        protocol: ``short_qat`` or ``qfa`` (module docstring); ``qfa`` needs a supernet with a
            quant phase and ignores the calibration and QAT settings.
        policy_sampler: ``spread`` (default) or APQ's ``independent`` per-tensor draw.
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
        eval_batch_size: int = 100,
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
        protocol: str = "short_qat",
        policy_sampler: str = "spread",
    ) -> None:
        if protocol not in MP_PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} unknown; allowed: {list(MP_PROTOCOLS)}")
        check_method(method)
        check_count("calib_batches", calib_batches, 1)
        check_count("calib_batch_size", calib_batch_size, 1)
        qat = ShortQAT(qat_steps, qat_batch_size, lr, momentum, weight_decay, kd_ratio, kd_temperature, label_smoothing)
        sampling = MPSampling(arch_policies_fraction, policies_per_arch, uniform_bits, policy_sampler)
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
        if protocol == "qfa" and not is_batch_quantized(self.supernet):
            raise ValueError(
                f"protocol qfa needs a quantized-for-all supernet (trained with a 'quant' phase, e.g. "
                f"recipes/supernet_cifar_qfa.yaml); {supernet_ckpt or 'the random supernet'} has no quant phase: "
                f"train one, or use protocol: short_qat")
        self.qat = qat
        self.sampling = sampling
        self.fixed_bits = resolve_fixed_bits(self.space, fixed_bits)
        self.save_hyperparameters()

    def image_sets(self) -> ImageSets:
        dm, h = self._datamodule(), self.hparams
        calib = (lambda: dm.calib_dataloader(h.calib_batches, h.calib_batch_size), None)
        return {**super().image_sets(), "calib": calib}

    def calib_images(self) -> list[torch.Tensor] | Iterator[torch.Tensor]:
        """Quantizer calibration images."""
        return self.images("calib")

    def protocol(self) -> dict[str, Any]:
        h = self.hparams
        if h.protocol == "qfa":
            return {"stage": "mp", "protocol": "qfa", **self._data_protocol, "fixed_bits": self.fixed_bits,
                    "sampling": self.sampling.to_dict()}
        return {
            "stage": "mp",
            "protocol": "short_qat",
            "qat_seed": "per_architecture",
            "bn_after_qat": True,
            **self._data_protocol,
            "calib_batches": h.calib_batches,
            "calib_batch_size": h.calib_batch_size,
            "method": h.method,
            "fixed_bits": self.fixed_bits,
            "per_channel": h.per_channel,
            **self.qat.protocol(),
            "augment": bool(self._datamodule().augment),
            "sampling": self.sampling.to_dict(),
        }

    def qat_batches(self, seed: int) -> DataLoader:
        """Augmented training batches in a per-sample seeded order (``qat_steps`` of them)."""
        train = self._datamodule().train_set
        g = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(train, num_samples=self.qat.steps * self.qat.batch_size, generator=g)
        return DataLoader(train, batch_size=self.qat.batch_size, sampler=sampler, num_workers=0, drop_last=True)

    def measure(self, index: int) -> SampleRecord:
        kind, subnet = mp_subnet(self.space, self.seed, index, self.sampling)
        if self.hparams.protocol == "qfa":
            return self.measure_qfa(index, kind, subnet)
        return self.measure_short_qat(index, kind, subnet)

    def measure_qfa(self, index: int, kind: str, subnet: Subnet) -> SampleRecord:
        with torch.inference_mode(False):
            res = measure_qfa(self.supernet, subnet, self.bn_images(), self.eval_batches())
        timing = {"total_s": res.total_s, "bn_s": res.bn_s, "calib_s": 0.0, "qat_s": 0.0, "eval_s": res.eval_s}
        return self.record(subnet, res.acc, index, kind, timing)

    def measure_short_qat(self, index: int, kind: str, subnet: Subnet) -> SampleRecord:
        h = self.hparams
        t0 = time.perf_counter()
        seed = qat_seed(self.seed, arch_index(index, self.sampling))
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
            teacher = clone_float(model).eval().requires_grad_(False) if self.qat.kd_ratio > 0 else None
            t2 = time.perf_counter()
            quantize_subnet(
                model, subnet, self.calib_images(), method=h.method, fixed_bits=self.fixed_bits,
                per_channel=h.per_channel,
            )
            t3 = time.perf_counter()
            if self.qat.steps > 0:
                short_qat(model, teacher, self.qat_batches(seed), self.qat, channels_last=h.channels_last)
                recalibrate_bn(model, self.bn_images())  # its own statistics, on the fixed images
            t4 = time.perf_counter()
            acc = top1(model, self.eval_batches())
            t5 = time.perf_counter()
        timing = {"total_s": t5 - t0, "bn_s": t2 - t1, "calib_s": t3 - t2, "qat_s": t4 - t3, "eval_s": t5 - t4}
        return self.record(subnet, acc, index, kind, timing)
