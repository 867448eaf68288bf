"""Progressive boosting distillation: the booster of paper §III-C-2 (eq. 13-14,
Algorithm 1 lines 12-15).

Sub-models are calibrated one after another. Sub-model n is distilled from the
teacher with per-sample weights W_n (eq. 14):

    L_Bo^n = sum_i w_i^n * 1/2 [CE(softmax(Y_s_n), y_i) + CE(softmax(Y_s_n), y_t,i)]

where y_t is the teacher's hard decision (DeiT-style hard distillation).
Without labels the first term is dropped and the teacher's decision is the
only target. After sub-model n, the weights are updated from each sample's
loss l_i under the calibrated sub-model (eq. 13).

Choice written down: eq. 13 as printed, ``w_i <- w_i * exp[(1/M - 1) l_i]``,
has a negative coefficient and would *lower* the weight of the samples the
previous sub-model got wrong, the opposite of boosting and of the paper's own
text ("adjusted based on the prediction errors"). We use the coefficient's
magnitude with the boosting sign, ``w_i <- w_i * exp[(1 - 1/M) l_i]``, then
renormalise to sum 1, and cap any weight at ``max_weight_ratio`` times the
mean so that one mislabelled sample cannot take over a sub-model.

Beside eq. 14 (``distill="hard"``), the same booster distils to the teacher's
temperature-softened logits (``soft``) or, for an embedding bundle, to its pooled
feature (``feature``; :mod:`coformer.calibration.objectives` gives the losses).
Choice written down for ``feature``, the analogue of eq. 13 with a regression
loss: after sub-model n, a closed-form ridge map from the features of sub-models
1..n (concatenated) to the teacher's feature is fitted on the training set, and
l_i is that map's loss on sample i. So a sample's weight rises where the
sub-models so far, together, reconstruct its feature worst (the ensemble's
residual, which is what the next sub-model can make up), not where sub-model n
alone does.

``residual=True`` is boosting as it is done for a regression (gradient boosting; issue 37):
the weights say *where* the earlier sub-models fail, the residual says *what* they miss.
Sub-model n's head output is added to the sum of the heads' outputs of sub-models 1..n-1
(kept fixed, on the training set) and the loss is taken on that sum: the first sub-model
learns the whole target, the later ones what is left of it, in logits or in the teacher's
feature. The sum of the heads is itself a linear map of the concatenated features, so
eq. 2's aggregator can represent it, and the aggregator is then fitted on the features as
always. Without it every sub-model learns the whole target and they come out as
near-copies of each other (on the real MiniLM the two weaker devices added 0.01 cosine).
A residual ``feature`` head starts as the ridge map from its sub-model's features to the
residual, so its first steps do not add a second copy of the target to the sum; a logits
head starts from the teacher's head as always (its copy only sharpens the sum's softmax,
which the loss then undoes).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Split
from coformer.calibration.loop import fit
from coformer.calibration.objectives import Objective
from coformer.runtime.errors import CoFormerError


@dataclass(frozen=True)
class BoostConfig:
    """Args:
    epochs: passes over the training set per sub-model.
    batch_size: samples per step.
    lr: AdamW peak learning rate (cosine decay, short warm-up).
    weight_decay: AdamW weight decay.
    max_weight_ratio: cap on a sample weight relative to the mean weight.
    seed: fixes shuffling, so a calibration is reproducible.
    distill: ``hard`` (eq. 14), ``soft`` (KL to the softened logits) or ``feature``
        (the teacher's pooled feature, for embedding bundles).
    temperature: the softening of ``soft``.
    joint_epochs: after the aggregator, epochs of fine-tuning every sub-model and the
        aggregator together on the fused answer
        (:func:`coformer.calibration.aggregator.train_jointly`); 0 keeps the paper's stages.
    boosting: update the sample weights after each sub-model (eq. 13). False distils every
        sub-model independently with uniform weights: the ablation ``coformer bench
        --ablations`` holds progressive boosting against.
    residual: sub-model n is calibrated to what sub-models 1..n-1 leave (see the module doc):
        its head's output is added to theirs before the loss, so it learns what they miss.
        None: the compile's default for the task (on for embeddings, where it was measured;
        :data:`coformer.compiler.pipeline.RESIDUAL_BY_DEFAULT`); :func:`calibrate` reads it as off.
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    max_weight_ratio: float = 10.0
    seed: int = 0
    distill: str = "hard"
    temperature: float = 4.0
    joint_epochs: int = 0
    boosting: bool = True
    residual: Optional[bool] = None


