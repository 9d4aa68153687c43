"""Stage 2: the accuracy of random float subnets, BatchNorm re-calibrated, no training."""

from __future__ import annotations

import time
from typing import Any

from apq_lightning.collection.measure import FP_MODES, FPMode, measure_fp
from apq_lightning.collection.record import SampleRecord
from apq_lightning.collection.sampling import fp_subnet
from apq_lightning.modules.collection.base import SubnetCollectionModule


class FPCollectionModule(SubnetCollectionModule):
    """Stage 2: accuracy of random float subnets, BN re-calibrated, no training.

    Args (beyond :class:`SubnetCollectionModule`):
        mode: ``extract`` (default) measures a static copy of the subnet; ``inplace`` runs it
            inside the supernet (no copy; the supernet's BN buffers are overwritten by every
            sample's re-calibration). Same accuracy; the static copy measured ~1.4x faster on
            CPU (the dynamic ops slice weights and transform kernels at every call), see
            ``benchmarks/collection_cost.py``.
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
        eval_batch_size: int = 100,
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
