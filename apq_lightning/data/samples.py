"""Predictor training data: ``(encoding, accuracy)`` pairs streamed from sample stores.

Stages 2 and 4 append measured subnets to JSONL *sample stores*
(:mod:`apq_lightning.collection.store`); stages 3 and 5 train accuracy predictors on them. This
datamodule reads those stores (files or glob patterns), refuses records of another space or
supernet (naming file, line and value), splits them and serves dense one-hot features.

Design choices, and why:

* **Split by architecture.** A record's split is a hash of ``split_seed`` and its
  *architecture* key (the subnet without bits), so one architecture is never in two splits —
  not across its bit policies (``mp_arch_policies`` measures one architecture under several),
  not across FP and MP stores, and not as stores grow: a record's split never changes.
* **Incremental reading.** Each file is read from where the last read stopped, so
  ``follow=True`` (re-read at every epoch, for a predictor that trains while collection runs)
  costs only the new lines. Lines are parsed and validated by the collection's own
  :class:`~apq_lightning.collection.store.SampleRecord`; a torn last line (a write in progress,
  or a crash) is left for the next read, any other malformed line fails with ``file:line``.
* **Genomes in memory, features per batch.** Records are kept as integer genomes; each batch
  is one-hot encoded with one vectorised call (the dataset implements ``__getitems__``), so
  80k MP samples cost 80k × 132 integers instead of 80k × 772 floats.
* **Duplicates.** The same measurement read twice (a merged store next to its shards, both
  matched by a glob) counts once; repeated measurements of one subnet with other seeds stay.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from apq_lightning.collection.store import KINDS, SampleRecord, TornLineWarning, store_files
from apq_lightning.encoding import get_encoder
from apq_lightning.space import BIT_FIELDS, SearchSpace, Subnet, get_space

SPLITS: tuple[str, ...] = ("train", "val", "test")


def arch_keys(space: SearchSpace, genomes: np.ndarray) -> list[str]:
    """Identity of each genome's *architecture* (depth, kernel and width genes; not the bits):
    what the split is made on. Skipped blocks are canonical zeros in a genome, so equal
    architectures hash alike whatever their bits or the store they come from."""
    n_arch = space.num_stages + 2 * space.num_blocks
    arch = np.ascontiguousarray(np.atleast_2d(genomes)[:, :n_arch], dtype="<i2")
    return [hashlib.sha1(row.tobytes()).hexdigest()[:12] for row in arch]


def arch_key(subnet: Subnet) -> str:
    """:func:`arch_keys` of one subnet."""
    return arch_keys(subnet.search_space, subnet.search_space.to_genome(subnet))[0]


def genomes_from_dicts(space: SearchSpace, subnets: Sequence[Mapping[str, Any]], where: Sequence[str]) -> np.ndarray:
    """Integer genomes ``(N, genome_length)`` of subnet JSON dicts, validated.

    Equal to ``space.to_genome(Subnet.from_dict(d))`` for every dict, but vectorised over the
    batch: parsing 80k records one ``Subnet`` at a time costs ~0.3 ms each. A dict the fast
    path cannot take (another format, ragged lists, non-integers) or that fails its checks is
    parsed by ``Subnet.from_dict``, whose error (prefixed with ``where[i]``, i.e. file:line)
    names block, field, value and the allowed set.
    """
    fast = _fast_genomes(space, subnets)
    if fast is None:
        genomes, bad = np.zeros((len(subnets), space.genome_length), dtype=np.int16), np.ones(len(subnets), bool)
    else:
        genomes, bad = fast
    for i in np.flatnonzero(bad):
        try:
            genomes[i] = space.to_genome(Subnet.from_dict(subnets[i], space))
        except ValueError as err:
            raise ValueError(f"{where[i]}: invalid subnet: {err}") from None
    return genomes


def _fast_genomes(space: SearchSpace, subnets: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(genomes, bad)``: the vectorised half of :func:`genomes_from_dicts`; ``None`` when the
    batch is not uniformly shaped integer lists in the project format."""
    sp, n = space, len(subnets)
    try:
        if any(set(d) - {"space", "depths", "kernels", "widths", "bits"} for d in subnets):
            return None
        depths = np.array([d["depths"] for d in subnets])
        kernels = np.array([d["kernels"] for d in subnets])
        widths = np.array([d["widths"] for d in subnets])
        with_bits = np.array([d.get("bits") is not None for d in subnets])
        if any(w and set(d["bits"]) != set(BIT_FIELDS) for d, w in zip(subnets, with_bits)):
            return None
        filler = [list(sp.bit_choices[-1:]) * sp.num_blocks] * len(BIT_FIELDS)
        bits = np.array([[d["bits"][f] for f in BIT_FIELDS] if w else filler for d, w in zip(subnets, with_bits)])
    except (KeyError, TypeError, ValueError):
        return None
    arrays = (depths, kernels, widths, bits)
    shapes = ((n, sp.num_stages), (n, sp.num_blocks), (n, sp.num_blocks), (n, len(BIT_FIELDS), sp.num_blocks))
    if any(a.shape != s or a.dtype.kind not in "iu" for a, s in zip(arrays, shapes)):
        return None
    g = np.zeros((n, sp.genome_length), dtype=np.int16)
    bad = np.zeros(n, dtype=bool)
    sl = sp.genome_slices()

    def lookup(values: np.ndarray, choices: Sequence[int], mask: np.ndarray | None = None) -> np.ndarray:
        c = np.asarray(choices)
        idx = np.clip(np.searchsorted(c, values), 0, len(c) - 1)
        wrong = c[idx] != values
        wrong = wrong if mask is None else wrong & mask
        bad[:] |= wrong.reshape(n, -1).any(axis=1)
        return idx if mask is None else np.where(mask, idx, 0)

    for s, choices in enumerate(sp.stage_depth_choices):
        g[:, sl["depths"].start + s] = lookup(depths[:, s], choices)
    active = sp.position_of_block[None, :] < depths[:, sp.stage_of_block]
    g[:, sl["kernels"]] = lookup(kernels, sp.kernel_choices, active)
    for b, blk in enumerate(sp.blocks):
        g[:, sl["widths"].start + b] = lookup(widths[:, b], blk.width_choices, active[:, b])
    for f, name in enumerate(BIT_FIELDS):
        g[:, sl[name]] = lookup(bits[:, f], sp.bit_choices, active)
    return g, bad


