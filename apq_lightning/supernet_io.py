"""Supernet files: reading a trained supernet, and writing it as a small weights-only file.

Two kinds of file hold a supernet -- a Lightning checkpoint of ``SupernetModule`` (stage 1's
``last.ckpt``) and the weights-only file of :func:`save_supernet_weights` (``apq
export-supernet``, ``apq import-supernet``, the shipped ``weights/``). Every later stage starts
from one of them, so this module is the one place that knows both layouts: which hyperparameters
they carry, where the state dict and the BatchNorm ``eps`` / ``momentum`` live, and whether the
weights come from a quantized-for-all phase. The network itself is :mod:`apq_lightning.supernet`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from apq_lightning.quant.supernet import quantize_supernet
from apq_lightning.supernet import Supernet, bn_param, set_bn_param
from apq_lightning.torch_io import read_torch_file

__all__ = [
    "CHECKPOINT_PREFIX",
    "WEIGHTS_FORMAT",
    "export_supernet_weights",
    "is_quantized_for_all",
    "load_supernet",
    "save_supernet_weights",
    "supernet_contents",
]

CHECKPOINT_PREFIX = "supernet."
"""Prefix of the supernet's entries in a ``SupernetModule`` checkpoint's state dict."""


WEIGHTS_FORMAT = "apq-supernet-weights/1"
"""``format`` tag of a weights-only supernet file (:func:`export_supernet_weights`)."""


def supernet_contents(ckpt: dict) -> tuple[object, object, str]:
    """(hyperparameters, state dict, key prefix) of a loaded checkpoint or weights-only file.

    Both kinds name ``space`` / ``num_classes`` / ``dropout``: a ``SupernetModule`` checkpoint
    under ``hyper_parameters`` (state keys prefixed ``supernet.``), a weights file at its top.
    """
    if ckpt.get("format") == WEIGHTS_FORMAT:
        return ckpt, ckpt.get("state_dict"), ""
    return ckpt.get("hyper_parameters"), ckpt.get("state_dict"), CHECKPOINT_PREFIX


def is_quantized_for_all(state: dict) -> bool:
    """Whether a supernet state dict comes from a quantized-for-all phase (it holds the batch-range
    quantizers' running ranges), i.e. whether any subnet + bit policy can be scored directly."""
    return any(k.endswith("input_quantizer.v") for k in state)


def load_supernet(path: str, map_location: str | torch.device = "cpu") -> Supernet:
    """The supernet of a stage-1 checkpoint or of a weights-only supernet file, loaded safely.

    Two kinds of file are accepted, both read as data (``weights_only=True``):

    * a Lightning checkpoint of ``SupernetModule`` (``last.ckpt``): its hyperparameters
      ``space``, ``num_classes`` and ``dropout`` and the ``supernet.*`` entries of its state dict;
    * a weights-only file written by :func:`save_supernet_weights` (``apq export-supernet``,
      ``apq import-supernet``), e.g. the trained ``apq_cifar`` supernet shipped in ``weights/``:
      the same three values, the supernet's state dict, possibly in float16 (cast back to float32
      here), and optionally ``batchnorm`` (``{"eps", "momentum"}`` of every BN layer; absent:
      torch's defaults).

    Any file that is neither (truncated, empty, text, a bare tensor, pickled code, another
    module's checkpoint) is a one-line ``ValueError`` naming it (``FileNotFoundError`` when
    missing).
    """
    ckpt = read_torch_file(path, "checkpoint", map_location=map_location)
    h, state, prefix = supernet_contents(ckpt)
    hparams_ok = isinstance(h, dict) and {"space", "num_classes"} <= set(h)
    if not isinstance(state, dict) or not hparams_ok:
        raise ValueError(f"{path}: not a SupernetModule checkpoint nor a supernet weights file (needs "
                         f"'state_dict' and 'space' and 'num_classes')")
    try:
        net = Supernet(h["space"], h["num_classes"], h.get("dropout", 0.0))
        weights = {k[len(prefix) :]: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in state.items() if k.startswith(prefix)}
        if is_quantized_for_all(weights):  # the quant phase's quantizers are part of its weights
            quantize_supernet(net, ranges="batch")
        net.load_state_dict(weights)
        bn = h.get("batchnorm") if prefix == "" else ckpt.get("apq_batchnorm")  # SupernetModule saves it there
        if bn is not None:  # absent: torch's defaults (every file before the APQ import)
            set_bn_param(net, **bn)
    except (ValueError, TypeError, RuntimeError, AttributeError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        kind = "supernet weights file" if prefix == "" else "SupernetModule checkpoint"
        raise ValueError(f"{path}: damaged {kind} ({detail})") from None
    return net


def export_supernet_weights(ckpt: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the supernet of a stage-1 checkpoint as a small weights-only file, atomically.

    Why: a Lightning checkpoint carries optimizer state, the teacher and loop state (about twice
    the float32 weights); later stages need only the supernet. The file holds plain data (``format``,
    ``space``, ``num_classes``, ``dropout`` and a state dict whose floating tensors are in
    ``dtype``); :func:`load_supernet` reads it like a checkpoint. float16 halves the size; the
    rounding (relative 5e-4) is far below what BN recalibration and QAT change.
    """
    _check_weights_dtype(dtype)
    return save_supernet_weights(load_supernet(str(ckpt)), out, dtype)  # load_supernet validates it


def save_supernet_weights(
    net: Supernet, out: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None
) -> Path:
    """Write ``net`` as a weights-only supernet file (the format :func:`load_supernet` reads),
    atomically: ``format``, ``space``, ``num_classes``, ``dropout``, ``batchnorm`` (eps and
    momentum, which no state dict holds), the state dict with floating tensors in ``dtype``, and
    the plain-data entries of ``extra`` (e.g. where an imported supernet came from)."""
    _check_weights_dtype(dtype)
    from apq_lightning.checkpointing import AtomicCheckpointIO  # Lightning's IO: only on this path

    state = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    payload = {**(extra or {}), "format": WEIGHTS_FORMAT, "space": net.space.name,
               "num_classes": int(net.num_classes), "dropout": float(net.dropout.p),
               "batchnorm": bn_param(net), "state_dict": state}
    out = Path(out)
    AtomicCheckpointIO().save_checkpoint(payload, out)
    return out


def _check_weights_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype}: allowed float16, bfloat16, float32")
