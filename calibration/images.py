"""Image folders a user has (``coformer compile --data DIR``), preprocessed as the
teacher was evaluated.

Layouts:

* one sub-folder per class (torchvision's ``ImageFolder``): the classes are the
  folder names in sorted order, label i the i-th folder, images found at any
  depth below it;
* a flat folder of images: no labels, so calibration distils from the
  teacher's own decisions alone (label-free) and accuracy is agreement with them.

JPEG, PNG and WebP files are decoded with Pillow; hidden files and other files
are skipped. The preprocessing is the teacher's own evaluation transform, from
timm's data config (``resolve_data_config`` on the model, then
``create_transform``): input size, resize by ``crop_pct``, centre crop,
interpolation, mean and std, each overridable. The record that drives it is
written to the manifest, and :mod:`coformer.runtime.images` reproduces it on the
device without torch.

The split is fixed by ``seed``: ``val_fraction`` for the search's validation loss,
``test_fraction`` for the reported accuracy, the rest for calibration, stratified
by class when labelled. Images are decoded when a batch needs them (a
``DataLoader`` with worker processes), never all at once; a split whose decoded
images fit :data:`coformer.calibration.data.DECODED_CACHE_BYTES` is kept after
its first whole pass (:meth:`coformer.calibration.data.Split.batches`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from coformer.calibration.data import Dataset, Split
from coformer.runtime.errors import CoFormerError
from coformer.runtime.images import CROP_MODES, INTERPOLATIONS, SUFFIXES, check_spec, open_image


@dataclass(frozen=True)
class FolderScan:
    paths: list[Path]
    targets: Optional[list[int]]  # None: a flat folder, no labels
    classes: list[str]


def _images_under(folder: Path) -> list[Path]:
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink back up the tree: walked once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in SUFFIXES]
    return found


def check_headers(paths: Sequence[Path]) -> None:
    """Open every file's header (not its pixels: fast), so that a file that is no image is
    named before a compile starts rather than when a batch first decodes it."""
    from coformer.runtime.images import pillow

    Image = pillow()
    bad = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.size
        except Exception as e:  # Pillow raises several kinds
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        raise CoFormerError(f"{len(bad)} file(s) are not images Pillow can read: {', '.join(bad[:5])}"
                            + (" ..." if len(bad) > 5 else "") + "; remove or fix them")


def scan_image_folder(root: Path) -> FolderScan:
    """Find the images of ``root`` and their classes (see the module doc); errors name what is wrong,
    a file that is not an image included (:func:`check_headers`)."""
    root = Path(root)
    if not root.is_dir():
        raise CoFormerError(f"--data {root}: no such folder")
    top = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    flat = [p for p in top if p.is_file() and p.suffix.lower() in SUFFIXES]
    class_dirs = [p for p in top if p.is_dir()]
    per_class = {d.name: _images_under(d) for d in class_dirs}
    per_class = {k: v for k, v in per_class.items() if v}
    if flat and per_class:
        raise CoFormerError(f"--data {root} holds {len(flat)} images beside {len(per_class)} class folders; put the "
                            "images in class folders (labelled) or all in one folder (label-free), not both")
    if per_class:
        empty = sorted(d.name for d in class_dirs if d.name not in per_class)
        if empty and len(per_class) < 2:
            raise CoFormerError(f"--data {root}: only the class folder {sorted(per_class)} holds images "
                                f"({', '.join(SUFFIXES)}); empty: {empty}")
        classes = sorted(per_class)
        paths, targets = [], []
        for i, name in enumerate(classes):
            paths += per_class[name]
            targets += [i] * len(per_class[name])
        check_headers(paths)
        return FolderScan(paths, targets, classes)
    if not flat:
        raise CoFormerError(f"--data {root} holds no {'/'.join(s[1:] for s in SUFFIXES)} images")
    check_headers(flat)
    return FolderScan(flat, None, [])


def timm_preprocessing(teacher: torch.nn.Module, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The teacher's evaluation preprocessing as a manifest record: timm's data config for the
    model (its ``pretrained_cfg``), ``overrides`` (``crop_pct``, ``crop_mode``,
    ``interpolation``, ``mean``, ``std``) on top. The input size is always the model's own."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=teacher)
    pe = teacher.patch_embed
    size = [int(pe.proj.in_channels), *(int(v) for v in pe.img_size)]
    record = {"kind": "image", "source": "timm", "input_size": size,
              "crop_pct": float(cfg.get("crop_pct") or 0.875), "crop_mode": cfg.get("crop_mode") or "center",
              "interpolation": cfg.get("interpolation") or "bilinear",
              "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    for key, value in dict(overrides or {}).items():
        if value is None:
            continue
        if key not in ("crop_pct", "crop_mode", "interpolation", "mean", "std"):
            raise CoFormerError(f"preprocessing override {key!r} is not one of crop_pct, crop_mode, interpolation, "
                                "mean, std")
        record[key] = [float(v) for v in value] if key in ("mean", "std") else value
    if size[0] == 1 and len(record["mean"]) == 3:  # a 1-channel model under an RGB data config: their mean
        record["mean"], record["std"] = [float(np.mean(record["mean"]))], [float(np.mean(record["std"]))]
    check_spec(record)
    return record


def torch_transform(record: Mapping[str, Any]):
    """timm's evaluation transform for a record (what calibration decodes with)."""
    from timm.data import create_transform

    return create_transform(input_size=tuple(record["input_size"]), is_training=False,
                            interpolation=record["interpolation"], mean=tuple(record["mean"]),
                            std=tuple(record["std"]), crop_pct=record["crop_pct"], crop_mode=record["crop_mode"])