def _unit_hash(*parts: Any) -> float:
    """A deterministic number in [0, 1) from its arguments (stable across runs and machines)."""
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class _Sample:
    genome: np.ndarray
    acc: float
    arch: str
    kind: str
    identity: tuple  # SampleRecord.identity: kind, index, key, seed, protocol


@dataclass
class _Cursor:
    """How far one store file has been read."""

    offset: int = 0
    line: int = 0
    newline_owed: bool = False  # a last record was read before its newline was written
    inode: int = 0  # a store replaced by another file (merge_stores renames over it) is read anew
    samples: list[_Sample] = field(default_factory=list)


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
        if kinds is not None and not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds {sorted(set(kinds) - set(KINDS))} unknown; allowed: {list(KINDS)}")
        if max_train is not None and max_train < 1:
            raise ValueError(f"max_train must be >= 1 or null, got {max_train}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.stores = [str(s) for s in stores]
        self.quantized = bool(quantized)
        self.space: str | None = get_space(space).name if space is not None else None
        self.supernet_hash = supernet_hash
        self.kinds = None if kinds is None else set(kinds)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.max_train = max_train
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.follow = follow
        self._cursors: dict[Path, _Cursor] = {}
        self._seen: set[tuple] = set()
        self._origins = {"space": "data.space", "supernet_hash": "data.supernet_hash"}  # for messages
        self._splits: dict[str, SampleDataset] = {}
        self._version = -1  # number of samples the current splits were built from

    # ---- reading -----------------------------------------------------------------------
    def refresh(self) -> int:
        """Read what was appended to the stores since the last call; returns the new samples."""
        before = sum(len(c.samples) for c in self._cursors.values())
        for path in self._files():
            stat = path.stat()
            cursor = self._cursors.setdefault(path, _Cursor(inode=stat.st_ino))
            if stat.st_size < cursor.offset or stat.st_ino != cursor.inode:  # replaced or truncated: read anew
                for s in cursor.samples:
                    self._seen.discard(s.identity)
                cursor = self._cursors[path] = _Cursor(inode=stat.st_ino)
            if stat.st_size > cursor.offset:
                self._read_new(path, cursor)
        return sum(len(c.samples) for c in self._cursors.values()) - before

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

    def _read_new(self, path: Path, cursor: _Cursor) -> None:
        with open(path, "rb") as fh:
            fh.seek(cursor.offset)
            data = fh.read()
        consumed, line, owed = 0, cursor.line, False
        if cursor.newline_owed and data.startswith(b"\n"):
            data, consumed = data[1:], 1
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        batch: list[tuple[str, SampleRecord]] = []
        for raw in complete:
            line += 1
            consumed += len(raw) + 1
            if not raw.strip():
                raise ValueError(f"{path}:{line}: empty line inside a sample store")
            batch.append(self._parse(f"{path}:{line}", raw))
        if tail.strip():
            # No newline yet: a record being written (follow), or a torn / hand-written last line.
            try:
                SampleRecord.from_json(tail.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                if not self.follow:
                    warnings.warn(
                        f"{path}:{line + 1}: skipping a torn last line ({len(tail)} bytes, an interrupted write)",
                        TornLineWarning, stacklevel=3,
                    )
            else:
                if not self.follow:  # a complete record without its newline: the file ends there
                    line += 1
                    consumed += len(tail)
                    owed = True
                    batch.append(self._parse(f"{path}:{line}", tail))
        self._add(batch, cursor)  # may raise: the cursor then stays where it was
        cursor.offset, cursor.line, cursor.newline_owed = cursor.offset + consumed, line, owed

    def _parse(self, where: str, raw: bytes) -> tuple[str, SampleRecord]:
        try:
            rec = SampleRecord.from_json(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: malformed sample record: {err}") from None
        self._check_origin(rec, where)
        return where, rec

    def _add(self, batch: list[tuple[str, SampleRecord]], cursor: _Cursor) -> None:
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
        genomes = genomes_from_dicts(sp, [r.subnet for _, r, _ in keep], [w for w, _, _ in keep])
        arch = arch_keys(sp, genomes)
        for (_, rec, identity), g, a in zip(keep, genomes, arch):
            cursor.samples.append(_Sample(g, rec.acc, a, rec.kind, identity))

    def _check_origin(self, rec: SampleRecord, where: str) -> None:
        if self.space is None:
            self.space, self._origins["space"] = rec.space, f"the first record ({where})"
        if self.supernet_hash is None:
            self.supernet_hash, self._origins["supernet_hash"] = rec.supernet_hash, f"the first record ({where})"
        if rec.space != self.space:
            raise ValueError(
                f"{where}: record is for space {rec.space!r}, but {self._origins['space']} says space "
                f"{self.space!r}; keep stores of different spaces apart"
            )
        if rec.supernet_hash != self.supernet_hash:
            raise ValueError(
                f"{where}: record was measured on supernet {rec.supernet_hash!r}, but "
                f"{self._origins['supernet_hash']} says supernet_hash {self.supernet_hash!r}; samples of "
                "different supernet checkpoints cannot be mixed"
            )

    # ---- splits ------------------------------------------------------------------------
    def split_of(self, arch: str) -> str:
        """``train`` / ``val`` / ``test`` of an architecture key (see :func:`arch_key`)."""
        u = _unit_hash(self.split_seed, arch)
        if u < self.test_fraction:
            return "test"
        return "val" if u < self.test_fraction + self.val_fraction else "train"

    def _build(self) -> None:
        samples = [s for c in self._cursors.values() for s in c.samples]
        if len(samples) == self._version and self._splits:
            return
        if self.space is None:
            raise ValueError(f"no samples in the stores {self.stores} (files found: {[str(p) for p in self._files()]})")
        parts: dict[str, list[_Sample]] = {k: [] for k in SPLITS}
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
            f"{self.supernet_hash}, kinds {dict(kinds)}; train {len(parts['train'])} / val {len(parts['val'])} / "
            f"test {len(parts['test'])}" + (f" (train capped at {self.max_train})" if self.max_train else "")
        )

    def dataset(self, split: str) -> SampleDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not self._splits:
            self.setup()
        return self._splits[split]

    @property
    def train_mean(self) -> float:
        """Mean training accuracy (the predictor's initial regressor bias)."""
        accs = self.dataset("train").accs
        if len(accs) == 0:
            raise ValueError("no training samples: train_mean is undefined")
        return float(accs.double().mean())

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
        if stage in (None, "fit") and len(self._splits["train"]) == 0:
            raise ValueError(
                f"no training samples in {self.stores}: {self._version} sample(s) read, all in val/test "
                "(add samples or lower val_fraction / test_fraction)"
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
