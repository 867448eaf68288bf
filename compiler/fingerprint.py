"""Fingerprints of what a calibration depends on (the teacher's weights, the data, the
settings), so a checkpoint or a cached bundle is reused only for the same inputs, and the
calibration settings a manifest records and a later compile reads back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn

from coformer.calibration.booster import BoostConfig
from coformer.calibration.data import Dataset
from coformer.compiler.specs import Policy


def hash_weights(h: Any, module: nn.Module) -> None:
    """Feed every byte of ``module``'s weights to the hash ``h`` (any dtype, bf16 included)."""
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(teacher: nn.Module) -> str:
    """SHA-256 of every weight of ``teacher`` (in the manifest: the bench and served_bench check
    that they rebuild the baselines from the teacher the bundle came from)."""
    h = hashlib.sha256()
    hash_weights(h, teacher)
    return h.hexdigest()


def hash_data(h: Any, data: Dataset) -> None:
    """Feed the training split to ``h``: its tensor, or for a streamed folder every file's path,
    size and modification time (an image replaced under its name changes it), and the labels
    and preprocessing."""
    import os

    tr = data.train
    if tr.streamed:
        files = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in tr.raw]
        h.update(json.dumps([files, dict(data.preprocessing)], sort_keys=True, default=str).encode())
    else:
        h.update(tr.x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if tr.y is not None:
        h.update(tr.y.numpy().tobytes())


def calibration_key(teacher: nn.Module, policy: Policy, data: Dataset, boost: BoostConfig, use_labels: bool,
                    aggregator_epochs: int) -> str:
    """What a calibration depends on: every byte of the teacher's weights, the policy, the
    training data and the settings; the checkpoints' validity key."""
    h = hashlib.sha256(b"coformer calibration v1")
    hash_weights(h, teacher)
    h.update(json.dumps([policy.to_dict(), boost.__dict__, use_labels, aggregator_epochs], sort_keys=True,
                        default=str).encode())
    hash_data(h, data)
    return h.hexdigest()[:16]


def calibration_record(boost: BoostConfig, aggregator_epochs: int, use_labels: bool) -> dict[str, Any]:
    """The manifest's ``model.calibration_settings``: the settings a bundle was calibrated with (all but
    the batch size, which is the compute's), so that what it is compared with is calibrated
    alike (:func:`boost_from_record`)."""
    out = {k: v for k, v in dataclasses.asdict(boost).items() if k != "batch_size"}
    return {**out, "aggregator_epochs": int(aggregator_epochs), "use_labels": bool(use_labels)}


def boost_from_record(record: dict[str, Any], batch_size: int) -> tuple[BoostConfig, int, bool]:
    """``(boost, aggregator_epochs, use_labels)`` from a manifest's ``model.calibration_settings``;
    keys this version does not know are left out (a newer compiler's)."""
    known = {f.name for f in dataclasses.fields(BoostConfig)} - {"batch_size"}
    boost = BoostConfig(batch_size=batch_size, **{k: v for k, v in record.items() if k in known})
    return boost, int(record.get("aggregator_epochs", 60)), bool(record.get("use_labels", True))
