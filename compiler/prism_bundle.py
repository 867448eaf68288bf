"""A PRISM bundle (issue 23): the teacher whole on every device, each running its share of
the positions, lowered to ONNX models that the runtime chains layer by layer, exchanging
K/V Segment Means through the central node (:mod:`coformer.compiler.prism` has the
arithmetic and its choices; :mod:`coformer.runtime.prism` the serving side).

Each device ``p`` gets, in order:

* ``embed``: the bundle input -> its share's hidden states, its first layer's queries, keys
  and values, the bias of the other devices' segments (``log`` of their real positions,
  read off the input's attention mask, which every device receives) and ``send``: its
  first layer's K/V Segment Means;
* ``layer{l}``: that state plus ``others`` (the other devices' means of layer ``l``, in
  device order) -> the next state and ``send``: layer ``l+1``'s means. A device's last
  layer sends what the answer needs from it: the logits on the central node (the class
  token, and with it the pooling, lives there); nothing on a worker of a class-token
  model, which therefore stops one layer early; with mean pooling, its share's sum of
  final token states (one vector), which the central node's ``head`` adds up.

Every output but ``send`` is state (named ``new_X``), kept on the device and fed to input ``X``
of its next model;
``others`` is the only input that travels. So a request costs ``depth`` rounds (one more
with mean pooling), and the bytes :func:`coformer.compiler.prism.communication` counts.

Choices written down:

* **Fixed positions.** A text bundle's requests are padded to ``max_length`` by the central
  node (padding is masked out of keys, means and pooling, so the answer is unchanged), so
  every device's share and every model's shapes are fixed at compile time.
* **Shares by compute**, the devices' ``cpu_share`` (:func:`coformer.compiler.prism.share_positions`).
* **Served families**: timm ViT/DeiT (class-token or average pooling, one head), HF BERT
  (pooler, CLS or mean pooling) and HF GPT-2 (last-token or mean pooling), refusing Swin,
  T5 and DeiT's distilled form by name.
* **GPT-2's last token** moves with each text's length, so it is pooled like a mean: every
  device sends, after its last layer, the state of the last real token where its share
  holds it (zeros elsewhere), and the central node's ``head`` adds them (a count of 1).
* **GPT-2's causal exchange** is relayed like the others (every device's means to every
  other): a device gives a later device's segments the bias ``-inf`` in ``embed``, so they
  weigh nothing. Routing only earlier devices' means would save about half of those bytes;
  the plan counts what is sent.
* **No calibration by default.** PRISM runs the teacher's own weights; CR = 1 is the teacher.
  At CR > 1 the weights may be fine-tuned first (:mod:`coformer.compiler.prism_finetune`),
  and the bundle then runs the tuned copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from coformer.compiler import prism as P
from coformer.compiler.families.prism_hooks import PrismHooks
from coformer.runtime.errors import CoFormerError

PARITY_TOLERANCE = 1e-4  # served composition against the PyTorch PRISM forward, logits
from coformer.runtime.prism import NEW, OTHERS, SEND  # noqa: E402  (the names the runtime chains by)


def prism_family(teacher: nn.Module) -> PrismHooks:
    """What PRISM needs of ``teacher``: its family adapter's PRISM hooks
    (:mod:`coformer.compiler.families.prism_hooks`), or a refusal naming the families served."""
    from coformer.compiler.families import ADAPTERS, adapter_for

    try:
        adapter = adapter_for(teacher)  # (loads every family first)
    except CoFormerError:
        adapter = None
    served = sorted(name for name, a in ADAPTERS.items() if a.prism_hooks is not None)
    if adapter is None or adapter.prism_hooks is None:
        family = getattr(teacher, "family", type(teacher).__name__)
        raise CoFormerError(f"PRISM is served for the {served} families (timm ViT/DeiT, HF BERT, HF GPT-2), "
                            f"not {family!r}")
    return adapter.prism_hooks(teacher)


def _segment_bias(mask: torch.Tensor, cr: int) -> torch.Tensor:
    """``log`` of each segment's real positions, ``[B, 1, segments]`` (see :func:`coformer.compiler.prism.summarize`)."""
    real, sizes = P.segment_means(mask[:, None, :, None].to(torch.float32), cr)
    return torch.log(real[..., 0] * sizes)


