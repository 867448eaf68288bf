"""Supervised training of a classifier (the quickstart's teacher)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coformer.calibration.loop import fit


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX), where
    oneDNN makes them about twice as fast as float32; elsewhere bf16 is emulated, and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] translated by up to ``shift`` pixels per axis (borders
    replicated); ``x`` itself when ``shift`` is 0."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train teacher",
    bf16: bool = False,
    shift: int = 0,
) -> list[float]:
    """AdamW with a short warm-up and cosine decay; returns the mean loss of each epoch.

    ``bf16``: forward and backward under bfloat16 autocast on the CPU (the weights and the
    optimizer stay float32). Only where :func:`cpu_bf16_supported`: there it trains the
    quickstart's teacher in well under half the time, at no loss of accuracy measured
    (docs/benchmarks.md, "The quickstart's time").

    ``shift``: translate each training image by up to this many pixels on each axis, a
    fresh draw per sample and step (the borders replicated: the built-in images' background).
    A teacher trained so generalises past what a calibration set alone teaches a student,
    as a pretrained teacher does."""
    gen = torch.Generator().manual_seed(seed)
    M = x.shape[0]
    steps = math.ceil(M / batch_size)

    def batches():
        perm = torch.randperm(M, generator=gen)
        return (perm[i: i + batch_size] for i in range(0, M, batch_size))

    def loss_of(idx):
        xb = random_shift(x[idx], shift, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return F.cross_entropy(model(xb).float(), y[idx], label_smoothing=label_smoothing), len(idx)

    history = fit(model.parameters(), epochs, batches, loss_of, M, steps, lr, weight_decay,
                  warmup_steps=max(1, max(1, epochs * steps) // 10), module=model, progress=progress,
                  desc=desc)
    model.eval()
    return history
