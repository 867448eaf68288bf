"""timm SwinTransformer (v1) family: a hierarchical vision transformer of
stages, each a patch merging (after the first) and shifted-window blocks.

Decomposition is per stage, as the paper decomposes Swin (§IV, Table II):
which blocks of each stage are kept (layer indices run over all stages in
order), the heads and MLP neurons of every kept block, and the channels of
every stage (``SubModelSpec.channels`` for the first stage, the patch
embedding's, and ``stage_channels`` for the others). A sub-model is a
:class:`SubSwin`, mapping the image to the teacher's pooled feature (final
norm, then the mean over the last stage's grid) restricted to the last stage's
kept channels.

Choices the paper leaves open, written down here:

* Channels are chosen per stage, independently: a patch merging concatenates
  the 2x2 neighbours' kept channels of the stage before (4 d_{s-1} values) and
  its projection keeps the rows of the next stage's kept channels, so any
  pair of channel sets slices consistently. Its LayerNorm keeps the affine
  parameters of the concatenated kept channels and normalises over them.
* A stage that keeps no block keeps its patch merging: the grid still halves,
  so the window sizes, shifts and attention masks of later blocks stay the
  teacher's.
* A kept block keeps its window size, its shift and its shifted-window mask;
  the relative position bias table keeps the columns of the kept heads.
* As for ViT: norms over kept channels only, the teacher's head dimension, and
  a block that keeps no head (no neuron) drops that branch with its norm.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from coformer.compiler.families.base import register
from coformer.compiler.families.vit import ImageAdapter, copy_norm, head_rows_cols, slice_inputs
from coformer.compiler.importance import Importance
from coformer.compiler.specs import SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError


def _partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * windows, wh * ww, C] (timm's window_partition, batch axis left free)."""
    _, H, W, C = x.shape
    x = x.reshape(-1, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def _reverse(x: torch.Tensor, wh: int, ww: int, H: int, W: int) -> torch.Tensor:
    """[B * windows, wh * ww, C] -> [B, H, W, C] (timm's window_reverse)."""
    C = x.shape[-1]
    x = x.reshape(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


class _WindowAttention(nn.Module):
    """timm's window attention on a subset of heads, with their relative position bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: tuple[int, int], qkv_bias: bool) -> None:
        super().__init__()
        from timm.models.swin_transformer import get_relative_position_index

        wh, ww = window
        self.heads, self.head_dim, self.area = heads, head_dim, wh * ww
        self.scale = head_dim ** -0.5
        self.fused_attn = True
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        self.register_buffer("relative_position_index", get_relative_position_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        N = self.area
        qkv = self.qkv(x).reshape(-1, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, self.heads).permute(2, 0, 1).unsqueeze(0)  # [1, heads, N, N]
        if self.fused_attn:
            if mask is not None:  # [windows, N, N] -> [B * windows, heads, N, N], windows vary fastest
                windows = mask.shape[0]
                bias = (bias.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(
                    q.shape[0] // windows, -1, -1, -1, -1).reshape(-1, self.heads, N, N)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:  # the exported form (coformer.compiler.lower): the batch axis stays free
            s = (q * self.scale) @ k.transpose(-2, -1) + bias
            if mask is not None:
                s = (s.view(-1, mask.shape[0], self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, N, N)
            y = s.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(-1, N, self.heads * self.head_dim))


class _Block(nn.Module):
    """A shifted-window block whose attention or MLP branch may be absent (0 heads / 0 neurons)."""

    def __init__(self, dim: int, heads: int, mlp: int, cfg: dict, block: dict) -> None:
        super().__init__()
        eps = cfg["eps"]
        self.window, self.shift = tuple(block["window"]), tuple(block["shift"])
        self.norm1 = nn.LayerNorm(dim, eps=eps) if heads else None
        self.attn = _WindowAttention(dim, heads, block["head_dim"], self.window, cfg["qkv_bias"]) if heads else None
        if heads and any(self.shift):
            self.register_buffer("attn_mask", torch.zeros(block["mask_windows"], *(2 * [self.window[0] * self.window[1]])))
        else:
            self.attn_mask = None
        self.norm2 = nn.LayerNorm(dim, eps=eps) if mlp else None
        self.fc1 = nn.Linear(dim, mlp) if mlp else None
        self.act = nn.GELU(approximate=cfg["gelu"])
        self.fc2 = nn.Linear(mlp, dim) if mlp else None

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        y = _reverse(self.attn(_partition(x, wh, ww), self.attn_mask), wh, ww, Hp, Wp)[:, :H, :W, :]
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self._attn(self.norm1(x))
        if self.fc1 is not None:
            x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class _Merge(nn.Module):
    """Patch merging: the 2x2 neighbours' kept channels concatenated, normed, projected."""

    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim, eps=eps)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(-1, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SubSwin(nn.Module):
    """A decomposed Swin: image -> pooled feature X_n (paper eq. 2's input), built from a
    plain config (see :func:`_config`) so it is rebuilt without the teacher."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        widths, eps, p = cfg["widths"], cfg["eps"], cfg["patch_size"]
        self.patch = nn.Conv2d(cfg["in_chans"], widths[0], p, p, bias=cfg["patch_bias"])
        self.patch_norm = nn.LayerNorm(widths[0], eps=eps) if cfg["patch_norm"] else nn.Identity()
        self.merges = nn.ModuleList(_Merge(widths[s - 1], widths[s], eps) for s in range(1, len(widths)))
        self.stages = nn.ModuleList(
            nn.ModuleList(_Block(widths[s], b["heads"], b["mlp"], cfg, b) for b in cfg["blocks"][s])
            for s in range(len(widths)))
        self.norm = nn.LayerNorm(widths[-1], eps=eps)

    @property
    def feature_dim(self) -> int:
        return self.cfg["widths"][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        for s, blocks in enumerate(self.stages):
            if s:
                x = self.merges[s - 1](x)
            for blk in blocks:
                x = blk(x)
        return self.norm(x).mean(dim=(1, 2))


def check_supported(model: nn.Module) -> None:
    from timm.layers import PatchEmbed
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

    def no(what: str) -> CoFormerError:
        return CoFormerError(f"this Swin uses {what}, which CoFormer cannot decompose yet")

    if getattr(model, "dynamic_img_size", False):
        raise no("dynamic_img_size (strict_img_size=False)")
    if model.global_pool != "avg":
        raise no(f"global_pool={model.global_pool!r} (supported: 'avg')")
    if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.norm, (nn.LayerNorm, nn.Identity)):
        raise no("a patch embedding other than timm's PatchEmbed")
    if not isinstance(model.norm, nn.LayerNorm):
        raise no(f"a final norm {type(model.norm).__name__}")
    for s, stage in enumerate(model.layers):
        if s and type(stage.downsample) is not PatchMerging:
            raise no(f"downsampling {type(stage.downsample).__name__} in stage {s}")
        for i, blk in enumerate(stage.blocks):
            where = f"stage {s} block {i}"
            if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                raise no(f"block type {type(blk).__name__} in {where}")
            if getattr(blk, "dynamic_mask", False):
                raise no(f"dynamic attention masks in {where}")
            if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                raise no(f"norms other than LayerNorm in {where}")
            mlp = blk.mlp
            if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or not isinstance(mlp.act, nn.GELU):
                raise no(f"an MLP other than fc1-GELU-fc2 in {where}")
            if blk.attn.proj.bias is None or mlp.fc1.bias is None or mlp.fc2.bias is None:
                raise no(f"projections without bias in {where}")


def _blocks(model: nn.Module) -> list:
    return [blk for stage in model.layers for blk in stage.blocks]


def _head_dim(blk) -> int:
    return blk.attn.qkv.out_features // 3 // blk.attn.num_heads


def _config(model: nn.Module, spec: SubModelSpec, shape: TransformerShape) -> dict:
    blocks = _blocks(model)
    kept = dict(zip(spec.layers, zip(spec.head_counts, spec.mlp_dims)))
    per_stage, layer = [], 0
    for depth in shape.stage_depths:
        stage = []
        for _ in range(depth):
            if layer in kept:
                t = blocks[layer]
                mask = t.attn_mask
                stage.append({"layer": layer, "heads": kept[layer][0], "mlp": kept[layer][1],
                              "head_dim": _head_dim(t), "window": list(t.window_size), "shift": list(t.shift_size),
                              "mask_windows": int(mask.shape[0]) if mask is not None else 0})
            layer += 1
        per_stage.append(stage)
    pe = model.patch_embed
    return {
        "in_chans": pe.proj.in_channels, "patch_size": pe.proj.kernel_size[0], "patch_bias": pe.proj.bias is not None,
        "patch_norm": isinstance(pe.norm, nn.LayerNorm), "img_size": list(pe.img_size),
        "widths": list(spec.stage_widths), "blocks": per_stage, "qkv_bias": blocks[0].attn.qkv.bias is not None,
        "gelu": blocks[0].mlp.act.approximate, "eps": blocks[0].norm1.eps,
    }


@register("swin")
class SwinAdapter(ImageAdapter):
    """Adapter for timm ``SwinTransformer`` (v1)."""

    name = "swin"

    def matches(self, model: Any) -> bool:
        try:
            from timm.models.swin_transformer import SwinTransformer
        except ImportError:
            return False
        return isinstance(model, SwinTransformer)

    def read_shape(self, model: nn.Module) -> TransformerShape:
        check_supported(model)
        blocks = _blocks(model)
        head_dims = [_head_dim(stage.blocks[0]) for stage in model.layers]
        pe = model.patch_embed
        return TransformerShape(
            family=self.name,
            embed_dim=int(model.layers[0].blocks[0].norm1.normalized_shape[0]),
            heads=tuple(b.attn.num_heads for b in blocks),
            head_dim=head_dims[0],
            mlp_dims=tuple(b.mlp.fc1.out_features for b in blocks),
            num_tokens=int(pe.grid_size[0] * pe.grid_size[1]),
            num_prefix_tokens=0,
            patch_in_features=pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1],
            num_classes=model.num_classes,
            extras={"stage_res": [list(s.output_resolution) for s in model.layers],
                    "windows": [list(s.blocks[0].window_size) for s in model.layers], "head_dims": head_dims,
                    "qkv_bias": blocks[0].attn.qkv.bias is not None, "patch_norm": isinstance(pe.norm, nn.LayerNorm),
                    "pool": "avg"},
            stage_dims=tuple(int(s.blocks[0].norm1.normalized_shape[0]) for s in model.layers),
            stage_depths=tuple(len(s.blocks) for s in model.layers),
        )

    # -- slicing ---------------------------------------------------------
    @torch.no_grad()
    def slice(self, model: nn.Module, spec: SubModelSpec) -> SubSwin:
        """Build the standalone sub-model of ``spec`` from the teacher's real weights."""
        shape = self.read_shape(model)
        spec.validate(shape)
        cfg = _config(model, spec, shape)
        sub = SubSwin(cfg)
        K = [torch.tensor(c) for c in spec.all_channels]
        pe = model.patch_embed
        sub.patch.weight.copy_(pe.proj.weight[K[0]])
        if sub.patch.bias is not None:
            sub.patch.bias.copy_(pe.proj.bias[K[0]])
        if isinstance(sub.patch_norm, nn.LayerNorm):
            copy_norm(sub.patch_norm, pe.norm, K[0])
        blocks = _blocks(model)
        neurons = dict(zip(spec.layers, spec.neurons))
        heads_of = dict(zip(spec.layers, spec.heads))
        for s, stage in enumerate(sub.stages):
            if s:
                t = model.layers[s].downsample
                C = model.layers[s - 1].blocks[0].norm1.normalized_shape[0]
                merged = torch.cat([g * C + K[s - 1] for g in range(4)])
                copy_norm(sub.merges[s - 1].norm, t.norm, merged)
                sub.merges[s - 1].reduction.weight.copy_(t.reduction.weight[K[s]][:, merged])
            for blk, b in zip(stage, cfg["blocks"][s]):
                t = blocks[b["layer"]]
                if blk.attn is not None:
                    heads = torch.tensor(heads_of[b["layer"]])
                    rows, cols = head_rows_cols(heads.tolist(), t.attn.num_heads, b["head_dim"])
                    copy_norm(blk.norm1, t.norm1, K[s])
                    blk.attn.qkv.weight.copy_(t.attn.qkv.weight[rows][:, K[s]])
                    if t.attn.qkv.bias is not None:
                        blk.attn.qkv.bias.copy_(t.attn.qkv.bias[rows])
                    blk.attn.relative_position_bias_table.copy_(t.attn.relative_position_bias_table[:, heads])
                    blk.attn.proj.weight.copy_(t.attn.proj.weight[K[s]][:, cols])
                    blk.attn.proj.bias.copy_(t.attn.proj.bias[K[s]])
                    if blk.attn_mask is not None:
                        blk.attn_mask.copy_(t.attn_mask)
                if blk.fc1 is not None:
                    N = torch.tensor(neurons[b["layer"]])
                    copy_norm(blk.norm2, t.norm2, K[s])
                    blk.fc1.weight.copy_(t.mlp.fc1.weight[N][:, K[s]])
                    blk.fc1.bias.copy_(t.mlp.fc1.bias[N])
                    blk.fc2.weight.copy_(t.mlp.fc2.weight[K[s]][:, N])
                    blk.fc2.bias.copy_(t.mlp.fc2.bias[K[s]])
        copy_norm(sub.norm, model.norm, K[-1])
        return sub.eval()

    # -- heads -----------------------------------------------------------
    def teacher_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The teacher's pooled pre-logits feature (what a full-spec sub-model returns)."""
        return model.forward_head(model.forward_features(x), pre_logits=True)

    def teacher_head(self, model: nn.Module) -> nn.Module:
        return model.head.fc

    def feature_index(self, model: nn.Module, spec: SubModelSpec) -> list[int]:
        return list(spec.all_channels[-1])

    def submodel_head(self, model: nn.Module, spec: SubModelSpec) -> nn.Module:
        return slice_inputs(model.head.fc, torch.tensor(spec.all_channels[-1]))

    # -- importance ------------------------------------------------------
    @torch.no_grad()
    def importance(self, model: nn.Module, batches: Iterable[torch.Tensor], method: Any = "magnitude") -> Importance:
        """Rank heads, neurons, channels of every stage and layers (as for ViT, see there)."""
        if callable(method):
            return method(model, batches).check(self.read_shape(model))
        if method != "magnitude":
            raise CoFormerError(f"importance method {method!r} is not available for Swin; use one of ['magnitude']")
        return _magnitude(model, batches, self.read_shape(model))


def _magnitude(model: nn.Module, batches: Iterable[torch.Tensor], shape: TransformerShape) -> Importance:
    """Activation magnitude, as ViT's (:func:`coformer.compiler.families.vit._magnitude`), each
    sum divided by its own stage's token count; a stage's channel scores come from its blocks."""
    blocks = _blocks(model)
    dev = next(model.parameters()).device  # sums stay where the model runs (a GPU)
    heads = [torch.zeros(b.attn.num_heads, dtype=torch.float64, device=dev) for b in blocks]
    neurons = [torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64, device=dev) for b in blocks]
    channels = [torch.zeros(c, dtype=torch.float64, device=dev) for c in shape.stage_dims]
    layers = torch.zeros(len(blocks), dtype=torch.float64, device=dev)
    tokens = torch.zeros(len(blocks), dtype=torch.float64, device=dev)
    hooks = []

    def on_proj(l: int):
        blk = blocks[l]

        def hook(mod, inp, out):
            o = inp[0]  # [B * windows, N, H * hd]
            H, hd = blk.attn.num_heads, _head_dim(blk)
            W = mod.weight.view(mod.weight.shape[0], H, hd)
            contrib = torch.einsum("bnjt,cjt->bnjc", o.reshape(*o.shape[:2], H, hd), W)
            heads[l].add_(contrib.norm(dim=-1).sum(dim=(0, 1)).double())

        return hook

    def on_fc2(l: int):
        def hook(mod, inp, out):
            a = inp[0].abs().reshape(-1, inp[0].shape[-1]).sum(dim=0).double()
            neurons[l].add_(a * mod.weight.norm(dim=0).double())

        return hook

    def on_block(l: int):
        s = shape.stage_of(l)

        def hook(mod, inp, out):
            x = inp[0]
            layers[l] += ((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().double()
            tokens[l] += x.numel() // x.shape[-1]
            m = out.abs().reshape(-1, out.shape[-1]).sum(dim=0).double()
            channels[s].add_(m / m.mean().clamp_min(1e-12))

        return hook

    for l, blk in enumerate(blocks):
        hooks.append(blk.attn.proj.register_forward_hook(on_proj(l)))
        hooks.append(blk.mlp.fc2.register_forward_hook(on_fc2(l)))
        hooks.append(blk.register_forward_hook(on_block(l)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = tokens.clamp_min(1.0)
    return Importance(
        layers=tuple((layers / n).tolist()),
        channels=tuple(channels[0].tolist()),
        heads=tuple(tuple((h / n[l]).tolist()) for l, h in enumerate(heads)),
        neurons=tuple(tuple((v / n[l]).tolist()) for l, v in enumerate(neurons)),
        stage_channels=tuple(tuple(c.tolist()) for c in channels[1:]),
    )