class ImageFiles(torch.utils.data.Dataset):
    """Image ``i`` of ``paths``, decoded with Pillow and transformed by timm's transform of ``record``."""

    def __init__(self, paths: Sequence[Path], record: Mapping[str, Any]) -> None:
        self.paths, self.record = [str(p) for p in paths], dict(record)
        self.channels = int(record["input_size"][0])
        self._transform = None  # built in each loader process

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._transform is None:
            self._transform = torch_transform(self.record)
        return self._transform(open_image(self.paths[i], self.channels))


def split_indices(n: int, targets: Optional[Sequence[int]], val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices, fixed by ``seed``; stratified when every class has
    enough samples for it."""
    from sklearn.model_selection import train_test_split

    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 < f < 1:
            raise CoFormerError(f"{name} {f} must be between 0 and 1")
    if val_fraction + test_fraction >= 0.9:
        raise CoFormerError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave less than 10% "
                            "to calibrate on")
    if n < 10:
        raise CoFormerError(f"{n} images are too few to split into calibration, validation and test (need 10)")
    idx = np.arange(n)
    y = None if targets is None else np.asarray(targets)
    classes = 0 if y is None else len(np.unique(y))
    # stratified where every split can hold every class; a split of fewer samples than classes cannot
    stratify = y is not None and np.bincount(y).min() >= 5 and min(val_fraction, test_fraction) * n >= classes
    strat = y if stratify else None
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                  stratify=None if strat is None else strat[rest])
    if not len(val) or not len(test):
        raise CoFormerError(f"--val-fraction {val_fraction} / --test-fraction {test_fraction} of {n} images leave an "
                            "empty split")
    return np.sort(train), np.sort(val), np.sort(test)


def image_folder_dataset(root: Path, record: Mapping[str, Any], val_fraction: float = 0.1,
                         test_fraction: float = 0.2, seed: int = 0,
                         label_names: Optional[Sequence[str]] = None, scan: Optional[FolderScan] = None) -> Dataset:
    """The streamed :class:`Dataset` of an image folder (see the module doc). ``label_names``:
    the task's labels when the folder has none (the teacher's own classes); ``scan``: the
    folder's :func:`scan_image_folder`, when the caller has it already."""
    scan = scan or scan_image_folder(root)
    train, val, test = split_indices(len(scan.paths), scan.targets, val_fraction, test_fraction, seed)
    y_all = None if scan.targets is None else torch.as_tensor(scan.targets)
    paths = np.asarray([str(p) for p in scan.paths], dtype=object)

    def split(ix: np.ndarray) -> Split:
        return Split(None, None if y_all is None else y_all[ix], paths[ix],
                     source=ImageFiles([scan.paths[i] for i in ix], record))

    labels = scan.classes if scan.targets is not None else list(label_names or [])
    preprocessing = {**dict(record), "images": len(scan.paths)}  # no workstation path in a deployed manifest
    return Dataset(split(train), split(val), split(test), labels, preprocessing)


__all__ = ["CROP_MODES", "INTERPOLATIONS", "image_folder_dataset", "scan_image_folder", "timm_preprocessing",
           "torch_transform"]
