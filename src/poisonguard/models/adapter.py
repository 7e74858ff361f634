"""The torch adapter: numpy in, numpy out; representations from a named layer via a forward hook,
batched probabilities, per-sample losses and per-sample gradient norms (``torch.func``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from poisonguard.errors import DataError, ModelError


@dataclass(frozen=True)
class InputSpec:
    """How raw numpy samples become model inputs.

    ``layout``: ``"nchw"`` (images given NHW or NHWC are moved to NCHW), ``"flat"`` (each sample
    flattened to a vector), ``"tokens"`` (text token ids, int64, trailing padding columns cut)
    or ``"raw"`` (passed as the data holds them: uint8 stays uint8, other
    dtypes become float32; for TorchScript models that do their own preprocessing). ``scale``
    multiplies the values (1/255 for uint8 images). ``dtype`` is
    the torch dtype the model takes: ``"float32"`` or ``"uint8"`` (TorchScript models fed raw).
    """

    layout: str = "nchw"
    scale: float = 1.0 / 255.0
    dtype: str = "float32"

    @classmethod
    def for_data(cls, x: np.ndarray) -> InputSpec:
        """The spec the built-in models use for data like ``x``."""
        if x.ndim == 2:
            return cls(layout="flat", scale=1.0)
        scale = 1.0 / 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
        return cls(layout="nchw", scale=scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sample_shape(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(self.prepare(x[:1]).shape[1:])

    def prepare(self, x: np.ndarray) -> torch.Tensor:
        """Convert a numpy batch to a model-ready tensor."""
        if self.layout == "tokens":  # (N, L) token ids, 0 = padding: trailing padding cut
            ids = np.asarray(x, dtype=np.int64)
            used = np.flatnonzero(ids.any(axis=0)) if ids.size else np.array([], dtype=int)
            width = int(used[-1]) + 1 if len(used) else 1
            return torch.from_numpy(np.ascontiguousarray(ids[:, :width]))
        if self.layout == "raw":
            if x.dtype == np.uint8:
                return torch.from_numpy(np.ascontiguousarray(x))
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.layout == "flat":
            arr = x.reshape(len(x), -1)
        elif x.ndim == 3:
            arr = x[:, None, :, :]
        elif x.ndim == 4:
            arr = np.transpose(x, (0, 3, 1, 2))
        else:
            raise DataError(f"input of shape {x.shape} cannot be laid out as images (NCHW)")
        if self.dtype == "uint8":
            return torch.from_numpy(np.ascontiguousarray(arr))
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return t * self.scale if self.scale != 1.0 else t


def find_submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``"features.3"``); TorchScript modules, which do not support
    ``get_submodule``, are searched through ``named_modules()``. Raises AttributeError."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except (AttributeError, RuntimeError):
        for name, module in model.named_modules():
            if name == path:
                return module
    raise AttributeError(path)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class TorchClassifier:
    """Wraps any ``nn.Module`` (or TorchScript module) that maps inputs to class logits.

    ``layer`` names the representation layer (``model.get_submodule`` path); its output is
    captured with a forward hook and flattened. ``outputs`` is ``"logits"`` or ``"probs"``.
    """

    def __init__(self, model: nn.Module, input_spec: InputSpec, layer: str | None = None,
                 batch_size: int = 512, outputs: str = "logits", progress: bool = False,
                 n_classes: int | None = None) -> None:
        if outputs not in ("logits", "probs"):
            raise ModelError(f"outputs must be 'logits' or 'probs', got {outputs!r}")
        self.model = model.eval()
        self.input_spec = input_spec
        self.batch_size = int(batch_size)
        self.outputs = outputs
        self.progress = progress
        self.n_classes = n_classes
        # shape, dtype and value range of the training samples, when model.json records them
        self.expected_inputs: dict[str, Any] | None = None
        self.layer = layer
        if layer is not None:
            self._resolve_layer(layer)

    def _resolve_layer(self, layer: str) -> nn.Module:
        try:
            return find_submodule(self.model, layer)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n]
            raise ModelError(
                f"layer {layer!r} does not exist in the model; available layers: "
                f"{', '.join(names[:40])}{' …' if len(names) > 40 else ''}"
            ) from None

    def _iter(self, n: int, desc: str) -> Iterator[slice]:
        it = batches(n, self.batch_size)
        if self.progress and n > 5 * self.batch_size:
            return tqdm(it, total=(n + self.batch_size - 1) // self.batch_size, desc=desc,
                        leave=False)
        return it

    def _logits(self, xb: torch.Tensor) -> torch.Tensor:
        try:
            out = self.model(xb)
        except RuntimeError as exc:
            raise ModelError(f"the model rejected inputs of shape {tuple(xb.shape)}: "
                             f"{str(exc).splitlines()[0]}") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 2:
            raise ModelError(f"model output has shape {tuple(out.shape)}; expected (batch, "
                             "classes)")
        if self.n_classes is not None and out.shape[1] != self.n_classes:
            raise ModelError(f"model outputs {out.shape[1]} classes but the data has "
                             f"{self.n_classes}; use a model trained for these labels")
        if self.outputs == "probs":
            return torch.log(out.clamp_min(1e-12))
        return out

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, K)."""
        out = [F.softmax(self._logits(self.input_spec.prepare(x[s])), dim=1)
               for s in self._iter(len(x), "predict")]
        return torch.cat(out).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    @torch.no_grad()
    def forward_all(self, x: np.ndarray, y: np.ndarray | None = None,
                    layer: str | None = None,
                    extra_layers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """One pass: probabilities, per-sample losses (if ``y``), the flattened activations of
        ``layer`` (default: the adapter's) as ``representations`` (log-probabilities when no layer
        is set) and of each of ``extra_layers`` under ``layer:<name>``."""
        layer = layer or self.layer
        names = ([layer] if layer is not None else []) + [n for n in extra_layers if n != layer]
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = []

        def hook_for(name: str):  # noqa: ANN202
            def hook(_m: nn.Module, _i: object, o: object) -> None:
                t = o[0] if isinstance(o, (tuple, list)) else o
                captured[name].append(t.detach().flatten(1).clone())
            return hook

        try:
            for name in names:
                module = self._resolve_layer(name)
                try:
                    handles.append(module.register_forward_hook(hook_for(name)))
                except RuntimeError as exc:
                    raise ModelError(f"cannot attach a hook to layer {name!r} ({exc}); pass "
                                     "layer=None to use the model output") from None
            probs, losses = [], []
            for s in self._iter(len(x), "representations"):
                logits = self._logits(self.input_spec.prepare(x[s]))
                probs.append(F.softmax(logits, dim=1))
                if y is not None:
                    yb = torch.from_numpy(np.asarray(y[s], dtype=np.int64))
                    losses.append(F.cross_entropy(logits.double(), yb, reduction="none"))
                for name in names:
                    if len(captured[name]) != len(probs):
                        raise ModelError(f"layer {name!r} was not called exactly once in "
                                         "forward()")
        finally:
            for h in handles:
                h.remove()
        result = {"probs": torch.cat(probs).numpy()}
        for name in names:
            result[f"layer:{name}"] = torch.cat(captured[name]).numpy()
        result["representations"] = (result[f"layer:{layer}"] if layer is not None
                                     else np.log(result["probs"] + 1e-12))
        if y is not None:
            result["losses"] = torch.cat(losses).numpy()
        return result

    def representations(self, x: np.ndarray, layer: str | None = None) -> np.ndarray:
        """Flattened activations of ``layer`` (default: the adapter's layer), shape (N, D)."""
        return self.forward_all(x, layer=layer)["representations"]

    def per_sample_loss(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.forward_all(x, y)["losses"]

    def per_sample_grad_norm(self, x: np.ndarray, y: np.ndarray,
                             params: list[str] | None = None) -> np.ndarray:
        """L2 norm of each sample's loss gradient w.r.t. the parameters (default: all).

        When every selected parameter is the weight or bias of an ``nn.Linear`` applied to
        (batch, features) inputs, the norms come in closed form from one batched backward pass:
        a sample's weight gradient is the outer product of its output gradient g and its input
        a, whose norm is |g| |a| (the bias gradient is g). Otherwise each sample's gradient is
        taken with ``torch.func`` (``vmap`` over ``grad``). Both give the same values."""
        named = {k: v.detach() for k, v in self.model.named_parameters()
                 if params is None or k in params}
        if not named:
            raise ModelError(f"no parameters selected for gradients (params={params})")
        linear = _linear_owners(self.model, list(named))
        if linear is not None:
            norms = []
            for s in self._iter(len(x), "gradient norms"):
                batch = self._linear_grad_norms(x[s], y[s], linear)
                if batch is None:  # not a plain Linear-on-vectors model: no closed form
                    return self._func_grad_norms(x, y, named)
                norms.append(batch)
            return np.concatenate(norms)
        return self._func_grad_norms(x, y, named)

    def _linear_grad_norms(self, x: np.ndarray, y: np.ndarray,
                           owners: dict[nn.Linear, tuple[bool, bool]]) -> np.ndarray | None:
        """Closed-form per-sample gradient norms for Linear weights/biases; None when a layer's
        input is not (batch, features)."""
        inputs: dict[nn.Linear, torch.Tensor] = {}
        outputs: dict[nn.Linear, torch.Tensor] = {}
        calls: list[nn.Module] = []

        def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            calls.append(m)
            inputs[m], outputs[m] = inp[0].detach(), out  # type: ignore[index]
            return out.clone()  # later in-place ops (ReLU) must not alter the kept output

        handles = [m.register_forward_hook(hook) for m in owners]
        try:
            xb = self.input_spec.prepare(x)
            yb = torch.from_numpy(np.asarray(y, dtype=np.int64))
            with torch.enable_grad():
                loss = F.cross_entropy(self._logits(xb), yb, reduction="sum")
                mods = [m for m in owners if m in outputs]
                if (len(mods) != len(owners) or len(calls) != len(mods)  # a layer used twice
                        or any(inputs[m].ndim != 2 for m in mods)):
                    return None
                grads = torch.autograd.grad(loss, [outputs[m] for m in mods])
        finally:
            for h in handles:
                h.remove()
        sq = torch.zeros(len(xb))
        for m, g in zip(mods, grads):
            g2 = g.pow(2).sum(1)
            weight, bias = owners[m]
            if weight:
                sq += g2 * inputs[m].pow(2).sum(1)
            if bias:
                sq += g2
        return sq.sqrt().detach().numpy()

    def _func_grad_norms(self, x: np.ndarray, y: np.ndarray,
                         named: dict[str, torch.Tensor]) -> np.ndarray:
        from torch.func import functional_call, grad, vmap

        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        buffers.update({k: v.detach() for k, v in self.model.named_parameters()
                        if k not in named})

        def loss_fn(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, (p, buffers), (xi.unsqueeze(0),))
            if self.outputs == "probs":
                out = torch.log(out.clamp_min(1e-12))
            return F.cross_entropy(out, yi.unsqueeze(0))

        per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))
        norms = []
        for s in self._iter(len(x), "gradient norms"):
            xb = self.input_spec.prepare(x[s])
            yb = torch.from_numpy(np.asarray(y[s], dtype=np.int64))
            grads = per_sample(named, xb, yb)
            sq = sum(g.reshape(len(xb), -1).pow(2).sum(1) for g in grads.values())
            norms.append(sq.sqrt())
        return torch.cat(norms).detach().numpy()


def _linear_owners(model: nn.Module, names: list[str]) -> dict[nn.Linear, tuple[bool, bool]] | None:
    """For parameter names that all belong to ``nn.Linear`` layers: each layer with whether its
    weight and its bias are selected; else None."""
    owners: dict[nn.Linear, list[bool]] = {}
    for name in names:
        path, _, leaf = name.rpartition(".")
        module = find_submodule(model, path)
        if not isinstance(module, nn.Linear) or leaf not in ("weight", "bias"):
            return None
        owners.setdefault(module, [False, False])[leaf == "bias"] = True
    return {m: (w, b) for m, (w, b) in owners.items()}
