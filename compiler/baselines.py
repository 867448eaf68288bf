"""The strategies CoFormer is measured against, built from the teacher's real weights
and served by the same runtime (``coformer bench``; paper §II-B and §IV):

* ``teacher``: the whole teacher on the central (strongest) device;
* ``pipeline`` (EdgeShard-style): the layers split into consecutive stages, one per
  device, in proportion to each device's compute share; the token tensor goes
  from stage to stage;
* ``tensor_parallel`` (Galaxy-style): every layer's heads and MLP neurons split over
  the devices in proportion to compute; after attention and after the MLP the
  partial outputs are summed (an all-reduce; in a star network the central node
  is where they meet) and the residual stream goes back to every device.

The fourth baseline, a uniform decomposition that ignores heterogeneity
(DeViT-style), is an ordinary CoFormer bundle compiled with the uniform
policy (see :mod:`coformer.tools.bench`).

Pipeline and tensor parallelism compute exactly the teacher's function; each
builder checks that the composed pieces reproduce the teacher's logits and
records the difference in the manifest's ``parity``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from coformer.compiler.apportion import apportion
from coformer.compiler.bundle import StagedBundle
from coformer.compiler.families import adapter_for
from coformer.compiler.families.vit import head_rows_cols
from coformer.compiler.lower import check_parity, export_onnx
from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import DeviceArtifact, InputSpec, Manifest, ModelSpec

BASELINES = ("teacher", "pipeline", "tensor_parallel")
PARITY_TOLERANCE = 1e-3  # logits; float32 sums in another order
_FAMILIES = {"teacher": ("vit", "swin", "bert", "gpt2", "t5"), "pipeline": ("vit",), "tensor_parallel": ("vit",)}


def baseline_families(strategy: str) -> tuple[str, ...]:
    """The model families a baseline can be built for: the teacher alone for every family
    (a language teacher's bundle takes tokens, :func:`build_text_teacher`); pipeline and
    tensor parallelism slice ViT/DeiT blocks and token tensors."""
    return _FAMILIES[strategy]


def split_by_share(total: int, shares: Sequence[float], minimum: int = 0) -> list[int]:
    """``total`` units split in proportion to ``shares`` (largest remainder), each at least ``minimum``.

    >>> split_by_share(7, [1.0, 0.6, 0.4], minimum=1)
    [4, 2, 1]
    """
    if total < minimum * len(shares):
        raise CoFormerError(f"cannot give {len(shares)} devices at least {minimum} of {total} each")
    if any(not w > 0 for w in shares):
        raise CoFormerError(f"compute shares {list(shares)} must be positive")
    return apportion(total, shares, minimum)


class _Embed(nn.Module):
    """Image -> token tensor: the teacher's patch embedding, prefix tokens and positions."""

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = t.patch_embed, t.patch_drop, t.norm_pre
        self._pos_embed = t._pos_embed  # a bound method: not a submodule, so the rest of t is not held
        for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):  # ... but its parameters are
            if getattr(t, name, None) is not None:
                setattr(self, name, getattr(t, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))


class _Head(nn.Module):
    """Token tensor -> logits: the teacher's final norm, pooling and classifier."""

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc_norm, self.head = t.norm, t.fc_norm, t.head
        if getattr(t, "head_dist", None) is not None:  # DeiT distilled: two heads, averaged
            self.head_dist = t.head_dist
        self._forward_head = t.forward_head  # pooling as the teacher does it (bound, not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_head(self.norm(x))


class _Stage(nn.Module):
    """A pipeline stage: consecutive teacher blocks, with the embedding first / the head last."""

    def __init__(self, t: nn.Module, first: int, last: int, embed: bool, head: bool) -> None:
        super().__init__()
        self.embed = _Embed(t) if embed else None
        self.blocks = nn.Sequential(*[t.blocks[i] for i in range(first, last)])
        self.head = _Head(t) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        x = self.blocks(x)
        return self.head(x) if self.head is not None else x


