"""Importance scores: which layers, heads, MLP neurons and embedding channels
a sub-model keeps first (paper §III-A "divisibility"; supplementary §B-1).

Scores are computed by the family adapter on calibration data
(``adapter.importance(model, batches, method)``); ``magnitude`` (activation
magnitude) is available for every family, and a family may offer more. The
result is plain data, higher = more important, so a policy can be built from
it without the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from coformer.compiler.specs import TransformerShape
from coformer.runtime.errors import CoFormerError


@dataclass(frozen=True)
class Importance:
    layers: tuple[float, ...]
    channels: tuple[float, ...]
    heads: tuple[tuple[float, ...], ...]
    neurons: tuple[tuple[float, ...], ...]
    method: str = "magnitude"
    stage_channels: tuple[tuple[float, ...], ...] = ()  # a hierarchical model's stages after the first

    @property
    def all_channels(self) -> tuple[tuple[float, ...], ...]:
        """Channel scores of every stage, the first stage's (``channels``) first."""
        return (tuple(self.channels),) + tuple(tuple(c) for c in self.stage_channels)

    @classmethod
    def from_sums(cls, layers, channels, heads, neurons, tokens: int, method: str = "magnitude") -> "Importance":
        """Mean scores from sums over ``tokens`` calibration tokens (torch tensors); channel sums are
        also summed over the layers, so they are divided by the layer count too."""
        n = max(int(tokens), 1)
        return cls(
            layers=tuple((layers / n).tolist()),
            channels=tuple((channels / (n * len(layers))).tolist()),
            heads=tuple(tuple((h / n).tolist()) for h in heads),
            neurons=tuple(tuple((v / n).tolist()) for v in neurons),
            method=method,
        )

    def check(self, shape: TransformerShape) -> "Importance":
        if (
            len(self.layers) != shape.num_layers
            or len(self.channels) != shape.embed_dim
            or tuple(len(h) for h in self.heads) != shape.heads
            or tuple(len(n) for n in self.neurons) != shape.mlp_dims
            or tuple(len(c) for c in self.all_channels) != shape.widths
        ):
            raise CoFormerError("importance scores do not match the teacher's shape")
        return self


def top_k(scores: Sequence[float], k: int) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores, in increasing index order (ties: lower index first)."""
    if not 0 <= k <= len(scores):
        raise CoFormerError(f"cannot keep {k} of {len(scores)} units")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:k]))
