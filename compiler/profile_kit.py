"""Profile kit: ONNX sub-models spanning the decomposition search space, to be
timed on each device (supplementary §A, "latency dataset collection").

Configurations (l, d, h, D) are drawn by Latin hypercube sampling, so few
points cover the four axes evenly, plus the two corners (the smallest and the
whole teacher). Each entry is a real slice of the teacher with uniform width
across its layers; the kit also records each entry's FLOPs and parameters,
which the analytic predictor uses. ``refine_configs`` adds points next to the
entries a fitted predictor gets most wrong (nn-Meter's adaptive sampling).

A kit is large (the ONNX files carry weights: about the teacher's size times
the mean kept fraction, per entry); profile it, then delete it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from coformer.compiler.cost import submodel_cost
from coformer.compiler.specs import SubModelSpec, TransformerShape
from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError

KIT_VERSION = 1
KIT_NAME = "kit.json"

Config = tuple[int, int, int, int]  # l, d, h (per layer), D (per layer)


def _clip_config(shape: TransformerShape, l: float, d: float, h: float, D: float) -> Config:
    return (
        int(min(max(round(l), 1), shape.num_layers)),
        int(min(max(round(d), 8), shape.embed_dim)),
        int(min(max(round(h), 1), min(shape.heads))),
        int(min(max(round(D), 8), min(shape.mlp_dims))),
    )


def sample_configs(shape: TransformerShape, count: int, seed: int = 0) -> list[Config]:
    """``count`` configurations: both corners plus a Latin hypercube over the rest."""
    if count < 2:
        raise CoFormerError(f"a kit needs at least 2 entries, asked for {count}")
    from scipy.stats import qmc

    u = qmc.LatinHypercube(d=4, seed=seed).random(count - 2)
    top = np.array([shape.num_layers, shape.embed_dim, min(shape.heads), min(shape.mlp_dims)], dtype=float)
    pts = 0.5 + u * (top - 0.5)
    configs = [_clip_config(shape, 1, 8, 1, 8), _clip_config(shape, *top)]
    configs += [_clip_config(shape, *p) for p in pts]
    return list(dict.fromkeys(configs))  # no duplicates, order kept


def refine_configs(shape: TransformerShape, worst: Sequence[Config], per_point: int = 2, seed: int = 0) -> list[Config]:
    """New configurations within +-15% of each badly predicted one."""
    rng = np.random.default_rng(seed)
    out = []
    for cfg in worst:
        for _ in range(per_point):
            out.append(_clip_config(shape, *(np.asarray(cfg) * rng.uniform(0.85, 1.15, size=4))))
    return list(dict.fromkeys(c for c in out if c not in worst))


def uniform_spec(shape: TransformerShape, config: Config) -> SubModelSpec:
    """The sub-model of a kit configuration (l, d, h, D): the first d channels, h heads and D
    neurons of each of l layers, the first l layers of an isotropic teacher.

    A hierarchical teacher (Swin) scales the widths with each stage's: a stage of 2x the
    first stage's channels keeps 2d channels, a layer of 4x the fewest heads keeps 4h
    heads; and its l layers are spread evenly over all stages (the first l would all be
    the early, many-token blocks), so the kit spans the cost of every stage.
    """
    l, d, h, D = config
    L = shape.num_layers
    if not shape.stage_dims:
        layers = tuple(range(l))
        return SubModelSpec(layers, tuple(range(d)), tuple(tuple(range(h)) for _ in layers),
                            tuple(tuple(range(D)) for _ in layers))
    layers = tuple(sorted({int(round(v)) for v in np.linspace(0, L - 1, l)}))

    def scaled(k: int, of: int, base: int) -> tuple[int, ...]:
        return tuple(range(min(of, max(1, int(round(k * of / base))))))

    widths = [scaled(d, w, shape.embed_dim) for w in shape.widths]
    return SubModelSpec(layers, widths[0], tuple(scaled(h, shape.heads[i], min(shape.heads)) for i in layers),
                        tuple(scaled(D, shape.mlp_dims[i], min(shape.mlp_dims)) for i in layers), tuple(widths[1:]))


def spec_features(spec: SubModelSpec) -> list[float]:
    """The predictor's features of a sub-model (paper eq. 4): layers, first-stage width, mean
    heads and mean MLP width over its layers. For a kit entry of an isotropic teacher they
    equal its configuration."""
    def num(v: float):
        return int(v) if float(v).is_integer() else float(v)

    return [num(spec.num_layers), num(spec.embed_dim), num(np.mean(spec.head_counts)), num(np.mean(spec.mlp_dims))]


def write_kit(teacher: Any, configs: Sequence[Config], out_dir: Path, progress: bool = True,
              existing: Optional[dict] = None) -> dict:
    """Export one ONNX per configuration into ``out_dir`` and write ``kit.json``.

    With ``existing`` (a kit already there), new entries are appended. A language
    teacher's entries take its token inputs at the bundle's full length (what the
    cost model counts), and the kit's ``input.feeds`` tells the profiler how to fill
    them: token ids within the vocabulary, a mask of ones, token types of zeros.
    """
    from coformer.compiler.families import adapter_for
    from coformer.compiler.lower import export_onnx

    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    out_dir = Path(out_dir)
    names = adapter.input_names(teacher)
    text = len(names) > 1 or getattr(adapter, "matches_hf", None) is not None
    kit = existing or {"version": KIT_VERSION, "family": shape.family, "shape": shape.to_dict(),
                       "input": {"name": adapter.input_name if not text else "tokens",
                                 "shape": list(adapter.input_shape(teacher))},
                       "entries": []}
    if text:
        kit["input"]["feeds"] = _token_feeds(teacher, names)
    start = len(kit["entries"])
    example = _example(teacher, adapter, text)
    for i, cfg in enumerate(tqdm(configs, desc="profile kit", disable=not progress)):
        spec = uniform_spec(shape, cfg)
        rel = f"models/{start + i:04d}.onnx"
        sub = adapter.slice(teacher, spec)
        if text:
            from coformer.compiler.pipeline import lower_submodel

            lower_submodel(adapter.export_module(sub), example, out_dir / rel, names, text=True)
        else:
            export_onnx(sub, [example], out_dir / rel, [adapter.input_name], ["features"])
        cost = submodel_cost(spec, shape)
        entry = {"id": start + i, "file": rel, "config": spec_features(spec), "flops": cost.flops,
                 "params": cost.params}
        if entry["config"] != list(cfg):  # a hierarchical teacher's widths differ by stage
            entry["sample"] = list(cfg)
        kit["entries"].append(entry)
    atomic_write_json(out_dir / KIT_NAME, kit)
    return kit


def _token_feeds(teacher: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """How the profiler fills a language model's inputs (``coformer.runtime.profile.kit_feeds``)."""
    T = int(teacher.max_length)
    vocab = int(teacher.hf.config.vocab_size)
    fill = {"input_ids": "ids", "attention_mask": "ones", "token_type_ids": "zeros"}
    return {n: {"dtype": "int64", "shape": [1, T], "fill": fill[n], "high": vocab} for n in names}


def _example(teacher: Any, adapter: Any, text: bool):
    """An input to export with: zeros for an image model; for a language model a packed
    ``[2, k, T]`` batch of valid tokens (ids within the vocabulary, a full mask)."""
    import torch

    if not text:
        return torch.zeros(1, *adapter.input_shape(teacher))
    k, T = adapter.input_shape(teacher)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, k, T, dtype=torch.long)
    x[:, 0] = torch.randint(4, int(teacher.hf.config.vocab_size), (2, T), generator=g)
    x[:, 1] = 1
    return x
