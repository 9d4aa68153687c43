"""The APQ reference's released once-for-all supernet, imported: start at stage 2 on ImageNet.

The APQ reference (github.com/mit-han-lab/apq) released the trained once-for-all network its
``quant_aware.py`` loads (``models/imagenet-OFA``, linked from its README as "once-for-all
network"). Its structure is ``apq_imagenet``'s; :func:`import_reference_supernet` writes it as
this project's weights-only supernet file, which every later stage takes where it takes a
stage-1 checkpoint, so a user skips stage 1 (on the order of a thousand GPU-hours).

It is a translation, not a load, because three things differ besides the names:

* **BatchNorm** -- the reference network runs every BN at ``eps = 1e-3`` (momentum 0.1); torch's
  default is ``1e-5``. Neither is a state-dict entry, so the file stores them (``batchnorm``)
  and :func:`~apq_lightning.supernet_io.load_supernet` applies them;
* **kernel transformations** -- the reference maps a flattened ``k×k`` centre through
  ``F.linear(w, M)``, i.e. ``w @ Mᵀ``; the supernet here computes ``w @ T``: ``T = Mᵀ``;
* **channel order** -- none to translate: both networks run the *first* ``mid`` channels of a
  block (the reference sorted them by importance while it trained), so the tensors keep the
  reference's order and the file carries it.

Names: the reference's dynamic layers wrap a module in a module of the same role
(``…conv.conv.weight``, ``…bn.bn.weight``, ``…linear.linear.weight``), and its loader accepts
either spelling; both are read here by collapsing the doubled part. Its quantization ranges
(``activation_range`` / ``weight_range``, two per conv and linear: 136 of its 582 tensors) are
ignored: they belong to its own quantizers, and this project calibrates its own ranges.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from apq_lightning.supernet import Supernet, set_bn_param
from apq_lightning.supernet_io import WEIGHTS_FORMAT, save_supernet_weights
from apq_lightning.torch_io import read_torch_file

REFERENCE_SPACE = "apq_imagenet"
REFERENCE_CLASSES = 1000
REFERENCE_BN: dict[str, float] = {"eps": 1e-3, "momentum": 0.1}
"""``bn_param=(0.1, 1e-3)`` of the reference's ``DynamicQuantizedProxylessNASNets``."""
REFERENCE_DROPOUT = 0.0
"""The reference finetunes (``quant_aware.py``) at ``dropout_rate=0``."""
RELEASED_FILE_URL = "https://drive.google.com/file/d/1k9tv1ISsB-QDENspiuR82rDvaIYGIKD5/view?usp=sharing"
"""The "once-for-all network" of the reference's README (saved there as ``models/imagenet-OFA``)."""

IGNORED_SUFFIXES = (".activation_range", ".weight_range")
_DOUBLED = frozenset({"bn", "conv", "linear"})

_FIXED: dict[str, str] = {
    "stem": "first_conv",
    "first.depthwise": "blocks.0.mobile_inverted_conv.depth_conv",
    "first.project": "blocks.0.mobile_inverted_conv.point_linear",
    "head": "feature_mix_layer",
    "classifier": "classifier.linear",
}
"""This project's fixed-layer prefix -> the reference's."""

_BLOCK: dict[str, str] = {
    "expand_conv": "inverted_bottleneck.conv",
    "expand_bn": "inverted_bottleneck.bn",
    "dw_conv": "depth_conv.conv",
    "dw_bn": "depth_conv.bn",
    "project_conv": "point_linear.conv",
    "project_bn": "point_linear.bn",
}
"""An elastic block's module here -> its module in the reference's ``mobile_inverted_conv``
(the reference's block ``i + 1``: its block 0 is the fixed first block)."""


def canonical_name(key: str) -> str:
    """A reference tensor name in one spelling: ``a.conv.conv.weight`` -> ``a.conv.weight``."""
    parts: list[str] = []
    for part in key.split("."):
        if not (parts and part == parts[-1] and part in _DOUBLED):
            parts.append(part)
    return ".".join(parts)