def _pooled_sum(h: torch.Tensor, poolmask: torch.Tensor) -> torch.Tensor:
    """The sum of the pooled positions' states. A selection, not a product: a GPT-2 padding
    position whose every key is masked holds NaN, and ``NaN * 0`` would spread it."""
    return torch.where(poolmask[..., None] > 0, h, torch.zeros_like(h)).sum(1)


class _Device(nn.Module):
    """Base: device ``p`` of ``shares``, its slice and the other devices' slices."""

    def __init__(self, fam: PrismHooks, shares: Sequence[int], p: int, cr: int) -> None:
        super().__init__()
        self.teacher = fam.teacher  # registered, so the export sees the weights it uses
        self.fam, self.cr, self.p = fam, int(cr), p
        starts = [sum(shares[:j]) for j in range(len(shares))]
        self.own = (starts[p], starts[p] + shares[p])
        self.others = [(starts[j], starts[j] + shares[j]) for j in range(len(shares)) if j != p]

    def _poolmask(self, mask: torch.Tensor) -> torch.Tensor:
        """Which of the own positions the mean pools: real tokens, past a ViT's prefix tokens; with
        last-token pooling, the last real token where this share holds it (else none)."""
        lo, hi = self.own
        if self.fam.last_token:
            idx = torch.arange(mask.shape[1])
            last = (idx[None, :] * mask.to(torch.long)).argmax(-1)  # pool_features' "last"
            return (idx[None, lo:hi] == last[:, None]).to(torch.float32)
        keep = mask[:, lo:hi].to(torch.float32)
        if self.fam.prefix and lo < self.fam.prefix:
            keep = keep * (torch.arange(lo, hi) >= self.fam.prefix).to(torch.float32)[None, :]
        return keep

    def _next(self, layer: int, h: torch.Tensor, keymask: torch.Tensor):
        q, k, v = self.fam.qkv(self.fam.blocks[layer], h)
        send, _ = P.summarize(k, v, self.cr, keymask[:, 0] == 0)
        return q, k, v, send


class DeviceEmbed(_Device):
    """``embed`` (module doc)."""

    def output_names(self) -> list[str]:
        extra = ["poolmask", "count"] if self.fam.pool == "sum" else []
        return ["hidden", "q", "k", "v", "bias", "keymask", *extra, SEND]

    def forward(self, *inputs: torch.Tensor):
        h, mask = self.fam.embed(*inputs)
        lo, hi = self.own
        own = h[:, lo:hi]
        keymask = P.key_bias(mask[:, lo:hi])
        if self.others:
            # causal: a later device's segments hold only later positions; they are relayed like
            # the rest and weigh nothing here
            segs = [_segment_bias(mask[:, a:b], self.cr) for a, b in self.others]
            bias = torch.cat([s.masked_fill(torch.tensor(self.fam.causal and a >= hi), float("-inf"))
                              for s, (a, _) in zip(segs, self.others)], dim=-1)
        else:
            bias = torch.zeros(h.shape[0], 1, 0)
        q, k, v, send = self._next(0, own, keymask)
        out = [own, q, k, v, bias, keymask]
        if self.fam.pool == "sum":
            full = mask.to(torch.float32)
            if self.fam.prefix:
                full = full[:, self.fam.prefix:]
            count = torch.ones_like(full[:, :1]) if self.fam.last_token else full.sum(1, keepdim=True)
            out += [self._poolmask(mask), count]
        return (*out, send)


