"""Accuracy predictors: an MLP from a subnet's one-hot encoding to its accuracy (docs/design.md §6).

Two flavours share one class:

* **FP predictor** (``quantized=False``): features are the FP part of the encoding
  (kernels + widths); ``h1 = ReLU(W1·x_fp + b1)``.
* **MP predictor** (``quantized=True``): the FP network plus a part for the bits, so that an FP
  predictor's weights transfer into it unchanged (:meth:`AccuracyPredictor.transfer_from`). How
  the bits enter is ``bit_features`` (:data:`BIT_FEATURES`):

  - ``onehot`` (APQ): an input head on the bit one-hots, ``h1 = ReLU(W1·x_fp + b1) + (Wq·x_q + bq)``;
  - ``onehot+numeric``: the same head on the one-hots and each tensor's numeric bit deficit
    ``d = D·x_q`` (:meth:`~apq_lightning.encoding.Encoder.bit_deficits`), ``Wq·[x_q, d] + bq``;
  - ``head``: the FP network's prediction plus a linear bit correction,
    ``acc = FP(x_fp) + wb·d + bb`` (``bit_head``): an 8-bit policy scores as its float
    architecture, every tensor below 8 bits moves it by its own weight. Started from an FP
    predictor, training it fits 4·B + 1 numbers, which ~100 noisy MP samples can pin down.

  The numeric features are a fixed linear map of the one-hots, so the dense input stays the
  encoding and the search's scorer folds them into its pre-summed rows.

The attribute names (``layers.{i}.0``, ``quantize_fc``, ``regressor``) are those of the APQ
reference's state dicts: :meth:`AccuracyPredictor.from_apq_checkpoint` loads its predictors, and
the evolution search reads the weights directly.

Whole populations are scored at once: :meth:`AccuracyPredictor.predict` turns subnets, JSON
dicts or integer genomes into genomes (:func:`~apq_lightning.space.to_genomes`, the converter
the sample stores and the encoder use too) and scores them with the search's
:class:`~apq_lightning.mlp_scorer.MLPScorer`: the first layer as sums of pre-summed weight rows
(``embedding_bag``), which never builds the dense ``(N, 772)`` input, and the very numbers the
search ranks by.

This module imports only ``space``, ``encoding``, ``mlp_scorer`` and ``torch_io`` (docs/design.md §14.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apq_lightning.encoding import Encoder, get_encoder
from apq_lightning.mlp_scorer import MLPScorer
from apq_lightning.space import Population, check_genomes, get_space, to_genomes
from apq_lightning.torch_io import read_torch_file

FORMAT = "apq_lightning.predictor/1"
"""``format`` entry of the files written by :meth:`AccuracyPredictor.save`."""

BIT_FEATURES: tuple[str, ...] = ("onehot", "onehot+numeric", "head")
"""How an MP predictor reads the bits (module docstring); files without the entry are ``onehot``."""

PREDICT_CHUNK = 16384
"""Rows per forward pass in :meth:`AccuracyPredictor.predict` (bounds memory for big populations)."""

PopulationLike = Population | torch.Tensor


class AccuracyPredictor(nn.Module):
    """MLP accuracy predictor of one search space (see the module docstring).

    Args:
        space: name of a registered search space (its encoder fixes the input sizes).
        quantized: ``True`` = MP predictor (adds ``quantize_fc`` for the bit part).
        hidden: width of the hidden layers (APQ: 400).
        num_layers: hidden layers (APQ: 3).
        base_acc: initial bias of the regressor, normally the mean training accuracy, so the
            untrained network starts at the mean instead of 0 and training spends its first
            steps on ranking rather than on the offset.
        bit_features: how an MP predictor reads the bits, one of :data:`BIT_FEATURES` (``onehot``
            is the APQ reference's layout); an FP predictor has no bit part and ignores it.
    """

    def __init__(
        self, space: str, quantized: bool, hidden: int = 400, num_layers: int = 3, base_acc: float = 0.0,
        bit_features: str = "onehot",
    ) -> None:
        super().__init__()
        if hidden < 1 or num_layers < 1:
            raise ValueError(f"hidden and num_layers must be >= 1, got hidden={hidden}, num_layers={num_layers}")
        if bit_features not in BIT_FEATURES:
            raise ValueError(f"bit_features={bit_features!r} is not allowed; allowed: {', '.join(BIT_FEATURES)}")
        self.space: str = get_space(space).name
        self.quantized = bool(quantized)
        self.hidden = int(hidden)
        self.num_layers = int(num_layers)
        self.bit_features = bit_features if self.quantized else "onehot"  # no bit part: nothing to choose
        self.encoder: Encoder = get_encoder(self.space)
        fp_dim = self.encoder.fp_dim
        self.layers = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(fp_dim if i == 0 else hidden, hidden), nn.ReLU())
                for i in range(num_layers)
            ]
        )
        deficits = torch.from_numpy(self.encoder.bit_deficits())
        if self.quantized and bit_features == "head":
            self.bit_head = nn.Linear(deficits.shape[1], 1)
        elif self.quantized:
            extra = deficits.shape[1] if bit_features == "onehot+numeric" else 0
            self.quantize_fc = nn.Linear(self.encoder.quant_dim + extra, hidden)
        if self.quantized and bit_features != "onehot":  # not in the state dict: a function of the space
            self.register_buffer("deficits", deficits, persistent=False)
        self.regressor = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.regressor.bias.fill_(float(base_acc))

    # ---- shapes ------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """Columns this predictor reads: ``fp_dim`` (FP) or ``dim`` (MP)."""
        return self.encoder.dims(self.quantized)

    def extra_repr(self) -> str:
        bits = f", bit_features={self.bit_features!r}" if self.quantized else ""
        return f"space={self.space!r}, quantized={self.quantized}, in_features={self.in_features}{bits}"

    def output_layers(self) -> list[nn.Linear]:
        """The layers whose outputs are accuracies (the regressor, and the bit head when there
        is one): the training standardises targets through them (``PredictorModule``)."""
        return [self.regressor] + ([self.bit_head] if hasattr(self, "bit_head") else [])

    def bit_layers(self) -> list[nn.Linear]:
        """The layers that read the bits (``quantize_fc`` or ``bit_head``; none in an FP predictor):
        what :meth:`transfer_from` starts at zero."""
        return [m for m in (getattr(self, "quantize_fc", None), getattr(self, "bit_head", None)) if m is not None]

    # ---- dense forward (training) ------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted accuracy ``(N,)`` of dense features ``(N, fp_dim)`` or ``(N, dim)``.

        An FP predictor reads the first ``fp_dim`` columns of full features (it ignores bits);
        an MP predictor needs all ``dim`` columns.
        """
        enc = self.encoder
        if x.dim() != 2 or x.shape[1] not in (enc.fp_dim, enc.dim):
            raise ValueError(
                f"{self._name()}: features must have shape (N, {enc.fp_dim}) or (N, {enc.dim}), got {tuple(x.shape)}"
            )
        if self.quantized and x.shape[1] != enc.dim:
            raise ValueError(
                f"{self._name()}: an MP predictor needs the quantized encoding with {enc.dim} columns, "
                f"got {x.shape[1]} (the FP part only: encode with quantized=True)"
            )
        h = self.layers[0][0](x[:, : enc.fp_dim])
        return self._tail(h, x[:, enc.fp_dim :] if self.quantized else None)

    def _tail(self, h_fp: torch.Tensor, x_q: torch.Tensor | None) -> torch.Tensor:
        """Everything after the first linear map: ReLU, the bit part, hidden layers, regressor."""
        h = self.layers[0][1](h_fp)
        features = self.bit_features
        if x_q is not None and features != "head":
            h = h + self.quantize_fc(x_q if features == "onehot" else torch.cat([x_q, x_q @ self.deficits], dim=1))
        for layer in self.layers[1:]:
            h = layer(h)
        out = self.regressor(h).squeeze(-1)
        if x_q is not None and features == "head":
            out = out + self.bit_head(x_q @ self.deficits).squeeze(-1)
        return out

    # ---- populations (search) ----------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: PopulationLike) -> torch.Tensor:
        """Predicted accuracies of a whole population, a 1-D float tensor.

        ``x`` may be a :class:`Subnet`, a subnet JSON dict (project format or the APQ reference
        spec), a list of either, an integer genome array ``(N, genome_length)`` (numpy or torch),
        or dense float features ``(N, fp_dim | dim)``. Runs in eval mode without gradients.
        """
        was_training = self.training
        self.eval()
        try:
            if isinstance(x, (np.ndarray, torch.Tensor)) and _is_floating(x):
                feats = torch.as_tensor(x, dtype=torch.float32, device=self._device())
                feats = feats.unsqueeze(0) if feats.dim() == 1 else feats
                return torch.cat([self(c) for c in feats.split(PREDICT_CHUNK)]) if len(feats) else feats.new_zeros(0)
            return self._score(self._genomes(x))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_genomes(self, genomes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Predicted accuracies of integer genomes ``(N, genome_length)``: the search's
        :class:`~apq_lightning.mlp_scorer.MLPScorer` on a snapshot of the current weights, in
        chunks of :data:`PREDICT_CHUNK` rows."""
        g = genomes.cpu().numpy() if isinstance(genomes, torch.Tensor) else genomes
        return self._score(check_genomes(self.encoder.space, g))

    def _genomes(self, x: PopulationLike) -> np.ndarray:
        """Genomes of any population form but dense features, errors named after this predictor
        (an MP predictor refuses float subnets: it would score them as 8-bit)."""
        g = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
        try:
            return to_genomes(self.encoder.space, g, need_bits=self.quantized)
        except ValueError as err:
            raise ValueError(f"{self._name()}: {err}") from None

    def _score(self, genomes: np.ndarray) -> torch.Tensor:
        """Scores of checked genomes, on this predictor's device."""
        if len(genomes) == 0:
            return torch.zeros(0, device=self._device())
        scorer = MLPScorer(self, self.encoder.space)
        chunks = np.array_split(genomes, math.ceil(len(genomes) / PREDICT_CHUNK))
        scores = np.concatenate([scorer(chunk) for chunk in chunks])
        return torch.from_numpy(scores).float().to(self._device())

    # ---- transfer ----------------------------------------------------------------------
    def transfer_from(self, fp: AccuracyPredictor | str | Path) -> AccuracyPredictor:
        """Start this MP predictor from an FP predictor (docs/design.md §6.2; APQ's predictor transfer).

        Copies every shared weight (``layers.*``, ``regressor.*``) and sets the bit part
        (``quantize_fc`` or ``bit_head``) to **zeros**: the transferred MP predictor then computes
        exactly the FP predictor's function (``h1 = ReLU(W1·x_fp + b1) + 0``), so training starts
        from the FP ranking instead of from the noise a random ``Wq·x_q`` would add to every
        hidden unit. Zero is no symmetry trap here: ``quantize_fc``'s gradient is
        ``dL/dh1 · x_q``, which differs per unit because the transferred layers above differ per
        unit (``bit_head`` is linear: its gradient is the residual times the deficits).

        ``fp`` is an FP :class:`AccuracyPredictor` or a checkpoint path (:meth:`save` file or a
        Lightning checkpoint of ``PredictorModule``). Returns ``self``.
        """
        if not self.quantized:
            raise ValueError(
                f"{self._name()}: transfer_from() starts an MP predictor; this one is FP (quantized=False)"
            )
        src = fp if isinstance(fp, AccuracyPredictor) else AccuracyPredictor.load(fp)
        where = "" if isinstance(fp, AccuracyPredictor) else f" ({fp})"
        if src.quantized:
            raise ValueError(f"transfer_from: the source predictor{where} is an MP predictor; expected an FP predictor")
        for attr, what in (("space", "space"), ("hidden", "hidden size"), ("num_layers", "number of layers")):
            if getattr(src, attr) != getattr(self, attr):
                raise ValueError(
                    f"transfer_from: the FP predictor{where} has {what} {getattr(src, attr)!r}, this MP predictor "
                    f"{getattr(self, attr)!r}; they must match"
                )
        if src.encoder.fp_dim != self.encoder.fp_dim:  # same space name but a re-registered layout
            raise ValueError(
                f"transfer_from: the FP predictor{where} reads {src.encoder.fp_dim} FP features, this one "
                f"{self.encoder.fp_dim}"
            )
        shared = {k: v for k, v in src.state_dict().items() if k.startswith(("layers.", "regressor."))}
        with torch.no_grad():
            own = self.state_dict()
            for k, v in shared.items():
                own[k].copy_(v)
            for layer in self.bit_layers():
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        return self

    # ---- files -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"space": self.space, "quantized": self.quantized, "hidden": self.hidden, "num_layers": self.num_layers,
                "bit_features": self.bit_features}

    def save(self, path: str | Path) -> Path:
        """Write a plain dict (format, config, state dict) that loads with ``weights_only=True``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"format": FORMAT, **self.config(), "state_dict": state}, p)
        return p

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AccuracyPredictor:
        """A predictor from a :meth:`save` file or a Lightning checkpoint of ``PredictorModule``."""
        ckpt = _load_dict(path, map_location)
        if ckpt.get("format") == FORMAT:
            cfg, state = ckpt, ckpt.get("state_dict")
        elif "state_dict" in ckpt and "space" in ckpt.get("hyper_parameters", {}):
            cfg = ckpt["hyper_parameters"]
            state = {k[len("predictor.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("predictor.")}
            if not state:
                raise ValueError(
                    f"{path}: a Lightning checkpoint without 'predictor.*' weights (not a PredictorModule)"
                )
        elif any(_strip_module(str(k)).startswith("layers.") for k in _state_of(ckpt)):
            raise ValueError(
                f"{path}: a bare state dict (APQ reference layout?); load it with "
                f"AccuracyPredictor.from_apq_checkpoint(path, space=...)"
            )
        else:
            raise ValueError(
                f"{path}: not a predictor checkpoint: expected format {FORMAT!r} or a PredictorModule Lightning "
                f"checkpoint, found keys {sorted(map(str, ckpt))[:8]}"
            )
        missing = [k for k in ("space", "quantized") if k not in cfg]
        if missing or not isinstance(state, Mapping):
            raise ValueError(f"{path}: predictor checkpoint lacks {missing or ['state_dict']}")
        # files of before bit_features (and APQ-layout ones) hold the one-hot layout
        pred = cls(cfg["space"], bool(cfg["quantized"]), int(cfg.get("hidden", 400)), int(cfg.get("num_layers", 3)),
                   bit_features=str(cfg.get("bit_features") or "onehot"))
        pred._load_checked(state, str(path))
        return pred

    @classmethod
    def from_apq_checkpoint(
        cls, path: str | Path, space: str = "apq_imagenet", map_location: str | torch.device = "cpu"
    ) -> AccuracyPredictor:
        """Load a predictor saved by the APQ reference (``torch.save(mlp.state_dict())``).

        Keys ``layers.{i}.0.*``, ``regressor.*`` and, for an MP predictor, ``quantize_fc.*``
        (FP vs MP is decided by that key); the dict may sit under ``state_dict`` and carry a
        ``module.`` (DataParallel) prefix. Hidden size and depth come from the shapes. The
        result predicts what the reference's MLP predicts on the reference's features
        (``Converter.spec2feature(spec, quantize=True)``), shape ``(N,)`` instead of ``(N, 1)``.

        Note: the reference's own ``AccuracyPredictor.predict_accuracy`` calls ``spec2feature``
        without ``quantize=True`` and so scores every block as 8-bit; this class always encodes
        the real bits.
        """
        state = {_strip_module(k): v for k, v in _state_of(_load_dict(path, map_location)).items()}
        w0 = state.get("layers.0.0.weight")
        if not isinstance(w0, torch.Tensor) or w0.dim() != 2 or "regressor.weight" not in state:
            raise ValueError(
                f"{path}: not an APQ predictor state dict: needs 'layers.0.0.weight' (2-D) and 'regressor.*', "
                f"found keys {sorted(state)[:8]}"
            )
        num_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        pred = cls(space, "quantize_fc.weight" in state, hidden=int(w0.shape[0]), num_layers=num_layers)
        pred._load_checked(state, str(path))
        return pred

    def _load_checked(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """``load_state_dict`` with messages that say which key and which shapes disagree."""
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if unknown or missing:
            bits = f", bit_features {self.bit_features!r}" if self.quantized else ""
            raise ValueError(
                f"{source}: state dict does not fit {self._name()} (hidden {self.hidden}, {self.num_layers} layers"
                f"{bits}): unexpected keys {unknown[:6]}, missing keys {missing[:6]}"
            )
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{source}: {k} has shape {got}, expected {tuple(own[k].shape)} for space {self.space!r} "
                    f"(FP features {self.encoder.fp_dim}, bit features {self.encoder.quant_dim}, hidden {self.hidden})"
                )
        self.load_state_dict(state)

    # ---- helpers -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.regressor.weight.device

    def _name(self) -> str:
        return f"{'MP' if self.quantized else 'FP'} predictor of space {self.space!r}"


def _is_floating(x: np.ndarray | torch.Tensor) -> bool:
    return x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(np.asarray(x).dtype, np.floating)


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _state_of(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = ckpt.get("state_dict")
    return inner if isinstance(inner, Mapping) else ckpt


def _load_dict(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    """The dict in a checkpoint file, read safely (``weights_only=True``) by the project's one
    reader: ``FileNotFoundError`` when missing, a ``ValueError`` naming the file and the reason
    when it is empty, text, torn or not a dict (a bare tensor)."""
    return read_torch_file(path, "predictor checkpoint", map_location=map_location)
