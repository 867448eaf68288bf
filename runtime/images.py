"""Image files to model inputs on a device, with numpy and Pillow alone (the
``coformer[image]`` extra: no torch, no torchvision, no timm).

It reproduces the evaluation transform timm builds from a model's data config
(``timm.data.resolve_data_config`` + ``create_transform(is_training=False)``),
which is what the compiler calibrated on and the manifest records
(``input.preprocessing`` with ``"source": "timm"``):

1. decode with Pillow and convert to RGB (``L`` for a one-channel model), as
   torchvision's ``ImageFolder`` loader does;
2. resize with Pillow's filter of ``interpolation``: ``crop_mode`` ``center``
   scales the shorter edge to ``floor(size / crop_pct)`` keeping the aspect
   ratio (torchvision's ``Resize(int)``; timm's ``ResizeKeepRatio`` for a
   non-square input), ``squash`` scales both edges to ``floor(size / crop_pct)``;
3. crop the centre (torchvision's rounding, zero padding when the image is
   smaller than the crop);
4. scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel.

Since the resize is Pillow's own in both places, the result matches timm's to
float rounding (the tests hold it within 1e-3 on real JPEGs). ``crop_mode``
``border`` is refused with the way out.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from coformer.runtime.errors import CoFormerError

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
ImageSource = Union[str, Path, bytes, np.ndarray, Any]


def pillow():
    """Pillow's ``Image`` module, or the error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError:
        raise CoFormerError("reading images needs Pillow: pip install 'coformer[image]'") from None
    return Image


def is_image_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a preprocessing record is for image files (timm's transform)."""
    return spec.get("kind") == "image" and spec.get("source") == "timm"


def check_spec(spec: Mapping[str, Any]) -> None:
    """Refuse a record this runtime cannot reproduce, naming the bad field."""
    for key in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"):
        if key not in spec:
            raise CoFormerError(f"image preprocessing record lacks '{key}'")
    c, h, w = spec["input_size"]
    if c not in (1, 3) or h < 1 or w < 1:
        raise CoFormerError(f"image input_size {list(spec['input_size'])}: expected [1 or 3, H, W]")
    if spec["crop_mode"] not in CROP_MODES:
        raise CoFormerError(f"crop_mode {spec['crop_mode']!r} is not reproduced on devices (supported: "
                            f"{list(CROP_MODES)}); compile with --crop-mode center")
    if spec["interpolation"] not in INTERPOLATIONS:
        raise CoFormerError(f"interpolation {spec['interpolation']!r} is not one of {list(INTERPOLATIONS)}")
    if not 0 < float(spec["crop_pct"]) <= 1.0:
        raise CoFormerError(f"crop_pct {spec['crop_pct']} must be in (0, 1]")
    if len(spec["mean"]) != c or len(spec["std"]) != c or min(spec["std"]) <= 0:
        raise CoFormerError(f"mean {list(spec['mean'])} / std {list(spec['std'])} must have {c} entries, std > 0")


def open_image(source: ImageSource, channels: int = 3):
    """A Pillow image in RGB (``channels`` 3) or L (1) from a path, encoded bytes, a uint8
    array ``[H, W]`` / ``[H, W, C]`` or a Pillow image; a bad file raises naming it."""
    Image = pillow()
    mode = "RGB" if channels == 3 else "L"
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise CoFormerError(f"an image array must be uint8 [H, W] or [H, W, C], got {source.dtype} "
                                f"{list(source.shape)}")
        return Image.fromarray(source).convert(mode)
    if isinstance(source, Image.Image):
        return source.convert(mode)
    name = "the image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        img.load()
        return img.convert(mode)
    except FileNotFoundError:
        raise CoFormerError(f"image file {name} does not exist") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise CoFormerError(f"{name} is not an image Pillow can read: {e}") from None


def _resized_size(w: int, h: int, spec: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) after the resize step, as torchvision / timm compute it."""
    _, th, tw = spec["input_size"]
    pct = float(spec["crop_pct"])
    sh, sw = math.floor(th / pct), math.floor(tw / pct)
    if spec["crop_mode"] == "squash":
        return sw, sh
    if sh == sw:  # torchvision Resize(int): the shorter edge to sh
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = sh, int(sh * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    ratio = min(h / sh, w / sw)  # timm ResizeKeepRatio(longest=0)
    return round(w / ratio), round(h / ratio)


def preprocess_image(source: ImageSource, spec: Mapping[str, Any]) -> np.ndarray:
    """One image -> the model input ``[C, H, W]`` float32 of the record ``spec``."""
    Image = pillow()
    check_spec(spec)
    c, th, tw = (int(v) for v in spec["input_size"])
    img = open_image(source, c)
    size = _resized_size(img.width, img.height, spec)
    if size != (img.width, img.height):
        img = img.resize(size, getattr(Image.Resampling, spec["interpolation"].upper()))
    w, h = img.size
    if tw > w or th > h:  # torchvision center_crop pads with zeros first
        left, top = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        canvas = Image.new(img.mode, (max(w, tw), max(h, th)), 0)
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    img = img.crop((left, top, left + tw, top + th))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess_images(sources: Sequence[ImageSource], spec: Mapping[str, Any]) -> np.ndarray:
    """Several images -> one batch ``[N, C, H, W]``."""
    if not len(sources):
        raise CoFormerError("no image given")
    return np.stack([preprocess_image(s, spec) for s in sources])


# An image sent to be preprocessed may claim any size in its header; past this many pixels
# (8000 x 8000) it is refused before it is decoded, so a peer cannot make a device allocate
# gigabytes with a few KB (a decompression bomb). A camera's frame is far below it.
MAX_SOURCE_PIXELS = 64_000_000


def request_input(images: Sequence[bytes], spec: Mapping[str, Any]) -> np.ndarray:
    """The model input ``[N, C, H, W]`` float32 for a request's encoded images, on whichever
    device runs it (the central node and every worker alike, from the same bytes): each
    decoded and preprocessed as the bundle's record ``spec`` says (:func:`preprocess_image`).

    A file that is not an image, or whose header claims more than :data:`MAX_SOURCE_PIXELS`,
    is the sender's fault: :class:`coformer.runtime.protocol.ProtocolError` ``bad_image``
    naming which one."""
    from coformer.runtime.protocol import ProtocolError

    Image = pillow()
    check_spec(spec)
    out = []
    for i, data in enumerate(images):
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError...
            raise ProtocolError("bad_image", f"image {i} is not an image Pillow can read: {e}") from None
        if w * h > MAX_SOURCE_PIXELS:
            raise ProtocolError("bad_image", f"image {i} is {w}x{h}, over the {MAX_SOURCE_PIXELS:,} pixels a "
                                             "device decodes")
        try:
            out.append(preprocess_image(img, spec))
        except Exception as e:  # a truncated or corrupt file fails when decoded (Pillow's own errors)
            raise ProtocolError("bad_image", f"image {i}: {e}") from None
    return np.stack(out)
