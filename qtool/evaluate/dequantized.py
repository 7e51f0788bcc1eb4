"""qtool's own dequantized model: the reference every written checkpoint is checked against.

:func:`apply_dequantized` puts the weights qtool evaluates (:meth:`QuantizedWeight.dequantize`)
into a loaded transformers model and, for W8A8, fake-quantizes the inputs of the quantized
linears to int8 exactly as compressed-tensors does at run time
(``quantization/lifecycle/forward.py`` ``forward_quantize`` -> ``_quantize_dequantize``):

- dynamic per-token: ``scale = absmax(token) / 127.5`` (``calculate_qparams``: the symmetric
  scale is ``max|x| / ((q_max - q_min) / 2)`` with ``[q_min, q_max] = [-128, 127]``), a zero
  scale replaced by the dtype's eps;
- static per-tensor: the stored ``input_scale``;
- then ``clamp(x / scale, -128, 127)``, ``round`` (half to even), ``* scale``, all in the
  activation's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from qtool.errors import BadInputError
from qtool.grids.affine import QuantizedWeight

if TYPE_CHECKING:
    from qtool.formats.folder import ActivationQuant

Q_MIN, Q_MAX = -128.0, 127.0


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """int8 symmetric fake-quantization of ``x``: per token (last dim reduced) when ``scale`` is
    None, else with the given per-tensor scale. Same operations, same order as
    compressed-tensors' ``_quantize_dequantize``, so the results are bit-identical."""
    if scale is None:
        lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
        hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / torch.tensor((Q_MAX - Q_MIN) / 2, dtype=amax.dtype)
        eps = torch.finfo(scale.dtype).eps
        scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)
    else:
        scale = scale.to(x.dtype)
    q = torch.round(torch.clamp(x / scale, Q_MIN, Q_MAX))
    return q * scale


def apply_dequantized(
    model: Any,
    weights: Mapping[str, QuantizedWeight | Callable[[], QuantizedWeight]],
    activations: ActivationQuant | None = None,
    float_overrides: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]] | None = None,
) -> Any:
    """Put the dequantized ``weights`` (module name -> QuantizedWeight or its loader) and the
    ``float_overrides`` (tensor name -> tensor or loader) into ``model`` in place, each cast to
    the parameter's dtype; with ``activations``, the quantized linears' inputs are int8
    fake-quantized (a forward pre-hook). Returns ``model``."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, item in weights.items():
            qw = item() if callable(item) else item
            mod = modules.get(name)
            if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
                raise BadInputError(f"{name}: no such linear layer in the model")
            w = mod.weight
            w.data = qw.dequantize(torch.float32).to(w.dtype).to(w.device)
            if activations is not None:
                _hook_inputs(mod, name, activations)
        for tname, ov in (float_overrides or {}).items():
            t = ov() if callable(ov) else ov
            if tname not in params:
                raise BadInputError(f"{tname}: no such parameter in the model")
            p = params[tname]
            p.data = t.to(p.dtype).to(p.device)
    return model


def _hook_inputs(mod: torch.nn.Module, name: str, acts: ActivationQuant) -> None:
    if acts.bits != 8:
        raise BadInputError(f"activation bits {acts.bits}: only int8 is supported")
    scale: torch.Tensor | None = None
    if not acts.dynamic:
        scales = acts.input_scales or {}
        if name not in scales:
            raise BadInputError(f"static activations: no input scale for {name}")
        scale = torch.tensor([float(scales[name])], dtype=torch.float32)

    def pre_hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (fake_quant_int8(args[0], scale), *args[1:])

    mod.register_forward_pre_hook(pre_hook)
