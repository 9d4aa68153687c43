"""ONNX export of a fake-quantized model, and a check of the file against PyTorch.

Every calibrated :class:`~apq_lightning.quant.quantizers.LinearQuantizer` becomes a
``QuantizeLinear -> [Clip] -> DequantizeLinear`` pair: int8 for signed ranges, uint8 for unsigned
ones, zero point 0, the quantizer's scale ``v / qmax`` (one per output channel for per-channel
weights, hence opset >= 13, the first with a per-axis ``QuantizeLinear``). Bit widths below 8
keep the 8-bit type and add a ``Clip`` to ``[qmin, qmax]`` in the integer domain (``Clip`` on
int8/uint8 needs opset >= 12), which is exactly the fake quantizer's clamp; so any policy of
the space (2-8 bits) exports.

Why not ``torch.onnx.export`` of the model as it is: PyTorch's ONNX symbolic for its
fake-quantize ops accepts only the full int8/uint8 ranges (``(-128, 127)``, ``(0, 255)``) and
refuses the symmetric ``[-127, 127]`` and every narrower range, and the quantizers' state dict
carries extra state (bit widths) that the TorchScript tracer cannot handle. :func:`onnx_ready`
therefore exports a copy in which each quantizer is a stateless module whose forward is the
same PyTorch op and whose ONNX symbolic is the pair above. The TorchScript-based exporter
(``dynamo=False``) is used because the ``torch.export``-based one needs the ``onnxscript``
package and has no translation for these narrow ranges either.

Numerics: ONNX Runtime's ``QuantizeLinear`` computes ``x / s`` and PyTorch ``x * (1/s)``; on
the rare inputs within one float32 ulp of a rounding tie (about one in a million) they pick
neighbouring levels, and such an element moves by one quantization step. The exported logits
therefore match PyTorch to float precision almost everywhere, with occasional differences of
the order of a step propagated to the output; :func:`check_onnx` asserts
``max |onnx - torch| <= atol + rtol * max |torch|`` and reports top-1 agreement beside it.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .quantizers import LinearQuantizer

__all__ = ["DEFAULT_OPSET", "OnnxCheck", "OnnxExportError", "onnx_ready", "export_onnx", "check_onnx"]

DEFAULT_OPSET = 13
"""The first opset with per-axis (per-channel) ``QuantizeLinear`` / ``DequantizeLinear``."""


class OnnxExportError(RuntimeError):
    """The model (or the environment) cannot produce an ONNX file; the message says what and why."""


class _QDQ(torch.autograd.Function):
    """PyTorch's fake-quantize op in the forward pass, a QuantizeLinear/DequantizeLinear pair in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:  # type: ignore[override]
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        if axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero.reshape(1), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, axis, qmin, qmax)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, qmin: int, qmax: int, axis: int) -> Any:
        dtype = torch.int8 if qmin < 0 else torch.uint8
        kwargs: dict[str, Any] = {}
        if axis >= 0:
            kwargs["axis_i"] = axis
            zero = g.op("Constant", value_t=torch.zeros(scale.type().sizes(), dtype=dtype))
        else:
            zero = g.op("Constant", value_t=torch.zeros((), dtype=dtype))
        q = g.op("QuantizeLinear", x, scale, zero, **kwargs)
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero, **kwargs)


class ExportFakeQuant(nn.Module):
    """A calibrated quantizer frozen for export: scale buffer, integer range, channel axis."""

    scale: Tensor

    def __init__(self, quantizer: LinearQuantizer) -> None:
        super().__init__()
        self.qmin, self.qmax = quantizer.qrange()
        if self.qmin < -128 or self.qmax > 255 or (self.qmin < 0 and self.qmax > 127):
            raise OnnxExportError(f"a {quantizer.bits}-bit quantizer (levels {self.qmin}..{self.qmax}) does not fit "
                                  f"ONNX's int8/uint8 QuantizeLinear; bit widths up to 8 export")
        self.axis = quantizer.ch_axis if quantizer.per_channel else -1
        scale = quantizer.scale().detach().float().clone()
        self.register_buffer("scale", scale.reshape(-1) if quantizer.per_channel else scale.reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        return _QDQ.apply(x, self.scale, self.qmin, self.qmax, self.axis)

    def extra_repr(self) -> str:
        return f"levels={self.qmin}..{self.qmax}, axis={self.axis}"


def onnx_ready(model: nn.Module) -> nn.Module:
    """A CPU eval-mode copy of ``model`` with every quantizer replaced for export: calibrated
    ones by :class:`ExportFakeQuant`, identities (disabled, float, uncalibrated) by ``nn.Identity``
    -- exactly what each computes in ``model``'s forward."""
    out = copy.deepcopy(model).cpu().eval()
    for name, module in list(out.named_modules()):
        if not isinstance(module, LinearQuantizer):
            continue
        if module.observing:
            raise OnnxExportError(f"quantizer {name} is still observing calibration data; finish calibrate() first")
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, ExportFakeQuant(module) if module.is_quantizing else nn.Identity())
    return out


