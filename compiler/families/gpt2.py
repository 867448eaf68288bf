"""HF GPT-2 family: ``GPT2Model``, ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification``.

Pre-norm blocks with causal attention, learned absolute positions, fused
``c_attn`` (Conv1D, weight ``[in, out]``) split here into Q, K and V, GELU
(tanh), a final LayerNorm. The pooled feature is the last non-padding
token's state, as ``GPT2ForSequenceClassification`` pools. Choice written
down: HF finds that token by comparing ids with ``pad_token_id``; we read it
off the attention mask (right padding), which agrees whenever the text itself
never contains the pad id and stays right when the pad id is the EOS id (a
common GPT-2 set-up). For ``GPT2Model``/``GPT2LMHeadModel`` the task head is a
new linear layer fitted on the calibration labels.
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
    return getattr(hf, "transformer", hf)


class Gpt2Prism(PrismHooks):
    """PRISM's hooks for an HF GPT-2 pooled by its last token or the mean: the partition-aware
    causal mask, and the last token pooled like a sum wherever it falls."""

    name = "gpt2"
    causal = True

    def __init__(self, teacher: TextTeacher) -> None:
        if teacher.pool_kind not in ("last", "mean"):
            raise CoFormerError(f"PRISM serves GPT-2 pooled by its last token or the mean; this one pools by "
                                f"{teacher.pool_kind!r}")
        self.teacher, self.gpt2 = teacher, _base(teacher)
        self.blocks = list(self.gpt2.h)
        self.qkv, self.finish = P.gpt2_qkv, P.gpt2_finish
        self.scales = [P.gpt2_scale(b, i) for i, b in enumerate(self.blocks)]
        self.pool = "sum"
        self.last_token = teacher.pool_kind == "last"
        self.input_names = list(teacher.fields)
        self.embed_dim = int(self.gpt2.config.n_embd)
        self.heads, self.head_dim = int(self.blocks[0].attn.num_heads), int(self.blocks[0].attn.head_dim)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return P.gpt2_embed(self.gpt2, ids), mask.bool()

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.gpt2.ln_f(h)

    def head_of_token(self, h: torch.Tensor) -> torch.Tensor:
        raise CoFormerError("GPT-2 is pooled by a sum over the devices (its last token or the mean), not a class token")

    def logits(self, x: torch.Tensor, shares, cr: int) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        return self.teacher.head(pool_features(P.gpt2_states(self.gpt2, ids, shares, cr), mask, self.teacher.pool_kind))


@register("gpt2")
class Gpt2Adapter(TextAdapter):
    name = "gpt2"
    prism_hooks = Gpt2Prism
    architectures = ("GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification")

    def matches_hf(self, hf: Any) -> bool:
        return type(hf).__name__ in self.architectures

    def default_pool(self, hf: Any) -> str:
        return "last"

    def task_head(self, hf: Any):
        return getattr(hf, "score", None)

    def net_config(self, model: TextTeacher) -> dict:
        c = _base(model).config
        if c.scale_attn_by_inverse_layer_idx:
            raise CoFormerError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
        if not c.scale_attn_weights:
            raise CoFormerError("GPT-2 with scale_attn_weights=False is not supported")
        d, L = c.n_embd, c.n_layer
        return {
            "family": "gpt2", "vocab_size": c.vocab_size, "embed_dim": d, "heads": [c.n_head] * L,
            "mlp_dims": [c.n_inner or 4 * d] * L, "head_dim": d // c.n_head, "max_positions": c.n_positions,
            "type_vocab_size": 0, "norm": "layer", "norm_place": "pre", "eps": c.layer_norm_epsilon,
            "emb_norm": False, "final_norm": True, "causal": True, "qkv_bias": True, "proj_bias": True,
            "mlp_bias": True, "gated": False, "act": c.activation_function, "attn_scale": True,
            "rel_bias": None, "pool": model.pool_kind,
        }

    def net_weights(self, model: TextTeacher) -> dict[str, torch.Tensor]:
        b = _base(model)
        d = b.config.n_embd
        w = {"word.weight": b.wte.weight, "pos.weight": b.wpe.weight,
             "final_norm.weight": b.ln_f.weight, "final_norm.bias": b.ln_f.bias}
        for i, blk in enumerate(b.h):
            p = f"blocks.{i}."
            qkv_w, qkv_b = blk.attn.c_attn.weight.t(), blk.attn.c_attn.bias  # Conv1D: [in, out]
            for j, n in enumerate(("q", "k", "v")):
                w[p + f"attn.{n}.weight"] = qkv_w[j * d:(j + 1) * d]
                w[p + f"attn.{n}.bias"] = qkv_b[j * d:(j + 1) * d]
            w[p + "attn.o.weight"], w[p + "attn.o.bias"] = blk.attn.c_proj.weight.t(), blk.attn.c_proj.bias
            w[p + "fc1.weight"], w[p + "fc1.bias"] = blk.mlp.c_fc.weight.t(), blk.mlp.c_fc.bias
            w[p + "fc2.weight"], w[p + "fc2.bias"] = blk.mlp.c_proj.weight.t(), blk.mlp.c_proj.bias
            for ours, theirs in (("norm1", blk.ln_1), ("norm2", blk.ln_2)):
                w[p + f"{ours}.weight"], w[p + f"{ours}.bias"] = theirs.weight, theirs.bias
        return w

    def teacher_features(self, model: TextTeacher, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens.unbind(1)
        out = _base(model)(input_ids=ids, attention_mask=mask)
        return pool_features(out.last_hidden_state, mask, model.pool_kind)