class _AttnShare(nn.Module):
    """One device's share of a layer's attention: its heads' Q/K/V rows and output-projection
    columns; the projection bias only on the device that ``owns`` it, so the shares sum to the
    teacher's attention output (layer scale is linear, so it applies to each share)."""

    def __init__(self, blk: nn.Module, heads: Sequence[int], owns_bias: bool) -> None:
        super().__init__()
        from coformer.compiler.families.vit import SlicedAttention

        a = blk.attn
        hd, H, D = a.head_dim, a.num_heads, a.qkv.in_features
        self.norm1, self.ls1 = copy.deepcopy(blk.norm1), copy.deepcopy(blk.ls1)
        self.attn = SlicedAttention(D, len(heads), hd, a.qkv.bias is not None, not isinstance(a.q_norm, nn.Identity),
                               getattr(a.q_norm, "eps", 1e-6))
        rows, cols = head_rows_cols(heads, H, hd)
        with torch.no_grad():
            self.attn.qkv.weight.copy_(a.qkv.weight[rows])
            if a.qkv.bias is not None:
                self.attn.qkv.bias.copy_(a.qkv.bias[rows])
            if not isinstance(a.q_norm, nn.Identity):
                self.attn.q_norm.load_state_dict(a.q_norm.state_dict())
                self.attn.k_norm.load_state_dict(a.k_norm.state_dict())
            self.attn.proj.weight.copy_(a.proj.weight[:, cols])
            self.attn.proj.bias.copy_(a.proj.bias if owns_bias else torch.zeros_like(a.proj.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))


class _MlpShare(nn.Module):
    """One device's share of a layer's MLP: its neurons' fc1 rows and fc2 columns (fc2's bias
    only on the owner)."""

    def __init__(self, blk: nn.Module, neurons: Sequence[int], owns_bias: bool) -> None:
        super().__init__()
        m = blk.mlp
        n = torch.tensor(list(neurons))
        self.norm2, self.ls2, self.act = copy.deepcopy(blk.norm2), copy.deepcopy(blk.ls2), copy.deepcopy(m.act)
        self.fc1 = nn.Linear(m.fc1.in_features, len(neurons))
        self.fc2 = nn.Linear(len(neurons), m.fc2.out_features)
        with torch.no_grad():
            self.fc1.weight.copy_(m.fc1.weight[n])
            self.fc1.bias.copy_(m.fc1.bias[n])
            self.fc2.weight.copy_(m.fc2.weight[:, n])
            self.fc2.bias.copy_(m.fc2.bias if owns_bias else torch.zeros_like(m.fc2.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.fc2(self.act(self.fc1(self.norm2(x)))))


def onnx_params(path: Path) -> int:
    """Weights an exported model holds (its initializers), which is what a device loads."""
    import onnx

    return int(sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer))


def build_baseline(strategy: str, teacher: nn.Module, devices: Sequence[DeviceSpec], x_example: torch.Tensor,
                   out_dir: Path, labels: Sequence[str], preprocessing: dict[str, Any],
                   model_name: str = "teacher", task: Optional[dict[str, Any]] = None) -> Manifest:
    """Write the bundle of ``strategy`` (one of :data:`BASELINES`) for ``devices`` to ``out_dir``.

    The first device is the central node; ``teacher`` uses it alone. The teacher
    alone is built for every family, the others for timm ViT/DeiT
    (:func:`baseline_families`). ``task`` is the CoFormer bundle's (its manifest's): an
    embedding bundle's teacher alone answers the embedding, for a language model.
    """
    teacher = teacher.eval()
    adapter = adapter_for(teacher)
    if strategy == "teacher" and getattr(adapter, "matches_hf", None) is not None:
        return build_text_teacher(teacher, devices[0], x_example, out_dir, labels, preprocessing, model_name, task)
    _check_baseline(strategy, adapter.name, task)
    shape = adapter.read_shape(teacher)  # (a ViT's is checked to be one the slices reproduce)
    devices = list(devices) if strategy != "teacher" else list(devices[:1])
    x3 = x_example[:3]
    with torch.no_grad():
        want = teacher(x3)
    split = _SPLITS[strategy]
    pieces, plan, composed = split(teacher, devices, x3, want)
    gap = float((composed - want).abs().max())
    if not gap <= PARITY_TOLERANCE:
        raise CoFormerError(f"{strategy}: the composed pieces differ from the teacher by {gap:.3g}")
    with torch.no_grad():
        tokens3 = _Embed(teacher)(x3) if strategy != "teacher" else None
    in_shape = tuple(adapter.input_shape(teacher))

    parity = {"composed_vs_teacher": gap}
    out_dim = shape.num_classes if strategy == "teacher" else shape.embed_dim
    with StagedBundle(out_dir) as staged:
        arts = [_lower_pieces(strategy, i, d, pieces[d.name], x3, tokens3, in_shape, (shape.num_tokens, shape.embed_dim),
                              out_dim, staged.dir, parity) for i, d in enumerate(devices)]
        return staged.publish(dict(
            # per-device "flops" are not counted for baselines (0); "params" are the ONNX weights
            model={"name": model_name, "family": shape.family, "layers": shape.num_layers,
                   "embed_dim": shape.embed_dim, "tokens": shape.num_tokens, "plan": {"strategy": strategy, **plan}},
            task={"kind": "classification", "labels": list(labels)},
            input=InputSpec(adapter.input_name, "float32", in_shape, 64, dict(preprocessing)),
            devices=tuple(arts),
            aggregator="",
            parity=parity,
            strategy=strategy,
        ))


