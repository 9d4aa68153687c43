"""Writing and reading a quantized, calibrated subnet model (``weights_only=True`` files)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apq_lightning.layers import SubnetModel
from apq_lightning.space import Subnet
from apq_lightning.supernet import bn_param, set_bn_param
from apq_lightning.torch_io import read_torch_file

from .layers import QuantLayerMixin, quantize_modules

__all__ = ["QUANTIZED_FORMAT", "save_quantized", "load_quantized"]

QUANTIZED_FORMAT = "apq-lightning/quantized-subnet"


def save_quantized(model: SubnetModel, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a quantized (calibrated) subnet model: state dict + subnet JSON + quantization
    metadata, plain tensors and Python values only, so it loads with ``weights_only=True``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    if not layers:
        raise ValueError("save_quantized: the model is not quantized (call quantize_subnet first)")
    cfg = dict(getattr(model, "quant_config", {}))
    first = next(iter(layers.values()))
    state = {k: v.detach().cpu().contiguous() if isinstance(v, Tensor) else v for k, v in model.state_dict().items()}
    payload = {
        "format": QUANTIZED_FORMAT,
        "version": 1,
        "subnet": model.subnet.to_dict(),
        "num_classes": int(model.classifier.out_features),
        "dropout": float(model.dropout.p),
        "batchnorm": bn_param(model),  # eps is no state entry (an imported APQ supernet runs at 1e-3)
        "quant": {
            "fixed_bits": cfg.get("fixed_bits"),
            "method": cfg.get("method", first.weight_quantizer.method),
            "per_channel": bool(cfg.get("per_channel", first.weight_quantizer.per_channel)),
            "layers": {n: [m.w_bits, m.a_bits, m.a_signed] for n, m in layers.items()},
        },
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, p)
    return p


def load_quantized(path: str | Path, map_location: str | torch.device = "cpu") -> SubnetModel:
    """A model written by :func:`save_quantized` (loaded with ``weights_only=True``), in eval
    mode; ``model.metadata`` holds what was stored beside it (e.g. accuracies).

    Any file that is not one (truncated, empty, text, a bare tensor, pickled code, a damaged
    payload) is a one-line ``ValueError`` naming it (``FileNotFoundError`` when missing).
    """
    payload = read_torch_file(path, "quantized model file", map_location=map_location)
    if payload.get("format") != QUANTIZED_FORMAT:
        raise ValueError(f"{path}: not a quantized subnet file (format {QUANTIZED_FORMAT!r})")
    try:
        model = _quantized_from_payload(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: damaged quantized model file ({detail})") from None
    model.to(map_location)
    return model.eval()


def _quantized_from_payload(payload: Mapping[str, Any]) -> SubnetModel:
    """Rebuild the quantized model of a :func:`save_quantized` payload (KeyError etc. if damaged)."""
    subnet = Subnet.from_dict(payload["subnet"])
    q = payload["quant"]
    model = SubnetModel(subnet, int(payload["num_classes"]), float(payload.get("dropout", 0.0)))
    plan = {n: (w, a, s) for n, (w, a, s) in q["layers"].items()}
    quantize_modules(model, plan, default=(None, None), method=q["method"], per_channel=bool(q["per_channel"]))
    model.load_state_dict(payload["state_dict"])
    if payload.get("batchnorm") is not None:  # absent in files written before it was stored: torch's
        set_bn_param(model, **payload["batchnorm"])
    model.quant_config = {"fixed_bits": q["fixed_bits"], "method": q["method"], "per_channel": bool(q["per_channel"])}
    model.metadata = dict(payload.get("metadata", {}))
    return model
