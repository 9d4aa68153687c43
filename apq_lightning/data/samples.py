"""Predictor training data: ``(encoding, accuracy)`` pairs streamed from sample stores.

Stages 2 and 4 append measured subnets to JSONL *sample stores*
(:mod:`apq_lightning.collection.store`); stages 3 and 5 train accuracy predictors on them. This
datamodule reads those stores (files or glob patterns), refuses records of another space or
supernet (naming file, line and value), splits them and serves dense one-hot features.

Design choices, and why:

* **Split by architecture.** A record's split is a hash of ``split_seed`` and its
  *architecture* key (the subnet without bits), so one architecture is never in two splits —
  not across its bit policies (``mp_arch_policies`` measures one architecture under several),
  not across FP and MP stores, and not as stores grow.
* **A validation split of sensible size.** The hash share alone can be tiny on a small store
  (on the 120-sample CIFAR MP store ``val_fraction: 0.1`` gave 13 samples, 10 of them one
  architecture), and early stopping and every ``val/*`` number would rest on noise. So the
  validation split takes further architectures, in hash order, from the training split until it
  holds ``max(val_fraction·N, min_val_samples)`` samples of at least ``min_val_archs``
  architectures, never more than half of the non-test samples; a store too small for that is
  trained with a warning that says so. The test split is the hash share only. Once a store is
  large enough for the hash share to meet the minimums, a record's split never changes.
* **Incremental reading, by the store's reader.** Each file is read from where the last read
  stopped (:func:`~apq_lightning.collection.reading.read_from` and its cursor: the store's own
  parser and checks, nothing re-implemented here), so ``follow=True`` (re-read at every epoch,
  for a predictor that trains while collection runs) costs only the new lines. A torn last line
  (a write in progress, or a crash) is left for the next read, any other malformed line fails
  with ``file:line``.
* **Refused early.** Without ``follow`` the stores are read when the datamodule is built (the
  CLI turns a refusal into one line): no samples, a single one, all of one accuracy, no
  training sample, or a validation split whose pairwise accuracy would be undefined are errors
  that say what to change, not a crash or a run of NaN metrics.
* **Genomes in memory, features per batch.** Records are kept as integer genomes; each batch
  is one-hot encoded with one vectorised call (the dataset implements ``__getitems__``), so
  80k MP samples cost 80k × 132 integers instead of 80k × 772 floats.
* **Duplicates.** The same measurement read twice (a merged store next to its shards, both
  matched by a glob) counts once; repeated measurements of one subnet with other seeds stay.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from apq_lightning.collection.reading import SameOrigin, StoreCursor, read_from, store_files
from apq_lightning.collection.record import KINDS, SampleRecord
from apq_lightning.data.splits import SmallValidationSplitWarning, SplitRule, _unit_hash, arch_keys
from apq_lightning.encoding import get_encoder
from apq_lightning.space import get_space, to_genomes

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class _Sample:
    genome: np.ndarray
    acc: float
    arch: str
    kind: str
    identity: tuple  # SampleRecord.identity: kind, index, key, seed, protocol


class SampleDataset(Dataset):
    """Genomes + accuracies; items (and batches, via ``__getitems__``) are one-hot features."""

    def __init__(self, genomes: np.ndarray, accs: np.ndarray, space: str, quantized: bool) -> None:
        self.genomes = genomes
        self.accs = torch.as_tensor(accs, dtype=torch.float32)
        self.encoder = get_encoder(space)
        self.quantized = quantized

    def __len__(self) -> int:
        return len(self.accs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        feats = self.encoder.encode_genomes(self.genomes[idx], quantized=self.quantized)
        return torch.from_numpy(feats), self.accs[torch.from_numpy(idx)]


def _batch_collate(batch: Any) -> Any:
    """The dataset already returns whole batches; single items (``batch_size=None``) pass too."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    return torch.utils.data.default_collate(batch)


