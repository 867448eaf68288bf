"""Frozen, validated, JSON-serialisable specs: the teacher's shape, one
sub-model (C_n), a decomposition policy (C) and a device.

Index conventions: every kept set is a sorted tuple of indices into the
teacher (layers, embedding channels, heads of a teacher layer, MLP neurons of
a teacher layer), so a spec alone fully determines the slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from coformer.compiler.decomposition import check_decomposition
from coformer.runtime.files import atomic_write_json, read_json
from coformer.runtime.errors import CoFormerError


def _sorted_unique(name: str, idx: Sequence[int], limit: int, where: str) -> tuple[int, ...]:
    t = tuple(int(i) for i in idx)
    if list(t) != sorted(set(t)):
        raise CoFormerError(f"{where}: {name} {list(t)[:12]} must be strictly increasing (no repeats)")
    bad = [i for i in t if not 0 <= i < limit]
    if bad:
        raise CoFormerError(f"{where}: {name} indices {bad[:8]} are outside 0..{limit - 1}")
    return t


@dataclass(frozen=True)
class TransformerShape:
    """What a family adapter reads off a teacher.

    Args:
        family: adapter name, e.g. ``"vit"``.
        embed_dim: d.
        heads: attention heads of each layer (h per layer; len = L).
        head_dim: width of one head (unchanged by decomposition).
        mlp_dims: MLP hidden width of each layer (D per layer).
        num_tokens: sequence length through the encoder, prefix tokens included.
        num_prefix_tokens: class / distillation / register tokens.
        patch_in_features: inputs of one patch-embedding output channel (C*p*p).
        num_classes: outputs of the teacher's head.
        extras: family flags the cost model needs (``qkv_bias``, ``layer_scale``,
            ``qk_norm``, ``norm_pre``, ``fc_norm``, ``final_norm``, ``pool``).
        stage_dims: a hierarchical model's channel width per stage (Swin:
            96, 192, 384, 768); empty for an isotropic one (ViT, BERT), whose
            one width is ``embed_dim``. ``embed_dim`` is then the first stage's.
        stage_depths: layers per stage (Swin: 2, 2, 6, 2), in layer order.
    """

    family: str
    embed_dim: int
    heads: tuple[int, ...]
    head_dim: int
    mlp_dims: tuple[int, ...]
    num_tokens: int
    num_prefix_tokens: int
    patch_in_features: int
    num_classes: int
    extras: Mapping[str, Any] = field(default_factory=dict)
    stage_dims: tuple[int, ...] = ()
    stage_depths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "mlp_dims", tuple(int(m) for m in self.mlp_dims))
        object.__setattr__(self, "stage_dims", tuple(int(c) for c in self.stage_dims))
        object.__setattr__(self, "stage_depths", tuple(int(c) for c in self.stage_depths))
        if len(self.heads) != len(self.mlp_dims) or not self.heads:
            raise CoFormerError(f"shape: {len(self.heads)} head counts for {len(self.mlp_dims)} MLP widths")
        if self.stage_dims:
            if len(self.stage_depths) != len(self.stage_dims) or sum(self.stage_depths) != len(self.heads):
                raise CoFormerError(f"shape: stage depths {list(self.stage_depths)} for {len(self.stage_dims)} stages "
                                    f"and {len(self.heads)} layers")
            if self.stage_dims[0] != self.embed_dim:
                raise CoFormerError(f"shape: first stage width {self.stage_dims[0]} != embed_dim {self.embed_dim}")

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def widths(self) -> tuple[int, ...]:
        """The channel width of every stage (one entry for an isotropic model)."""
        return self.stage_dims or (self.embed_dim,)

    def stage_of(self, layer: int) -> int:
        """The stage teacher layer ``layer`` belongs to (0 for an isotropic model)."""
        if not self.stage_depths:
            return 0
        end = 0
        for s, depth in enumerate(self.stage_depths):
            end += depth
            if layer < end:
                return s
        raise CoFormerError(f"layer {layer} is outside 0..{self.num_layers - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "heads": list(self.heads), "mlp_dims": list(self.mlp_dims)}
        d["stage_dims"], d["stage_depths"] = list(self.stage_dims), list(self.stage_depths)
        if not self.stage_dims:  # isotropic shapes serialise as they always have
            del d["stage_dims"], d["stage_depths"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TransformerShape":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class SubModelSpec:
    """C_n = (l_n, d_n, h_n^{1..l_n}, D_n^{1..l_n}), by index.

    Args:
        layers: kept teacher layers, increasing (l_n = len).
        channels: kept embedding channels (d_n = len).
        heads: per kept layer, the kept heads of that teacher layer (may be empty).
        neurons: per kept layer, the kept MLP neurons of that teacher layer (may be empty).
        stage_channels: a hierarchical model's kept channels of every stage after
            the first (``channels`` holds the first stage's, the patch embedding's);
            empty for an isotropic model.
    """

    layers: tuple[int, ...]
    channels: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    stage_channels: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "channels", tuple(int(i) for i in self.channels))
        object.__setattr__(self, "heads", tuple(tuple(int(i) for i in h) for h in self.heads))
        object.__setattr__(self, "neurons", tuple(tuple(int(i) for i in n) for n in self.neurons))
        object.__setattr__(self, "stage_channels", tuple(tuple(int(i) for i in c) for c in self.stage_channels))
        if not self.layers:
            raise CoFormerError("sub-model keeps no layer: l_n must be >= 1")
        if not self.channels:
            raise CoFormerError("sub-model keeps no embedding channel: d_n must be >= 1")
        empty = [s + 1 for s, c in enumerate(self.stage_channels) if not c]
        if empty:
            raise CoFormerError(f"sub-model keeps no channel in stages {empty}: every stage needs >= 1")
        if len(self.heads) != len(self.layers) or len(self.neurons) != len(self.layers):
            raise CoFormerError(
                f"sub-model has {len(self.layers)} layers but {len(self.heads)} head lists "
                f"and {len(self.neurons)} neuron lists; give one of each per kept layer"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_dim(self) -> int:
        return len(self.channels)

    @property
    def head_counts(self) -> tuple[int, ...]:
        return tuple(len(h) for h in self.heads)

    @property
    def mlp_dims(self) -> tuple[int, ...]:
        return tuple(len(n) for n in self.neurons)

    @property
    def all_channels(self) -> tuple[tuple[int, ...], ...]:
        """The kept channels of every stage, the first stage's (``channels``) first."""
        return (self.channels,) + self.stage_channels

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.all_channels)

    def validate(self, shape: TransformerShape, where: str = "sub-model") -> "SubModelSpec":
        """Check every index against the teacher; raise naming the bad ones."""
        _sorted_unique("layers", self.layers, shape.num_layers, where)
        widths = shape.widths
        if len(self.all_channels) != len(widths):
            raise CoFormerError(f"{where}: channels given for {len(self.all_channels)} stages, the teacher has "
                                f"{len(widths)}")
        for s, (kept, width) in enumerate(zip(self.all_channels, widths)):
            _sorted_unique("channels" if s == 0 else f"channels of stage {s}", kept, width, where)
        for layer, heads, neurons in zip(self.layers, self.heads, self.neurons):
            _sorted_unique(f"heads of layer {layer}", heads, shape.heads[layer], where)
            _sorted_unique(f"neurons of layer {layer}", neurons, shape.mlp_dims[layer], where)
        return self

    @classmethod
    def full(cls, shape: TransformerShape) -> "SubModelSpec":
        """The spec that keeps everything: its sub-model is the teacher."""
        L = shape.num_layers
        return cls(
            layers=tuple(range(L)),
            channels=tuple(range(shape.embed_dim)),
            heads=tuple(tuple(range(shape.heads[i])) for i in range(L)),
            neurons=tuple(tuple(range(shape.mlp_dims[i])) for i in range(L)),
            stage_channels=tuple(tuple(range(c)) for c in shape.stage_dims[1:]),
        )

    def summary(self) -> dict[str, Any]:
        out = {"l": self.num_layers, "d": self.embed_dim, "h": list(self.head_counts), "D": list(self.mlp_dims)}
        if self.stage_channels:
            out["d_stages"] = list(self.stage_widths)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            "layers": list(self.layers),
            "channels": list(self.channels),
            "heads": [list(h) for h in self.heads],
            "neurons": [list(n) for n in self.neurons],
        }
        if self.stage_channels:
            out["stage_channels"] = [list(c) for c in self.stage_channels]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SubModelSpec":
        missing = [k for k in ("layers", "channels", "heads", "neurons") if k not in d]
        if missing:
            raise CoFormerError(f"sub-model spec misses fields {missing}")
        return cls(d["layers"], d["channels"], d["heads"], d["neurons"], d.get("stage_channels", ()))


