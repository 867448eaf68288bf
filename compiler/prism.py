"""PRISM: position-wise partitioning with Segment Means (issue 23): the strategy's arithmetic,
for timm ViT/DeiT, HF BERT and HF GPT-2 (the served bundle is :mod:`coformer.compiler.prism_bundle`,
its optional fine-tuning :mod:`coformer.compiler.prism_finetune`).

Qazi, Iosifidis and Zhang, "PRISM: Distributed Inference for Foundation Models at Edge"
(arXiv 2507.12145; the abstract is ``../shared/paper/prism-abstract.txt``). Every device
holds the whole model and runs a contiguous share of the token positions through every
layer; in each layer's attention it needs the other devices' keys and values, and receives
them compressed as **Segment Means**. The abstract leaves the details open; the choices,
written down:

* **Shares by compute** (:func:`share_positions`): device ``p`` of relative speed ``s_p``
  gets ``round(N s_p / sum s)`` positions by largest remainder, at least one each, in
  device order, so the first device (the central node) holds position 0: the class token.
* **What is averaged: keys and values** (:func:`segment_means`). A device computes K and V
  of its own positions only and sends, per layer, the means of its K and V over segments of
  ``CR`` consecutive positions (the last segment may be shorter). So no device computes a
  key or value for a position it does not own, which is the redundancy the abstract's
  restructured attention removes (naive position-wise partitioning ships the other
  positions' hidden states and every device recomputes their K/V). Averaging the layer
  input instead would halve the bytes but make every receiver recompute K/V for the means,
  and LayerNorm does not commute with the mean.
* **Attention over own tokens and others' means** (:func:`segment_attention`). A query
  attends to its own device's keys in full and to every other device's segment means, each
  mean's logit raised by ``log(segment size)``: a mean stands for that many positions, as
  if its key were repeated, so the softmax's mass per device is kept (with CR = 1 every
  segment is one position and the attention is exactly the teacher's).
* **Partition-aware causal mask** (``causal=True``, for GPT-2): within its own share a
  position attends to positions at or before it; it attends to every segment of devices
  before it, whose positions are all earlier, and to none of the devices after it, so a
  position never sees a segment holding a later position, at any CR.
* **Pooling.** The class token lives on the first device, so the head runs there on its
  final hidden state; an average-pooled model's head takes each device's token sum (one
  vector per device, exact).
* **Communication** (:func:`communication`): one exchange per layer (``rounds = depth``);
  each device's K and V means go to every other device, through the central node
  (``via="central"``: the central node receives every worker's and forwards to the rest)
  or directly. Counted in float32 bytes.

With CR = 1 the partitioned forward reproduces the teacher (``tests/compiler/test_prism.py``:
max abs diff <= 1e-5); CR > 1 is the approximation whose accuracy the bench will measure.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from coformer.compiler.apportion import apportion
from coformer.runtime.errors import CoFormerError


def share_positions(n: int, speeds: Sequence[float]) -> list[int]:
    """Positions per device, proportional to ``speeds`` (module doc); sums to ``n``."""
    speeds = [float(s) for s in speeds]
    if not speeds or any(not s > 0 for s in speeds):
        raise CoFormerError(f"device speeds {speeds} must be positive, one per device")
    if n < len(speeds):
        raise CoFormerError(f"{n} positions cannot be shared among {len(speeds)} devices (one each at least)")
    return apportion(n, speeds, 1)  # a device too slow for a whole position still gets one, from the largest


def split_shares(h: torch.Tensor, shares: Sequence[int]) -> list[torch.Tensor]:
    """``h`` (``[B, T, d]``) cut into the devices' contiguous shares of its positions."""
    if sum(shares) != h.shape[1] or any(s < 1 for s in shares):
        raise CoFormerError(f"shares {list(shares)} must be positive and sum to the {h.shape[1]} positions")
    return list(torch.split(h, list(shares), dim=1))


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, n, heads * head_dim]`` -> ``[B, heads, n, head_dim]``."""
    B, n, _ = t.shape
    return t.view(B, n, -1, head_dim).transpose(1, 2)


def segment_means(x: torch.Tensor, cr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``x`` (``[..., n, d]``) over segments of ``cr`` consecutive positions, and each
    segment's size (the last may be shorter): ``[..., ceil(n / cr), d]``, ``[ceil(n / cr)]``."""
    if int(cr) < 1:
        raise CoFormerError(f"compression rate {cr} must be >= 1")
    n = x.shape[-2]
    sizes = torch.tensor([min(cr, n - s) for s in range(0, n, cr)], dtype=x.dtype, device=x.device)
    means = torch.stack([x[..., s:s + cr, :].mean(dim=-2) for s in range(0, n, cr)], dim=-2)
    return means, sizes


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool (True: a real token) -> the logit bias ``[B, 1, n]``: 0, or -inf for padding."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))[:, None, :]


