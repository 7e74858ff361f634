"""The audited model: loading (pickles refused), checks against the trusted clean set, a
differentiable path from the user's data space to the model's input, and saving a repaired copy.

The audit works in the *data space*: float tensors shaped like the user's samples (NHW, NHWC or
ND) with values in the data's own range (0..255 for uint8 images, 0..1 for float images). The
``to_input`` function maps such a tensor to what the model takes (layout change and scale for
poisonguard models; the values as they are, as float, for TorchScript models fed raw data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError, ModelError
from poisonguard.models.adapter import InputSpec, TorchClassifier

MIN_CLEAN = 50
MIN_PER_CLASS = 2


@dataclass
class AuditModel:
    """A classifier under audit, with what is needed to rewrite it after a repair."""

    classifier: TorchClassifier
    kind: str                       # "poisonguard" or "torchscript"
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return self.classifier.model

    @property
    def spec(self) -> InputSpec:
        return self.classifier.input_spec

    def to_input(self, xd: torch.Tensor) -> torch.Tensor:
        """Map a float data-space batch to model inputs (differentiable)."""
        spec = self.spec
        if spec.layout == "raw":
            return xd
        if spec.layout == "flat":
            t = xd.reshape(len(xd), -1)
        elif xd.ndim == 3:
            t = xd.unsqueeze(1)
        elif xd.ndim == 4:
            t = xd.permute(0, 3, 1, 2)
        else:
            raise DataError(f"samples of shape {tuple(xd.shape[1:])} cannot be laid out as "
                            "images")
        return t * spec.scale if spec.scale != 1.0 else t

    def logits(self, xd: torch.Tensor) -> torch.Tensor:
        """Logits for a float data-space batch, with gradients if ``xd`` needs them."""
        try:
            out = self.module(self.to_input(xd))
        except RuntimeError as exc:
            raise ModelError(f"the model rejected inputs of shape "
                             f"{tuple(self.to_input(xd).shape)} ({str(exc).splitlines()[0]}); "
                             "the audit feeds float inputs in the data's value range") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.classifier.outputs == "probs":
            out = torch.log(out.clamp_min(1e-12))
        return out

    def n_outputs(self, x: np.ndarray) -> int:
        probs = self.classifier.predict_proba(x[:2])
        return int(probs.shape[1])

    def run_batches(self, xd: torch.Tensor, batch: int) -> None:
        """Forward ``xd`` in batches without gradients, for hooks attached to the module to
        observe."""
        with torch.no_grad():
            for i in range(0, len(xd), batch):
                self.logits(xd[i:i + batch])

    def predict_data(self, xd: torch.Tensor, batch: int = 512) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([self.logits(xd[i:i + batch]).argmax(1)
                              for i in range(0, len(xd), batch)]).numpy()


def value_range(x: np.ndarray) -> tuple[float, float]:
    """The range trigger patterns may take: 0..255 for integer data, else the data's span
    widened to include 0..1."""
    if np.issubdtype(x.dtype, np.integer):
        return 0.0, 255.0
    return float(min(0.0, np.min(x))), float(max(1.0, np.max(x)))


def to_data_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def from_data_tensor(xd: torch.Tensor, like: np.ndarray) -> np.ndarray:
    arr = xd.detach().numpy()
    if np.issubdtype(like.dtype, np.integer):
        return np.clip(np.rint(arr), 0, 255).astype(like.dtype)
    return arr.astype(like.dtype)


def load_audit_model(path: str | Path, batch_size: int = 512) -> AuditModel:
    """Load a poisonguard model folder / model.json, or a TorchScript file (pickles refused)."""
    from poisonguard.models.io import MODEL_JSON, load_model

    path = Path(path)
    clf = load_model(path, batch_size=batch_size)
    if clf.input_spec.layout == "raw":
        return AuditModel(clf, "torchscript", path)
    meta_path = path / MODEL_JSON if path.is_dir() else (
        path if path.suffix == ".json" else path.parent / MODEL_JSON)
    meta = json.loads(meta_path.read_text())
    return AuditModel(clf, "poisonguard", path, meta)


def check_clean_data(model: AuditModel, clean: LabeledData, min_samples: int = MIN_CLEAN
                     ) -> int:
    """Validate the trusted clean set against the model; return the class count."""
    if len(clean) < min_samples:
        raise DataError(f"the clean set has {len(clean)} samples; the audit needs at least "
                        f"{min_samples} trusted clean samples (a few hundred recommended)")
    if clean.x.ndim not in (2, 3, 4):
        raise DataError(f"clean samples have shape {clean.x.shape[1:]}; expected images "
                        "(NHW/NHWC) or vectors")
    from poisonguard.models.io import check_inputs

    check_inputs(model.classifier.expected_inputs, clean.x,
                 "the clean set")
    try:
        k = model.n_outputs(clean.x)
    except ModelError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"the model rejected the clean samples of shape {clean.x.shape[1:]} "
                         f"({str(exc).splitlines()[0]})") from None
    if clean.n_classes != k:
        raise DataError(f"the model has {k} classes but the clean data's labels span "
                        f"{clean.n_classes} (0..{clean.n_classes - 1}); the class count must "
                        "match")
    counts = np.bincount(clean.y, minlength=k)
    few = [int(c) for c in np.flatnonzero(counts < MIN_PER_CLASS)]
    if few:
        raise DataError(f"the clean set has fewer than {MIN_PER_CLASS} samples of class(es) "
                        f"{few}; every class needs trusted samples")
    return k


def save_repaired(model: AuditModel, out_dir: str | Path, extra: dict[str, Any]) -> Path:
    """Write the repaired model where ``poisonguard predict`` loads it: a poisonguard model
    folder (model.safetensors + model.json), or for TorchScript input ``model.pt`` with a
    ``model.json`` manifest beside it."""
    from poisonguard.models.adapter import InputSpec as _Spec
    from poisonguard.models.io import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = model.module.eval()
    if model.kind == "torchscript":
        from poisonguard.models.io import save_scripted

        save_scripted(out, module, extra={"repair": extra},
                      inputs=model.classifier.expected_inputs)
        return out
    meta = model.meta
    save_model(out, module, meta["arch"], meta["arch_kwargs"], _Spec(**meta["input_spec"]),
               meta["n_classes"], meta.get("layer"),
               extra={**(meta.get("extra") or {}), "repair": extra}, inputs=meta.get("inputs"))
    return out
