"""How the devices' sub-models share the teacher's units: the decomposition structure (issue 37).

Given, for one kind of unit (the channels of a stage, the heads or the MLP neurons of a
layer), their importance scores and how many each device keeps (apportioned so that the
counts add up to at most the teacher's, C2-C4 of eq. 8), a structure says *which* units:

* ``nested``: every device keeps the top of the same ranking. The sub-models are nested
  copies (the smaller inside the larger): each is as strong as its size allows, and the
  others add almost nothing to the strongest (on the real MiniLM, +0.010 cosine).
* ``partition``: every unit goes to one device at most. Units are dealt most important
  first, each to the device furthest below its quota (in proportion to it), so every
  device gets a share of the important units and the union of the sub-models covers
  ``sum(counts)`` units. C2-C4 then hold on the union, and a policy that puts a unit on two
  devices is refused, with the units named (:func:`overlaps`).
* ``core``: a shared core, the top ``CORE_FRACTION`` of the smallest quota, kept by every
  device, and the rest of each quota dealt as in ``partition`` from the units after the
  core. Each member holds the most important units (strong) and the rest is its own
  (different). Choice written down: half the smallest quota, so the smallest device still
  has half its width of its own; the union covers ``sum(counts) - (N - 1) * core`` units.

Layers are not dealt: each device keeps its most important layers that fit its budget, as
before, whatever the structure.
"""

from __future__ import annotations

from typing import Sequence

from coformer.runtime.errors import CoFormerError

DECOMPOSITIONS = ("nested", "partition", "core")
PARTITIONING = ("partition",)
CORE_FRACTION = 0.5
DEFAULT_DECOMPOSITION = "nested"


def check_decomposition(name: str) -> str:
    if name not in DECOMPOSITIONS:
        raise CoFormerError(f"--decomposition {name!r} is not one of {list(DECOMPOSITIONS)}")
    return name


def _ranked(scores: Sequence[float], units: Sequence[int]) -> list[int]:
    return sorted(units, key=lambda i: (-scores[i], i))


def _deal(ranked: Sequence[int], quotas: Sequence[int]) -> list[list[int]]:
    """``ranked`` units in turn, each to the device with the largest unfilled part of its quota."""
    got: list[list[int]] = [[] for _ in quotas]
    for u in ranked:
        open_ = [n for n, q in enumerate(quotas) if len(got[n]) < q]
        if not open_:
            break
        n = max(open_, key=lambda k: ((quotas[k] - len(got[k])) / quotas[k], -k))
        got[n].append(u)
    return got


def deal(scores: Sequence[float], counts: Sequence[int], structure: str) -> list[tuple[int, ...]]:
    """Per device, the ``counts[n]`` units it keeps under ``structure`` (increasing indices)."""
    total = len(scores)
    if any(not 0 <= c <= total for c in counts):
        raise CoFormerError(f"cannot keep {list(counts)} of {total} units")
    if structure == "nested":
        return [tuple(sorted(_ranked(scores, range(total))[:c])) for c in counts]
    ranked = _ranked(scores, range(total))
    core = int(CORE_FRACTION * min(counts)) if structure == "core" else 0
    if structure not in DECOMPOSITIONS:
        check_decomposition(structure)
    need = sum(counts) - (len(counts) - 1) * core
    if need > total:
        raise CoFormerError(f"a {structure} of {total} units cannot give {'+'.join(map(str, counts))} "
                            f"(with a shared core of {core}): it needs {need}")
    shared, rest = ranked[:core], ranked[core:]
    dealt = _deal(rest, [c - core for c in counts])
    return [tuple(sorted(shared + d)) for d in dealt]


def most_important(kept: Sequence[int], scores: Sequence[float], k: int) -> tuple[int, ...]:
    """The ``k`` most important of a device's ``kept`` units (a sub-model narrowed to fit its budget
    stays inside what it was dealt, so a partition stays one)."""
    if not 0 <= k <= len(kept):
        raise CoFormerError(f"cannot keep {k} of {len(kept)} units")
    return tuple(sorted(_ranked(scores, kept)[:k]))


def overlaps(kept: Sequence[Sequence[int]], names: Sequence[str], what: str) -> list[str]:
    """One line per unit kept by two devices or more: which unit, which devices."""
    where: dict[int, list[str]] = {}
    for name, units in zip(names, kept):
        for u in units:
            where.setdefault(int(u), []).append(name)
    shared = {u: ns for u, ns in where.items() if len(ns) > 1}
    if not shared:
        return []
    by_devices: dict[tuple[str, ...], list[int]] = {}
    for u, ns in sorted(shared.items()):
        by_devices.setdefault(tuple(ns), []).append(u)
    lines = []
    for ns, units in by_devices.items():
        shown = ", ".join(map(str, units[:12])) + (f" and {len(units) - 12} more" if len(units) > 12 else "")
        lines.append(f"{what} {shown} on {' and '.join(ns)}")
    return lines