def summarize(k: torch.Tensor, v: torch.Tensor, cr: int,
              mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What one device sends of a layer (module doc): the Segment Means of its keys and values,
    ``[B, heads, ceil(n / cr), 2 * head_dim]`` (K then V on the last axis), over real tokens
    only when ``mask`` (``[B, n]`` bool) is given, and each mean's bias ``log(real positions)``,
    ``[B, 1, segments]`` (``-inf`` for a segment of padding alone: it weighs nothing)."""
    B = k.shape[0]
    m = torch.ones(B, k.shape[-2], dtype=torch.bool, device=k.device) if mask is None else mask
    kv = torch.cat([k, v], dim=-1) * m[:, None, :, None].to(k.dtype)
    means, sizes = segment_means(kv, cr)  # means of the masked values, and the segment lengths
    real, _ = segment_means(m[:, None, :, None].to(k.dtype), cr)  # share of real tokens per segment
    n_real = real[..., 0] * sizes  # [B, 1, segments]
    return means * sizes[:, None] / n_real.clamp(min=1)[..., None], torch.log(n_real)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own_bias: torch.Tensor, scale: float,
           others: Optional[torch.Tensor] = None, others_bias: Optional[torch.Tensor] = None,
           causal: bool = False) -> torch.Tensor:
    """One device's PRISM attention (module doc): its queries ``q`` over its own keys and values
    (``[B, heads, n, head_dim]``, ``own_bias`` ``[B, 1, n]`` from :func:`key_bias`) and over
    ``others``, the other devices' summaries (:func:`summarize`) concatenated on the segment axis,
    with their ``others_bias``. With ``causal`` a position sees only itself and what precedes it
    in its own share; ``others`` must then hold only earlier devices' segments."""
    keys, values, bias = k, v, own_bias
    if others is not None and others.shape[-2] > 0:
        d = k.shape[-1]
        keys = torch.cat([k, others[..., :d]], dim=-2)
        values = torch.cat([v, others[..., d:]], dim=-2)
        bias = torch.cat([own_bias, others_bias], dim=-1)
    logits = (q * scale) @ keys.transpose(-2, -1) + bias[:, :, None, :]
    if causal:
        n = q.shape[-2]
        allowed = torch.cat([torch.ones(n, n, dtype=torch.bool, device=q.device).tril(),
                             torch.ones(n, keys.shape[-2] - n, dtype=torch.bool, device=q.device)], dim=1)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return F.softmax(logits, dim=-1) @ values


def segment_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], cr: int,
                      scale: float, causal: bool = False,
                      key_masks: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """PRISM attention of every device's queries (module doc); each list holds one tensor per
    device, ``[B, heads, n_p, head_dim]``. Returns each device's attention output: what
    :func:`attend` gives each device after the exchange of :func:`summarize`'s means.

    ``key_masks`` (one ``[B, n_p]`` bool per device, True where a position is a real token)
    leave padding out: out of a device's own keys, and out of its segment means, whose
    sizes count real tokens only (a segment of padding alone weighs ``log 0``: nothing)."""
    B = q[0].shape[0]
    masks = list(key_masks) if key_masks is not None else [torch.ones(B, kp.shape[-2], dtype=torch.bool, device=kp.device) for kp in k]
    summaries = [summarize(kp, vp, cr, m) for kp, vp, m in zip(k, v, masks)]
    out = []
    for p, qp in enumerate(q):
        seen = [j for j in range(len(q)) if j != p and not (causal and j > p)]  # a later device: all later
        others = torch.cat([summaries[j][0] for j in seen], dim=-2) if seen else None
        others_bias = torch.cat([summaries[j][1] for j in seen], dim=-1) if seen else None
        out.append(attend(qp, k[p], v[p], key_bias(masks[p]), scale, others, others_bias, causal))
    return out


