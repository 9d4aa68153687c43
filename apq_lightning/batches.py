"""Reading images out of calibration batches (shared by BN re-calibration and quantizer calibration)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch


def iter_images(
    batches: Iterable[Any], num_batches: int | None = None, device: torch.device | None = None
) -> Iterator[torch.Tensor]:
    """The image tensor of each batch (``x`` or ``(x, y, ...)``), at most ``num_batches`` of them.

    Stops drawing from the iterator at ``num_batches``, so a data loader is not advanced further.
    """
    for batch in islice(batches, num_batches):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield x.to(device, non_blocking=True) if device is not None else x
