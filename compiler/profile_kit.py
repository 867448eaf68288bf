"""Profile kit: ONNX sub-models spanning the decomposition search space, to be
timed on each device (supplementary §A, "latency dataset collection").

Configurations (l, d, h, D) are drawn by Latin hypercube sampling, so few
points cover the four axes evenly, plus the two corners (the smallest and the
whole teacher). Each entry is a real slice of the teacher with uniform width
across its layers; the kit also records each entry's FLOPs and parameters,
which the analytic predictor uses. ``refine_configs`` adds points next to the
entries a fitted predictor gets most wrong (nn-Meter's adaptive sampling).

A language teacher's requests vary in length, and so does their latency, so its
kit has a fifth axis, the sequence length T (tokens). Configurations are then
(l, d, h, D, T), sampled over T in [min(8, T_max), T_max] where T_max is the
bundle's ``--max-length``; each entry's ONNX takes any length, is timed at its own T
(``tokens`` in the entry, which the profiler fills), and its FLOPs are counted at that
T. The predictor then learns latency as a function of length too, and the search
predicts at the length requests typically have (``coformer.compiler.planning.latency_tokens``).

A kit is large (the ONNX files carry weights: about the teacher's size times
the mean kept fraction, per entry); profile it, then delete it.
"""

from __future__ import annotations

import dataclasses
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
MIN_KIT_TOKENS = 8  # a language kit's shortest sequence (or T_max, when that is shorter)

Config = tuple[int, ...]  # l, d, h (per layer), D (per layer); and T (tokens) for a language teacher


def is_language(shape: TransformerShape) -> bool:
    """A language teacher embeds tokens by lookup: it has no patch embedding."""
    return shape.patch_in_features == 0


def min_tokens(shape: TransformerShape) -> int:
    return min(MIN_KIT_TOKENS, shape.num_tokens)


def _clip_config(shape: TransformerShape, l: float, d: float, h: float, D: float, *T: float) -> Config:
    out = (
        int(min(max(round(l), 1), shape.num_layers)),
        int(min(max(round(d), 8), shape.embed_dim)),
        int(min(max(round(h), 1), min(shape.heads))),
        int(min(max(round(D), 8), min(shape.mlp_dims))),
    )
    if not is_language(shape):
        return out
    t = T[0] if T else shape.num_tokens  # a 4-axis configuration of a language teacher: at full length
    return out + (int(min(max(round(t), min_tokens(shape)), shape.num_tokens)),)


def sample_configs(shape: TransformerShape, count: int, seed: int = 0) -> list[Config]:
    """``count`` configurations: both corners (the smallest sub-model at the shortest length,
    the teacher at the longest) plus a Latin hypercube over the rest, in 4 axes, or 5 with
    the sequence length of a language teacher."""
    if count < 2:
        raise CoFormerError(f"a kit needs at least 2 entries, asked for {count}")
    from scipy.stats import qmc

    low = [1, 8, 1, 8]
    top = [shape.num_layers, shape.embed_dim, min(shape.heads), min(shape.mlp_dims)]
    if is_language(shape):
        low, top = low + [min_tokens(shape)], top + [shape.num_tokens]
    u = qmc.LatinHypercube(d=len(top), seed=seed).random(count - 2)
    pts = 0.5 + u * (np.asarray(top, dtype=float) - 0.5)
    if is_language(shape):  # the length axis spans its own range, not 0.5..T_max
        lo = min_tokens(shape) - 0.5
        pts[:, 4] = lo + u[:, 4] * (shape.num_tokens + 0.5 - lo)
    configs = [_clip_config(shape, *low), _clip_config(shape, *top)]
    configs += [_clip_config(shape, *p) for p in pts]
    return list(dict.fromkeys(configs))  # no duplicates, order kept


def refine_configs(shape: TransformerShape, worst: Sequence[Config], per_point: int = 2, seed: int = 0) -> list[Config]:
    """New configurations within +-15% of each badly predicted one (every axis, length too)."""
    rng = np.random.default_rng(seed)
    out = []
    for cfg in worst:
        for _ in range(per_point):
            out.append(_clip_config(shape, *(np.asarray(cfg) * rng.uniform(0.85, 1.15, size=len(cfg)))))
    return list(dict.fromkeys(c for c in out if c not in worst))


def uniform_spec(shape: TransformerShape, config: Config) -> SubModelSpec:
    """The sub-model of a kit configuration (l, d, h, D): the first d channels, h heads and D
    neurons of each of l layers, the first l layers of an isotropic teacher.

    A hierarchical teacher (Swin) scales the widths with each stage's: a stage of 2x the
    first stage's channels keeps 2d channels, a layer of 4x the fewest heads keeps 4h
    heads; and its l layers are spread evenly over all stages (the first l would all be
    the early, many-token blocks), so the kit spans the cost of every stage.
    """
    l, d, h, D = config[:4]  # a language configuration's T is the length it is timed at
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


def spec_features(spec: SubModelSpec, tokens: Optional[int] = None) -> list[float]:
    """The predictor's features of a sub-model (paper eq. 4): layers, first-stage width, mean
    heads and mean MLP width over its layers, and for a language model timed at ``tokens``
    tokens, that length. For a kit entry of an isotropic teacher they equal its configuration."""
    def num(v: float):
        return int(v) if float(v).is_integer() else float(v)

    out = [num(spec.num_layers), num(spec.embed_dim), num(np.mean(spec.head_counts)), num(np.mean(spec.mlp_dims))]
    return out + ([int(tokens)] if tokens is not None else [])


def write_kit(teacher: Any, configs: Sequence[Config], out_dir: Path, progress: bool = True,
              existing: Optional[dict] = None) -> dict:
    """Export one ONNX per configuration into ``out_dir`` and write ``kit.json``.

    With ``existing`` (a kit already there), new entries are appended. A language
    teacher's entries take its token inputs at any length; each is timed at its
    configuration's T (``tokens``; its FLOPs are counted at T), and the kit's
    ``input.feeds`` tells the profiler how to fill them: token ids within the
    vocabulary, a mask of ones, token types of zeros.
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
    if text and existing is not None and not all("tokens" in e for e in kit["entries"]):
        raise CoFormerError("this kit was written before language kits had a length axis; write a new one")
    for i, cfg in enumerate(tqdm(configs, desc="profile kit", disable=not progress)):
        cfg = _clip_config(shape, *cfg)
        spec = uniform_spec(shape, cfg)
        rel = f"models/{start + i:04d}.onnx"
        sub = adapter.slice(teacher, spec)
        if text:
            from coformer.compiler.lower import lower_submodel

            lower_submodel(adapter.export_module(sub), example, out_dir / rel, names, text=True)
        else:
            export_onnx(sub, [example], out_dir / rel, [adapter.input_name], ["features"])
        tokens = cfg[4] if text else None
        cost = submodel_cost(spec, shape if tokens is None else dataclasses.replace(shape, num_tokens=tokens))
        entry = {"id": start + i, "file": rel, "config": spec_features(spec, tokens), "flops": cost.flops,
                 "params": cost.params}
        if tokens is not None:
            entry["tokens"] = tokens  # the profiler feeds [1, tokens]
        if entry["config"] != list(cfg):  # a hierarchical teacher's widths differ by stage
            entry["sample"] = list(cfg)
        kit["entries"].append(entry)
    atomic_write_json(out_dir / KIT_NAME, kit)
    return kit


def _token_feeds(teacher: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """How the profiler fills a language model's inputs (``coformer.runtime.profile.kit_feeds``);
    the shape is the longest, an entry's ``tokens`` cuts it."""
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
