"""Decomposition policies: the constraint check of paper eq. 8 (C1-C6) and a
deterministic heuristic policy.

The heuristic sizes each sub-model to its device's share of compute: the
teacher's embedding channels, the heads of every layer and the MLP neurons of
every layer are apportioned between the devices in proportion to
``cpu_share`` (so C2-C4 hold by construction), which units each keeps follows
the decomposition structure (:mod:`coformer.compiler.decomposition`: the top of
one ranking for every device, a partition, or a shared core), and layers are then dropped, least important first, until
the sub-model fits its FLOPs budget Omega_n (C5) and memory Phi_n (C6).
Bayesian search (DeBo) will replace it; everything downstream takes a
:class:`Policy` from any source.
"""

from __future__ import annotations

from typing import Callable, Sequence

from coformer.compiler.apportion import apportion
from coformer.compiler.cost import Cost, submodel_cost
from coformer.compiler.decomposition import PARTITIONING, check_decomposition, deal, overlaps
from coformer.compiler.importance import Importance
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError

CostFn = Callable[[SubModelSpec, TransformerShape], Cost]


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def policy_violations(
    policy: Policy, shape: TransformerShape, devices: Sequence[DeviceSpec], cost: CostFn = submodel_cost
) -> list[str]:
    """Every violated constraint of paper eq. 8, each with its numbers (empty list: feasible).

    C3 and C4 are read per layer *position* k: the k-th kept layer of every
    sub-model that has one. Against a teacher with uneven layers the bound is
    its widest layer. A hierarchical teacher (Swin), whose layers differ by stage
    from 3 heads to 24, is bounded per teacher layer instead: the sub-models that keep
    layer l keep at most its heads and neurons between them.
    """
    by_name = {d.name: d for d in devices}
    out: list[str] = []
    for name in policy.devices:
        if name not in by_name:
            out.append(f"policy names device {name!r}, which is not among {sorted(by_name)}")
    for name, spec in zip(policy.devices, policy.submodels):
        try:
            spec.validate(shape, where=f"sub-model of {name}")
        except CoFormerError as e:
            out.append(str(e))
    if out:
        return out
    subs = policy.submodels
    L = shape.num_layers
    if policy.decomposition in PARTITIONING:
        out += partition_overlaps(policy, shape)
    for name, s in zip(policy.devices, subs):
        if s.num_layers > L:
            out.append(f"C1: {name} keeps {s.num_layers} layers, the teacher has L = {L}")
    for st, width in enumerate(shape.widths):  # a hierarchical teacher: C2 in every stage
        ds = [s.stage_widths[st] for s in subs]
        if sum(ds) > width:
            what = "embedding widths" if st == 0 else f"channel widths of stage {st}"
            out.append(f"C2: {what} {'+'.join(map(str, ds))} = {sum(ds)} exceed the teacher's d = {width}")
    if shape.stage_dims:  # a hierarchical teacher: bounded by each teacher layer's own heads and neurons
        for layer in range(L):
            kept = [(s.head_counts[s.layers.index(layer)], s.mlp_dims[s.layers.index(layer)])
                    for s in subs if layer in s.layers]
            hs, Ds = [k[0] for k in kept], [k[1] for k in kept]
            if sum(hs) > shape.heads[layer]:
                out.append(f"C3: heads of layer {layer}: {'+'.join(map(str, hs))} = {sum(hs)} exceed its "
                           f"h = {shape.heads[layer]}")
            if sum(Ds) > shape.mlp_dims[layer]:
                out.append(f"C4: MLP widths of layer {layer}: {'+'.join(map(str, Ds))} = {sum(Ds)} exceed its "
                           f"D = {shape.mlp_dims[layer]}")
    h_max, D_max = max(shape.heads), max(shape.mlp_dims)
    for k in range(0 if shape.stage_dims else max(s.num_layers for s in subs)):
        hs = [s.head_counts[k] for s in subs if s.num_layers > k]
        Ds = [s.mlp_dims[k] for s in subs if s.num_layers > k]
        if sum(hs) > h_max:
            out.append(f"C3: heads at layer position {k}: {'+'.join(map(str, hs))} = {sum(hs)} exceed h = {h_max}")
        if sum(Ds) > D_max:
            out.append(f"C4: MLP widths at layer position {k}: {'+'.join(map(str, Ds))} = {sum(Ds)} "
                       f"exceed D = {D_max}")
    for name, s in zip(policy.devices, subs):
        dev, c = by_name[name], cost(s, shape)
        if c.flops > dev.flops_budget:
            out.append(f"C5: {name} needs {_fmt(c.flops)} FLOPs, its budget is {_fmt(dev.flops_budget)}")
        if c.memory_bytes > dev.memory_bytes:
            out.append(f"C6: {name} needs {_fmt(c.memory_bytes)}B of memory, it has {_fmt(dev.memory_bytes)}B")
    return out


