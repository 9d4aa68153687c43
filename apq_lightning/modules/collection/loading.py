"""The supernet a collection run measures, and the hash that ties every sample to it."""

from __future__ import annotations

import hashlib
import warnings

import torch
from lightning.pytorch.utilities import rank_zero_only

from apq_lightning.collection.store import checkpoint_hash
from apq_lightning.modules.common import load_checked_supernet
from apq_lightning.supernet import Supernet


def weights_hash(net: torch.nn.Module) -> str:
    """SHA-256 of a network's state dict (names and bytes): the identity of a supernet without a file."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_collection_supernet(
    ckpt: str | None, space: str | None, num_classes: int, seed: int = 0
) -> tuple[Supernet, str]:
    """``(supernet, supernet_hash)``: from a stage-1 checkpoint, or randomly initialised.

    The checkpoint goes through :func:`~apq_lightning.modules.common.load_checked_supernet`
    (one-line ``supernet_ckpt: ...`` errors, as every module that loads a supernet) and its hash
    is the file's. Without a checkpoint the supernet is seeded (every DDP rank builds the same
    one) and its hash is that of its weights, so samples of a random supernet can never pass
    for those of a trained one.
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
        return net, "random-" + weights_hash(net)[:10]
    net = load_checked_supernet(ckpt, space, num_classes)
    return net, checkpoint_hash(ckpt)