def vit_qkv(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ViT block's queries, keys and values of the positions ``x`` (``[B, heads, n, hd]``)."""
    attn = block.attn
    B, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def vit_finish(block, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a timm ViT block, from its attention's output ``o`` (``[B, heads, n, hd]``)."""
    attn = block.attn
    B, _, n, _ = o.shape
    o = attn.norm(o.transpose(1, 2).reshape(B, n, -1))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(block.norm1(x)).sigmoid()
    x = x + block.ls1(attn.proj(o))
    return x + block.ls2(block.mlp(block.norm2(x)))


def bert_qkv(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A HF BERT layer's queries, keys and values of the positions ``x``."""
    sa = layer.attention.self
    return tuple(_heads(f(x), sa.attention_head_size) for f in (sa.query, sa.key, sa.value))


def bert_finish(layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a HF BERT layer, from its attention's output ``o``."""
    so = layer.attention.output
    B, _, n, _ = o.shape
    a = so.LayerNorm(so.dense(o.transpose(1, 2).reshape(B, n, -1)) + x)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)


def bert_scale(layer) -> float:
    sa = layer.attention.self
    return float(getattr(sa, "scaling", sa.attention_head_size ** -0.5))


def _vit_block(block, parts: list[torch.Tensor], cr: int, causal: bool = False) -> list[torch.Tensor]:
    """One timm ViT block over the devices' shares, its attention as :func:`segment_attention`."""
    qs, ks, vs = zip(*[vit_qkv(block, x) for x in parts])
    outs = segment_attention(qs, ks, vs, cr, block.attn.scale, causal)
    return [vit_finish(block, x, o) for x, o in zip(parts, outs)]


@torch.no_grad()
def prism_vit_forward(model, x: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """A timm ViT/DeiT's logits with its positions partitioned into ``shares`` (positions per
    device, in order, summing to the token count) at compression rate ``cr`` (module doc).
    Without autograd; :func:`vit_logits` is the same forward with it (fine-tuning)."""
    return vit_logits(model, x, shares, cr)


def vit_logits(model, x: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """:func:`prism_vit_forward`, differentiable: what :mod:`coformer.compiler.prism_finetune` trains."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise CoFormerError(f"PRISM takes timm ViT/DeiT models here; got {type(model).__name__}")
    if model.global_pool not in ("token", "avg"):
        raise CoFormerError(f"PRISM pools by the class token or the average; this model pools by "
                            f"{model.global_pool!r}")
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    parts = split_shares(h, shares)
    for block in model.blocks:
        parts = _vit_block(block, parts, cr)
    parts = [model.norm(p) for p in parts]
    if model.global_pool == "token":
        pooled = parts[0][:, 0]  # the class token: on the first device
    else:
        skip = model.num_prefix_tokens
        pooled = (sum(p.sum(dim=1) for p in parts) - torch.cat(parts, 1)[:, :skip].sum(dim=1)) / (h.shape[1] - skip)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def gpt2_qkv(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A HF GPT-2 block's queries, keys and values of the positions ``x``."""
    attn = block.attn
    q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
    return _heads(q, attn.head_dim), _heads(k, attn.head_dim), _heads(v, attn.head_dim)


def gpt2_finish(block, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a HF GPT-2 block, from its attention's output ``o``."""
    attn = block.attn
    B, _, n, _ = o.shape
    x = x + attn.resid_dropout(attn.c_proj(o.transpose(1, 2).reshape(B, n, -1)))
    return x + block.mlp(block.ln_2(x))


def gpt2_scale(block, index: int) -> float:
    """Block ``index``'s attention scale (GPT-2's two config switches)."""
    attn = block.attn
    scale = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
    return scale / float(index + 1) if attn.scale_attn_by_inverse_layer_idx else scale


def gpt2_embed(tr, input_ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's first hidden states; positions count from 0 (texts are right-padded)."""
    return tr.drop(tr.wte(input_ids) + tr.wpe(torch.arange(input_ids.shape[1], device=input_ids.device)[None]))


@torch.no_grad()
def prism_gpt2_forward(model, input_ids: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """A HF GPT-2's last hidden states (after ``ln_f``, ``[B, T, d]``) with its positions
    partitioned into ``shares`` at compression rate ``cr``, under the partition-aware causal
    mask (module doc). ``model`` is a ``GPT2Model`` or any GPT-2 with a ``transformer``.
    Without autograd; :func:`gpt2_states` is the same forward with it."""
    return gpt2_states(model, input_ids, shares, cr)


def gpt2_states(model, input_ids: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """:func:`prism_gpt2_forward`, differentiable. Right padding needs no mask here: under the
    causal mask a real token sees only earlier positions, which are all real."""
    tr = getattr(model, "transformer", model)
    if not hasattr(tr, "wte") or not hasattr(tr, "h"):
        raise CoFormerError(f"PRISM's GPT-2 forward takes a HF GPT-2; got {type(model).__name__}")
    parts = split_shares(gpt2_embed(tr, input_ids), shares)
    for i, block in enumerate(tr.h):
        qs, ks, vs = zip(*[gpt2_qkv(block, x) for x in parts])
        outs = segment_attention(qs, ks, vs, cr, gpt2_scale(block, i), causal=True)
        parts = [gpt2_finish(block, x, o) for x, o in zip(parts, outs)]
    return tr.ln_f(torch.cat(parts, dim=1))


@torch.no_grad()
def prism_bert_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shares: Sequence[int], cr: int,
                       token_type_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A HF BERT's last hidden states and pooler output with its positions partitioned into
    ``shares`` at compression rate ``cr`` (module doc). Padding (``attention_mask == 0``) is
    left out of every device's keys and segment means. The pooler reads the class token, on
    the first device. Without autograd; :func:`bert_states` is the same forward with it."""
    return bert_states(model, input_ids, attention_mask, shares, cr, token_type_ids)


def bert_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shares: Sequence[int], cr: int,
                token_type_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`prism_bert_forward`, differentiable: what :mod:`coformer.compiler.prism_finetune` trains."""
    bert = getattr(model, "bert", model)
    if not hasattr(bert, "embeddings") or not hasattr(bert, "encoder"):
        raise CoFormerError(f"PRISM's BERT forward takes a HF BERT; got {type(model).__name__}")
    h = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    parts = split_shares(h, shares)
    masks = list(torch.split(attention_mask.bool(), list(shares), dim=1))
    for layer in bert.encoder.layer:
        qs, ks, vs = zip(*[bert_qkv(layer, x) for x in parts])
        outs = segment_attention(qs, ks, vs, cr, bert_scale(layer), key_masks=masks)
        parts = [bert_finish(layer, x, o) for x, o in zip(parts, outs)]
    hidden = torch.cat(parts, dim=1)
    return hidden, (bert.pooler(hidden) if bert.pooler is not None else None)


def communication(shares: Sequence[int], cr: int, embed_dim: int, depth: int, via: str = "central",
                  bytes_per_value: int = 4, workers_skip_last: bool = False, sums: int = 0) -> dict[str, float]:
    """Bytes and rounds one inference exchanges (module doc): per layer, each device's K and V
    segment means (``2 * embed_dim`` values per segment) reach every other device.

    As served (:mod:`coformer.compiler.prism_bundle`): with ``workers_skip_last`` (a class-token
    model, whose answer is on the central node) the last layer's means only reach the central
    node; with ``sums`` (mean pooling) every worker then sends that many values of its share's
    pooled sum, in one more round."""
    if via not in ("central", "direct"):
        raise CoFormerError(f"via {via!r} is not one of ['central', 'direct']")
    P = len(shares)

    def exchanged(segments: Sequence[int], to_workers: bool = True) -> int:
        sent = [2 * embed_dim * m * bytes_per_value for m in segments]
        if not to_workers:  # every worker's means reach the central node only
            return sum(sent[1:])
        if via == "direct":
            return sum(x * (P - 1) for x in sent)
        # each worker sends its means up once; the central node forwards everyone's to each worker
        return sum(sent[1:]) + sum(sum(sent) - sent[w] for w in range(1, P))

    def total(segments: Sequence[int]) -> int:
        return (exchanged(segments) * (depth - 1) + exchanged(segments, not workers_skip_last)
                + (P - 1) * sums * bytes_per_value)

    compressed = total([math.ceil(n / cr) for n in shares])
    uncompressed = total(list(shares))
    return {"bytes_per_inference": float(compressed), "rounds_per_inference": float(depth + (1 if sums else 0)),
            "uncompressed_bytes": float(uncompressed),
            "reduction": 1 - compressed / uncompressed if uncompressed else 0.0}
