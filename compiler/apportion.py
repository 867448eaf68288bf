"""One apportionment, for everything the compiler splits between devices by share: a layer's
channels, heads and neurons (:mod:`coformer.compiler.policy`), the baselines' layers and heads
(:mod:`coformer.compiler.baselines`) and PRISM's positions (:mod:`coformer.compiler.prism`)."""

from __future__ import annotations

from typing import Sequence

from coformer.runtime.errors import CoFormerError


def apportion(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``total`` units in proportion to ``weights`` by largest remainder (ties to the
    earlier part); the parts sum to ``total``.

    Then, where ``total`` allows it (``total >= len(weights) * minimum``), each part below
    ``minimum``, in order, takes units one at a time from the largest part (ties: the earlier).
    Where it does not, the proportional split stands; callers that must have the minimum
    refuse that case first, in their own words.

    >>> apportion(24, [1.0, 0.6, 0.4])
    [12, 7, 5]
    >>> apportion(7, [1.0, 0.6, 0.4], minimum=1)
    [4, 2, 1]
    """
    n = len(weights)
    s = float(sum(weights))
    if not n or s <= 0 or any(w < 0 for w in weights):
        raise CoFormerError(f"weights {list(weights)} must be non-negative with a positive sum")
    raw = [total * w / s for w in weights]
    parts = [int(r) for r in raw]
    order = sorted(range(n), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    if total >= n * minimum:
        for i in range(n):
            while parts[i] < minimum:
                donor = max(range(n), key=lambda j: (parts[j], -j))
                parts[donor] -= 1
                parts[i] += 1
    return parts
