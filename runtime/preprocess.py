"""Input preprocessing without torch: turns raw data into the model input the
bundle's manifest describes, so a device needs only numpy.

An image ``preprocessing`` record holds ``scale`` (multiplied first), ``mean``
and ``std`` (per channel or one value), and an optional ``resize`` ``[H, W]``
done with bilinear interpolation exactly as ``torch.nn.functional.interpolate
(mode="bilinear", align_corners=False)`` does it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from coformer.runtime.errors import CoFormerError


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` to ``size`` (torch's bilinear, align_corners=False)."""
    h0, w0, h1, w1 = x.shape[-2], x.shape[-1], int(size[0]), int(size[1])
    r0, r1, rf = _axis_weights(h0, h1)
    c0, c1, cf = _axis_weights(w0, w1)
    rows = x[..., r0, :] * (1 - rf)[:, None] + x[..., r1, :] * rf[:, None]
    return (rows[..., c0] * (1 - cf) + rows[..., c1] * cf).astype(np.float32)


def preprocess(spec: Mapping[str, Any], raw: np.ndarray) -> np.ndarray:
    """Apply an image preprocessing record to ``raw`` of shape ``[B, C, H, W]``, ``[B, H, W]`` or ``[H, W]``.

    A bundle preprocessed by timm's transform (``"source": "timm"``, see
    :mod:`coformer.runtime.images`) takes uint8 pixels instead: one RGB image ``[H, W, 3]``
    or a batch ``[B, H, W, 3]`` (a one-channel model: ``[H, W]`` or ``[B, H, W]``).
    """
    if spec.get("source") == "timm":
        from coformer.runtime.images import preprocess_images

        x = np.asarray(raw)
        channels = int(spec["input_size"][0])
        single, want = (2, "[H, W] or [B, H, W]") if channels == 1 else (3, "[H, W, 3] or [B, H, W, 3]")
        if x.dtype != np.uint8 or x.ndim not in (single, single + 1) or (channels == 3 and x.shape[-1] != 3):
            raise CoFormerError(f"raw input for this bundle is uint8 pixels {want}, got {x.dtype} {list(x.shape)}")
        batch = x if x.ndim == single + 1 else x[None]
        return preprocess_images(list(batch), spec)
    if spec.get("kind") != "image":
        raise CoFormerError(f"preprocessing kind {spec.get('kind')!r} is not supported (expected 'image')")
    x = np.asarray(raw, dtype=np.float32)
    raw_shape = tuple(spec.get("raw_shape", x.shape[-2:]))
    if x.shape[-2:] != raw_shape:
        raise CoFormerError(f"raw input has spatial shape {list(x.shape[-2:])}, the bundle expects {list(raw_shape)}")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise CoFormerError(f"raw input must have 2 to 4 axes, got shape {list(x.shape)}")
    x = x * float(spec.get("scale", 1.0))
    mean = np.asarray(spec.get("mean", 0.0), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.get("std", 1.0), dtype=np.float32).reshape(-1, 1, 1)
    x = (x - mean) / std
    if "resize" in spec:
        x = resize_bilinear(x, tuple(spec["resize"]))
    return np.ascontiguousarray(x, dtype=np.float32)
