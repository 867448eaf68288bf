"""timm VisionTransformer family: ViT and DeiT, including DeiT's distilled
two-token variant (``VisionTransformerDistilled``).

Slicing follows the paper's Fig. 14 (supplementary §B-1): block, MLP-neuron,
head and embedding decomposition. A sub-model is a :class:`SubViT`: a
standalone module with per-layer head counts and MLP widths (timm's own
``VisionTransformer`` takes one of each for all blocks), mapping the image to
the teacher's pooled pre-logits feature restricted to the kept channels. For
the distilled variant the feature is ``concat(cls, dist)``.

Choices the paper leaves open, written down here:

* LayerNorms keep the kept channels' affine parameters and normalise over the
  kept channels only (the only standalone choice); calibration absorbs it.
* The head dimension is the teacher's; dropping heads shrinks the attention
  width, never a head.
* A layer that keeps no head (or no neuron) drops that branch entirely, with
  its norm: the residual stream passes through unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from coformer.compiler import prism as P
from coformer.compiler.families.base import register
from coformer.compiler.families.prism_hooks import PrismHooks
from coformer.compiler.importance import Importance
from coformer.compiler.specs import SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError


class SlicedAttention(nn.Module):
    """timm's attention on a subset of heads. ``fused_attn`` as in timm: scaled_dot_product_attention
    in PyTorch, the explicit form with a constant scale when exported (``coformer.compiler.lower``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qkv_bias: bool, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class _Block(nn.Module):
    """A pre-norm block whose attention or MLP branch may be absent (0 heads / 0 neurons)."""

    def __init__(self, dim: int, heads: int, mlp: int, cfg: dict) -> None:
        super().__init__()
        eps, ls = cfg["eps"], cfg["layer_scale"]
        self.norm1 = nn.LayerNorm(dim, eps=eps) if heads else None
        self.attn = SlicedAttention(dim, heads, cfg["head_dim"], cfg["qkv_bias"], cfg["qk_norm"], eps) if heads else None
        self.ls1 = nn.Parameter(torch.ones(dim)) if heads and ls else None
        self.norm2 = nn.LayerNorm(dim, eps=eps) if mlp else None
        self.fc1 = nn.Linear(dim, mlp) if mlp else None
        self.act = nn.GELU(approximate=cfg["gelu"])
        self.fc2 = nn.Linear(mlp, dim) if mlp else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if mlp and ls else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            y = self.attn(self.norm1(x))
            x = x + (y * self.ls1 if self.ls1 is not None else y)
        if self.fc1 is not None:
            y = self.fc2(self.act(self.fc1(self.norm2(x))))
            x = x + (y * self.ls2 if self.ls2 is not None else y)
        return x


class SubViT(nn.Module):
    """A decomposed ViT: image -> pooled feature X_n (paper eq. 2's input).

    Built from a plain config (see :func:`_config`), so the sub-model, its
    per-layer widths and its weights can be saved and rebuilt without timm.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        d, eps = cfg["embed_dim"], cfg["eps"]
        self.patch = nn.Conv2d(cfg["in_chans"], d, cfg["patch_size"], cfg["patch_size"], bias=cfg["patch_bias"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg["cls_token"] else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg["distilled"] else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg["reg_tokens"], d)) if cfg["reg_tokens"] else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg["pos_tokens"], d))
        self.norm_pre = nn.LayerNorm(d, eps=eps) if cfg["norm_pre"] else nn.Identity()
        self.blocks = nn.ModuleList(_Block(d, h, m, cfg) for h, m in zip(cfg["heads"], cfg["mlp_dims"]))
        self.norm = nn.LayerNorm(d, eps=eps) if cfg["final_norm"] else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=eps) if cfg["fc_norm"] else nn.Identity()

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None) + int(self.dist_token is not None) + self.cfg["reg_tokens"]

    @property
    def feature_dim(self) -> int:
        return self.cfg["embed_dim"] * (2 if self.cfg["distilled"] else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.cfg["no_embed_class"]:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.cfg["distilled"]:
            x = torch.cat([x[:, 0], x[:, 1]], dim=-1)
        elif self.cfg["pool"] == "token":
            x = x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return self.fc_norm(x)


class _PairHead(nn.Module):
    """DeiT's distilled head: mean of the class-token and distillation-token heads."""

    def __init__(self, head: nn.Linear, head_dist: nn.Linear) -> None:
        super().__init__()
        self.head, self.head_dist, self.dim = head, head_dist, head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(x[:, : self.dim]) + self.head_dist(x[:, self.dim:])) / 2