class SubnetSampleDataModule(L.LightningDataModule):
    """``(features, accuracy)`` batches from sample stores (see the module docstring).

    Args:
        stores: store files, directories or glob patterns (e.g. ``runs/collect_fp_cifar/samples*.jsonl``).
        quantized: ``True`` = full encoding with the bit part (MP predictor; every record needs
            bits); ``False`` = the FP part only (FP predictor, also on MP stores).
        space: expected search space; ``None`` takes the first record's. Records of another
            space are refused.
        supernet_hash: expected ``supernet_hash``; ``None`` takes the first record's. Records
            of another supernet are refused (samples of two checkpoints never mix silently).
        kinds: keep only these record kinds (``fp``, ``mp_random``, ``mp_arch_policies``).
        val_fraction, test_fraction: shares of *architectures* held out (see the split above).
        min_val_samples, min_val_archs: the least the validation split holds (samples,
            distinct architectures) when ``val_fraction > 0``: architectures move from training
            to validation, in hash order, until both hold (see the module docstring).
        split_seed: seed of the split hash and of the ``max_train`` subset.
        max_train: keep at most this many training samples, a deterministic subset (the same
            seed and stores give the same subset; a smaller cap is a subset of a larger one) —
            for data-efficiency studies. ``None`` keeps all.
        batch_size: training and evaluation batch size.
        num_workers: DataLoader workers (0 is right: batches are encoded in one array op).
        follow: re-read the stores (new lines, new files) before every epoch's dataloaders, so
            a predictor can train while collection runs; sets the trainer's
            ``reload_dataloaders_every_n_epochs`` to 1 when it is 0.
    """

    def __init__(
        self,
        stores: list[str],
        quantized: bool = False,
        space: str | None = None,
        supernet_hash: str | None = None,
        kinds: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        min_val_samples: int = 20,
        min_val_archs: int = 8,
        split_seed: int = 0,
        max_train: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        follow: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(stores, (str, os.PathLike)):
            stores = [str(stores)]
        if not stores:
            raise ValueError("SubnetSampleDataModule: `stores` is empty; give sample store files or glob patterns")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction}: each must be in [0, 1) "
                "and their sum below 1"
            )
        if min_val_samples < 0 or min_val_archs < 0:
            raise ValueError(
                f"min_val_samples={min_val_samples} and min_val_archs={min_val_archs}: each must be an integer >= 0"
            )
        if kinds is not None and not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds {sorted(set(kinds) - set(KINDS))} unknown; allowed: {list(KINDS)}")
        if max_train is not None and max_train < 1:
            raise ValueError(f"max_train must be >= 1 or null, got {max_train}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.stores = [str(s) for s in stores]
        self.quantized = bool(quantized)
        # space / supernet_hash: given, or taken from the first record; other records are refused
        self._origin = SameOrigin(get_space(space).name if space is not None else None, supernet_hash,
                                  "data.space", "data.supernet_hash")
        self.kinds = None if kinds is None else set(kinds)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.rule = SplitRule(val_fraction, test_fraction, int(min_val_samples), int(min_val_archs), split_seed)
        self.max_train = max_train
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.follow = follow
        self._cursors: dict[Path, StoreCursor] = {}  # how far each store file has been read
        self._samples: dict[Path, list[_Sample]] = {}  # what was kept of it
        self._seen: set[tuple] = set()
        self._splits: dict[str, SampleDataset] = {}
        self._arch_split: dict[str, str] = {}  # split of every architecture read
        self._version = -1  # number of samples the current splits were built from
        if not follow:  # read now: stores a predictor cannot learn from are refused when the recipe is loaded
            self.refresh()
            self._build()
            self._check_learnable()

    @property
    def space(self) -> str | None:
        """The samples' search space (given, or the first record's)."""
        return self._origin.space

    @property
    def supernet_hash(self) -> str | None:
        """The samples' supernet checkpoint hash (given, or the first record's)."""
        return self._origin.supernet_hash

    # ---- reading -----------------------------------------------------------------------
    def refresh(self) -> int:
        """Read what was appended to the stores since the last call; returns the new samples.

        Each file is read on from its :class:`~apq_lightning.collection.reading.StoreCursor`
        (:func:`~apq_lightning.collection.reading.read_from`); a file replaced or truncated since
        is read anew. A failed read (a refused record) leaves the cursor where it was.
        """
        before = self._count()
        for path in self._files():
            read = read_from(path, self._cursors.get(path), follow=self.follow)
            if read.restarted:
                for s in self._samples.pop(path, []):
                    self._seen.discard(s.identity)
            batch = [(f"{path}:{n}", rec) for n, rec in read.records]
            for where, rec in batch:
                self._origin.check(rec, where)
            self._add(batch, self._samples.setdefault(path, []))
            self._cursors[path] = read.cursor
        return self._count() - before

    def _count(self) -> int:
        return sum(len(v) for v in self._samples.values())

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for pattern in self.stores:
            try:
                found = store_files([pattern])
            except ValueError:
                if not self.follow:  # following: the collection may not have written it yet
                    raise
                found = []
            files += [f for f in found if f not in files]
        return files

    def _add(self, batch: list[tuple[str, SampleRecord]], into: list[_Sample]) -> None:
        """Keep the wanted, unseen records of a batch of parsed lines, as genomes."""
        keep: list[tuple[str, SampleRecord, str]] = []
        for where, rec in batch:
            if self.kinds is not None and rec.kind not in self.kinds:
                continue
            identity = rec.identity
            if identity in self._seen:
                continue
            if self.quantized and rec.subnet.get("bits") is None:
                raise ValueError(
                    f"{where}: a {rec.kind!r} record without bits, but quantized=True needs a bit policy per "
                    "sample (use MP stores, or quantized=false for an FP predictor)"
                )
            self._seen.add(identity)
            keep.append((where, rec, identity))
        if not keep:
            return
        sp = get_space(self.space)
        genomes = to_genomes(sp, [r.subnet for _, r, _ in keep], [w for w, _, _ in keep], dtype=np.int16)
        arch = arch_keys(sp, genomes)
        for (_, rec, identity), g, a in zip(keep, genomes, arch):
            into.append(_Sample(g, rec.acc, a, rec.kind, identity))

    # ---- splits ------------------------------------------------------------------------
    def split_of(self, arch: str) -> str:
        """``train`` / ``val`` / ``test`` of an architecture key (see :func:`arch_key`) in the
        current splits: the hash share, plus the architectures the validation minimums moved."""
        return self._arch_split.get(arch) or self.rule.hash_split(arch)

    def _warn_small_val(self, archs: list[str]) -> None:
        """Say when the validation split misses its minimums (a store too small for them)."""
        short = self.rule.shortfall(archs, self._arch_split)
        if short is None:
            return
        msg = (f"the val split of {self.stores} {short}: its metrics and early stopping rest on few samples; "
               "collect more, or lower min_val_samples / min_val_archs")
        if self.follow:  # a growing store: small at first, by design
            rank_zero_info(msg)
        else:
            warnings.warn(msg, SmallValidationSplitWarning, stacklevel=2)

    def _build(self) -> None:
        samples = [s for v in self._samples.values() for s in v]
        if len(samples) == self._version and self._splits:
            return
        if not samples:
            of_kinds = f" of kinds {sorted(self.kinds)}" if self.kinds is not None else ""
            raise ValueError(
                f"no samples{of_kinds} in the stores {self.stores} (files read: {[str(p) for p in self._cursors]}); "
                "collect samples first (apq predict --config recipes/collect_*.yaml)"
            )
        parts: dict[str, list[_Sample]] = {k: [] for k in SPLITS}
        self._arch_split = self.rule.assign([s.arch for s in samples])
        for s in samples:
            parts[self.split_of(s.arch)].append(s)
        if self.max_train is not None and len(parts["train"]) > self.max_train:
            ranked = sorted(parts["train"], key=lambda s: _unit_hash(self.split_seed, "train", s.identity))
            parts["train"] = ranked[: self.max_train]
        glen = get_space(self.space).genome_length
        for name, items in parts.items():
            genomes = np.stack([s.genome for s in items]) if items else np.zeros((0, glen), dtype=np.int16)
            accs = np.array([s.acc for s in items], dtype=np.float32)
            self._splits[name] = SampleDataset(genomes, accs, self.space, self.quantized)
        self._version = len(samples)
        kinds = Counter(s.kind for s in samples)
        rank_zero_info(
            f"samples: {len(samples)} from {len(self._cursors)} store file(s), space {self.space}, supernet "
            f"{self.supernet_hash}, kinds {dict(kinds)}; train {len(parts['train'])} / val {len(parts['val'])} "
            f"({len({s.arch for s in parts['val']})} architectures) / test {len(parts['test'])}"
            + (f" (train capped at {self.max_train})" if self.max_train else "")
        )
        self._warn_small_val([s.arch for s in samples])

    def dataset(self, split: str) -> SampleDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not self._splits:
            self.setup()
        return self._splits[split]

    @property
    def train_mean(self) -> float:
        """Mean training accuracy (the predictor's initial regressor bias)."""
        return float(self._train_accs("train_mean").mean())

    @property
    def train_std(self) -> float:
        """Standard deviation of the training accuracies (the predictor module standardises its
        targets by it); 0 for fewer than two samples."""
        accs = self._train_accs("train_std")
        return float(accs.std()) if len(accs) > 1 else 0.0

    def _train_accs(self, what: str) -> torch.Tensor:
        accs = self.dataset("train").accs
        if len(accs) == 0:
            raise ValueError(f"no training samples: {what} is undefined")
        return accs.double()

    @property
    def feature_dim(self) -> int:
        if self.space is None:
            self.setup()
        return get_encoder(self.space).dims(self.quantized)

    # ---- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if self.follow and trainer is not None and not trainer.reload_dataloaders_every_n_epochs:
            trainer.reload_dataloaders_every_n_epochs = 1  # the loops read this before every epoch
        self.refresh()
        self._build()
        if stage in (None, "fit"):
            self._check_learnable()

    def _check_learnable(self) -> None:
        """Refuse samples a predictor cannot be fitted and validated on, saying what is missing.

        A predictor learns which subnet is better: it needs training samples, accuracies that
        differ, and (``val_fraction > 0``) a validation split with two different accuracies, or
        its pairwise accuracy is undefined. Following a growing store, the validation split may
        still be small at first and is not checked.
        """
        n = self._version
        accs = {float(a) for split in self._splits.values() for a in split.accs.tolist()}
        if n == 1:
            raise ValueError(
                f"only 1 sample in {self.stores}: a predictor learns to rank subnets and needs many, with "
                "different accuracies; collect more samples"
            )
        if len(accs) == 1:
            raise ValueError(
                f"all {n} sample(s) in {self.stores} have accuracy {accs.pop():.6g}: there is nothing to rank; "
                "collect more samples (or check the collection: does the supernet score every subnet alike?)"
            )
        train, val = len(self._splits["train"]), self._splits["val"].accs
        if train == 0:
            raise ValueError(
                f"no training samples in {self.stores}: all {n} sample(s) fell in val/test (the split is by "
                "architecture); add samples or lower val_fraction / test_fraction"
            )
        if self.val_fraction > 0 and not self.follow and len(set(val.tolist())) < 2:
            one = " of one accuracy" if len(val) > 1 else ""
            raise ValueError(
                f"the val split of {self.stores} holds {len(val)} sample(s){one} ({n} in all): its pairwise accuracy "
                "needs two that differ; add samples, raise val_fraction, or set val_fraction: 0 to train "
                "without validation"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.follow:
            self.refresh()
            self._build()
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=_batch_collate,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
