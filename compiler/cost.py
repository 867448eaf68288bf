"""Analytic cost of a sub-model: FLOPs, parameters and peak activation memory.

omega(C_n) and phi(C_n) of constraints C5/C6 (paper eq. 8). FLOPs count
2 per multiply-accumulate of every matrix product and convolution (patch
embedding, QKV, attention scores, attention-weighted values, output
projection, both MLP layers), the convention of ``torch.utils.flop_counter``;
norms, softmax and activations are left out, as they are there. Pure
functions of the spec and the teacher's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from coformer.compiler.specs import SubModelSpec, TransformerShape


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int
    activation_bytes: int
    bytes_per_value: int = 4

    @property
    def param_bytes(self) -> int:
        return self.params * self.bytes_per_value

    @property
    def memory_bytes(self) -> int:
        """phi(C_n): parameters plus the peak of live activations."""
        return self.param_bytes + self.activation_bytes


def submodel_cost(spec: SubModelSpec, shape: TransformerShape, bytes_per_value: int = 4) -> Cost:
    """Cost of the sub-model ``spec`` of a teacher of ``shape`` (batch 1), head excluded.

    Language families count ``num_tokens`` tokens (the bundle's maximum
    length), their embedding tables (``extras["embed_rows"]`` rows of d: vocabulary,
    positions, token types; a lookup costs no FLOPs), RMS norms with one
    parameter per channel (``norm_params``), absent biases, gated MLPs (three
    matrices) and BERT's pooler on one token.
    """
    if shape.stage_dims:
        return _hierarchical_cost(spec, shape, bytes_per_value)
    ex = shape.extras
    T, d, hd = shape.num_tokens, spec.embed_dim, shape.head_dim
    patches = T - shape.num_prefix_tokens
    P = shape.patch_in_features
    flops = 2 * patches * P * d
    params = P * d + (d if ex.get("patch_bias", True) else 0) + shape.num_prefix_tokens * d + int(ex.get("pos_tokens", T)) * d
    params += int(ex.get("embed_rows", 0)) * d
    norm = int(ex.get("norm_params", 2)) * d
    params += norm * (bool(ex.get("norm_pre")) + bool(ex.get("final_norm", True)) + bool(ex.get("fc_norm")))
    if ex.get("pooler"):
        flops += 2 * d * d
        params += d * d + d
    ls = bool(ex.get("layer_scale"))
    mats = 3 if ex.get("gated") else 2
    mlp_bias = bool(ex.get("mlp_bias", True))
    peak = 0
    for h, D in zip(spec.head_counts, spec.mlp_dims):
        a = h * hd
        if h:
            flops += 2 * T * d * 3 * a + 4 * T * T * a + 2 * T * a * d
            params += norm + d * 3 * a + (3 * a if ex.get("qkv_bias", True) else 0) + a * d
            params += d if ex.get("proj_bias", True) else 0
            params += 4 * hd if ex.get("qk_norm") else 0
            params += d if ls else 0
            peak = max(peak, 3 * T * a + h * T * T + T * a)
        if D:
            flops += 2 * mats * T * d * D
            params += norm + mats * d * D + ((mats - 1) * D + d if mlp_bias else 0) + (d if ls else 0)
            peak = max(peak, mats * T * D)
    activation = (2 * T * d + peak) * bytes_per_value
    return Cost(flops=flops, params=params, activation_bytes=activation, bytes_per_value=bytes_per_value)


def _hierarchical_cost(spec: SubModelSpec, shape: TransformerShape, bytes_per_value: int) -> Cost:
    """Swin: a patch embedding with its norm, then per stage a patch merging (stages after the
    first: LayerNorm over 4 d_{s-1}, then a bias-free 4 d_{s-1} -> d_s projection on the halved
    grid) and windowed attention blocks. ``extras``: ``stage_res`` (token grid per stage) and
    ``windows`` (each stage's window) and ``head_dims``. Attention runs on the grid padded to whole windows:
    scores cost 4 T_pad A a for windows of A tokens; each block holds a relative-position bias
    table of (2 w_h - 1)(2 w_w - 1) rows per kept head."""
    ex = shape.extras
    P = shape.patch_in_features
    widths = spec.stage_widths
    layer_at = dict(zip(spec.layers, zip(spec.head_counts, spec.mlp_dims)))
    res = [tuple(r) for r in ex["stage_res"]]
    d0 = widths[0]
    flops = 2 * res[0][0] * res[0][1] * P * d0
    params = P * d0 + d0 + (2 * d0 if ex.get("patch_norm", True) else 0)
    peak, widest = 0, 0
    layer = 0
    for s, depth in enumerate(shape.stage_depths):
        d = widths[s]
        (H, W), (wh, ww) = res[s], ex["windows"][s]
        T = H * W
        if s:
            prev = widths[s - 1]
            flops += 2 * T * 4 * prev * d
            params += 2 * 4 * prev + 4 * prev * d
            peak = max(peak, 4 * T * prev)
        T_pad, A = -(-H // wh) * wh * -(-W // ww) * ww, wh * ww
        hd = ex.get("head_dims", [shape.head_dim] * len(widths))[s]
        for _ in range(depth):
            if layer in layer_at:
                h, D = layer_at[layer]
                a = h * hd
                if h:
                    flops += 2 * T_pad * d * 3 * a + 4 * T_pad * A * a + 2 * T_pad * a * d
                    params += 2 * d + d * 3 * a + (3 * a if ex.get("qkv_bias", True) else 0) + a * d + d
                    params += (2 * wh - 1) * (2 * ww - 1) * h
                    peak = max(peak, 3 * T_pad * a + h * T_pad * A + T_pad * a)
                if D:
                    flops += 4 * T * d * D
                    params += 2 * d + 2 * d * D + D + d
                    peak = max(peak, 2 * T * D)
            layer += 1
        widest = max(widest, T * d)
    params += 2 * widths[-1]  # the final norm
    activation = (2 * widest + peak) * bytes_per_value
    return Cost(flops=flops, params=params, activation_bytes=activation, bytes_per_value=bytes_per_value)


def head_flops(feature_dim: int, num_classes: int) -> int:
    return 2 * feature_dim * num_classes


def teacher_cost(shape: TransformerShape) -> Cost:
    """The whole teacher's backbone (every layer, head and channel kept)."""
    return submodel_cost(SubModelSpec.full(shape), shape)
