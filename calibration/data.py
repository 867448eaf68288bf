"""Data sources. The built-in one is scikit-learn's handwritten digits
(1,797 8x8 images, 10 classes), shipped inside the package: no download.

The split is fixed (stratified, seed 0): 70% train, 10% validation, 20% test.
Images are scaled to [0, 1], normalised to mean 0.5 / std 0.5 and upsampled
bilinearly to the model's input size; the same record drives the numpy
preprocessing on devices (:mod:`coformer.runtime.preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_LABELS = [str(i) for i in range(10)]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: Optional[torch.Tensor]
    raw: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    labels: list[str]
    preprocessing: dict[str, Any]


def digits_preprocessing(size: int) -> dict[str, Any]:
    return {"kind": "image", "source": "sklearn.datasets.load_digits", "raw_shape": [8, 8],
            "scale": 1.0 / 16.0, "mean": 0.5, "std": 0.5, "resize": [size, size]}


def preprocess_torch(spec: dict[str, Any], raw: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    x = (x * spec["scale"] - spec["mean"]) / spec["std"]
    if "resize" in spec:
        x = F.interpolate(x, size=tuple(spec["resize"]), mode="bilinear", align_corners=False)
    return x.contiguous()


def load_digits_dataset(size: int = 32, seed: int = 0) -> Dataset:
    """The digits data set, split and preprocessed for a model with ``size``x``size`` input."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8).astype(np.float32)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=labels[rest])
    spec = digits_preprocessing(size)

    def split(ix: np.ndarray) -> Split:
        return Split(preprocess_torch(spec, images[ix]), torch.as_tensor(labels[ix]), images[ix])

    return Dataset(split(train), split(val), split(test), DIGIT_LABELS, spec)


def batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i: i + batch_size]
