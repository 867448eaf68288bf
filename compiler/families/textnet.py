"""The network the language families (BERT, GPT-2, T5 encoder) share: one standalone
transformer, :class:`TextNet`, that each family's full teacher converts into
exactly, and that every sub-model is a slice of. The teacher wrapper and the
adapter are in :mod:`coformer.compiler.families.text_teacher`, the slicing and
importance in :mod:`coformer.compiler.families.text_slicing`.

A sub-model takes the *packed* token tensor ``[B, k, T]`` (int64): row 0 the
token ids, row 1 the attention mask, row 2 (BERT) the token type ids, one row
per name in ``FIELDS[family]``. The packed tensor is what travels on the wire
and what calibration batches hold; the exported ONNX model takes the rows as
separate, conventionally named inputs (``input_ids``, ``attention_mask``,
``token_type_ids``) with dynamic batch and sequence axes.

Choices the paper leaves open, written down here (as for ViT):

* Norms keep the kept channels' parameters and normalise over the kept
  channels only; calibration absorbs the difference.
* The head dimension is the teacher's; a layer that keeps no head (no neuron)
  drops that branch with its norm, also in BERT's post-norm blocks.
* T5's relative position bias lives in the teacher's first layer and is
  shared by all layers. A sub-model holds one table with the columns of every
  head any of its layers keeps, and each layer reads its own heads' columns,
  so dropping layer 0 keeps the bias and uneven head sets stay exact.
* Padding is on the right. Masked keys get the dtype's lowest value before the
  softmax (as HF does); a sequence must keep at least one token.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from coformer.compiler.specs import TransformerShape
from coformer.runtime.errors import CoFormerError

FIELDS = {
    "bert": ("input_ids", "attention_mask", "token_type_ids"),
    "gpt2": ("input_ids", "attention_mask"),
    "t5": ("input_ids", "attention_mask"),
}
POOLS = ("pooler", "cls", "mean", "max", "last")


class _Norm(nn.Module):
    """LayerNorm (``layer``) or T5's RMS norm without bias or mean (``rms``)."""

    def __init__(self, dim: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps, self.dim = kind, eps, dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _act(name: str):
    if name == "gelu":
        return lambda x: F.gelu(x)
    if name in ("gelu_new", "gelu_tanh", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise CoFormerError(f"activation {name!r} is not supported (gelu, gelu_new, relu)")


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, cfg: dict) -> None:
        super().__init__()
        self.heads, self.hd = heads, cfg["head_dim"]
        a = heads * self.hd
        self.scale = self.hd ** -0.5 if cfg["attn_scale"] else 1.0
        self.q = nn.Linear(d, a, bias=cfg["qkv_bias"])
        self.k = nn.Linear(d, a, bias=cfg["qkv_bias"])
        self.v = nn.Linear(d, a, bias=cfg["qkv_bias"])
        self.o = nn.Linear(a, d, bias=cfg["proj_bias"])

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, self.hd).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            s = s + bias
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        y = torch.matmul(torch.softmax(s, dim=-1), v)
        return self.o(y.transpose(1, 2).reshape(B, T, self.heads * self.hd))


class _Block(nn.Module):
    """Pre-norm (GPT-2, T5) or post-norm (BERT); either branch may be absent."""

    def __init__(self, d: int, heads: int, mlp: int, cfg: dict) -> None:
        super().__init__()
        self.post = cfg["norm_place"] == "post"
        norm = lambda: _Norm(d, cfg["norm"], cfg["eps"])  # noqa: E731
        self.norm1 = norm() if heads else None
        self.attn = _Attention(d, heads, cfg) if heads else None
        self.norm2 = norm() if mlp else None
        self.fc1 = nn.Linear(d, mlp, bias=cfg["mlp_bias"]) if mlp else None
        self.fc1g = nn.Linear(d, mlp, bias=cfg["mlp_bias"]) if mlp and cfg["gated"] else None
        self.fc2 = nn.Linear(mlp, d, bias=cfg["mlp_bias"]) if mlp else None
        self.act = _act(cfg["act"])
        # which columns of the shared relative-bias table (T5) this layer's heads read: in a full
        # network its own heads 0..h-1; slice_net points a sub-model's layers at their kept heads
        self.register_buffer("bias_cols", torch.arange(heads, dtype=torch.long), persistent=True)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.fc1g is not None:
            h = h * self.fc1g(x)
        return self.fc2(h)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.attn is not None:
            b = None if bias is None else bias.index_select(1, self.bias_cols)
            x = self.norm1(x + self.attn(x, allowed, b)) if self.post else x + self.attn(self.norm1(x), allowed, b)
        if self.fc1 is not None:
            x = self.norm2(x + self.mlp(x)) if self.post else x + self.mlp(self.norm2(x))
        return x