@dataclass
class BoostReport:
    losses: list[list[float]] = field(default_factory=list)  # per sub-model, per epoch
    weights: list[torch.Tensor] = field(default_factory=list)  # W_n used for sub-model n
    resumed: list[int] = field(default_factory=list)  # sub-models loaded from a checkpoint
    features: list[torch.Tensor] = field(default_factory=list)  # ``feature``: each sub-model's X_n on the data
    residual: list[float] = field(default_factory=list)  # ``feature``: the ensemble's mean loss after each


class _WithHead(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def update_weights(w: torch.Tensor, losses: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Eq. 13 with the boosting sign (see module doc), renormalised, each weight capped
    at ``max_ratio / M`` (the excess is spread over the others in proportion)."""
    M = w.numel()
    if max_ratio < 1:
        raise ValueError(f"max_weight_ratio {max_ratio} must be >= 1")
    w = w * torch.exp((1.0 - 1.0 / M) * losses.clamp(max=30.0))
    w = w / w.sum()
    cap = max_ratio / M
    fixed = torch.zeros(M, dtype=torch.bool)
    for _ in range(M):
        over = (w > cap * (1 + 1e-9)) & ~fixed
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap
        w[~fixed] = w[~fixed] / w[~fixed].sum() * (1.0 - cap * int(fixed.sum()))
    return w


def teacher_decisions(targets: torch.Tensor) -> torch.Tensor:
    """Class indices from the teacher's logits ``[M, C]``, or the indices themselves ``[M]``."""
    if targets.ndim == 1 and not torch.is_floating_point(targets):
        return targets.long()
    return targets.argmax(dim=-1)


def as_split(x: Union[torch.Tensor, Split]) -> Split:
    """An in-memory tensor as a :class:`Split`; a split as it is."""
    return x if isinstance(x, Split) else Split(x, None, np.empty(0))


@torch.no_grad()
def _outputs(model: nn.Module, data: Split, compute: Compute) -> torch.Tensor:
    """``model``'s outputs on every sample of ``data``, in order, on the CPU."""
    model.eval()
    dev = next(model.parameters()).device
    out = None
    for idx, x in data.batches(compute.batch_size, workers=compute.workers):
        with compute.autocast():
            pred = model(x.to(dev)).float().cpu()
        if out is None:
            out = torch.empty(len(data), *pred.shape[1:])
        out[idx] = pred
    return out


def _add(total: Optional[torch.Tensor], more: torch.Tensor) -> torch.Tensor:
    return more if total is None else total + more


@torch.no_grad()
def _start_residual_head(body: nn.Module, head: nn.Module, data: Split, objective: Objective,
                         prev: torch.Tensor, compute: Compute) -> None:
    """A residual ``feature`` sub-model's head before training (module doc): the ridge map from
    its features to what the earlier sub-models leave of the teacher's feature."""
    from coformer.calibration.objectives import ridge_fit

    linear = getattr(head, "linear", None)
    if not isinstance(linear, nn.Linear):
        raise CoFormerError(f"a residual sub-model needs a linear feature head, got {type(head).__name__}")
    W, b = ridge_fit(_features(body, data, compute), objective.targets - prev)
    linear.weight.copy_(W.T.to(linear.weight.device))
    linear.bias.copy_(b.to(linear.bias.device))


@torch.no_grad()
def _features(body: nn.Module, data: Split, compute: Compute) -> torch.Tensor:
    body.eval()
    out = []
    for _, x in data.batches(compute.batch_size, workers=compute.workers):
        with compute.autocast():
            out.append(body(x.to(compute.torch_device)).float().cpu())
    return torch.cat(out)


def ensemble_residual(features: Sequence[torch.Tensor], objective: Objective) -> torch.Tensor:
    """Per-sample loss of the best linear map from the sub-models' features so far to the
    teacher's feature (the ``feature`` analogue of eq. 13's l_i, see the module doc)."""
    from coformer.calibration.objectives import ridge_fit

    x = torch.cat(list(features), dim=1)
    W, b = ridge_fit(x, objective.targets)
    return objective.per_sample(x @ W + b, torch.arange(len(x)))


class Checkpoints:
    """Per-sub-model calibration checkpoints in ``folder`` (``sub-N.pt``: the sub-model's and
    its head's weights, the sample weights for the next one, the losses), valid for one
    ``key`` (teacher, policy, data and settings): an interrupted compile resumes after the
    last finished sub-model; files of another key are ignored and replaced.

    The folder is CoFormer's alone: it carries a marker file, a non-empty folder without
    one is refused (it is the user's), and :meth:`remove` deletes only what was written.
    """

    MARKER = ".coformer-calibration"

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key
        if self.folder.exists() and (not self.folder.is_dir() or (
                any(self.folder.iterdir()) and not (self.folder / self.MARKER).is_file())):
            raise CoFormerError(f"{self.folder} holds files CoFormer did not write; give --resume-dir a new or "
                                "empty folder (it is removed once the bundle is written)")

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def remove(self) -> None:
        """Delete the checkpoints (once the bundle is written), and the folder when nothing else is left."""
        if not (self.folder / self.MARKER).is_file():
            return
        for f in self.folder.iterdir():
            if f.suffix == ".pt" or f.name == self.MARKER or f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # something else was put there: left alone

    def load(self, name: str) -> Optional[dict]:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            return None  # a file cut short by a crash: computed again
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save(self, name: str, state: dict) -> None:
        """Write straight to a temporary file, then rename (no copy of the state in memory)."""
        import os
        import tempfile

        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.MARKER).touch()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            torch.save({**state, "key": self.key}, tmp)
            os.replace(tmp, self._path(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _resume(n: int, done: dict, model: "_WithHead", report: BoostReport, objective: Objective,
            w: torch.Tensor) -> torch.Tensor:
    """Sub-model ``n`` as its checkpoint ``done`` left it, recorded in ``report`` as a run that
    calibrated it would have; returns the weights the next sub-model trains under."""
    model.body.load_state_dict(done["body"])
    model.head.load_state_dict(done["head"])
    report.weights.append(w.clone())
    report.losses.append(list(done["losses"]))
    report.resumed.append(n)
    if objective.kind == "feature":
        report.features.append(done["features"])
        report.residual.append(float(done["residual"]))
    return done["next_weights"]


def _reweigh(model: "_WithHead", data: Split, objective: Objective, config: BoostConfig, report: BoostReport,
             w: torch.Tensor, prev: Optional[torch.Tensor], compute: Compute):
    """After a sub-model is trained: the next sample weights (eq. 13, on the ensemble so far),
    its outputs on the data where residual calibration needs them, and what its checkpoint
    keeps besides its weights. Returns ``(weights, outputs or None, extra)``."""
    outs, extra = None, {}
    if objective.kind == "feature":
        report.features.append(_features(model.body, data, compute))
        residual = ensemble_residual(report.features, objective)
        report.residual.append(float(residual.mean()))
        w = update_weights(w, residual, config.max_weight_ratio)
        extra = {"features": report.features[-1], "residual": report.residual[-1]}
        if config.residual:  # a feature sub-model's outputs: its head on the features just computed
            with torch.no_grad():
                outs = model.head(report.features[-1].to(compute.torch_device)).float().cpu()
    elif config.boosting or config.residual:
        # one pass over the data gives the outputs both the weights (eq. 13) and the residual need
        outs = _outputs(model, data, compute)
        if config.boosting:
            total = outs if prev is None else outs + prev
            w = update_weights(w, objective.per_sample(total, torch.arange(len(data))), config.max_weight_ratio)
    return w, outs, extra


def calibrate(
    submodels: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    x: Union[torch.Tensor, Split],
    teacher_targets: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    config: BoostConfig = BoostConfig(),
    progress: bool = True,
    compute: Compute = CPU,
    checkpoints: Optional[Checkpoints] = None,
) -> BoostReport:
    """Calibrate ``submodels`` in order, in place (Algorithm 1, lines 12-15).

    ``heads[n]`` maps sub-model n's pooled feature to the teacher's output space
    (logits: the teacher's head sliced to its channels; or, with ``distill="feature"``,
    the teacher's feature: a linear map) and is trained with it. ``x`` holds the
    training inputs (a tensor, or a streamed :class:`Split`); ``teacher_targets``
    are the teacher's outputs on them, computed once: for ``hard`` its logits or,
    as eq. 14 needs no more, its decisions (M integers instead of M x classes
    floats); for ``soft`` its logits; for ``feature`` its pooled features.
    Sub-model n shuffles with its own generator (``seed``, n), so a run resumed
    from ``checkpoints`` after sub-model n-1 calibrates n exactly as an
    uninterrupted run would.
    """
    data = as_split(x)
    dev = compute.torch_device
    M = len(data)
    targets = teacher_decisions(teacher_targets) if config.distill == "hard" else teacher_targets
    objective = Objective(config.distill, targets, labels if config.distill != "feature" else None,
                          config.temperature)
    w = torch.full((M,), 1.0 / M)
    prev: Optional[torch.Tensor] = None  # residual: the earlier sub-models' heads' outputs, summed, on the data
    report = BoostReport()
    steps_per_epoch = math.ceil(M / config.batch_size)
    for n, (body, head) in enumerate(zip(submodels, heads)):
        model = _WithHead(body, head)
        done = checkpoints.load(f"sub-{n}") if checkpoints else None
        if done is not None:
            w = _resume(n, done, model, report, objective, w)
            if config.residual:
                prev = _add(prev, _outputs(model, data, compute))
            continue
        gen = torch.Generator().manual_seed(config.seed * 1000 + n)
        model.to(dev).train()
        if prev is not None and objective.kind == "feature":
            _start_residual_head(body, head, data, objective, prev, compute)
            model.to(dev).train()
        report.weights.append(w.clone())

        def loss_of(batch, w=w, prev=prev, model=model):
            idx, xb = batch
            with compute.autocast():
                out = model(xb.to(dev)).float()
            per = objective.per_sample(out if prev is None else out + prev[idx].to(dev), idx)
            return (w[idx].to(dev) * M * per).mean(), len(idx)  # weights rescaled to mean 1 keep the lr meaningful

        total_steps = max(1, config.epochs * steps_per_epoch)
        epoch_losses = fit(model.parameters(), config.epochs,
                           lambda: data.batches(config.batch_size, shuffle=True, generator=gen, workers=compute.workers),
                           loss_of, M, steps_per_epoch, config.lr, config.weight_decay,
                           warmup_steps=max(1, total_steps // 20), scaler=compute.scaler(), module=model,
                           progress=progress, desc=f"calibrate sub-model {n + 1}/{len(submodels)}")
        report.losses.append(epoch_losses)
        model.eval()
        w, outs, extra = _reweigh(model, data, objective, config, report, w, prev, compute)
        if config.residual:
            prev = _add(prev, outs)
        model.to("cpu")
        if checkpoints:
            checkpoints.save(f"sub-{n}", {"body": body.state_dict(), "head": head.state_dict(),
                                          "next_weights": w, "losses": epoch_losses, **extra})
    return report
