"""The one training loop of calibration (issue 40): the teacher's training, each sub-model's
distillation, the aggregator and the joint fine-tuning all step through :func:`fit`.

What differs between them is passed in: the parameters, how an epoch's batches are drawn
(each caller keeps its own generator, so its shuffles and augmentations are what they were),
the loss of one batch, AdamW's rate and weight decay, and the schedule (a linear warm-up then
cosine decay to zero, or a constant rate where ``warmup_steps`` is None).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler) -> None:
    """One step on ``loss``, through the AMP grad ``scaler`` where the compute has one."""
    opt.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at step s: ``min(1, (s + 1) / warmup) * (1 + cos(pi * s / total)) / 2``
    (a warm-up of one step is no warm-up)."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps)
                                                                              / total_steps))


def fit(params: Iterable[torch.nn.Parameter], epochs: int, batches: Callable[[], Iterable[Any]],
        loss_of: Callable[[Any], tuple[torch.Tensor, int]], samples: int, steps_per_epoch: int, lr: float,
        weight_decay: float, warmup_steps: Optional[int] = 1, scaler=None, fused: bool = True,
        module: Optional[nn.Module] = None, progress: bool = False, desc: str = "") -> list[float]:
    """Train for ``epochs``; returns the mean loss of each epoch (over ``samples``).

    ``batches()`` is called at the start of each epoch and yields that epoch's batches;
    ``loss_of(batch)`` returns the batch's mean loss and its number of samples. ``module`` is
    put in training mode at the start of each epoch. ``warmup_steps``: the schedule's warm-up
    over ``epochs * steps_per_epoch`` steps of cosine decay; None keeps the rate constant.
    ``fused``: PyTorch's fused AdamW, one kernel for the whole update, on the CPU as on CUDA.
    Its results equal the per-tensor loop's up to float rounding, and it is the default because
    the per-tensor update (PyTorch's default on the CPU) dominated small-batch calibration: on a
    MiniLM sub-model's 82 tensors a step is about 5x faster fused, on an aggregator's map about
    2x (``python -m experiments.adamw_step``; docs/benchmarks.md, "Trimmed: what the suite
    repeated"). False keeps PyTorch's default update."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    total = max(1, epochs * steps_per_epoch)
    sched = None if warmup_steps is None else torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup_steps))
    history: list[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="batch")
    for epoch in range(epochs):
        if module is not None:
            module.train()
        running = 0.0
        for batch in batches():
            loss, n = loss_of(batch)
            optimizer_step(opt, loss, scaler)
            if sched is not None:
                sched.step()
            running += loss.item() * n
            bar.update(1)
        history.append(running / samples)
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.3f}")
    bar.close()
    return history
