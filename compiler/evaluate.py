"""Scoring what a compile made, on the data's splits: accuracy (or the embedding's cosine)
of the teacher, each sub-model, the ensemble and its degraded answers on the test split
(what the manifest's ``expected`` holds); the ridge probe an embedding calibration must beat;
and the search's validation loss L_val (eq. 7)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
from torch import nn

from coformer.calibration.aggregator import collaboration
from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Dataset, Split
from coformer.calibration.objectives import ridge_fit
from coformer.compiler import tasks
from coformer.compiler.families import adapter_for
from coformer.compiler.inference import accuracy, run_batched, run_many
from coformer.compiler.specs import Policy


@dataclasses.dataclass
class RidgeProbe:
    """The sliced sub-models as they are, their concatenated features mapped to the teacher's
    feature by ridge regression fitted on the training split: the baseline an embedding
    calibration must beat. ``scores`` on the test split, ``val_cosine`` on the validation split."""

    W: torch.Tensor
    b: torch.Tensor
    scores: dict[str, float]
    val_cosine: float


def ridge_probe(subs: Sequence[nn.Module], target_model: nn.Module, t: torch.Tensor, data: Dataset,
                 compute: Compute, progress: bool) -> RidgeProbe:
    """``t``: the teacher's features on the training split, computed once for calibration too."""
    feats = run_many(subs, data.train, compute, progress, "ridge probe (uncalibrated)")
    W, b = ridge_fit(torch.cat(feats, dim=1), t)
    normalize = isinstance(target_model, tasks.TeacherEmbedding) and target_model.normalize

    def predict(split: Split, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        *f, t_split = run_many([*subs, target_model], split, compute, progress, what)
        pred = torch.cat(f, dim=1) @ W + b
        return t_split, torch.nn.functional.normalize(pred, dim=-1) if normalize else pred

    val = tasks.embedding_scores(*predict(data.val, "ridge probe, validation split"))["mean_cosine"] \
        if len(data.val) else 0.0
    return RidgeProbe(W, b, tasks.embedding_scores(*predict(data.test, "ridge probe, test split")), val)


@torch.no_grad()
def keep_better(target_model: nn.Module, subs: Sequence[nn.Module], agg: nn.Module, probe: RidgeProbe,
                 data: Dataset, compute: Compute, progress: bool) -> dict[str, Any]:
    """Which of the distilled ensemble and the ridge probe an embedding bundle serves.

    Choice written down, beyond the paper: feature distillation rewrites the sub-models, and
    on little data (a few hundred sentences) it can lose more of what the sliced teacher
    layers already carried than it adds; the uncalibrated slices with a ridge map are then
    closer to the teacher. The validation split's mean cosine decides (the test split stays
    untouched, for the report), so a bundle is never worse there than that baseline.
    """
    if len(data.val) == 0:
        return {"kept": "distilled", "val_cosine": {}}
    t, *feats = run_many([target_model, *subs], data.val, compute, progress, "calibrated, validation split")
    distilled = tasks.embedding_scores(t, agg.eval()(*feats))["mean_cosine"]
    return {"kept": "distilled" if distilled >= probe.val_cosine else "ridge",
            "val_cosine": {"distilled": distilled, "ridge": probe.val_cosine}}


@torch.no_grad()
def evaluate_embedding(target_model: nn.Module, subs: Sequence[nn.Module], heads: Sequence[nn.Module],
                       agg: nn.Module, data: Dataset, compute: Compute = CPU, progress: bool = False,
                       fallbacks: Sequence = (), singles: Sequence = ()) -> dict[str, Any]:
    """Test-split agreement with the teacher's embeddings: mean (and worst) cosine of the
    ensemble's vectors and nearest-neighbour agreement within the split; each sub-model alone
    through its head; the mean cosine of each fallback aggregator (``degraded``, keyed by
    the missing devices joined with ``+``); and, with ``singles`` (:func:`coformer.compiler.pipeline.single_device_maps`),
    the collaboration gain in mean cosine (``collaboration``)."""
    t, *feats = run_many([target_model, *subs], data.test, compute, progress, "evaluate on the test split")
    out = {**tasks.embedding_scores(t, agg.eval()(*feats)), "split": "test", "samples": int(len(t)),
           "reference": "teacher"}
    out["submodel_cosines"] = [tasks.embedding_scores(t, h.eval()(f))["mean_cosine"] for h, f in zip(heads, feats)]
    with torch.no_grad():
        out["degraded"] = {"+".join(missing): tasks.embedding_scores(t, fb(*[feats[i] for i in present]))["mean_cosine"]
                           for missing, present, fb in fallbacks}
        if singles:
            alone = {name: tasks.embedding_scores(t, fb(feats[i]))["mean_cosine"]
                     for i, (name, fb) in enumerate(singles)}
            out["collaboration"] = collaboration(out["mean_cosine"], alone)
    return out


def evaluate(teacher: nn.Module, subs: Sequence[nn.Module], heads: Sequence[nn.Module],
             agg: nn.Module, data: Dataset, compute: Compute = CPU, progress: bool = False,
             fallbacks: Sequence = (), feature_dtype: str = "float32", singles: Sequence = ()) -> dict[str, Any]:
    """Test-split accuracy in PyTorch: teacher, each sub-model with its head, the ensemble, and
    the ensemble answering without each set of devices in ``fallbacks`` (``degraded``, keyed by
    the missing devices joined with ``+``: what a degraded answer is worth).

    Without labels (label-free distillation) the reference is the teacher's own
    decisions: ``reference`` says which, and the teacher scores 1.0 against itself.

    With ``feature_dtype="float16"`` the ensemble and degraded scores take the workers'
    features (all but the first, the central node's own) rounded to float16, as they arrive
    over the wire; ``ensemble_accuracy_float32_features`` is the score without rounding.

    With ``singles`` (:func:`coformer.compiler.pipeline.single_device_maps`), ``collaboration`` holds each device's
    accuracy alone and the collaboration gain: the ensemble's minus the best of them.
    """
    y = data.test.y
    t_logits, *feats = run_many([teacher, *subs], data.test, compute, progress, "evaluate on the test split")
    reference = "labels"
    if y is None:
        y, reference = t_logits.argmax(-1), "teacher"
    exact = list(feats)
    if feature_dtype != "float32":
        feats = [feats[0], *[f.to(getattr(torch, feature_dtype)).float() for f in feats[1:]]]
    with torch.no_grad():
        extra = {} if feature_dtype == "float32" else {
            "ensemble_accuracy_float32_features": accuracy(agg.eval()(*exact), y), "feature_dtype": feature_dtype}
        ensemble = accuracy(agg.eval()(*feats), y)
        if singles:
            extra["collaboration"] = collaboration(ensemble, {name: accuracy(fb(feats[i]), y)
                                                              for i, (name, fb) in enumerate(singles)})
        return {
            **extra,
            "teacher_accuracy": accuracy(t_logits, y),
            "ensemble_accuracy": ensemble,
            "submodel_accuracies": [accuracy(h.eval()(f), y) for h, f in zip(heads, feats)],
            "degraded": {"+".join(missing): accuracy(fb(*[feats[i] for i in present]), y)
                         for missing, present, fb in fallbacks},
            "split": "test",
            "samples": int(len(y)),
            "reference": reference,
        }


def validation_loss(teacher: nn.Module, data: Dataset, use_labels: bool = True, probe_samples: int = 512,
                    compute: Compute = CPU, val_samples: int = 512, task: str = "classification",
                    normalize: Optional[bool] = None):
    """L_val of eq. 7 for a policy: mean over sub-models of their validation cross-entropy.

    Choice written down: a freshly sliced sub-model with the teacher's head
    restricted to its channels is close to chance whatever its size, so its raw
    loss barely tells a large sub-model from a small one (we saw the search then
    pick near-empty sub-models). Each sub-model's head is therefore refit first,
    in closed form: ridge regression from its pooled features to the teacher's
    logits on ``probe_samples`` training inputs, a cheap stand-in for the
    calibration it will get. The loss is then measured on the first
    ``val_samples`` of the validation split. Both sets are decoded once and held
    in memory, since the search evaluates dozens of policies on them. For an
    embedding bundle the ridge map goes to the teacher's feature and the loss is
    the feature distillation's (:func:`coformer.calibration.objectives.feature_loss`).
    """
    import torch.nn.functional as F

    from coformer.calibration.objectives import feature_loss, feature_moments

    adapter = adapter_for(teacher)
    x_fit, x_val = data.train.head(probe_samples), data.val.head(val_samples)
    embedding = task == "embedding"
    reference = tasks.TeacherEmbedding(adapter, teacher, tasks.normalizes(teacher, normalize)) if embedding \
        else teacher
    t_fit, t_val = run_batched(reference, x_fit, compute), run_batched(reference, x_val, compute)
    t_fit = t_fit.double()
    y_val = None if data.val.y is None else data.val.y[:len(x_val)]
    target = y_val if (use_labels and y_val is not None) else t_val.argmax(-1)
    center, scale = feature_moments(t_fit) if embedding else (None, 0.0)

    @torch.no_grad()
    def l_val(policy: Policy) -> float:
        losses = []
        for spec in policy.submodels:
            sub = adapter.slice(teacher, spec)
            f_fit, f_val = (f.double() for f in (run_batched(sub, x_fit, compute), run_batched(sub, x_val, compute)))
            A = torch.cat([f_fit, torch.ones(len(f_fit), 1, dtype=torch.float64)], dim=1)
            ridge = 1e-3 * float((A * A).sum()) / A.shape[1]
            W = torch.linalg.solve(A.T @ A + ridge * torch.eye(A.shape[1], dtype=torch.float64), A.T @ t_fit)
            logits = torch.cat([f_val, torch.ones(len(f_val), 1, dtype=torch.float64)], dim=1) @ W
            if embedding:
                losses.append(float(feature_loss(logits.float(), t_val, center, scale).mean()))
            else:
                losses.append(float(F.cross_entropy(logits.float(), target)))
        return sum(losses) / len(losses)

    return l_val
