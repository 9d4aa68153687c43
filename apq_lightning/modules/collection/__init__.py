"""Sample collection (APQ stages 2 and 4) as LightningModules run by ``trainer.predict``.

``python -m apq_lightning.cli predict --config recipes/collect_fp.yaml`` (or ``collect_mp``):
the :class:`~apq_lightning.data.SampleIndexDataModule` yields sample indices, each
``predict_step`` turns one index into a subnet -- a pure function of ``(seed, index)``
(:mod:`apq_lightning.collection.sampling`) -- measures it and returns a
:class:`~apq_lightning.collection.SampleRecord`, and the
:class:`~apq_lightning.collection.SampleWriter` appends it to the store at once.

* :class:`FPCollectionModule` (stage 2, :mod:`.fp`): activate the float subnet, re-calibrate
  BatchNorm on a few training batches, top-1 on the held-out split. No training.
* :class:`MPCollectionModule` (stage 4, :mod:`.mp`): extract the subnet, re-calibrate BatchNorm,
  quantize it with its bit policy and KL-calibrate the ranges (``quantize_subnet``), a short
  QAT (:mod:`.qat`: QATModule's loss and optimiser), top-1 on the held-out split.

What both share -- the checked supernet and its hash (:mod:`.loading`), the images cached once
per run, the records and their protocol -- is :class:`SubnetCollectionModule` (:mod:`.base`).
"""

from apq_lightning.modules.collection.base import SubnetCollectionModule
from apq_lightning.modules.collection.fp import FPCollectionModule
from apq_lightning.modules.collection.loading import load_collection_supernet
from apq_lightning.modules.collection.mp import MPCollectionModule
from apq_lightning.modules.collection.qat import ShortQAT, short_qat

__all__ = [
    "FPCollectionModule",
    "MPCollectionModule",
    "ShortQAT",
    "SubnetCollectionModule",
    "load_collection_supernet",
    "short_qat",
]