@dataclass(frozen=True)
class DeviceSpec:
    """One edge device.

    Args:
        name: unique name; also the worker's identity on the wire.
        memory_bytes: Phi_n, what the sub-model may use (parameters + activations).
        flops_budget: Omega_n, FLOPs per inference the sub-model may take.
        link_mbit_s: r_n, the link rate to the central node.
        cpu_share: compute relative to the strongest device (1.0), used to size
            sub-models and, on an emulated device, as its share of one core.
        cpu_cores: cores an emulated device is pinned to.
        backend: engine backend, ``onnxruntime``.
        precision: ``fp32``.
        address: where the device is reached (informational for local runs).
        profile: a device profile (``coformer-runtime profile`` output) or a
            fitted predictor (``coformer fit-predictor``) for this device, used
            by the search; relative paths are relative to the devices file.
    """

    name: str
    memory_bytes: int
    flops_budget: int
    link_mbit_s: float = 1000.0
    cpu_share: float = 1.0
    cpu_cores: Optional[tuple[int, ...]] = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    address: str = "127.0.0.1"
    profile: Optional[str] = None

    def __post_init__(self) -> None:
        where = f"device {self.name!r}"
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise CoFormerError(f"device name {self.name!r} must be non-empty letters, digits, '-', '_' or '.'")
        for fname in ("memory_bytes", "flops_budget"):
            v = getattr(self, fname)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CoFormerError(f"{where}: {fname} is {v!r}, expected a positive integer")
        if not self.link_mbit_s > 0:
            raise CoFormerError(f"{where}: link_mbit_s is {self.link_mbit_s!r}, expected > 0")
        if not 0 < self.cpu_share <= 1:
            raise CoFormerError(f"{where}: cpu_share is {self.cpu_share!r}, expected a value in (0, 1]")
        if self.backend != "onnxruntime":
            raise CoFormerError(f"{where}: backend {self.backend!r} is not supported yet; use 'onnxruntime'")
        if self.precision != "fp32":
            raise CoFormerError(f"{where}: precision {self.precision!r} is not supported yet; use 'fp32'")
        if self.cpu_cores is not None:
            object.__setattr__(self, "cpu_cores", tuple(int(c) for c in self.cpu_cores))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_cores"] = list(self.cpu_cores) if self.cpu_cores is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeviceSpec":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CoFormerError(f"device {d.get('name', '?')!r}: unknown fields {unknown}")
        if "name" not in d:
            raise CoFormerError(f"device entry {dict(d)} has no 'name'")
        return cls(**d)