def _check_baseline(strategy: str, family: str, task: Optional[dict[str, Any]]) -> None:
    """Refuse, by name, a baseline this teacher or task cannot have."""
    if strategy not in BASELINES:
        raise CoFormerError(f"baseline {strategy!r} is not one of {BASELINES}")
    if (task or {}).get("kind", "classification") != "classification":
        raise CoFormerError(f"the {strategy} baseline answers classes; for an embedding bundle the teacher alone is "
                            "built for language models: bench with --strategies coformer,uniform,student,"
                            "student_matched")
    if family not in baseline_families(strategy):
        raise CoFormerError(f"the {strategy} baseline is built for {'/'.join(baseline_families(strategy))} "
                            f"teachers, not the {family!r} family; bench with --strategies "
                            "coformer,uniform,teacher")


# Each baseline's split of the teacher: (pieces, plan, composed logits on x3), where
# pieces[device] = [(model name, module, input kind)] in the order the device uses them.
Pieces = dict[str, list[tuple[str, nn.Module, str]]]


def _teacher_alone(teacher: nn.Module, devices: list, x3: torch.Tensor, want: torch.Tensor):
    return {devices[0].name: [("", teacher, "pixels")]}, {}, want


def _pipeline(teacher: nn.Module, devices: list, x3: torch.Tensor, want: torch.Tensor):
    """Consecutive stages of layers, one per device, in proportion to its compute share."""
    layers = len(teacher.blocks)
    if layers < len(devices):
        raise CoFormerError(f"a pipeline over {len(devices)} devices needs at least as many layers; "
                            f"the teacher has {layers}")
    counts = split_by_share(layers, [d.cpu_share for d in devices], minimum=1)
    pieces: Pieces = {}
    first = 0
    for i, (d, c) in enumerate(zip(devices, counts)):
        stage = _Stage(teacher, first, first + c, embed=i == 0, head=i == len(devices) - 1)
        pieces[d.name] = [("stage", stage, "pixels" if i == 0 else "tokens")]
        first += c
    with torch.no_grad():
        h = x3
        for d in devices:
            h = pieces[d.name][0][1](h)
    return pieces, {"layers_per_device": dict(zip([d.name for d in devices], counts))}, h


def _tensor_parallel(teacher: nn.Module, devices: list, x3: torch.Tensor, want: torch.Tensor):
    """Every layer's heads and MLP neurons split over the devices in proportion to compute;
    the partial outputs are summed after attention and after the MLP."""
    shares = [d.cpu_share for d in devices]
    embed, head = _Embed(teacher), _Head(teacher)
    pieces: Pieces = {d.name: [] for d in devices}
    pieces[devices[0].name].append(("embed", embed, "pixels"))
    heads_split, neurons_split = [], []
    for layer, blk in enumerate(teacher.blocks):
        hc = split_by_share(blk.attn.num_heads, shares)
        nc = split_by_share(blk.mlp.fc1.out_features, shares)
        heads_split.append(hc)
        neurons_split.append(nc)
        h0 = n0 = 0
        for i, d in enumerate(devices):
            if hc[i]:
                pieces[d.name].append((f"attn{layer}", _AttnShare(blk, range(h0, h0 + hc[i]), i == 0), "tokens"))
            if nc[i]:
                pieces[d.name].append((f"mlp{layer}", _MlpShare(blk, range(n0, n0 + nc[i]), i == 0), "tokens"))
            h0, n0 = h0 + hc[i], n0 + nc[i]
    pieces[devices[0].name].append(("head", head, "tokens"))
    plan = {"heads_per_device": {d.name: [hc[i] for hc in heads_split] for i, d in enumerate(devices)},
            "neurons_per_device": {d.name: [nc[i] for nc in neurons_split] for i, d in enumerate(devices)}}
    with torch.no_grad():
        h = embed(x3)
        for layer in range(len(teacher.blocks)):
            for part in ("attn", "mlp"):
                h = h + sum(m(h) for d in devices for name, m, _ in pieces[d.name] if name == f"{part}{layer}")
        composed = head(h)
    return pieces, plan, composed


_SPLITS = {"teacher": _teacher_alone, "pipeline": _pipeline, "tensor_parallel": _tensor_parallel}