class DeviceLayer(_Device):
    """``layer{l}`` (module doc): layer ``l`` over the own positions, then what to send."""

    def __init__(self, fam: PrismHooks, shares: Sequence[int], p: int, cr: int, layer: int, central: bool) -> None:
        super().__init__(fam, shares, p, cr)
        self.layer, self.central = layer, central
        self.last = layer == len(fam.blocks) - 1

    def input_names(self) -> list[str]:
        extra = ["poolmask"] if self.last and self.fam.pool == "sum" and not self.central else []
        return ["hidden", "q", "k", "v", "bias", "keymask", *extra, OTHERS]

    def output_names(self) -> list[str]:
        if not self.last:
            return ["hidden", "q", "k", "v", SEND]
        return ["hidden"] if self.central and self.fam.pool == "sum" else [SEND]

    def forward(self, hidden, q, k, v, bias, keymask, *rest):
        others = rest[-1]
        o = P.attend(q, k, v, keymask, self.fam.scales[self.layer], others, bias, causal=self.fam.causal)
        h = self.fam.finish(self.fam.blocks[self.layer], hidden, o)
        if not self.last:
            return (h, *self._next(self.layer + 1, h, keymask))
        if self.fam.pool == "token":
            return self.fam.head_of_token(h)  # (the central node's: workers stop a layer early)
        if self.central:
            return h
        return _pooled_sum(self.fam.final(h), rest[0])  # this share's sum of pooled states


class CentralHead(_Device):
    """``head`` of a mean-pooled model: the own share's sum plus the workers', over the count."""

    def input_names(self) -> list[str]:
        return ["hidden", "poolmask", "count", OTHERS]

    def output_names(self) -> list[str]:
        return [SEND]

    def forward(self, hidden, poolmask, count, others):
        total = _pooled_sum(self.fam.final(hidden), poolmask) + others.sum(1)
        return self.fam.head_of_mean(total / count.clamp(min=1.0))


def device_models(fam: PrismHooks, shares: Sequence[int], cr: int) -> list[dict[str, nn.Module]]:
    """Every device's models, in the order it runs them (module doc)."""
    L = len(fam.blocks)
    out = []
    for p in range(len(shares)):
        central = p == 0
        models: dict[str, nn.Module] = {"embed": DeviceEmbed(fam, shares, p, cr)}
        last = L if central or fam.pool == "sum" else L - 1
        for layer in range(last):
            models[f"layer{layer}"] = DeviceLayer(fam, shares, p, cr, layer, central)
        if central and fam.pool == "sum":
            models["head"] = CentralHead(fam, shares, p, cr)
        out.append(models)
    return out


def _names(module: nn.Module, fam: PrismHooks) -> tuple[list[str], list[str]]:
    """The ONNX input and output names of a device model: state outputs ``new_X`` (module doc)."""
    ins = fam.input_names if isinstance(module, DeviceEmbed) else module.input_names()
    return list(ins), [n if n == SEND else NEW + n for n in module.output_names()]