def _require(package: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise OnnxExportError(f"ONNX export needs the {package!r} package: pip install 'apq-lightning[export]' "
                              f"(onnx and onnxruntime)") from None


def export_onnx(model: nn.Module, path: str | Path, example: Tensor, opset: int = DEFAULT_OPSET,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (fake-quantized or float) as ONNX with a dynamic batch axis; ``example`` is
    one input batch. ``metadata`` goes into the file's ``metadata_props`` (JSON-encoded values).
    Raises :class:`OnnxExportError` naming the cause when something cannot be exported."""
    onnx = _require("onnx")
    if opset < DEFAULT_OPSET:
        raise OnnxExportError(f"opset {opset} is too old: per-channel QuantizeLinear needs opset >= {DEFAULT_OPSET}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ready = onnx_ready(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, on purpose (module doc)
            torch.onnx.export(ready, (example.detach().cpu().contiguous(),), str(p), dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as err:  # the exporter raises many types; one line naming the op is what helps
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OnnxExportError(f"ONNX export (opset {opset}) failed: {detail}") from err
    proto = onnx.load(str(p))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(p))
    return p


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime vs PyTorch on one batch."""

    path: str
    opset: int
    batch: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    quantize_linear: int  # QuantizeLinear nodes in the graph
    dequantize_linear: int
    ok: bool
    within_fraction: float = 1.0  # share of images whose every logit is within the tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"ONNX vs PyTorch on {self.batch} images: max abs diff {self.max_abs_diff:.3g} (tolerance "
                f"{self.tolerance:.3g}; {self.within_fraction:.1%} of images within it), top-1 agreement "
                f"{self.top1_agreement:.4f}, {self.quantize_linear} "
                f"QuantizeLinear / {self.dequantize_linear} DequantizeLinear -- {verdict}")


@torch.no_grad()
def check_onnx(path: str | Path, model: nn.Module, batch: Tensor, atol: float = 1e-4,
               rtol: float = 1e-2, min_within: float = 0.9) -> OnnxCheck:
    """Run the ONNX file with ONNX Runtime (CPU) and ``model`` (eval, CPU) on ``batch``; ``ok`` when
    at least ``min_within`` of the images have ``max |onnx - torch| <= atol + rtol * max |torch|``
    (see :func:`onnx_verdict` and the module doc for why not exact)."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    x = batch.detach().cpu().float().contiguous()
    reference = copy.deepcopy(model).cpu().eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != reference.shape:
        raise OnnxExportError(f"{path}: ONNX output shape {got.shape} differs from PyTorch's {reference.shape}")
    diff, tolerance, within, ok = onnx_verdict(got, reference, atol, rtol, min_within)
    agree = float((got.argmax(1) == reference.argmax(1)).mean()) if len(got) else 1.0
    proto = onnx.load(str(path))
    ops = Counter(node.op_type for node in proto.graph.node)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxCheck(str(path), int(opset), len(x), diff, tolerance, agree, ops["QuantizeLinear"],
                     ops["DequantizeLinear"], ok, within)


def onnx_verdict(got: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
                 min_within: float) -> tuple[float, float, float, bool]:
    """``(max abs diff, tolerance, share of images within it, ok)`` of two runtimes' logits.

    Why per image: a rounding-tie flip (module doc) moves one activation by one quantization
    step, and deep in a 4-bit network that can move *one image's* logits past any tolerance
    tight enough to matter, on one machine and not on another (thread count changes the
    summation order). A wrong graph (a lost clip, the wrong signedness, a missing layer) moves
    nearly *every* image's logits. So the file passes when at least ``min_within`` of the images
    agree within ``atol + rtol * max |reference|``; the max diff is still reported.
    """
    if not got.size:
        return 0.0, atol, 1.0, True
    per_image = np.abs(got - reference).reshape(len(got), -1).max(axis=1)
    tolerance = float(atol + rtol * np.abs(reference).max())
    within = float((per_image <= tolerance).mean())
    return float(per_image.max()), tolerance, within, within >= min_within