def reference_name(key: str) -> str:
    """The reference's (canonical) name of the supernet entry ``key`` of this project."""
    if key.startswith("blocks."):
        _, index, module, leaf = key.split(".", 3)
        where = f"blocks.{int(index) + 1}.mobile_inverted_conv.{_BLOCK[module]}"
        if leaf.startswith("transforms."):  # "transforms.7to5" -> "7to5_matrix"
            return f"{where}.{leaf.split('.', 1)[1]}_matrix"
        return f"{where}.{leaf}"
    for ours, theirs in _FIXED.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    raise KeyError(f"{key!r} is not an entry of an elastic-MBConv supernet")


def _is_transform(key: str) -> bool:
    return ".transforms." in key


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """A matrix transposed (anything else as it is: its shape is then reported as wrong)."""
    return t.transpose(0, 1) if t.dim() == 2 else t


def translate_state(state: Mapping[str, object], template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference state dict ``state`` as a state dict of the supernet whose own is ``template``.

    Every tensor must find its place at its shape, and every place a tensor (``num_batches_tracked``,
    which nothing computes with, defaults to 0); quantization ranges are skipped. The first
    tensor that does not fit is a one-line ``ValueError`` naming it, what it is and what was
    expected.
    """
    wanted = {reference_name(k): k for k in template}
    out: dict[str, torch.Tensor] = {}
    spelled: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"entry {key!r} of the state dict: names must be strings")
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = canonical_name(key)
        ours = wanted.get(name)
        if ours is None:
            raise ValueError(f"tensor {key!r} has no place in an {REFERENCE_SPACE} supernet (names as the "
                             f"reference's, e.g. {reference_name('blocks.0.dw_conv.weight')!r})")
        if name in spelled:
            raise ValueError(f"tensor {key!r} is given twice (also as {spelled[name]!r})")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        want = template[ours]
        tensor = _transposed(value) if _is_transform(ours) else value  # the reference multiplies by Mᵀ
        if tuple(tensor.shape) != tuple(want.shape) or tensor.is_floating_point() != want.is_floating_point():
            raise ValueError(f"tensor {key!r} is {_describe(value)}; an {REFERENCE_SPACE} supernet needs "
                             f"{_describe(_transposed(want) if _is_transform(ours) else want)}")
        out[ours] = tensor.detach().to(want.dtype).contiguous()
        spelled[name] = key
    for name, ours in wanted.items():
        if ours not in out:
            if not ours.endswith("num_batches_tracked"):
                raise ValueError(f"tensor {name!r} ({_describe(template[ours])}) is missing; "
                                 f"{len(spelled)} of the {len(wanted)} tensors were found")
            out[ours] = torch.zeros_like(template[ours])
    return out


def _describe(t: torch.Tensor) -> str:
    kind = "floating" if t.is_floating_point() else "integer"
    return f"{kind} of shape {tuple(t.shape)}" if t.dim() else f"{kind} scalar"


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_reference_supernet` wrote: counts for the one-line report."""

    out: Path
    tensors: int
    ignored: int
    sha256: str


def reference_state(ckpt: Mapping[str, object], path: str | Path) -> Mapping[str, object]:
    """The state dict of a loaded reference file: under its ``state_dict`` key (as released), or
    the whole file when it is a bare state dict (``torch.save(model.state_dict())``)."""
    if ckpt.get("format") == WEIGHTS_FORMAT:
        raise ValueError(f"{path} is already a supernet weights file of this project: use it as it is")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (the reference's file holds one under 'state_dict')")
    return state


def import_reference_supernet(path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> ImportSummary:
    """Write the reference supernet file ``path`` as an ``apq_imagenet`` supernet weights file ``out``.

    ``path`` is read as data (``weights_only=True``: pickled code is refused, never run); the
    result holds the translated state dict, the reference's BatchNorm ``eps`` / ``momentum`` and
    where it came from (``imported_from``: file name and SHA-256). Any misfit is a one-line
    ``ValueError`` naming ``path`` (``FileNotFoundError`` when missing); nothing is written then.
    """
    ckpt = read_torch_file(path, "APQ reference supernet file")
    state = reference_state(ckpt, path)
    net = Supernet(REFERENCE_SPACE, REFERENCE_CLASSES, REFERENCE_DROPOUT)
    try:
        net.load_state_dict(translate_state(state, net.state_dict()))
    except ValueError as err:
        raise ValueError(f"{path}: not the APQ reference's {REFERENCE_SPACE} supernet: {err}") from None
    set_bn_param(net, **REFERENCE_BN)
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    origin = {"imported_from": {"file": Path(path).name, "sha256": sha, "reference": "mit-han-lab/apq",
                                "ignored": list(IGNORED_SUFFIXES)}}
    written = save_supernet_weights(net, out, dtype, extra=origin)
    ignored = sum(1 for k in state if k.endswith(IGNORED_SUFFIXES))
    return ImportSummary(written, len(state) - ignored, ignored, sha)


DESCRIPTION = f"""\
Import the APQ reference's trained once-for-all supernet as an {REFERENCE_SPACE} supernet weights file,
the format of 'apq export-supernet': every later stage (collection, QAT finetune, final) takes it where
it takes a stage-1 checkpoint, so ImageNet work starts at stage 2.

Where to get FILE: the APQ reference's README (github.com/mit-han-lab/apq, "Dataset and Model
Preparation") links the "once-for-all network", which its quant_aware.py loads as models/imagenet-OFA:
  {RELEASED_FILE_URL}

What skipping stage 1 saves: training this supernet with progressive shrinking costs on the order
of a thousand GPU-hours (once-for-all reports about 1,200 V100 GPU-hours); the import takes
seconds on a CPU. Stages 2-7 still cost GPU time: see README.md, section "ImageNet from the
reference's supernet", and docs/imagenet.md.

Carried into the file: the weights and BatchNorm statistics in the reference's channel order, its
7->5 and 5->3 kernel transformation matrices (transposed to this project's convention), and its
BatchNorm eps 1e-3 / momentum 0.1. Its quantization ranges (activation_range / weight_range) are
ignored. Names may be spelled either way the reference's loader accepts (...bn.bn.weight or
...bn.weight, ...conv.conv.weight or ...conv.weight, ...linear.linear.* or ...linear.*).
"""


def import_supernet_main(argv: Sequence[str]) -> int:
    """``apq import-supernet FILE OUT``: one summary line, or one error line and exit 2."""
    ap = argparse.ArgumentParser(prog="apq import-supernet", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="the reference's supernet file (e.g. models/imagenet-OFA)")
    ap.add_argument("out", help="the weights file to write, e.g. weights/apq_imagenet_ofa.pt")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="storage type of the weights (float32: bit-exact with the reference; float16 halves "
                         "the file and is loaded back as float32)")
    args = ap.parse_args(list(argv))
    try:
        s = import_reference_supernet(args.file, args.out, getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError) as err:
        print(f"import-supernet: {err}", file=sys.stderr)
        return 2
    print(f"{s.out}: {REFERENCE_SPACE} supernet, {s.tensors} tensors from {args.file} ({s.ignored} quantization "
          f"ranges ignored), BatchNorm eps {REFERENCE_BN['eps']:g} momentum {REFERENCE_BN['momentum']:g}, "
          f"{s.out.stat().st_size / 1e6:.1f} MB ({args.dtype}); use it as supernet_ckpt / --supernet")
    return 0


__all__ = [
    "DESCRIPTION", "IGNORED_SUFFIXES", "REFERENCE_BN", "REFERENCE_SPACE", "RELEASED_FILE_URL", "ImportSummary",
    "canonical_name", "import_reference_supernet", "import_supernet_main", "reference_name", "reference_state",
    "translate_state",
]
