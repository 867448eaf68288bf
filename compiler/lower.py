"""Lowering: a PyTorch module -> ONNX, checked against PyTorch with ONNX Runtime.

Each step is a function with explicit inputs and outputs, so a sub-model can
be exported and checked alone. Export uses the TorchScript exporter
(``dynamo=False``): it handles every family here, is 5-20x faster than the
dynamo exporter, and writes one self-contained file (no external data).

Attention is exported in its explicit form, ``softmax(q * scale @ k^T) @ v``
with a constant scale, not as ``scaled_dot_product_attention``: the exporter
lowers the latter with the scale computed from the tensor's shape at run time
(Shape, Slice, Cast, Sqrt, Div, and q and k each multiplied by the scale's
square root), 11 nodes a layer more that ONNX Runtime does not fold because
the batch axis is dynamic. The explicit form runs faster on ONNX Runtime's
CPU provider, with the same outputs within 1e-6 (docs/benchmarks.md, the
section on explicit attention since 5642ae5). Modules that follow
timm's convention (a boolean ``fused_attn``: timm's ViT and DeiT
attention, and CoFormer's own ViT sub-models) are switched to their explicit
path for the export and back after, so the teacher and every baseline are
exported the same way as the sub-models and comparisons stay like for like.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from coformer.runtime.files import public_mode
from coformer.runtime.errors import CoFormerError

FEATURE_OUTPUT = "features"  # a sub-model's ONNX output: its pooled feature X_n

OPSET = 17


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Optional[Mapping[str, Mapping[int, str]]] = None,
) -> Path:
    """Export ``module`` with a dynamic batch axis on every input and output (or the
    given ``dynamic_axes``, name -> {axis: label}); atomic write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = dict(dynamic_axes) if dynamic_axes else {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    module = module.eval()
    fused = [m for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    try:
        for m in fused:  # the explicit attention (the module doc says why)
            m.fused_attn = False
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, tuple(example_inputs), tmp, dynamo=False, opset_version=OPSET,
                input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic,
            )
        public_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        for m in fused:
            m.fused_attn = True
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_parity(
    module: nn.Module,
    onnx_path: Path,
    inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    tolerance: float = 1e-4,
) -> float:
    """Max |ONNX Runtime - PyTorch| over ``inputs`` (a batch); raise if above ``tolerance``."""
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    with torch.no_grad():
        expected = module.eval()(*inputs).numpy()
    with OnnxRuntimeEngine(onnx_path, threads=1) as engine:
        got = next(iter(engine.infer({n: t.numpy() for n, t in zip(input_names, inputs)}).values()))
    if got.shape != expected.shape:
        raise CoFormerError(f"{onnx_path.name}: ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:
        raise CoFormerError(f"{onnx_path.name}: ONNX Runtime differs from PyTorch by {diff:.3g} > {tolerance:g}")
    return diff


FP16_TOLERANCE = 5e-2  # fp16 keeps ~3 significant digits; a sub-model's pooled feature is O(1)


def write_fp16_onnx(fp32_path: Path, fp16_path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Write an fp16 copy of an exported model, for TensorRT 11 (strongly typed only: the ONNX's
    types are the engine's), and return its largest difference from the float32 model on
    ``feeds`` under ONNX Runtime on the CPU; raise above ``FP16_TOLERANCE``.

    The conversion is ONNX Runtime's own (``onnxruntime.transformers.float16``), with the
    inputs and outputs kept float32 (``keep_io_types``), so the runtime feeds and reads an fp16
    model exactly as the float32 one and the wire format does not change.

    What this gate measures: ONNX Runtime's CPU provider computes most fp16 nodes in float32
    (it inserts casts), so the difference is the weights' rounding to fp16, not fp16
    arithmetic. The engine built on the device is checked again there, on the same check
    inputs, and refused past the same tolerance (``runtime/tensorrt_engines.parity_refusal``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    tmp = Path(f"{fp16_path}.tmp")
    try:
        onnx.save(model, str(tmp))
        public_mode(tmp)
        with OnnxRuntimeEngine(fp32_path) as ref, OnnxRuntimeEngine(tmp) as half:
            want, got = ref.infer(feeds), half.infer(feeds)
        diff = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) for k, v in want.items())
        if not diff <= FP16_TOLERANCE:
            raise CoFormerError(f"{fp16_path.name}: the fp16 model differs from the float32 one by {diff:.3g} > "
                                f"{FP16_TOLERANCE:g}; compile at --precision fp32")
        os.replace(tmp, fp16_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return diff


def parity_lengths(x: torch.Tensor) -> list[int]:
    """Three sequence lengths to check a text model's ONNX at: short, middle and the longest."""
    T = int(x.shape[-1])
    return sorted({max(2, T // 4), max(2, T // 2), T})


def lower_submodel(module: nn.Module, x: torch.Tensor, path: Path, input_names: Sequence[str], *, text: bool,
                   output: str = FEATURE_OUTPUT) -> float:
    """Export one sub-model to ONNX; returns its parity with PyTorch (the largest absolute
    difference of the outputs).

    A text model (packed ``x``: ``[B, k, T]``) is exported with dynamic batch and
    sequence axes on every input and checked at three sequence lengths (the
    worst difference is recorded); an image model with a dynamic batch.
    """
    if not text:
        export_onnx(module, [x[:1]], path, input_names, [output])
        return check_parity(module, path, [x], input_names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in input_names}
    dynamic[output] = {0: "batch"}
    export_onnx(module, list(x[:2].unbind(1)), path, input_names, [output], dynamic)
    worst = 0.0
    for T in parity_lengths(x):
        cut = x[..., :T].clone()
        cut[:, 1, 0] = 1  # a text keeps at least its first token
        worst = max(worst, check_parity(module, path, list(cut.unbind(1)), input_names))
    return worst
