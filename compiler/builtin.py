"""The built-in teacher (``--model quickstart``): a ViT trained on scikit-learn's
digits once and cached, so every command can run without a checkpoint of the
user's and without a download. ``--model quickstart:mnist`` is the same ViT
trained on the built-in MNIST subset (:mod:`coformer.calibration.data`).

The cache lives in ``$COFORMER_CACHE_DIR`` (default ``~/.cache/coformer``),
keyed by every setting the weights depend on; an unreadable cache file is
trained again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from coformer.runtime.files import atomic_write_bytes

CACHE_VERSION = 1


@dataclass(frozen=True)
class QuickstartTeacher:
    """The built-in teacher and its training.

    The default is wide and shallow with few tokens (a 32x32 input in 16x16
    patches: 4 tokens and the class token): slow enough on one core that socket
    overhead does not dominate CoFormer's latency, yet trained in about 40 s on two
    cores with bf16 and, by the scale measured for the teacher of 8x8 patches (53 s
    an epoch there against 19 s here), under 2 minutes on a 2-core AVX2-only CPU. The
    8x8-patch teacher it replaced (17 tokens, 1.69 GFLOPs) took 2.5 and 7 minutes, and
    reached 94.2% on the test split against this one's 96.4%: digits are 8x8 images
    upsampled, so a 16x16 patch is a 4x4 block of real pixels.
    ``batch_size`` 64 halves the optimizer steps over 49.7 M parameters (a third of an
    epoch's time at batch 32).

    ``precision``: ``auto`` trains under bfloat16 autocast where the CPU has native
    bf16 (:func:`coformer.calibration.train.cpu_bf16_supported`), float32 elsewhere;
    ``bf16`` or ``float32`` force one. The weights differ between the two, so the
    precision used is part of the cache key.

    ``data``: the built-in image data it is trained on (``digits`` or ``mnist``,
    :data:`coformer.calibration.data.BUILTIN_IMAGE_DATA`). ``shift``: train on images
    translated by up to this many pixels (:func:`coformer.calibration.train.random_shift`).
    """

    embed_dim: int = 768
    depth: int = 7
    num_heads: int = 24
    img_size: int = 32
    patch_size: int = 16
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    precision: str = "auto"
    data: str = "digits"
    shift: int = 0


# The built-in teacher of each built-in data set (``--model quickstart:NAME``; the
# quickstart's ``--data NAME``). MNIST's is narrower and deeper with finer patches (7x7
# tokens of 4x4 pixels, 277 MFLOPs) and trained 20 epochs on images shifted by up to 3
# pixels: 93.8% on the test split, where the largest student within a tenth of its FLOPs
# reaches 87.1%. The digits teacher's first shape (8x8 patches), trained on MNIST without shifts, reached 90.2%
# against its tenth's 89.3%: it overfits 3,500 images. ``python -m
# experiments.capacity_check`` (docs/benchmarks.md, "Accuracy against latency, and a task
# where capacity matters").
BUILTIN_TEACHERS = {
    "digits": QuickstartTeacher(),
    "mnist": QuickstartTeacher(embed_dim=192, depth=6, num_heads=6, img_size=28, patch_size=4, epochs=20,
                               batch_size=32,
                               shift=3, data="mnist"),
}


def cache_dir() -> Path:
    base = os.environ.get("COFORMER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coformer")
    return Path(base)


def build_quickstart_teacher(cfg: QuickstartTeacher) -> nn.Module:
    """The untrained teacher: a timm ``VisionTransformer`` on 1-channel images, 10 classes."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(cfg.seed)
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=1, num_classes=10,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                             global_pool="avg").eval()


def quickstart_teacher(cfg: QuickstartTeacher = QuickstartTeacher(), data=None, progress: bool = True,
                       say: Optional[Callable[[str], None]] = None) -> tuple[nn.Module, Path]:
    """The trained teacher and its cache file, trained on ``data`` (default: ``cfg.data``'s
    built-in images at the teacher's size) when no identical one was trained before."""
    from coformer.calibration.data import BUILTIN_IMAGE_DATA, load_builtin_images
    from coformer.calibration.train import cpu_bf16_supported, train_classifier

    say = say or (lambda msg: None)
    if cfg.precision not in ("auto", "bf16", "float32"):
        raise ValueError(f"precision {cfg.precision!r} must be auto, bf16 or float32")
    if cfg.data not in BUILTIN_IMAGE_DATA:
        raise ValueError(f"data {cfg.data!r} must be one of {', '.join(BUILTIN_IMAGE_DATA)}")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cpu_bf16_supported() else "float32")
    key = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "img_size": cfg.img_size,
           "patch_size": cfg.patch_size, "teacher_epochs": cfg.epochs, "teacher_lr": cfg.lr, "seed": cfg.seed}
    if precision != "float32":  # float32 keeps the keys of the teachers cached before precision was one
        key["precision"] = precision
    if cfg.data != "digits":  # likewise: digits keeps the keys of the teachers cached before data was one
        key["data"] = cfg.data
    if cfg.shift:
        key["shift"] = cfg.shift
    if cfg.batch_size != 32:  # likewise for batch 32, every teacher's before batch_size was one
        key["batch_size"] = cfg.batch_size
    digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "quickstart" / f"teacher-{digest}.pt"
    model = build_quickstart_teacher(cfg)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            say(f"teacher: cached at {path}")
            return model.eval(), path
        except (RuntimeError, OSError, EOFError) as e:
            say(f"teacher cache {path} is unreadable ({e}); training again")
    data = data or load_builtin_images(cfg.data, size=cfg.img_size, seed=cfg.seed)
    say(f"teacher: training ViT d={cfg.embed_dim}, {cfg.depth} layers, {cfg.num_heads} heads "
        f"for {cfg.epochs} epochs on {len(data.train)} {cfg.data} images, {precision} (cached afterwards)")
    train_classifier(model, data.train.x, data.train.y, cfg.epochs, lr=cfg.lr, seed=cfg.seed, progress=progress,
                     bf16=precision == "bf16", shift=cfg.shift, batch_size=cfg.batch_size)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    return model.eval(), path
