"""Running PyTorch models over a dataset: every model's outputs in one pass over the inputs
(a streamed split's images decoded once for all), on the compile's
:class:`~coformer.calibration.compute.Compute`. The compile, the evaluation, the search and
the tools all run models through here."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from coformer.calibration.booster import as_split
from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Split


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def run_many(models: Sequence[nn.Module], x: Union[torch.Tensor, Split], compute: Compute = CPU,
             progress: bool = False, desc: str = "",
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list[torch.Tensor]:
    """Every model's outputs on every input of ``x``, in one pass (a streamed split's images are
    decoded once for all models); float32 on the CPU, or ``reduce(batch output)`` where only that
    is kept (the teacher's decisions). Models are returned to where they were."""
    data = as_split(x)
    dev = compute.torch_device
    was = [model_device(m) for m in models]
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    steps = -(-len(data) // compute.batch_size)
    try:
        for m in models:
            m.eval().to(dev)
        for _, xb in tqdm(data.batches(compute.batch_size, workers=compute.workers), total=steps, desc=desc,
                          disable=not progress, leave=False, unit="batch"):
            xb = xb.to(dev)
            with compute.autocast():
                for out, m in zip(outs, models):
                    y = m(xb).float()
                    out.append((reduce(y) if reduce is not None else y).cpu())
    finally:
        for m, d in zip(models, was):
            m.to(d)
    return [torch.cat(o) if o else torch.empty(0) for o in outs]


def run_batched(model: nn.Module, x: Union[torch.Tensor, Split], compute: Compute = CPU,
                progress: bool = False, desc: str = "",
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``model``'s outputs on every input of ``x`` (see :func:`run_many`)."""
    return run_many([model], x, compute, progress, desc, reduce)[0]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())
