"""Slicing a :class:`~coformer.compiler.families.textnet.TextNet` into a sub-model, and the
importance of its units (activation magnitude), written once for every language family.
The choices the paper leaves open are in :mod:`coformer.compiler.families.textnet`."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from coformer.compiler.families.textnet import TextNet, last_linear
from coformer.compiler.importance import Importance
from coformer.compiler.specs import SubModelSpec
from coformer.runtime.errors import CoFormerError


@torch.no_grad()
def slice_net(full: TextNet, spec: SubModelSpec) -> TextNet:
    """The standalone sub-model of ``spec``, sliced from the full (teacher-equal) TextNet."""
    c = full.cfg
    K = torch.tensor(spec.channels)
    cfg = dict(c, embed_dim=len(K), heads=list(spec.head_counts), mlp_dims=list(spec.mlp_dims))
    union: list[int] = []
    if c.get("rel_bias"):
        union = sorted({h for heads in spec.heads for h in heads}) or [0]
        cfg["rel_bias"] = dict(c["rel_bias"], columns=len(union))
    sub = TextNet(cfg)
    sub.word.weight.copy_(full.word.weight[:, K])
    for name in ("pos", "typ"):
        if getattr(sub, name) is not None:
            getattr(sub, name).weight.copy_(getattr(full, name).weight[:, K])
    for dst, src in ((sub.emb_norm, full.emb_norm), (sub.final_norm, full.final_norm)):
        if dst is not None:
            copy_norm(dst, src, K)
    if sub.rel is not None:
        # full.rel's columns are teacher heads in order (its blocks' bias_cols are 0..H-1)
        sub.rel.weight.copy_(full.rel.weight[:, torch.tensor(union)])
    if sub.pooler is not None:
        sub.pooler.weight.copy_(full.pooler.weight[K][:, K])
        sub.pooler.bias.copy_(full.pooler.bias[K])
    hd = c["head_dim"]
    for blk, layer, heads, neurons in zip(sub.blocks, spec.layers, spec.heads, spec.neurons):
        t = full.blocks[layer]
        if blk.attn is not None:
            rows = torch.tensor([j * hd + i for j in heads for i in range(hd)])
            copy_norm(blk.norm1, t.norm1, K)
            for n in ("q", "k", "v"):
                _copy_linear(getattr(blk.attn, n), getattr(t.attn, n), rows, K)
            _copy_linear(blk.attn.o, t.attn.o, K, rows)
            if union:
                blk.bias_cols.copy_(torch.tensor([union.index(h) for h in heads]))
        if blk.fc1 is not None:
            N = torch.tensor(neurons)
            copy_norm(blk.norm2, t.norm2, K)
            _copy_linear(blk.fc1, t.fc1, N, K)
            if blk.fc1g is not None:
                _copy_linear(blk.fc1g, t.fc1g, N, K)
            _copy_linear(blk.fc2, t.fc2, K, N)
    return sub.eval()


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[rows][:, cols])
    if dst.bias is not None:
        dst.bias.copy_(src.bias[rows])


def copy_norm(dst: nn.Module, src: nn.Module, K: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[K])
    if dst.bias is not None:
        dst.bias.copy_(src.bias[K])


def sliced_head(head: nn.Module, index: Sequence[int]) -> nn.Module:
    """The teacher's task head restricted to the feature entries ``index`` (for calibration)."""
    lin = last_linear(head)
    if lin is not head:
        raise CoFormerError("a multi-layer task head cannot be sliced; use a linear head")
    out = nn.Linear(len(index), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight[:, torch.tensor(list(index))])
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    return out


@torch.no_grad()
def magnitude(net: TextNet, batches: Iterable[torch.Tensor]) -> Importance:
    """Activation-magnitude importance over the kept (unpadded) tokens, as for ViT:

    head j of layer l: E ||o_j W_o[:, j]^T||, its contribution to the residual stream;
    neuron i of layer l: E |a_i| * ||W_fc2[:, i]||;
    channel c: mean over layers of E |x_c| / E |x| of the block outputs;
    layer l: E ||block(x) - x|| / ||x||.
    """
    c = net.cfg
    L, hd = len(net.blocks), c["head_dim"]
    dev = next(net.parameters()).device  # sums stay where the model runs (a GPU)
    heads = [torch.zeros(h, dtype=torch.float64, device=dev) for h in c["heads"]]
    neurons = [torch.zeros(m, dtype=torch.float64, device=dev) for m in c["mlp_dims"]]
    channels = torch.zeros(c["embed_dim"], dtype=torch.float64, device=dev)
    layers = torch.zeros(L, dtype=torch.float64, device=dev)
    state: dict[str, Any] = {"mask": None, "tokens": 0}
    hooks = []

    def masked(t: torch.Tensor) -> torch.Tensor:
        return t * state["mask"][..., None]

    def on_o(l: int):
        def hook(mod, inp, out):
            o = inp[0]
            H = c["heads"][l]
            W = mod.weight.view(mod.weight.shape[0], H, hd)
            contrib = torch.einsum("bnjt,cjt->bnjc", o.reshape(*o.shape[:2], H, hd), W).norm(dim=-1)
            heads[l].add_((contrib * state["mask"][..., None]).sum(dim=(0, 1)).double())
        return hook

    def on_fc2(l: int):
        def hook(mod, inp, out):
            neurons[l].add_(masked(inp[0].abs()).sum(dim=(0, 1)).double() * mod.weight.norm(dim=0).double())
        return hook

    def on_block(l: int):
        def hook(mod, inp, out):
            x = inp[0]
            rel = (out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
            layers[l] += (rel * state["mask"]).sum().double()
            m = masked(out.abs()).sum(dim=(0, 1)).double()
            channels.add_(m / m.mean().clamp_min(1e-12))
        return hook

    for l, blk in enumerate(net.blocks):
        if blk.attn is not None:
            hooks.append(blk.attn.o.register_forward_hook(on_o(l)))
        if blk.fc2 is not None:
            hooks.append(blk.fc2.register_forward_hook(on_fc2(l)))
        hooks.append(blk.register_forward_hook(on_block(l)))
    try:
        for x in batches:
            x = x.to(dev)
            state["mask"] = x[:, 1].to(torch.float32)
            net(x)
            state["tokens"] += int(x[:, 1].sum())
    finally:
        for h in hooks:
            h.remove()
    return Importance.from_sums(layers, channels, heads, neurons, state["tokens"])