def build_prism(teacher: nn.Module, devices: Sequence[Any], x_example: torch.Tensor, out_dir: Path,
                labels: Sequence[str], preprocessing: dict[str, Any], cr: int,
                model_name: str = "prism", tuned: Optional[nn.Module] = None,
                finetune: Optional[dict[str, Any]] = None) -> Any:
    """Write the PRISM bundle of ``teacher`` for ``devices`` (the first is the central node) at
    compression rate ``cr`` to ``out_dir`` (module doc), and check that its ONNX models, chained
    as the runtime chains them, give the PyTorch PRISM forward's logits (``parity``).

    ``tuned``: the weights the devices run instead of the teacher's, fine-tuned at ``cr``
    (:func:`coformer.compiler.prism_finetune.finetune_prism`, whose report ``finetune`` the
    plan keeps); ``parity["prism_vs_teacher"]`` then measures how far tuning moved the logits."""
    import shutil

    from coformer.compiler.bundle import StagedBundle
    from coformer.runtime.files import public_mode
    from coformer.runtime.manifest import InputSpec

    if int(cr) < 1:
        raise CoFormerError(f"--compression-rate {cr} must be a whole number >= 1")
    cr = int(cr)
    if len(devices) < 2:
        raise CoFormerError(f"PRISM shares positions among devices; give at least 2, not {len(devices)}")
    teacher = teacher.eval()
    fam = prism_family(teacher if tuned is None else tuned.eval())
    text = fam.text
    N = fam.tokens()
    shares = P.share_positions(N, [d.cpu_share for d in devices])
    if fam.prefix > shares[0]:
        raise CoFormerError(f"the central node's share of {shares[0]} positions cannot hold the {fam.prefix} prefix "
                            "tokens; give it a larger cpu_share")
    models = device_models(fam, shares, cr)
    x3 = x_example[:3]
    if text and x3.shape[-1] != N:  # the bundle's fixed length (module doc)
        from coformer.runtime.prism import pad_tokens

        x3 = torch.from_numpy(pad_tokens(x3.numpy(), N, int(preprocessing["pad_id"])))
    with torch.no_grad():
        want = teacher(x3)
        reference = fam.reference(x3, shares, cr)
    comm = plan_communication(teacher, devices, cr)
    in_shape = tuple(int(s) for s in x3.shape[1:])
    from coformer.compiler.families import adapter_for

    shape = adapter_for(teacher).read_shape(teacher).to_dict()  # what check_bundle_matches compares

    with StagedBundle(out_dir) as staged:
        staging = staged.dir
        arts = [_lower_device(p, d, mods, fam, shares, cr, x3, in_shape, staging)
                for p, (d, mods) in enumerate(zip(devices, models))]
        served = _chained(arts, staging, x3, dict(preprocessing) if text else {})
        parity = {"served_vs_prism_forward": float(np.abs(served - reference.numpy()).max()),
                  "prism_vs_teacher": float((reference - want).abs().max())}
        if not parity["served_vs_prism_forward"] <= PARITY_TOLERANCE:
            raise CoFormerError(f"PRISM's ONNX models, chained, differ from its PyTorch forward by "
                                f"{parity['served_vs_prism_forward']:.3g} > {PARITY_TOLERANCE:g}")
        pre = dict(preprocessing)
        if text:
            shutil.copyfile(teacher.tokenizer_file, staging / pre["tokenizer"])
            public_mode(staging / pre["tokenizer"])
        # lists in device order (a manifest's objects are written with sorted keys)
        plan = {"strategy": "prism", "compression_rate": cr, "devices": [d.name for d in devices], "shares": shares,
                "pool": fam.pool, "communication": comm, "finetune": finetune}
        return staged.publish(dict(
            model={"name": model_name, "family": fam.name, "layers": len(fam.blocks), "embed_dim": fam.embed_dim,
                   "tokens": N, "plan": plan, "shape": shape},
            task={"kind": "classification", "labels": list(labels)},
            input=InputSpec("tokens" if text else fam.input_names[0], "int64" if text else "float32", in_shape, 64,
                            pre, dynamic_axes=(1,) if text else ()),
            devices=tuple(arts), aggregator="", parity=parity, strategy="prism",
        ))


def _lower_device(p: int, d: Any, mods: dict[str, nn.Module], fam: PrismHooks, shares: Sequence[int], cr: int,
                  x3: torch.Tensor, in_shape: tuple, staging: Path):
    """Device ``p``'s models exported to ONNX under ``staging``, each traced on the state its
    previous model left (``others`` stood in for), and the device's manifest entry."""
    from coformer.compiler.baselines import onnx_params
    from coformer.compiler.lower import export_onnx
    from coformer.runtime.manifest import DeviceArtifact, ModelSpec

    specs: dict[str, ModelSpec] = {}
    params = 0
    state: dict[str, torch.Tensor] = {}
    for name, module in mods.items():
        rel = f"prism/{p}-{d.name}-{name}.onnx"
        ins, outs = _names(module, fam)
        embed = isinstance(module, DeviceEmbed)
        if embed:
            example = [x3[:, i] for i in range(x3.shape[1])] if fam.text else [x3]
        else:
            example = [state[n] for n in ins if n != OTHERS] + [_others_example(fam, shares, p, cr, name, x3)]
        with torch.no_grad():
            got = module(*example)
        got = got if isinstance(got, tuple) else (got,)
        state.update({n[len(NEW):]: t for n, t in zip(outs, got) if n != SEND})
        send = dict(zip(outs, got)).get(SEND)
        export_onnx(module, example, staging / rel, ins, outs)
        wire_in = in_shape if embed else tuple(example[-1].shape[1:])
        specs[name] = ModelSpec(rel, "int64" if fam.text and embed else "float32", wire_in,
                                tuple(send.shape[1:]) if send is not None else ())
        params += onnx_params(staging / rel)
    feature_dim = int(np.prod(specs[list(specs)[-1]].output_shape or (1,)))
    return DeviceArtifact(device=d.name, role="central" if p == 0 else "worker", artifact=specs["embed"].artifact,
                          feature_dim=feature_dim, flops=0, params=params, backend=d.backend, threads=1,
                          cpu_share=d.cpu_share, models=specs)


