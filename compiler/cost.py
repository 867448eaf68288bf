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


def head_flops(feature_dim: int, num_classes: int) -> int:
    return 2 * feature_dim * num_classes


def teacher_cost(shape: TransformerShape) -> Cost:
    """The whole teacher's backbone (every layer, head and channel kept)."""
    return submodel_cost(SubModelSpec.full(shape), shape)