def check_supported(model: nn.Module) -> None:
    from timm.layers import PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    def no(what: str) -> CoFormerError:
        return CoFormerError(f"this ViT uses {what}, which CoFormer cannot decompose yet")

    if getattr(model, "attn_pool", None) is not None:
        raise no("attention pooling (global_pool='map')")
    if getattr(model, "dynamic_img_size", False):
        raise no("dynamic_img_size")
    if model.pos_embed is None:
        raise no("no absolute position embedding")
    if not isinstance(model.patch_embed, PatchEmbed) or not isinstance(model.patch_embed.norm, nn.Identity):
        raise no("a patch embedding other than timm's plain PatchEmbed")
    pool = "token" if hasattr(model, "dist_token") else model.global_pool
    if pool not in ("token", "avg"):
        raise no(f"global_pool={pool!r} (supported: 'token', 'avg')")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise no(f"block type {type(blk).__name__}/{type(blk.attn).__name__} in layer {i}")
        if not isinstance(blk.attn.norm, nn.Identity) or getattr(blk.attn, "gate", None) is not None:
            raise no(f"attention scale-norm or gating in layer {i}")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity) or not isinstance(blk.mlp.act, nn.GELU):
            raise no(f"an MLP other than fc1-GELU-fc2 in layer {i}")
        if getattr(blk.mlp, "fc1", None) is None:
            raise no(f"a gated MLP in layer {i}")
        if blk.attn.proj.bias is None or blk.mlp.fc1.bias is None or blk.mlp.fc2.bias is None:
            raise no(f"projections without bias (proj_bias=False) in layer {i}")


def _config(model: nn.Module, spec: SubModelSpec) -> dict:
    blk0 = model.blocks[0]
    distilled = hasattr(model, "dist_token")
    return {
        "in_chans": model.patch_embed.proj.in_channels,
        "patch_size": model.patch_embed.proj.kernel_size[0],
        "patch_bias": model.patch_embed.proj.bias is not None,
        "img_size": list(model.patch_embed.img_size),
        "embed_dim": spec.embed_dim,
        "cls_token": model.cls_token is not None,
        "distilled": distilled,
        "reg_tokens": int(model.reg_token.shape[1]) if getattr(model, "reg_token", None) is not None else 0,
        "pos_tokens": int(model.pos_embed.shape[1]),
        "no_embed_class": bool(model.no_embed_class),
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "final_norm": not isinstance(model.norm, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "pool": "token" if distilled else model.global_pool,
        "heads": list(spec.head_counts),
        "mlp_dims": list(spec.mlp_dims),
        "head_dim": blk0.attn.head_dim,
        "qkv_bias": blk0.attn.qkv.bias is not None,
        "qk_norm": not isinstance(blk0.attn.q_norm, nn.Identity),
        "layer_scale": hasattr(blk0.ls1, "gamma"),
        "gelu": blk0.mlp.act.approximate,
        "eps": blk0.norm1.eps,
    }


class ImageAdapter:
    """What the image families (ViT, Swin) share: one ``pixels`` input of the teacher's
    image size, exported as the sub-model itself."""

    input_name = "pixels"
    prism_hooks = None  # PRISM's hooks for this family (coformer.compiler.families.prism_hooks), where served

    def input_names(self, model: nn.Module) -> list[str]:
        return [self.input_name]

    def export_module(self, sub: nn.Module) -> nn.Module:
        return sub

    def input_shape(self, model: nn.Module) -> tuple[int, ...]:
        h, w = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, h, w)


