"""PRISM: position-wise partitioning with Segment Means (issue 23, in part: the strategy's
arithmetic, for timm ViT/DeiT, HF BERT and HF GPT-2; compile, serve and bench are still to come).

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

from coformer.runtime.errors import CoFormerError


def share_positions(n: int, speeds: Sequence[float]) -> list[int]:
    """Positions per device, proportional to ``speeds`` (module doc); sums to ``n``."""
    speeds = [float(s) for s in speeds]
    if not speeds or any(not s > 0 for s in speeds):
        raise CoFormerError(f"device speeds {speeds} must be positive, one per device")
    if n < len(speeds):
        raise CoFormerError(f"{n} positions cannot be shared among {len(speeds)} devices (one each at least)")
    exact = [n * s / sum(speeds) for s in speeds]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(speeds)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # a device too slow for a whole position still gets one, from the largest
        if counts[i] == 0:
            counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
            counts[i] = 1
    return counts


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
    sizes = torch.tensor([min(cr, n - s) for s in range(0, n, cr)], dtype=x.dtype)
    means = torch.stack([x[..., s:s + cr, :].mean(dim=-2) for s in range(0, n, cr)], dim=-2)
    return means, sizes


def segment_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], cr: int,
                      scale: float, causal: bool = False,
                      key_masks: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """PRISM attention of every device's queries (module doc); each list holds one tensor per
    device, ``[B, heads, n_p, head_dim]``. Returns each device's attention output.

    ``key_masks`` (one ``[B, n_p]`` bool per device, True where a position is a real token)
    leave padding out: out of a device's own keys, and out of its segment means, whose
    sizes count real tokens only (a segment of padding alone weighs ``log 0``: nothing)."""
    B = q[0].shape[0]
    masks = list(key_masks) if key_masks is not None else [torch.ones(B, kp.shape[-2], dtype=torch.bool) for kp in k]
    summaries = []
    for kp, vp, m in zip(k, v, masks):
        kv = torch.cat([kp, vp], dim=-1) * m[:, None, :, None]
        sums, counts = segment_means(kv, cr)  # means of the masked values, and the segment lengths
        real, _ = segment_means(m[:, None, :, None].to(kv.dtype), cr)  # share of real tokens per segment
        n_real = real[..., 0] * counts  # [B, 1, segments]
        summaries.append((sums * counts[:, None] / n_real.clamp(min=1)[..., None], torch.log(n_real)))
    out = []
    for p, qp in enumerate(q):
        keys, values, bias = [], [], []
        for j, (kj, vj) in enumerate(zip(k, v)):
            if j == p:
                keys.append(kj)
                values.append(vj)
                bias.append(torch.zeros(B, 1, kj.shape[-2], dtype=qp.dtype).masked_fill(~masks[j][:, None, :],
                                                                                         float("-inf")))
            elif causal and j > p:
                continue  # every position of a later device is later than all of p's
            else:
                (kv, log_n), d = summaries[j], kj.shape[-1]
                keys.append(kv[..., :d])
                values.append(kv[..., d:])
                bias.append(log_n)
        logits = (qp * scale) @ torch.cat(keys, dim=-2).transpose(-2, -1) + torch.cat(bias, dim=-1)[:, :, None, :]
        if causal:  # within its own share, a position sees itself and what precedes it
            n_p, before = qp.shape[-2], sum(b.shape[-1] for b in bias[:p])
            own = torch.ones(n_p, n_p, dtype=torch.bool).tril()
            allowed = torch.cat([torch.ones(n_p, before, dtype=torch.bool), own], dim=1)
            logits = logits.masked_fill(~allowed, float("-inf"))
        out.append(F.softmax(logits, dim=-1) @ torch.cat(values, dim=-2))
    return out


def _vit_block(block, parts: list[torch.Tensor], cr: int, causal: bool = False) -> list[torch.Tensor]:
    """One timm ViT block over the devices' shares, its attention as :func:`segment_attention`."""
    attn = block.attn
    qs, ks, vs, gates = [], [], [], []
    for x in parts:
        h = block.norm1(x)
        B, n, _ = h.shape
        qkv = attn.qkv(h).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        qs.append(attn.q_norm(q))
        ks.append(attn.k_norm(k))
        vs.append(v)
        gates.append(attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None)
    outs = segment_attention(qs, ks, vs, cr, attn.scale, causal)
    new = []
    for x, o, gate in zip(parts, outs, gates):
        B, _, n, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(B, n, -1))
        if gate is not None:
            o = o * gate
        x = x + block.ls1(attn.proj(o))
        new.append(x + block.ls2(block.mlp(block.norm2(x))))
    return new


