"""Saving and safely loading models. Untrusted files are never unpickled: weights load through
safetensors or ``torch.load(weights_only=True)``; TorchScript archives through ``torch.jit.load``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from poisonguard import __version__
from poisonguard.errors import DataError, ModelError, UnsafeModelFileError
from poisonguard.io import atomic_write_bytes, atomic_write_json
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.architectures import build_model

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
FORMAT = "poisonguard-model"
SCRIPTED = "model.pt"


def save_scripted(out_dir: str | Path, module: torch.jit.ScriptModule,
                  extra: dict[str, Any] | None = None,
                  inputs: dict[str, Any] | None = None) -> Path:
    """Write a TorchScript module as ``model.pt`` with a ``model.json`` manifest
    (``"kind": "torchscript"``) into ``out_dir``, so the folder loads like any model folder."""
    import io as _io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = _io.BytesIO()
    torch.jit.save(module, buf)
    atomic_write_bytes(out / SCRIPTED, buf.getvalue())
    atomic_write_json(out / MODEL_JSON, {
        "format": FORMAT, "format_version": 1, "poisonguard_version": __version__,
        "kind": "torchscript", "file": SCRIPTED, "extra": extra or {},
        **({"inputs": inputs} if inputs else {}),
    })
    return out


def describe_inputs(x: np.ndarray) -> dict[str, Any]:
    """What a model was trained on: sample shape, dtype and value range (checked at load)."""
    lo, hi = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
    return {"sample_shape": list(x.shape[1:]), "dtype": str(x.dtype), "value_range": [lo, hi]}


def check_inputs(expected: dict[str, Any] | None, x: np.ndarray, what: str = "inputs") -> None:
    """Refuse samples whose shape, or value range, does not fit what the model was trained on
    (``model.json``'s ``inputs``; models without it are not checked)."""
    if not expected:
        return
    shape = tuple(expected.get("sample_shape") or ())
    if shape and tuple(x.shape[1:]) != shape:
        raise DataError(f"{what}: samples of shape {tuple(x.shape[1:])}, but the model was "
                        f"trained on samples of shape {shape}")
    lo, hi = expected.get("value_range") or (None, None)
    if lo is None or hi is None or not x.size:
        return
    span = max(float(hi) - float(lo), 1e-12)
    xlo, xhi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(xlo) and np.isfinite(xhi)) or xlo < lo - span or xhi > hi + span:
        raise DataError(f"{what}: values span [{xlo:.4g}, {xhi:.4g}], but the model was trained "
                        f"on values in [{lo:.4g}, {hi:.4g}] ({expected.get('dtype')}); scale "
                        "them the same way")


def save_model(out_dir: str | Path, model: nn.Module, arch: str, arch_kwargs: dict[str, Any],
               input_spec: InputSpec, n_classes: int, layer: str | None,
               extra: dict[str, Any] | None = None,
               inputs: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (what rebuilds it) into ``out_dir``;
    ``inputs`` (:func:`describe_inputs` of the training samples) is checked when loaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, save(state))
    atomic_write_json(out / MODEL_JSON, {
        "format": FORMAT, "format_version": 1, "poisonguard_version": __version__,
        "arch": arch, "arch_kwargs": arch_kwargs, "input_spec": input_spec.to_dict(),
        "n_classes": int(n_classes), "layer": layer, "extra": extra or {},
        **({"inputs": inputs} if inputs else {}),
    })
    return out


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal escape codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise ModelError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        raise ModelError(f"{path}: safetensors weights alone cannot be loaded: the {MODEL_JSON} "
                         "written beside them (by poisonguard scan/train) describes the "
                         "architecture")
    if not zipfile.is_zipfile(path):
        raise UnsafeModelFileError(
            f"{path}: a raw pickle (or unknown format) model file is refused, never loaded; "
            "provide safetensors weights with model.json, a TorchScript archive, or a state dict "
            "saved with torch.save (loaded with weights_only=True)")


def load_model(path: str | Path, batch_size: int = 512, progress: bool = False
               ) -> TorchClassifier:
    """Load a model written by ``save_model`` (folder, model.json or .safetensors beside it),
    a TorchScript archive, or a torch state dict with a model.json beside it."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder")
    meta_path = None
    if path.is_dir():
        meta_path = path / MODEL_JSON
    elif path.suffix == ".json":
        meta_path = path
    elif path.suffix == ".safetensors" or (path.parent / MODEL_JSON).exists():
        meta_path = path.parent / MODEL_JSON
    if meta_path is None or not meta_path.exists():
        if path.is_dir() and (path / SCRIPTED).exists():
            path = path / SCRIPTED
        elif path.is_dir():
            raise ModelError(f"{path}: folder has no {MODEL_JSON}")
        module = _load_jit(path, f"a state dict needs a {MODEL_JSON} beside it to rebuild "
                                 "the architecture")
        return _scripted_classifier(module, batch_size, progress, None)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_path}: unreadable model description ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: not a poisonguard model description")
    if meta.get("kind") == "torchscript":
        return _load_scripted_folder(meta_path, meta, batch_size, progress)
    model = build_model(meta["arch"], **meta["arch_kwargs"])
    weights = path if path.is_file() and path.suffix != ".json" else meta_path.parent / WEIGHTS
    if not weights.exists():
        raise ModelError(f"{weights}: weights file missing")
    if weights.suffix == ".safetensors":
        try:
            state = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{weights}: unreadable safetensors file ({exc})") from None
    else:
        _refuse_pickle(weights)
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UnsafeModelFileError(
                f"{weights}: refused by the safe loader (weights_only=True), it holds pickled "
                "objects, not a plain state dict (save model.state_dict(), or safetensors): "
                f"{_one_line(exc)}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit the {meta['arch']} architecture "
                         f"({str(exc).splitlines()[0]})") from None
    spec = InputSpec(**meta["input_spec"])
    clf = TorchClassifier(model.eval(), spec, layer=meta.get("layer"), batch_size=batch_size,
                          progress=progress, n_classes=meta["n_classes"])
    clf.expected_inputs = meta.get("inputs")
    return clf


def _load_jit(path: Path, not_scripted: str = "not a TorchScript archive"
              ) -> torch.jit.ScriptModule:
    """A TorchScript archive (pickles refused first; ``not_scripted`` says what else is
    wrong with a zip that holds no TorchScript)."""
    _refuse_pickle(path)
    if not _is_torchscript(path):
        raise ModelError(f"{path}: {not_scripted}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: not a loadable TorchScript archive ({_one_line(exc)})"
                         ) from None


def _load_scripted_folder(meta_path: Path, meta: dict[str, Any], batch_size: int,
                          progress: bool) -> TorchClassifier:
    """A folder written by :func:`save_scripted`: ``model.pt`` behind a ``model.json``."""
    name = str(meta.get("file") or SCRIPTED)
    if Path(name).name != name:
        raise ModelError(f"{meta_path}: 'file' must name a file in the same folder")
    target = meta_path.parent / name
    if not target.exists():
        raise ModelError(f"{target}: TorchScript file missing")
    return _scripted_classifier(_load_jit(target), batch_size, progress, meta.get("inputs"))


def _scripted_classifier(module: torch.jit.ScriptModule, batch_size: int, progress: bool,
                         inputs: dict[str, Any] | None) -> TorchClassifier:
    """A TorchScript module fed the data as it is (``raw`` layout), checked against
    ``inputs`` when a manifest recorded them."""
    clf = TorchClassifier(module, InputSpec(layout="raw", scale=1.0), layer=None,
                          batch_size=batch_size, progress=progress)
    clf.expected_inputs = inputs
    return clf