def _lower_pieces(strategy: str, i: int, d: DeviceSpec, pieces: list, x3: torch.Tensor, tokens3: Optional[torch.Tensor],
                  in_shape: tuple, token_shape: tuple, out_dim: int, staging: Path, parity: dict) -> DeviceArtifact:
    """Device ``i``'s pieces exported to ONNX under ``staging`` (each checked against its
    module into ``parity``), and the device's manifest entry."""
    models: dict[str, ModelSpec] = {}
    params = 0
    for name, module, kind in pieces:
        rel = f"{strategy}/{i}-{d.name}{'-' + name if name else ''}.onnx"
        example = x3 if kind == "pixels" else tokens3
        with torch.no_grad():
            out_shape = tuple(module.eval()(example[:1]).shape[1:])
        export_onnx(module, [example[:1]], staging / rel, [kind], ["output"])
        parity[rel] = check_parity(module, staging / rel, [example], [kind], tolerance=PARITY_TOLERANCE)
        if name:
            models[name] = ModelSpec(rel, "float32", in_shape if kind == "pixels" else token_shape, out_shape)
        params += onnx_params(staging / rel)
    main = next(iter(models.values())).artifact if models else f"{strategy}/{i}-{d.name}.onnx"
    return DeviceArtifact(device=d.name, role="central" if i == 0 else "worker", artifact=main, feature_dim=out_dim,
                          flops=0, params=params, backend=d.backend, threads=1, cpu_share=d.cpu_share, models=models)


def build_text_teacher(teacher: nn.Module, device: DeviceSpec, x_example: torch.Tensor, out_dir: Path,
                       labels: Sequence[str], preprocessing: dict[str, Any], model_name: str = "teacher",
                       task: Optional[dict[str, Any]] = None) -> Manifest:
    """The teacher alone on ``device`` for a language model: its whole network (the TextNet it
    converts into exactly) exported with dynamic batch and sequence axes, answering what a
    CoFormer bundle of ``task`` answers (logits, or the embedding: pooled feature,
    normalised as ``task["normalize"]`` says), with the bundle's tokenizer."""
    import shutil

    from coformer.calibration.aggregator import Normalize
    from coformer.compiler.families.textnet import PartsModule
    from coformer.compiler.lower import lower_submodel
    from coformer.runtime.files import public_mode

    adapter = adapter_for(teacher)
    task = dict(task or {"kind": "classification", "labels": list(labels)})
    embedding = task.get("kind") == "embedding"
    head = (Normalize() if task.get("normalize") else None) if embedding else teacher.head
    module = PartsModule(adapter.full_net(teacher), head).eval()
    shape = adapter.read_shape(teacher)
    names = adapter.input_names(teacher)

    with StagedBundle(out_dir) as staged:
        staging = staged.dir
        rel = "teacher/0-teacher.onnx"
        parity = {rel: lower_submodel(module, x_example[:3], staging / rel, names, text=True, output="output")}
        shutil.copyfile(teacher.tokenizer_file, staging / preprocessing["tokenizer"])
        public_mode(staging / preprocessing["tokenizer"])
        out_dim = int(task["dim"]) if embedding else shape.num_classes
        art = DeviceArtifact(device=device.name, role="central", artifact=rel, feature_dim=out_dim, flops=0,
                             params=onnx_params(staging / rel), backend=device.backend, threads=1,
                             cpu_share=device.cpu_share)
        return staged.publish(dict(
            model={"name": model_name, "family": shape.family, "layers": shape.num_layers,
                   "embed_dim": shape.embed_dim, "tokens": shape.num_tokens, "plan": {"strategy": "teacher"}},
            task=task, input=InputSpec("tokens", "int64", tuple(adapter.input_shape(teacher)), 64,
                                       dict(preprocessing), dynamic_axes=(1,)),
            devices=(art,), aggregator="", parity=parity, strategy="teacher"))


def compile_baseline_job(job) -> Any:
    """The baselines' builder (:mod:`coformer.compiler.strategies`): :func:`build_baseline` of
    ``job.strategy``, the teacher's own weights split as that strategy splits them (no policy,
    search or calibration). ``job.options["task"]``: the CoFormer bundle's task, where it is
    compared with one (an embedding bundle's teacher alone answers the embedding)."""
    from coformer.compiler.job import JobResult
    from coformer.compiler.strategies import check_options

    check_options(job.strategy, job.options, ("task",))
    data = job.data
    manifest = build_baseline(job.strategy, job.teacher, job.devices, data.val.head(3), job.out_dir, data.labels,
                              dict(data.preprocessing), model_name=job.model_name, task=job.options.get("task"))
    return JobResult(manifest, {}, job.strategy)