@torch.no_grad()
def prism_vit_forward(model, x: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """A timm ViT/DeiT's logits with its positions partitioned into ``shares`` (positions per
    device, in order, summing to the token count) at compression rate ``cr`` (module doc)."""
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


@torch.no_grad()
def prism_gpt2_forward(model, input_ids: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
    """A HF GPT-2's last hidden states (after ``ln_f``, ``[B, T, d]``) with its positions
    partitioned into ``shares`` at compression rate ``cr``, under the partition-aware causal
    mask (module doc). ``model`` is a ``GPT2Model`` or any GPT-2 with a ``transformer``."""
    tr = getattr(model, "transformer", model)
    if not hasattr(tr, "wte") or not hasattr(tr, "h"):
        raise CoFormerError(f"PRISM's GPT-2 forward takes a HF GPT-2; got {type(model).__name__}")
    h = tr.drop(tr.wte(input_ids) + tr.wpe(torch.arange(input_ids.shape[1]).unsqueeze(0)))
    parts = split_shares(h, shares)
    for i, block in enumerate(tr.h):
        attn = block.attn
        scale = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
        if attn.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        qs, ks, vs = [], [], []
        for x in parts:
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
            qs.append(_heads(q, attn.head_dim))
            ks.append(_heads(k, attn.head_dim))
            vs.append(_heads(v, attn.head_dim))
        outs = segment_attention(qs, ks, vs, cr, scale, causal=True)
        new = []
        for x, o in zip(parts, outs):
            B, _, n, _ = o.shape
            x = x + attn.resid_dropout(attn.c_proj(o.transpose(1, 2).reshape(B, n, -1)))
            new.append(x + block.mlp(block.ln_2(x)))
        parts = new
    return tr.ln_f(torch.cat(parts, dim=1))


@torch.no_grad()
def prism_bert_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shares: Sequence[int], cr: int,
                       token_type_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A HF BERT's last hidden states and pooler output with its positions partitioned into
    ``shares`` at compression rate ``cr`` (module doc). Padding (``attention_mask == 0``) is
    left out of every device's keys and segment means. The pooler reads the class token, on
    the first device."""
    bert = getattr(model, "bert", model)
    if not hasattr(bert, "embeddings") or not hasattr(bert, "encoder"):
        raise CoFormerError(f"PRISM's BERT forward takes a HF BERT; got {type(model).__name__}")
    h = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    parts = split_shares(h, shares)
    masks = list(torch.split(attention_mask.bool(), list(shares), dim=1))
    for layer in bert.encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        qs, ks, vs = [], [], []
        for x in parts:
            qs.append(_heads(sa.query(x), sa.attention_head_size))
            ks.append(_heads(sa.key(x), sa.attention_head_size))
            vs.append(_heads(sa.value(x), sa.attention_head_size))
        outs = segment_attention(qs, ks, vs, cr, sa.scaling, key_masks=masks)
        new = []
        for x, o in zip(parts, outs):
            B, _, n, _ = o.shape
            a = so.LayerNorm(so.dense(o.transpose(1, 2).reshape(B, n, -1)) + x)
            new.append(layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a))
        parts = new
    hidden = torch.cat(parts, dim=1)
    return hidden, (bert.pooler(hidden) if bert.pooler is not None else None)


def communication(shares: Sequence[int], cr: int, embed_dim: int, depth: int, via: str = "central",
                  bytes_per_value: int = 4) -> dict[str, float]:
    """Bytes and rounds one inference exchanges (module doc): per layer, each device's K and V
    segment means (``2 * embed_dim`` values per segment) reach every other device."""
    if via not in ("central", "direct"):
        raise CoFormerError(f"via {via!r} is not one of ['central', 'direct']")
    P = len(shares)

    def exchanged(segments: Sequence[int]) -> int:
        sent = [2 * embed_dim * m * bytes_per_value for m in segments]
        if via == "direct":
            return sum(x * (P - 1) for x in sent)
        # each worker sends its means up once; the central node forwards everyone's to each worker
        return sum(sent[1:]) + sum(sum(sent) - sent[w] for w in range(1, P))

    per_layer = exchanged([math.ceil(n / cr) for n in shares])
    uncompressed = exchanged(list(shares))
    return {"bytes_per_inference": float(per_layer * depth), "rounds_per_inference": float(depth),
            "uncompressed_bytes": float(uncompressed * depth),
            "reduction": 1 - per_layer / uncompressed if uncompressed else 0.0}