def partition_overlaps(policy: Policy, shape: TransformerShape) -> list[str]:
    """Under a partitioning decomposition, C2-C4 on the union: every unit a device keeps is
    its own. One line per kind of unit that two devices share, naming the units."""
    names, subs = policy.devices, policy.submodels
    out = []
    for st in range(len(shape.widths)):
        what = "channels" if st == 0 else f"channels of stage {st}"
        out += overlaps([s.all_channels[st] for s in subs], names, what)
    for layer in range(shape.num_layers):
        held = [(n, s.layers.index(layer)) for n, s in zip(names, subs) if layer in s.layers]
        out += overlaps([subs[names.index(n)].heads[k] for n, k in held], [n for n, _ in held],
                        f"heads of layer {layer}:")
        out += overlaps([subs[names.index(n)].neurons[k] for n, k in held], [n for n, _ in held],
                        f"MLP neurons of layer {layer}:")
    return [f"C2-C4 ({policy.decomposition}): " + line for line in out]


def check_policy(policy: Policy, shape: TransformerShape, devices: Sequence[DeviceSpec],
                 cost: CostFn = submodel_cost) -> Policy:
    """Return ``policy`` if it satisfies C1-C6, else raise listing every violation."""
    bad = policy_violations(policy, shape, devices, cost)
    if bad:
        raise CoFormerError("the policy violates the device constraints:\n  " + "\n  ".join(bad))
    return policy


def heuristic_policy(
    shape: TransformerShape,
    importance: Importance,
    devices: Sequence[DeviceSpec],
    cost: CostFn = submodel_cost,
    decomposition: str = "nested",
) -> Policy:
    """Share-proportional widths, units chosen by ``decomposition``
    (:mod:`coformer.compiler.decomposition`), layers trimmed to fit (see module doc)."""
    if not devices:
        raise CoFormerError("no devices given")
    importance.check(shape)
    check_decomposition(decomposition)
    shares = [d.cpu_share for d in devices]
    # per stage / layer, per device: the units each device is dealt
    chans = [deal(sc, apportion(w, shares), decomposition) for sc, w in zip(importance.all_channels, shape.widths)]
    heads = [deal(sc, apportion(h, shares), decomposition) for sc, h in zip(importance.heads, shape.heads)]
    neurons = [deal(sc, apportion(D, shares), decomposition) for sc, D in zip(importance.neurons, shape.mlp_dims)]
    subs = []
    for n, dev in enumerate(devices):
        layers = list(range(shape.num_layers))
        while True:
            spec = SubModelSpec(
                layers=tuple(layers),
                channels=chans[0][n],
                heads=tuple(heads[l][n] for l in layers),
                neurons=tuple(neurons[l][n] for l in layers),
                stage_channels=tuple(c[n] for c in chans[1:]),
            )
            c = cost(spec, shape)
            if c.flops <= dev.flops_budget and c.memory_bytes <= dev.memory_bytes:
                break
            if len(layers) == 1:
                raise CoFormerError(
                    f"device {dev.name!r} cannot hold even one layer at width d={len(chans[0][n])}: it needs "
                    f"{_fmt(c.flops)} FLOPs and {_fmt(c.memory_bytes)}B, its budget is "
                    f"{_fmt(dev.flops_budget)} FLOPs and {_fmt(dev.memory_bytes)}B"
                )
            layers.remove(min(layers, key=lambda l: (importance.layers[l], l)))
        subs.append(spec)
    policy = Policy(tuple(subs), tuple(d.name for d in devices), source="heuristic", decomposition=decomposition)
    return check_policy(policy, shape, devices, cost)