def relative_buckets(T: int, bidirectional: bool, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """T5's bucketed relative positions ``[T, T]`` (HF ``T5Attention._relative_position_bucket``)."""
    ctx = torch.arange(T, dtype=torch.long, device=device)[:, None]
    mem = torch.arange(T, dtype=torch.long, device=device)[None, :]
    rel = mem - ctx
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


class TextNet(nn.Module):
    """A language transformer (or a decomposed one): packed tokens -> pooled feature X_n.

    Built from a plain config (see the family files), so a sub-model rebuilds
    without transformers. ``cfg["heads"]`` / ``cfg["mlp_dims"]`` are per layer.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        d = cfg["embed_dim"]
        self.fields = FIELDS[cfg["family"]]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["max_positions"], d) if cfg["max_positions"] else None
        self.typ = nn.Embedding(cfg["type_vocab_size"], d) if cfg["type_vocab_size"] else None
        self.emb_norm = _Norm(d, cfg["norm"], cfg["eps"]) if cfg["emb_norm"] else None
        self.blocks = nn.ModuleList(_Block(d, h, m, cfg) for h, m in zip(cfg["heads"], cfg["mlp_dims"]))
        self.final_norm = _Norm(d, cfg["norm"], cfg["eps"]) if cfg["final_norm"] else None
        rb = cfg.get("rel_bias")
        self.rel = nn.Embedding(rb["num_buckets"], rb["columns"]) if rb else None
        self.pooler = nn.Linear(d, d) if cfg["pool"] == "pooler" else None
        if cfg["pool"] not in POOLS:
            raise CoFormerError(f"pool {cfg['pool']!r} is not one of {POOLS}")

    @property
    def feature_dim(self) -> int:
        return self.cfg["embed_dim"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(*tokens.unbind(1))

    def forward_parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.pool(self.hidden(input_ids, attention_mask, token_type_ids), attention_mask)

    def hidden(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, dtype=torch.long, device=input_ids.device)
        x = self.word(input_ids)
        if self.pos is not None:
            x = x + self.pos(positions)[None]
        if self.typ is not None:
            x = x + self.typ(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        allowed = attention_mask.bool()[:, None, None, :]
        if self.cfg["causal"]:
            allowed = allowed & (positions[None, :] <= positions[:, None])[None, None]
        bias = None
        if self.rel is not None:
            rb = self.cfg["rel_bias"]
            b = self.rel(relative_buckets(T, rb["bidirectional"], rb["num_buckets"], rb["max_distance"], x.device))
            bias = b.permute(2, 0, 1)[None]  # [1, columns, T, T]
        for blk in self.blocks:
            x = blk(x, allowed, bias)
        return self.final_norm(x) if self.final_norm is not None else x

    def pool(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_features(x, attention_mask, self.cfg["pool"], self.pooler)


def pool_features(x: torch.Tensor, attention_mask: torch.Tensor, kind: str,
                  pooler: Optional[nn.Linear] = None) -> torch.Tensor:
    """Token states ``[B, T, d]`` -> one feature per sequence (see :data:`POOLS`)."""
    if kind in ("pooler", "cls"):
        x = x[:, 0]
        return torch.tanh(pooler(x)) if pooler is not None else x
    m = attention_mask.to(x.dtype)
    if kind == "mean":
        return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    if kind == "max":  # sentence-transformers' max pooling: padding set to -1e9 first
        return torch.where(m[..., None] > 0, x, torch.full_like(x, -1e9)).amax(1)
    # last: the rightmost kept token (GPT2ForSequenceClassification's choice), as an exact 0/1 selection
    idx = torch.arange(x.shape[1], device=x.device)
    last = (idx[None, :] * attention_mask.to(torch.long)).argmax(-1)
    onehot = (idx[None, :] == last[:, None]).to(x.dtype)
    return (x * onehot[..., None]).sum(1)


class PartsModule(nn.Module):
    """A :class:`TextNet` with the packed rows as separate inputs: what ONNX gets.
    With ``head``, the head is applied to the feature (a whole classifier)."""

    def __init__(self, net: TextNet, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.net, self.head = net, head

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        f = self.net.forward_parts(*parts)
        return self.head(f) if self.head is not None else f



def last_linear(head: nn.Module) -> nn.Linear:
    """The last linear layer of a task head (its output size is the number of labels)."""
    if isinstance(head, nn.Linear):
        return head
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not lin:
        raise CoFormerError(f"task head {type(head).__name__} has no linear layer")
    return lin[-1]



@torch.no_grad()
def load_state(net: TextNet, tensors: dict[str, torch.Tensor]) -> TextNet:
    """Copy ``tensors`` (TextNet parameter name -> tensor) into ``net``; every parameter must be given."""
    own = dict(net.named_parameters())
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise CoFormerError(f"internal: TextNet weights missing {missing[:6]}, unexpected {extra[:6]}")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise CoFormerError(f"internal: {name} is {tuple(t.shape)}, TextNet wants {tuple(own[name].shape)}")
        own[name].copy_(t)
    return net.eval()


def read_shape(net: TextNet, num_classes: int, max_length: int) -> TransformerShape:
    """The shape of a full TextNet; ``num_tokens`` is the sequence length costs are counted at."""
    c = net.cfg
    rows = c["vocab_size"] + c["max_positions"] + c["type_vocab_size"]
    return TransformerShape(
        family=c["family"], embed_dim=c["embed_dim"], heads=tuple(c["heads"]), head_dim=c["head_dim"],
        mlp_dims=tuple(c["mlp_dims"]), num_tokens=max_length, num_prefix_tokens=0, patch_in_features=0,
        num_classes=num_classes,
        extras={"embed_rows": rows, "pos_tokens": 0, "patch_bias": False, "norm_pre": c["emb_norm"],
                "final_norm": c["final_norm"], "qkv_bias": c["qkv_bias"], "proj_bias": c["proj_bias"],
                "mlp_bias": c["mlp_bias"], "gated": c["gated"], "norm_params": 2 if c["norm"] == "layer" else 1,
                "pooler": c["pool"] == "pooler", "causal": c["causal"], "pool": c["pool"]},
    )