@torch.no_grad()
def slice_inputs(lin: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    """A copy of ``lin`` reading only the input features ``kept`` (a sub-model's head)."""
    out = nn.Linear(len(kept), lin.out_features)
    out.weight.copy_(lin.weight[:, kept])
    out.bias.copy_(lin.bias)
    return out


class VitPrism(PrismHooks):
    """PRISM's hooks for a timm ViT/DeiT pooled by its class token or the average, one head."""

    name = "vit"
    text = False

    def __init__(self, teacher: nn.Module) -> None:
        if teacher.global_pool not in ("token", "avg"):
            raise CoFormerError(f"PRISM serves ViTs pooled by the class token or the average; this one pools "
                                f"by {teacher.global_pool!r}")
        if getattr(teacher, "head_dist", None) is not None:
            raise CoFormerError("PRISM does not serve DeiT's distilled two-head form yet; use a one-head ViT/DeiT")
        self.teacher, self.blocks = teacher, list(teacher.blocks)
        self.qkv, self.finish = P.vit_qkv, P.vit_finish
        self.scales = [float(b.attn.scale) for b in teacher.blocks]
        self.pool = "token" if teacher.global_pool == "token" else "sum"
        self.prefix = int(teacher.num_prefix_tokens)
        self.input_names = ["pixels"]
        self.embed_dim = int(teacher.embed_dim)
        self.heads, self.head_dim = int(teacher.blocks[0].attn.num_heads), int(teacher.blocks[0].attn.head_dim)

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher
        h = t.norm_pre(t._pos_embed(t.patch_embed(pixels)))
        return h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.teacher.norm(h)

    def head_of_token(self, h: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t.head(t.head_drop(t.fc_norm(self.final(h)[:, 0])))

    def head_of_mean(self, pooled: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t.head(t.head_drop(t.fc_norm(pooled)))

    def tokens(self) -> int:
        return int(self.teacher.patch_embed.num_patches) + self.prefix

    def logits(self, x: torch.Tensor, shares, cr: int) -> torch.Tensor:
        return P.vit_logits(self.teacher, x, shares, cr)


@register("vit")
class VitAdapter(ImageAdapter):
    """Adapter for timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled``."""

    name = "vit"
    prism_hooks = VitPrism

    def matches(self, model: Any) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def read_shape(self, model: nn.Module) -> TransformerShape:
        check_supported(model)
        cfg = _config(model, SubModelSpec.full(self._rough_shape(model)))
        npfx = model.num_prefix_tokens
        return TransformerShape(
            family=self.name,
            embed_dim=model.embed_dim,
            heads=tuple(b.attn.num_heads for b in model.blocks),
            head_dim=cfg["head_dim"],
            mlp_dims=tuple(b.mlp.fc1.out_features for b in model.blocks),
            num_tokens=model.patch_embed.num_patches + npfx,
            num_prefix_tokens=npfx,
            patch_in_features=cfg["in_chans"] * cfg["patch_size"] ** 2,
            num_classes=model.num_classes,
            extras={k: cfg[k] for k in ("qkv_bias", "qk_norm", "layer_scale", "norm_pre", "final_norm", "patch_bias",
                                        "fc_norm", "pool", "pos_tokens", "distilled")},
        )

    @staticmethod
    def _rough_shape(model: nn.Module) -> TransformerShape:
        return TransformerShape(
            "vit", model.embed_dim, tuple(b.attn.num_heads for b in model.blocks), model.blocks[0].attn.head_dim,
            tuple(b.mlp.fc1.out_features for b in model.blocks), 1, 0, 1, model.num_classes,
        )

    # -- slicing ---------------------------------------------------------
    @torch.no_grad()
    def slice(self, model: nn.Module, spec: SubModelSpec) -> SubViT:
        """Build the standalone sub-model of ``spec`` from the teacher's real weights."""
        shape = self.read_shape(model)
        spec.validate(shape)
        cfg = _config(model, spec)
        sub = SubViT(cfg)
        K = torch.tensor(spec.channels)
        sub.patch.weight.copy_(model.patch_embed.proj.weight[K])
        if sub.patch.bias is not None:
            sub.patch.bias.copy_(model.patch_embed.proj.bias[K])
        for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
            if getattr(sub, name) is not None:
                getattr(sub, name).copy_(getattr(model, name)[..., K])
        for dst, src in ((sub.norm_pre, model.norm_pre), (sub.norm, model.norm), (sub.fc_norm, model.fc_norm)):
            if isinstance(dst, nn.LayerNorm):
                copy_norm(dst, src, K)
        hd = cfg["head_dim"]
        for blk, layer, heads, neurons in zip(sub.blocks, spec.layers, spec.heads, spec.neurons):
            t = model.blocks[layer]
            if blk.attn is not None:
                H = t.attn.num_heads
                rows, cols = head_rows_cols(heads, H, hd)
                copy_norm(blk.norm1, t.norm1, K)
                blk.attn.qkv.weight.copy_(t.attn.qkv.weight[rows][:, K])
                if t.attn.qkv.bias is not None:
                    blk.attn.qkv.bias.copy_(t.attn.qkv.bias[rows])
                if cfg["qk_norm"]:
                    blk.attn.q_norm.load_state_dict(t.attn.q_norm.state_dict())
                    blk.attn.k_norm.load_state_dict(t.attn.k_norm.state_dict())
                blk.attn.proj.weight.copy_(t.attn.proj.weight[K][:, cols])
                blk.attn.proj.bias.copy_(t.attn.proj.bias[K])
                if blk.ls1 is not None:
                    blk.ls1.copy_(t.ls1.gamma[K])
            if blk.fc1 is not None:
                N = torch.tensor(neurons)
                copy_norm(blk.norm2, t.norm2, K)
                blk.fc1.weight.copy_(t.mlp.fc1.weight[N][:, K])
                blk.fc1.bias.copy_(t.mlp.fc1.bias[N])
                blk.fc2.weight.copy_(t.mlp.fc2.weight[K][:, N])
                blk.fc2.bias.copy_(t.mlp.fc2.bias[K])
                if blk.ls2 is not None:
                    blk.ls2.copy_(t.ls2.gamma[K])
        return sub.eval()

    # -- heads -----------------------------------------------------------
    def teacher_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The teacher's pooled pre-logits feature (what a full-spec sub-model returns)."""
        f = model.forward_features(x)
        if hasattr(model, "dist_token"):
            return torch.cat([f[:, 0], f[:, 1]], dim=-1)
        return model.forward_head(f, pre_logits=True)

    def teacher_head(self, model: nn.Module) -> nn.Module:
        """Teacher feature -> logits, with the teacher's own weights (shared, not copied)."""
        if hasattr(model, "dist_token"):
            return _PairHead(model.head, model.head_dist)
        return model.head

    def feature_index(self, model: nn.Module, spec: SubModelSpec) -> list[int]:
        """Where each entry of X_n sits in the teacher's feature vector."""
        if hasattr(model, "dist_token"):
            return list(spec.channels) + [model.embed_dim + c for c in spec.channels]
        return list(spec.channels)

    @torch.no_grad()
    def submodel_head(self, model: nn.Module, spec: SubModelSpec) -> nn.Module:
        """A head for X_n alone (used while calibrating), initialised from the teacher's."""
        K = torch.tensor(spec.channels)
        if hasattr(model, "dist_token"):
            return _PairHead(slice_inputs(model.head, K), slice_inputs(model.head_dist, K))
        return slice_inputs(model.head, K)

    # -- importance ------------------------------------------------------
    @torch.no_grad()
    def importance(self, model: nn.Module, batches: Iterable[torch.Tensor], method: Any = "magnitude") -> Importance:
        """Rank heads, neurons, channels and layers on calibration data (see :mod:`importance`).

        ``method`` is a scorer name (``magnitude``) or any callable
        ``(model, batches) -> Importance``: scorers are pluggable.
        """
        if callable(method):
            return method(model, batches).check(self.read_shape(model))
        if method not in _SCORERS:
            raise CoFormerError(f"importance method {method!r} is not available for ViT; use one of {sorted(_SCORERS)}")
        return _SCORERS[method](model, batches)


def head_rows_cols(heads, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a subset of a timm attention's ``heads``: the rows of its fused Q/K/V weight and the
    columns of its output projection that belong to them."""
    cols = torch.tensor([j * head_dim + i for j in heads for i in range(head_dim)])
    return torch.cat([p * num_heads * head_dim + cols for p in range(3)]), cols


def copy_norm(dst: nn.LayerNorm, src: nn.Module, K: torch.Tensor) -> None:
    if not isinstance(src, nn.LayerNorm):
        raise CoFormerError(f"expected a LayerNorm, found {type(src).__name__}")
    dst.weight.copy_(src.weight[K])
    dst.bias.copy_(src.bias[K])


def _magnitude(model: nn.Module, batches: Iterable[torch.Tensor]) -> Importance:
    """Activation-magnitude importance (mean over calibration tokens).

    head j of layer l: E ||o_j W_proj[:, j]^T||, its contribution to the residual stream;
    neuron i of layer l: E |a_i| * ||W_fc2[:, i]||;
    channel c: mean over layers of E |x_c| / E |x| of the block outputs;
    layer l: E ||block(x) - x|| / ||x||, the relative update the block makes.
    """
    L = len(model.blocks)
    dev = next(model.parameters()).device  # sums stay where the model runs (a GPU)
    heads = [torch.zeros(b.attn.num_heads, dtype=torch.float64, device=dev) for b in model.blocks]
    neurons = [torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64, device=dev) for b in model.blocks]
    channels = torch.zeros(model.embed_dim, dtype=torch.float64, device=dev)
    layers = torch.zeros(L, dtype=torch.float64, device=dev)
    count = {"tokens": 0}
    hooks = []

    def on_proj(l: int):
        blk = model.blocks[l]

        def hook(mod, inp, out):
            o = inp[0]  # [B, N, H*hd]
            H, hd = blk.attn.num_heads, blk.attn.head_dim
            W = mod.weight.view(mod.weight.shape[0], H, hd)
            contrib = torch.einsum("bnjt,cjt->bnjc", o.reshape(*o.shape[:2], H, hd), W)
            heads[l].add_(contrib.norm(dim=-1).sum(dim=(0, 1)).double())

        return hook

    def on_fc2(l: int):
        def hook(mod, inp, out):
            a = inp[0].abs().sum(dim=(0, 1)).double()
            neurons[l].add_(a * mod.weight.norm(dim=0).double())

        return hook

    def on_block(l: int):
        def hook(mod, inp, out):
            x = inp[0]
            layers[l] += ((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().double()
            m = out.abs().sum(dim=(0, 1)).double()
            channels.add_(m / m.mean().clamp_min(1e-12))

        return hook

    for l, blk in enumerate(model.blocks):
        hooks.append(blk.attn.proj.register_forward_hook(on_proj(l)))
        hooks.append(blk.mlp.fc2.register_forward_hook(on_fc2(l)))
        hooks.append(blk.register_forward_hook(on_block(l)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x.to(dev))
            count["tokens"] += x.shape[0] * (model.patch_embed.num_patches + model.num_prefix_tokens)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return Importance.from_sums(layers, channels, heads, neurons, count["tokens"])


_SCORERS = {"magnitude": _magnitude}
