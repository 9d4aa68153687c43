"""Checkpoints that every later stage can trust.

Lightning's ``ModelCheckpoint(monitor=…, save_last=True)`` writes ``last.ckpt`` only when the
monitored metric improves, so ``last.ckpt`` can be many epochs stale; and
``OnExceptionCheckpoint`` writes a checkpoint on *any* exception, also one raised before the
first step of a resumed run, which then outranks real progress (``--ckpt_path last`` picks the
newest file). The two callbacks here fix both:

* :class:`LastCheckpoint` writes ``last.ckpt`` after every training epoch, unconditionally;
  keep a monitored ``ModelCheckpoint`` (without ``save_last``) beside it for the best model.
* :class:`ProgressExceptionCheckpoint` writes ``on_exception.ckpt`` only when the run has
  trained steps since it started or last saved, so a crash at start-up never replaces progress.

:class:`LastCheckpoint` also stores the random generators' states in every checkpoint and
restores them when a fit resumes from one: the batches the resumed epochs draw (their order,
augmentation, dropout) are then those of the uninterrupted run, so a run killed and resumed
ends with the same weights (tested on the whole pipeline, tests/test_pipeline_kill.py).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class LastCheckpoint(ModelCheckpoint):
    """``dirpath/last.ckpt`` after every training epoch (after that epoch's validation).

    A resumed run that already finished restores the final epoch and trains nothing; the stages
    that read ``last.ckpt`` (collection, finetuning) get the supernet after its last phase.
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,  # with no monitor: keep only the newest, under the one fixed name
            save_last=False,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        # Distinct from a monitored ModelCheckpoint in the same trainer (both are restored).
        return f"LastCheckpoint{{dirpath={self.dirpath!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this when a fit resumes (before the first batch is drawn)."""
        state = dict(state_dict)
        rng = state.pop("rng", None)
        super().load_state_dict(state)
        if rng is not None:
            set_rng_states(rng)


def rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators, in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {"python": [version, list(internal), gauss_next], "torch": torch.get_rng_state(),
                              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`' conversions and set every generator (CUDA's when it has as many devices)."""
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ProgressExceptionCheckpoint(OnExceptionCheckpoint):
    """``OnExceptionCheckpoint`` that saves only when training made progress since it started.

    An exception before the first optimizer step of a (resumed) run leaves the checkpoints on
    disk as they were, so the next ``--ckpt_path last`` resumes from real progress.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        super().__init__(dirpath, filename)
        self._start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # after a restore: the resumed step

    def on_exception(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            rank_zero_info(
                f"no exception checkpoint written: no training step ran since the start "
                f"(global step {trainer.global_step})"
            )
            return
        super().on_exception(trainer, *args, **kwargs)