@dataclass(frozen=True)
class Policy:
    """C: one sub-model spec per device; ``devices[i]`` runs ``submodels[i]``.

    The first device is the central node (it also runs the aggregator). ``decomposition``
    is how the sub-models share the teacher's units (:mod:`coformer.compiler.decomposition`):
    under ``partition`` no unit may be on two devices.
    """

    submodels: tuple[SubModelSpec, ...]
    devices: tuple[str, ...]
    source: str = "manual"
    decomposition: str = "nested"

    def __post_init__(self) -> None:
        object.__setattr__(self, "submodels", tuple(self.submodels))
        object.__setattr__(self, "devices", tuple(self.devices))
        if len(self.submodels) != len(self.devices) or not self.submodels:
            raise CoFormerError(
                f"policy has {len(self.submodels)} sub-models for {len(self.devices)} devices; give one each"
            )
        if len(set(self.devices)) != len(self.devices):
            raise CoFormerError(f"policy devices {list(self.devices)} repeat a name")
        check_decomposition(self.decomposition)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "decomposition": self.decomposition,
            "devices": list(self.devices),
            "submodels": [s.to_dict() for s in self.submodels],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Policy":
        if "submodels" not in d or "devices" not in d:
            raise CoFormerError("policy needs 'devices' and 'submodels'")
        return cls(tuple(SubModelSpec.from_dict(s) for s in d["submodels"]), tuple(d["devices"]),
                   d.get("source", "manual"), d.get("decomposition", "nested"))

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "Policy":
        return cls.from_dict(read_json(path, f"policy file {path} does not exist"))
