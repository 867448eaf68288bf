"""HF BERT family: ``BertModel`` and ``Bert*ForSequenceClassification``, including
checkpoints that are plain encoders (sentence-embedding models).

Post-norm blocks (``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``), learned
absolute positions and token types, GELU (erf). The pooled feature is what the
checkpoint's classifier reads: the pooler's ``tanh(W h_[CLS] + b)`` for
``BertForSequenceClassification``; for a plain encoder, the mean of the token
states over the attention mask (sentence-transformers' default), and the task
head is a new linear layer fitted on the calibration labels.
"""

from __future__ import annotations

from typing import Any

import torch

from coformer.compiler import prism as P
from coformer.compiler.families.base import register
from coformer.compiler.families.prism_hooks import PrismHooks
from coformer.compiler.families.text_teacher import TextAdapter, TextTeacher
from coformer.compiler.families.textnet import pool_features
from coformer.runtime.errors import CoFormerError


def _base(model: TextTeacher):
    hf = model.hf
    return getattr(hf, "bert", hf)


class BertPrism(PrismHooks):
    """PRISM's hooks for an HF BERT pooled by its pooler, CLS or the mean."""

    name = "bert"

    def __init__(self, teacher: TextTeacher) -> None:
        if teacher.pool_kind not in ("pooler", "cls", "mean"):
            raise CoFormerError(f"PRISM serves BERT pooled by its pooler, CLS or the mean; this one pools by "
                                f"{teacher.pool_kind!r}")
        self.teacher, self.bert = teacher, _base(teacher)
        if teacher.pool_kind == "pooler" and self.bert.pooler is None:
            raise CoFormerError("this BERT has no pooler (add_pooling_layer=False)")
        self.blocks = list(self.bert.encoder.layer)
        self.qkv, self.finish = P.bert_qkv, P.bert_finish
        self.scales = [P.bert_scale(layer) for layer in self.blocks]
        self.pool = "sum" if teacher.pool_kind == "mean" else "token"
        self.input_names = list(teacher.fields)
        sa = self.blocks[0].attention.self
        self.embed_dim = int(self.bert.config.hidden_size)
        self.heads, self.head_dim = int(sa.num_attention_heads), int(sa.attention_head_size)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, *types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bert.embeddings(input_ids=ids, token_type_ids=types[0] if types else None), mask.bool()

    def head_of_token(self, h: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t.head(self.bert.pooler(h) if t.pool_kind == "pooler" else h[:, 0])

    def logits(self, x: torch.Tensor, shares, cr: int) -> torch.Tensor:
        t = self.teacher
        ids, mask = x[:, 0], x[:, 1]
        types = x[:, 2] if x.shape[1] > 2 else None
        hidden, pooler = P.bert_states(t.hf, ids, mask, shares, cr, types)
        return t.head(pooler if t.pool_kind == "pooler" else pool_features(hidden, mask, t.pool_kind))


@register("bert")
class BertAdapter(TextAdapter):
    name = "bert"
    prism_hooks = BertPrism
    architectures = ("BertModel", "BertForSequenceClassification")

    def matches_hf(self, hf: Any) -> bool:
        return type(hf).__name__ in self.architectures

    def default_pool(self, hf: Any) -> str:
        return "pooler" if type(hf).__name__ == "BertForSequenceClassification" else "mean"

    def task_head(self, hf: Any):
        return getattr(hf, "classifier", None)

    def net_config(self, model: TextTeacher) -> dict:
        c = _base(model).config
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise CoFormerError(f"BERT position_embedding_type {c.position_embedding_type!r} is not supported "
                                "(only 'absolute')")
        if getattr(c, "is_decoder", False):
            raise CoFormerError("a BERT configured as a decoder (is_decoder=True) is not supported")
        hd = c.hidden_size // c.num_attention_heads
        L = c.num_hidden_layers
        return {
            "family": "bert", "vocab_size": c.vocab_size, "embed_dim": c.hidden_size,
            "heads": [c.num_attention_heads] * L, "mlp_dims": [c.intermediate_size] * L, "head_dim": hd,
            "max_positions": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
            "norm": "layer", "norm_place": "post", "eps": c.layer_norm_eps, "emb_norm": True, "final_norm": False,
            "causal": False, "qkv_bias": True, "proj_bias": True, "mlp_bias": True, "gated": False,
            "act": c.hidden_act, "attn_scale": True, "rel_bias": None, "pool": model.pool_kind,
        }

    def net_weights(self, model: TextTeacher) -> dict[str, torch.Tensor]:
        b = _base(model)
        e = b.embeddings
        w = {"word.weight": e.word_embeddings.weight, "pos.weight": e.position_embeddings.weight,
             "typ.weight": e.token_type_embeddings.weight,
             "emb_norm.weight": e.LayerNorm.weight, "emb_norm.bias": e.LayerNorm.bias}
        for i, layer in enumerate(b.encoder.layer):
            p = f"blocks.{i}."
            a = layer.attention
            for ours, theirs in (("q", a.self.query), ("k", a.self.key), ("v", a.self.value), ("o", a.output.dense)):
                w[p + f"attn.{ours}.weight"], w[p + f"attn.{ours}.bias"] = theirs.weight, theirs.bias
            for ours, theirs in (("norm1", a.output.LayerNorm), ("norm2", layer.output.LayerNorm)):
                w[p + f"{ours}.weight"], w[p + f"{ours}.bias"] = theirs.weight, theirs.bias
            for ours, theirs in (("fc1", layer.intermediate.dense), ("fc2", layer.output.dense)):
                w[p + f"{ours}.weight"], w[p + f"{ours}.bias"] = theirs.weight, theirs.bias
        if model.pool_kind == "pooler":
            if b.pooler is None:
                raise CoFormerError("this BERT has no pooler (add_pooling_layer=False); its feature is pooled by mean")
            w["pooler.weight"], w["pooler.bias"] = b.pooler.dense.weight, b.pooler.dense.bias
        return w

    def teacher_features(self, model: TextTeacher, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask, types = tokens.unbind(1)
        out = _base(model)(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if model.pool_kind == "pooler":
            return out.pooler_output
        return pool_features(out.last_hidden_state, mask, model.pool_kind)