def _chained(arts: Sequence[Any], staging: Path, x3: torch.Tensor, preprocessing: dict[str, Any]) -> np.ndarray:
    """The logits of the staged ONNX models on ``x3``, chained as the runtime chains them."""
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine
    from coformer.runtime.prism import chain_locally

    engines = [{name: OnnxRuntimeEngine(staging / m.artifact, threads=1).load() for name, m in a.models.items()}
               for a in arts]
    try:
        return chain_locally(engines, x3.numpy(), preprocessing)
    finally:
        for es in engines:
            for e in es.values():
                e.close()


def _others_example(fam: PrismHooks, shares: Sequence[int], p: int, cr: int, name: str, x3: torch.Tensor) -> torch.Tensor:
    """A stand-in ``others`` for tracing ``name`` on device ``p``: the right shape, and values
    (the other devices' real means are computed by :func:`chain_locally` at the parity check)."""
    B = x3.shape[0]
    if name == "head":
        return torch.zeros(B, len(shares) - 1, fam.embed_dim)
    segments = sum(math.ceil(n / cr) for j, n in enumerate(shares) if j != p)
    return torch.randn(B, fam.heads, segments, 2 * fam.head_dim, generator=torch.Generator().manual_seed(p)) * 0.1


def prism_scores(teacher: nn.Module, data, shares: Sequence[int], crs: Sequence[int], samples: Optional[int] = None,
                 batch: int = 64, weights: Optional[dict[int, nn.Module]] = None) -> dict[str, Any]:
    """Accuracy (against the labels) and agreement with the teacher's decisions of PRISM's
    PyTorch forward at each compression rate in ``crs``, on the test split's first ``samples``:
    the forward the served bundle reproduces within :data:`PARITY_TOLERANCE`. ``weights[cr]``:
    the weights PRISM runs at ``cr`` where they are not the teacher's (fine-tuned)."""
    fam = prism_family(teacher.eval())
    x = data.test.head(samples or len(data.test))
    if fam.text and x.shape[-1] != fam.tokens():
        from coformer.runtime.prism import pad_tokens

        x = torch.from_numpy(pad_tokens(x.numpy(), fam.tokens(), int(data.preprocessing["pad_id"])))
    y = data.test.y[: len(x)] if data.test.y is not None else None
    with torch.no_grad():
        teacher_pred = torch.cat([teacher(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    out: dict[str, Any] = {"samples": len(x), "shares": list(shares),
                           "teacher_accuracy": None if y is None else float((teacher_pred == y).float().mean()),
                           "by_cr": {}}
    for cr in crs:
        run = prism_family(weights[int(cr)].eval()) if weights and int(cr) in weights else fam
        pred = torch.cat([run.reference(x[i:i + batch], shares, int(cr)).argmax(-1) for i in range(0, len(x), batch)])
        out["by_cr"][int(cr)] = {"accuracy": None if y is None else float((pred == y).float().mean()),
                                 "agreement_with_teacher": float((pred == teacher_pred).float().mean())}
    return out


def plan_communication(teacher: nn.Module, devices: Sequence[Any], cr: int) -> dict[str, float]:
    """The bytes and rounds the served PRISM bundle of ``teacher`` on ``devices`` exchanges per
    inference at ``cr`` (:func:`coformer.compiler.prism.communication`, as served)."""
    fam = prism_family(teacher.eval())
    shares = P.share_positions(fam.tokens(), [d.cpu_share for d in devices])
    return P.communication(shares, int(cr), fam.heads * fam.head_dim, len(fam.blocks),
                           workers_skip_last=fam.pool == "token", sums=fam.embed_dim if fam.pool == "sum" else 0)

