"""What a bundle answers: class logits (``classification``, the paper's setting) or the
teacher's pooled feature (``embedding``: sentence embeddings, image embeddings).

An embedding bundle is distilled to the teacher's feature instead of its decisions
(:mod:`coformer.calibration.objectives`, ``feature``), its aggregator maps the
concatenated X_n to that feature (paper eq. 2 without the task head), normalised
where the teacher's own pipeline normalises (a sentence-transformers
``Normalize``), and it is judged by what retrieval needs: the mean cosine of its
vectors to the teacher's on the held-out split, and how often both pick the same
nearest neighbour there.

``auto`` picks ``embedding`` for a teacher without a task head of its own when
the data has no labels (a sentence-embedding checkpoint and a .txt file; a timm
model built with ``num_classes=0`` and a flat image folder), ``classification``
otherwise.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coformer.calibration.aggregator import Aggregator, Normalize
from coformer.runtime.errors import CoFormerError

TASKS = ("auto", "classification", "embedding")


def has_head(teacher: nn.Module) -> bool:
    """Whether the teacher came with a task head (a classifier), or is an encoder."""
    if hasattr(teacher, "head_fitted"):  # a language teacher
        return bool(teacher.head_fitted)
    return int(getattr(teacher, "num_classes", 1) or 0) > 0


def resolve_task(teacher: nn.Module, labelled: bool, requested: str = "auto") -> str:
    """The task a compile builds (see the module doc); refuses what cannot work, by name."""
    if requested not in TASKS:
        raise CoFormerError(f"--task {requested!r} is not one of {list(TASKS)}")
    if requested == "auto":
        return "embedding" if not has_head(teacher) and not labelled else "classification"
    if requested == "classification" and not has_head(teacher) and not hasattr(teacher, "head_fitted"):
        raise CoFormerError("this model has no classifier (num_classes=0): compile it with --task embedding")
    return requested


def normalizes(teacher: nn.Module, override: Optional[bool] = None) -> bool:
    """Whether embeddings are L2-normalised: ``override`` if given, else the teacher's own
    pipeline (a sentence-transformers folder with ``Normalize``)."""
    return bool(getattr(teacher, "normalize", False)) if override is None else bool(override)


class TeacherEmbedding(nn.Module):
    """The teacher's embedding: its pooled pre-logits feature, normalised where it normalises."""

    def __init__(self, adapter: Any, teacher: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.adapter, self.teacher, self.normalize = adapter, teacher, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.adapter.teacher_features(self.teacher, x)
        return F.normalize(f, dim=-1) if self.normalize else f


def feature_heads(adapter: Any, teacher: nn.Module, specs: Sequence[Any], dim: int) -> list[nn.Module]:
    """Per sub-model, a linear map from X_n to the teacher's feature space, started by putting
    each kept channel back where the teacher has it (what calibration trains with X_n)."""
    heads = []
    for spec in specs:
        index = adapter.feature_index(teacher, spec)
        head = Aggregator([len(index)], dim, nn.Identity())
        head.init_from_index([index])
        heads.append(head)
    return heads


def embedding_aggregator(feature_dims: Sequence[int], dim: int, normalize: bool) -> Aggregator:
    return Aggregator(feature_dims, dim, Normalize() if normalize else nn.Identity())


def nn_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """How often ``other``'s nearest neighbour (cosine, itself excluded) of each row is
    ``reference``'s: top-1 retrieval agreement within the set."""
    def nearest(v: torch.Tensor) -> torch.Tensor:
        u = F.normalize(v.double(), dim=-1)
        sim = u @ u.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=-1)

    if len(reference) < 2:
        return 1.0
    return float((nearest(reference) == nearest(other)).double().mean())


def embedding_scores(teacher_vecs: torch.Tensor, vecs: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(vecs.double(), teacher_vecs.double(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agreement": nn_agreement(teacher_vecs, vecs)}


def task_record(task: str, labels: Sequence[str], dim: int, normalize: bool, pooling: str) -> dict[str, Any]:
    """The manifest's ``task``."""
    if task == "embedding":
        return {"kind": "embedding", "dim": int(dim), "normalize": bool(normalize), "pooling": pooling,
                "labels": []}
    return {"kind": "classification", "labels": list(labels)}
