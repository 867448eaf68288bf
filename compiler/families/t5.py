"""HF T5 encoder family (T5, Flan-T5): ``T5EncoderModel``, or the encoder of
``T5ForConditionalGeneration``.

Pre-norm blocks with T5's RMS norm (no bias, no mean), no biases anywhere, no
attention scaling (folded into the weights), a relative position bias that
lives in the first layer and is shared by all layers (see
:mod:`textnet` for how sub-models keep it), and either ReLU (``wi``, ``wo``)
or a gated GELU (Flan-T5: ``gelu(wi_0 x) * wi_1 x``). The encoder has no task
head: the pooled feature is the mean of the final states over the attention
mask (sentence-T5's encoder-mean), and the head is a new linear layer fitted on
the calibration labels.
"""

from __future__ import annotations

from typing import Any

import torch

from coformer.compiler.families.base import register
from coformer.compiler.families.text_teacher import TextAdapter, TextTeacher
from coformer.compiler.families.textnet import pool_features


def _encoder(model: TextTeacher):
    hf = model.hf
    return hf.encoder if hasattr(hf, "encoder") else hf


@register("t5")
class T5Adapter(TextAdapter):
    name = "t5"
    architectures = ("T5EncoderModel", "T5ForConditionalGeneration")

    def matches_hf(self, hf: Any) -> bool:
        return type(hf).__name__ in self.architectures

    def default_pool(self, hf: Any) -> str:
        return "mean"

    def task_head(self, hf: Any):
        return None

    def net_config(self, model: TextTeacher) -> dict:
        c = _encoder(model).config
        L = c.num_layers
        return {
            "family": "t5", "vocab_size": c.vocab_size, "embed_dim": c.d_model, "heads": [c.num_heads] * L,
            "mlp_dims": [c.d_ff] * L, "head_dim": c.d_kv, "max_positions": 0, "type_vocab_size": 0,
            "norm": "rms", "norm_place": "pre", "eps": c.layer_norm_epsilon, "emb_norm": False, "final_norm": True,
            "causal": False, "qkv_bias": False, "proj_bias": False, "mlp_bias": False, "gated": c.is_gated_act,
            "act": c.dense_act_fn, "attn_scale": False, "pool": model.pool_kind,
            "rel_bias": {"num_buckets": c.relative_attention_num_buckets,
                         "max_distance": c.relative_attention_max_distance, "bidirectional": True,
                         "columns": c.num_heads},
        }

    def net_weights(self, model: TextTeacher) -> dict[str, torch.Tensor]:
        enc = _encoder(model)
        w = {"word.weight": enc.embed_tokens.weight, "final_norm.weight": enc.final_layer_norm.weight,
             "rel.weight": enc.block[0].layer[0].SelfAttention.relative_attention_bias.weight}
        for i, blk in enumerate(enc.block):
            p = f"blocks.{i}."
            att, ff = blk.layer[0], blk.layer[-1]
            for n in ("q", "k", "v", "o"):
                w[p + f"attn.{n}.weight"] = getattr(att.SelfAttention, n).weight
            w[p + "norm1.weight"], w[p + "norm2.weight"] = att.layer_norm.weight, ff.layer_norm.weight
            dense = ff.DenseReluDense
            if hasattr(dense, "wi_0"):
                w[p + "fc1.weight"], w[p + "fc1g.weight"] = dense.wi_0.weight, dense.wi_1.weight
            else:
                w[p + "fc1.weight"] = dense.wi.weight
            w[p + "fc2.weight"] = dense.wo.weight
        return w

    def teacher_features(self, model: TextTeacher, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens.unbind(1)
        out = _encoder(model)(input_ids=ids, attention_mask=mask)
        return pool_features(out.last_hidden_state, mask, model.pool_kind)
