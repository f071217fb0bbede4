"""Flat ``{key: ndarray}`` encodings of LoRA factors and ΔW, with validation on decode.

Keys are ``<module>::A`` / ``<module>::B`` for factors and ``<module>::dW`` for a dense ΔW. The transport layer
(Flower's ArrayRecord) carries these dicts unchanged. A factor pair's scale does not travel: a node's adapters carry the
run's adapter scale, which both sides know from the run config (:func:`decode_factors` takes it), and a ΔW travels
with its scale folded in (:func:`encode_delta`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedpipe_core.lowrank import Factors, LowRank
from fedpipe_core.protocol import SEP, UpdateError

Shapes = Mapping[str, tuple[int, int]]


def encode_factors(factors: Factors) -> dict[str, np.ndarray]:
    """(A, B) per module -> ``{module::A, module::B}`` (the scale stays behind: see the module's note)."""
    out: dict[str, np.ndarray] = {}
    for module, lowrank in factors.items():
        out[f"{module}{SEP}A"] = lowrank.A.detach().float().cpu().numpy()
        out[f"{module}{SEP}B"] = lowrank.B.detach().float().cpu().numpy()
    return out


def encode_delta(lowranks: Mapping[str, LowRank]) -> dict[str, np.ndarray]:
    """ΔW per module, as factors (the scale folded into B) or dense, whichever is smaller."""
    out: dict[str, np.ndarray] = {}
    for module, lowrank in lowranks.items():
        if lowrank.is_cheaper_dense():
            out[f"{module}{SEP}dW"] = lowrank.dense().numpy()
        else:
            out.update(encode_factors({module: lowrank.folded()}))
    return out


def encode_dense(deltas: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Dense ΔW per module -> ``{module::dW}``."""
    return {f"{module}{SEP}dW": delta.detach().float().cpu().numpy() for module, delta in deltas.items()}


def _group(arrays: Mapping[str, np.ndarray], shapes: Shapes) -> dict[str, dict[str, np.ndarray]]:
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        module, sep, part = key.rpartition(SEP)
        if not sep or part not in ("A", "B", "dW"):
            raise UpdateError(f"array {key!r}: expected '<module>::A|B|dW'")
        if module not in shapes:
            raise UpdateError(f"array {key!r}: {module!r} is not an adaptable module of this model")
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise UpdateError(f"array {key!r}: dtype {array.dtype} is not floating point")
        if array.ndim != 2:
            raise UpdateError(f"array {key!r}: expected a matrix, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise UpdateError(f"array {key!r}: contains NaN or Inf")
        grouped.setdefault(module, {})[part] = array
    return grouped


def _pair(module: str, parts: dict[str, np.ndarray], shape: tuple[int, int], scale: float) -> LowRank:
    """A module's checked ``::A`` and ``::B`` as FP32 factors of the given scale."""
    if set(parts) != {"A", "B"}:
        raise UpdateError(f"module {module!r}: expected both ::A and ::B, got {sorted(parts)}")
    A, B = parts["A"], parts["B"]
    out_dim, in_dim = shape
    if A.shape[1] != in_dim or B.shape[0] != out_dim or A.shape[0] != B.shape[1] or A.shape[0] < 1:
        raise UpdateError(f"module {module!r}: A {A.shape} and B {B.shape} do not factor a ({out_dim}, {in_dim}) weight")
    return LowRank(torch.from_numpy(A.astype(np.float32)), torch.from_numpy(B.astype(np.float32)), scale)


def decode_factors(arrays: Mapping[str, np.ndarray], shapes: Shapes, scale: float) -> Factors:
    """Validate and convert ``{module::A, module::B}`` back to factors of the given scale (see the module's note)."""
    out: Factors = {}
    for module, parts in _group(arrays, shapes).items():
        out[module] = _pair(module, parts, shapes[module], scale)
    return out


def decode_delta(arrays: Mapping[str, np.ndarray], shapes: Shapes) -> dict[str, torch.Tensor]:
    """Validate and densify a ΔW payload (factors or dense per module)."""
    out: dict[str, torch.Tensor] = {}
    for module, parts in _group(arrays, shapes).items():
        if "dW" in parts:
            if len(parts) != 1 or parts["dW"].shape != tuple(shapes[module]):
                raise UpdateError(f"module {module!r}: dense ΔW must come alone with shape {shapes[module]}")
            out[module] = torch.from_numpy(parts["dW"].astype(np.float32))
        else:
            out[module] = _pair(module, parts, shapes[module], scale=1.0).dense()
    return out


def stored_delta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Densify a ΔW this node validated when it arrived and kept as sent (``<module>::A|B|dW``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(SEP)
        parts.setdefault(module, {})[part] = value.float()
    return {m: p["dW"] if "dW" in p else LowRank(p["A"], p["B"]).dense() for m, p in parts.items()}
